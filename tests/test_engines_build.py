"""The engine build path through Polygraphy's real loaders, on the real TensorRT lean bindings plus a fake builder.

The lean runtime (tensorrt-lean-cu12, installed by ``.[dev]``) has every enum, dtype, Logger and
IProgressMonitor of TensorRT but no Builder or OnnxParser; those two (and the builder config
they hand out) are the only fakes here. Everything else is real: Polygraphy's ``CreateConfig``
and ``engine_bytes_from_network`` (they read the lean module's ``BuilderFlag``/``MemoryPoolType``),
our build, cache, manifest, timing-cache merge and Ctrl-C handling. The fake builder "serializes"
an engine as JSON of what it was configured with, so the tests can read back the flags, levels
and profiles TensorRT would have received. No GPU is involved (driver check and device query are
replaced by a fixed environment). Issue 15 items 3 (TF32), 4 (builder options in the key) and 6
(Ctrl-C) each have a test here that fails on the code before its fix.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

lean = pytest.importorskip("tensorrt_lean", reason="the TensorRT lean runtime is not installed (pip install -e '.[dev]')")
pytest.importorskip("polygraphy")

from anchorflow.engines import cache, driver  # noqa: E402
from anchorflow.engines.build import BuildOptions, build_engines  # noqa: E402
from anchorflow.base.errors import BackendError  # noqa: E402
from test_engines import write_bundle  # noqa: E402

GPU = cache.EngineEnv(lean.__version__, "Fake GPU", (9, 0))


# -- the fakes: Builder, OnnxParser and the objects they create ---------------------------------------
class FakeTensor:
    def __init__(self, name: str, shape: tuple, dtype) -> None:
        self.name, self.shape, self.dtype, self.is_shape_tensor = name, shape, dtype, False


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs = flags, []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = 0

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    def __iter__(self):  # no layers (Polygraphy looks for layer precisions)
        return iter(())


class FakeParser:
    """Reads the real ONNX file's inputs into the network (names, shapes with -1 for dynamic axes)."""

    def __init__(self, network: FakeNetwork, logger) -> None:
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        for value in onnx.load(path).graph.input:
            dims = tuple(d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim)
            self.network.inputs.append(FakeTensor(value.name, dims, lean.float32))
        return True


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = set(json.loads(data.decode())) if data else set()

    def combine(self, other: "FakeTimingCache", ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        return json.dumps(sorted(self.entries)).encode()


class FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeConfig:
    """IBuilderConfig: flags start as TensorRT's defaults (TF32 on), everything else is recorded."""

    def __init__(self) -> None:
        self.flags = {lean.BuilderFlag.TF32}
        self.pools, self.profiles, self.timing = {}, [], None
        self.builder_optimization_level, self.progress_monitor = 3, None
        self.DLA_core, self.default_device_type, self.profiling_verbosity = -1, lean.DeviceType.GPU, None

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool.name] = int(size)

    def get_memory_pool_limit(self, pool) -> int:
        return self.pools.get(pool.name, 0)

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, timing, ignore_mismatch) -> bool:
        self.timing = timing
        return True

    def get_timing_cache(self):
        return self.timing


class FakeBuilder:
    """``build_serialized_network`` walks 5 progress steps (asking the monitor to continue), adds a
    timing entry, and returns the configuration as JSON bytes. ``FakeBuilder.on_step`` runs at each
    step inside a C++-like boundary: a Python exception there is swallowed, as TensorRT's noexcept
    callbacks would not let it through."""

    on_step = None
    created: list = []

    def __init__(self, logger) -> None:
        self.logger = logger
        FakeBuilder.created.append(self)

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self.network_flags = flags
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig):
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 5)
        for step in range(5):
            try:
                if FakeBuilder.on_step is not None:
                    FakeBuilder.on_step(step)
                time.sleep(0.02)
            except BaseException:  # noqa: BLE001 - C++ does not see Python exceptions
                pass
            if monitor is not None and not monitor.step_complete("Building engine", step):
                self.logger.log(lean.ILogger.Severity.ERROR, "Build was cancelled by the progress monitor")
                return None
        if monitor is not None:
            monitor.phase_finish("Building engine")
        config.timing.entries.add(f"tactic-{network.inputs[0].name}-{config.builder_optimization_level}")
        return json.dumps({
            "flags": sorted(f.name for f in config.flags), "opt_level": config.builder_optimization_level,
            "pools": config.pools, "profiles": [p.shapes for p in config.profiles], "network_flags": network.flags,
        }).encode()


