"""TensorRT engine logic that needs no GPU: profiles, cache keys, manifest, refusal, version switches.

Fakes of the tensorrt API appear only where the thing under test is the version-switching or
error-formatting logic (compat.py); everything else runs the real code on real files. Time
convention of the fixture networks: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anchorflow.base._deps import available
from anchorflow.engines import cache, compat
from anchorflow.engines.build import BuildOptions, ProgressDisplay
from anchorflow.engines.profiles import (
    SampleRange, derive_profiles, network_specs, profile_for, read_bundle, row_ranges, sample_range,
)
from anchorflow.base.errors import BackendError, CheckpointError, ConfigError, MissingDependencyError

STATE = (1, 4, 4)
CLASSES = 3  # labels 0..2, null label 3


# -- a real tiny bundle (ONNX via onnx.helper, bundle.json in the export's layout) -----------------
def _graphs():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def inp(name, shape, ty=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, ty, shape)

    emb = numpy_helper.from_array(np.linspace(-0.5, 0.5, CLASSES + 1, dtype=np.float32), "emb")
    shape4 = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    common = [helper.make_node("Gather", ["emb", "y"], ["e"]), helper.make_node("Reshape", ["e", "shape4"], ["e4"]),
              helper.make_node("Reshape", ["t", "shape4"], ["t4"])]
    x, t, y = inp("x", ["batch", *STATE]), inp("t", ["batch"]), inp("y", ["batch"], TensorProto.INT64)
    # backbone: v = 0.5 x + t + emb[y]   (a smooth, label-dependent field)
    bb = helper.make_graph(common + [
        helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Add", ["hx", "t4"], ["a"]),
        helper.make_node("Add", ["a", "e4"], ["v"]),
    ], "backbone", [x, t, y], [inp("v", ["batch", *STATE])], [emb, shape4, half])
    # sidenet: delta = h * (0.5 (v - x) + emb[y] t)   (delta = 0 at h = 0, as the spec requires)
    sn = helper.make_graph(common + [
        helper.make_node("Reshape", ["h", "shape4"], ["h4"]), helper.make_node("Sub", ["v", "x"], ["d"]),
        helper.make_node("Mul", ["d", "half"], ["hd"]), helper.make_node("Mul", ["e4", "t4"], ["et"]),
        helper.make_node("Add", ["hd", "et"], ["s"]), helper.make_node("Mul", ["s", "h4"], ["delta"]),
    ], "sidenet", [x, inp("v", ["batch", *STATE]), t, inp("h", ["batch"]), y],
        [inp("delta", ["batch", *STATE])], [emb, shape4, half])
    opset = [helper.make_opsetid("", 17)]
    return {name: helper.make_model(g, opset_imports=opset, ir_version=8) for name, g in (("backbone", bb), ("sidenet", sn))}


def _tensor_entries(graph_io) -> list:
    from onnx import helper

    return [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
             "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name} for v in graph_io]


ROWS = {"backbone": (1, 8, 32), "sidenet": (1, 32, 128)}  # rows for 16 samples per solve (x2, x8), opt at 4 samples


def write_bundle(folder: Path, rows=ROWS, null_label=CLASSES, precisions=()) -> Path:
    """Write a real two-network bundle (fp32 + optional fp16/bf16 variants with float32 I/O) to ``folder``.

    Variants come from the exporter's own converter (``anchorflow.export.precision.convert``), so
    engines are built from the graphs the product ships.

    ``rows``: each network's batch range in rows, as bundle.json records it (a network missing
    from ``rows`` gets no range).
    """
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    networks = {}
    for name, model in _graphs().items():
        onnx.checker.check_model(model, full_check=True)
        files = {"fp32": model}
        if precisions:
            from anchorflow.export.precision import convert

            files.update({p: convert(model, p) for p in precisions})
        entry = {"inputs": _tensor_entries(model.graph.input), "outputs": _tensor_entries(model.graph.output),
                 "precisions": {}}
        if name in rows:
            entry["batch"] = dict(zip(("min", "opt", "max"), rows[name]))
        for precision, m in files.items():
            file = f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx"
            data = m.SerializeToString()
            (folder / file).write_bytes(data)
            ref = {"file": file, "sha256": hashlib.sha256(data).hexdigest()}
            entry.update(ref) if precision == "fp32" else entry["precisions"].__setitem__(precision, ref)
        networks[name] = entry
    meta = {"schema": "anchorflow.bundle/1", "networks": networks,
            "model": {"state_shape": list(STATE), "num_classes": CLASSES, "null_label": null_label},
            "time_convention": "t = 1 noise, t = 0 data"}
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


ENV = cache.EngineEnv("10.3.0", "Orin", (8, 7))


def _key(bundle: Path, network="backbone", precision="fp32", env=ENV) -> cache.EngineKey:
    _, meta = read_bundle(bundle)
    spec = network_specs(meta)[network]
    return cache.EngineKey(network, precision, spec.sha256, derive_profiles(meta)[network].to_json(), env,
                           BuildOptions().builder_fields())


# -- profiles -------------------------------------------------------------------------------------
def test_profiles_take_the_bundles_row_ranges(tmp_path: Path) -> None:
    _, meta = read_bundle(write_bundle(tmp_path / "b", rows={"backbone": (1, 6, 10), "sidenet": (2, 20, 30)}))
    profiles = derive_profiles(meta)
    assert profiles["backbone"].rows == (1, 6, 10) and profiles["sidenet"].rows == (2, 20, 30)
    assert profiles["backbone"].shapes["x"] == ((1, *STATE), (6, *STATE), (10, *STATE))
    assert profiles["sidenet"].shapes["h"] == ((2,), (20,), (30,))
    assert set(profiles["sidenet"].shapes) == {"x", "v", "t", "h", "y"}


def test_sidenet_without_range_gets_probe_rows(tmp_path: Path) -> None:
    _, meta = read_bundle(write_bundle(tmp_path / "b", rows={"backbone": (1, 8, 32)}))
    assert derive_profiles(meta)["sidenet"].rows == (1, 32, 128)  # 4 offsets (BA merged probe) x backbone rows


def test_profiles_from_samples_guided(bundle: Path) -> None:
    _, meta = read_bundle(bundle)
    assert sample_range(meta) == SampleRange(1, 4, 16)  # backbone rows / 2 (guidance)
    profiles = derive_profiles(meta, SampleRange(2, 4, 16))  # guidance doubles rows, BA's merged probe x 4
    assert profiles["backbone"].rows == (2, 8, 32) and profiles["sidenet"].rows == (2, 32, 128)


def test_profiles_from_samples_unguided(tmp_path: Path) -> None:
    _, meta = read_bundle(write_bundle(tmp_path / "b", rows={"backbone": (1, 4, 16)}, null_label=None))
    assert sample_range(meta) == SampleRange(1, 4, 16)
    rows = {k: p.rows for k, p in derive_profiles(meta, sample_range(meta, max=8)).items()}
    assert rows == {"backbone": (1, 4, 8), "sidenet": (1, 16, 32)}


@pytest.mark.parametrize("method, cfg, samples", [("ba", 1.5, 16), ("ba", 1.0, 1), ("ba-single", 1.5, 16), ("euler", 1.5, 16)])
def test_profiles_cover_the_solvers_calls(bundle: Path, method: str, cfg: float, samples: int) -> None:
    """Every row count the real runtime sends to the networks lies inside the derived profiles."""
    from anchorflow.runtime import solve

    _, meta = read_bundle(bundle)  # ROWS: what the exporter writes for 16 samples per solve
    rows = {name: p.rows for name, p in derive_profiles(meta).items()}
    seen = {"backbone": [], "sidenet": []}

    def velocity(x, t, y):
        seen["backbone"].append(x.shape[0])
        return -x

    def sidenet(x, v, t, h, y):
        seen["sidenet"].append(x.shape[0])
        return np.zeros_like(x)

    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, samples)
    solve(method, velocity, rng.standard_normal((samples, *STATE)).astype(np.float32), 4, y=y, sidenet=sidenet,
          cfg_scale=cfg, null_label=CLASSES)
    for name, counts in seen.items():
        lo, _, hi = rows[name]
        assert all(lo <= c <= hi for c in counts), (name, counts, rows[name])
    assert seen["backbone"]


def test_batch_overrides_and_validation(bundle: Path) -> None:
    _, meta = read_bundle(bundle)  # samples (1, 4, 16)
    assert sample_range(meta, max=2) == SampleRange(1, 2, 2)  # opt clamped into the new range
    assert sample_range(meta, min=2, opt=3, max=5) == SampleRange(2, 3, 5)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        sample_range(meta, min=8, max=4)
    with pytest.raises(ConfigError, match="guidance"):
        row_ranges(SampleRange(1, 1, 1), guidance=3)
    meta["networks"]["backbone"]["batch"] = {"min": 4, "opt": 2, "max": 8}
    with pytest.raises(CheckpointError, match="backbone.batch .* min <= opt <= max"):
        derive_profiles(meta)


def test_profile_refuses_an_axis_without_range(bundle: Path) -> None:
    """A /1 bundle declares no axes: a dynamic state axis there cannot get a profile (tests/test_engines_profiles.py has /2)."""
    _, meta = read_bundle(bundle)
    spec = network_specs(meta)["backbone"]
    x = spec.inputs[0]
    spec = type(spec)(**{**spec.__dict__, "inputs": (type(x)(**{**x.__dict__, "shape": ("batch", 1, "height", 4)}),
                                                     *spec.inputs[1:])})
    with pytest.raises(ConfigError, match="declares no range for axis 'height'"):
        profile_for(spec, (1, 2, 3))


def test_profile_names_match_the_onnx_inputs(bundle: Path) -> None:
    """bundle.json's I/O description and the ONNX graph TensorRT will parse agree (names and static dims)."""
    import onnx

    _, meta = read_bundle(bundle)
    for name, profile in derive_profiles(meta).items():
        graph = onnx.load(bundle / f"{name}.onnx").graph
        dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in graph.input}
        assert {k: list(s[2][1:]) for k, s in profile.shapes.items()} == dims


