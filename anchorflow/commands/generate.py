"""`anchorflow generate`: prompt -> image on a pipeline bundle, torch-free (numpy + onnxruntime + tokenizers).

Also the click-layer helper behind `anchorflow export PIPELINE_FOLDER` (:func:`export_pipeline_command`).
"""

from __future__ import annotations

from typing import Optional

import click
import numpy as np

from .common import MAX_N, MAX_NFE, cfg_scale as cfg_check, count, seed as seed_check


NAMES = {"solver": "--solver", "nfe": "--nfe", "grid": "--grid", "cfg_scale": "--cfg", "n": "--n", "seed": "--seed"}


@click.command("generate")
@click.argument("bundle")
@click.option("--prompt", default=None, help="The prompt (or give --prompts FILE).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="A text file with one prompt a line (empty lines skipped): one batch.")
@click.option("--negative-prompt", default=None,
              help="Negative prompt for guidance rows (SD3; default: the empty prompt, as diffusers).")
@click.option("--height", type=int, default=None, help="Image height in pixels [default: the bundle's].")
@click.option("--width", type=int, default=None, help="Image width in pixels [default: the bundle's].")
@click.option("--nfe", type=int, default=None, callback=count(MAX_NFE),
              help="Transformer calls [default: the pipeline's num_inference_steps].")
@click.option("--solver", default=None, help="Solver name (see `anchorflow solvers`) [default: euler].")
@click.option("--cfg", type=float, default=None, callback=cfg_check,
              help="Guidance scale [default: the pipeline's guidance_scale]: CFG rows for SD3, the embedded "
                   "guidance for FLUX-dev; FLUX-schnell has none.")
@click.option("--grid", default=None,
              help="'uniform', 'shift:S' or 'warp:S,P' [default: the bundle's tuned grid for this solver and NFE, "
                   "else the pipeline scheduler's sigmas].")
@click.option("--quality", default=None,
              help="A preset recorded by 'anchorflow tune B --target-psnr Q --prompts FILE' (its name, or a number "
                   "of dB: the fastest preset whose bound meets it) instead of --solver / --nfe / --grid; --cfg "
                   "defaults to the guidance it was tuned at.")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check, help="Seed of the start latents.")
@click.option("--n", "n", type=int, default=1, show_default=True, callback=count(MAX_N), help="Images per prompt.")
@click.option("--latents", "latents_file", type=click.Path(dir_okay=False), default=None,
              help="Start latents .npy (N, C, H/f, W/f) instead of --seed's.")
@click.option("--backend", type=click.Choice(["auto", "ort-cpu", "ort-cuda", "ort-trt"]), default="ort-cpu",
              show_default=True, help="onnxruntime backend of every part.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads per session.")
@click.option("--out", type=click.Path(dir_okay=False), default="image.png", show_default=True,
              help="Image to write (.png, .jpg, .webp); several images are written side by side.")
@click.option("--npy", type=click.Path(dir_okay=False), default=None,
              help="Also save the images as float32 (N, H, W, 3) in [0, 1] (diffusers' output_type='np').")
def generate(bundle, prompt, prompts_file, negative_prompt, height, width, nfe, solver, cfg, grid, seed, n,
             latents_file, backend, threads, out, npy, quality=None) -> None:
    """Generate images from a prompt with a pipeline bundle (`anchorflow export PIPELINE_FOLDER`).

    Tokenisers, text encoders, transformer (and SideNet) and VAE decoder all run on onnxruntime;
    torch and diffusers are never imported. Every output is written only when all of them are.

    \b
    Examples:
      anchorflow generate sd3-bundle --prompt "a red cat" --nfe 28 --cfg 7 --out cat.png
      anchorflow generate flux-bundle --prompts prompts.txt --solver ba --nfe 8 --out grid.png
      anchorflow generate sd3-bundle --prompt "a red cat" --quality fast --out cat.png
    """
    run_generate(bundle, prompt, prompts_file, negative_prompt, height, width, nfe, solver, cfg, grid, seed, n,
                 latents_file, backend, threads, out, npy, quality=quality)


