"""`anchorflow serve` for real: Ray local (2 CPUs), Ray Serve's HTTP proxy on a free loopback port.

One service for the whole module (Ray starts once); the last test stops it with SIGTERM and
checks that no process it started is left. Truth: `anchorflow sample` with the same arguments.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from anchorflow.modelref import BUNDLED
from anchorflow.serve.client import ServiceProcess

pytest.importorskip("ray.serve", reason="anchorflow[serve] (ray[serve]) is not installed")
pytestmark = pytest.mark.skipif(not (BUNDLED / "digits" / "bundle" / "bundle.json").is_file(),
                                reason="the bundled digits bundle is not exported")

MAX_N = 100
MAX_BODY = 64 * 1024


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Service(ServiceProcess):
    """The module's service, with the processes it started (recorded once it is up)."""

    def __init__(self, tmp: Path) -> None:
        self.bandits = tmp / "bandits"
        super().__init__(["default", "--num-cpus", "2", "--bandit-dir", str(self.bandits), "--batch-wait-ms", "50",
                          "--max-n", str(MAX_N), "--backend", "ort-cpu", "--max-body-mb", str(MAX_BODY / 1024**2)],
                         cwd=str(tmp), log=str(tmp / "serve.log"))
        self.__enter__()
        self.children = descendants(self.proc.pid)
        self.get, self.post = self.client.get, self.client.sample


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("serve"))
    yield svc
    svc.stop()
    for pid in svc.children:  # only if the shutdown test did not run or failed: leave nothing behind
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def run_sample(tmp: Path, *args: str) -> tuple[np.ndarray, bytes, str]:
    out, npy = tmp / "s.png", tmp / "s.npy"
    proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "sample", "default", "--backend", "ort-cpu",
                           "--out", str(out), "--npy", str(npy), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(npy), out.read_bytes(), proc.stdout + proc.stderr  # stderr: the tuned-grid note


@pytest.mark.parametrize("solver, args", [
    ("ba", {"nfe": 6, "n": 5, "labels": [1, 2], "cfg": 1.5, "seed": 3}),
    ("euler", {"nfe": 5, "n": 4, "labels": [7], "cfg": 1.0, "seed": 11}),
    ("fastflow", {"nfe": 12, "n": 3, "labels": [4, 5, 6], "cfg": 1.0, "seed": 2}),
])
def test_results_equal_the_sample_command(service, tmp_path, solver, args):
    cli = ["--solver", solver, "--nfe", str(args["nfe"]), "--n", str(args["n"]), "--seed", str(args["seed"]),
           "--labels", ",".join(map(str, args["labels"])), "--cfg", str(args["cfg"])]  # both: the default grid
    # fastflow twice: the first run calibrates a fresh bandit, the second uses what it learned;
    # the service's state file and the command's must evolve identically
    for _ in range(2 if solver == "fastflow" else 1):
        state = ["--bandit-state", str(tmp_path / "bandit.json")] if solver == "fastflow" else []
        x_cli, png_cli, text = run_sample(tmp_path, *cli, *state)
        assert ("grid: tuned" in text) == (solver != "fastflow")  # BA and Euler are tuned in the bundle
        status, headers, body = service.post({"solver": solver, **args, "format": "npy"})
        assert status == 200, body
        assert np.array_equal(np.load(io.BytesIO(body)), x_cli)  # same noise, same batch: bit-identical
        if solver != "fastflow":  # and SamplePlan.run in-process (tests/test_serve_plan.py varies every field)
            from anchorflow.modelref import open_model
            from anchorflow.runtime.plan import plan

            p = plan(open_model("default", backend="ort-cpu"), solver=solver, nfe=args["nfe"], n=args["n"],
                     seed=args["seed"], labels=args["labels"], cfg_scale=args["cfg"])
            assert np.array_equal(np.load(io.BytesIO(body)), p.run().x)
        calls = re.search(r"(\d+) backbone calls, (\d+) SideNet calls", text).groups()
        assert (headers["x-anchorflow-backbone-calls"], headers["x-anchorflow-sidenet-calls"]) == calls
        assert float(headers["x-anchorflow-time-ms"]) > 0
        status, headers, png = service.post({"solver": solver, **args, "format": "png"}) \
            if solver != "fastflow" else (200, {}, png_cli)
        assert status == 200 and png == png_cli
    if solver == "fastflow":
        served = json.loads(next(service.bandits.glob("fastflow-T12-*.json")).read_text())
        mine = json.loads((tmp_path / "bandit.json").read_text())
        assert served["generations"] == mine["generations"] == 2 and served["N"] == mine["N"]


