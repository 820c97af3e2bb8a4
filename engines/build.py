"""Build TensorRT engines for a bundle: parse ONNX, strongly typed network, one profile, cache.

Per network (backbone, SideNet) and precision: the ONNX graph of that precision (fp16/bf16
variants have float32 I/O and carry their precision in the graph) is parsed into a strongly
typed network, one optimisation profile covers the solver's row counts
(:mod:`anchorflow.engines.profiles`), the builder runs with the workspace limit, optimisation
level and a persistent timing cache, and the serialized engine is stored in the bundle's
engine cache (:mod:`anchorflow.engines.cache`). A progress display follows the builder's
phases (``IProgressMonitor``). TensorRT 10.x and 11.x differences live in :mod:`.compat`.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from .._deps import require
from .._io import sha256_file, write_bytes
from ..errors import BackendError, CheckpointError, ConfigError
from . import cache, compat
from .profiles import Profile, SampleRange, derive_profiles, network_specs, read_bundle, sample_range

PRECISIONS = ("fp32", "fp16", "bf16")


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

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {list(self.precisions)}")
        if not 0 <= int(self.opt_level) <= 5:
            raise ConfigError(f"--opt-level must be 0..5 (TensorRT builder optimisation level), got {self.opt_level}")
        if self.workspace_mb is not None and int(self.workspace_mb) < 1:
            raise ConfigError(f"--workspace-mb must be a positive number of MiB, got {self.workspace_mb}")


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


# -- progress ------------------------------------------------------------------------------------
class ProgressDisplay:
    """Shows TensorRT builder phases: one tqdm bar per active phase, or elapsed-time lines without tqdm.

    Thread-safe (TensorRT may report from several threads). ``cancel()`` makes the next
    ``step_complete`` return False, which asks TensorRT to stop the build.
    """

    def __init__(self, stream: Optional[TextIO] = None, use_tqdm: Optional[bool] = None, label: str = "") -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.cancelled = False
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._phases: dict[str, dict] = {}
        self._spin = itertools.cycle("|/-\\")
        self._tqdm = _tqdm_class() if use_tqdm in (None, True) else None
        if use_tqdm and self._tqdm is None:
            raise ConfigError("tqdm is not installed; pip install tqdm or pass use_tqdm=False")

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def phase_start(self, name: str, parent: Optional[str], steps: int) -> None:
        with self._lock:
            depth = self._phases[parent]["depth"] + 1 if parent in self._phases else 0
            phase = {"depth": depth, "steps": max(int(steps), 1), "done": 0}
            if self._tqdm is not None:
                phase["bar"] = self._tqdm(total=phase["steps"], desc=f"{self.label}{'  ' * depth}{name}",
                                          position=depth, leave=False, file=self.stream, mininterval=0.25)
            self._phases[name] = phase
            self._line(name, phase)

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            phase = self._phases.get(name)
            if phase is not None:
                phase["done"] = min(int(step) + 1, phase["steps"])
                if "bar" in phase:
                    phase["bar"].n = phase["done"]
                    phase["bar"].refresh()
                self._line(name, phase)
            return not self.cancelled

    def phase_finish(self, name: str) -> None:
        with self._lock:
            phase = self._phases.pop(name, None)
            if phase is not None and "bar" in phase:
                phase["bar"].close()

    def cancel(self) -> None:
        self.cancelled = True

    def _line(self, name: str, phase: dict) -> None:
        if self._tqdm is None:
            indent = "  " * phase["depth"]
            self.stream.write(f"\r{next(self._spin)} [{self.elapsed():7.1f} s] {self.label}{indent}{name} "
                              f"{phase['done']}/{phase['steps']}\x1b[K")
            self.stream.flush()


def _tqdm_class() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


# -- one engine ------------------------------------------------------------------------------------
def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        raise BackendError(compat.format_parser_errors(onnx_path, compat.parser_issues(parser)))
    return parser


def _add_profile(builder: Any, config: Any, network: Any, profile: Profile) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile.shapes):
        raise BackendError(f"the ONNX inputs {sorted(names)} differ from bundle.json's {sorted(profile.shapes)}; re-export the bundle")
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)


def _load_timing_cache(config: Any, path: Optional[Path]) -> Any:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        timing = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - an unreadable cache file only costs build time
        timing = None
    if timing is None or not config.set_timing_cache(timing, False):
        timing = config.create_timing_cache(b"")  # a cache from another device/version: start afresh
        config.set_timing_cache(timing, False)
    return timing


def _save_timing_cache(config: Any, path: Optional[Path]) -> None:
    if path is None:
        return
    timing = config.get_timing_cache()
    if timing is not None:
        write_bytes(path, bytes(timing.serialize()))


def build_serialized(trt: Any, onnx_path: Path, profile: Profile, options: BuildOptions,
                     timing_cache: Optional[Path], display: Optional[ProgressDisplay]) -> bytes:
    """Parse ``onnx_path`` and build one serialized engine (bytes); BackendError with TensorRT's reasons on failure."""
    logger = compat.make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(compat.network_flags(trt))
    parser = _parse(trt, network, logger, onnx_path)  # owns the weights: keep it alive through the build
    config = builder.create_builder_config()
    workspace = None if options.workspace_mb is None else int(options.workspace_mb) << 20
    compat.configure(trt, config, workspace_bytes=workspace, opt_level=options.opt_level)
    monitor = compat.progress_monitor(trt, display) if display is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    _add_profile(builder, config, network, profile)
    timing = _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    del parser, timing, monitor  # only now may TensorRT's weights, cache and monitor go
    if serialized is None:
        if display is not None and display.cancelled:
            raise KeyboardInterrupt
        detail = "; ".join(logger.errors[-3:]) or "no details logged"
        raise BackendError(f"TensorRT could not build an engine from {onnx_path.name}: {detail}. "
                           "Try a larger --workspace-mb or another --precision")
    _save_timing_cache(config, timing_cache)
    return bytes(serialized)


