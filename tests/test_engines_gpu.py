"""TensorRT engines on a real GPU: the product's own fp32/fp16/bf16 graphs, the bundled digits model, and
Polygraphy's TrtRunner as an independent runner on the same engines.

Without tensorrt, cuda-python or a CUDA device this module is skipped with the reason, except
with ``ANCHORFLOW_REQUIRE_GPU=1`` (a GPU machine's check script sets it): then a missing piece
is a failure, so a broken GPU install cannot report "skipped". Run with
``ANCHORFLOW_REQUIRE_GPU=1 python -m pytest tests/test_engines_gpu.py -m gpu -v`` (docs/tensorrt.md).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
REQUIRE = os.environ.get("ANCHORFLOW_REQUIRE_GPU") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"ANCHORFLOW_REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import tensorrt as trt  # noqa: F401
except ImportError as exc:
    _unavailable(f"TensorRT is not installed ({exc}; pip install 'anchorflow[trt-cu12]')")
ort = pytest.importorskip("onnxruntime")

from anchorflow.engines import cache  # noqa: E402
from anchorflow.engines.build import BuildOptions, build_engines  # noqa: E402
from anchorflow.engines.runner import TrtEngines  # noqa: E402
from anchorflow.runtime import load_bundle  # noqa: E402
from anchorflow.base.errors import AnchorflowError, BackendError, ConfigError  # noqa: E402
from test_engines import CLASSES, STATE, write_bundle  # noqa: E402

# Tolerances. fp32: TF32 is off (the build's default), so TensorRT's fp32 kernels differ from
# onnxruntime's only in summation order: ~1e-6 relative on O(1) outputs; 1e-5 absolute for the
# tiny graphs, verify's 1e-4 for the digits DiT (its export parity vs torch is 1e-5). fp16/bf16:
# judged on the mean error (the export's rule for reduced precision): an fp16 ulp at 2 is 2e-3,
# a bf16 ulp 1.6e-2.
TOL = {"fp32_atol": 1e-5, "digits_fp32_atol": 1e-4, "fp16_mean": 2e-3, "fp16_max": 1e-2,
       "bf16_mean": 1.6e-2, "bf16_max": 8e-2, "ba_fp32_atol": 1e-4}
SAMPLES = (1, 4, 8)  # samples per solve; bundle rows as the exporter writes them (x2 backbone, x6 SideNet)


@pytest.fixture(scope="module")
def gpu() -> tuple:
    try:
        from anchorflow.engines import driver
        from anchorflow.engines.cuda import device_info

        driver.check("tensorrt", trt.__version__)
        return device_info()
    except AnchorflowError as exc:
        _unavailable(f"no usable CUDA device or cuda-python: {exc}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, gpu) -> Path:
    """The tiny two-network bundle with the exporter's own fp16/bf16 variants (export/precision.py)."""
    rows = {"backbone": (1, 2 * SAMPLES[1], 2 * SAMPLES[2]), "sidenet": (1, 6 * SAMPLES[1], 6 * SAMPLES[2])}
    precisions = ("fp16", "bf16") if gpu[1] >= (8, 0) else ("fp16",)
    folder = write_bundle(tmp_path_factory.mktemp("trt") / "bundle", rows=rows, precisions=precisions)
    build_engines(folder, BuildOptions(precisions=("fp32", *precisions), progress=False), echo=lambda s: None)
    return folder


@pytest.fixture(scope="module")
def loaded(bundle: Path) -> dict:
    """precision -> TrtEngines, loaded once so device buffers are reused and grown across calls."""
    meta = json.loads((bundle / "bundle.json").read_text())
    precisions = ["fp32", *meta["networks"]["backbone"]["precisions"]]
    engines = {p: TrtEngines.load(bundle, precision=p) for p in precisions}
    yield engines
    for e in engines.values():
        e.close()


def _ort(path: Path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda **feeds: sess.run(None, feeds)[0]


def _inputs(rows: int, seed: int = 0, classes: int = CLASSES, state=STATE) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, *state)).astype(np.float32),
            "v": rng.standard_normal((rows, *state)).astype(np.float32),
            "t": rng.uniform(0, 1, rows).astype(np.float32), "h": rng.uniform(-0.2, 0.2, rows).astype(np.float32),
            "y": rng.integers(0, classes + 1, rows).astype(np.int64)}


