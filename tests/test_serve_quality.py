"""`anchorflow serve` with quality presets (issue 26): "quality" per request and `serve --quality` as
the service's default, the X-Anchorflow-Quality / X-Anchorflow-Error-Estimate headers.

Bundle: the tiny exported model of tests/test_export.py (session fixtures) with two presets recorded
by the real CLI, ``tune --target-psnr``: ``est`` (BA, which gives a per-sample error estimate) and
``plain`` (Euler, which gives none). Truth: the Python API, ``b.plan(quality=NAME).run()`` on the same
seed, and its ``Result.error_estimate``. The service side is the Ray-free core (what a replica runs);
one test goes through Ray Serve's HTTP proxy for real (``anchorflow serve --quality``).
Time convention: t = 1 noise, t = 0 data; NFE = backbone calls.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.cli import main
from anchorflow.serve.encode import MAX_ESTIMATE_HEADER, Reply, encode, headers_of
from anchorflow.serve.request import RequestError
from test_export import tiny_bundle, tiny_root  # noqa: F401  (session fixtures, exported once)

pytest.importorskip("onnxruntime")

# Merged solves put a request's rows in a call with other rows: a GEMM may block differently at another
# batch size, a few float32 ulp of the O(1) samples (tests/test_serve_core.py measures the same bound).
# The estimate is a per-row RMS of differences of those states (runtime/solving/estimate.py): the same
# absolute slack, plus a relative one for its float64 sums over float32 rows.
BATCH_ATOL = 1e-5
EST_RTOL, EST_ATOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def bundle(tiny_root, tiny_bundle, tmp_path_factory):  # noqa: F811
    """A copy of the tiny exported bundle with presets ``est`` (ba@4) and ``plain`` (euler@3), recorded by
    ``anchorflow tune --target-psnr`` (a target every candidate meets: each is its search's cheapest)."""
    root = tmp_path_factory.mktemp("serve_quality") / "root"
    for part in ("backbone", "sidenet", "bundle"):
        shutil.copytree(tiny_root / part, root / part)
    for name, solver, nfe in (("est", "ba", "4"), ("plain", "euler", "3")):
        main(["tune", str(root / "bundle"), "--target-psnr", "-100", "--name", name, "--solvers", solver,
              "--nfe", nfe, "--samples", "4", "--grids", "uniform", "--first-call", "backbone",
              "--reference", "euler@8", "--backend", "ort-cpu", "--quiet"])
    return root / "bundle"


@pytest.fixture(scope="module")
def presets(bundle):
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    got = read_tuning(bundle).presets
    assert (got["est"].solver, got["est"].nfe, got["plain"].solver, got["plain"].nfe) == ("ba", 4, "euler", 3)
    return got


@pytest.fixture(scope="module")
def api(bundle):
    from anchorflow.runtime import load_bundle

    return load_bundle(bundle, backend="ort-cpu")


@pytest.fixture(scope="module")
def service(bundle, tmp_path_factory):
    """No default quality; 4 rows per solve, so a few requests are merged and split over solves."""
    from anchorflow.serve.service import SamplerService

    return SamplerService(str(bundle), backend="ort-cpu", max_batch=4,
                          bandit_dir=str(tmp_path_factory.mktemp("bandits")))


def parse(core, **body):
    return core.parse(json.dumps(body).encode())


def one(core, **body) -> tuple[Reply, dict]:
    r = parse(core, **body)
    rep = core.sample_batch([r])[0]
    assert rep.error is None, rep.error
    return rep, encode(rep, r.solver, r.format, (-1.0, 1.0)).headers


def estimates(headers: dict) -> np.ndarray:
    return np.array([float(v) for v in headers["X-Anchorflow-Error-Estimate"].split(",")])


@pytest.mark.parametrize("name", ["est", "plain"])
def test_a_quality_request_equals_plan_quality_run(service, api, presets, name):
    """Same seed, same n: the service solves exactly what the Python API's plan(quality=NAME) solves."""
    assert parse(service, quality=name, n=5).plan.quality == name  # planned as plan(quality=NAME): it says so
    rep, h = one(service, quality=name, n=5, seed=3, labels=[2, 7])
    want = api.plan(quality=name, n=5, seed=3, labels=[2, 7]).run()
    np.testing.assert_array_equal(rep.x, want.x)  # one solve of the same rows: bit-identical
    p = presets[name]
    assert h["X-Anchorflow-Quality"] == name and h["X-Anchorflow-Solver"] == p.solver
    assert h["X-Anchorflow-Backbone-Calls"] == str(p.nfe) == str(want.nfe)
    if name == "est":  # BA: one estimate per sample, as the API's Result gives it
        assert want.error_estimate is not None and want.error_estimate.shape == (5,)
        np.testing.assert_array_equal(rep.error_estimate, want.error_estimate)
        assert h["X-Anchorflow-Error-Estimate"] == ",".join(f"{v:.6g}" for v in want.error_estimate)
        assert np.all(want.error_estimate > 0)  # a 4-call BA solve of a trained model is not exact
    else:  # Euler has no free companion: no estimate, no header
        assert want.error_estimate is None and rep.error_estimate is None
        assert "X-Anchorflow-Error-Estimate" not in h


def test_merged_and_split_requests_get_their_own_rows_estimates(service, api, presets):
    """Two "quality" requests and one naming the preset's own solver, nfe, grid and first call share a key
    (the plan key leaves the preset's name out) and are packed 4 rows a solve, pieces split over solves;
    each reply carries its own rows' samples and estimates, and only the preset ones name the quality."""
    p = presets["est"]
    bodies = [dict(quality="est", n=3, seed=1, labels=[1]),
              dict(quality="est", n=2, seed=2, labels=[4, 5]),
              dict(solver=p.solver, nfe=p.nfe, grid=list(p.times), first_call=p.first_call, n=4, seed=5, labels=[9])]
    reqs = [parse(service, **b) for b in bodies]
    assert len({r.key for r in reqs}) == 1
    before = service.stats_snapshot()["solves"]
    replies = service.sample_batch(reqs)
    assert service.stats_snapshot()["solves"] - before == 3  # 9 rows, 4 a solve: [3 + 1], [1 + 3], [1]
    assert max(r.batch_requests for r in replies) == 2
    for body, r, rep in zip(bodies, reqs, replies):
        assert rep.error is None, rep.error
        kw = {k: body[k] for k in ("n", "seed", "labels")}
        want = (api.plan(quality="est", **kw) if "quality" in body else
                api.plan(solver=p.solver, nfe=p.nfe, grid=np.asarray(p.times), first_call=p.first_call, **kw)).run()
        np.testing.assert_allclose(rep.x, want.x, rtol=0, atol=BATCH_ATOL)
        h = encode(rep, r.solver, r.format, (-1.0, 1.0)).headers
        got = estimates(h)
        assert got.shape == (body["n"],)
        np.testing.assert_allclose(got, want.error_estimate, rtol=EST_RTOL, atol=EST_ATOL)
        np.testing.assert_allclose(rep.error_estimate, want.error_estimate, rtol=EST_RTOL, atol=EST_ATOL)
        assert h.get("X-Anchorflow-Quality") == ("est" if "quality" in body else None)
    # rows are not interchangeable: another request's estimates would not pass the checks above
    assert not np.allclose(replies[0].error_estimate, replies[2].error_estimate[:3], rtol=EST_RTOL, atol=EST_ATOL)


def test_the_service_default_quality_and_what_overrides_it(bundle, api, presets, tmp_path):
    """`serve --quality est`: a request naming none of solver/nfe/grid/first_call/quality gets the preset;
    one naming its own solver gets what it names; one naming another preset gets that one."""
    from anchorflow.serve.service import SamplerService

    core = SamplerService(str(bundle), backend="ort-cpu", quality="est", bandit_dir=str(tmp_path))
    assert core.preset == presets["est"]
    rep, h = one(core, n=2, seed=4)
    np.testing.assert_array_equal(rep.x, api.plan(quality="est", n=2, seed=4).run().x)
    assert h["X-Anchorflow-Quality"] == "est" and "X-Anchorflow-Error-Estimate" in h
    rep, h = one(core, solver="euler", nfe=5, n=2, seed=4)
    np.testing.assert_array_equal(rep.x, api.plan(solver="euler", nfe=5, n=2, seed=4).run().x)
    assert "X-Anchorflow-Quality" not in h and "X-Anchorflow-Error-Estimate" not in h
    rep, h = one(core, quality="plain", n=2, seed=4)
    np.testing.assert_array_equal(rep.x, api.plan(quality="plain", n=2, seed=4).run().x)
    assert h["X-Anchorflow-Quality"] == "plain"
    info = core.info()
    assert info["request"]["quality"] == "est"
    assert {q["name"]: (q["solver"], q["nfe"]) for q in info["quality"]} == {"est": ("ba", 4), "plain": ("euler", 3)}


def test_the_json_format_carries_the_quality_and_the_estimates(service, api):
    r = parse(service, quality="est", n=3, seed=6, format="json")
    rep = service.sample_batch([r])[0]
    js = json.loads(encode(rep, r.solver, r.format, (-1.0, 1.0)).body)
    assert js["quality"] == "est"
    np.testing.assert_array_equal(js["error_estimate"], api.plan(quality="est", n=3, seed=6).run().error_estimate)
    r = parse(service, solver="euler", nfe=3, n=2, format="json")
    js = json.loads(encode(service.sample_batch([r])[0], r.solver, r.format, (-1.0, 1.0)).body)
    assert js["quality"] is None and js["error_estimate"] is None


@pytest.mark.parametrize("body, words", [
    (dict(quality="nosuch"), "quality 'nosuch' is not recorded in this bundle (presets: est, plain)"),
    (dict(quality="est", solver="euler"), "'quality' chooses the solver, nfe, grid and first call; drop 'solver'"),
    (dict(quality="est", nfe=4), "drop 'nfe' or 'quality'"),
    (dict(quality="est", grid="uniform", first_call="cached"), "drop 'grid', 'first_call' or 'quality'"),
    (dict(quality=1e6), "'quality' 1000000.0: no recorded preset reaches 1e+06 dB (the best recorded is"),
    (dict(quality=True), "'quality' must be a preset name (1-64 characters) or a number of dB, got true"),
    (dict(quality=""), "'quality' must be a preset name"),
    (dict(quality=["est"]), "'quality' must be a preset name"),
    (dict(quality="x" * 5000), "'quality' must be a preset name (1-64 characters)"),
])
def test_bad_quality_requests_are_400_in_one_line(service, body, words):
    with pytest.raises(RequestError) as exc:
        parse(service, **body)
    msg = str(exc.value)
    assert exc.value.status == 400 and words in msg and "\n" not in msg and len(msg) < 400, msg


def test_a_bundle_without_presets_names_none(tmp_path):
    from anchorflow.modelref import BUNDLED
    from anchorflow.serve.service import SamplerService

    if not (BUNDLED / "digits" / "bundle" / "bundle.json").is_file():
        pytest.skip("the bundled digits bundle is not exported")
    core = SamplerService("default", backend="ort-cpu", bandit_dir=str(tmp_path))
    with pytest.raises(RequestError, match=r"presets: none recorded"):
        parse(core, quality="fast")
    with pytest.raises(ConfigError, match=r"^quality 'fast' is not recorded in this bundle \(presets: none recorded\)"):
        SamplerService("default", backend="ort-cpu", quality="fast", bandit_dir=str(tmp_path))


def test_serve_quality_is_checked_before_ray_starts(bundle, monkeypatch, capsys):
    """An unknown or empty --quality: one error line naming the recorded presets, exit 1, Ray never started."""
    import anchorflow.serve.app as app

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(app, "start", no_ray)
    for value, words in (("nosuch", "error: quality 'nosuch' is not recorded in this bundle (presets: est, plain)"),
                         ("200", "error: --quality 200: no recorded preset reaches 200 dB"),
                         (" ", "error: --quality is empty")):
        with pytest.raises(SystemExit) as exc:
            main(["serve", str(bundle), "--quality", value, "--port", "1", "--backend", "ort-cpu"])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and err.startswith(words) and err.count("\n") == 1, err


def test_estimate_header_format_and_its_size_limit():
    rep = Reply(x=np.zeros((3, 2), np.float32), error_estimate=np.array([0.0123456789, 2.0, 1e-9]), quality="q")
    h = headers_of(rep, "ba")
    assert h["X-Anchorflow-Error-Estimate"] == "0.0123457,2,1e-09" and h["X-Anchorflow-Quality"] == "q"
    big = Reply(x=np.zeros((5000, 2), np.float32), error_estimate=np.full(5000, 0.0123456789))
    h = headers_of(big, "ba")
    assert "X-Anchorflow-Error-Estimate" not in h and "X-Anchorflow-Quality" not in h
    assert h["X-Anchorflow-Error-Estimate-Omitted"].startswith(f"5000 values, over {MAX_ESTIMATE_HEADER} bytes")
    assert "X-Anchorflow-Error-Estimate" not in headers_of(Reply(x=np.zeros((3, 2))), "euler")


@pytest.mark.slow
def test_serve_quality_through_ray_serve(bundle, api, tmp_path):
    """The one real start: `anchorflow serve B --quality est` on Ray, two concurrent requests (one
    default, one "quality": "plain"); headers as sent by Ray Serve's proxy, samples as the API's."""
    pytest.importorskip("ray.serve", reason="anchorflow[serve] (ray[serve]) is not installed")
    from concurrent.futures import ThreadPoolExecutor

    from anchorflow.serve.client import ServiceProcess, decode_npy

    log = tmp_path / "serve.log"
    with ServiceProcess([str(bundle), "--quality", "est", "--num-cpus", "2", "--backend", "ort-cpu",
                         "--bandit-dir", str(tmp_path / "b")], cwd=str(tmp_path), log=str(log)) as svc:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(svc.client.sample, [{"n": 3, "seed": 8}, {"quality": "plain", "n": 2, "seed": 8}])
        bad = svc.client.sample({"quality": "est", "solver": "euler"})
    assert "default quality est: ba@4 uniform" in log.read_text()
    (sa, ha, xa), (sb, hb, xb) = a, b
    assert sa == sb == 200 and ha["x-anchorflow-quality"] == "est" and hb["x-anchorflow-quality"] == "plain"
    want = api.plan(quality="est", n=3, seed=8).run()
    np.testing.assert_array_equal(decode_npy(xa), want.x)
    assert ha["x-anchorflow-error-estimate"] == ",".join(f"{v:.6g}" for v in want.error_estimate)
    np.testing.assert_array_equal(decode_npy(xb), api.plan(quality="plain", n=2, seed=8).run().x)
    assert "x-anchorflow-error-estimate" not in hb
    assert bad[0] == 400 and "drop 'solver'" in json.loads(bad[2])["error"]