def test_bundle_reading_errors(tmp_path: Path, bundle: Path) -> None:
    root = tmp_path / "root"
    write_bundle(root / "bundle")
    assert read_bundle(root)[0] == root / "bundle"  # a model root with bundle/ inside
    with pytest.raises(CheckpointError, match="no bundle.json"):
        read_bundle(tmp_path / "nowhere")
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "schema": "other/9"}))
    with pytest.raises(CheckpointError, match="schema"):
        read_bundle(bundle)
    with pytest.raises(ConfigError, match="--precision bf16"):
        network_specs(meta)["backbone"].entry("bf16")


# -- cache keys and manifest -------------------------------------------------------------------------
def test_cache_key_is_stable(bundle: Path) -> None:
    a, b = _key(bundle), _key(bundle)
    assert a.name == b.name and a.name.startswith("backbone-fp32-") and len(a.digest) == 64
    shuffled = dict(reversed(list(a.profile.items())))
    assert cache.EngineKey(a.network, a.precision, a.onnx_sha256, shuffled, a.env, a.builder).digest == a.digest


@pytest.mark.parametrize("change", [
    dict(network="sidenet"), dict(precision="fp16"), dict(onnx_sha256="0" * 64),
    dict(profile={"rows": [1, 8, 64]}), dict(env=cache.EngineEnv("11.1.0", "Orin", (8, 7))),
    dict(env=cache.EngineEnv("10.3.0", "Orin", (9, 0))), dict(env=cache.EngineEnv("10.3.0", "H100", (8, 7))),
    # every builder option
    dict(builder=BuildOptions(opt_level=5).builder_fields()), dict(builder=BuildOptions(workspace_mb=512).builder_fields()),
    dict(builder=BuildOptions(tf32=True).builder_fields()), dict(builder=BuildOptions(refittable=True).builder_fields()),
    dict(builder=BuildOptions(refittable=True, strip_weights=True).builder_fields()),
])
def test_cache_key_changes_with_every_component(bundle: Path, change: dict) -> None:
    base = _key(bundle)
    fields = {"network": base.network, "precision": base.precision, "onnx_sha256": base.onnx_sha256,
              "profile": base.profile, "env": base.env, "builder": base.builder, **change}
    assert cache.EngineKey(**fields).digest != base.digest