def _pairs(bundle: Path, engines: TrtEngines, rows: int):
    f = _inputs(rows, seed=rows)
    yield engines.runs["backbone"]({k: f[k] for k in "xty"}), _ort(bundle / "backbone.onnx")(x=f["x"], t=f["t"], y=f["y"])
    yield engines.runs["sidenet"](f), _ort(bundle / "sidenet.onnx")(**f)


@pytest.mark.parametrize("rows", [1, 7, 2 * SAMPLES[2], 3])  # 16 = guided max backbone rows; then shrink again
def test_fp32_engines_match_onnxruntime(bundle: Path, loaded: dict, rows: int) -> None:
    for got, want in _pairs(bundle, loaded["fp32"], rows):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=TOL["fp32_atol"], rtol=0)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 16])
def test_reduced_precision_engines_match_onnxruntime_on_mean(bundle: Path, loaded: dict, precision: str, rows: int) -> None:
    if precision not in loaded:
        pytest.skip(f"{precision} needs compute capability >= 8.0")
    for got, want in _pairs(bundle, loaded[precision], rows):
        err = np.abs(got.astype(np.float64) - want)
        assert err.mean() < TOL[f"{precision}_mean"] and err.max() < TOL[f"{precision}_max"], (err.mean(), err.max())


def test_ours_equals_polygraphy_trtrunner_on_the_same_engine(bundle: Path, loaded: dict) -> None:
    """Polygraphy's runner is the independent check of our buffers, shapes and stream handling."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    manifest = cache.read_manifest(bundle)["engines"]
    entry = next(e for e in manifest.values() if e["network"] == "backbone" and e["precision"] == "fp32")
    f = _inputs(9, seed=3)
    with TrtRunner(EngineFromBytes(cache.read_engine(bundle, entry))) as runner:
        theirs = runner.infer({"x": f["x"], "t": f["t"], "y": f["y"]})["v"]
    ours = loaded["fp32"].runs["backbone"]({k: f[k] for k in "xty"})
    np.testing.assert_array_equal(ours, np.asarray(theirs))  # same engine, same inputs: bit-identical


def test_sidenet_takes_the_probe_rows_and_labels_are_checked(bundle: Path, loaded: dict) -> None:
    sidenet = loaded["fp32"].runs["sidenet"]
    rows = 3 * 2 * SAMPLES[2]  # forward probe of a guided batch at max samples
    f = _inputs(rows)
    np.testing.assert_allclose(sidenet(f), _ort(bundle / "sidenet.onnx")(**f), atol=TOL["fp32_atol"], rtol=0)
    with pytest.raises(BackendError, match="takes 1..48 rows of"):
        sidenet(_inputs(rows + 1))
    f = _inputs(2)
    with pytest.raises(ConfigError, match="outside this model's labels"):
        loaded["fp32"].runs["backbone"]({"x": f["x"], "t": f["t"], "y": np.array([0, CLASSES + 1])})
    with pytest.raises(ConfigError, match=f"label {CLASSES + 1}"):  # the same through the runtime's one condition rule
        load_bundle(bundle, backend="trt").velocity(f["x"], f["t"], {"y": np.array([0, CLASSES + 1])})


def test_ba_solve_on_tensorrt(bundle: Path) -> None:
    from anchorflow.runtime import solve

    b = load_bundle(bundle, backend="trt")  # the one TensorRT callable API
    velocity, sidenet = b.velocity, b.sidenet
    assert b.backend == "trt" and "TensorRT" in b.providers[0]
    bb, sn = _ort(bundle / "backbone.onnx"), _ort(bundle / "sidenet.onnx")
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((SAMPLES[2], *STATE)).astype(np.float32)
    kw = dict(y=rng.integers(0, CLASSES, SAMPLES[2]), cfg_scale=1.5, null_label=CLASSES)
    got = solve("ba", velocity, noise, 7, sidenet=sidenet, **kw)
    want = solve("ba", lambda x, t, c: bb(x=x, t=t, y=c["y"]), noise, 7,
                 sidenet=lambda x, v, t, h, c: sn(x=x, v=v, t=t, h=h, y=c["y"]), **kw)
    assert got.nfe == want.nfe == 7
    np.testing.assert_allclose(got.x, want.x, atol=TOL["ba_fp32_atol"], rtol=0)


def test_second_build_uses_the_cache_and_other_options_rebuild(bundle: Path) -> None:
    records = build_engines(bundle, BuildOptions(precisions=("fp32",), progress=False), echo=lambda s: None)
    assert {r.network for r in records} == {"backbone", "sidenet"} and all(r.cached for r in records)
    assert list(cache.engine_dir(bundle).glob("timing-*.cache"))
    other = build_engines(bundle, BuildOptions(precisions=("fp32",), opt_level=1, progress=False), echo=lambda s: None)
    assert not any(r.cached for r in other)


def test_engine_from_another_tensorrt_is_refused(bundle: Path) -> None:
    manifest_path = cache.engine_dir(bundle) / cache.MANIFEST
    original = manifest_path.read_text()
    manifest = json.loads(original)
    for entry in manifest["engines"].values():
        entry["tensorrt_version"] = "9.9.9"
    try:
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(BackendError, match="built with TensorRT 9.9.9.*--force"):
            load_bundle(bundle, backend="trt")
    finally:
        manifest_path.write_text(original)


# -- the real digits bundle ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory, gpu) -> Path:
    """A copy of the bundled digits bundle (fp32 + fp16 ONNX as shipped) with fp32 and fp16 engines."""
    from anchorflow.modelref import locate

    folder = tmp_path_factory.mktemp("digits") / "bundle"
    shutil.copytree(locate("default").bundle, folder, ignore=shutil.ignore_patterns("engines"))
    build_engines(folder, BuildOptions(precisions=("fp32", "fp16"), batch={"max": 16}, progress=False), echo=lambda s: None)
    return folder


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_digits_engines_match_onnxruntime(digits: Path, precision: str) -> None:
    meta = json.loads((digits / "bundle.json").read_text())
    model = meta["model"]
    with TrtEngines.load(digits, precision=precision) as engines:
        f = _inputs(32, seed=5, classes=model["num_classes"], state=tuple(model["state_shape"]))
        got = engines.runs["backbone"]({k: f[k] for k in "xty"})
    want = _ort(digits / "backbone.onnx")(x=f["x"], t=f["t"], y=f["y"])
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=TOL["digits_fp32_atol"], rtol=0)  # fails with TF32 on
    else:
        # the export measured this fp16 graph's mean error against torch fp32; TensorRT's fp16 kernels
        # round differently, so allow twice that
        worst = meta["networks"]["backbone"]["precisions"]["fp16"]["validation"]["worst"]["mean_abs"]
        assert np.abs(got - want).mean() < 2 * worst


def test_digits_bf16_engine_from_the_exporter(tmp_path: Path, gpu) -> None:
    """A bf16 variant exported by the product itself builds and runs (Ampere or newer)."""
    if gpu[1] < (8, 0):
        pytest.skip("bf16 engines need compute capability >= 8.0")
    pytest.importorskip("torch")
    from anchorflow.cli import main

    out = tmp_path / "bf16"
    try:
        main(["export", "default", "--out", str(out), "--precision", "bf16", "--max-batch", "8"])
    except SystemExit as exc:  # main exits only on errors
        pytest.fail(f"anchorflow export failed with status {exc.code}")
    build_engines(out, BuildOptions(precisions=("bf16",), progress=False), echo=lambda s: None)
    meta = json.loads((out / "bundle.json").read_text())
    with TrtEngines.load(out, precision="bf16") as engines:
        f = _inputs(8, seed=6, classes=meta["model"]["num_classes"], state=tuple(meta["model"]["state_shape"]))
        got = engines.runs["backbone"]({k: f[k] for k in "xty"})
    want = _ort(out / "backbone.onnx")(x=f["x"], t=f["t"], y=f["y"])
    assert np.isfinite(got).all() and np.abs(got - want).mean() < TOL["bf16_mean"] * 4  # DiT depth 4: a few bf16 ulps
