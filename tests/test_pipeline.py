"""Pipeline bundles, SD3: a tiny random-init StableDiffusion3Pipeline (two CLIPs with
projection, T5, AutoencoderKL, SD3 transformer, tokenizers built locally) saved with save_pretrained,
exported once per session through the CLI (with a SideNet trained for 2 iterations), then

- the torch-free prompt recipe equals the pipeline's ``encode_prompt`` (fp32 parity);
- ``generate`` (euler, same latents and sigmas) equals the diffusers pipeline's ``output_type="np"``
  image within a tolerance derived from the export's measured per-part parity, with and without
  guidance, at two resolutions, for a batch of prompts; the same through the CLI with torch,
  diffusers and transformers blocked from import;
- BA and FastFlow through ``generate``: exactly the counted transformer / SideNet calls, each text
  encoder and the VAE decoder once per batch;
- bad input: one line, exit 1, nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from _pipeline_fixtures import (cli_error, count_parts, measured_parity, sd3_pipeline_bundle,  # noqa: E402
                                sd3_pipeline_folder, torch_free)

torch.set_num_threads(1)
PROMPTS = ["a red cat", "a dog on a car"]


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    return sd3_pipeline_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def sd3_pipe(sd3_folder):
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd3_bundle(tmp_path_factory):
    """`anchorflow train sidenet` (2 iterations) then `anchorflow export PIPELINE_FOLDER --sidenet CKPT --out B`."""
    return sd3_pipeline_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def meta(sd3_bundle):
    return json.loads((sd3_bundle / "bundle.json").read_text())


def _latents(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, h // 2, w // 2)).astype(np.float32)


def _tolerance(meta: dict, cfg: float) -> float:
    """Pixel tolerance from the export's measured parity: every part's worst fp32 error eps (the
    transformer's max abs, the encoders' and VAE's relative max) enters a step's velocity through
    the [cond, null] mix with weight <= 1 + 2 cfg; the steps' |dt| sum to 1; the decoder adds its
    own eps; 20x covers the tiny random nets' Lipschitz growth (measured: ~1e-6 vs this ~1e-4)."""
    return 20 * (1 + 2 * cfg) * measured_parity(meta)


def test_bundle_declares_every_part_and_reads_as_a_transformer_bundle(sd3_bundle, meta):
    from anchorflow.runtime.bundles.load import load_bundle
    from anchorflow.runtime.pipelines.format import parse_pipeline

    p = parse_pipeline(meta, sd3_bundle)
    assert p.family == "sd3" and p.section["class"] == "StableDiffusion3Pipeline"
    assert list(p.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert [e["class"] for e in p.text_encoders.values()] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert [e["tokenizer"]["max_length"] for e in p.text_encoders.values()] == [77, 77, 256]
    for e in p.text_encoders.values():
        assert (sd3_bundle / e["tokenizer"]["file"]).name == "tokenizer.json"
        assert e["validation"]["passed"] and e["tokenizer"]["validation"]["equal"]
        assert e["axes"]["batch"]["max"] == 8  # prompts and negative prompts in one call
    vae = p.vae
    assert (vae["scaling_factor"], vae["shift_factor"], vae["spatial_factor"]) == (1.5305, 0.0609, 2)
    assert vae["decoder"]["inputs"][0]["shape"] == ["batch", 4, "h", "w"]  # dynamic latent size
    assert p.image == {"min": 8, "opt": 16, "max": 64, "multiple": 4}
    assert p.section["recipe"]["validation"]["passed"]
    assert meta["networks"]["sidenet"]["validation"]["passed"]
    m = load_bundle(sd3_bundle, backend="ort-cpu")  # an ordinary transformer bundle too
    assert [c.name for c in m.conditions] == ["encoder_hidden_states", "pooled_projections"]
    # a transformer-only bundle is not a pipeline: load_pipeline refuses it in one line
    only = sd3_bundle.parent / "only"
    shutil.copytree(sd3_bundle, only)
    m2 = {k: v for k, v in meta.items() if k != "pipeline"}
    (only / "bundle.json").write_text(json.dumps(m2))
    from anchorflow.base.errors import CheckpointError
    from anchorflow.runtime import load_pipeline

    load_bundle(only, backend="ort-cpu")
    with pytest.raises(CheckpointError, match="transformer bundle without text encoders"):
        load_pipeline(only)


def test_prompt_embeddings_equal_encode_prompt(sd3_bundle, sd3_pipe, capsys):
    """fp32 parity of the whole recipe, negative prompts included; a prompt longer than CLIP's 77
    tokens is truncated exactly as diffusers truncates it, and a warning line says so."""
    from anchorflow.runtime.pipelines.pipeline import load_text

    text = load_text(sd3_bundle)
    long = " ".join(["red dog"] * 50)  # 102 CLIP tokens (> 77), 201 T5 tokens (< 256)
    prompts, neg = ["a red cat", long, ""], ["", "blurry", "cat"]
    capsys.readouterr()
    ours = text.encode(prompts, neg)
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "prompt 2" in err and "truncated" in err  # both CLIPs cut it
    with torch.no_grad():
        pe, ne, pp, npool = sd3_pipe.encode_prompt(prompts, prompts, prompts, negative_prompt=neg, device="cpu",
                                                   do_classifier_free_guidance=True, max_sequence_length=256)
    for got, ref in ((ours.cond["encoder_hidden_states"], pe), (ours.cond["pooled_projections"], pp),
                     (ours.null["encoder_hidden_states"], ne), (ours.null["pooled_projections"], npool)):
        ref = ref.numpy()
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)
    # the recipe is not trivially satisfied: T5's part and the CLIP part differ, the padding is zero
    assert got.shape[0] == 3 and ours.cond["encoder_hidden_states"].shape[1] == 77 + 256
    assert np.all(ours.cond["encoder_hidden_states"][:, :77, 24:] == 0)


@pytest.mark.parametrize("cfg, hw", [(1.0, (16, 16)), (4.0, (16, 16)), (4.0, (24, 32))])
def test_generate_equals_the_diffusers_pipeline(sd3_bundle, sd3_pipe, meta, cfg, hw):
    from anchorflow.runtime import load_pipeline

    h, w = hw
    lat = _latents(len(PROMPTS), h, w)
    ref = sd3_pipe(PROMPTS, num_inference_steps=3, latents=torch.from_numpy(lat), guidance_scale=cfg, height=h,
                   width=w, output_type="np").images
    pipe = load_pipeline(sd3_bundle)
    gen = pipe(PROMPTS, nfe=3, solver="euler", cfg=cfg, height=h, width=w, latents=lat)
    tol = _tolerance(meta, cfg)
    assert gen.pixels.shape == ref.shape == (2, h, w, 3) and gen.images.dtype == np.uint8
    assert np.abs(gen.pixels - ref).max() <= tol, (np.abs(gen.pixels - ref).max(), tol)
    np.testing.assert_array_equal(gen.result.grid, sd3_pipe.scheduler.sigmas.numpy().astype(np.float64))
    assert np.abs(gen.images.astype(int) - (ref * 255).round()).max() <= 1
    # the tolerance is meaningful: the unshifted (uniform) grid moves the image far beyond it
    off = pipe(PROMPTS, nfe=3, solver="euler", cfg=cfg, height=h, width=w, latents=lat, grid="uniform")
    assert np.abs(off.pixels - ref).max() > 10 * tol


def test_generate_cli_is_torch_free_and_matches_diffusers(sd3_bundle, sd3_pipe, meta, tmp_path):
    """`anchorflow generate` with torch, diffusers and transformers blocked: a batch of prompts from a
    file, --latents, --npy; the images equal the pipeline's."""
    lat = _latents(2, 16, 24, seed=5)
    np.save(tmp_path / "lat.npy", lat)
    (tmp_path / "prompts.txt").write_text("a red cat\n\na dog on a car\n")
    args = [str(sd3_bundle), "--prompts", str(tmp_path / "prompts.txt"), "--height", "16", "--width", "24", "--nfe",
            "2", "--cfg", "3", "--latents", str(tmp_path / "lat.npy"), "--out", str(tmp_path / "x.png"), "--npy",
            str(tmp_path / "x.npy")]
    proc = torch_free(f"""
from anchorflow.cli import main
try:
    main(["generate", *{args!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
print("ATTEMPTS", attempts, [m for m in BLOCKED if m in sys.modules])
""")
    assert proc.returncode == 0, proc.stderr
    assert "ATTEMPTS [] []" in proc.stdout and "2 transformer calls" in proc.stdout
    got = np.load(tmp_path / "x.npy")
    ref = sd3_pipe(PROMPTS, num_inference_steps=2, latents=torch.from_numpy(lat), guidance_scale=3.0, height=16,
                   width=24, output_type="np").images
    assert np.abs(got - ref).max() <= _tolerance(meta, 3.0)
    from PIL import Image

    assert Image.open(tmp_path / "x.png").size == (48, 16)  # two images side by side


@pytest.mark.parametrize("solver, nfe", [("ba", 4), ("fastflow", 6)])
def test_ba_and_fastflow_through_generate_count_every_part(sd3_bundle, solver, nfe):
    from anchorflow.runtime import load_pipeline

    pipe = load_pipeline(sd3_bundle)
    counters = count_parts(pipe)
    gen = pipe(PROMPTS, nfe=nfe, solver=solver, cfg=2.0, height=16, width=16, seed=1, n=2)
    assert gen.images.shape == (4, 16, 16, 3) and np.isfinite(gen.pixels).all()
    assert counters["transformer"].calls == gen.result.nfe == gen.calls["transformer"]
    if solver == "ba":
        assert counters["transformer"].calls == nfe and counters["sidenet"].calls == nfe == gen.calls["sidenet"]
    else:
        assert 1 <= counters["transformer"].calls <= nfe
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"):
        assert counters[name].calls == 1 == gen.calls[name], name  # prompts and negatives in one call


def test_bad_input_one_line_nothing_written(sd3_folder, sd3_bundle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.png"
    # H/W outside the exported range, or not a multiple of patch x VAE factor
    for hw in (["--height", "30"], ["--width", "128"], ["--height", "4"]):
        line = cli_error(["generate", str(sd3_bundle), "--prompt", "a cat", "--out", str(out), *hw], monkeypatch, capsys)
        assert "8..64 pixels, a multiple of 4" in line
    line = cli_error(["generate", str(sd3_bundle), "--prompt", "a", "--latents", str(tmp_path / "none.npy"), "--out",
                      str(out)], monkeypatch, capsys)
    assert "--latents" in line
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 3, 3), np.float32))
    line = cli_error(["generate", str(sd3_bundle), "--prompt", "a", "--latents", str(tmp_path / "bad.npy"), "--out",
                      str(out)], monkeypatch, capsys)
    assert "latents have shape" in line
    assert "exactly one of --prompt" in cli_error(["generate", str(sd3_bundle), "--out", str(out)], monkeypatch, capsys)
    # numbers checked by runtime.plan (the caps and messages of sample and serve), named as the CLI names them
    line = cli_error(["generate", str(sd3_bundle), "--prompt", "a", "--cfg", "5000", "--out", str(out)], monkeypatch,
                     capsys)
    assert line == "error: --cfg 5000.0 is above the cap of 1000"
    line = cli_error(["generate", str(sd3_bundle), "--prompt", "a", "--out", str(out), "--npy", str(out)], monkeypatch,
                     capsys)
    assert "--out and --npy name the same file" in line
    assert not out.exists()
    from anchorflow.base.errors import ConfigError
    from anchorflow.runtime import load_pipeline
    from anchorflow.runtime.plan import MAX_CFG_SCALE

    pipe = load_pipeline(sd3_bundle)
    for kw, msg in (({"cfg": MAX_CFG_SCALE * 2}, "cfg 2000.0 is above the cap of 1000"),
                    ({"n": True}, "n must be an integer"), ({"seed": -1}, "seed must be in 0..4294967295"),
                    ({"nfe": 0}, "nfe must be in 1..1000"), ({"grid": "shifty:3"}, "grid")):
        with pytest.raises(ConfigError, match=msg):
            pipe("a cat", height=16, width=16, **kw)
    assert pipe.text.calls == dict.fromkeys(pipe.text.calls, 0) and pipe.calls["vae_decoder"] == 0  # refused before work
    # an unknown pipeline class, a missing component: refused before torch work, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    index = json.loads((sd3_folder / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    line = cli_error(["export", str(bad), "--out", str(tmp_path / "b1")], monkeypatch, capsys)
    assert "'KandinskyPipeline' pipeline" in line
    shutil.copytree(sd3_folder, tmp_path / "partial", ignore=shutil.ignore_patterns("tokenizer_3"))
    line = cli_error(["export", str(tmp_path / "partial"), "--out", str(tmp_path / "b2")], monkeypatch, capsys)
    assert "tokenizer_3" in line
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def _doc_example() -> tuple[str, str]:
    """The ``load_pipeline`` Python example of README.md (once the lead pastes it there), else of
    docs/pipeline.md: the first ```python block that calls load_pipeline."""
    import re

    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/pipeline.md"):
        text = (root / doc).read_text(encoding="utf-8") if (root / doc).exists() else ""
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            if "load_pipeline(" in block:
                return doc, block
    raise AssertionError("no load_pipeline example in README.md or docs/pipeline.md")


