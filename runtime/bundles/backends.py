"""onnxruntime sessions for a bundle's networks, wrapped as the runtime's callables.

``OrtVelocity(session, decl, null)(x, t, cond) -> v`` and ``OrtSideNet(...)(x, v, t, h, cond) -> delta``
match :class:`anchorflow.runtime.solving.field.Velocity` / ``SideNet``: x, v (B, *state) float32, t, h (B,)
float32 (t = 1 noise, t = 0 data; ``v_hat(t - h) = v + delta``, BA-solver arXiv 2601.21542),
cond a dict of row arrays or None; conditions follow :mod:`.networks`' one rule (missing ones get
the null value, e.g. the null label). numpy + onnxruntime only.

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
from typing import Any, Callable, Optional

import numpy as np

from ...base._deps import require
from ...base.errors import BackendError, ConfigError
from . import threads as thread_policy
from . import ort_gpu
from .format import ORT_DTYPES, SCHEMA_V1, NetworkDecl, _network, check_graph_inputs
from .networks import BundleSideNet, BundleVelocity

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# backend name -> the provider it is about (first) and what it asks onnxruntime for, in order
ORT_PROVIDERS: dict[str, tuple[str, ...]] = {
    "ort-cpu": (CPU,),
    "ort-cuda": (CUDA, CPU),
    "ort-trt": (TRT, CUDA, CPU),
}
ORT_TRT_CACHE = Path("engines") / "ort-trt"


class BackendFallbackWarning(UserWarning):
    """A GPU provider could not be used and the session runs on a fallback (allow_fallback=True)."""


OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


def session_options(threads: Optional[int] = None, optimization: str = "all", thread_mode: str = "auto") -> Any:
    """Session options: the graph optimisation level (``all``: constant folding, fusions, layout
    transforms) and the CPU threads of this process's policy (:mod:`.threads`: one pool shared
    by every session on a quiet machine, a non-spinning pool per session when oversubscribed;
    ``threads`` sizes it, ``thread_mode`` auto|shared|session forces a policy)."""
    ort = require("onnxruntime", extra=None, purpose="running ONNX bundles")
    if optimization not in OPTIMIZATION:
        raise ConfigError(f"unknown graph optimisation {optimization!r}; choose from {', '.join(OPTIMIZATION)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    thread_policy.apply(opts, threads, thread_mode)
    return opts


def resolve_backend(backend: str) -> str:
    """'auto' -> the best backend this onnxruntime build can really use; other names are checked.

    onnxruntime-gpu always lists the TensorRT provider, even without TensorRT's libraries: ``auto``
    picks ort-trt only when libnvinfer loads (:func:`ort_gpu.tensorrt_library`), else ort-cuda.
    """
    if backend == "auto":
        ort = require("onnxruntime")
        available = ort.get_available_providers()
        if TRT in available and ort_gpu.tensorrt_library() is not None:
            return "ort-trt"
        return "ort-cuda" if CUDA in available else "ort-cpu"
    if backend not in ORT_PROVIDERS:
        raise ConfigError(f"unknown onnxruntime backend {backend!r}; choose from auto, {', '.join(ORT_PROVIDERS)}")
    return backend


def _providers(backend: str, cache_dir: Optional[Path], profile: Optional[dict] = None) -> list[Any]:
    ort = require("onnxruntime")
    available = set(ort.get_available_providers())
    if backend != "ort-cpu":
        ort_gpu.check_wheels()  # CPU and GPU wheels installed together shadow each other
        ort_gpu.preload_cuda(ort)  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime >= 1.21)
    out: list[Any] = []
    for name in ORT_PROVIDERS[backend]:
        if name not in available or (name == TRT and ort_gpu.tensorrt_library() is None):
            continue
        if name == TRT and cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendError(f"cannot create the TensorRT engine cache {cache_dir} ({exc}); "
                                   "copy the bundle to a writable folder") from None
            out.append((TRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                              "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
                              **ort_gpu.trt_profile_options(profile or {})}))  # one engine for B, 2B, 6B rows
        else:
            out.append(name)
    return out or [CPU]


def make_session(path: str | os.PathLike, backend: str = "auto", allow_fallback: bool = False, *,
                 cache_dir: Optional[str | os.PathLike] = None, threads: Optional[int] = None,
                 optimization: str = "all", profile: Optional[dict] = None, graph_sha256: Optional[str] = None,
                 graph_cache: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` for the ONNX file ``path`` on ``backend``.

    ``cache_dir``: the TensorRT provider's engine cache (default ``<folder of path>/engines/ort-trt``).
    ``profile``: input -> (min, opt, max) shapes for the TensorRT provider (:func:`ort_gpu.declared_profile`).
    ``graph_cache``: CPU-only sessions open onnxruntime's optimised graph from the cache of
    :mod:`.graph_cache` (made on first use; ``graph_sha256``, the file's known hash, spares hashing it).
    Raises BackendError when an explicitly asked GPU provider is not what the session got (unless
    ``allow_fallback``), or when onnxruntime cannot run the graph (e.g. bf16 ops on the CPU).
    """
    ort = require("onnxruntime")
    explicit = backend != "auto"
    backend = resolve_backend(backend)
    path = Path(path)
    cache = Path(cache_dir) if cache_dir is not None else path.parent / ORT_TRT_CACHE
    opts, providers = session_options(threads, optimization), _providers(backend, cache, profile)
    def make(file: str, options: Any) -> Any:
        return ort.InferenceSession(file, options, providers=providers)

    try:
        if graph_cache and providers == [CPU]:
            from .graph_cache import open_cached

            session = open_cached(path, graph_sha256, opts, providers, optimization, make,
                                  ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        else:
            session = make(str(path), opts)
    except Exception as exc:  # onnxruntime raises its own Fail / NotImplemented / InvalidGraph types
        msg = _short(str(exc))
        raise BackendError(f"onnxruntime cannot run {path.name} on {backend}: {msg}; try another --precision "
                           "or backend (bf16 graphs need a GPU backend)") from None
    wanted, got = ORT_PROVIDERS[backend][0], session.get_providers()
    if explicit and got[0] != wanted:
        why = _unavailable_reason(ort, wanted)
        if not allow_fallback:
            raise BackendError(f"backend {backend} unavailable: {why}; or pass --allow-fallback to run on " + got[0])
        warnings.warn(f"backend {backend} unavailable ({why}); falling back to {got[0]}", BackendFallbackWarning,
                      stacklevel=2)
    return session


def _unavailable_reason(ort: Any, wanted: str) -> str:
    """Which wheel or library keeps provider ``wanted`` from loading, and how to get it."""
    if wanted not in ort.get_available_providers():
        fix = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu ('anchorflow[gpu]')"
               if "onnxruntime-gpu" not in ort_gpu.installed_wheels() else "reinstall onnxruntime-gpu")
        return f"{wanted} is not in this onnxruntime build (has: {', '.join(ort.get_available_providers())}): {fix}"
    if wanted == TRT and ort_gpu.tensorrt_library() is None:
        return ort_gpu.missing_tensorrt_message()
    preload = ort_gpu.preload_cuda(ort)
    detail = f" (CUDA/cuDNN preload: {preload})" if preload else ""
    return (f"{wanted} failed to load{detail}: it needs the CUDA runtime and cuDNN this onnxruntime-gpu build was made for "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]') and a working NVIDIA driver (nvidia-smi)")


