"""Issue 31's HTTP classes over real HTTP (Ray Serve's proxy, `anchorflow serve` in a subprocess): each bad
request gets its status (400, 413, 405) with a JSON ``{"error": ...}`` body that names no internal
exception, and the replica is still healthy afterwards: /healthz answers and a fixed good request returns
the very bytes it returned before any bad request was sent.

tests/test_serve.py has the transport-level classes (nesting, huge integer, seed 2^32, 413, 405, 404);
here are the rest of the issue's list (wrapped and float labels, cfg the CLI refuses, seed 2^63, the
per-request cost limit, unknown and nested fields, a label sent as the condition y), in one service.

The service serves a copy of the digits bundle whose bundle.json names a factory that would write a
marker file if imported or run (the must-show marker test, for a real `anchorflow serve`): no request,
good or bad, ever creates it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="anchorflow[serve] (ray[serve]) is not installed")

from anchorflow.serve.client import ServiceProcess  # noqa: E402

from _bundles import copy_root  # noqa: E402
from _trust_bundles import name_source, write_evil  # noqa: E402
from test_serve import MAX_BODY, MAX_N, alive, descendants  # noqa: E402  (the same harness, our own service)

pytestmark = pytest.mark.slow
GOOD = {"solver": "euler", "nfe": 3, "n": 2, "seed": 7, "labels": [3]}


def _y(values) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values))
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust-serve")
    marker = tmp / "MARKER"
    bundle = copy_root(tmp / "evil", ("bundle",)) / "bundle"
    name_source(bundle, write_evil(tmp / "evilsrc", marker)["file"])
    s = ServiceProcess([str(bundle), "--num-cpus", "2", "--bandit-dir", str(tmp / "bandits"), "--batch-wait-ms",
                        "50", "--max-n", str(MAX_N), "--backend", "ort-cpu", "--max-body-mb", str(MAX_BODY / 1024**2)],
                       cwd=str(tmp), log=str(tmp / "serve.log"))
    s.__enter__()
    s.children, s.marker = descendants(s.proc.pid), marker
    s.get, s.post = s.client.get, s.client.sample
    status, _, body = s.post(GOOD)
    assert status == 200
    s.reference = body
    yield s
    s.stop()
    for pid in s.children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not marker.exists(), "serving the bundle ran the code its bundle.json names"


CLASSES = [
    ("POST", "/v1/sample", {"labels": [-5]}, 400, "must be integers in 0..9"),        # wrapped to class 5
    ("POST", "/v1/sample", {"labels": [1.0]}, 400, "'labels' must be integers, got 1.0"),
    ("POST", "/v1/sample", {"labels": [12]}, 400, "0..9"),                              # was a 500
    ("POST", "/v1/sample", {"solver": "euler", "nfe": 3, "n": 2, "conditions": {"y": _y([-5, 1])}}, 400, "must be in 0..9"),
    ("POST", "/v1/sample", {"solver": "euler", "nfe": 3, "conditions": {"y": _y([2.0])}}, 400, "must be int64"),
    ("POST", "/v1/sample", {"cfg": -1}, 400, "'cfg' must be finite and > 0"),
    ("POST", "/v1/sample", {"cfg": -5.5}, 400, "'cfg' must be finite and > 0"),
    ("POST", "/v1/sample", {"cfg": 1e300}, 400, "above the cap"),                       # was all-inf with a 200
    ("POST", "/v1/sample", b'{"cfg": NaN}', 400, "'cfg' must be a finite number"),
    ("POST", "/v1/sample", {"seed": 2**63}, 400, "'seed' must be in 0..4294967295"),
    ("POST", "/v1/sample", {"solver": "euler", "nfe": 200, "n": 100, "seed": 1}, 400, "n x nfe = 100 x 200"),
    ("POST", "/v1/sample", {"nope": 1}, 400, "unknown field"),
    ("POST", "/v1/sample", {"grid": [[[[1.0]]]]}, 400, "nests deeper"),
    ("POST", "/v1/sample", b"{" * 3 + b"]", 400, "not valid JSON"),
    ("POST", "/v1/sample", b'{"labels": [' + b"1," * 40000 + b'1]}', 413, "limit of"),
    ("PUT", "/v1/sample", b"{}", 405, "use POST"),
    ("DELETE", "/healthz", None, 405, "/healthz"),
]


@pytest.mark.parametrize("method, path, body, status, words", CLASSES,
                         ids=[f"{i}-{c[3]}-{c[4][:24]}" for i, c in enumerate(CLASSES)])
def test_each_bad_request_is_its_status_with_a_json_error_and_the_replica_stays_healthy(svc, method, path, body,
                                                                                         status, words):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(svc.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    got, headers, reply = svc.client._open(req)
    assert got == status and headers["content-type"].startswith("application/json"), (got, reply[:200])
    error = json.loads(reply)["error"]
    assert words in error and len(error) < 400, error
    assert "Traceback" not in error and "Error:" not in error  # no internal exception's name and text
    assert svc.get("/healthz")[0] == 200
    again = svc.post(GOOD)
    assert again[0] == 200 and again[2] == svc.reference  # the same bytes as before any bad request
    assert not svc.marker.exists()


def test_head_healthz_is_an_empty_200(svc):
    got, headers, reply = svc.client._open(urllib.request.Request(svc.url + "/healthz", method="HEAD"))
    assert got == 200 and reply == b""


def test_the_served_bundle_names_code_that_would_leave_a_marker(svc):
    """The check above could fail: the bundle does name the evil factory, and running it writes the marker."""
    import runpy

    meta = json.loads(svc.client.get("/v1/model")[2])
    assert meta["model"]["state_shape"] == [1, 8, 8]
    bundle = svc.args[0]
    source = json.loads(open(os.path.join(bundle, "bundle.json")).read())["networks"]["backbone"]["source"]["path"]
    assert not svc.marker.exists()
    runpy.run_path(source.rsplit(":", 1)[0])  # what importing it would do
    assert svc.marker.exists()
    svc.marker.unlink()
