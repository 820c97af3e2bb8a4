"""Refittable TensorRT engines (`build --refittable / --strip-weights / --refit`) without a GPU.

What needs no GPU is checked against the real TensorRT lean bindings (BuilderFlag, Weights,
Refitter's method names) and Polygraphy's real ``CreateConfig``; the refit loop runs on a refitter
that records its calls (the lean runtime cannot create an engine without a driver). No GPU was
available to this project: the end-to-end refit on a GPU (build --refittable, refit --lora, build
--refit, compare with ORT) is the recipe in docs/lora.md, not a test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

lean = pytest.importorskip("tensorrt_lean", reason="the TensorRT lean runtime is not installed (pip install -e '.[dev]')")

from anchorflow.engines import cache, compat  # noqa: E402
from anchorflow.engines.build import BuildOptions  # noqa: E402
from anchorflow.engines.refit import base_entry, fill_weights, refit_key  # noqa: E402
from anchorflow.base.errors import BackendError, ConfigError  # noqa: E402

ENV = cache.EngineEnv("11.4.0", "NVIDIA H100", (9, 0))
PROFILE = {"x": [[1, 1, 8, 8], [4, 1, 8, 8], [8, 1, 8, 8]]}


def test_refit_flags_exist_in_the_real_bindings_and_reach_polygraphy():
    from polygraphy.backend.trt import CreateConfig

    for flag in ("REFIT", "STRIP_PLAN"):
        assert hasattr(lean.BuilderFlag, flag)
    assert hasattr(lean, "Refitter") and {"get_all_weights", "set_named_weights", "refit_cuda_engine"} <= set(
        dir(lean.Refitter))
    plain = compat.config_kwargs(lean, workspace_bytes=None, opt_level=3, tf32=False)
    refit = compat.config_kwargs(lean, workspace_bytes=None, opt_level=3, tf32=False, refittable=True)
    strip = compat.config_kwargs(lean, workspace_bytes=None, opt_level=3, tf32=False, refittable=True, strip=True)
    assert "refittable" not in plain and refit["refittable"] and "strip_plan" not in refit and strip["strip_plan"]
    config = CreateConfig(**strip)
    assert config.refittable and config.strip_plan


def test_plain_engine_keys_are_unchanged_and_refit_keys_differ():
    plain = BuildOptions().builder_fields()
    assert plain == {"opt_level": 3, "workspace_mb": None, "tf32": False}  # keys of existing caches stay valid
    refittable = BuildOptions(refittable=True).builder_fields()
    stripped = BuildOptions(refittable=True, strip_weights=True).builder_fields()
    keys = {json.dumps(b, sort_keys=True) for b in (plain, refittable, stripped)}
    assert len(keys) == 3
    fresh = cache.EngineKey("backbone", "fp32", "a" * 64, PROFILE, ENV, refittable)
    base = {"file": "backbone-fp32-0123456789abcdef.engine", "builder": refittable}
    refit = refit_key(fresh, base)
    assert refit.builder["refit_of"] == "backbone-fp32-0123456789abcdef"
    assert refit.name != fresh.name and refit.onnx_sha256 == fresh.onnx_sha256


@pytest.mark.parametrize("kwargs,words", [(dict(strip_weights=True), "--strip-weights needs --refittable"),
                                          (dict(refit=True, force=True), "--refit reuses")])
def test_bad_option_combinations_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        BuildOptions(**kwargs)


class Recorder:
    """A Refitter stand-in that records what it is given (TensorRT's names and return values)."""

    def __init__(self, names, accept=True, refit_ok=True):
        self.names, self.accept, self.refit_ok, self.got = list(names), accept, refit_ok, {}

    def get_all_weights(self):
        return self.names

    def set_named_weights(self, name, weights):
        self.got[name] = weights
        return self.accept

    def refit_cuda_engine(self):
        return self.refit_ok


def test_every_weight_the_engine_names_is_fed_from_the_graph():
    weights = {"w1": np.arange(6, dtype=np.float32).reshape(2, 3), "b1": np.ones(2, np.float32),
               "unused": np.zeros(3, np.float32)}
    r = Recorder(["w1", "b1"])
    assert fill_weights(lean, r, weights, "backbone fp32") == ["w1", "b1"]
    assert set(r.got) == {"w1", "b1"} and all(isinstance(w, lean.Weights) for w in r.got.values())
    assert r.got["w1"].size == 6 and r.got["b1"].size == 2


@pytest.mark.parametrize("refitter,words", [(Recorder(["w1", "gone"]), "no weight 'gone'"),
                                            (Recorder(["w1"], accept=False), "refused the weight 'w1'"),
                                            (Recorder(["w1"], refit_ok=False), "could not refit")])
def test_refit_failures_are_one_line_errors(refitter, words):
    with pytest.raises(BackendError, match=words):
        fill_weights(lean, refitter, {"w1": np.ones((2, 2), np.float32)}, "backbone fp32")


def _manifest(folder: Path, entries: dict) -> None:
    (folder / "engines" / "trt").mkdir(parents=True)
    (folder / "engines" / "trt" / "manifest.json").write_text(json.dumps({"schema": "anchorflow.trt-manifest/1",
                                                                       "engines": entries}))


def _entry(name, refittable, built, profile=PROFILE, sha="b" * 64):
    builder = BuildOptions(refittable=refittable).builder_fields()
    return {"key_version": cache.KEY_VERSION, "network": "backbone", "precision": "fp32", "onnx_sha256": sha,
            "profile": profile, "builder": builder, **ENV.to_json(), "file": f"{name}.engine", "built_at": built}


def test_the_newest_refittable_engine_of_the_same_profile_is_the_base(tmp_path):
    other = {"x": [[1, 1, 8, 8], [2, 1, 8, 8], [2, 1, 8, 8]]}
    _manifest(tmp_path, {"a": _entry("a", True, "2026-01-01"), "b": _entry("b", True, "2026-02-01"),
                         "c": _entry("c", False, "2026-03-01"), "d": _entry("d", True, "2026-04-01", other)})
    key = cache.EngineKey("backbone", "fp32", "c" * 64, PROFILE, ENV, BuildOptions(refit=True).builder_fields())
    assert base_entry(tmp_path, "backbone", "fp32", key)["file"] == "b.engine"
    empty = tmp_path / "empty"
    empty.mkdir()
    _manifest(empty, {"c": _entry("c", False, "2026-03-01")})
    with pytest.raises(BackendError, match="no cached refittable backbone fp32 engine"):
        base_entry(empty, "backbone", "fp32", key)


def test_build_refuses_bad_refit_options_before_looking_for_tensorrt(capsys):
    from anchorflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "default", "--strip-weights"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.strip().startswith("error: --strip-weights needs --refittable"), err