def test_load_pipeline_doc_example_runs_as_written_torch_free(sd3_bundle, sd3_pipe, meta, tmp_path):
    """The documented example, only the bundle path replaced, with torch/diffusers/transformers blocked;
    its images equal the diffusers pipeline's on the same start latents (seed 0's normal draw)."""
    doc, code = _doc_example()
    assert '"sd3-bundle"' in code, doc
    code = code.replace('"sd3-bundle"', repr(str(sd3_bundle)))
    proc = torch_free(code + f"\nimport numpy as _np; _np.save({str(tmp_path / 'px.npy')!r}, gen.pixels)\n"
                      "print('ATTEMPTS', attempts, [m for m in BLOCKED if m in sys.modules])\n")
    assert proc.returncode == 0, proc.stderr
    assert "(2, 16, 16, 3) uint8" in proc.stdout and "ATTEMPTS [] []" in proc.stdout, proc.stdout
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = sd3_pipe(PROMPTS, num_inference_steps=8, latents=torch.from_numpy(lat), guidance_scale=4.0, height=16,
                   width=16, output_type="np").images
    assert np.abs(np.load(tmp_path / "px.npy") - ref).max() <= _tolerance(meta, 4.0)


def _cond_files(bundle, folder: Path, n: int) -> None:
    """Prompt / empty-prompt embeddings from the bundle's own text stack, as `sample --cond/--null-cond` files."""
    from anchorflow.runtime.pipelines.pipeline import load_text

    emb = load_text(bundle).encode(["a red cat"] * n, [""])
    np.savez(folder / "cond.npz", **emb.cond)
    np.savez(folder / "null.npz", **emb.null)


