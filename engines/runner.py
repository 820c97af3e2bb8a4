"""Run cached TensorRT engines from numpy, without torch: the runtime's ``trt`` backend.

:func:`bundle_runs` gives ``load_bundle(..., backend="trt")`` one ``run(feeds)`` per network
(:class:`TrtNetwork`); the runtime wraps them into the same ``velocity(x, t, cond)`` and
``sidenet(x, v, t, h, cond)`` callables as the onnxruntime backends (one condition rule, null
values from bundle.json), so every solver runs on them unchanged. There is no second API.

Time convention: t = 1 noise, t = 0 data. Each call sets the explicit input shapes
(``set_input_shape``), copies the inputs into device buffers that are allocated once and grown
when a larger batch arrives, runs ``execute_async_v3`` on one CUDA stream shared by both
engines, and copies the output back. Labels are range-checked before they reach the engine
(an out-of-range index in a GPU Gather reads foreign memory).

Lifetime: :class:`TrtEngines` owns the stream, the engines and their device buffers; it is a
context manager (``with TrtEngines.load(path) as e: ...``) and ``close()`` frees everything, as
Polygraphy's runners do. The runs :func:`bundle_runs` returns keep it alive.

Runner choice: ours, not Polygraphy's ``TrtRunner``. Polygraphy's CUDA wrapper loads
``libcudart.so`` through ctypes from LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib, /lib or an
``nvidia-cuda-runtime-cuXX`` wheel; neither the tensorrt-cuXX wheels nor cuda-python install
that library (both link the CUDA runtime statically), so with ``anchorflow[trt-cu12]`` alone it
would not start. cuda-python, which the extras already install, needs nothing on the loader
path. Polygraphy's ``TrtRunner`` stays the independent check in ``tests/test_engines_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base._deps import require
from ..base.errors import BackendError, ConfigError
from . import cache, compat, driver
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

    def __init__(self, trt: Any, data: bytes, stream: Optional[Stream], label: str,
                 weights_from: Optional[Path] = None) -> None:
        self.label = label
        self.stream = stream
        self._buffers: dict[str, DeviceBuffer] = {}
        self._logger = compat.make_logger(trt)
        self._runtime = compat.create_runtime(trt, self._logger)  # refuses a failed CUDA init (would segfault below)
        compat.init_plugins(trt, self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT could not load the {label} engine ({'; '.join(self._logger.errors[-2:])}); "
                               "rebuild it with `anchorflow build BUNDLE --force`")
        if weights_from is not None:  # a weight-stripped plan: its weights come from the ONNX graph (engines/refit.py)
            from .refit import fill_weights, onnx_weights

            fill_weights(trt, trt.Refitter(self.engine, self._logger), onnx_weights(weights_from), label)
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = compat.io_tensors(trt, self.engine)
        # input name -> (min shape, max shape) of profile 0
        self.limits = {name: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0)[::2])
                       for name, _ in self.inputs}
        self._buffers = {name: DeviceBuffer() for name, _ in self.inputs + self.outputs}
        self._keep: list[np.ndarray] = []  # host inputs of the call in flight

    def _set_input(self, name: str, dtype: np.dtype, value: np.ndarray) -> None:
        host = np.ascontiguousarray(value, dtype=dtype)
        check_shape(self.label, name, host.shape, *self.limits[name])
        if not self.context.set_input_shape(name, tuple(host.shape)):
            raise BackendError(f"the {self.label} engine rejected input {name!r} of shape {host.shape}")
        self.context.set_tensor_address(name, copy_to_device(self._buffers[name], host, self.stream))
        self._keep.append(host)  # the async copy reads it until the stream is synchronised

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every engine input name to an array. Returns every output."""
        if self.context is None:
            raise BackendError(f"the {self.label} engine was closed; load the bundle again")
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
        """Free the device buffers, then the context and the engine (in that order; idempotent)."""
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers = {}
        self.context = None
        self.engine = None

    def __enter__(self) -> "TrtEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_shape(label: str, name: str, shape: tuple, lo: tuple, hi: tuple) -> None:
    """Refuse an input shape outside the engine's profile, naming the dimension and the range.

    Dimension 0 of a per-row input is the row count (``--max-batch``); other dimensions are the
    bundle's named axes (resolution, text length), whose ranges come from bundle.json.
    """
    if len(shape) != len(lo):
        raise BackendError(f"the {label} engine takes {name!r} with {len(lo)} dimensions, got shape {tuple(shape)}")
    for axis, (d, a, b) in enumerate(zip(shape, lo, hi)):
        if not a <= d <= b:
            what = "rows" if axis == 0 else f"dimension {axis}"
            hint = ("rebuild with a larger range: `anchorflow build BUNDLE --max-batch N --force`" if axis == 0 else
                    "this size lies outside the range bundle.json declares for that axis: re-export with a wider one")
            raise BackendError(f"the {label} engine takes {a}..{b} {what} of {name!r}, got {d} (shape {tuple(shape)}); "
                               + hint)


