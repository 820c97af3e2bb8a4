"""torch -> ONNX export, parity statistics, reduced precision, atomic publishing (export/).

Truths: the torch module itself (ONNX must reproduce it), hand-made arrays with known errors for
the statistics, and the file system (a refused export leaves the old bundle byte for byte).
The session fixtures ``tiny_root`` / ``tiny_bundle`` are shared with test_bundle.py and
test_verify.py (imported from here) so the tiny model is exported once per test session.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from anchorflow.base.errors import CheckpointError, ConfigError
from anchorflow.runtime.evaluation.parity import TOLERANCES, Tolerance, compare

MAX_BATCH = 4  # backbone rows up to 8, SideNet rows up to 24
DATA = {"name": "digits", "state_shape": [1, 8, 8], "num_classes": 10, "data_range": [-1.0, 1.0]}


def make_tiny_root(root: Path, seed: int = 0, poison: bool = False) -> Path:
    """A model root with a tiny DiT backbone and SideNet checkpoint. The zero-initialised output
    layers (adaLN-Zero, the SideNet's h-scaled head) get random weights, else both nets output
    exact zeros and parity would be trivial. ``poison`` puts a NaN into the backbone's weights."""
    torch = pytest.importorskip("torch")
    from anchorflow.trainers.backbone import DiT, default_arch
    from anchorflow.trainers.checkpoint import read_config, save_checkpoint
    from anchorflow.trainers.sidenet import SideNet, backbone_identity, sidenet_arch

    torch.manual_seed(seed)
    arch = {**default_arch((1, 8, 8), 10), "hidden": 32, "depth": 1, "heads": 2}
    backbone = DiT(**{k: v for k, v in arch.items() if k != "type"})
    side_arch = {**sidenet_arch(backbone, width=8), "cond_dim": 16, "freq_dim": 16}
    side = SideNet(side_arch)
    with torch.no_grad():
        for p in [*backbone.parameters(), *side.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
        if poison:
            backbone.final.linear.bias[0] = float("nan")
    training = {"command": "tests/test_export.py", "loss_log": [[1, 0.5]]}
    save_checkpoint(root / "backbone", backbone, {"kind": "backbone", "arch": arch, "data": DATA, "training": training})
    identity = backbone_identity(backbone, read_config(root / "backbone"))
    save_checkpoint(root / "sidenet", side, {"kind": "sidenet", "arch": side_arch, "backbone": identity,
                                             "data": DATA, "training": training})
    return root


# pytest registers an imported fixture once per importing module, so the session fixtures below
# cache on disk under the session's base temp folder: the export runs once per session.
@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    root = tmp_path_factory.getbasetemp() / "tiny-model"
    if not (root / "sidenet" / "config.json").is_file():
        make_tiny_root(root)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tiny_root: Path) -> Path:
    """``tiny_root/bundle``: fp32 + fp16, exported and validated once per session."""
    pytest.importorskip("onnxscript")
    from anchorflow.export.bundle import export_bundle

    if not (tiny_root / "bundle" / "bundle.json").is_file():
        result = export_bundle(tiny_root, precisions=["fp16"], max_batch=MAX_BATCH, progress=False, command="test")
        assert result.path == tiny_root / "bundle"
    return tiny_root / "bundle"


def _torch_modules(root: Path):
    from anchorflow.trainers.checkpoint import load_checkpoint

    return {"backbone": load_checkpoint(root / "backbone")[0], "sidenet": load_checkpoint(root / "sidenet")[0]}


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# -- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", ["backbone", "sidenet"])
@pytest.mark.parametrize("batch", [1, 5, "max"])
def test_torch_onnx_ort_round_trip_within_1e4(tiny_root, tiny_bundle, network, batch):
    from anchorflow.export.onnx_export import NETS, random_inputs
    from anchorflow.export.validate import torch_runner

    spec = NETS[network]
    rows = spec.batch_range(MAX_BATCH)["max"] if batch == "max" else batch
    feeds = random_inputs(spec, (1, 8, 8), 10, rows, np.random.default_rng(123))  # not the export's seed
    want = torch_runner(_torch_modules(tiny_root)[network], spec)(feeds)
    got = _ort(tiny_bundle / spec.file).run([spec.output], feeds)[0]
    assert got.shape == want.shape == (rows, 1, 8, 8)
    assert np.abs(want).mean() > 1e-3  # the nets are not trivially zero
    # fp32 parity tolerance, justified in anchorflow.runtime.evaluation.parity.stats.TOLERANCES
    assert np.abs(got - want).max() <= TOLERANCES["fp32"].atol


def test_bundle_json_and_onnx_metadata(tiny_bundle):
    import onnx

    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert meta["schema"] == "anchorflow.bundle/2"
    assert meta["guidance"] == {"mode": "rows", "null": {"y": 10}} and meta["time"] == {"map": "identity"}
    assert meta["model"] == {"name": "digits", "state_shape": [1, 8, 8], "num_classes": 10, "null_label": 10,
                             "data_range": [-1.0, 1.0]}
    assert "t = 1 is noise, t = 0 is data" in meta["time_convention"]
    assert meta["precisions"] == ["fp32", "fp16"] and meta["export"]["real_inputs"] == "digits test split"
    assert {"anchorflow", "torch", "onnx", "onnxruntime", "opset"} <= set(meta["versions"])
    bb, sn = meta["networks"]["backbone"], meta["networks"]["sidenet"]
    assert [i["name"] for i in bb["inputs"]] == ["x", "t", "y"] and bb["outputs"][0]["name"] == "v"
    assert [i["name"] for i in sn["inputs"]] == ["x", "v", "t", "h", "y"] and sn["outputs"][0]["name"] == "delta"
    assert bb["inputs"][2]["dtype"] == "int64" and bb["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert [i["role"] for i in sn["inputs"]] == ["state", "velocity", "time", "offset", "condition"]
    assert bb["batch"] == {"min": 1, "opt": 2 * MAX_BATCH, "max": 2 * MAX_BATCH}
    assert sn["batch"]["max"] == 8 * MAX_BATCH  # 4 BA probe offsets (merged probe) x 2 guidance rows
    assert bb["checkpoint"]["path"] == "../backbone" and "loss_log" not in bb["checkpoint"]["training"]
    assert sn["checkpoint"]["backbone"]["weights_sha256"] == bb["checkpoint"]["weights_sha256"]
    assert bb["validation"]["passed"] and len(bb["validation"]["cases"]) == 6  # 3 batches x random/real
    model = onnx.load(str(tiny_bundle / "sidenet.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["anchorflow.schema"] == "anchorflow.bundle/2" and props["anchorflow.network"] == "sidenet"
    assert json.loads(props["anchorflow.model"]) == meta["model"]
    assert json.loads(props["anchorflow.io"])["batch"] == sn["batch"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 8, 8]


def test_cleanup_is_reported_and_kept_only_with_parity(tiny_bundle):
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    for entry in meta["networks"].values():
        c = entry["cleanup"]
        assert c["kept"] and c["nodes_after"] <= c["nodes_before"] and c["bytes_after"] < c["bytes_before"]
        assert c["latency_ms_before"] > 0 and c["latency_ms_after"] > 0


# -- reduced precision -----------------------------------------------------------------------------
def test_fp16_variant_runs_with_float32_io_and_reports_its_error(tiny_root, tiny_bundle):
    import onnx

    from anchorflow.export.onnx_export import SIDENET, random_inputs
    from anchorflow.export.validate import torch_runner

    sess = _ort(tiny_bundle / "sidenet.fp16.onnx")
    assert {i.type for i in sess.get_inputs()} == {"tensor(float)", "tensor(int64)"}
    assert sess.get_outputs()[0].type == "tensor(float)"
    weights = onnx.load(str(tiny_bundle / "sidenet.fp16.onnx")).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    feeds = random_inputs(SIDENET, (1, 8, 8), 10, 9, np.random.default_rng(5))
    stats = compare(sess.run(["delta"], feeds)[0], torch_runner(_torch_modules(tiny_root)["sidenet"], SIDENET)(feeds),
                    TOLERANCES["fp16"])
    assert stats.mean_abs > 0 and stats.passed  # really reduced, yet within the fp16 budget
    entry = json.loads((tiny_bundle / "bundle.json").read_text())["networks"]["sidenet"]["precisions"]["fp16"]
    assert entry["validation"]["passed"] and entry["validation"]["reference"] == "torch fp32"
    assert entry["validation"]["worst"]["mean_abs"] > 0 and entry["validation"]["tolerance"]["stat"] == "mean"


def test_bf16_variant_keeps_time_embedding_in_fp32_and_matches_torch(tiny_root, tiny_bundle):
    import onnx

    from anchorflow.export.onnx_export import BACKBONE, random_inputs
    from anchorflow.export.precision import time_embedding_nodes, to_low
    from anchorflow.export.stages import reference_runner
    from anchorflow.export.validate import torch_runner

    fp32 = onnx.load(str(tiny_bundle / "backbone.onnx"))
    low = to_low(fp32, "bf16")
    onnx.checker.check_model(low, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in low.graph.value_info}
    sin_cos = [n for n in low.graph.node if n.op_type in ("Sin", "Cos")]
    assert sin_cos and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sin_cos)
    assert {n.name for n in sin_cos} <= time_embedding_nodes(low.graph)
    assert any(w.data_type == onnx.TensorProto.BFLOAT16 for w in low.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in low.graph.output] == [onnx.TensorProto.FLOAT]
    feeds = random_inputs(BACKBONE, (1, 8, 8), 10, 3, np.random.default_rng(7))
    got = reference_runner(low, ["v"])(feeds)[0]
    stats = compare(got, torch_runner(_torch_modules(tiny_root)["backbone"], BACKBONE)(feeds), TOLERANCES["bf16"])
    assert stats.mean_abs > 0 and stats.passed


def test_precision_lists():
    from anchorflow.export.precision import parse_precisions, variant_file

    assert parse_precisions(["fp16,bf16", "fp16"]) == ["fp32", "fp16", "bf16"]
    assert parse_precisions([]) == ["fp32"]
    assert variant_file("sidenet.onnx", "bf16") == "sidenet.bf16.onnx"
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        parse_precisions(["int4"])


# -- refused exports -------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_nan_export_fails_and_leaves_the_old_bundle_intact(tiny_bundle, tmp_path):
    from anchorflow.cli import main

    poisoned = make_tiny_root(tmp_path / "poisoned", poison=True)
    out = tmp_path / "published"
    shutil.copytree(tiny_bundle, out)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(poisoned), "--out", str(out), "--precision", "fp32"])
    assert exc.value.code == 1
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned", "published"]  # no temp folders left


def test_nan_export_message_and_no_folder(tmp_path):
    from anchorflow.export.bundle import export_bundle

    poisoned = make_tiny_root(tmp_path / "poisoned", poison=True)
    with pytest.raises(CheckpointError, match=r"backbone's torch output has \d+ NaN.*nothing was written"):
        export_bundle(poisoned, tmp_path / "new", max_batch=2, progress=False)
    assert not (tmp_path / "new").exists()


def test_checkpoint_folder_needs_out_and_batch_must_be_positive(tiny_root):
    from anchorflow.export.bundle import export_bundle

    with pytest.raises(ConfigError, match="give --out"):
        export_bundle(tiny_root / "backbone", progress=False)
    with pytest.raises(ConfigError, match="--max-batch must be a positive"):
        export_bundle(tiny_root, tiny_root / "x", max_batch=0, progress=False)


# -- statistics ------------------------------------------------------------------------------------
def test_compare_statistics_on_known_errors():
    ref = np.ones((4, 25), np.float32)
    out = ref.copy()
    out[0, 0] += 0.5  # one element off by 0.5 out of 100
    s = compare(out, ref, Tolerance(1e-4, 0.0, "max"))
    assert s.max_abs == pytest.approx(0.5) and s.mean_abs == pytest.approx(0.005)
    assert s.max_rel == pytest.approx(0.5) and s.p99_abs == pytest.approx(0.5 * 0.01, abs=1e-6)
    assert s.needed_atol == pytest.approx(0.5) and not s.passed
    mean = compare(out, ref, Tolerance(0.01, 0.0, "mean"))
    assert mean.needed_atol == pytest.approx(0.005) and mean.passed
    assert compare(out, ref, Tolerance(0.0, 0.5, "max")).passed  # |err| - rtol |ref| <= 0


def test_compare_flags_nan_inf_and_shape():
    ref = np.zeros(6, np.float32)
    out = ref.copy()
    out[2], out[3] = np.nan, np.inf
    s = compare(out, ref, TOLERANCES["fp32"])
    assert not s.passed and "1 NaN, 1 Inf of 6 values" in s.problem
    assert "shape" in compare(np.zeros(5), ref, TOLERANCES["fp32"]).problem


def test_relative_error_uses_the_tensor_scale_near_zero():
    # A SideNet delta is exactly 0 at h = 0: relative error there is measured against the tensor's
    # RMS (times REL_FLOOR), not against 0, so it stays finite and meaningful.
    from anchorflow.runtime.evaluation.parity.stats import REL_FLOOR

    ref = np.array([0.0, 1.0, -1.0, 1.0])
    s = compare(ref + np.array([1e-6, 0, 0, 0]), ref, TOLERANCES["fp32"])
    assert s.max_rel == pytest.approx(1e-6 / (REL_FLOOR * np.sqrt(0.75)))


def test_opset_range():
    from anchorflow.export.onnx_export import check_opset

    assert check_opset(18) == 18
    with pytest.raises(ConfigError, match=r"--opset must lie in 18\.\.\d+"):
        check_opset(17)  # the dynamo exporter's down-conversion breaks Split there
