"""The TensorRT compat layer against the real TensorRT lean runtime bindings (no GPU needed).

tensorrt-lean-cu12 (``pip install -e '.[dev]'`` installs it) imports as ``tensorrt_lean`` and has
the real Runtime, Logger, IProgressMonitor, DataType and BuilderFlag of its TensorRT version, but
no Builder or OnnxParser. On a machine without an NVIDIA driver its ``Runtime(logger)`` logs
"CUDA initialization failure with error: 35" and returns an object that segfaults when used or
freed: those checks run in a subprocess. Expected values come from the
bindings themselves (``trt.nptype``, the distribution's name), not from constants written here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

lean = pytest.importorskip("tensorrt_lean", reason="the TensorRT lean runtime is not installed (pip install -e '.[dev]')")

from anchorflow.engines import cache, compat, driver  # noqa: E402
from anchorflow.engines.progress import ProgressDisplay  # noqa: E402
from anchorflow.base.errors import BackendError  # noqa: E402

NO_DRIVER = driver.driver_cuda_version() is None
needs_no_driver = pytest.mark.skipif(not NO_DRIVER, reason="an NVIDIA driver is present; this checks the path without one")


def test_version_detection_on_the_real_bindings() -> None:
    major = int(lean.__version__.split(".")[0])
    assert compat.major(lean) == major >= 10
    assert compat.version_tuple(lean.__version__)[:2] == tuple(int(p) for p in lean.__version__.split(".")[:2])
    if major >= 11:
        assert compat.network_flags(lean) == 0  # strong typing is the default; lean has no creation flags at all


def test_dtype_mapping_matches_the_bindings() -> None:
    """Every DataType numpy can hold maps to what TensorRT's own ``nptype`` says; the rest are refused by name."""
    mapped = 0
    for name, dtype in lean.DataType.__members__.items():
        try:
            want = np.dtype(lean.nptype(dtype))
        except TypeError:  # TensorRT has no numpy type for it (BF16, FP8, INT4, FP4, E8M0)
            with pytest.raises(BackendError, match=f"engine I/O type {name} has no numpy equivalent"):
                compat.numpy_dtype(dtype)
            continue
        assert compat.numpy_dtype(dtype) == want, name
        mapped += 1
    assert mapped >= 6  # FLOAT, HALF, INT8, INT32, INT64, BOOL, UINT8
    with pytest.raises(BackendError, match="BF16"):
        compat.numpy_dtype(lean.DataType.BF16)


def test_logger_is_a_real_ilogger_keeping_errors(capsys) -> None:
    logger = compat.make_logger(lean)
    assert isinstance(logger, lean.ILogger)
    logger.log(lean.ILogger.Severity.ERROR, "an error")
    logger.log(lean.ILogger.Severity.WARNING, "a warning")
    logger.log(lean.ILogger.Severity.INFO, "some info")
    assert logger.errors == ["an error"]
    err = capsys.readouterr().err
    assert "a warning" in err and "an error" not in err and "some info" not in err  # errors go into the exception text


def test_progress_monitor_is_a_real_iprogressmonitor() -> None:
    display = ProgressDisplay(stream=io.StringIO(), use_tqdm=False)
    monitor = compat.progress_monitor(lean, display)
    assert isinstance(monitor, lean.IProgressMonitor)
    monitor.phase_start("Building engine", None, 3)
    assert monitor.step_complete("Building engine", 0) is True
    display.cancel()
    assert monitor.step_complete("Building engine", 1) is False
    monitor.phase_finish("Building engine")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


@needs_no_driver
def test_cuda_init_failure_is_one_line_error_not_a_segfault() -> None:
    """Item 2: loading an engine on a Runtime whose CUDA init failed used to segfault (rc -11)."""
    proc = _python("""
        import sys, tensorrt_lean as trt
        from anchorflow.engines.runner import TrtEngine
        from anchorflow.base.errors import AnchorflowError
        try:
            TrtEngine(trt, b"not an engine" * 8, None, "backbone fp32")
        except AnchorflowError as exc:
            print(f"error: {exc}")
            sys.exit(3)
    """)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "could not initialise CUDA" in lines[0] and "cudaError 35" in lines[0]
    assert "anchorflow[trt-cu12]" in lines[0] and "[TensorRT]" not in proc.stderr  # TensorRT's errors are not printed


