"""Byte-reproducibility of every exporter: sha256 of each file of a bundle per export path.

Exports, into fixed folders (so recorded paths are equal from run to run), with every check on:

* ``digits``: the bundled digits model (reference backbone + SideNet, fp32 + fp16) - ``export/bundle.py``;
* ``sd3``: a tiny random-init SD3 transformer folder, fp32 + fp16, with a SideNet - ``export/adapter_export.py``
  and ``export/sidenet_export.py``;
* ``factory``: ``test_adapters:make_backbone`` (a ``pkg.module:factory`` source);
* ``pipeline``: a tiny whole SD3 pipeline folder with the same SideNet (text encoders, VAE: ``export/pipeline*.py``).

Graphs exported from a module's forward carry its source path and line numbers (the exporter's
per-node stack traces; our own nets' are stripped by the clean-up), so compare runs from one checkout;
each ``.onnx`` is also hashed without those stack traces. torch.export writes its range constraints
(graph metadata_props) in an order that follows Python's string hashing: the script runs itself with
``PYTHONHASHSEED=0`` (without it, two runs of the same code give SD3 graphs of different sha256).

The fixtures (tiny folders, a 2-iteration SideNet) are built once under ``--work`` and reused, so a run
before and a run after a refactor export the same weights. Every file's sha256 is recorded; bundle.json
is recorded after dropping the fields that change from run to run (``created``, ``seconds``,
``export_seconds``, the clean-up's measured latencies, ``export.command``).

    nice -n 5 python benchmarks/export_hashes.py --work /tmp/export1_hashes --out benchmarks/results/export_hashes_before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"created", "seconds", "export_seconds", "latency_ms_before", "latency_ms_after"}


def _cli(args: list) -> None:
    from click.testing import CliRunner

    from anchorflow.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if res.exit_code != 0:
        raise SystemExit(f"anchorflow {' '.join(map(str, args))} failed:\n{res.output}")


def fixtures(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    fx = work / "fixtures"
    if not (fx / "done").exists():
        shutil.rmtree(fx, ignore_errors=True)
        fx.mkdir(parents=True)
        import tiny_diffusers
        from _tiny_full_pipelines import sd3

        tiny_diffusers.save("sd3", fx / "sd3")
        sd3(fx / "pipe")
        r = np.random.default_rng(0)
        np.savez(fx / "cond.npz", encoder_hidden_states=r.standard_normal((3, 6, 32)).astype(np.float32),
                 pooled_projections=r.standard_normal((3, 16)).astype(np.float32))
        np.savez(fx / "null.npz", encoder_hidden_states=r.standard_normal((1, 6, 32)).astype(np.float32),
                 pooled_projections=r.standard_normal((1, 16)).astype(np.float32))
        _cli(["train", "sidenet", "--backbone", fx / "pipe" / "transformer", "--out", fx / "side", "--data", "none",
              "--cond", fx / "cond.npz", "--null-cond", fx / "null.npz", "--iters", "2", "--batch", "4", "--chain",
              "2", "--width", "8", "--lr", "1e-2", "--start-states", "4", "--solve-steps", "2", "--cache-dir",
              fx / "cache"])
        (fx / "done").write_text("ok\n")
    return {"sd3": fx / "sd3", "pipe": fx / "pipe", "side": fx / "side"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def hashes(bundle: Path) -> dict:
    out = {}
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = str(f.relative_to(bundle))
        if rel == "bundle.json":
            meta = json.loads(f.read_text())
            meta["export"].pop("command", None)  # sys.argv of this script: its --out differs
            text = json.dumps(_strip(meta), indent=1, sort_keys=True)  # JSON objects are unordered
            (bundle.parent / f"{bundle.name}.bundle.json").write_text(text)  # kept for diffing
            out["bundle.json (normalised)"] = hashlib.sha256(text.encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
            if rel.endswith(".onnx"):
                out[rel + " (no stack traces)"] = _traceless(f)
    return out


def _traceless(path: Path) -> str:
    """sha256 of the graph without the exporter's per-node ``pkg.torch.onnx.stack_trace`` (source file
    paths and line numbers of the traced modules' forward: they move when a line above them moves)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # torch.export orders its range constraints by str hash
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/export1_hashes"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="digits,sd3,factory,pipeline")
    ap.add_argument("--tag", default="out", help="bundles go to WORK/TAG/<name>")
    a = ap.parse_args()
    fx = fixtures(a.work)
    runs = {
        "digits": ["export", "default", "--max-batch", "8"],
        "sd3": ["export", fx["pipe"] / "transformer", "--sidenet", fx["side"], "--precision", "fp32,fp16",
                "--max-batch", "2"],
        "factory": ["export", "test_adapters:make_backbone", "--precision", "fp32,fp16"],
        "pipeline": ["export", fx["pipe"], "--sidenet", fx["side"], "--max-batch", "2"],
    }
    result = {"command": " ".join(["python", *sys.argv]), "loadavg": Path("/proc/loadavg").read_text().strip(),
              "bundles": {}, "seconds": {}}
    for name in a.only.split(","):
        out = a.work / a.tag / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        _cli([*runs[name], "--out", out])
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        result["bundles"][name] = hashes(out)
        print(name, result["seconds"][name], "s", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
