"""onnxruntime's GPU providers: the wheel, the libraries they load, and the TensorRT provider's profile shapes.

What goes wrong on a user's GPU machine without these checks:

* ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same ``onnxruntime`` package; with
  both installed, whichever came last wins file by file, and the GPU providers vanish or fail
  to load. :func:`check_wheels` refuses the combination with the command that fixes it.
* The CUDA provider needs the CUDA runtime and cuDNN on the loader path; pip's nvidia-* wheels
  do not put them there. onnxruntime >= 1.21 has ``onnxruntime.preload_dlls()``, which loads them
  from those wheels: :func:`preload_cuda` calls it once before the first GPU session.
* The TensorRT provider dlopens ``libnvinfer.so.<major>``. The tensorrt-cuXX wheels keep it in
  the ``tensorrt_libs`` package, off the loader path: :func:`tensorrt_library` preloads it from
  there (``RTLD_GLOBAL``, so the provider's dlopen by soname finds it), or reports it missing.
* Without explicit profile shapes the TensorRT provider builds an engine for each new input
  shape it sees: B, 2B and 6B rows inside one BA solve are three engine builds, each of
  seconds to minutes. :func:`trt_profile_options` turns the bundle's declared row and axis
  ranges into ``trt_profile_min_shapes`` / ``opt`` / ``max`` so one engine serves them all.

numpy + onnxruntime (+ ctypes, importlib.metadata) only.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

from ...base.errors import BackendError

WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")
NVINFER_MAJORS = (10, 11)  # libnvinfer sonames the TensorRT provider of current onnxruntime builds may load


def installed_wheels() -> list[str]:
    """The onnxruntime distributions installed in this environment (each provides the ``onnxruntime`` module)."""
    from importlib import metadata  # here: importing it costs the CPU path ~20 ms (email, zipfile...)

    found = []
    for name in WHEELS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_wheels(wheels: Optional[Iterable[str]] = None) -> None:
    """BackendError when more than one onnxruntime wheel is installed (they overwrite each other's files)."""
    wheels = list(installed_wheels() if wheels is None else wheels)
    if len(wheels) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in wheels else wheels[-1]
        raise BackendError(f"{' and '.join(wheels)} are all installed and shadow each other's files, so the GPU "
                           f"providers may be missing or broken; keep one: pip uninstall -y {' '.join(wheels)} && "
                           f"pip install {keep}")


_PRELOADED: dict[int, Optional[str]] = {}


def preload_cuda(ort: Any) -> Optional[str]:
    """Load CUDA and cuDNN from pip's nvidia-* wheels (``onnxruntime.preload_dlls``, once); the error text, or None."""
    if id(ort) in _PRELOADED:
        return _PRELOADED[id(ort)]
    preload = getattr(ort, "preload_dlls", None)
    result = None
    if preload is None:
        result = "this onnxruntime has no preload_dlls (< 1.21): CUDA and cuDNN must be on the loader path"
    else:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - reported with the backend's error, not raised here
            result = " ".join(str(exc).split())
    _PRELOADED[id(ort)] = result
    return result


def _tensorrt_libs_dir() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


@lru_cache(maxsize=1)
def tensorrt_library(majors: tuple[int, ...] = NVINFER_MAJORS) -> Optional[str]:
    """The path or soname of a libnvinfer that loads (preloaded globally for the provider), None when none does."""
    folder = _tensorrt_libs_dir()
    pattern = "nvinfer_{}.dll" if os.name == "nt" else "libnvinfer.so.{}"
    candidates: list[str] = []
    for major in majors:
        if folder is not None:
            candidates.append(str(folder / pattern.format(major)))
        candidates.append(pattern.format(major))
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError:
            continue
        return name
    return None


def missing_tensorrt_message() -> str:
    """What to install when the TensorRT provider's library does not load."""
    sonames = " / ".join(f"libnvinfer.so.{m}" for m in NVINFER_MAJORS)
    return (f"the TensorRT provider needs {sonames}, which does not load: pip install 'anchorflow[trt-cu12]' "
            "(the tensorrt-cu12 wheel matching your onnxruntime-gpu build) or put TensorRT's lib folder on "
            "LD_LIBRARY_PATH; or use --backend ort-cuda")


def trt_profile_options(shapes: dict[str, tuple]) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` provider options from ``{input: (min_shape, opt_shape, max_shape)}``.

    Format ``"x:1x1x8x8,t:1,y:1"`` (onnxruntime's TensorRT provider). Empty when ``shapes`` is.
    """
    if not shapes:
        return {}
    out = {}
    for i, kind in enumerate(("min", "opt", "max")):
        out[f"trt_profile_{kind}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(int(d)) for d in triple[i])}" for name, triple in sorted(shapes.items()))
    return out


def declared_profile(inputs: Iterable[Any], ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple]:
    """(min, opt, max) shapes of every input from its declared shape: ints stay, named axes take ``ranges``.

    ``inputs``: objects with ``name`` and ``shape`` (ints and axis names, e.g. ``("batch", 1, 8, 8)``);
    ``ranges``: axis name -> (min, opt, max), ``"batch"`` being the network's rows per call.
    Empty when some axis has no declared range (the provider then profiles by itself).
    """
    shapes = {}
    for tensor in inputs:
        triple: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if isinstance(dim, int):
                for part in triple:
                    part.append(dim)
            elif dim in ranges and ranges[dim] is not None:
                for part, value in zip(triple, ranges[dim]):
                    part.append(int(value))
            else:
                return {}
        shapes[tensor.name] = tuple(tuple(part) for part in triple)
    return shapes
