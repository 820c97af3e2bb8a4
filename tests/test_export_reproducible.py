"""Export is byte-reproducible: the same weights exported twice give the same files, byte for byte
(every ONNX graph and variant has the same sha256), and bundle.json differs only in the export's
timestamp and the latencies it measured. (The sources are recorded relative to the bundle, so the test exports the same
checkpoints from a copy of the model folder.) A user can then check that a bundle came from the checkpoints they hold by exporting them again."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
sys.path.insert(0, str(Path(__file__).parent))
from test_export import MAX_BATCH, tiny_bundle, tiny_root  # noqa: E402,F401  (session fixtures)


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "bundle.json"}


def _first_difference(a: Path, b: Path, names: list[str]) -> str:
    """Which files differ, and the first lines of the first differing graph's text form."""
    import difflib

    import onnx

    name = next((n for n in names if n.endswith(".onnx") and (a / n).is_file() and (b / n).is_file()), None)
    if name is None:
        return f"files differ: {names}"
    ta, tb = (str(onnx.load(str(f / name), load_external_data=False)).splitlines() for f in (a, b))
    diff = list(difflib.unified_diff(ta, tb, lineterm="", n=1))[:30]
    return f"files differ: {names}; {name}:\n" + "\n".join(diff)


TIMED = re.compile(r"latency|_ms(_|$)|seconds|elapsed")  # wall-clock measurements the export records


def _meta_without_time(folder: Path) -> dict:
    """bundle.json less what records when and how fast (the export's timestamp, measured latencies)."""
    meta = json.loads((folder / "bundle.json").read_text())
    assert meta["export"].pop("created").endswith("Z")

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not TIMED.search(k)}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(meta)


def test_the_same_weights_export_to_the_same_bytes(tiny_root, tiny_bundle, tmp_path):  # noqa: F811
    from anchorflow.export.bundle import export_bundle

    # the same checkpoints in another model folder (the bundle records its sources relative to itself)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy, ignore=shutil.ignore_patterns("bundle", ".*"))
    again = export_bundle(copy, precisions=["fp16"], max_batch=MAX_BATCH, progress=False, command="test").path
    assert again == copy / "bundle"
    first, second = _files(tiny_bundle), _files(again)
    assert any(name.endswith(".onnx") for name in first) and len(first) >= 4
    differ = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
    assert not differ, _first_difference(tiny_bundle, again, differ)
    assert _meta_without_time(tiny_bundle) == _meta_without_time(again)
