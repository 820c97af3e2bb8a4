"""Build TensorRT engines for a bundle through Polygraphy's loaders, cached in the bundle.

Per network (backbone, SideNet) and precision: the ONNX graph of that precision (fp16/bf16
variants have float32 I/O and carry their precision in the graph) is parsed into a strongly
typed network by our own parser step (it keeps TensorRT's per-node errors for the message), then
Polygraphy builds it: ``CreateConfig`` (one optimisation profile from
:mod:`anchorflow.engines.profiles`, workspace limit, optimisation level, TF32 off unless asked,
timing cache, progress monitor) and ``engine_bytes_from_network``. The timing cache is merged,
not overwritten, and written atomically; the engine goes into the bundle's cache
(:mod:`anchorflow.engines.cache`). Ctrl-C cancels through the progress monitor
(:mod:`anchorflow.engines.progress`). TensorRT 10.x/11.x differences live in :mod:`.compat`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock

from ..base._deps import require
from ..base._io import write_bytes
from ..base.errors import BackendError, ConfigError
from ..runtime.bundles.format import PRECISIONS
from . import cache, compat, driver
from .profiles import Profile, SampleRange, derive_profiles, network_specs, read_bundle, sample_range
from .progress import ProgressDisplay, run_cancellable


# -- precision (quant) -----------------------------------------------------------------------------
# Strongly typed networks (the only kind TensorRT 11 builds, and what anchorflow asks 10.x for) take
# every tensor's type from the graph: fp16 / bf16 variants carry Cast nodes, int8 / fp8 variants
# carry QuantizeLinear / DequantizeLinear pairs whose zero point's type (INT8, FLOAT8E4M3FN) is the
# precision. No builder flag (BuilderFlag.FP16 / INT8 / FP8 are gone in 11 and ignored by strongly
# typed 10.x networks) and no calibrator: the scales were calibrated at export (export/quantize.py).
GRAPH_TYPES = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}
_QDQ_ZERO_POINT = {"int8": 3, "fp8": 17}  # onnx.TensorProto INT8, FLOAT8E4M3FN


def precision_flags(trt: Any, precision: str) -> list:
    """The builder flags ``precision`` needs on this TensorRT: always none (strongly typed networks),
    after checking that these bindings have the data type the graph will carry (an older TensorRT
    without ``DataType.FP8`` cannot build an fp8 graph)."""
    if precision not in GRAPH_TYPES:
        raise ConfigError(f"precision must be one of {', '.join(GRAPH_TYPES)}, got {precision!r}")
    if not hasattr(getattr(trt, "DataType", None), GRAPH_TYPES[precision]):
        raise BackendError(f"TensorRT {getattr(trt, '__version__', '?')} has no {GRAPH_TYPES[precision]} data type, "
                           f"so it cannot build the bundle's {precision} graph; upgrade TensorRT or choose another --precision")
    return []


def check_qdq_graph(onnx_path: Path, precision: str) -> None:
    """Refuse an int8 / fp8 build from a graph without Q/DQ nodes of that type: a strongly typed
    network would silently build it in the graph's float type instead."""
    if precision not in _QDQ_ZERO_POINT:
        return
    onnx = require("onnx", extra="export", purpose=f"checking the {precision} graph before a TensorRT build")
    model = onnx.load(str(onnx_path), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    found = {types.get(n.input[2]) for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    if _QDQ_ZERO_POINT[precision] not in found:
        raise BackendError(f"{onnx_path.name} has no {precision} QuantizeLinear/DequantizeLinear nodes; it is not an "
                           f"{precision} graph (re-export with 'anchorflow export MODEL --precision {precision}')")


@dataclass(frozen=True)
class BuildOptions:
    """What ``anchorflow build`` asks for.

    ``batch``: optional ``min``/``opt``/``max`` samples per solve; when given, the profiles are
    derived from them (:mod:`.profiles`), else bundle.json's row ranges are used as they are.
    """

    precisions: tuple[str, ...] = ("fp32",)
    workspace_mb: Optional[int] = None
    opt_level: int = 3
    batch: dict = field(default_factory=dict)  # optional "min" / "opt" / "max" in samples per solve
    force: bool = False
    timing_cache: Optional[Path] = None
    progress: bool = True
    tf32: bool = False  # fp32 MatMul/Gemm in TF32 (faster, ~5e-4 relative error); off by default
    refittable: bool = False  # BuilderFlag.REFIT: weights can be swapped later (engines/refit.py, LoRAs)
    strip_weights: bool = False  # BuilderFlag.STRIP_PLAN: a weight-stripped plan, refitted from the ONNX on load
    refit: bool = False  # refit a cached refittable engine with the bundle's current weights instead of building

    def builder_fields(self) -> dict:
        """Every option that changes the engine TensorRT builds: part of the cache key."""
        fields = {"opt_level": int(self.opt_level),
                  "workspace_mb": None if self.workspace_mb is None else int(self.workspace_mb), "tf32": bool(self.tf32)}
        if self.refittable or self.strip_weights or self.refit:  # absent for plain engines: keys stay as they were
            fields.update({"refittable": True, "strip_weights": bool(self.strip_weights)})
        return fields

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {list(self.precisions)}")
        if not 0 <= int(self.opt_level) <= 5:
            raise ConfigError(f"--opt-level must be 0..5 (TensorRT builder optimisation level), got {self.opt_level}")
        if self.workspace_mb is not None and int(self.workspace_mb) < 1:
            raise ConfigError(f"--workspace-mb must be a positive number of MiB, got {self.workspace_mb}")
        if self.strip_weights and not self.refittable:
            raise ConfigError("--strip-weights needs --refittable (a stripped plan gets its weights by a refit)")
        if self.refit and self.force:
            raise ConfigError("--refit reuses a cached refittable engine; it cannot be combined with --force")


@dataclass(frozen=True)
class BuildRecord:
    """One engine of a build: where it is, how long it took, and whether it came from the cache."""

    network: str
    precision: str
    key: str
    path: Path
    seconds: float
    size_bytes: int
    cached: bool

    def describe(self) -> str:
        state = "cached" if self.cached else f"built in {self.seconds:.1f} s"
        return f"{self.network:<8} {self.precision:<4} {state:<16} {self.size_bytes / 2**20:7.2f} MiB  {self.path.name}"


# -- one engine ------------------------------------------------------------------------------------
def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        raise BackendError(compat.format_parser_errors(onnx_path, compat.parser_issues(parser)))
    return parser


def parse_network(trt: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any, Any]:
    """(builder, strongly typed network, parser) for ``onnx_path``: the tuple Polygraphy's build loaders take."""
    builder = compat.create_builder(trt, logger)
    compat.init_plugins(trt, logger)
    network = builder.create_network(compat.network_flags(trt))
    return builder, network, _parse(trt, network, logger, onnx_path)


def _check_inputs(network: Any, profile: Profile) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile.shapes):
        raise BackendError(f"the ONNX inputs {sorted(names)} differ from bundle.json's {sorted(profile.shapes)}; re-export the bundle")


def polygraphy_profile(profile: Profile) -> Any:
    """Our :class:`Profile` as a ``polygraphy.backend.trt.Profile`` (min/opt/max per input)."""
    from polygraphy.backend.trt import Profile as PolyProfile

    poly = PolyProfile()
    for name, (lo, opt, hi) in profile.shapes.items():
        poly.add(name, lo, opt, hi)
    return poly


def merge_timing_cache(config: Any, path: Optional[Path]) -> None:
    """Combine this build's tactic timings into the cache file at ``path`` (atomic write, file-locked).

    Polygraphy's ``save_timing_cache`` merges too but writes in place; ours keeps the file whole
    if the process dies mid-write.
    """
    timing = config.get_timing_cache() if path is not None else None
    if timing is None:
        return
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            try:
                previous = config.create_timing_cache(path.read_bytes())
            except Exception:  # noqa: BLE001 - a cache from another TensorRT/GPU is replaced, not merged
                previous = None
            if previous is not None:
                timing.combine(previous, True)
        write_bytes(path, bytes(timing.serialize()))


def build_serialized(trt: Any, onnx_path: Path, profile: Profile, options: BuildOptions,
                     timing_cache: Optional[Path], display: ProgressDisplay) -> bytes:
    """Parse ``onnx_path`` and build one serialized engine (bytes) through Polygraphy.

    BackendError with TensorRT's reasons on failure; KeyboardInterrupt when Ctrl-C cancelled it.
    """
    require("polygraphy", extra="trt", purpose="building TensorRT engines")
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    logger = compat.make_logger(trt)
    builder, network, parser = parse_network(trt, logger, onnx_path)
    _check_inputs(network, profile)
    monitor = compat.progress_monitor(trt, display)
    workspace = None if options.workspace_mb is None else int(options.workspace_mb) << 20
    kwargs = compat.config_kwargs(trt, workspace_bytes=workspace, opt_level=options.opt_level, tf32=options.tf32,
                                  refittable=options.refittable, strip=options.strip_weights)
    load = str(timing_cache) if timing_cache is not None and timing_cache.is_file() else None
    data = None
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # our messages, not Polygraphy's log lines
        try:
            config = CreateConfig(profiles=[polygraphy_profile(profile)], load_timing_cache=load,
                                  progress_monitor=monitor, **kwargs)(builder, network)
            data = run_cancellable(lambda: engine_bytes_from_network((builder, network, parser), config=config), display)  # noqa: F821 (called before the del below)
        except PolygraphyException as exc:
            logger.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    if not data:
        detail = "; ".join(" ".join(e.split()) for e in logger.errors[-3:] if e) or "no details logged"
        raise BackendError(f"TensorRT could not build an engine from {onnx_path.name}: {detail}. "
                           "Try a larger --workspace-mb or another --precision")
    merge_timing_cache(config, timing_cache)
    del parser, monitor  # only now may TensorRT's weights and monitor go
    return bytes(data)


# -- a bundle ------------------------------------------------------------------------------------------
def build_engines(bundle: str | Path, options: BuildOptions = BuildOptions(),
                  echo: Callable[[str], None] = print) -> list[BuildRecord]:
    """Build (or reuse from the cache) every engine of ``bundle`` for ``options.precisions``.

    Returns one :class:`BuildRecord` per (network, precision). Needs tensorrt, cuda-python and a
    GPU; an engine already cached under the same key is reused unless ``options.force``.
    """
    trt = require("tensorrt", extra="trt", purpose="building TensorRT engines")
    compat.major(trt)
    driver.check(trt.__name__, trt.__version__)
    folder, meta = read_bundle(bundle)
    env = cache.current_env(trt)
    for precision in options.precisions:
        compat.check_precision(precision, env.compute_capability)
        precision_flags(trt, precision)
    samples: Optional[SampleRange] = sample_range(meta, **options.batch) if options.batch else None
    profiles = derive_profiles(meta, samples, explicit_opt="opt" in options.batch)
    timing = Path(options.timing_cache) if options.timing_cache else cache.timing_cache_path(folder, env)
    echo(f"{env.describe()}; profiles " + "; ".join(f"{n} {p.describe()}" for n, p in profiles.items()))
    records = []
    with cache.lock(folder):
        for precision in options.precisions:
            for name, spec in network_specs(meta).items():
                records.append(_build_one(trt, folder, spec, precision, profiles[name], env, options, timing))
                echo(records[-1].describe())
    return records


def _build_one(trt: Any, folder: Path, spec: Any, precision: str, profile: Profile, env: cache.EngineEnv,
               options: BuildOptions, timing: Path) -> BuildRecord:
    onnx_path, sha = cache.onnx_file(folder, spec, precision)  # hash-checked, external weights included
    if spec.entry(precision).get("computes", precision) == precision:  # a SideNet kept fp32 next to int8 is not Q/DQ
        check_qdq_graph(onnx_path, precision)
    file = onnx_path.name
    key = cache.EngineKey(spec.name, precision, sha, profile.to_json(), env, options.builder_fields())
    hit = None if options.force else cache.cached(folder, key)
    if hit is not None:
        return BuildRecord(spec.name, precision, key.name, hit, 0.0, hit.stat().st_size, True)
    if options.refit:
        from .refit import refit_cached

        return BuildRecord(spec.name, precision, *refit_cached(trt, folder, spec, precision, key, onnx_path))
    display = ProgressDisplay(label=f"{spec.name} {precision}: ", quiet=not options.progress)
    start = time.perf_counter()
    data = build_serialized(trt, onnx_path, profile, options, timing, display)
    seconds = time.perf_counter() - start
    path = cache.record_engine(folder, key, data, seconds, onnx_file=file)
    return BuildRecord(spec.name, precision, key.name, path, seconds, len(data), False)