def test_cache_key_holds_every_build_option() -> None:
    """Every field of BuildOptions that reaches the builder is in the key; the rest are listed as not affecting it."""
    import dataclasses

    not_in_key = {"precisions", "batch", "force", "timing_cache", "progress"}  # precision/profile are key fields of their own
    not_in_key |= {"refit"}  # a refit engine's key gets builder.refit_of instead (engines/refit.py)
    options = {f.name for f in dataclasses.fields(BuildOptions)}
    assert options - not_in_key == set(BuildOptions(refittable=True, strip_weights=True).builder_fields())
    assert cache.KEY_VERSION == 2


def test_manifest_round_trip(bundle: Path) -> None:
    key, other = _key(bundle), _key(bundle, "sidenet")
    path = cache.record_engine(bundle, key, b"engine-bytes", 12.5, onnx_file="backbone.onnx")
    cache.record_engine(bundle, other, b"other", 1.0)
    manifest = json.loads((cache.engine_dir(bundle) / cache.MANIFEST).read_text())
    entry = manifest["engines"][key.name]
    assert manifest["schema"] == cache.SCHEMA and set(manifest["engines"]) == {key.name, other.name}
    assert entry["size_bytes"] == 12 and entry["build_seconds"] == 12.5 and entry["onnx_file"] == "backbone.onnx"
    assert entry["sha256"] == hashlib.sha256(b"engine-bytes").hexdigest()
    assert entry["tensorrt_version"] == "10.3.0" and entry["compute_capability"] == [8, 7]
    assert path == cache.engine_dir(bundle) / f"{key.name}.engine" and cache.cached(bundle, key) == path
    assert cache.read_engine(bundle, entry) == b"engine-bytes"
    assert not [p for p in cache.engine_dir(bundle).iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing


def test_tampered_engine_is_refused(bundle: Path) -> None:
    key = _key(bundle)
    path = cache.record_engine(bundle, key, b"engine-bytes", 1.0)
    path.write_bytes(b"engine-bytez")
    assert cache.cached(bundle, key) is None  # a build would replace it
    with pytest.raises(CheckpointError, match="manifest sha256"):
        cache.read_engine(bundle, cache.read_manifest(bundle)["engines"][key.name])


def test_foreign_manifest_is_refused(bundle: Path) -> None:
    folder = cache.engine_dir(bundle)
    folder.mkdir(parents=True)
    (folder / cache.MANIFEST).write_text(json.dumps({"schema": "someone-else/1", "engines": {}}))
    with pytest.raises(CheckpointError, match="not an anchorflow TensorRT manifest"):
        cache.read_manifest(bundle)


def test_matching_engine_is_selected(bundle: Path) -> None:
    key = _key(bundle)
    path = cache.record_engine(bundle, key, b"x", 1.0)
    assert cache.select_engine(bundle, "backbone", "fp32", key.onnx_sha256, ENV) == (path, cache.read_manifest(bundle)["engines"][key.name])


@pytest.mark.parametrize("env, reason", [
    (cache.EngineEnv("11.1.0", "Orin", (8, 7)), "built with TensorRT 10.3.0, this is TensorRT 11.1.0"),
    (cache.EngineEnv("10.3.0", "NVIDIA H100", (9, 0)), r"built for Orin \(sm_87\), this GPU is NVIDIA H100 \(sm_90\)"),
])
def test_mismatched_engine_is_refused(bundle: Path, env: cache.EngineEnv, reason: str) -> None:
    key = _key(bundle)
    cache.record_engine(bundle, key, b"x", 1.0)
    with pytest.raises(BackendError, match=reason) as info:
        cache.select_engine(bundle, "backbone", "fp32", key.onnx_sha256, env)
    assert f"anchorflow build {bundle} --precision fp32 --force" in str(info.value)


def test_engine_from_other_onnx_or_missing_is_refused(bundle: Path) -> None:
    key = _key(bundle)
    cache.record_engine(bundle, key, b"x", 1.0)
    with pytest.raises(BackendError, match="different ONNX file"):
        cache.select_engine(bundle, "backbone", "fp32", "f" * 64, ENV)
    with pytest.raises(BackendError, match="no TensorRT fp16 engine for the backbone.*anchorflow build"):
        cache.select_engine(bundle, "backbone", "fp16", key.onnx_sha256, ENV)


def test_incomplete_manifest_entry_is_refused(bundle: Path) -> None:
    key = _key(bundle)
    cache.record_engine(bundle, key, b"x", 1.0)
    path = cache.engine_dir(bundle) / cache.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["engines"][key.name]["compute_capability"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="manifest entry is incomplete.*--force"):
        cache.select_engine(bundle, "backbone", "fp32", key.onnx_sha256, ENV)


def test_timing_cache_is_per_version_and_gpu(bundle: Path) -> None:
    paths = {cache.timing_cache_path(bundle, e) for e in (ENV, cache.EngineEnv("11.1.0", "Orin", (8, 7)),
                                                           cache.EngineEnv("10.3.0", "Orin", (9, 0)))}
    assert len(paths) == 3 and all(p.parent == cache.engine_dir(bundle) for p in paths)


# -- TensorRT version switches (compat) ----------------------------------------------------------------
def _fake_trt(version: str, **attrs) -> SimpleNamespace:
    return SimpleNamespace(__version__=version, **attrs)


def test_network_flags_per_version() -> None:
    flags10 = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    assert compat.network_flags(_fake_trt("10.3.0", NetworkDefinitionCreationFlag=flags10)) == 1 << 1
    # 11.x: strongly typed is the default; no flag is read (EXPLICIT_BATCH is gone)
    assert compat.network_flags(_fake_trt("11.1.0")) == 0
    with pytest.raises(BackendError, match="too old"):
        compat.network_flags(_fake_trt("8.6.1", NetworkDefinitionCreationFlag=flags10))
    with pytest.raises(BackendError, match="STRONGLY_TYPED"):
        compat.network_flags(_fake_trt("10.0.0", NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0)))


