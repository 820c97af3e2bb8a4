"""TensorRT optimisation profiles for bundles with declared dynamic axes.

Bundles of schema ``anchorflow.bundle/2`` declare every input's shape with axis names and a range
per named axis (latent ``H``/``W``, text length ``L``); inputs may lack a batch axis. The profiles
must cover every such axis with min/opt/max from those ranges, opt below max, and the cache key
must change with the resolution. The expected shapes below are written out from the declared
ranges by hand (the independent truth), not computed by the code under test.
"""

from __future__ import annotations

import copy
import pytest

from anchorflow.engines import cache
from anchorflow.engines.build import BuildOptions
from anchorflow.engines.profiles import (
    SampleRange, derive_profiles, network_specs, opt_below_max, profile_for, read_bundle,
)
from anchorflow.base.errors import ConfigError
from anchorflow.runtime.bundles.format import SCHEMA

SHA = "0" * 64


def _net(inputs: list, batch: tuple, axes: dict) -> dict:
    return {"file": "backbone.onnx", "sha256": SHA, "inputs": inputs,
            "outputs": [{"name": "v", "dtype": "float32", "shape": ["batch", 16, "H", "W"], "role": "velocity"}],
            "batch": dict(zip(("min", "opt", "max"), batch)),
            "axes": {k: dict(zip(("min", "opt", "max"), v)) for k, v in axes.items()}}


def sd3_like(batch=(1, 8, 16), axes=None) -> dict:
    """A /2 bundle.json like an SD3 export: latent H/W and text length L dynamic, a pooled vector, ids without batch."""
    axes = axes or {"H": (32, 64, 128), "W": (32, 64, 128), "L": (1, 77, 256)}
    inputs = [
        {"name": "x", "dtype": "float32", "shape": ["batch", 16, "H", "W"], "role": "state"},
        {"name": "t", "dtype": "float32", "shape": ["batch"], "role": "time"},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", "L", 64], "role": "condition"},
        {"name": "pooled_projections", "dtype": "float32", "shape": ["batch", 32], "role": "condition"},
        {"name": "img_ids", "dtype": "float32", "shape": [7, 3], "role": "condition", "per_row": False},
    ]
    return {"schema": SCHEMA, "model": {"name": "sd3-tiny", "state_shape": [16, 64, 64]},
            "time": {"map": "scale", "scale": 1000.0}, "guidance": {"mode": "rows", "null": {}},
            "networks": {"backbone": _net(inputs, batch, axes)}}


def test_every_dynamic_axis_gets_min_opt_max_from_the_declared_ranges() -> None:
    profile = derive_profiles(sd3_like())["backbone"]
    assert profile.shapes["x"] == ((1, 16, 32, 32), (8, 16, 64, 64), (16, 16, 128, 128))
    assert profile.shapes["encoder_hidden_states"] == ((1, 1, 64), (8, 77, 64), (16, 256, 64))
    assert profile.shapes["pooled_projections"] == ((1, 32), (8, 32), (16, 32))
    assert profile.shapes["t"] == ((1,), (8,), (16,))
    assert profile.shapes["img_ids"] == ((7, 3), (7, 3), (7, 3))  # no batch axis: static
    assert profile.axes == {"batch": (1, 8, 16), "H": (32, 64, 128), "W": (32, 64, 128), "L": (1, 77, 256)}


def test_opt_is_moved_below_max() -> None:
    """Declared opt == max: rows go to the expected batch (16 samples, x2 guided rows); axes to half max on the grid."""
    meta = sd3_like(batch=(1, 64, 64), axes={"H": (32, 128, 128), "W": (48, 96, 96), "L": (77, 77, 77)})
    profile = derive_profiles(meta)["backbone"]
    assert profile.rows == (1, 32, 64)
    assert profile.axes["H"] == (32, 64, 128)  # gcd 32: 64
    assert profile.axes["W"] == (48, 48, 96)  # gcd 48: 48
    assert profile.axes["L"] == (77, 77, 77)  # a static-sized axis keeps opt == max == min
    assert all(opt < hi for lo, opt, hi in profile.axes.values() if lo < hi)
    assert opt_below_max((1, 128, 128), expected=32) == (1, 32, 128)
    assert opt_below_max((1, 128, 128), expected=500) == (1, 127, 128)
    assert opt_below_max((2, 10, 10)) == (2, 4, 10)  # gcd 2: 4 at or below 5


def test_digits_bundle_profiles_have_opt_below_max() -> None:
    from anchorflow.modelref import locate

    _, meta = read_bundle(locate("default").bundle)  # batch 1/128/128, SideNet 1/512/512 (4 offsets x 128)
    rows = {n: p.rows for n, p in derive_profiles(meta).items()}
    assert rows == {"backbone": (1, 32, 128), "sidenet": (1, 128, 512)}  # opt: 4 merged-probe offsets x 32


