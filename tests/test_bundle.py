"""Opening bundles in the runtime (runtime/bundles/load.py), `anchorflow inspect`, torch-free sampling.

Truths: the torch checkpoints the bundle came from (the runtime's callables must reproduce them),
sha256 of the files (a changed byte is refused), and sys.modules of a fresh interpreter
(sampling a bundle never imports torch). Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anchorflow.base.errors import CheckpointError, ConfigError
from anchorflow.runtime.evaluation.parity import TOLERANCES
from anchorflow.runtime.bundles.load import load_bundle

from test_export import tiny_bundle, tiny_root  # noqa: F401  (session fixtures, exported once)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:  # noqa: F811
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("where", ["bundle", "model root"])
def test_loaded_bundle_reproduces_the_torch_checkpoints(tiny_root, tiny_bundle, where):  # noqa: F811
    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.torch_wrappers import TorchSideNet, TorchVelocity

    b = load_bundle(tiny_bundle if where == "bundle" else tiny_root, backend="ort-cpu")
    assert b.path == tiny_bundle and b.providers == ["CPUExecutionProvider"] and b.backend == "ort-cpu"
    assert b.state_shape == (1, 8, 8) and b.null_label == 10 and b.network_providers["sidenet"] == b.providers
    rng = np.random.default_rng(3)
    x, v = (rng.standard_normal((5, 1, 8, 8)).astype(np.float32) for _ in range(2))
    t, h, y = rng.random(5).astype(np.float32), np.full(5, 0.2, np.float32), rng.integers(0, 10, 5)
    tv = TorchVelocity(load_checkpoint(tiny_root / "backbone")[0])
    ts = TorchSideNet(load_checkpoint(tiny_root / "sidenet")[0])
    atol = TOLERANCES["fp32"].atol
    c = {"y": y}
    assert np.abs(b.velocity(x, t, c) - tv(x, t, c)).max() <= atol
    assert np.abs(b.velocity(x, t, None) - tv(x, t, None)).max() <= atol  # None -> null label 10
    assert np.abs(b.sidenet(x, v, t, h, c) - ts(x, v, t, h, c)).max() <= atol
    bt = load_bundle(tiny_bundle, backend="torch")  # the registry's torch backend: the recorded checkpoints
    assert bt.providers == ["torch-cpu"] and np.abs(bt.velocity(x, t, c) - tv(x, t, c)).max() == 0


def test_precision_variant_is_loaded_and_a_missing_one_is_refused(tiny_bundle):  # noqa: F811
    b16 = load_bundle(tiny_bundle, backend="ort-cpu", precision="fp16")
    assert b16.precision == "fp16"
    with pytest.raises(ConfigError, match="no bf16 variant of the backbone.*--precision bf16"):
        load_bundle(tiny_bundle, backend="ort-cpu", precision="bf16")
    with pytest.raises(ConfigError, match="no fp8 variant of the backbone"):
        load_bundle(tiny_bundle, backend="ort-cpu", precision="fp8")
    with pytest.raises(ConfigError, match="unknown backend 'onnx'; choose from auto, ort-cpu, .*trt, torch"):
        load_bundle(tiny_bundle, backend="onnx")


@pytest.mark.parametrize("file", ["backbone.onnx", "sidenet.onnx", "backbone.fp16.onnx"])
def test_tampered_file_is_refused(bundle_copy, file):
    data = bytearray((bundle_copy / file).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (bundle_copy / file).write_bytes(bytes(data))
    precision = "fp16" if "fp16" in file else "fp32"
    with pytest.raises(CheckpointError, match=f"{file} does not match the sha256"):
        load_bundle(bundle_copy, backend="ort-cpu", precision=precision)


@pytest.mark.parametrize("schema", ["anchorflow.bundle/3", "something.else/1", None])
def test_foreign_schema_is_refused(bundle_copy, schema):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["schema"] = schema
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"has schema {schema!r}, but this anchorflow reads anchorflow.bundle/1 or anchorflow.bundle/2"):
        load_bundle(bundle_copy, backend="ort-cpu")


def test_not_a_bundle_and_missing_file(bundle_copy, tmp_path):
    with pytest.raises(CheckpointError, match="is not a bundle"):
        load_bundle(tmp_path / "nothing")
    (bundle_copy / "sidenet.onnx").unlink()
    with pytest.raises(CheckpointError, match="sidenet.onnx is missing"):
        load_bundle(bundle_copy, backend="ort-cpu")


def test_inspect_prints_metadata_and_flags_a_changed_file(bundle_copy):
    from click.testing import CliRunner

    from anchorflow.cli import cli

    out = CliRunner().invoke(cli, ["inspect", str(bundle_copy)])
    assert out.exit_code == 0, out.output
    for text in ("anchorflow.bundle/2", "null label 10", "t = 1 is noise", "x [batch,1,8,8] float32",
                 "batch 1..8 (opt 8)", "batch 1..32", "PASS", "fp16", "sha256, io, weights ok", "../backbone"):
        assert text in out.output, text
    raw = CliRunner().invoke(cli, ["inspect", str(bundle_copy), "--json"])
    assert json.loads(raw.output) == json.loads((bundle_copy / "bundle.json").read_text())
    (bundle_copy / "sidenet.fp16.onnx").write_bytes(b"not onnx")
    out = CliRunner().invoke(cli, ["inspect", str(bundle_copy)])
    assert "fp16  file NOT OK" in out.output and out.output.count("sha256, io, weights ok") == 3


SAMPLE_WITHOUT_TORCH = r"""
import json, sys
from anchorflow.cli import main
main(["sample", sys.argv[1], "--solver", sys.argv[2], "--nfe", "7", "--n", "4", "--cfg", "1.5",
      "--backend", "ort-cpu", "--out", sys.argv[3], "--npy", sys.argv[3] + ".npy"])
print(json.dumps({"torch_loaded": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("solver", ["ba", "euler"])
def test_sampling_a_bundle_never_imports_torch(tiny_bundle, tmp_path, solver):  # noqa: F811
    png = tmp_path / f"{solver}.png"
    proc = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_TORCH, str(tiny_bundle), solver, str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch_loaded": False}
    assert "7 backbone calls" in proc.stdout and "CPUExecutionProvider" in proc.stdout
    x = np.load(str(png) + ".npy")
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all() and png.stat().st_size > 0


BUNDLED = Path(__file__).resolve().parents[1] / "anchorflow" / "bundled" / "digits"


@pytest.mark.skipif(not (BUNDLED / "bundle" / "bundle.json").is_file(), reason="the bundled bundle is not exported yet")
def test_the_bundled_bundle_loads_and_matches_its_metadata():
    b = load_bundle(BUNDLED, backend="ort-cpu")
    assert b.model["name"] == "digits" and b.state_shape == (1, 8, 8) and b.sidenet is not None
    assert b.meta["networks"]["backbone"]["validation"]["passed"]
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert b.format.schema == "anchorflow.bundle/2" and b.null_cond == {"y": 10}  # /1: test_bundle_format.py
    v = b.velocity(x, np.ones(2, np.float32), {"y": np.array([3, 10])})
    assert v.shape == x.shape and np.isfinite(v).all()