def test_version_parsing() -> None:
    assert compat.version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert compat.version_tuple("11.1.0rc1") == (11, 1, 0)
    with pytest.raises(BackendError):
        compat.version_tuple("dev")


def test_precision_needs_compute_capability() -> None:
    compat.check_precision("fp16", (7, 5))
    compat.check_precision("bf16", (8, 0))
    with pytest.raises(BackendError, match="bf16 engines need .* >= 8.0, this one is sm_75"):
        compat.check_precision("bf16", (7, 5))


def test_progress_monitor_switch() -> None:
    display = ProgressDisplay(stream=io.StringIO(), use_tqdm=False)
    assert compat.progress_monitor(_fake_trt("10.3.0"), display) is None  # no IProgressMonitor in this module

    class Base:  # the interface's shape: subclasses implement the three callbacks
        def __init__(self) -> None:
            pass

    monitor = compat.progress_monitor(_fake_trt("10.3.0", IProgressMonitor=Base), display)
    monitor.phase_start("Building engine", None, 2)
    assert monitor.step_complete("Building engine", 0) is True
    monitor.phase_finish("Building engine")
    assert monitor.step_complete("unknown phase", 0) is True
    display.phase_start = None  # a failing display cancels the build instead of raising into TensorRT
    monitor.phase_start("x", None, 1)
    assert monitor.step_complete("Building engine", 1) is False