def _short(message: str, head: int = 120, tail: int = 200) -> str:
    """onnxruntime messages embed C++ signatures; keep the start and the (telling) end."""
    message = " ".join(message.split())
    return message if len(message) <= head + tail else f"{message[:head]} ... {message[-tail:]}"


def graph_inputs(session: Any) -> list[tuple[str, str, list]]:
    """(name, ORT type string, shape) of each input of an onnxruntime session."""
    return [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]


def session_decl(session: Any, kind: str) -> NetworkDecl:
    """A declaration read off the graph itself (for a session opened without bundle.json):
    x/t/v/h by name as in schema /1, every other input a per-row condition."""
    ins = [{"name": n, "dtype": ORT_DTYPES.get(k, k), "shape": [d if isinstance(d, int) else "batch" if j == 0 else str(d)
                                                             for j, d in enumerate(shape)]}
           for n, k, shape in graph_inputs(session)]
    outs = [{"name": o.name, "dtype": "float32", "shape": ["batch"]} for o in session.get_outputs()]
    return _network(kind, {"file": "<session>", "sha256": "", "inputs": ins, "outputs": outs}, SCHEMA_V1)


def ort_run(session: Any, decl: NetworkDecl) -> Callable[[dict], np.ndarray]:
    """``run(feeds) -> output`` on an onnxruntime session, after checking its graph against ``decl``."""
    check_graph_inputs(decl, graph_inputs(session), decl.file)
    outputs = [o.name for o in session.get_outputs()]
    want = decl.outputs[0].name
    if want not in outputs:
        raise BackendError(f"this ONNX graph is not a {decl.name} (outputs {outputs}, expected {want!r}); re-export the bundle")
    return lambda feeds: session.run([want], feeds)[0]


class OrtVelocity(BundleVelocity):
    """``velocity(x, t, cond) -> v`` on an onnxruntime session of a bundle's backbone.

    ``decl``: the backbone's declaration in bundle.json (None: read off the graph, schema /1
    names); ``null``: condition name -> null value (e.g. ``{"y": 10}``) for missing conditions.
    """

    def __init__(self, session: Any, decl: Optional[NetworkDecl] = None, null: Optional[dict] = None) -> None:
        decl = decl if decl is not None else session_decl(session, "backbone")
        super().__init__(decl, ort_run(session, decl), null, list(session.get_providers()))
        self.session = session


class OrtSideNet(BundleSideNet):
    """``sidenet(x, v, t, h, cond) -> delta`` on an onnxruntime session of a bundle's SideNet."""

    def __init__(self, session: Any, decl: Optional[NetworkDecl] = None, null: Optional[dict] = None) -> None:
        decl = decl if decl is not None else session_decl(session, "sidenet")
        super().__init__(decl, ort_run(session, decl), null, list(session.get_providers()))
        self.session = session
