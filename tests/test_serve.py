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
                          "--max-n", str(MAX_N), "--backend", "ort-cpu"], cwd=str(tmp), log=str(tmp / "serve.log"))
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


def test_shutdown_leaves_no_ray_processes(service):
    assert service.children, "the service started no Ray processes?"
    assert service.stop() == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p) for p in service.children):
        time.sleep(0.5)
    left = [p for p in service.children if alive(p)]
    assert not left, f"processes left after shutdown: {left}"
