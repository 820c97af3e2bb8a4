"""Refit TensorRT engines with new weights (after ``anchorflow refit`` fused a LoRA) instead of rebuilding.

An engine built refittable (``anchorflow build --refittable``: ``BuilderFlag.REFIT``, and with
``--strip-weights`` also ``STRIP_PLAN``, a plan without its weights) names its weights after the
ONNX initializers it was parsed from. ``build --refit`` takes the newest cached refittable engine of
the same network, precision, profile, TensorRT and GPU, feeds every weight it asks for
(``Refitter.get_all_weights``) from the bundle's current ONNX graph, and records the result as a new
engine whose key says what it is a refit of (``builder.refit_of``), next to the engine it came from:
a refit engine and a fresh build are never confused in the cache. A stripped plan is refitted the
same way each time it is loaded (:func:`fill_weights`). The weight look-up is plain numpy over the
ONNX file (``onnx`` reads it); TensorRT is imported by the caller (lazily, extra ``trt``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..base.errors import BackendError
from . import cache


def onnx_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """Initializer name -> array of an ONNX file (external data included)."""
    from ..base._deps import require

    onnx = require("onnx", extra="export", purpose="refitting TensorRT engines from ONNX weights")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def fill_weights(trt: Any, refitter: Any, weights: Mapping[str, np.ndarray], label: str) -> list[str]:
    """Give ``refitter`` every weight its engine can take, from ``weights``; refit; the names set.

    Raises BackendError naming what is missing (the engine was built from another graph) or when
    TensorRT refuses the refit (a shape or type mismatch)."""
    names = list(refitter.get_all_weights())
    missing = [n for n in names if n not in weights]
    if missing:
        raise BackendError(f"cannot refit the {label} engine: the ONNX graph has no weight {missing[0]!r} "
                           f"({len(missing)} of {len(names)} missing); it was built from another graph: rebuild it "
                           "with 'anchorflow build --refittable --force'")
    keep = []  # TensorRT reads the host memory during refit_cuda_engine: keep every array alive until then
    for name in names:
        arr = np.ascontiguousarray(weights[name])
        keep.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise BackendError(f"TensorRT refused the weight {name!r} for the {label} engine (shape or type "
                               "changed); rebuild with 'anchorflow build --refittable --force'")
    if not refitter.refit_cuda_engine():
        raise BackendError(f"TensorRT could not refit the {label} engine; rebuild with 'anchorflow build --force'")
    return names


def base_entry(folder: Path, network: str, precision: str, key: cache.EngineKey) -> dict:
    """The newest cached refittable engine that ``key``'s engine can be refitted from."""
    entries = [e for e in cache.read_manifest(folder)["engines"].values()
               if e.get("network") == network and e.get("precision") == precision
               and (e.get("builder") or {}).get("refittable") and e.get("profile") == key.profile
               and not cache.mismatches(e, key.env, e.get("onnx_sha256"))]
    if not entries:
        raise BackendError(f"no cached refittable {network} {precision} engine for this GPU and profile in {folder}; "
                           f"build one with 'anchorflow build {folder} --refittable --precision {precision}' "
                           "(before fusing the LoRA, or on the refitted bundle itself)")
    return max(entries, key=lambda e: e.get("built_at", ""))


def refit_key(key: cache.EngineKey, base: dict) -> cache.EngineKey:
    """The cache key of a refit of ``base`` to ``key``'s ONNX: ``key`` plus ``builder.refit_of``."""
    builder = {**(base.get("builder") or {}), "refit_of": base.get("file", "").rsplit(".", 1)[0]}
    return cache.EngineKey(key.network, key.precision, key.onnx_sha256, key.profile, key.env, builder)


def refit_cached(trt: Any, folder: Path, spec: Any, precision: str, key: cache.EngineKey, onnx_path: Path,
                 runtime_factory: Callable[[Any], Any] | None = None) -> tuple[str, Path, float, int, bool]:
    """``build --refit`` for one network: a refit of the newest refittable engine, recorded in the cache.
    Returns (key name, engine path, seconds, bytes, cached) for build.py's BuildRecord."""
    base = base_entry(folder, spec.name, precision, key)
    new_key = refit_key(key, base)
    hit = cache.cached(folder, new_key)
    if hit is not None:
        return new_key.name, hit, 0.0, hit.stat().st_size, True
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = (runtime_factory or trt.Runtime)(logger)
    engine = runtime.deserialize_cuda_engine(cache.read_engine(folder, base))
    if engine is None:
        raise BackendError(f"TensorRT could not load the cached engine {base['file']}; rebuild with --force")
    fill_weights(trt, trt.Refitter(engine, logger), onnx_weights(onnx_path), f"{spec.name} {precision}")
    data = bytes(engine.serialize())
    path = cache.record_engine(folder, new_key, data, time.perf_counter() - start, onnx_file=onnx_path.name)
    return new_key.name, path, time.perf_counter() - start, len(data), False