def _reset_polygraphy_trt() -> None:
    """Polygraphy's lazy ``trt`` handles cache the module they first import: drop that cache."""
    for name, module in list(sys.modules.items()):
        handle = getattr(module, "trt", None) if name.startswith("polygraphy") else None
        if type(handle).__name__ == "LazyModule":
            object.__setattr__(handle, "module", None)


@pytest.fixture
def fake_trt(monkeypatch):
    """``import tensorrt`` gives the lean bindings plus the fake Builder/OnnxParser; driver and GPU fixed."""
    trt = types.ModuleType("tensorrt")
    trt.__dict__.update({k: v for k, v in vars(lean).items() if not k.startswith("__")})
    trt.__version__ = lean.__version__
    trt.Builder, trt.OnnxParser = FakeBuilder, FakeParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(__members__={}, STRONGLY_TYPED=1)
    trt.plugins_initialised = []
    trt.init_libnvinfer_plugins = lambda logger, namespace: trt.plugins_initialised.append(namespace)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(driver, "check", lambda *a, **k: (12, 8))
    monkeypatch.setattr(cache, "current_env", lambda trt_module: GPU)
    monkeypatch.setattr(FakeBuilder, "on_step", None)
    FakeBuilder.created = []
    _reset_polygraphy_trt()
    yield trt
    _reset_polygraphy_trt()


def _engine(record) -> dict:
    return json.loads(record.path.read_bytes())


def _build(bundle: Path, **options):
    return build_engines(bundle, BuildOptions(progress=False, **options), echo=lambda s: None)


def test_fp32_engines_are_built_without_tf32(tmp_path: Path, fake_trt) -> None:
    """Item 3: TensorRT enables TF32 by default; anchorflow clears it unless --tf32 (which changes the key)."""
    bundle = write_bundle(tmp_path / "b")
    plain = _build(bundle)
    assert {r.network for r in plain} == {"backbone", "sidenet"}
    for record in plain:
        assert "TF32" not in _engine(record)["flags"] and not record.cached
    tf32 = _build(bundle, tf32=True)
    assert all("TF32" in _engine(r)["flags"] and not r.cached for r in tf32)
    assert {r.key for r in tf32}.isdisjoint(r.key for r in plain)


def test_every_builder_option_reaches_the_builder_and_the_key(tmp_path: Path, fake_trt) -> None:
    """Item 4: a rebuild with another --opt-level or --workspace-mb is a new engine, not "cached"."""
    bundle = write_bundle(tmp_path / "b")
    first = {r.network: r for r in _build(bundle, opt_level=3)}
    other = {r.network: r for r in _build(bundle, opt_level=5, workspace_mb=64)}
    for name, record in other.items():
        assert not record.cached and record.key != first[name].key
        engine = _engine(record)
        assert engine["opt_level"] == 5 and engine["pools"] == {"WORKSPACE": 64 << 20}
    again = _build(bundle, opt_level=5, workspace_mb=64)
    assert all(r.cached for r in again)
    manifest = cache.read_manifest(bundle)["engines"]
    assert {e["builder"]["opt_level"] for e in manifest.values()} == {3, 5}


def test_build_uses_the_profiles_strong_typing_and_plugins(tmp_path: Path, fake_trt) -> None:
    bundle = write_bundle(tmp_path / "b", rows={"backbone": (1, 8, 32), "sidenet": (1, 24, 96)})
    records = {r.network: r for r in _build(bundle)}
    backbone = _engine(records["backbone"])
    assert backbone["profiles"] == [{"x": [[1, 1, 4, 4], [8, 1, 4, 4], [32, 1, 4, 4]], "t": [[1], [8], [32]],
                                     "y": [[1], [8], [32]]}]
    assert _engine(records["sidenet"])["profiles"][0]["h"] == [[1], [24], [96]]
    assert backbone["network_flags"] == 0  # 11.x: strongly typed is the only mode, no flag passed
    assert fake_trt.plugins_initialised == ["", ""]