# -- parser errors -------------------------------------------------------------------------------------
class _Err:
    def __init__(self, code, desc, node, name=None, op=None):
        self._v = dict(code=SimpleNamespace(name=code), desc=desc, node=node)
        if name is not None:  # TensorRT >= 10 exposes node_name / node_operator
            self.node_name = lambda: name
            self.node_operator = lambda: op

    def code(self):
        return self._v["code"]

    def desc(self):
        return self._v["desc"]

    def node(self):
        return self._v["node"]


def test_parser_error_report() -> None:
    errors = [_Err("UNSUPPORTED_NODE", "No importer registered for op: FooNorm", 7, "blocks.0/norm", "FooNorm"),
              _Err("INVALID_GRAPH", "graph has no outputs", -1), _Err("INVALID_NODE", "bad attribute", 3)]
    parser = SimpleNamespace(num_errors=len(errors), get_error=lambda i: errors[i])
    issues = compat.parser_issues(parser)
    assert issues[0] == compat.ParserIssue("UNSUPPORTED_NODE", "No importer registered for op: FooNorm", 7, "blocks.0/norm", "FooNorm")
    text = compat.format_parser_errors("/b/backbone.onnx", issues)
    lines = text.splitlines()
    assert lines[0] == "TensorRT could not parse backbone.onnx (3 errors):"
    assert lines[1] == "  node 7 FooNorm 'blocks.0/norm': No importer registered for op: FooNorm [UNSUPPORTED_NODE]"
    assert lines[2] == "  graph: graph has no outputs [INVALID_GRAPH]"
    assert lines[3] == "  node 3: bad attribute [INVALID_NODE]"
    assert "anchorflow export" in lines[-1]


