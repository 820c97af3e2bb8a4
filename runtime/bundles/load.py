"""Open an exported bundle (``bundle.json`` + ONNX files) as the runtime's callables, torch-free.

``load_bundle(path, backend, allow_fallback, precision) -> LoadedBundle`` with ``velocity(x, t, cond)``,
``sidenet(x, v, t, h, cond)`` (or None), the ``bundle.json`` dict and the providers the sessions
really got. bundle.json is read and validated by :mod:`.bundle_format` (schema /2, or /1); every
ONNX file is checked against its sha256 and each graph's inputs against the declaration, so a
tampered, hand-broken or foreign bundle is refused (CheckpointError) instead of sampled. One
registry of backends (:data:`BACKENDS`): onnxruntime here, TensorRT and torch loaded lazily.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ...base._deps import require_extra
from ...base.errors import CheckpointError, ConfigError
from .format import (  # noqa: F401  (re-exported: the format's names, for older imports)
    BUNDLE_JSON, PRECISIONS, SCHEMA, TIME_CONVENTION, BundleFormat, find_bundle, parse_meta, read_bundle)
from .models import ModelFiles, OpenModel, check_fresh, model_meta, resolve
from .networks import WRAPPERS

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch")
# backends served outside the runtime (imported only when asked for): see external_runs
EXTERNAL = ("trt", "torch")


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle ready for :func:`anchorflow.runtime.solve`.

    ``providers``: what the backbone's session really runs on (e.g. ``["CPUExecutionProvider"]``);
    ``network_providers``: the same per network.
    """

    velocity: Callable
    sidenet: Optional[Callable]
    meta: dict
    providers: list[str]
    path: Path
    precision: str = "fp32"
    backend: str = "ort-cpu"
    network_providers: dict[str, list[str]] = field(default_factory=dict)
    format: Optional[BundleFormat] = None

    @property
    def conditions(self) -> tuple:
        """The backbone's declared conditions (:class:`~.bundle_format.TensorDecl`)."""
        return self.format.backbone.conditions if self.format is not None else ()

    @property
    def null_cond(self) -> dict:
        """Condition name -> the bundle's inline null value (e.g. ``{"y": 10}``)."""
        return dict(self.format.guidance.null) if self.format is not None else {}

    @property
    def model(self) -> dict:
        return dict(self.meta.get("model") or {})

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.model.get("state_shape", ()))

    @property
    def null_label(self) -> Optional[int]:
        return self.model.get("null_label")

    @functools.cached_property
    def tuning(self):
        """The bundle's tuned grids and first-call table (``anchorflow tune``), None when untuned."""
        from .tuned_grids import read_tuning

        return None if self.format is None else read_tuning(self.format)

    def plan(self, **kwargs: Any):
        """A checked :class:`~anchorflow.runtime.plan.SamplePlan` on this bundle (its tuned grid by
        default); the keywords of :func:`anchorflow.runtime.plan.plan`."""
        from ..plan import plan

        kwargs.setdefault("tuning", self.tuning)
        return plan(self, **kwargs)

    def sample(self, **kwargs: Any):
        """``self.plan(**kwargs).run()``: samples as ``anchorflow sample`` draws them -> Result."""
        return self.plan(**kwargs).run()


def read_meta(folder: str | os.PathLike) -> dict:
    """bundle.json of a bundle folder, validated (see :mod:`.bundle_format`)."""
    return read_bundle(folder).meta


def network_file(folder: Path, meta: dict, network: str, precision: str = "fp32", verify: bool = True) -> Path:
    """Path of ``network``'s ONNX file in ``precision``, inside the bundle and checked against its sha256."""
    return parse_meta(meta, Path(folder)).network_file(network, precision, verify)


def load_bundle(path: str | os.PathLike, backend: str = "auto", allow_fallback: bool = False,
                precision: str = "fp32", threads: Optional[int] = None) -> LoadedBundle:
    """Open a bundle folder (or a model root with ``bundle/``, or ``"default"``: the bundled digits model).

    ``backend``: auto | ort-cpu | ort-cuda | ort-trt (onnxruntime) | trt (cached TensorRT engines
    via :mod:`anchorflow.engines`) | torch (the checkpoints recorded in bundle.json); the last two
    are imported only then. Every backend's networks get the same condition rule
    (:mod:`.networks`). ``precision``: which ONNX variant to run.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    bundle = read_bundle(resolve(path) if str(path) == "default" else path)
    if backend in EXTERNAL:
        runs, providers = external_runs(backend, bundle, precision)
        per_net = {name: list(providers) for name in runs}
        resolved = backend
    else:
        runs, per_net, resolved = _ort_runs(bundle, backend, allow_fallback, precision, threads)
    nets = {name: WRAPPERS[name](bundle.networks[name], run, bundle.guidance.null, per_net[name])
            for name, run in runs.items()}
    return LoadedBundle(nets["backbone"], nets.get("sidenet"), bundle.meta, per_net["backbone"], bundle.folder,
                        precision, resolved, per_net, bundle)


def external_runs(backend: str, bundle: BundleFormat, precision: str, **options: Any) -> tuple[dict, list[str]]:
    """``(runs, providers)`` of a backend served outside the runtime: runs maps a network name to
    ``run(feeds)``. Literal lazy imports (the architecture test reads them): TensorRT engines, or
    the torch models the bundle was exported from (``options``: their ``sources`` / ``trust_source``)."""
    if backend == "trt":
        require_extra("trt", "the trt backend", ("tensorrt",))
        from ...engines.runner import bundle_runs
    elif backend == "torch":
        require_extra("train", "the torch backend", ("torch",))
        from ...trainers.torch_wrappers import bundle_runs
    else:
        raise ConfigError(f"backend {backend!r} is not served outside the runtime ({', '.join(EXTERNAL)} are)")
    return bundle_runs(bundle, precision, **options)


def open_bundle(files: ModelFiles, backend: str = "auto", allow_fallback: bool = False, precision: str = "fp32",
                threads: Optional[int] = None) -> OpenModel:
    """Open the exported bundle of ``files`` (refusing a stale one, see :func:`check_fresh`).

    ``threads``: onnxruntime intra-op threads of the bundle's sessions (None: one per physical core).
    """
    if files.bundle is None:
        raise CheckpointError(f"{files.spec} has no exported bundle; run 'anchorflow export {files.spec} --out BUNDLE'")
    check_fresh(files)
    b = load_bundle(files.bundle, backend=backend, allow_fallback=allow_fallback, precision=precision, threads=threads)
    return OpenModel(b.velocity, b.sidenet, model_meta(b.meta), files, list(b.providers), b.precision, b.backend)


def _ort_runs(bundle: BundleFormat, backend: str, allow_fallback: bool, precision: str,
              threads: Optional[int]) -> tuple[dict, dict, str]:
    from .backends import make_session, ort_run, resolve_backend
    from .ort_gpu import declared_profile

    resolved = resolve_backend(backend)
    runs, per_net = {}, {}
    for name, decl in bundle.networks.items():
        entry = decl.entry(precision)
        session = make_session(bundle.network_file(name, precision), backend, allow_fallback, threads=threads,
                               profile=declared_profile(decl.inputs, {"batch": decl.batch, **decl.axes}),
                               graph_sha256=entry.get("sha256"), graph_cache=not entry.get("external_data"))
        runs[name], per_net[name] = ort_run(session, decl), list(session.get_providers())
    return runs, per_net, resolved
