"""onnxruntime sessions for a bundle's networks, wrapped as the runtime's callables.

``OrtVelocity(session)(x, t, y) -> v`` and ``OrtSideNet(session)(x, v, t, h, y) -> delta`` match
:class:`anchorflow.runtime.field.Velocity` / ``SideNet``: x, v (B, *state) float32, t, h (B,)
float32 (t = 1 noise, t = 0 data; ``v_hat(t - h) = v + delta``, BA-solver arXiv 2601.21542),
y (B,) int64 or None (None: every row gets the null label). numpy + onnxruntime only.

Backends: ``ort-cpu``, ``ort-cuda``, ``ort-trt`` (TensorRT execution provider, engine and timing
caches under ``<bundle>/engines/ort-trt/``) and ``auto`` (the best provider this onnxruntime
build lists). What a session really got is ``session.get_providers()``: onnxruntime silently
drops a GPU provider that fails to load, so an explicit GPU backend that did not load is a
BackendError unless ``allow_fallback=True`` (then a :class:`BackendFallbackWarning` names it).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._deps import require
from ..errors import BackendError, ConfigError

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# backend name -> the provider it is about (first) and what it asks onnxruntime for, in order
BACKENDS: dict[str, tuple[str, ...]] = {
    "ort-cpu": (CPU,),
    "ort-cuda": (CUDA, CPU),
    "ort-trt": (TRT, CUDA, CPU),
}
ORT_TRT_CACHE = Path("engines") / "ort-trt"


class BackendFallbackWarning(UserWarning):
    """A GPU provider could not be used and the session runs on a fallback (allow_fallback=True)."""


OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


def session_options(threads: Optional[int] = None, optimization: str = "all") -> Any:
    """``threads`` intra-op threads (None: onnxruntime's default, one per physical core) and the
    graph optimisation level (``all``: constant folding, fusions, layout transforms)."""
    ort = require("onnxruntime", extra=None, purpose="running ONNX bundles")
    if optimization not in OPTIMIZATION:
        raise ConfigError(f"unknown graph optimisation {optimization!r}; choose from {', '.join(OPTIMIZATION)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def resolve_backend(backend: str) -> str:
    """'auto' -> the best backend this onnxruntime build lists; other names are checked."""
    if backend == "auto":
        ort = require("onnxruntime")
        available = ort.get_available_providers()
        return next((name for name in ("ort-trt", "ort-cuda") if BACKENDS[name][0] in available), "ort-cpu")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown onnxruntime backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    return backend


def _providers(backend: str, cache_dir: Optional[Path]) -> list[Any]:
    ort = require("onnxruntime")
    available = set(ort.get_available_providers())
    out: list[Any] = []
    for name in BACKENDS[backend]:
        if name not in available:
            continue
        if name == TRT and cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendError(f"cannot create the TensorRT engine cache {cache_dir} ({exc}); "
                                   "copy the bundle to a writable folder") from None
            out.append((TRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                              "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}))
        else:
            out.append(name)
    return out or [CPU]


def make_session(path: str | os.PathLike, backend: str = "auto", allow_fallback: bool = False, *,
                 cache_dir: Optional[str | os.PathLike] = None, threads: Optional[int] = None,
                 optimization: str = "all") -> Any:
    """An ``onnxruntime.InferenceSession`` for the ONNX file ``path`` on ``backend``.

    ``cache_dir``: the TensorRT provider's engine cache (default ``<folder of path>/engines/ort-trt``).
    Raises BackendError when an explicitly asked GPU provider is not what the session got (unless
    ``allow_fallback``), or when onnxruntime cannot run the graph (e.g. bf16 ops on the CPU).
    """
    ort = require("onnxruntime")
    explicit = backend != "auto"
    backend = resolve_backend(backend)
    path = Path(path)
    cache = Path(cache_dir) if cache_dir is not None else path.parent / ORT_TRT_CACHE
    opts, providers = session_options(threads, optimization), _providers(backend, cache)
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / NotImplemented / InvalidGraph types
        msg = _short(str(exc))
        raise BackendError(f"onnxruntime cannot run {path.name} on {backend}: {msg}; try another --precision "
                           "or backend (bf16 graphs need a GPU backend)") from None
    wanted, got = BACKENDS[backend][0], session.get_providers()
    if explicit and got[0] != wanted:
        why = (f"{wanted} is not in this onnxruntime build (has: {', '.join(ort.get_available_providers())})"
               if wanted not in ort.get_available_providers() else f"{wanted} failed to load")
        if not allow_fallback:
            raise BackendError(f"backend {backend} unavailable: {why}; install onnxruntime-gpu "
                               "(pip install 'anchorflow[gpu]') with CUDA/TensorRT libraries, or pass "
                               "--allow-fallback to run on " + got[0])
        warnings.warn(f"backend {backend} unavailable ({why}); falling back to {got[0]}", BackendFallbackWarning,
                      stacklevel=2)
    return session


def _short(message: str, head: int = 120, tail: int = 200) -> str:
    """onnxruntime messages embed C++ signatures; keep the start and the (telling) end."""
    message = " ".join(message.split())
    return message if len(message) <= head + tail else f"{message[:head]} ... {message[-tail:]}"


class _OrtNet:
    """A session with fixed input names and one output; checks the graph is the expected network."""

    INPUTS: tuple[str, ...] = ()
    OUTPUT = ""
    KIND = ""

    def __init__(self, session: Any, null_label: Optional[int] = None) -> None:
        names = tuple(i.name for i in session.get_inputs())
        outputs = [o.name for o in session.get_outputs()]
        if sorted(names) != sorted(self.INPUTS) or self.OUTPUT not in outputs:
            raise BackendError(f"this ONNX graph is not a {self.KIND} (inputs {list(names)}, outputs {outputs}; "
                               f"expected inputs {list(self.INPUTS)} and output {self.OUTPUT!r}); re-export the bundle")
        self.session = session
        self.null_label = null_label
        self._out = [self.OUTPUT]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _labels(self, y: Optional[np.ndarray], batch: int) -> np.ndarray:
        if y is not None:
            return np.ascontiguousarray(y, np.int64)
        if self.null_label is None:
            raise ConfigError(f"the {self.KIND} needs labels y; this bundle records no null label for y=None")
        return np.full(batch, int(self.null_label), np.int64)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        f32 = {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items() if k != "y"}
        f32["y"] = self._labels(feeds.get("y"), f32["x"].shape[0])
        return self.session.run(self._out, f32)[0]


class OrtVelocity(_OrtNet):
    """``velocity(x, t, y) -> v`` on an onnxruntime session of a bundle's backbone."""

    INPUTS, OUTPUT, KIND = ("x", "t", "y"), "v", "backbone"

    def __call__(self, x: np.ndarray, t: np.ndarray, y: Optional[np.ndarray]) -> np.ndarray:
        return self._run({"x": x, "t": t, "y": y})


class OrtSideNet(_OrtNet):
    """``sidenet(x, v, t, h, y) -> delta`` on an onnxruntime session of a bundle's SideNet."""

    INPUTS, OUTPUT, KIND = ("x", "v", "t", "h", "y"), "delta", "SideNet"

    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray,
                 y: Optional[np.ndarray]) -> np.ndarray:
        return self._run({"x": x, "v": v, "t": t, "h": h, "y": y})
