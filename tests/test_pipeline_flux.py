"""Pipeline bundles, FLUX-dev and FLUX-schnell: tiny random-init FluxPipelines (CLIPTextModel,
T5, AutoencoderKL, FLUX transformer with 2x2 packing, dynamic-shift scheduler) exported through the
CLI; the torch-free recipe equals ``encode_prompt``; ``generate`` equals the diffusers pipeline's
image on the same (packed for diffusers) latents and sigmas at two resolutions for a batch of
prompts, with FLUX-dev's embedded guidance at two scales; schnell refuses guidance and negative prompts.
Each export takes ~30 s of CPU, hence slow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from _pipeline_fixtures import cli_error, count_parts, generate_torch_free, measured_parity, pack, run_cli  # noqa: E402
from _tiny_full_pipelines import flux  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.slow
PROMPTS = ["a red cat", "a dog on a car"]


@pytest.fixture(scope="session", params=["flux-dev", "flux-schnell"])
def flux_case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = flux(root / "pipe", dev=request.param == "flux-dev")
    mp = pytest.MonkeyPatch()
    run_cli(["export", str(folder), "--out", str(root / "b"), "--max-batch", "2"], mp)
    mp.undo()
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return request.param, root / "b", pipe, json.loads((root / "b" / "bundle.json").read_text())


def test_flux_bundle_and_embeddings(flux_case):
    from anchorflow.runtime.pipelines.pipeline import load_text

    variant, bundle, pipe, meta = flux_case
    p = meta["pipeline"]
    assert p["variant"] == variant and list(p["text_encoders"]) == ["text_encoder", "text_encoder_2"]
    assert [e["class"] for e in p["text_encoders"].values()] == ["CLIPTextModel", "T5EncoderModel"]
    assert meta["guidance"]["mode"] == ("embedded" if variant == "flux-dev" else "none")
    ours = load_text(bundle).encode(PROMPTS + [""])
    with torch.no_grad():
        pe, pp, _ = pipe.encode_prompt(PROMPTS + [""], PROMPTS + [""], device="cpu", max_sequence_length=512)
    for got, ref in ((ours.cond["encoder_hidden_states"], pe.numpy()), (ours.cond["pooled_projections"], pp.numpy())):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("hw", [(16, 16), (24, 32)])
def test_flux_generate_equals_the_diffusers_pipeline(flux_case, hw):
    from anchorflow.runtime import load_pipeline

    variant, bundle, pipe, meta = flux_case
    h, w = hw
    lat = np.random.default_rng(3).standard_normal((2, 4, h // 2, w // 2)).astype(np.float32)
    ours = load_pipeline(bundle)
    counters = count_parts(ours)
    for cfg in ((2.0, 5.0) if variant == "flux-dev" else (1.0,)):
        ref = pipe(PROMPTS, num_inference_steps=3, latents=torch.from_numpy(pack(lat)), guidance_scale=cfg, height=h,
                   width=w, output_type="np").images
        gen = ours(PROMPTS, nfe=3, cfg=cfg, height=h, width=w, latents=lat)
        tol = 20 * 3 * measured_parity(meta)  # see tests/test_pipeline.py::_tolerance; guidance enters once
        assert gen.pixels.shape == ref.shape and np.abs(gen.pixels - ref).max() <= tol, np.abs(gen.pixels - ref).max()
        np.testing.assert_array_equal(gen.result.grid, pipe.scheduler.sigmas.numpy().astype(np.float64))
    if variant == "flux-dev":  # the embedded guidance really reaches the transformer
        assert np.abs(ours(PROMPTS, nfe=3, cfg=2.0, height=h, width=w, latents=lat).pixels - gen.pixels).max() > tol
    runs = 3 if variant == "flux-dev" else 1  # generate calls made above
    assert counters["transformer"].calls == 3 * runs  # nfe 3 each, no guidance rows
    for name in ("text_encoder", "text_encoder_2", "vae_decoder"):
        assert counters[name].calls == runs, name


def test_flux_generate_cli_torch_free(flux_case, tmp_path):
    """`anchorflow generate` with torch/diffusers/transformers blocked equals the diffusers pipeline."""
    variant, bundle, pipe, meta = flux_case
    lat = np.random.default_rng(4).standard_normal((2, 4, 8, 12)).astype(np.float32)
    cfg = 3.0 if variant == "flux-dev" else 1.0
    got, out = generate_torch_free(bundle, tmp_path, PROMPTS, lat, "--height", "16", "--width", "24", "--nfe", "2",
                                   *(["--cfg", "3"] if variant == "flux-dev" else []))
    assert "2 transformer calls" in out
    ref = pipe(PROMPTS, num_inference_steps=2, latents=torch.from_numpy(pack(lat)), guidance_scale=cfg, height=16,
               width=24, output_type="np").images
    assert np.abs(got - ref).max() <= 20 * 3 * measured_parity(meta)


def test_flux_refuses_what_it_cannot_guide(flux_case, tmp_path, monkeypatch, capsys):
    variant, bundle, _, _ = flux_case
    out = tmp_path / "x.png"
    line = cli_error(["generate", str(bundle), "--prompt", "a", "--negative-prompt", "b", "--out", str(out)],
                     monkeypatch, capsys)
    assert "no negative-prompt guidance" in line
    if variant == "flux-schnell":
        assert "no guidance" in cli_error(["generate", str(bundle), "--prompt", "a", "--cfg", "3", "--out", str(out)],
                                          monkeypatch, capsys)
    line = cli_error(["generate", str(bundle), "--prompt", "a", "--height", "18", "--out", str(out)], monkeypatch, capsys)
    assert "a multiple of 4" in line
    assert not out.exists()


def test_flux_prompt_requests_through_the_service(flux_case):
    """`serve` (its Ray-free core) on a FLUX pipeline bundle: a "prompt" request with "format": "png" equals
    generate's latents and images; FLUX-dev's 'cfg' is the embedded guidance (two scales differ), FLUX-schnell
    refuses 'cfg'; neither takes 'negative_prompt'."""
    from anchorflow.runtime import load_pipeline
    from anchorflow.serve.request import RequestError
    from anchorflow.serve.service import SamplerService

    variant, bundle, _, _ = flux_case
    svc = SamplerService(str(bundle), backend="ort-cpu", threads=1)
    assert "png" in svc.info()["formats"] and svc.info()["prompt"]["variant"] == variant
    pipe = load_pipeline(bundle)
    xs = []
    for cfg in ((2.0, 5.0) if variant == "flux-dev" else (1.0,)):
        body = {"prompt": PROMPTS, "solver": "euler", "nfe": 3, "n": 2, "seed": 4, "cfg": cfg, "format": "png"}
        req = svc.parse(json.dumps(body).encode())
        reply = svc.sample_batch([req])[0]
        assert reply.error is None, reply.error
        gen = pipe(PROMPTS, nfe=3, cfg=cfg, seed=4)
        np.testing.assert_allclose(reply.x, gen.latents, rtol=0, atol=1e-5)
        assert np.abs(reply.images.astype(int) - gen.images).max() <= 1
        xs.append(reply.x)
    if variant == "flux-dev":
        assert np.abs(xs[0] - xs[1]).max() > 1e-3
    bad = [({"prompt": "a", "negative_prompt": "b"}, "no negative-prompt guidance")]
    if variant == "flux-schnell":
        bad.append(({"prompt": "a", "cfg": 3}, "has no guidance"))
    for body, words in bad:
        with pytest.raises(RequestError, match=words):
            svc.parse(json.dumps({"solver": "euler", "nfe": 2, **body}).encode())
