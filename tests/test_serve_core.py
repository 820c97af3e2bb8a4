"""The service's Ray-free core on the bundled digits bundle: validation, batching, encoding, admission.

Truth for every sample: ``anchorflow.runtime.solve`` run alone on the request's own noise (the
same as ``anchorflow sample``), on the same onnxruntime session type.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from anchorflow.modelref import BUNDLED
from anchorflow.plots import save_grid
from anchorflow.runtime import solve
from anchorflow.sampling import cycle_labels, start_noise
from anchorflow.serve.batching import plan
from anchorflow.serve.encode import encode
from anchorflow.serve.request import RequestError, SampleRequest, rows_limit
from anchorflow.tuning import sampling_setup

pytestmark = pytest.mark.skipif(not (BUNDLED / "digits" / "bundle" / "bundle.json").is_file(),
                                reason="the bundled digits bundle is not exported")

# Rows of a float32 network output do not depend on which other rows share the call (onnxruntime's
# CPU kernels are row-independent here; measured bit-identical), but a GEMM may block differently
# at another batch size: allow a few float32 ulp of the samples' O(1) values.
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from anchorflow.serve.service import SamplerService

    return SamplerService("default", backend="ort-cpu", max_batch=8, max_n=40, max_queue=2,
                          bandit_dir=str(tmp_path_factory.mktemp("bandits")))


def req(service, **body) -> SampleRequest:
    return service.parse(json.dumps(body).encode())


def lone(service, r: SampleRequest) -> np.ndarray:
    """What `anchorflow sample` computes for the request: one solve on its own noise and labels."""
    m = service.model
    y = cycle_labels(r.labels, r.n, m.meta["num_classes"])
    return solve(r.solver, m.velocity, start_noise(r.seed, r.n, m.meta["state_shape"]), r.nfe, y=y,
                 sidenet=m.sidenet, cfg_scale=r.cfg, cfg_interval=r.cfg_interval,
                 null_label=m.meta["null_label"], grid=sampling_setup(m.files.bundle, r.solver, r.nfe, None)[0]).x


def test_default_grid_is_the_tuned_one_sample_uses(service):
    """No "grid": the bundle's tuned grid for the solver and NFE (as `anchorflow sample`); "uniform"
    stays uniform, and the two never share a solve."""
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    tuned, plain = req(service, solver="ba", nfe=4, n=2), req(service, solver="ba", nfe=4, n=2, grid="uniform")
    want = read_tuning(service.model.files.bundle).grid_for("ba", 4).times
    assert not np.allclose(want, np.linspace(1, 0, 5))  # else this test could not tell the two apart
    np.testing.assert_array_equal(service.grid_for(tuned), want)
    np.testing.assert_array_equal(service.grid_for(plain), np.linspace(1, 0, 5))  # the plan's times: uniform
    assert tuned.key != plain.key
    a, b = service.sample_batch([tuned, plain])
    np.testing.assert_array_equal(a.x, lone(service, tuned))
    assert not np.allclose(a.x, b.x)


def test_merged_and_split_requests_equal_lone_runs(service):
    reqs = [req(service, solver="ba", nfe=4, n=3, labels=[1, 2], cfg=1.5, seed=1),
            req(service, solver="ba", nfe=4, n=11, cfg=1.5, seed=2),          # over 8 rows: split
            req(service, solver="euler", nfe=4, n=2, seed=3),                   # other key: own solve
            req(service, solver="ba", nfe=4, n=2, labels=[9], cfg=1.5, seed=4)]
    before = service.stats_snapshot()
    replies = service.sample_batch(reqs)
    after = service.stats_snapshot()
    # ba rows 3 + 11 + 2 = 16 -> two solves of 8 rows; euler -> one solve
    assert after["solves"] - before["solves"] == 3
    assert [r.solves for r in replies] == [1, 2, 1, 1]
    for r, rep in zip(reqs, replies):
        assert rep.error is None and rep.x.shape == (r.n, 1, 8, 8)
        np.testing.assert_allclose(rep.x, lone(service, r), rtol=0, atol=BATCH_ATOL)
        assert rep.nfe == 4
    assert replies[0].sidenet_calls == 4 and replies[2].sidenet_calls == 0  # BA (merged probes): N SideNet calls


def test_plan_packs_by_key_and_never_splits_fastflow(service):
    a = req(service, solver="fastflow", nfe=5, n=5, seed=0)
    b = req(service, solver="fastflow", nfe=5, n=5, seed=1)
    c = req(service, solver="euler", nfe=5, n=20, seed=2)
    solves = plan([a, c, b], service.rows_for)
    ff = [s for s in solves if s.key == a.key]
    assert [[(p.index, p.start, p.stop) for p in s.pieces] for s in ff] == [[(0, 0, 5)], [(2, 0, 5)]]
    eu = [s for s in solves if s.key == c.key]
    assert [s.rows for s in eu] == [8, 8, 4]


def test_rows_limit_follows_the_bundle_batch_range():
    # backbone max 128 rows, SideNet max 384: guided BA carries 2 x 4 SideNet rows per state row (merged probe)
    assert rows_limit(1000, guided=True, sidenet=True, backbone_max=128, sidenet_max=384) == 48
    assert rows_limit(1000, guided=False, sidenet=True, backbone_max=128, sidenet_max=384) == 96
    assert rows_limit(1000, guided=True, sidenet=False, backbone_max=128, sidenet_max=384) == 64
    assert rows_limit(5, guided=False, sidenet=False, backbone_max=128, sidenet_max=None) == 5


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"solver": "nope"}', "unknown solver"),
    (b'{"solver": "heun", "nfe": 4}', "must be one of 3, 5, 7"),
    (b'{"nfe": 0}', "'nfe' must be"),
    (b'{"nfe": 2.5}', "'nfe' must be an integer"),
    (b'{"labels": [3, 10]}', "0..9"),
    (b'{"n": 41}', "'n' must be in 1..40"),
    (b'{"solver": "fastflow", "nfe": 5, "n": 20, "cfg": 1.5}', "n must be <= 8"),
    (b'{"format": "gif"}', "unknown format"),
    (b'{"cfg_interval": [0.5, 0.2]}', "lo < hi"),
    (b'{"grid": "shift:x"}', "bad grid"),
    (b'{"sead": 1}', "unknown field"),
])
def test_bad_requests_are_refused_with_a_message(service, body, words):
    with pytest.raises(RequestError, match=words):
        service.parse(body)


def test_encodings_match_sample_outputs(service, tmp_path):
    r = req(service, solver="euler", nfe=3, n=12, seed=5, format="png")
    rep = service.sample_batch([r])[0]
    png = encode(rep, "euler", "png", (-1.0, 1.0))
    save_grid(rep.x, tmp_path / "grid.png", nrow=10)  # what `anchorflow sample --out` writes
    assert png.media_type == "image/png" and png.body == (tmp_path / "grid.png").read_bytes()
    js = json.loads(encode(rep, "euler", "json", (-1.0, 1.0)).body)
    back = np.frombuffer(base64.b64decode(js["data"]), "<f4").reshape(js["shape"])
    assert np.array_equal(back, rep.x)
    npy = encode(rep, "euler", "npy", (-1.0, 1.0))
    assert npy.headers["X-Anchorflow-Backbone-Calls"] == "3" and npy.headers["X-Anchorflow-Shape"] == "12,1,8,8"


def test_admission_is_bounded(service):
    assert service.admit() is None and service.admit() is None
    retry = service.admit()  # max_queue = 2
    assert isinstance(retry, int) and retry >= 1
    service.release()
    assert service.admit() is None
    service.release(), service.release()
    assert service.stats_snapshot()["pending"] == 0


def test_get_endpoints(service):
    info = json.loads(service.get("/v1/model").body)
    assert info["model"]["num_classes"] == 10 and info["limits"]["max_n"] == 40
    assert {s["name"] for s in info["solvers"]} >= {"ba", "euler", "fastflow"}
    assert service.get("/healthz").status == 200
    assert service.get("/nope").status == 404


def test_serve_command_refuses_a_model_without_a_bundle_before_starting_ray(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    for model, words in ((str(tmp_path / "missing"), "not found"), (str(tmp_path / "empty"), "neither a bundle")):
        proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "serve", model, "--port", "1"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout
