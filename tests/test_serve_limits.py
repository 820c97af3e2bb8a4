"""The service's Ray-free core: every request validated alone, bounded, and failing alone;
serving bundles made by the real exporter, whose state is latents.

Truth for samples: ``anchorflow.runtime.solve`` on the request's own noise, alone (what
``anchorflow sample`` runs). The digits bundle declares its class label as the condition ``y``
(int64, null label 10), which is how a label can reach the network without ``labels``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from _serve_bundles import exported_bundles  # noqa: F401  (session fixture)
from anchorflow.modelref import BUNDLED
from anchorflow.runtime import solve
from anchorflow.sampling import cycle_labels, start_noise
from anchorflow.serve.request import BodyTooLarge, RequestError, decode_body
from anchorflow.tuning import sampling_setup

DIGITS = (BUNDLED / "digits" / "bundle" / "bundle.json").is_file()
needs_digits = pytest.mark.skipif(not DIGITS, reason="the bundled digits bundle is not exported")


def npy64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from anchorflow.serve.service import SamplerService

    return SamplerService("default", backend="ort-cpu", max_batch=8, max_n=64, max_cost=2000, max_body=8192,
                          time_budget_s=30.0, bandit_dir=str(tmp_path_factory.mktemp("bandits")))


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def lone(service, r) -> np.ndarray:
    m = service.model
    y = cycle_labels(r.labels, r.n, m.meta["num_classes"])
    return solve(r.solver, m.velocity, start_noise(r.seed, r.n, m.meta["state_shape"]), r.nfe, y=y, sidenet=m.sidenet,
                 cfg_scale=r.cfg, cfg_interval=r.cfg_interval, null_label=m.meta["null_label"],
                 grid=sampling_setup(m.files.bundle, r.solver, r.nfe, None)[0]).x


# -- every field refused as the CLI refuses it ------------------------------------------------------
BAD_FIELDS = [
    (body(cfg=0), "'cfg' must be finite and > 0"),
    (body(cfg=-1), "'cfg' must be finite and > 0"),
    (body(cfg=-5.5), "'cfg' must be finite and > 0"),
    (b'{"cfg": NaN}', "'cfg' must be a finite number"),
    (b'{"cfg": Infinity}', "'cfg' must be a finite number"),
    (body(cfg=10**400), "'cfg' must be a finite number"),          # an int beyond float: not an OverflowError
    (body(seed=-1), "'seed' must be in 0..4294967295"),
    (body(seed=2**32), "'seed' must be in 0..4294967295"),        # the CLI's --seed range, not 2^63
    (body(seed=2**63), "'seed' must be in 0..4294967295"),
    (body(labels=[-5]), "must be integers in 0..9"),               # no wrap to class 5
    (body(labels=[1.0]), "'labels' must be integers, got 1.0"),
    (body(cfg=1e300), "'cfg' 1e\\+300 is above the cap of 1000"),  # runtime.plan's cap, as for --cfg
    (body(n=10**30), "'n' must be in 1..64"),
    (body(solver="euler", nfe=40, n=64), "n x nfe = 64 x 40 = 2560"),  # the per-request cost limit (2000)
    (b"[" * 3000, "nests deeper"),                                # under the 8192-byte body limit here
    (body(grid=[[[[1.0]]]]), "nests deeper than 4 levels"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "not valid JSON"),          # Python's int digit limit: 400, not 500
    (body(**{"x" * 10**3: 1}), "unknown field"),
]


@needs_digits
@pytest.mark.parametrize("raw, words", BAD_FIELDS, ids=[f"{i}-{w[:20]}" for i, (_, w) in enumerate(BAD_FIELDS)])
def test_each_bad_field_is_a_400_with_a_message(digits, raw, words):
    with pytest.raises(RequestError, match=words) as info:
        digits.parse(raw)
    assert info.value.status == 400 and len(str(info.value)) < 400


@needs_digits
def test_the_edges_of_each_range_are_accepted(digits):
    r = digits.parse(body(seed=2**32 - 1, cfg=1e-3, labels=[0, 9], solver="euler", nfe=40, n=50))  # cost 2000 exactly
    assert (r.seed, r.cfg, r.labels, r.n * r.nfe) == (2**32 - 1, 1e-3, (0, 9), 2000)


@needs_digits
@pytest.mark.parametrize("y, words", [
    (np.array([-5]), "must be in 0..9"),      # would wrap to class 6 in the embedding's Gather
    (np.array([12]), "must be in 0..9"),      # would fail the whole merged solve in onnxruntime
    (np.array([10]), "must be in 0..9"),      # the null label is no class label
    (np.array([2.0]), "must be int64"),       # float labels
    (np.array([2**63 + 5], np.uint64), "beyond int64"),
])
def test_class_labels_sent_as_the_condition_y_are_checked(digits, y, words):
    with pytest.raises(RequestError, match=words):
        digits.parse(body(solver="euler", nfe=4, n=2, conditions={"y": npy64(y)}))
    ok = digits.parse(body(solver="euler", nfe=4, n=2, conditions={"y": npy64(np.array([3, 9]))}))
    assert ok.conditions[0][1].tolist() == [3, 9]


@needs_digits
def test_a_body_over_the_limit_is_413():
    with pytest.raises(BodyTooLarge, match="over this service's limit of 4096 bytes") as info:
        decode_body(b"{" + b" " * 4096 + b"}", max_body=4096)
    assert info.value.status == 413
    assert decode_body(b"{" + b" " * 4094 + b"}", max_body=4096)["solver"] == "ba"  # 4096 bytes: accepted


# -- a bad request fails alone ----------------------------------------------------------------------
@needs_digits
def test_a_request_that_fails_in_a_merged_solve_fails_alone(digits):
    """A row the network refuses (label 12: onnxruntime's Gather fails) merged with 3 good requests:
    the good ones are solved again without it and equal lone runs; the bad one gets a 500 that names
    no internal exception. (Validation refuses such a row at parse time; this is the second line.)"""
    good = [digits.parse(body(solver="euler", nfe=4, n=2, seed=s, labels=[s])) for s in (1, 2, 3)]
    p = good[0].plan
    bad = dataclasses.replace(good[0], seed=9, plan=dataclasses.replace(p, rows={"y": np.array([12, 12])}, seed=9))
    assert bad.key == good[0].key  # rows are row data: the bad one merges with the good ones
    replies = digits.sample_batch([good[0], bad, good[1], good[2]])
    assert [r.status for r in replies] == [200, 500, 200, 200]
    assert "Gather" not in replies[1].error and "onnxruntime" not in replies[1].error.lower()
    for r, rep in zip(good, [replies[0], replies[2], replies[3]]):
        assert rep.error is None
        np.testing.assert_array_equal(rep.x, lone(digits, r))


@needs_digits
def test_a_request_past_its_time_budget_gets_504_and_others_are_served(digits):
    late = digits.parse(body(solver="euler", nfe=4, n=2))
    late = dataclasses.replace(late, arrived=time.perf_counter() - 31.0)  # budget 30 s
    fresh = digits.parse(body(solver="euler", nfe=4, n=2, seed=5))
    a, b = digits.sample_batch([late, fresh])
    assert a.status == 504 and "time budget of 30 s" in a.error and a.x is None
    assert b.error is None and np.array_equal(b.x, lone(digits, fresh))


@needs_digits
def test_small_requests_get_their_own_lane(digits):
    # max_cost 2000 / 16 = 125 row-calls: a tiny request never waits behind a large one's solves
    assert digits.small(digits.parse(body(solver="euler", nfe=5, n=25)))
    assert not digits.small(digits.parse(body(solver="euler", nfe=6, n=21)))


# -- routes -----------------------------------------------------------------------------------------
@needs_digits
@pytest.mark.parametrize("method, path, status", [
    ("GET", "/healthz", 200), ("HEAD", "/healthz", 200), ("HEAD", "/v1/model", 200), ("GET", "/v1/stats/", 200),
    ("GET", "/v1/sample", 405), ("PUT", "/v1/sample", 405), ("POST", "/healthz", 405), ("DELETE", "/v1/model", 405),
    ("GET", "/v2/sample", 404), ("POST", "/" + "x" * 5000, 404),
])
def test_routes(digits, method, path, status):
    reply = digits.route(method, path)
    if (method, path) == ("POST", "/v1/sample"):
        assert reply is None
        return
    assert reply.status == status and reply.media_type == "application/json"
    if method == "HEAD":
        assert reply.body == b"" and int(reply.headers["Content-Length"]) == len(digits.route("GET", path).body)
    elif status != 200:
        error = json.loads(reply.body)["error"]
        assert len(error) < 300 and ("Allow" in reply.headers) == (status == 405)
    assert digits.route("POST", "/v1/sample") is None


# -- bundles from the real exporter (data_range null: latents) --------------------------------------
@pytest.fixture(scope="module")
def served(exported_bundles):  # noqa: F811
    from anchorflow.serve.service import open_replica

    return {k: open_replica(dict(model=str(v), backend="ort-cpu", max_n=16)) for k, v in exported_bundles.items()}


def _conds(core, n: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for d in core.model_conditions[0]:
        shape = [n if s == "batch" else length if isinstance(s, str) else s for s in d.shape]
        out[d.name] = rng.standard_normal(shape).astype(np.float32)
    return out


@pytest.mark.parametrize("kind", ["sd3", "factory"])
def test_exported_bundles_serve_npy_and_json_and_refuse_png(served, kind):
    core, image = served[kind]
    assert image is None  # the replica's constructor no longer dies on data_range null
    c = _conds(core, 3, 4, seed=1)
    raw = body(solver="euler", nfe=3, n=3, seed=7, conditions={k: npy64(v) for k, v in c.items()})
    rep = core.sample_batch([core.parse(raw)])[0]
    want = solve("euler", core.model.velocity, start_noise(7, 3, core.meta["state_shape"]), 3, cond=c).x
    assert rep.error is None and np.array_equal(rep.x, want)  # same inputs, same runtime: bit-identical
    from anchorflow.serve.encode import encode

    js = json.loads(encode(rep, "euler", "json", image).body)
    assert np.array_equal(np.frombuffer(base64.b64decode(js["data"]), "<f4").reshape(js["shape"]), want)
    with pytest.raises(RequestError, match="not an image .*data_range is null.*ask for 'npy' or 'json'"):
        core.parse(body(solver="euler", nfe=3, n=3, format="png", conditions={k: npy64(v) for k, v in c.items()}))


@pytest.mark.parametrize("kind", ["sd3", "factory"])
def test_exported_bundles_messages_name_http_fields(served, kind):
    """cfg 3 without conditions: the model needs conditions (not 'unconditional'); no CLI advice."""
    core, _ = served[kind]
    names = [d.name for d in core.model_conditions[0]]
    for raw in (body(solver="euler", nfe=3, cfg=3), body(solver="euler", nfe=3)):
        with pytest.raises(RequestError) as info:
            core.parse(raw)
        msg = str(info.value)
        assert "unconditional" not in msg and "--cond" not in msg and "'conditions'" in msg
        assert all(n in msg for n in names)
    with pytest.raises(RequestError, match="takes no class labels.*drop 'labels'.*its conditions go in 'conditions'"):
        core.parse(body(solver="euler", nfe=3, labels=[1], conditions={k: npy64(v) for k, v in
                                                                       _conds(core, 1, 2, 0).items()}))
    nan = {k: npy64(np.full_like(v, np.nan)) for k, v in _conds(core, 1, 2, 0).items()}
    with pytest.raises(RequestError, match="holds NaN or Inf"):
        core.parse(body(solver="euler", nfe=3, conditions=nan))


# -- `anchorflow serve` options refused up front (no Ray started, no hang) ---------------------------
def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anchorflow.cli", "serve", "default", "--port", "1", *args],
                          capture_output=True, text=True, timeout=timeout)


@needs_digits
@pytest.mark.parametrize("args, words", [
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a finite number >= 0"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a finite number >= 0"),
    (["--mu-factor", "nan"], "--mu-factor must be a finite number > 0"),
    (["--mu-factor", "-1"], "--mu-factor must be a finite number > 0"),
    (["--replica-cpus", "1000", "--num-cpus", "2"], "--replica-cpus must be a finite number > 0 and <= 2"),
    (["--replica-cpus", "nan"], "--replica-cpus must be a finite number"),
    (["--replicas", "3", "--num-cpus", "2"], "needs 3 CPUs and the local Ray instance has 2"),
    (["--time-budget-s", "inf"], "--time-budget-s must be a finite number"),
    (["--max-body-mb", "0"], "--max-body-mb must be a finite number > 0"),
    (["--address", "bogus"], "--address must be HOST:PORT"),
])
def test_bad_serve_options_are_refused_before_ray_starts(args, words):
    t0 = time.monotonic()
    proc = _serve(*args)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and time.monotonic() - t0 < 30


def test_an_address_that_does_not_answer_fails_within_the_stated_time():
    import socket

    from anchorflow.base.errors import BackendError
    from anchorflow.serve.app import ADDRESS_TIMEOUT_S, check_address

    with pytest.raises(BackendError, match=f"no Ray cluster answers at 127.0.0.1:1 within {ADDRESS_TIMEOUT_S:g} s"):
        check_address("127.0.0.1:1")  # refused
    with socket.socket() as mute:      # accepts TCP (the kernel's backlog) and never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="within 0.5 s"):
            check_address(f"127.0.0.1:{mute.getsockname()[1]}", timeout_s=0.5)
        assert time.monotonic() - t0 < 0.5 + 2


def test_a_bundle_a_replica_could_not_open_fails_in_one_line_before_ray(tmp_path, exported_bundles):  # noqa: F811
    """The replica's constructor runs once in the CLI before Ray starts: a broken backbone graph is one
    error line within seconds, not Ray's generic failure after minutes."""
    import shutil

    bundle = tmp_path / "broken"
    shutil.copytree(exported_bundles["factory"], bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "backbone.onnx").write_bytes(b"not onnx")
    meta["networks"]["backbone"]["sha256"] = __import__("hashlib").sha256(b"not onnx").hexdigest()
    meta["networks"]["backbone"]["bytes"] = 8
    (bundle / "bundle.json").write_text(json.dumps(meta))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "serve", str(bundle), "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout and time.monotonic() - t0 < 60


class _FakeServe:
    """What app._deploy reads from ray.serve: run() blocking, status() reporting a failing replica."""

    def __init__(self, message: str, status: str = "UPDATING", run_s: float = 600.0) -> None:
        import threading

        self.message, self.state, self.release = message, status, threading.Event()
        self.run_s = run_s

    def run(self, app, name, route_prefix):
        self.release.wait(self.run_s)

    def status(self):
        from types import SimpleNamespace as NS

        dep = NS(status=f"DeploymentStatus.{self.state}", message=self.message)
        return NS(applications={"anchorflow": NS(status="ApplicationStatus.DEPLOYING", message="",
                                                 deployments={"anchorflow-sampler": dep})})


def test_a_replica_failing_under_ray_is_reported_at_once_with_its_own_error():
    """Ray retries a failing constructor for minutes; the CLI reads the deployment status while it
    waits and fails on the first report, with the replica's last traceback line."""
    from anchorflow.base.errors import BackendError
    from anchorflow.serve.app import _deploy

    fake = _FakeServe("The deployment failed to start 2 times in a row. Error:\nTraceback (most recent call last):\n"
                      "  File x\nKeyError: 'data_range'")
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"a sampler replica failed to start: KeyError: 'data_range'$"):
        _deploy(fake, None, timeout_s=60)
    assert time.monotonic() - t0 < 5
    fake.release.set()
    pending = _FakeServe("Deployment 'anchorflow-sampler' has 1 replicas that have taken more than 30s to be "
                         "scheduled: resources {'CPU': 1000.0} are not available")
    with pytest.raises(BackendError, match=r"not running within 1 s .*resources \{'CPU': 1000.0\}"):
        _deploy(pending, None, timeout_s=1.0)
    pending.release.set()