def test_concurrent_requests_are_merged_into_fewer_solves(service):
    from anchorflow.modelref import open_model
    from anchorflow.runtime import solve
    from anchorflow.sampling import cycle_labels, start_noise
    from anchorflow.tuning import sampling_setup

    before = json.loads(service.get("/v1/stats")[2])
    bodies = [{"solver": "ba", "nfe": 4, "n": 1 + i % 3, "labels": [i % 10], "cfg": 1.5, "seed": 100 + i}
              for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(service.post, bodies))
    after = json.loads(service.get("/v1/stats")[2])
    assert [r[0] for r in replies] == [200] * 20
    assert after["requests"] - before["requests"] == 20
    solves = after["solves"] - before["solves"]
    assert 1 <= solves < 20, f"{solves} solves for 20 concurrent compatible requests"
    assert max(int(h["x-anchorflow-batch-requests"]) for _, h, _ in replies) > 1
    m = open_model("default", backend="ort-cpu", need_sidenet=True)
    grid = sampling_setup(m.files.bundle, "ba", 4, None)[0]  # no "grid" in the request: sample's default
    for b, (_, _, body) in zip(bodies, replies):
        ref = solve("ba", m.velocity, start_noise(b["seed"], b["n"], (1, 8, 8)), 4, sidenet=m.sidenet,
                    y=cycle_labels(b["labels"], b["n"], 10), cfg_scale=1.5, null_label=10, grid=grid).x
        # merged rows equal a lone run: bit-identical here; see tests/test_serve_core.py for the bound
        np.testing.assert_allclose(np.load(io.BytesIO(body)), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("body, words", [
    (b'{"solver": "ba", "nfe": ', "not valid JSON"),
    (b'{"solver": "dpm-fast"}', "unknown solver"),
    (b'{"solver": "heun", "nfe": 4}', "must be one of 3, 5, 7"),
    (b'{"solver": "ba", "nfe": -1}', "'nfe' must be"),
    (b'{"labels": [0, 12]}', "0..9"),
    (json.dumps({"n": MAX_N + 1}).encode(), f"'n' must be in 1..{MAX_N}"),
])
def test_bad_requests_get_400_with_a_message(service, body, words):
    status, headers, reply = service.post(body)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert words in json.loads(reply)["error"]


def test_model_endpoint_and_torch_free_replica(service):
    status, _, body = service.get("/v1/model")
    info = json.loads(body)
    assert status == 200 and info["model"]["state_shape"] == [1, 8, 8]
    assert info["limits"]["max_n"] == MAX_N and info["torch_imported"] is False
    assert service.get("/v1/nothing")[0] == 404


def _npy64(a: np.ndarray) -> str:
    import base64

    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("method, path, body, status, words", [
    ("POST", "/v1/sample", b'{"cfg": 0}', 400, "'cfg' must be finite and > 0"),
    ("POST", "/v1/sample", b"[" * 5000, 400, "nests deeper"),
    ("POST", "/v1/sample", b'{"seed": 4294967296}', 400, "'seed' must be in 0..4294967295"),
    ("POST", "/v1/sample", b'{"n": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    ("POST", "/v1/sample", b'{"grid": "' + b"1," * MAX_BODY + b'"}', 413, f"limit of {MAX_BODY} bytes"),
    ("GET", "/v1/sample", None, 405, "GET /v1/sample is not allowed; use POST"),
    ("POST", "/healthz", b"{}", 405, "use GET or HEAD /healthz"),
    ("GET", "/v1/nothing", None, 404, "no such endpoint"),
])
def test_each_http_error_class_is_json_and_leaves_the_replica_healthy(service, method, path, body, status, words):
    import urllib.request

    req = urllib.request.Request(service.url + path, data=body, method=method)
    got, headers, reply = service.client._open(req)
    assert got == status and headers["content-type"].startswith("application/json")
    assert words in json.loads(reply)["error"]
    assert ("allow" in headers) == (status == 405)
    assert service.get("/healthz")[0] == 200
    ok = service.post({"solver": "euler", "nfe": 3, "n": 2})
    assert ok[0] == 200 and np.load(io.BytesIO(ok[2])).shape == (2, 1, 8, 8)


def test_head_healthz(service):
    import urllib.request

    got, headers, reply = service.client._open(urllib.request.Request(service.url + "/healthz", method="HEAD"))
    assert got == 200 and reply == b""


def test_a_bad_label_merged_with_good_requests_fails_alone(service):
    """9 concurrent requests, one with the class label -5 sent as the condition y (which would wrap to
    class 6) and one with 12 (which failed the whole merged solve): those two get 400, the 7 others 200
    and the samples a lone run gives."""
    from anchorflow.modelref import open_model
    from anchorflow.runtime import solve
    from anchorflow.sampling import start_noise
    from anchorflow.tuning import sampling_setup

    good = [{"solver": "euler", "nfe": 4, "n": 2, "labels": [i], "seed": 50 + i} for i in range(7)]
    bad = [{"solver": "euler", "nfe": 4, "n": 2, "conditions": {"y": _npy64(np.array([v, 1]))}} for v in (-5, 12)]
    bodies = good[:3] + bad[:1] + good[3:] + bad[1:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(service.post, bodies))
    assert [r[0] for r in replies] == [200] * 3 + [400] + [200] * 4 + [400]
    assert all("must be in 0..9" in json.loads(replies[i][2])["error"] for i in (3, 8))
    m = open_model("default", backend="ort-cpu")
    grid = sampling_setup(m.files.bundle, "euler", 4, None)[0]
    for b, (_, _, reply) in zip(bodies, replies):
        if "labels" in b:
            ref = solve("euler", m.velocity, start_noise(b["seed"], 2, (1, 8, 8)), 4, y=np.array(b["labels"] * 2),
                        null_label=10, grid=grid).x
            np.testing.assert_allclose(np.load(io.BytesIO(reply)), ref, rtol=0, atol=1e-5)


def test_a_request_whose_client_disconnected_is_not_solved(service):
    """A slow request occupies the large lane; a second large request is sent on a raw socket that is
    closed at once. Ray Serve cancels it while it waits for its batch, so only the first is solved."""
    import socket

    slow_body = {"solver": "euler", "nfe": 40, "n": 64, "seed": 2}
    before = service.client.stats()["requests"]
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(service.post, slow_body)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and service.client.stats()["solving"] < 1:
            time.sleep(0.05)
        data = json.dumps({**slow_body, "seed": 3}).encode()
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(b"POST /v1/sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            while time.monotonic() < deadline and service.client.stats()["pending"] < 2:
                time.sleep(0.05)  # admitted by the replica, queued behind the slow one
            assert service.client.stats()["solving"] == 1, "the slow request ended before the test could close"
        assert slow.result(timeout=120)[0] == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and service.client.stats()["pending"] > 0:
        time.sleep(0.2)
    time.sleep(1.0)
    assert service.client.stats()["requests"] - before == 1


def test_sigterm_drains_the_request_in_flight_and_leaves_no_ray_processes(service):
    """SIGTERM while a ~2-5 s request is being solved: it still gets its 200 and its samples; then the
    service exits 0 and every process it started is gone."""
    assert service.children, "the service started no Ray processes?"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(service.post, {"solver": "euler", "nfe": 40, "n": 64, "seed": 1})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and service.client.stats()["pending"] < 1:
            time.sleep(0.05)
        assert service.client.stats()["pending"] >= 1
        assert service.stop() == 0
        status, _, body = slow.result(timeout=120)
    assert status == 200 and np.load(io.BytesIO(body)).shape == (64, 1, 8, 8)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p) for p in service.children):
        time.sleep(0.5)
    left = [p for p in service.children if alive(p)]
    assert not left, f"processes left after shutdown: {left}"