@needs_no_driver
def test_runtime_creation_failure_on_real_bindings_exits_cleanly() -> None:
    proc = _python("""
        import gc, tensorrt_lean as trt
        from anchorflow.engines import compat
        logger = compat.make_logger(trt)
        try:
            compat.create_runtime(trt, logger)
        except Exception as exc:
            print(type(exc).__name__)
        gc.collect()
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "BackendError", (proc.returncode, proc.stderr[-2000:])


def test_flavour_of_the_installed_lean_runtime() -> None:
    dist = metadata.packages_distributions()["tensorrt_lean"][0]  # e.g. tensorrt_lean_cu12
    assert driver.flavours("tensorrt_lean") == {int(dist.rsplit("cu", 1)[1])}
    assert driver.flavours("surely_not_a_module") == set()


@needs_no_driver
def test_driver_check_without_a_driver() -> None:
    with pytest.raises(BackendError, match="no NVIDIA driver found"):
        driver.check("tensorrt_lean", lean.__version__)


@pytest.mark.parametrize("driver_version, flavours, cuda_python, match", [
    ((12, 8), {13}, 12, r"CUDA 13 build but the NVIDIA driver supports CUDA 12.8.*anchorflow\[trt-cu12\]"),
    ((12, 4), {12}, 13, r"cuda-python 13.x needs a CUDA 13 driver.*cuda-python>=12,<13"),
    ((13, 0), {12, 13}, 13, "both installed and shadow each other"),
    ((11, 8), {12}, None, "upgrade the NVIDIA driver"),
])
def test_driver_check_refuses_mixed_cuda_majors(driver_version, flavours, cuda_python, match) -> None:
    with pytest.raises(BackendError, match=match):
        driver.check("tensorrt", "11.4.0", driver=driver_version, trt_flavours=flavours, cuda_python=cuda_python)


@pytest.mark.parametrize("driver_version, flavours, cuda_python", [((12, 8), {12}, 12), ((13, 0), {12}, 12),
                                                                   ((13, 1), {13}, 13), ((12, 2), set(), None)])
def test_driver_check_accepts_compatible_installs(driver_version, flavours, cuda_python) -> None:
    assert driver.check("tensorrt", "11.4.0", driver=driver_version, trt_flavours=flavours,
                        cuda_python=cuda_python) == driver_version


def test_engine_from_another_tensorrt_is_refused_before_deserializing(tmp_path: Path) -> None:
    """The manifest check uses the running bindings' version; the engine bytes never reach TensorRT."""
    from test_engines import write_bundle

    from anchorflow.engines.build import BuildOptions
    from anchorflow.engines.profiles import derive_profiles, network_specs, read_bundle

    bundle = write_bundle(tmp_path / "b")
    _, meta = read_bundle(bundle)
    spec = network_specs(meta)["backbone"]
    old = cache.EngineEnv("10.3.0", "NVIDIA H200", (9, 0))
    key = cache.EngineKey("backbone", "fp32", spec.sha256, derive_profiles(meta)["backbone"].to_json(), old,
                          BuildOptions().builder_fields())
    cache.record_engine(bundle, key, b"an engine from TensorRT 10.3", 1.0)
    here = cache.EngineEnv(str(lean.__version__), "NVIDIA H200", (9, 0))
    with pytest.raises(BackendError, match=f"built with TensorRT 10.3.0, this is TensorRT {lean.__version__}.*--force"):
        cache.select_engine(bundle, "backbone", "fp32", spec.sha256, here)
    assert json.loads((cache.engine_dir(bundle) / cache.MANIFEST).read_text())["engines"][key.name]["key_version"] == 2
