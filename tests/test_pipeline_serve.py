"""`anchorflow serve` on a pipeline bundle (issue 23): requests carry "prompt" / "negative_prompt" instead of
base64 conditions, and "format": "png" returns images decoded through the bundle's VAE.

The bundle is the one test_pipeline.py exports (a tiny random-init StableDiffusion3Pipeline through
`anchorflow export PIPELINE_FOLDER --sidenet`; shared per process). Truth: ``load_pipeline(B)(...)``
in-process (itself checked against the diffusers pipeline in test_pipeline.py) with the same prompt,
seed, solver, NFE and guidance. The HTTP tests run the real service through Ray Serve (one per module,
as tests/test_serve_exported.py does); the Ray-free ones call :class:`SamplerService` directly.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from _pipeline_fixtures import sd3_pipeline_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return sd3_pipeline_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def service(bundle):
    from anchorflow.serve.service import SamplerService

    return SamplerService(str(bundle), backend="ort-cpu", threads=1)


@pytest.fixture(scope="module")
def http(bundle, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="anchorflow[serve] (ray[serve]) is not installed")
    from anchorflow.serve.client import ServiceProcess

    tmp = tmp_path_factory.mktemp("serve_pipeline")
    with ServiceProcess([str(bundle), "--num-cpus", "2", "--backend", "ort-cpu", "--batch-wait-ms", "50"],
                        cwd=str(tmp), log=str(tmp / "serve.log")) as svc:
        yield svc


def _npy64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def _gen(bundle, prompt, negative=None, **kw):
    from anchorflow.runtime import load_pipeline

    return load_pipeline(bundle)(prompt, negative, **kw)


def _solve_alone(service, body: dict):
    req = service.parse(json.dumps(body).encode())
    reply = service.sample_batch([req])[0]
    assert reply.error is None, reply.error
    return req, reply


CASES = [  # (request body, the generate call it must equal)
    ({"prompt": "a red cat", "cfg": 4, "solver": "euler", "nfe": 3, "n": 2, "seed": 7},
     (("a red cat",), dict(cfg=4.0, solver="euler", nfe=3, n=2, seed=7))),
    ({"prompt": ["a red cat", "a dog on a car"], "negative_prompt": "blurry", "cfg": 3, "solver": "euler", "nfe": 3,
      "n": 2, "seed": 8}, ((["a red cat", "a dog on a car"], "blurry"), dict(cfg=3.0, solver="euler", nfe=3, seed=8))),
    ({"prompt": "a dog", "solver": "ba", "nfe": 4, "n": 1, "seed": 9, "cfg": 2},
     (("a dog",), dict(cfg=2.0, solver="ba", nfe=4, seed=9))),
]


def test_prompt_requests_equal_generate_ray_free(service, bundle):
    """SamplerService alone: each prompt request's latents are generate's for the same arguments (the
    scheduler's sigmas as its default grid, the negative prompt's rows as CFG's null rows)."""
    for body, (args, kw) in CASES:
        req, reply = _solve_alone(service, body)
        gen = _gen(bundle, *args, **kw)
        np.testing.assert_allclose(reply.x, gen.latents, rtol=0, atol=1e-5)
        assert reply.nfe == gen.result.nfe == kw["nfe"]
        assert req.grid == tuple(gen.result.grid.tolist())  # generate's grid, not sample's uniform one
    # the negative prompt is used: without it the image moves far beyond the tolerance above
    body, (args, kw) = CASES[1]
    plain = _solve_alone(service, {k: v for k, v in body.items() if k != "negative_prompt"})[1]
    assert np.abs(plain.x - _gen(bundle, *args, **kw).latents).max() > 1e-2


def test_png_is_the_vae_decoded_grid_ray_free(service, bundle):
    from PIL import Image

    from anchorflow.plots import grid_array
    from anchorflow.serve.encode import encode

    body = {**CASES[0][0], "format": "png"}
    req, reply = _solve_alone(service, body)
    gen = _gen(bundle, *CASES[0][1][0], **CASES[0][1][1])
    assert reply.images.shape == (2, 16, 16, 3) and reply.images.dtype == np.uint8
    http = encode(reply, req.solver, req.format, None)
    assert http.media_type == "image/png"
    got = np.asarray(Image.open(io.BytesIO(http.body)).convert("RGB")).astype(int)
    assert np.abs(got - grid_array(gen.images, nrow=2)).max() <= 1
    # "format": "npy" stays the latents, undecoded
    _, raw = _solve_alone(service, CASES[0][0])
    assert raw.images is None and raw.x.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("body, words", [
    ({"prompt": "a", "conditions": {"encoder_hidden_states": "x"}}, "either 'prompt' or 'conditions'"),
    ({"negative_prompt": "blurry"}, "'negative_prompt' needs 'prompt'"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "has 3 prompts; give one"),
    ({"prompt": 5}, "'prompt' must be a string or a list of n = 16 strings"),
    ({"prompt": "a", "negative_prompt": ["x", "y"]}, "'negative_prompt' must be a string"),
    ({"prompt": "a", "labels": [1]}, "takes no class labels"),
    ({"prompt": "a" * 20001}, "over this service's 20000"),
    ({"prompt": "a", "format": "gif"}, "unknown format"),
])
def test_bad_prompt_requests_are_one_400_line(service, body, words):
    from anchorflow.serve.request import RequestError

    before = dict(service.prompts.text.calls)
    with pytest.raises(RequestError, match=None) as exc:
        service.parse(json.dumps({"solver": "euler", "nfe": 2, **body}).encode())
    assert words in str(exc.value) and exc.value.status == 400 and "\n" not in str(exc.value)
    assert service.prompts.text.calls == before  # refused before any encoder ran


def test_a_transformer_bundle_refuses_prompt_and_png(bundle, tmp_path):
    from anchorflow.serve.request import RequestError
    from anchorflow.serve.service import SamplerService

    only = tmp_path / "only"
    shutil.copytree(bundle, only)
    meta = json.loads((bundle / "bundle.json").read_text())
    (only / "bundle.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "pipeline"}))
    svc = SamplerService(str(only), backend="ort-cpu", threads=1)
    assert svc.prompts is None and svc.decoder is None and svc.info()["formats"] == ["npy", "json"]
    for body, words in (({"prompt": "a red cat"}, "no text encoders"),
                        ({"format": "png", "conditions": {"encoder_hidden_states": "x"}}, "not an image")):
        with pytest.raises(RequestError, match=words):
            svc.parse(json.dumps({"solver": "euler", "nfe": 2, **body}).encode())


@pytest.mark.slow
def test_through_ray_serve_prompts_and_png(http, bundle):
    """The real service (Ray Serve, HTTP): three concurrent prompt requests (merged where they can be) equal
    generate; "format": "png" is the decoded image grid; GET /v1/model says it takes prompts and PNG."""
    from PIL import Image

    from anchorflow.plots import grid_array

    info = json.loads(http.client.get("/v1/model")[2])
    assert info["formats"] == ["npy", "png", "json"] and info["prompt"] == {"variant": "sd3", "guidance": "rows"}
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(http.client.sample, [b for b, _ in CASES]))
    for (body, (args, kw)), (status, headers, raw) in zip(CASES, replies):
        assert status == 200, raw
        gen = _gen(bundle, *args, **kw)
        np.testing.assert_allclose(np.load(io.BytesIO(raw)), gen.latents, rtol=0, atol=1e-5)
        assert headers["x-anchorflow-backbone-calls"] == str(kw["nfe"])
        if kw["solver"] == "ba":
            assert headers["x-anchorflow-sidenet-calls"] == str(kw["nfe"])
    status, headers, png = http.client.sample({**CASES[0][0], "format": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    gen = _gen(bundle, *CASES[0][1][0], **CASES[0][1][1])
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert np.abs(got - grid_array(gen.images, nrow=2)).max() <= 1
    status, _, raw = http.client.sample({"solver": "euler", "nfe": 2, "prompt": "a", "conditions": {"x": "y"}})
    assert status == 400 and "either 'prompt' or 'conditions'" in json.loads(raw)["error"]
