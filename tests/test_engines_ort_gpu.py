"""onnxruntime GPU backends: wheels, libraries, ``auto`` and the TensorRT provider's profiles.

No GPU and only the CPU onnxruntime wheel here: the provider lists onnxruntime-gpu would report
are fed in through a stand-in for ``onnxruntime.get_available_providers`` (the one thing this
machine cannot produce); library loading and wheel detection run for real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from anchorflow.base.errors import BackendError
from anchorflow.runtime.bundles import ort_gpu


def test_two_onnxruntime_wheels_are_refused_with_the_fix() -> None:
    with pytest.raises(BackendError, match="onnxruntime and onnxruntime-gpu are all installed.*pip uninstall -y "
                                           "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"):
        ort_gpu.check_wheels(["onnxruntime", "onnxruntime-gpu"])
    ort_gpu.check_wheels(["onnxruntime-gpu"])
    assert "onnxruntime" in ort_gpu.installed_wheels()  # this machine: the CPU wheel, really installed


def test_tensorrt_library_is_reported_missing_here() -> None:
    """No libnvinfer on this machine (the lean runtime ships libnvinfer_lean only)."""
    ort_gpu.tensorrt_library.cache_clear()
    assert ort_gpu.tensorrt_library() is None
    assert "libnvinfer.so.10" in ort_gpu.missing_tensorrt_message()


def test_preload_cuda_reports_instead_of_raising() -> None:
    calls = []
    ok = SimpleNamespace(preload_dlls=lambda: calls.append(1))
    assert ort_gpu.preload_cuda(ok) is None and calls == [1]
    assert ort_gpu.preload_cuda(ok) is None and calls == [1]  # once per process

    def broken():
        raise OSError("libcudnn.so.9: cannot open shared object file")

    failing, old = SimpleNamespace(preload_dlls=broken), SimpleNamespace()  # kept alive: the cache is per object
    assert "libcudnn.so.9" in ort_gpu.preload_cuda(failing)
    assert "preload_dlls" in ort_gpu.preload_cuda(old)


def test_profile_shapes_from_the_declared_ranges() -> None:
    """B, 2B and 6B rows of one BA solve fall in one declared profile; named axes take their own ranges."""
    inputs = [SimpleNamespace(name="x", shape=("batch", 16, "H", "W")), SimpleNamespace(name="t", shape=("batch",)),
              SimpleNamespace(name="txt", shape=("batch", "L", 32)), SimpleNamespace(name="ids", shape=(7, 3))]
    ranges = {"batch": (1, 8, 48), "H": (32, 64, 128), "W": (32, 64, 128), "L": (1, 77, 256)}
    shapes = ort_gpu.declared_profile(inputs, ranges)
    assert shapes["x"] == ((1, 16, 32, 32), (8, 16, 64, 64), (48, 16, 128, 128))
    assert shapes["ids"] == ((7, 3),) * 3  # an input without a batch axis keeps its static shape
    options = ort_gpu.trt_profile_options(shapes)
    assert options["trt_profile_min_shapes"] == "ids:7x3,t:1,txt:1x1x32,x:1x16x32x32"
    assert options["trt_profile_max_shapes"] == "ids:7x3,t:48,txt:48x256x32,x:48x16x128x128"
    assert ort_gpu.declared_profile(inputs, {"batch": (1, 8, 48)}) == {}  # an undeclared axis: no profile at all
    assert ort_gpu.trt_profile_options({}) == {}


# -- wired into the backends (runtime/bundles/backends.py, runtime/bundles/load.py) ---------------------------------------
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime as onnxruntime-gpu reports itself: every provider listed (this machine has the CPU wheel)."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort_gpu, "installed_wheels", lambda: ["onnxruntime-gpu"])
    return onnxruntime


def test_auto_prefers_cuda_unless_tensorrt_loads(gpu_build, monkeypatch) -> None:
    from anchorflow.runtime.bundles.backends import resolve_backend

    ort_gpu.tensorrt_library.cache_clear()
    assert ort_gpu.tensorrt_library() is None  # no libnvinfer here
    assert resolve_backend("auto") == "ort-cuda"  # was ort-trt whenever the provider was listed
    monkeypatch.setattr(ort_gpu, "tensorrt_library", lambda: "libnvinfer.so.10")
    assert resolve_backend("auto") == "ort-trt"


def test_tensorrt_provider_gets_the_profile_shapes(gpu_build, monkeypatch, tmp_path) -> None:
    from anchorflow.runtime.bundles.backends import _providers

    monkeypatch.setattr(ort_gpu, "tensorrt_library", lambda: "libnvinfer.so.10")
    profile = {"x": ((1, 1, 8, 8), (32, 1, 8, 8), (128, 1, 8, 8)), "t": ((1,), (32,), (128,))}
    name, options = _providers("ort-trt", tmp_path / "cache", profile)[0]
    assert name == TRT and options["trt_engine_cache_enable"] is True
    assert options["trt_profile_min_shapes"] == "t:1,x:1x1x8x8"
    assert options["trt_profile_opt_shapes"] == "t:32,x:32x1x8x8"
    assert options["trt_profile_max_shapes"] == "t:128,x:128x1x8x8"


def test_missing_tensorrt_library_drops_the_provider(gpu_build, tmp_path) -> None:
    from anchorflow.runtime.bundles.backends import _providers

    ort_gpu.tensorrt_library.cache_clear()
    assert _providers("ort-trt", tmp_path / "cache") == [CUDA, CPU]


def test_shadowing_wheels_are_refused_for_gpu_backends(gpu_build, monkeypatch) -> None:
    from anchorflow.modelref import locate
    from anchorflow.runtime.bundles.backends import make_session

    monkeypatch.setattr(ort_gpu, "installed_wheels", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BackendError, match="shadow each other's files"):
        make_session(locate("default").bundle / "backbone.onnx", "ort-cuda")


def test_gpu_backend_error_names_the_wheel() -> None:
    """On this CPU-only install: the message says which wheel to swap, not just 'unavailable'."""
    from anchorflow.modelref import locate
    from anchorflow.runtime.bundles.backends import make_session

    with pytest.raises(BackendError, match=r"not in this onnxruntime build .*pip uninstall -y onnxruntime && "
                                           r"pip install onnxruntime-gpu"):
        make_session(locate("default").bundle / "backbone.onnx", "ort-cuda")


def test_load_bundle_passes_the_declared_rows_as_profile(monkeypatch) -> None:
    import anchorflow.runtime.bundles.backends as backends
    from anchorflow.runtime import load_bundle

    seen = {}
    real = backends.make_session

    def spy(path, *args, **kwargs):
        seen[str(path).rsplit("/", 1)[-1]] = kwargs.get("profile")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(backends, "make_session", spy)
    from anchorflow.modelref import locate

    load_bundle(locate("default").bundle, backend="ort-cpu")
    # the digits bundle declares backbone rows 1..128 and SideNet rows 1..512 (bundle.json: 4 merged-probe offsets x 128)
    assert seen["backbone.onnx"]["x"] == ((1, 1, 8, 8), (128, 1, 8, 8), (128, 1, 8, 8))
    assert seen["sidenet.onnx"]["h"] == ((1,), (512,), (512,))