def test_numpy_dtypes_of_engine_io() -> None:
    assert compat.numpy_dtype(SimpleNamespace(name="HALF")) == np.float16
    assert compat.numpy_dtype("DataType.INT64") == np.int64
    with pytest.raises(BackendError, match="BF16 has no numpy equivalent"):
        compat.numpy_dtype(SimpleNamespace(name="BF16"))


# -- progress display and options -------------------------------------------------------------------------
@pytest.mark.parametrize("use_tqdm", [False, True])
def test_progress_display(use_tqdm: bool) -> None:
    out = io.StringIO()
    display = ProgressDisplay(stream=out, use_tqdm=use_tqdm, label="backbone fp16: ")
    display.phase_start("Building engine", None, 3)
    display.phase_start("Tactic search", "Building engine", 2)
    for step in range(2):
        assert display.step_complete("Tactic search", step)
    display.phase_finish("Tactic search")
    display.cancel()
    assert display.step_complete("Building engine", 0) is False  # cancellation reaches TensorRT
    display.phase_finish("Building engine")
    text = out.getvalue()
    assert "backbone fp16: Building engine" in text and "Tactic search" in text and "2/2" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(precisions=("int4",)), "precision must be one of"), (dict(opt_level=7), "0..5"), (dict(workspace_mb=0), "positive"),
])
def test_build_options_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BuildOptions(**kwargs)


# -- without tensorrt -----------------------------------------------------------------------------------------
needs_no_trt = pytest.mark.skipif(available("tensorrt"), reason="tensorrt is installed here; this checks the error without it")


@needs_no_trt
def test_cli_build_without_tensorrt(bundle: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "build", str(bundle), "--precision", "fp16"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: tensorrt is needed") and "pip install 'anchorflow[trt]'" in lines[0]
    assert not cache.engine_dir(bundle).exists()


@needs_no_trt
def test_loading_engines_without_tensorrt(bundle: Path) -> None:
    from anchorflow.engines.runner import TrtEngines
    from anchorflow.runtime import load_bundle

    with pytest.raises(MissingDependencyError, match=r"pip install 'anchorflow\[trt\]'"):
        TrtEngines.load(bundle)
    with pytest.raises(MissingDependencyError, match=r"pip install 'anchorflow\[trt\]'"):
        load_bundle(bundle, backend="trt")


def test_engines_import_is_light() -> None:
    code = ("import sys, anchorflow.engines.build, anchorflow.engines.runner, anchorflow.engines.cache, "
            "anchorflow.commands.build; import anchorflow.engines as e; e.TrtEngines; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'cuda', 'onnx') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- the GPU module must not pass as "skipped" on a GPU machine whose install is broken --
@pytest.mark.skipif(available("tensorrt"), reason="tensorrt is installed here; the GPU module really runs")
@pytest.mark.parametrize("require", ["0", "1"])
def test_gpu_module_fails_instead_of_skipping_when_required(require: str) -> None:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "ANCHORFLOW_REQUIRE_GPU": require, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           str(tests / "test_engines_gpu.py")], capture_output=True, text=True, env=env,
                          cwd=tests.parent, timeout=300)
    if require == "0":
        assert proc.returncode in (0, 5) and "1 skipped" in proc.stdout, proc.stdout[-2000:]  # 5: nothing ran
    else:
        assert proc.returncode not in (0, 5) and "ANCHORFLOW_REQUIRE_GPU=1 but TensorRT is not installed" in proc.stdout, \
            proc.stdout[-2000:]
