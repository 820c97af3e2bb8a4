"""Pipeline bundles, Sana: a tiny random-init SanaPipeline (Gemma2 text encoder with its
attention mask and the complex human instruction, DC-AE, Sana transformer with a static 16x16
latent, FlowMatchEulerDiscreteScheduler) exported through the CLI; the torch-free recipe equals
``encode_prompt`` as ``__call__`` calls it; ``generate`` equals the diffusers pipeline's image with and
without guidance for a batch of prompts. One resolution: the Sana adapter exports a static latent
size (see trainers/adapters/diffusers.py). The export takes ~35 s of CPU, hence slow."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from _pipeline_fixtures import cli_error, count_parts, generate_torch_free, measured_parity, run_cli  # noqa: E402
from _tiny_full_pipelines import sana  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.slow
PROMPTS = ["A Red cat ", "a dog on a car"]


@pytest.fixture(scope="session")
def sana_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    folder = sana(root / "pipe")
    mp = pytest.MonkeyPatch()
    run_cli(["export", str(folder), "--out", str(root / "b"), "--max-batch", "2"], mp)
    mp.undo()
    pipe = diffusers.SanaPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return root / "b", pipe, json.loads((root / "b" / "bundle.json").read_text())


def test_sana_embeddings_equal_encode_prompt(sana_case):
    from anchorflow.runtime.pipelines.pipeline import load_text

    bundle, pipe, meta = sana_case
    rec = meta["pipeline"]["recipe"]
    assert rec["instruction_tokens"] > 0 and meta["pipeline"]["vae"]["decoder"]["class"] == "AutoencoderDC"
    chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    ours = load_text(bundle).encode(PROMPTS, ["", "blurry"])
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, True, negative_prompt=["", "blurry"], device="cpu",
                                            complex_human_instruction=chi)
    for got, ref in ((ours.cond["encoder_hidden_states"], pe), (ours.null["encoder_hidden_states"], ne)):
        assert got.shape == tuple(ref.shape) == (2, 300, 16)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=0)
    np.testing.assert_array_equal(ours.cond["encoder_attention_mask"], pm.numpy())
    np.testing.assert_array_equal(ours.null["encoder_attention_mask"], nm.numpy())


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_sana_generate_equals_the_diffusers_pipeline(sana_case, cfg):
    from anchorflow.runtime import load_pipeline

    bundle, pipe, meta = sana_case
    lat = np.random.default_rng(2).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ref = pipe(PROMPTS, num_inference_steps=3, latents=torch.from_numpy(lat), guidance_scale=cfg, height=32, width=32,
               use_resolution_binning=False, output_type="np").images
    ours = load_pipeline(bundle)
    counters = count_parts(ours)
    gen = ours(PROMPTS, nfe=3, cfg=cfg, height=32, width=32, latents=lat)
    tol = 20 * (1 + 2 * cfg) * measured_parity(meta)  # see tests/test_pipeline.py::_tolerance
    assert gen.pixels.shape == ref.shape and np.abs(gen.pixels - ref).max() <= tol, np.abs(gen.pixels - ref).max()
    np.testing.assert_array_equal(gen.result.grid, pipe.scheduler.sigmas.numpy().astype(np.float64))
    assert counters["transformer"].calls == 3 and counters["text_encoder"].calls == counters["vae_decoder"].calls == 1


def test_sana_generate_cli_torch_free(sana_case, tmp_path):
    """`anchorflow generate` with torch/diffusers/transformers blocked equals the diffusers pipeline (CFG rows)."""
    bundle, pipe, meta = sana_case
    lat = np.random.default_rng(6).standard_normal((2, 4, 16, 16)).astype(np.float32)
    got, out = generate_torch_free(bundle, tmp_path, PROMPTS, lat, "--nfe", "2", "--cfg", "3", "--negative-prompt",
                                   "blurry")
    assert "2 transformer calls" in out
    ref = pipe(PROMPTS, negative_prompt="blurry", num_inference_steps=2, latents=torch.from_numpy(lat),
               guidance_scale=3.0, height=32, width=32, use_resolution_binning=False, output_type="np").images
    assert np.abs(got - ref).max() <= 20 * 7 * measured_parity(meta)


def test_sana_static_size_is_refused_otherwise(sana_case, tmp_path, monkeypatch, capsys):
    bundle, _, _ = sana_case
    line = cli_error(["generate", str(bundle), "--prompt", "a", "--height", "64", "--out", str(tmp_path / "x.png")],
                     monkeypatch, capsys)
    assert "32..32 pixels" in line and not (tmp_path / "x.png").exists()


def test_sana_prompt_requests_through_the_service(sana_case):
    """`serve` (its Ray-free core) on the Sana bundle: a guided "prompt" + "negative_prompt" request with
    "format": "png" equals generate's latents and images (Gemma's attention mask travels as a condition)."""
    from anchorflow.runtime import load_pipeline
    from anchorflow.serve.service import SamplerService

    bundle, _, _ = sana_case
    svc = SamplerService(str(bundle), backend="ort-cpu", threads=1)
    body = {"prompt": PROMPTS, "negative_prompt": "blurry", "solver": "euler", "nfe": 3, "n": 2, "seed": 5, "cfg": 3,
            "format": "png"}
    req = svc.parse(json.dumps(body).encode())
    reply = svc.sample_batch([req])[0]
    assert reply.error is None, reply.error
    gen = load_pipeline(bundle)(PROMPTS, "blurry", nfe=3, cfg=3.0, seed=5)
    np.testing.assert_allclose(reply.x, gen.latents, rtol=0, atol=1e-5)
    assert reply.images.shape == (2, 32, 32, 3) and np.abs(reply.images.astype(int) - gen.images).max() <= 1