def _prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    from ..base.errors import ConfigError

    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return [prompt]
    from ..runtime.pipelines.text import read_prompts

    return read_prompts(prompts_file, "--prompts")


def run_generate(bundle, prompt, prompts_file, negative_prompt, height, width, nfe, solver, cfg, grid, seed, n,
                 latents_file, backend, threads, out, npy, quality=None) -> None:
    """The library call behind `generate`: check every input and output, generate, write all or nothing."""
    from ..base import _io
    from ..base.errors import ConfigError, NonFiniteError
    from ..runtime.plan import check_request
    from .common import _same

    prompts = _prompts(prompt, prompts_file)
    fmt = _io.check_image_path(out)
    if npy:
        _io.check_output(npy, "--npy")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    if quality is not None:  # a preset replaces --solver / --nfe / --grid (refused together, before any model opens)
        given = [flag for flag, v in (("--solver", solver), ("--nfe", nfe), ("--grid", grid)) if v is not None]
        if given:
            raise ConfigError(f"--quality {quality} chooses the solver, NFE and grid; drop {', '.join(given)}")
        if not str(quality).strip():
            raise ConfigError("--quality is empty; give a preset name or a number of dB")
    check_request(solver="euler" if solver is None else solver, nfe=1 if nfe is None else nfe, grid=grid, cfg_scale=1.0 if cfg is None else cfg, n=n,
                  seed=seed, names=NAMES)  # before any model is opened; the pipeline checks again with its defaults
    if npy and _same(npy) == _same(out):
        raise ConfigError(f"--out and --npy name the same file ({out}); give two paths")
    latents = None
    if latents_file:
        try:
            latents = np.load(latents_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read --latents {latents_file}: {exc}") from None
    from ..runtime.pipelines.pipeline import load_pipeline

    pipe = load_pipeline(bundle, backend=backend, threads=threads)
    click.echo(f"generating {len(prompts) * n} image(s) from {len(prompts)} prompt(s)...", err=True)
    gen = pipe(prompts, negative_prompt, nfe=nfe, solver=solver, cfg=cfg, height=height, width=width, seed=seed, n=n,
               latents=latents, grid=grid, names=NAMES, quality=quality)
    if gen.quality is not None:
        from ..autoconfig import describe
        from ..runtime.pipelines.pipeline import preset_guidance

        click.echo(f"{describe(gen.quality)}; guidance {gen.cfg:g}")
        tuned_cfg = preset_guidance(pipe.tuning, gen.quality.name)
        if tuned_cfg is not None and tuned_cfg != gen.cfg:
            click.echo(f"note: quality {gen.quality.name}'s bound was measured at guidance {tuned_cfg:g}, not "
                       f"{gen.cfg:g}", err=True)
    if not np.isfinite(gen.pixels).all():
        raise NonFiniteError(f"the decoded images hold NaN or Inf; nothing was written to {out}")
    from PIL import Image

    strip = np.concatenate(list(gen.images), axis=1)
    extra = {}
    if fmt == "PNG":  # what ran, in the PNG's own text chunk ("anchorflow": JSON)
        import json

        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("anchorflow", json.dumps({
            "solver": gen.solver, "nfe": gen.nfe, "grid": gen.grid, "cfg": gen.cfg, "seed": int(seed),
            "prompts": prompts, "quality": None if gen.quality is None else gen.quality.to_json()}))
        extra["pnginfo"] = info
    with _io.atomic_paths([out] + ([npy] if npy else [])) as tmps:
        Image.fromarray(strip).save(tmps[0], format=fmt, **extra)
        if npy:
            with open(tmps[1], "wb") as fh:
                np.save(fh, gen.pixels)
    t, r = gen.timing, gen.result
    click.echo(f"{gen.solver}@{gen.nfe}: {r.nfe} transformer calls, {r.sidenet_calls} SideNet calls; tokenise {t['tokenise'] * 1e3:.1f} "
               f"ms, encode {t['encode'] * 1e3:.1f} ms, denoise {t['denoise'] * 1e3:.1f} ms, decode "
               f"{t['decode'] * 1e3:.1f} ms ({gen.grid})")
    click.echo(f"wrote {out}" + (f" and {npy}" if npy else ""))


def export_pipeline_command(model, out, opset, precisions, max_batch, no_validate, axes, command, sidenet):
    """`anchorflow export PIPELINE_FOLDER --out B` (called from commands/export.py; ``axes`` parsed there)."""
    from ..base._deps import require_extra
    from ..base._io import check_output
    from ..base.errors import ConfigError
    from ..runtime.pipelines.format import check_pipeline_folder

    check_pipeline_folder(model)  # unknown class / missing component: one line, before torch loads
    if out is None:
        raise ConfigError(f"give --out: {model} is a diffusers pipeline folder")
    check_output(out, "--out", folder=True)
    require_extra("diffusers", "exporting diffusers pipelines",
                  ("torch", "onnx", "onnxscript", "diffusers", "transformers", "tokenizers"))
    from ..export.pipeline_export import export_pipeline

    precisions = tuple(precisions) or ("fp32",)
    return export_pipeline(model, out, max_batch=max_batch, opset=opset, validate=not no_validate,
                           axes=axes, command=command, sidenet=sidenet, precisions=precisions)


# -- `anchorflow sample` on a latent model: pictures through the bundle's VAE, never of a channel --
SAMPLE_OUT = "samples.png"


def latent_outputs(m, model: str, out: Optional[str], npy: Optional[str], backend: str):
    """What `sample` writes for the opened model ``m``: ``(decoder, out)``.

    An image model (bundle.json ``data_range`` set): ``(None, out or samples.png)``, the grid as before.
    A latent model (``data_range`` null) with a VAE (a pipeline bundle): ``(its Decoder, out or
    samples.png)``, the grid of decoded images. A latent model without one: ``(None, None)`` when only
    ``--npy`` was asked for; an explicit ``--out`` (or no output at all) is refused in one line, since a
    picture of latents would be one of their channels, not an image."""
    from ..base.errors import ConfigError

    if m.meta.get("data_range") is not None:
        return None, SAMPLE_OUT if out is None else out
    decoder = None
    if m.files.bundle is not None:
        from ..runtime.pipelines.pipeline import load_decoder

        decoder = load_decoder(m.files.bundle, backend=backend if backend in ("ort-cpu", "ort-cuda", "ort-trt", "auto")
                               else "ort-cpu")
    if decoder is not None:
        return decoder, SAMPLE_OUT if out is None else out
    if out is None and npy:
        return None, None
    raise ConfigError(f"{model}'s samples are latents (bundle.json data_range is null) and it has no VAE decoder, so "
                      f"{'--out ' + out if out is not None else 'the default --out ' + SAMPLE_OUT} would show a latent channel, not "
                      "an image; give --npy FILE alone for the latents, or export the whole pipeline folder "
                      "(model_index.json) to decode them")


def write_latent_outputs(x: np.ndarray, decoder, out: Optional[str], npy: Optional[str]) -> str:
    """Write `sample`'s outputs of a latent model, all or nothing: the grid of ``decoder(x)``'s images
    (when ``out``) and the raw latents ``x`` (when ``npy``). Returns the 'wrote ...' line."""
    from ..base import _io
    from ..base.errors import NonFiniteError
    from ..plots import grid_image

    if not np.isfinite(x).all():
        raise NonFiniteError(f"the samples hold NaN or Inf values ({int((~np.isfinite(x)).sum())} of {x.size}); "
                             f"nothing was written")
    img = None
    if out is not None:
        fmt = _io.check_image_path(out)
        pixels, images = decoder(x)
        if not np.isfinite(pixels).all():
            raise NonFiniteError("the VAE decoded the samples to NaN or Inf; nothing was written")
        img = grid_image(images.transpose(0, 3, 1, 2), nrow=min(len(images), 10))
    paths = ([out] if out else []) + ([npy] if npy else [])
    with _io.atomic_paths(paths) as tmps:
        if img is not None:
            img.save(tmps[0], format=fmt)
        if npy:
            with open(tmps[-1], "wb") as fh:
                np.save(fh, x)
    return "wrote " + " and ".join(paths) + (" (decoded through the bundle's VAE)" if img is not None else "")
