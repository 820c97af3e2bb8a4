"""Run cached TensorRT engines from numpy, without torch: ``TrtVelocity`` and ``TrtSideNet``.

They are the same callables as the onnxruntime backends, so every solver of
:mod:`anchorflow.runtime` runs on them unchanged:

* ``velocity(x, t, y) -> v``: x (B, C, H, W) float32, t (B,) float32, y (B,) int64 or None;
* ``sidenet(x, v, t, h, y) -> delta``: per-sample t and h (B,), ``v_hat(t - h) = v + delta``.

Time convention: t = 1 noise, t = 0 data. Each call sets the explicit input shapes
(``set_input_shape``), copies the inputs into device buffers that are allocated once and grown
when a larger batch arrives, runs ``execute_async_v3`` on one CUDA stream shared by both
engines, and copies the output back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._deps import require
from ..errors import BackendError, ConfigError
from . import cache, compat
from .cuda import DeviceBuffer, Stream, copy_to_device, copy_to_host
from .profiles import network_specs, read_bundle


class TrtEngine:
    """One deserialized engine with its execution context and device buffers.

    Args:
        trt: the imported tensorrt module.
        data: the serialized engine.
        stream: the CUDA stream to run on (shared between engines).
        label: a name for error messages (e.g. ``"backbone fp16"``).
    """

    def __init__(self, trt: Any, data: bytes, stream: Stream, label: str) -> None:
        self.label = label
        self.stream = stream
        self._logger = compat.make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT could not load the {label} engine ({'; '.join(self._logger.errors[-2:])}); "
                               "rebuild it with `anchorflow build BUNDLE --force`")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = compat.io_tensors(trt, self.engine)
        self.max_rows = {name: int(self.engine.get_tensor_profile_shape(name, 0)[2][0]) for name, _ in self.inputs}
        self._buffers = {name: DeviceBuffer() for name, _ in self.inputs + self.outputs}
        self._keep: list[np.ndarray] = []  # host inputs of the call in flight

    def _set_input(self, name: str, dtype: np.dtype, value: np.ndarray) -> None:
        host = np.ascontiguousarray(value, dtype=dtype)
        if host.shape[0] > self.max_rows[name]:
            raise BackendError(
                f"the {self.label} engine takes at most {self.max_rows[name]} rows, got {host.shape[0]}; "
                "rebuild with a larger range: `anchorflow build BUNDLE --max-batch N --force`"
            )
        if not self.context.set_input_shape(name, tuple(host.shape)):
            raise BackendError(f"the {self.label} engine rejected input {name!r} of shape {host.shape}")
        self.context.set_tensor_address(name, copy_to_device(self._buffers[name], host, self.stream))
        self._keep.append(host)  # the async copy reads it until the stream is synchronised

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every engine input name to an array. Returns every output."""
        missing = [name for name, _ in self.inputs if name not in feeds]
        if missing:
            raise ConfigError(f"the {self.label} engine needs inputs {missing}")
        self._keep = []
        for name, dtype in self.inputs:
            self._set_input(name, dtype, feeds[name])
        results = {}
        for name, dtype in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=dtype)
            self.context.set_tensor_address(name, self._buffers[name].ensure(results[name].nbytes))
        if not self.context.execute_async_v3(self.stream.handle):
            raise BackendError(f"TensorRT failed to run the {self.label} engine ({'; '.join(self._logger.errors[-2:])})")
        for name, host in results.items():
            copy_to_host(host, self._buffers[name], self.stream)
        self.stream.synchronize()
        self._keep = []
        return results

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()


class _TrtNetwork:
    """Shared by the two callables: named feeds in, the single output out (float32)."""

    def __init__(self, engine: TrtEngine) -> None:
        self.engine = engine
        if len(engine.outputs) != 1:
            raise BackendError(f"the {engine.label} engine has {len(engine.outputs)} outputs, expected 1; re-export the bundle")
        self._output = engine.outputs[0][0]

    def _run(self, **feeds: np.ndarray) -> np.ndarray:
        wanted = {name: feeds[name] for name, _ in self.engine.inputs if name in feeds}
        return self.engine.run(wanted)[self._output].astype(np.float32, copy=False)


class TrtVelocity(_TrtNetwork):
    """``velocity(x, t, y) -> v`` on a TensorRT backbone engine; y None uses the null label (or 0)."""

    def __init__(self, engine: TrtEngine, null_label: Optional[int] = None) -> None:
        super().__init__(engine)
        self.null_label = 0 if null_label is None else int(null_label)

    def __call__(self, x: np.ndarray, t: np.ndarray, y: Optional[np.ndarray]) -> np.ndarray:
        if y is None:
            y = np.full(x.shape[0], self.null_label, np.int64)
        return self._run(x=x, t=t, y=y)


class TrtSideNet(_TrtNetwork):
    """``sidenet(x, v, t, h, y) -> delta`` on a TensorRT SideNet engine (per-sample t and h)."""

    def __init__(self, engine: TrtEngine, null_label: Optional[int] = None) -> None:
        super().__init__(engine)
        self.null_label = 0 if null_label is None else int(null_label)

    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray, y: Optional[np.ndarray]) -> np.ndarray:
        if y is None:
            y = np.full(x.shape[0], self.null_label, np.int64)
        return self._run(x=x, v=v, t=t, h=h, y=y)


def load_trt_bundle(path: str | Path, meta: Optional[dict] = None, precision: str = "fp32") -> tuple[Any, Any, str]:
    """(velocity, sidenet or None, description) from the engines cached in a bundle.

    Refuses (BackendError, with the rebuild command) engines built for another TensorRT version,
    another GPU or another ONNX file, and says how to build missing ones. Needs tensorrt and
    cuda-python (``pip install 'anchorflow[trt]'``) and a GPU.
    """
    trt = require("tensorrt", extra="trt", purpose="running TensorRT engines")
    compat.major(trt)
    folder, read_meta = read_bundle(path)
    meta = meta or read_meta
    env = cache.current_env(trt)
    stream = Stream()
    null_label = (meta.get("model") or {}).get("null_label")
    nets, files = {}, []
    for name, spec in network_specs(meta).items():
        _, sha = spec.onnx_for(precision)
        engine_path, entry = cache.select_engine(folder, name, precision, sha, env)
        nets[name] = TrtEngine(trt, cache.read_engine(folder, entry), stream, f"{name} {precision}")
        files.append(engine_path.name)
    velocity = TrtVelocity(nets["backbone"], null_label)
    sidenet = TrtSideNet(nets["sidenet"], null_label) if "sidenet" in nets else None
    return velocity, sidenet, f"{env.describe()}, {precision} engines: {', '.join(files)}"