def test_sample_out_decodes_through_the_bundles_vae(sd3_bundle, sd3_pipe, meta, tmp_path, monkeypatch, capsys):
    """`sample PIPELINE_BUNDLE --out x.png --npy x.npy`: the PNG is the grid of the latents in x.npy decoded by
    the pipeline's own torch VAE (diffusers' decode + postprocess), not a picture of a latent channel."""
    from PIL import Image

    from anchorflow.plots import _as_nhwc, grid_array, to_uint8

    _cond_files(sd3_bundle, tmp_path, 2)
    run_args = ["sample", str(sd3_bundle), "--solver", "euler", "--nfe", "3", "--n", "2", "--cfg", "3", "--backend",
                "ort-cpu", "--cond", str(tmp_path / "cond.npz"), "--null-cond", str(tmp_path / "null.npz"),
                "--out", str(tmp_path / "x.png"), "--npy", str(tmp_path / "x.npy")]
    from _pipeline_fixtures import run_cli

    capsys.readouterr()
    run_cli(run_args, monkeypatch)
    assert "decoded through the bundle's VAE" in capsys.readouterr().out
    lat = np.load(tmp_path / "x.npy")
    assert lat.shape == (2, 4, 8, 8)
    v = meta["pipeline"]["vae"]
    with torch.no_grad():
        dec = sd3_pipe.vae.decode(torch.from_numpy(lat) / v["scaling_factor"] + v["shift_factor"]).sample
    ref = sd3_pipe.image_processor.postprocess(dec, output_type="np")  # (2, 16, 16, 3) in [0, 1]
    want = grid_array((ref * 255).round().astype(np.uint8), nrow=2)
    got = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1  # ORT vs torch fp32 VAE: < 1e-5 before rounding
    channel = grid_array(_as_nhwc(to_uint8(lat, (-1.0, 1.0))), nrow=2)  # what --out drew before: channel 0
    assert np.abs(got[..., 0].astype(int) - channel[..., 0]).mean() > 10


