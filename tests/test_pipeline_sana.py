"""Pipeline bundles, Sana: a tiny random-init SanaPipeline (Gemma2 text encoder with its
attention mask and the complex human instruction, DC-AE, Sana transformer with 16x16 latents at
sample_size, FlowMatchEulerDiscreteScheduler) exported through the CLI with latent H, W dynamic; the
torch-free recipe equals ``encode_prompt`` as ``__call__`` calls it; ``generate`` equals the diffusers
pipeline's image with and without guidance for a batch of prompts at two resolutions (32x32 and 32x64
pixels: the transformer's Mix-FFN reshape and the DC-AE both at a non-square size); a size outside the
exported range or off the patch x VAE multiple is refused; a Sana with a sin-cos position table
(interpolation_scale, as Sana 2K/4K) exports dynamic too and equals the diffusers transformer at
sample_size and off it. The export takes ~35 s of CPU, hence slow."""

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


def _tolerance(meta: dict, cfg: float) -> float:
    """tests/test_pipeline.py::_tolerance: each part's measured fp32 error enters a step through the
    [cond, null] mix with weight <= 1 + 2 cfg, the steps' |dt| sum to 1, 20x covers the tiny nets' growth."""
    return 20 * (1 + 2 * cfg) * measured_parity(meta)


def test_sana_bundle_is_dynamic_in_h_and_w(sana_case):
    _, _, meta = sana_case
    bb = meta["networks"]["backbone"]
    x = next(i for i in bb["inputs"] if i["name"] == "x")
    assert x["shape"] == ["batch", 4, "H", "W"]
    assert bb["axes"]["H"] == bb["axes"]["W"] == {"min": 2, "opt": 16, "max": 64}
    assert meta["pipeline"]["image"] == {"min": 4, "opt": 32, "max": 128, "multiple": 2}
    # the export's own parity check ran at two latent sizes (opt and one off it), both within 1e-4
    sizes = {" ".join(w for w in c["case"].split() if w[:2] in ("H=", "W=")) for c in bb["validation"]["cases"]}
    assert sizes == {"H=16 W=16", "H=9 W=9"} and float(bb["validation"]["worst"]["max_abs"]) <= 1e-4, sizes


