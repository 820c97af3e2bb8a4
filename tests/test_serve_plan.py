"""One meaning per request: the service, ``anchorflow sample --npy`` and ``SamplePlan.run``
give bit-identical samples for the same arguments, each SamplePlan field varied in turn.

The service side is the Ray-free core (``SamplerService.parse`` + ``sample_batch``, what a replica
runs); tests/test_serve.py makes the same comparison once through Ray Serve. Every variant must also
change the batching key and the samples, so a key that forgot the field (the mutant that dropped
``cfg``) or a field that never reached the solve cannot pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from anchorflow.modelref import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED / "digits" / "bundle" / "bundle.json").is_file(),
                                reason="the bundled digits bundle is not exported")

BASE = {"solver": "ba", "nfe": 6, "n": 3, "seed": 0, "cfg": 1.5, "labels": [1, 2]}
# (SamplePlan field, HTTP body change, `anchorflow sample` argument change, plan() argument change)
VARIANTS = [
    ("solver", {"solver": "euler"}, {"--solver": "euler"}, {"solver": "euler"}),
    ("nfe", {"nfe": 5}, {"--nfe": "5"}, {"nfe": 5}),
    ("grid", {"grid": "shift:2"}, {"--grid": "shift:2"}, {"grid": "shift:2"}),
    ("first_call", {"first_call": "cached"}, {"--first-call": "cached"}, {"first_call": "cached"}),
    ("cfg_scale", {"cfg": 2.5}, {"--cfg": "2.5"}, {"cfg_scale": 2.5}),
    ("cfg_interval", {"cfg_interval": [0.3, 0.9]}, {"--cfg-interval": "0.3,0.9"}, {"cfg_interval": (0.3, 0.9)}),
    ("rows", {"labels": [7]}, {"--labels": "7"}, {"labels": [7]}),
    ("null_cond", {"null_conditions": "y=3"}, {"--null-cond": "y=3"}, {"null_cond": "y=3"}),
    ("n", {"n": 5}, {"--n": "5"}, {"n": 5}),
    ("seed", {"seed": 4}, {"--seed": "4"}, {"seed": 4}),
    ("bandit_state", {"solver": "fastflow", "nfe": 8, "cfg": 1.0}, {"--solver": "fastflow", "--nfe": "8", "--cfg": "1.0",
                                                                   "--bandit-state": "STATE"},
     {"solver": "fastflow", "nfe": 8, "cfg_scale": 1.0, "bandit_state": "STATE"}),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from anchorflow.serve.service import SamplerService

    return SamplerService("default", backend="ort-cpu", bandit_dir=str(tmp_path_factory.mktemp("bandits")))


def _null_y(value: int):
    return np.array([value], np.int64)


def served(service, body: dict) -> tuple[np.ndarray, str]:
    import base64
    import io

    body = dict(body)
    if body.get("null_conditions") == "y=3":  # the null row of the label condition, as base64 .npy
        buf = io.BytesIO()
        np.save(buf, _null_y(3))
        labels = body.pop("labels")
        y = np.resize(np.asarray(labels, np.int64), body["n"])
        ybuf = io.BytesIO()
        np.save(ybuf, y)
        body["conditions"] = {"y": base64.b64encode(ybuf.getvalue()).decode()}
        body["null_conditions"] = {"y": base64.b64encode(buf.getvalue()).decode()}
    req = service.parse(json.dumps(body).encode())
    rep = service.sample_batch([req])[0]
    assert rep.error is None, rep.error
    return rep.x, req.key


def sampled(tmp_path, body: dict, cli: dict) -> np.ndarray:
    from anchorflow.cli import cli as main

    args = {"--solver": body["solver"], "--nfe": str(body["nfe"]), "--n": str(body["n"]), "--seed": str(body["seed"]),
            "--cfg": str(body["cfg"]), "--labels": ",".join(map(str, body["labels"])), **cli}
    if args.get("--null-cond") == "y=3":
        np.savez(tmp_path / "null.npz", y=_null_y(3))
        args["--null-cond"] = str(tmp_path / "null.npz")
    if args.get("--bandit-state") == "STATE":
        args["--bandit-state"] = str(tmp_path / "cli-bandit.json")
    flat = [x for kv in args.items() for x in kv]
    res = CliRunner().invoke(main, ["sample", "default", "--backend", "ort-cpu", *flat, "--out",
                                    str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output
    return np.load(tmp_path / "s.npy")


def planned(service, tmp_path, body: dict, kw: dict) -> np.ndarray:
    from anchorflow.runtime.plan import plan

    args = {**dict(solver=body["solver"], nfe=body["nfe"], n=body["n"], seed=body["seed"], cfg_scale=body["cfg"],
                   labels=body["labels"]), **kw}
    if args.get("null_cond") == "y=3":
        args["null_cond"] = {"y": _null_y(3)}
    if args.get("bandit_state") == "STATE":
        args["bandit_state"] = str(tmp_path / "plan-bandit.json")
    return plan(service.model, **args).run().x


@pytest.fixture(scope="module")
def base(service, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    x, key = served(service, BASE)
    assert np.array_equal(x, sampled(tmp, BASE, {})) and np.array_equal(x, planned(service, tmp, BASE, {}))
    return x, key


@pytest.mark.parametrize("field, http, cli, kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_serve_equals_sample_equals_plan_run(service, base, tmp_path, field, http, cli, kw):
    body = {**BASE, **http}
    x_serve, key = served(service, body)
    x_cli = sampled(tmp_path, body, cli)
    x_plan = planned(service, tmp_path, body, kw)
    assert np.array_equal(x_serve, x_cli) and np.array_equal(x_serve, x_plan)  # same noise, same plan: bit-identical
    base_x, base_key = base
    if field not in ("n", "seed", "rows"):  # row data: they change the samples, not what may share a solve
        assert key != base_key, f"the batching key ignores {field}"
    assert x_serve.shape != base_x.shape or not np.array_equal(x_serve, base_x), f"{field} did not reach the solve"


def test_requests_differing_only_in_cfg_are_not_merged(service):
    """The mutant that once survived: drop cfg from the key and these two share one solve."""
    a = service.parse(json.dumps({**BASE, "cfg": 1.5}).encode())
    b = service.parse(json.dumps({**BASE, "cfg": 3.0, "seed": 1}).encode())
    ra, rb = service.sample_batch([a, b])
    assert (ra.batch_requests, rb.batch_requests) == (1, 1)
    assert np.array_equal(rb.x, service.sample_batch([b])[0].x)


# -- the fields a service sets for all its requests: engine (--precision) and mu_factor (--mu-factor) --------
SERVICE_VARIANTS = [  # (SamplePlan field, service keywords, HTTP body change, `sample` arguments, plan() keywords)
    ("engine", {"precision": "fp16"}, {}, {"--precision": "fp16"}, {}),
    ("mu_factor", {"mu_factor": 2.0}, {"solver": "fastflow", "nfe": 8, "cfg": 1.0},
     {"--solver": "fastflow", "--nfe": "8", "--cfg": "1.0", "--bandit-state": "STATE", "--mu-factor": "2"},
     {"solver": "fastflow", "nfe": 8, "cfg_scale": 1.0, "bandit_state": "STATE", "mu_factor": 2.0}),
]


@pytest.mark.parametrize("field, settings, http, cli, kw", SERVICE_VARIANTS, ids=[v[0] for v in SERVICE_VARIANTS])
def test_service_settings_equal_sample_and_plan_run(service, base, tmp_path, field, settings, http, cli, kw):
    from anchorflow.serve.service import SamplerService

    other = SamplerService("default", backend="ort-cpu", bandit_dir=str(tmp_path / "bandits"), **settings)
    body = {**BASE, **http}
    if field == "mu_factor":  # the same request on a service that differs only in mu_factor
        from anchorflow.runtime.fastflow import state as bandit_state

        default = SamplerService("default", backend="ort-cpu", bandit_dir=str(tmp_path / "bandits-default"))
        x_default, key_default = served(default, body)
    x_serve, key = served(other, body)
    assert np.array_equal(x_serve, sampled(tmp_path, body, cli))
    assert np.array_equal(x_serve, planned(other, tmp_path, body, kw))
    if field == "mu_factor":
        # FastFlow's first generation computes every step whatever mu is (its calibration), so mu_factor shows in
        # what it learned: mu = mu_factor x the calibrated mu of the same noise, exactly twice the default's.
        assert np.array_equal(x_serve, x_default)
        (mine,), (theirs,) = (list((tmp_path / d).rglob("*.json")) for d in ("bandits", "bandits-default"))
        assert bandit_state.load(mine).mu == 2.0 * bandit_state.load(theirs).mu > 0, "mu_factor did not reach the bandit"
    else:
        x_default, key_default = base
        assert not np.array_equal(x_serve, x_default), f"{field} did not reach the solve"
    assert key != key_default, f"the batching key ignores {field}"
