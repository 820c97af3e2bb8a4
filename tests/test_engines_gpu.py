"""TensorRT engines on a real GPU: build fp32/fp16 engines for a tiny bundle, run them, compare with
onnxruntime on the CPU, and sample with the BA-solver on TensorRT.

Skipped with a reason when tensorrt, cuda-python or a CUDA device is missing. Run on a GPU
machine with ``python -m pytest tests/test_engines_gpu.py -m gpu -v`` (docs/tensorrt.md).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'anchorflow[trt]')")
ort = pytest.importorskip("onnxruntime")

from anchorflow.engines import cache  # noqa: E402
from anchorflow.engines.build import BuildOptions, build_engines  # noqa: E402
from anchorflow.engines.runner import load_trt_bundle  # noqa: E402
from anchorflow.errors import AnchorflowError, BackendError  # noqa: E402
from test_engines import CLASSES, STATE, write_bundle  # noqa: E402

# Tolerances. fp32: TensorRT may use TF32 (10-bit mantissa, relative error ~5e-4) and fuse the
# element-wise chain in another order; outputs are O(1), so 1e-3 absolute. fp16: an ulp at 2 is
# 2^-9 ~ 2e-3, so single elements may be off by ~2e-3 after a few ops; the mean error over many
# elements stays well below that; judged on the mean (the export's rule for reduced precision).
TOL = {"fp32_atol": 1e-3, "fp16_mean": 2e-3, "fp16_max": 1e-2, "ba_fp32_atol": 5e-3}
SAMPLES = (1, 4, 8)  # samples per solve; bundle rows as the exporter writes them (x2 backbone, x6 SideNet)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    try:
        from anchorflow.engines.cuda import device_info

        device_info()
    except AnchorflowError as exc:
        pytest.skip(f"no usable CUDA device or cuda-python: {exc}")
    rows = {"backbone": (1, 2 * SAMPLES[1], 2 * SAMPLES[2]), "sidenet": (1, 6 * SAMPLES[1], 6 * SAMPLES[2])}
    folder = write_bundle(tmp_path_factory.mktemp("trt") / "bundle", rows=rows, precisions=("fp16",))
    build_engines(folder, BuildOptions(precisions=("fp32", "fp16"), progress=False), echo=lambda s: None)
    return folder


@pytest.fixture(scope="module")
def loaded(bundle: Path) -> dict:
    """precision -> (velocity, sidenet), loaded once so device buffers are reused and grown across calls."""
    return {p: load_trt_bundle(bundle, precision=p)[:2] for p in ("fp32", "fp16")}


def _ort(bundle: Path, name: str):
    sess = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return lambda **feeds: sess.run(None, feeds)[0]


def _inputs(rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, *STATE)).astype(np.float32),
            "v": rng.standard_normal((rows, *STATE)).astype(np.float32),
            "t": rng.uniform(0, 1, rows).astype(np.float32), "h": rng.uniform(-0.2, 0.2, rows).astype(np.float32),
            "y": rng.integers(0, CLASSES + 1, rows).astype(np.int64)}


def _pairs(bundle: Path, loaded: dict, precision: str, rows: int):
    velocity, sidenet = loaded[precision]
    f = _inputs(rows, seed=rows)
    yield velocity(f["x"], f["t"], f["y"]), _ort(bundle, "backbone")(x=f["x"], t=f["t"], y=f["y"])
    yield sidenet(f["x"], f["v"], f["t"], f["h"], f["y"]), _ort(bundle, "sidenet")(**f)


@pytest.mark.parametrize("rows", [1, 7, 2 * SAMPLES[2], 3])  # 16 = guided max backbone rows; then shrink again
def test_fp32_engines_match_onnxruntime(bundle: Path, loaded: dict, rows: int) -> None:
    for got, want in _pairs(bundle, loaded, "fp32", rows):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=TOL["fp32_atol"], rtol=0)


@pytest.mark.parametrize("rows", [1, 16])
def test_fp16_engines_match_onnxruntime_on_mean(bundle: Path, loaded: dict, rows: int) -> None:
    for got, want in _pairs(bundle, loaded, "fp16", rows):
        err = np.abs(got.astype(np.float64) - want)
        assert err.mean() < TOL["fp16_mean"] and err.max() < TOL["fp16_max"], (err.mean(), err.max())


def test_sidenet_takes_the_probe_rows(bundle: Path, loaded: dict) -> None:
    _, sidenet = loaded["fp32"]
    rows = 3 * 2 * SAMPLES[2]  # forward probe of a guided batch at max samples
    f = _inputs(rows)
    np.testing.assert_allclose(sidenet(f["x"], f["v"], f["t"], f["h"], f["y"]), _ort(bundle, "sidenet")(**f),
                               atol=TOL["fp32_atol"], rtol=0)
    with pytest.raises(BackendError, match="at most 48 rows"):
        f = _inputs(rows + 1)
        sidenet(f["x"], f["v"], f["t"], f["h"], f["y"])


def test_ba_solve_on_tensorrt(bundle: Path) -> None:
    from anchorflow.runtime import solve

    velocity, sidenet, description = load_trt_bundle(bundle)
    assert "TensorRT" in description
    bb, sn = _ort(bundle, "backbone"), _ort(bundle, "sidenet")
    ort_v = lambda x, t, y: bb(x=x, t=t, y=y)  # noqa: E731
    ort_s = lambda x, v, t, h, y: sn(x=x, v=v, t=t, h=h, y=y)  # noqa: E731
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((SAMPLES[2], *STATE)).astype(np.float32)
    y = rng.integers(0, CLASSES, SAMPLES[2])
    kw = dict(y=y, cfg_scale=1.5, null_label=CLASSES)
    got = solve("ba", velocity, noise, 7, sidenet=sidenet, **kw)
    want = solve("ba", ort_v, noise, 7, sidenet=ort_s, **kw)
    assert got.nfe == want.nfe == 7
    np.testing.assert_allclose(got.x, want.x, atol=TOL["ba_fp32_atol"], rtol=0)


def test_second_build_uses_the_cache(bundle: Path) -> None:
    records = build_engines(bundle, BuildOptions(precisions=("fp32",), progress=False), echo=lambda s: None)
    assert {r.network for r in records} == {"backbone", "sidenet"} and all(r.cached for r in records)
    assert list(cache.engine_dir(bundle).glob("timing-*.cache"))


def test_engine_from_another_tensorrt_is_refused(bundle: Path) -> None:
    manifest_path = cache.engine_dir(bundle) / cache.MANIFEST
    original = manifest_path.read_text()
    manifest = json.loads(original)
    for entry in manifest["engines"].values():
        entry["tensorrt_version"] = "9.9.9"
    try:
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(BackendError, match="built with TensorRT 9.9.9.*--force"):
            load_trt_bundle(bundle)
    finally:
        manifest_path.write_text(original)