@pytest.mark.parametrize("cfg, hw", [(1.0, (32, 32)), (4.5, (32, 32)), (1.0, (32, 64)), (4.5, (32, 64))])
def test_sana_generate_equals_the_diffusers_pipeline(sana_case, cfg, hw):
    from anchorflow.runtime import load_pipeline

    bundle, pipe, meta = sana_case
    h, w = hw
    lat = np.random.default_rng(2).standard_normal((2, 4, h // 2, w // 2)).astype(np.float32)
    ref = pipe(PROMPTS, num_inference_steps=3, latents=torch.from_numpy(lat), guidance_scale=cfg, height=h, width=w,
               use_resolution_binning=False, output_type="np").images
    ours = load_pipeline(bundle)
    counters = count_parts(ours)
    gen = ours(PROMPTS, nfe=3, cfg=cfg, height=h, width=w, latents=lat)
    tol = _tolerance(meta, cfg)
    err = np.abs(gen.pixels - ref).max()
    assert gen.pixels.shape == ref.shape == (2, h, w, 3) and err <= tol, (err, tol)
    np.testing.assert_array_equal(gen.result.grid, pipe.scheduler.sigmas.numpy().astype(np.float64))
    assert counters["transformer"].calls == 3 and counters["text_encoder"].calls == counters["vae_decoder"].calls == 1
    # the tolerance is meaningful: the image of other start latents is far outside it
    other = ours(PROMPTS, nfe=3, cfg=cfg, height=h, width=w, latents=lat[::-1].copy())
    assert np.abs(other.pixels - ref).max() > 10 * tol


def test_sana_generate_cli_torch_free(sana_case, tmp_path):
    """`anchorflow generate` with torch/diffusers/transformers blocked equals the diffusers pipeline (CFG rows)."""
    bundle, pipe, meta = sana_case
    lat = np.random.default_rng(6).standard_normal((2, 4, 32, 16)).astype(np.float32)
    got, out = generate_torch_free(bundle, tmp_path, PROMPTS, lat, "--nfe", "2", "--cfg", "3", "--negative-prompt",
                                   "blurry", "--height", "64", "--width", "32")
    assert "2 transformer calls" in out
    ref = pipe(PROMPTS, negative_prompt="blurry", num_inference_steps=2, latents=torch.from_numpy(lat),
               guidance_scale=3.0, height=64, width=32, use_resolution_binning=False, output_type="np").images
    assert got.shape == ref.shape == (2, 64, 32, 3) and np.abs(got - ref).max() <= _tolerance(meta, 3.0)


@pytest.mark.parametrize("flags, said", [(["--height", "256"], "--height 256"), (["--width", "2"], "--width 2"),
                                         (["--width", "33"], "--width 33")])
def test_sana_size_outside_the_range_or_multiple_is_refused(sana_case, tmp_path, monkeypatch, capsys, flags, said):
    """Exported latents 2..64 (4..128 pixels through the factor-2 DC-AE), multiples of 2 pixels."""
    bundle, _, _ = sana_case
    line = cli_error(["generate", str(bundle), "--prompt", "a", *flags, "--out", str(tmp_path / "x.png")],
                     monkeypatch, capsys)
    assert said in line and "4..128 pixels, a multiple of 2" in line and not (tmp_path / "x.png").exists()


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


def test_sana_with_a_sincos_position_table_exports_dynamic(tmp_path_factory):
    """Sana 2K/4K carry a sin-cos position table (interpolation_scale): diffusers recomputes it off
    sample_size in a python branch; the adapter computes it in the graph at every size. Truth: the
    ORIGINAL diffusers transformer (timestep = 1000 t) at sample_size and at two non-square sizes,
    within the exporter's 1e-4 (measured ~3e-6); the table is not negligible there (the output moves
    by far more when it is zeroed)."""
    from anchorflow.runtime.bundles.load import load_bundle

    root = tmp_path_factory.mktemp("sana_pe")
    torch.manual_seed(0)
    tr = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                          cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1,
                                          interpolation_scale=1.0).eval()
    tr.save_pretrained(str(root / "transformer"))
    mp = pytest.MonkeyPatch()
    run_cli(["export", str(root / "transformer"), "--out", str(root / "b"), "--max-batch", "2"], mp)
    mp.undo()
    meta = json.loads((root / "b" / "bundle.json").read_text())
    assert meta["networks"]["backbone"]["axes"]["H"] == {"min": 2, "opt": 8, "max": 32}
    b = load_bundle(root / "b", backend="ort-cpu")
    rng = np.random.default_rng(3)
    for h, w in ((8, 8), (8, 20), (14, 6)):
        x = rng.standard_normal((2, 4, h, w)).astype(np.float32)
        t = np.array([0.9, 0.3], np.float32)
        text = rng.standard_normal((2, 5, 16)).astype(np.float32)
        mask = np.ones((2, 5), np.int64)
        mask[1, 3:] = 0
        got = b.velocity(x, t, {"encoder_hidden_states": text, "encoder_attention_mask": mask})
        call = dict(hidden_states=torch.from_numpy(x), timestep=1000 * torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(text), encoder_attention_mask=torch.from_numpy(mask),
                    return_dict=False)
        with torch.no_grad():
            ref = tr(**call)[0].numpy()
            pos, tr.patch_embed.pos_embed = tr.patch_embed.pos_embed, None
            bare = tr(**call)[0].numpy()
            tr.patch_embed.pos_embed = pos
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4, (h, w, np.abs(got - ref).max())
        assert np.abs(bare - ref).max() > 1e-2, (h, w)
