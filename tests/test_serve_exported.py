"""`anchorflow serve` for real on a bundle the exporter made from a tiny diffusers SD3 folder
(``data_range`` null: latents), the path whose replicas all died before.

One service for the module (Ray starts once, ~20-40 s on 2 loaded cores). Truth: ``solve`` on the
same bundle in-process with the same noise and conditions. The last test kills the CLI with
SIGKILL and checks that no process it started is left (the watchdog's job).
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _serve_bundles import exported_bundles  # noqa: F401  (session fixture)
from anchorflow.serve.client import ServiceProcess
from test_serve import _npy64, alive, descendants

pytest.importorskip("ray.serve", reason="anchorflow[serve] (ray[serve]) is not installed")


@pytest.fixture(scope="module")
def sd3(exported_bundles, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve_sd3")
    svc = ServiceProcess([str(exported_bundles["sd3"]), "--num-cpus", "2", "--backend", "ort-cpu",
                          "--batch-wait-ms", "50"], cwd=str(tmp), log=str(tmp / "serve.log"))
    svc.__enter__()
    svc.children = descendants(svc.proc.pid)
    svc.bundle = exported_bundles["sd3"]
    yield svc
    svc.stop(kill=True)
    for pid in svc.children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _conds(n: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"encoder_hidden_states": rng.standard_normal((n, length, 16)).astype(np.float32),
            "pooled_projections": rng.standard_normal((n, 8)).astype(np.float32)}


def test_three_requests_with_conditions_equal_solve(sd3):
    from anchorflow.runtime import load_bundle, solve
    from anchorflow.sampling import start_noise

    cases = [(_conds(2, 5, 1), 2, 11), (_conds(1, 5, 2), 3, 12), (_conds(2, 3, 3), 2, 13)]  # one row shared
    bodies = [{"solver": "euler", "nfe": 3, "n": n, "seed": seed, "conditions": {k: _npy64(v) for k, v in c.items()}}
              for c, n, seed in cases]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(sd3.client.sample, bodies))
    b = load_bundle(sd3.bundle, backend="ort-cpu")
    for (c, n, seed), (status, headers, body) in zip(cases, replies):
        assert status == 200, body
        rows = {k: np.repeat(v, n, axis=0) if v.shape[0] == 1 else v for k, v in c.items()}
        want = solve("euler", b.velocity, start_noise(seed, n, (4, 8, 8)), 3, cond=rows).x
        np.testing.assert_allclose(np.load(io.BytesIO(body)), want, rtol=0, atol=1e-5)  # merged rows: see test_serve_core


@pytest.mark.parametrize("body, words", [
    ({"solver": "euler", "nfe": 3, "format": "png", "conditions": "C"}, "not an image"),
    ({"solver": "euler", "nfe": 3, "cfg": 3}, "this model needs the condition(s) encoder_hidden_states"),
    ({"solver": "euler", "nfe": 3, "conditions": "C", "labels": [1]}, "takes no class labels"),
    ({"solver": "euler", "nfe": 3, "cfg": -1, "conditions": "C"}, "'cfg' must be finite and > 0"),
])
def test_bad_requests_on_an_exported_bundle_get_400_in_http_words(sd3, body, words):
    if body.get("conditions") == "C":
        body = {**body, "conditions": {k: _npy64(v) for k, v in _conds(1, 4, 0).items()}}
    status, headers, reply = sd3.client.sample(body)
    error = json.loads(reply)["error"]
    assert status == 400 and words in error and "--cond" not in error and "unconditional" not in error
    assert sd3.client.get("/healthz")[0] == 200


def test_model_endpoint_says_the_state_is_latents(sd3):
    info = json.loads(sd3.client.get("/v1/model")[2])
    assert info["model"]["data_range"] is None and info["formats"] == ["npy", "json"]
    assert [c["name"] for c in info["conditions"]] == ["encoder_hidden_states", "pooled_projections"]


def test_sigkill_of_the_cli_leaves_no_ray_process(sd3):
    assert len(sd3.children) >= 4, sd3.children
    os.kill(sd3.proc.pid, signal.SIGKILL)
    sd3.proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p) for p in sd3.children):
        time.sleep(0.5)
    left = [p for p in sd3.children if alive(p)]
    assert not left, f"processes left after SIGKILL: {left}"
