"""The sampling plan (runtime/plan.py): one front door for sample, bench, demo, tune and the Python API.

- the key: every SamplePlan field but the pinned exclusions changes it (by construction), and
  for every field a CLI option expresses, ``plan.run`` equals ``anchorflow sample --npy`` bit for bit;
- validation: every number and label checked once, the same rule for every front end;
- the guidance-interval boundary (t = lo is unguided) and the SideNet's non-finite check.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import pytest

from anchorflow.cli import main
from anchorflow.base.errors import ConfigError, NonFiniteError
from anchorflow.runtime import load_bundle, solve
from anchorflow.runtime import plan as P
from anchorflow.runtime.solving.field import GuidedField, in_interval, overlaps
from anchorflow.runtime.solving.first_call import FirstCallTable

BASE = dict(solver="ba", nfe=7, cfg_scale=1.5, n=8, seed=0)
BASE_CLI = ["--solver", "ba", "--nfe", "7", "--cfg", "1.5", "--n", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def digits():
    """The bundled digits bundle (made by the real exporter), fp32 and fp16, on onnxruntime CPU."""
    return {p: load_bundle("default", backend="ort-cpu", precision=p) for p in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def base(digits):
    return digits["fp32"].plan(**BASE)


# -- the key ----------------------------------------------------------------------------------------


def test_the_key_exclusions_are_pinned():
    """Dropping a field from the key means adding it here: this set is the whole list, with reasons."""
    assert set(P.KEY_EXCLUDED) == {"model", "grid_source", "rows", "n", "seed", "noise", "quality"}
    assert {f.name for f in dataclasses.fields(P.SamplePlan)} >= set(P.KEY_EXCLUDED)


def _perturb(name: str, value):
    """Another value of the same kind, for every SamplePlan field."""
    if name == "model":
        return object()
    if name == "first_call_table":
        return FirstCallTable(np.zeros((11, 1, 8, 8), np.float32), 0.01, 64)
    if name == "options":
        return (("a", 0.5),)
    if name == "noise":
        return np.zeros((8, 1, 8, 8), np.float32)
    if name in ("rows", "shared", "null_cond"):
        return {"y": np.full(8, 3, np.int64)}
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, tuple):
        return tuple(v * 0.5 for v in value)
    if value is None:
        return {"bandit_state": "b.json", "calls": 4.0, "speedup": 2.0, "mu_factor": 2.0, "quality": "fast"}[name]
    raise AssertionError(f"no perturbation for field {name!r} ({type(value).__name__}); add one")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(P.SamplePlan)])
def test_every_field_but_the_exclusions_changes_the_key(base, name):
    other = dataclasses.replace(base, **{name: _perturb(name, getattr(base, name))})
    if name in P.KEY_EXCLUDED:
        assert other.key == base.key
    else:
        assert other.key != base.key, f"{name} changes the numbers but not the key"


def test_the_key_is_stable_and_ignores_row_data(digits, base):
    again = digits["fp32"].plan(**BASE)
    assert again.key == base.key and again is not base
    more = digits["fp32"].plan(**{**BASE, "n": 3, "seed": 9, "labels": [4, 5]})
    assert more.key == base.key  # rows merge: n, seed and labels are row data


def _cli_npy(tmp_path, args, name="s"):
    out, npy = tmp_path / f"{name}.png", tmp_path / f"{name}.npy"
    try:
        main(["sample", "default", "--backend", "ort-cpu", *args, "--out", str(out), "--npy", str(npy)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return np.load(npy)


# (plan keywords, CLI arguments, bundle precision): each changes one field of the base plan
VARIANTS = {
    "base": ({}, [], "fp32"),
    "engine": ({}, ["--precision", "fp16"], "fp16"),
    "solver": ({"solver": "euler"}, ["--solver", "euler"], "fp32"),
    "nfe": ({"nfe": 6}, ["--nfe", "6"], "fp32"),
    "grid": ({"grid": "shift:2"}, ["--grid", "shift:2"], "fp32"),
    "first_call": ({"first_call": "cached"}, ["--first-call", "cached"], "fp32"),
    "cfg_scale": ({"cfg_scale": 2.5}, ["--cfg", "2.5"], "fp32"),
    "cfg_interval": ({"cfg_interval": (0.3, 1.0)}, ["--cfg-interval", "0.3,1"], "fp32"),
    "rows": ({"labels": [3, 1]}, ["--labels", "3,1"], "fp32"),
    "n": ({"n": 5}, ["--n", "5"], "fp32"),
    "seed": ({"seed": 7}, ["--seed", "7"], "fp32"),
    "fastflow": ({"solver": "fastflow", "nfe": 12, "speedup": 2.0, "mu_factor": 2.0},
                 ["--solver", "fastflow", "--nfe", "12", "--speedup", "2", "--mu-factor", "2"], "fp32"),
}


ROW_DATA = {"rows", "n", "seed"}  # per-row data: merged requests concatenate it, so it stays out of the key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plan_run_equals_sample_npy_bit_for_bit(digits, base, tmp_path, variant):
    kwargs, args, precision = VARIANTS[variant]
    p = digits[precision].plan(**{**BASE, **kwargs})
    cli = _cli_npy(tmp_path, [*BASE_CLI, *args])
    x = p.run().x
    np.testing.assert_array_equal(x, cli)
    if variant == "base":
        return
    if variant not in ROW_DATA:  # other numbers for the same rows: the key must tell them apart
        assert not np.array_equal(x, base.run().x) and p.key != base.key
    changed = {f.name for f in dataclasses.fields(P.SamplePlan)
               if not _same(getattr(p, f.name), getattr(base, f.name))} - {"model"}
    assert changed, "the variant changed no field"
    assert (p.key != base.key) == bool(changed - set(P.KEY_EXCLUDED))


def _same(a, b) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return a is not None and b is not None and set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b)
    return a == b


def test_noise_and_null_cond_files_match_the_cli(digits, tmp_path):
    noise = np.random.default_rng(5).standard_normal((6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    np.savez(tmp_path / "null.npz", y=np.asarray([10], np.int64))
    np.savez(tmp_path / "cond.npz", y=np.asarray([2, 7, 7, 0, 1, 9], np.int64))
    p = digits["fp32"].plan(solver="ba", nfe=7, cfg_scale=1.5, noise=noise, cond={"y": np.asarray([2, 7, 7, 0, 1, 9])},
                            null_cond={"y": np.asarray([10])})
    cli = _cli_npy(tmp_path, ["--solver", "ba", "--nfe", "7", "--cfg", "1.5", "--noise", str(tmp_path / "noise.npy"),
                              "--cond", str(tmp_path / "cond.npz"), "--null-cond", str(tmp_path / "null.npz")])
    np.testing.assert_array_equal(p.run().x, cli)


def test_bandit_state_plans_match_the_cli_and_learn(digits, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    p = digits["fp32"].plan(solver="fastflow", nfe=12, n=4, bandit_state=str(a))
    cli = _cli_npy(tmp_path, ["--solver", "fastflow", "--nfe", "12", "--n", "4", "--bandit-state", str(b)])
    np.testing.assert_array_equal(p.run().x, cli)
    assert a.is_file() and b.is_file()  # both learned (committed) the same first generation


def test_bundle_sample_uses_the_tuned_grid(digits):
    """The README's example: b.sample(...) gets the bundle's tuned grid without knowing about tuning files."""
    b = digits["fp32"]
    res = b.sample(n=16, solver="ba", nfe=7, labels=list(range(10)), cfg_scale=1.5)
    tuned = b.tuning.grid_for("ba", 7)
    assert tuned is not None
    np.testing.assert_array_equal(res.grid, np.asarray(tuned.times))
    noise = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    by_hand = solve("ba", b.velocity, noise, 7, sidenet=b.sidenet, y=np.arange(16) % 10, cfg_scale=1.5,
                    null_label=10, grid=np.asarray(tuned.times))
    np.testing.assert_array_equal(res.x, by_hand.x)


# -- validation -------------------------------------------------------------------------------------

BAD = [
    (dict(labels=[True]), "labels must be integers"),
    (dict(labels=[1.0]), "labels must be integers"),
    (dict(labels="1.5"), "labels must be integers"),
    (dict(labels=[-1]), "labels must be integers in 0..9"),
    (dict(labels=[10]), "labels must be integers in 0..9"),
    (dict(labels=[2**70]), "labels must be integers in 0..9"),
    (dict(cond={"y": np.asarray([1.0] * 8)}), "y must hold integers"),
    (dict(cond={"y": np.asarray([-5] * 8)}), "labels must be in 0..9"),
    (dict(cond={"y": np.asarray([10] * 8)}), "labels must be in 0..9"),
    (dict(null_cond={"y": np.asarray([11])}), "labels must be in 0..10"),
    (dict(null_cond={"y": np.asarray([-1])}), "labels must be in 0..10"),
    (dict(cond={"z": np.zeros(8)}), "unknown z"),
    (dict(cfg_scale=0), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale=-1), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale=-5.5), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale=math.nan), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale=math.inf), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale=1e300), "above the cap"),
    (dict(cfg_scale=True), "cfg_scale must be finite and > 0"),
    (dict(cfg_scale="2"), "cfg_scale must be finite and > 0"),
    (dict(cfg_interval=(0.5, 0.5)), "0 <= lo < hi <= 1"),
    (dict(cfg_interval=(0.5, 0.2)), "0 <= lo < hi <= 1"),
    (dict(cfg_interval=(math.nan, 1)), "0 <= lo < hi <= 1"),
    (dict(cfg_interval=(-0.1, 1)), "0 <= lo < hi <= 1"),
    (dict(cfg_interval=(0, 1, 1)), "exactly two numbers"),
    (dict(nfe=0), "nfe must be in 1..1000"),
    (dict(nfe=1001), "nfe must be in 1..1000"),
    (dict(nfe=7.0), "nfe must be an integer"),
    (dict(nfe=True), "nfe must be an integer"),
    (dict(n=0), "n must be in 1..100000"),
    (dict(n=10**6), "n must be in 1..100000"),
    (dict(seed=-1), "seed must be in 0..4294967295"),
    (dict(seed=2**63), "seed must be in 0..4294967295"),
    (dict(solver="bogus"), "bogus"),
    (dict(grid="bogus"), "unknown grid"),
    (dict(grid=[1.0, 0.7, 0.8, 0.0]), "grid"),
    (dict(first_call="sometimes"), "first_call must be 'backbone' or 'cached'"),
    (dict(solver="euler", bandit_state="b.json"), "only apply to solver fastflow"),
    (dict(solver="euler", mu_factor=2.0), "only apply to solver fastflow"),
    (dict(solver="fastflow", nfe=20, speedup=0), "speedup must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, speedup=-1), "speedup must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, speedup=math.nan), "speedup must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, speedup=math.inf), "speedup must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, speedup=1e9), "leaves fewer than 3 of the 20 steps"),
    (dict(solver="fastflow", nfe=20, calls=0), "calls must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, calls=-3), "calls must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, calls=math.nan), "calls must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, calls=1e9), "calls must be in 3..T (20)"),
    (dict(solver="fastflow", nfe=20, calls=2), "calls must be"),
    (dict(solver="fastflow", nfe=20, mu_factor=0), "mu_factor must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, mu_factor=-1), "mu_factor must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, mu_factor=math.nan), "mu_factor must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, mu_factor=math.inf), "mu_factor must be a finite number > 0"),
    (dict(solver="fastflow", nfe=20, mu_factor=1e9), "above the cap"),
    (dict(solver="fastflow", nfe=20, calls=5, speedup=2), "not both"),
    (dict(noise=np.full((8, 1, 8, 8), np.nan, np.float32)), "NaN or Inf"),
    (dict(noise=np.zeros((8, 2, 8, 8), np.float32)), "noise must be a float array"),
    (dict(noise=np.zeros((8, 1, 8, 8), np.int64)), "noise must be a float array"),
    (dict(noise=np.zeros((3, 1, 8, 8), np.float32)), "rows but the plan has n = 8"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_refused_in_one_line(digits, change, message):
    with pytest.raises(ConfigError, match=None) as exc:
        digits["fp32"].plan(**{**BASE, **change})
    text = str(exc.value)
    assert message in text and "\n" not in text


def test_the_null_label_is_allowed_as_a_null_condition_only(digits):
    p = digits["fp32"].plan(**BASE, null_cond={"y": np.asarray([10])})
    assert int(np.asarray(p.null_cond["y"]).reshape(-1)[0]) == 10


def test_the_cli_and_the_plan_share_the_cfg_rule(tmp_path, capsys):
    """The CLI's --cfg callback is the plan's check: a value the plan refuses, the CLI refuses too."""
    for value in ("1e300", "0", "-1", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["sample", "default", "--cfg", value, "--out", str(tmp_path / "x.png")])
        assert exc.value.code == 1
        assert "--cfg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--npy", "SAME"], "names the same file as --out"),
    (["--solver", "fastflow", "--nfe", "20", "--speedup", "0"], "--speedup must be a finite number > 0"),
    (["--solver", "fastflow", "--nfe", "20", "--calls", "nan"], "--calls must be a finite number > 0"),
    (["--solver", "fastflow", "--nfe", "20", "--mu-factor", "inf"], "--mu-factor must be a finite number > 0"),
    (["--solver", "fastflow", "--nfe", "20", "--calls", "5", "--speedup", "2"], "not both"),
    (["--labels", "-5"], "--labels must be integers in 0..9"),
])
def test_sample_cli_refusals_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "s.png"
    args = [str(out) if a == "SAME" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["sample", "default", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and message in err and err.count("\n") == 0
    assert not list(tmp_path.iterdir())


# -- the guidance interval: t = lo is unguided (one rule), and the SideNet's non-finite check -------


def _linear(x, t, cond):
    """v = (1 + y) x: the conditional (y in 0..2) and null (y = 3) rows differ, so guidance shows."""
    y = np.asarray(cond["y"], np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return (1.0 + y) * x


def test_guidance_is_off_at_exactly_lo_and_euler_follows_it():
    """cfg_interval (0.5, 1] on the 4-step grid 1, .75, .5, .25: Euler guides its steps from t = 1
    and t = 0.75 only; at t = 0.5 (= lo) and 0.25 it uses the conditional velocity alone."""
    assert in_interval(0.5, (0.5, 1.0)) is False and in_interval(0.5000001, (0.5, 1.0)) is True
    assert overlaps((0.5, 0.5), (0.5, 1.0)) is False and overlaps((0.4, 0.6), (0.5, 1.0)) is True
    x0 = np.random.default_rng(0).standard_normal((3, 2))
    y, s = np.arange(3), 2.0
    res = solve("euler", _linear, x0, 4, y=y, null_label=3, cfg_scale=s, cfg_interval=(0.5, 1.0))
    x, c, u = x0.copy(), (1.0 + y)[:, None], 4.0
    for t in (1.0, 0.75, 0.5, 0.25):
        rate = u + s * (c - u) if t > 0.5 else c
        x = x - 0.25 * rate * x
    np.testing.assert_allclose(res.x, x, rtol=1e-12, atol=0)


def test_a_non_finite_sidenet_is_refused_naming_it():
    x0 = np.random.default_rng(0).standard_normal((2, 2))

    def sidenet(x, v, t, h, cond):
        return np.full_like(v, np.nan)

    with pytest.raises(NonFiniteError, match="the SideNet returned NaN/Inf"):
        solve("ba", _linear, x0, 4, y=np.arange(2), null_label=3, sidenet=sidenet)
    field = GuidedField(_linear, 2, y=np.arange(2), null_label=3, sidenet=sidenet, check_finite=False)
    assert not np.isfinite(field.side(x0, field.raw(x0, 1.0), 1.0, [0.25])[0]).any()  # the check, not the net