def check_labels(y: np.ndarray, num_labels: Optional[int]) -> np.ndarray:
    """int64 labels, refused outside ``0..num_labels - 1`` (``num_labels`` counts every label the
    embedding table holds: classes plus the null label; None skips the check: a bundle that
    records no class count)."""
    y = np.ascontiguousarray(y, np.int64)
    if num_labels is not None and y.size and (int(y.min()) < 0 or int(y.max()) >= num_labels):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ConfigError(f"label {bad} is outside this model's labels 0..{num_labels - 1}; pass labels in that range")
    return y


class TrtNetwork:
    """``run(feeds) -> output`` on one engine: named feeds in (labels ``y`` range-checked), the
    single output out (float32). The runtime wraps it with the condition rule every backend shares."""

    def __init__(self, engine: TrtEngine, num_labels: Optional[int] = None) -> None:
        self.engine, self.num_labels = engine, num_labels
        if len(engine.outputs) != 1:
            raise BackendError(f"the {engine.label} engine has {len(engine.outputs)} outputs, expected 1; re-export the bundle")
        self._output = engine.outputs[0][0]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if "y" in feeds:  # an out-of-range index in a GPU Gather reads foreign memory
            feeds = {**feeds, "y": check_labels(feeds["y"], self.num_labels)}
        wanted = {name: feeds[name] for name, _ in self.engine.inputs if name in feeds}
        return self.engine.run(wanted)[self._output].astype(np.float32, copy=False)


class TrtEngines:
    """The engines of one bundle and precision, with their stream: a context manager that frees them all.

    ``runs`` maps each network name to its :class:`TrtNetwork` (``run(feeds)``); ``description``
    names the TensorRT, GPU and engine files. Callables ``velocity(x, t, cond)`` / ``sidenet(...)``
    come from ``anchorflow.runtime.load_bundle(path, backend="trt")``, which uses :func:`bundle_runs`.
    """

    def __init__(self, runs: dict[str, TrtNetwork], stream: Stream, description: str) -> None:
        self.runs, self.stream, self.description = runs, stream, description

    @classmethod
    def load(cls, path: str | Path, meta: Optional[dict] = None, precision: str = "fp32") -> "TrtEngines":
        """Select, check and deserialize the cached engines of ``path``.

        Refuses (BackendError, with the rebuild command) engines built for another TensorRT version,
        another GPU or another ONNX file, and says how to build missing ones; a driver too old for
        the installed TensorRT/cuda-python is a one-line error before CUDA is touched. Needs tensorrt
        and cuda-python (``pip install 'anchorflow[trt-cu12]'`` or ``[trt-cu13]``) and a GPU."""
        trt = require("tensorrt", extra="trt", purpose="running TensorRT engines")
        compat.major(trt)
        driver.check(trt.__name__, trt.__version__)  # before TensorRT or cuda-python touch CUDA
        folder, read_meta = read_bundle(path)
        meta = meta or read_meta
        env = cache.current_env(trt)
        chosen = {name: cache.select_engine(folder, name, precision, cache.onnx_identity(spec, precision), env)
                  for name, spec in network_specs(meta).items()}
        model = meta.get("model") or {}
        classes = model.get("num_classes")
        num_labels = None if classes is None else int(classes) + (model.get("null_label") is not None)
        stream = Stream()
        nets: dict[str, TrtEngine] = {}
        try:
            for name, (_, entry) in chosen.items():
                stripped = (entry.get("builder") or {}).get("strip_weights")
                source = cache.onnx_file(folder, network_specs(meta)[name], precision)[0] if stripped else None
                nets[name] = TrtEngine(trt, cache.read_engine(folder, entry), stream, f"{name} {precision}", source)
        except BaseException:
            for engine in nets.values():
                engine.close()
            stream.close()
            raise
        files = ", ".join(p.name for p, _ in chosen.values())
        runs = {name: TrtNetwork(engine, num_labels) for name, engine in nets.items()}
        return cls(runs, stream, f"{env.describe()}, {precision} engines: {files}")

    def close(self) -> None:
        """Free every engine's buffers, then the stream (idempotent)."""
        for net in self.runs.values():
            net.engine.close()
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def __enter__(self) -> "TrtEngines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bundle_runs(bundle: Any, precision: str = "fp32") -> tuple[dict, list[str]]:
    """The runtime's ``trt`` backend (``load_bundle(..., backend="trt")``): per network ``run(feeds)``
    on its cached engine (the engines live as long as these callables) and the description as the
    provider list; the runtime wraps them with the condition rule every backend shares
    (:mod:`anchorflow.runtime.bundles.networks`)."""
    engines = TrtEngines.load(bundle.folder, bundle.meta, precision)
    return dict(engines.runs), [f"TensorRT ({engines.description})"]