# -- a bundle ------------------------------------------------------------------------------------------
def build_engines(bundle: str | Path, options: BuildOptions = BuildOptions(),
                  echo: Callable[[str], None] = print) -> list[BuildRecord]:
    """Build (or reuse from the cache) every engine of ``bundle`` for ``options.precisions``.

    Returns one :class:`BuildRecord` per (network, precision). Needs tensorrt, cuda-python and a
    GPU; an engine already cached under the same key is reused unless ``options.force``.
    """
    trt = require("tensorrt", extra="trt", purpose="building TensorRT engines")
    compat.major(trt)
    folder, meta = read_bundle(bundle)
    env = cache.current_env(trt)
    for precision in options.precisions:
        compat.check_precision(precision, env.compute_capability)
    samples: Optional[SampleRange] = sample_range(meta, **options.batch) if options.batch else None
    profiles = derive_profiles(meta, samples)
    timing = Path(options.timing_cache) if options.timing_cache else cache.timing_cache_path(folder, env)
    echo(f"{env.describe()}; rows per call " + ", ".join(f"{n} {p.rows[0]}..{p.rows[2]} (opt {p.rows[1]})" for n, p in profiles.items()))
    records = []
    with cache.lock(folder):
        for precision in options.precisions:
            for name, spec in network_specs(meta).items():
                records.append(_build_one(trt, folder, spec, precision, profiles[name], env, options, timing))
                echo(records[-1].describe())
    return records


def _build_one(trt: Any, folder: Path, spec: Any, precision: str, profile: Profile, env: cache.EngineEnv,
               options: BuildOptions, timing: Path) -> BuildRecord:
    file, sha = spec.onnx_for(precision)
    if not (folder / file).is_file() or sha256_file(folder / file) != sha:
        raise CheckpointError(f"{folder / file} is missing or does not match the sha256 in bundle.json (modified?); re-export the bundle")
    key = cache.EngineKey(spec.name, precision, sha, profile.to_json(), env)
    hit = None if options.force else cache.cached(folder, key)
    if hit is not None:
        return BuildRecord(spec.name, precision, key.name, hit, 0.0, hit.stat().st_size, True)
    display = ProgressDisplay(label=f"{spec.name} {precision}: ") if options.progress else None
    start = time.perf_counter()
    data = build_serialized(trt, folder / file, profile, options, timing, display)
    seconds = time.perf_counter() - start
    builder = {"opt_level": options.opt_level, "workspace_mb": options.workspace_mb, "onnx_file": file}
    path = cache.record_engine(folder, key, data, seconds, builder)
    return BuildRecord(spec.name, precision, key.name, path, seconds, len(data), False)
