"""Device memory, copies and a stream through cuda-python's runtime API (``cudart``), imported lazily.

cuda-python returns ``(error, *results)`` tuples from every call; :func:`_check` turns a
non-success error into a :class:`BackendError` naming the call and the CUDA error, so no
caller deals with raw status codes. Works with the ``cuda.bindings.runtime`` layout of
cuda-python >= 12.6 and the older ``cuda.cudart`` module.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from ..base._deps import require
from ..base.errors import BackendError


@lru_cache(maxsize=1)
def cudart() -> ModuleType:
    """cuda-python's runtime module, or MissingDependencyError naming ``pip install 'anchorflow[trt]'``."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return require("cuda.cudart", extra="trt", purpose="CUDA buffers for TensorRT engines (cuda-python)")


def _check(result: Any, call: str) -> Any:
    """Unpack ``(err, *values)``; raise BackendError when ``err`` is not cudaSuccess."""
    rt = cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendError(f"CUDA call {call} failed with {name}; check the GPU driver and that a GPU is visible (nvidia-smi)")
    return values[0] if len(values) == 1 else (values or None)


def device_info(device: int | None = None) -> tuple[str, tuple[int, int]]:
    """(GPU name, (major, minor) compute capability) of ``device`` (default: the current one)."""
    rt = cudart()
    if device is None:
        device = _check(rt.cudaGetDevice(), "cudaGetDevice")
    props = _check(rt.cudaGetDeviceProperties(int(device)), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip(), (int(props.major), int(props.minor))


class Stream:
    """One CUDA stream; ``handle`` is the integer TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        self._stream = _check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        _check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            _check(cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DeviceBuffer:
    """A device allocation that grows (never shrinks) to the largest size asked for so far."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        """Make room for ``nbytes``; reallocates with 25 % headroom only when too small. Returns the pointer."""
        if nbytes > self.nbytes:
            self.free()
            size = max(int(nbytes * 1.25), 256)
            self.ptr = int(_check(cudart().cudaMalloc(size), "cudaMalloc"))
            self.nbytes = size
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr, self.nbytes = 0, 0

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()


def copy_to_device(buffer: DeviceBuffer, host: np.ndarray, stream: Stream) -> int:
    """Asynchronous host -> device copy of a C-contiguous array into ``buffer`` (grown as needed)."""
    rt = cudart()
    ptr = buffer.ensure(host.nbytes)
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    _check(rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream.raw), "cudaMemcpyAsync(H2D)")
    return ptr


def copy_to_host(host: np.ndarray, buffer: DeviceBuffer, stream: Stream) -> None:
    """Asynchronous device -> host copy into the C-contiguous ``host``; synchronise before reading it."""
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _check(rt.cudaMemcpyAsync(host.ctypes.data, buffer.ptr, host.nbytes, kind, stream.raw), "cudaMemcpyAsync(D2H)")