def test_strongly_typed_flag_on_tensorrt_10(tmp_path: Path, fake_trt, monkeypatch) -> None:
    monkeypatch.setattr(fake_trt, "__version__", "10.16.1.11")
    _build(write_bundle(tmp_path / "b"))
    assert {b.network_flags for b in FakeBuilder.created} == {1 << 1}


def test_timing_cache_is_merged_not_overwritten(tmp_path: Path, fake_trt) -> None:
    bundle = write_bundle(tmp_path / "b")
    path = tmp_path / "shared.cache"
    path.write_bytes(json.dumps(["from-another-build"]).encode())
    _build(bundle, timing_cache=path)
    entries = set(json.loads(path.read_bytes()))
    assert entries == {"from-another-build", "tactic-x-3"}  # both networks' first input is x
    assert not list(tmp_path.glob("*.tmp"))


def test_ctrl_c_cancels_the_build(tmp_path: Path, fake_trt, capsys) -> None:
    """Item 6: Ctrl-C during build_serialized_network cancels through the progress monitor.

    The signal arrives while TensorRT (the fake's C++-like loop) runs; before the fix it was lost
    there and the build went on to record an engine (or, with a monitor, was reported as
    "could not build an engine"). Now it raises KeyboardInterrupt and records nothing.
    """
    bundle = write_bundle(tmp_path / "b")
    FakeBuilder.on_step = lambda step: signal.raise_signal(signal.SIGINT) if step == 1 else None
    with pytest.raises(KeyboardInterrupt):
        build_engines(bundle, BuildOptions(progress=True), echo=lambda s: None)
    assert cache.read_manifest(bundle)["engines"] == {}
    assert not list(cache.engine_dir(bundle).glob("*.engine"))
    assert "cancelling the build" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is removed again


def test_ctrl_c_cancels_without_progress_display(tmp_path: Path, fake_trt) -> None:
    bundle = write_bundle(tmp_path / "b")
    FakeBuilder.on_step = lambda step: signal.raise_signal(signal.SIGINT) if step == 2 else None
    with pytest.raises(KeyboardInterrupt):
        _build(bundle)
    assert cache.read_manifest(bundle)["engines"] == {}


def test_failed_build_reports_tensorrt_errors(tmp_path: Path, fake_trt, monkeypatch) -> None:
    def fail(self, network, config):
        self.logger.log(lean.ILogger.Severity.ERROR, "out of memory while building tactic 7")
        return None

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", fail)
    with pytest.raises(BackendError, match="could not build an engine from backbone.onnx: out of memory while "
                                            "building tactic 7.*--workspace-mb"):
        _build(write_bundle(tmp_path / "b"))


def test_builder_factory_failure_is_one_error(tmp_path: Path, fake_trt, monkeypatch) -> None:
    """Item 2 for the Builder: the factory's TypeError (nullptr) after a CUDA failure is a BackendError."""
    def factory(logger):
        logger.log(lean.ILogger.Severity.ERROR, "createInferBuilder: Error Code 6: API Usage Error (CUDA initialization "
                                                "failure with error: 35 In checkCudaInstallation)")
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(fake_trt, "Builder", factory)
    with pytest.raises(BackendError, match="could not initialise CUDA \\(CUDA initialization failure with error: 35\\)"):
        _build(write_bundle(tmp_path / "b"))


def test_engine_bytes_are_what_the_builder_returned(tmp_path: Path, fake_trt) -> None:
    records = _build(write_bundle(tmp_path / "b"))
    for record in records:
        entry = cache.read_manifest(tmp_path / "b")["engines"][record.key]
        assert cache.read_engine(tmp_path / "b", entry) == record.path.read_bytes()
        assert entry["tensorrt_version"] == lean.__version__ and entry["builder"]["tf32"] is False
    assert np.all([r.size_bytes > 0 for r in records])