def test_explicit_opt_is_kept() -> None:
    meta = sd3_like(batch=(1, 8, 32))
    profile = derive_profiles(meta, SampleRange(1, 16, 16), explicit_opt=True)["backbone"]
    assert profile.rows == (1, 32, 32)


def test_batch_options_must_stay_inside_the_exported_rows() -> None:
    meta = sd3_like(batch=(2, 8, 16))
    with pytest.raises(ConfigError, match="exported for 2..16 rows per call.*1..32 rows"):
        derive_profiles(meta, SampleRange(1, 4, 16))
    assert derive_profiles(meta, SampleRange(2, 4, 8))["backbone"].rows == (2, 8, 16)


def test_axis_without_a_declared_range_is_refused() -> None:
    from anchorflow.runtime.bundles.format import parse_meta

    meta = sd3_like()
    spec = network_specs(meta)["backbone"]
    spec = type(spec)(**{**spec.__dict__, "axes": {k: v for k, v in spec.axes.items() if k != "L"}})
    with pytest.raises(ConfigError, match="declares no range for axis 'L'"):
        profile_for(spec, (1, 8, 16))
    assert parse_meta  # the schema itself refuses such a /2 bundle too (checked by the bundle-format tests)


def test_cache_key_changes_with_the_resolution() -> None:
    env = cache.EngineEnv("11.4.0", "NVIDIA H200", (9, 0))

    def key(meta: dict) -> str:
        return cache.EngineKey("backbone", "fp32", SHA, derive_profiles(meta)["backbone"].to_json(), env,
                               BuildOptions().builder_fields()).digest

    base = sd3_like()
    wider = copy.deepcopy(base)
    wider["networks"]["backbone"]["axes"]["H"]["max"] = 256
    longer = copy.deepcopy(base)
    longer["networks"]["backbone"]["axes"]["L"]["opt"] = 128
    assert len({key(base), key(wider), key(longer)}) == 3
    assert derive_profiles(wider)["backbone"].to_json()["axes"]["H"] == [32, 64, 256]


def test_runner_names_the_axis_outside_the_profile() -> None:
    from anchorflow.engines.runner import check_shape
    from anchorflow.base.errors import BackendError

    lo, hi = (1, 1, 64), (16, 256, 64)  # encoder_hidden_states: rows 1..16, L 1..256
    check_shape("backbone fp16", "encoder_hidden_states", (16, 256, 64), lo, hi)
    with pytest.raises(BackendError, match="takes 1..16 rows of 'encoder_hidden_states', got 17.*--max-batch"):
        check_shape("backbone fp16", "encoder_hidden_states", (17, 77, 64), lo, hi)
    with pytest.raises(BackendError, match="takes 1..256 dimension 1 of 'encoder_hidden_states', got 300.*re-export"):
        check_shape("backbone fp16", "encoder_hidden_states", (2, 300, 64), lo, hi)
    with pytest.raises(BackendError, match="3 dimensions"):
        check_shape("backbone fp16", "encoder_hidden_states", (2, 64), lo, hi)


def test_engine_identity_covers_external_weights(tmp_path) -> None:
    """Networks over 2 GB keep weights next to the .onnx: a changed weights file is a different engine."""
    import hashlib
    from types import SimpleNamespace

    from anchorflow.base.errors import CheckpointError

    (tmp_path / "backbone.onnx").write_bytes(b"graph")
    (tmp_path / "backbone.onnx.data").write_bytes(b"weights")
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    entry = {"file": "backbone.onnx", "sha256": sha(b"graph"),
             "external_data": [{"file": "backbone.onnx.data", "sha256": sha(b"weights")}]}
    spec = SimpleNamespace(name="backbone", entry=lambda precision: entry)
    path, identity = cache.onnx_file(tmp_path, spec, "fp32")
    assert path == (tmp_path / "backbone.onnx").resolve() and identity == cache.onnx_identity(spec, "fp32")
    assert identity not in (sha(b"graph"), sha(b"weights"))
    entry["external_data"][0]["sha256"] = sha(b"other weights")
    assert cache.onnx_identity(spec, "fp32") != identity
    with pytest.raises(CheckpointError, match="backbone.onnx.data does not match"):
        cache.onnx_file(tmp_path, spec, "fp32")
    plain = SimpleNamespace(name="backbone", entry=lambda p: {"file": "backbone.onnx", "sha256": sha(b"graph")})
    assert cache.onnx_file(tmp_path, plain, "fp32")[1] == sha(b"graph")
