"""Does the NVIDIA driver support the CUDA major that the installed TensorRT and cuda-python were built for?

Checked before TensorRT or cuda-python touch CUDA, because the failure they produce otherwise
is bad: with a TensorRT built for CUDA 13 on a CUDA 12 driver (R535-R575), ``trt.Runtime``
logs "CUDA initialization failure with error: 35", still returns an object, and
``deserialize_cuda_engine`` then segfaults; cuda-python 13 fails every call with
``cudaErrorInsufficientDriver``.

* The driver's CUDA version comes from ``cuDriverGetVersion`` in ``libcuda.so.1`` (``nvcuda.dll``)
  through ctypes: no cuda-python, no CUDA context, safe on a machine without a GPU.
* The CUDA major a pip-installed TensorRT was built for is in its distribution name
  (``tensorrt-cu12``, ``tensorrt_lean_cu13_bindings``...); cuda-python's is its own major version.
  A TensorRT without pip metadata (JetPack's system package on Jetson) is not checked here; the
  logger check of :func:`anchorflow.engines.compat.create_runtime` still catches it.
"""

from __future__ import annotations

import ctypes
import re
import sys
from functools import lru_cache
from importlib import metadata
from typing import Optional

from ..base.errors import BackendError

_FLAVOUR = re.compile(r"_cu(\d+)(?:_|$)")


def driver_cuda_version(library: Optional[str] = None) -> Optional[tuple[int, int]]:
    """(major, minor) CUDA version the installed NVIDIA driver supports; None when no driver library loads."""
    name = library or ("nvcuda.dll" if sys.platform.startswith("win") else "libcuda.so.1")
    try:
        lib = ctypes.CDLL(name)
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return value.value // 1000, (value.value % 1000) // 10


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=None)
def _providers() -> dict[str, tuple[str, ...]]:
    """import name -> distributions providing it (importlib.metadata, read once)."""
    return {k: tuple(_normalise(d) for d in v) for k, v in metadata.packages_distributions().items()}


def flavours(module: str) -> set[int]:
    """CUDA majors of the pip distributions that provide ``module`` (and its ``_libs``/``_bindings`` parts).

    ``{12}`` for tensorrt-cu12, ``{12, 13}`` when both flavours are installed over each other,
    empty when no pip distribution names one (a system TensorRT).
    """
    top = module.split(".")[0]
    found = set()
    for name in (top, f"{top}_libs", f"{top}_bindings"):
        for dist in _providers().get(name, ()):
            match = _FLAVOUR.search(dist)
            if match:
                found.add(int(match.group(1)))
    return found


def cuda_python_major() -> Optional[int]:
    """Major version of the installed cuda-python bindings (cuda-bindings or cuda-python), None if absent."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return int(metadata.version(dist).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _extra_for(driver_major: int) -> str:
    if driver_major >= 13:
        return "pip install 'anchorflow[trt-cu13]'"
    return "pip install 'anchorflow[trt-cu12]'"


def check(module: str = "tensorrt", version: str = "", *, driver: Optional[tuple[int, int]] = None,
          trt_flavours: Optional[set[int]] = None, cuda_python: Optional[int] = -1) -> tuple[int, int]:
    """Raise BackendError when the driver cannot run the installed TensorRT or cuda-python; else return its CUDA version.

    Arguments default to what is installed here (``driver``: :func:`driver_cuda_version`,
    ``trt_flavours``: :func:`flavours` of ``module``, ``cuda_python``: :func:`cuda_python_major`);
    tests pass them explicitly.
    """
    driver = driver_cuda_version() if driver is None else driver
    if driver is None:
        raise BackendError("no NVIDIA driver found (libcuda.so.1 does not load): TensorRT needs an NVIDIA GPU and its "
                           "driver; check nvidia-smi, or run on onnxruntime with --backend ort-cpu")
    have = f"{driver[0]}.{driver[1]}"
    trt_flavours = flavours(module) if trt_flavours is None else trt_flavours
    label = f"TensorRT {version}".strip()
    if len(trt_flavours) > 1:
        dists = " and ".join(f"tensorrt-cu{f}" for f in sorted(trt_flavours))
        raise BackendError(f"{dists} are both installed and shadow each other; keep one: pip uninstall -y "
                           f"{dists.replace(' and ', ' ')} && {_extra_for(driver[0])}")
    if trt_flavours and max(trt_flavours) > driver[0]:
        need = max(trt_flavours)
        if driver[0] < 12:
            raise BackendError(f"{label} needs a CUDA {need} driver but this one supports CUDA {have}; upgrade the "
                               "NVIDIA driver (R525 or newer for CUDA 12, R580 or newer for CUDA 13)")
        raise BackendError(f"{label} is the CUDA {need} build but the NVIDIA driver supports CUDA {have}: "
                           f"install the CUDA {driver[0]} build (pip uninstall -y tensorrt-cu{need}; "
                           f"{_extra_for(driver[0])}) or upgrade the driver")
    cuda_python = cuda_python_major() if cuda_python == -1 else cuda_python
    if cuda_python is not None and cuda_python > driver[0]:
        raise BackendError(f"cuda-python {cuda_python}.x needs a CUDA {cuda_python} driver, this one supports CUDA {have}: "
                           f"pip install 'cuda-python>={driver[0]},<{driver[0] + 1}' ({_extra_for(driver[0])} pins it)")
    return driver