def test_sample_out_on_a_latent_bundle_without_vae_is_refused(sd3_bundle, meta, tmp_path, monkeypatch, capsys):
    """A transformer-only latent bundle (data_range null, no VAE): an explicit --out, or no output at all, is
    one error line with nothing written; --npy alone writes the latents and no picture."""
    from _pipeline_fixtures import run_cli

    only = tmp_path / "only"
    shutil.copytree(sd3_bundle, only)
    (only / "bundle.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "pipeline"}))
    _cond_files(sd3_bundle, tmp_path, 1)
    base = ["sample", str(only), "--solver", "euler", "--nfe", "2", "--n", "2", "--backend", "ort-cpu", "--cond",
            str(tmp_path / "cond.npz")]
    monkeypatch.chdir(tmp_path)
    line = cli_error([*base, "--out", "x.png", "--npy", "x.npy"], monkeypatch, capsys)
    assert "latents" in line and "no VAE decoder" in line and "--out x.png" in line
    line = cli_error(base, monkeypatch, capsys)
    assert "default --out samples.png" in line
    assert not any(tmp_path.glob("*.png")) and not (tmp_path / "x.npy").exists()
    run_cli([*base, "--npy", "x.npy"], monkeypatch)
    assert np.load(tmp_path / "x.npy").shape == (2, 4, 8, 8) and not any(tmp_path.glob("*.png"))
