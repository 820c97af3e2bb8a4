"""Prompt in, image out, torch-free: ``load_pipeline(bundle)(prompt, ...)`` on a pipeline bundle.

``pipe = load_pipeline("B"); gen = pipe("a prompt", nfe=8, solver="ba", cfg=4.0, height=64, width=64, seed=0)``:

1. tokenise and encode the prompts (and the negative prompts when guided) with the bundle's
   tokenizers and text encoders, ONE call per encoder per batch (:mod:`.text`);
2. start from ``latents`` (our layout (B, C, h, w); FLUX's too: the bundle's transformer unpacks
   nothing, the 2x2 packing happens inside its graph) or from seeded standard normal noise;
3. denoise with :func:`anchorflow.runtime.solve` on the pipeline scheduler's own sigmas for the
   solver's step count (:mod:`.pipeline_schedule`), or the grid given; SD3's guidance is CFG rows
   (``cfg`` > 1 adds the negative prompt's rows), FLUX-dev's is the embedded ``guidance`` input
   (= ``cfg``), FLUX-schnell has none;
4. decode ``latents / scaling_factor + shift_factor`` with the VAE decoder in ONE call per batch
   and map [-1, 1] to pixels as diffusers' ``VaeImageProcessor.postprocess`` does.

Returns :class:`Generation`: ``images`` (N, H, W, 3) uint8, ``pixels`` float32 in [0, 1] (what the
diffusers pipeline returns with ``output_type="np"``), ``latents``, ``result`` (the solver's
Result: call counts, timing), ``calls`` and ``timing`` per part. Time: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ...base.errors import CheckpointError, ConfigError
from ..bundles.format import read_bundle
from .format import PipelineDecl, parse_pipeline
from .text import TextStack, TextTokenizer


@dataclass
class Generation:
    """What one :class:`Pipeline` call made. Iterating or indexing it gives the uint8 images."""

    images: np.ndarray  # (N, H, W, 3) uint8
    pixels: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    latents: np.ndarray  # (N, C, h, w) denoised latents (before the VAE scaling)
    result: Any  # anchorflow.runtime.Result of the denoising
    prompts: list
    calls: dict = field(default_factory=dict)  # part -> calls (transformer = NFE)
    timing: dict = field(default_factory=dict)  # part -> seconds: tokenise, encode, denoise, decode
    grid: str = ""  # where the time grid came from: scheduler sigmas, the bundle's tuned grid, or given
    solver: str = ""  # the solver that ran and its NFE (chosen by ``quality`` when one was asked for)
    nfe: int = 0
    cfg: float = 1.0  # the guidance scale that ran
    quality: Any = None  # the Preset ``quality=`` chose (anchorflow.runtime.bundles.presets.Preset), or None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: Any) -> np.ndarray:
        return self.images[i]

    def __iter__(self):
        return iter(self.images)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.images if dtype is None else self.images.astype(dtype)


def _session_run(path: Path, entry: dict, backend: str, threads: Optional[int], allow_fallback: bool = False):
    """``run(feeds) -> dict`` of the named outputs, chunked to the part's exported batch range."""
    from ..bundles.backends import make_session

    session = make_session(path, backend, allow_fallback, threads=threads, graph_sha256=entry.get("sha256"))
    names = [o["name"] for o in entry["outputs"]]
    top = int(((entry.get("axes") or {}).get("batch") or {}).get("max") or 1 << 30)

    def run(feeds: dict) -> dict:
        rows = next(iter(feeds.values())).shape[0]
        parts = []
        for s in range(0, rows, top):
            parts.append(session.run(names, {k: v[s: s + top] for k, v in feeds.items()}))
        return {n: np.concatenate([p[i] for p in parts], axis=0) for i, n in enumerate(names)}

    return run, list(session.get_providers())


def load_text(path: str | os.PathLike, backend: str = "ort-cpu", threads: Optional[int] = None) -> TextStack:
    """The tokenizers, text encoders and recipe of a pipeline bundle."""
    fmt = read_bundle(path)
    decl = parse_pipeline(fmt.meta, fmt.folder)
    if decl is None:
        raise CheckpointError(f"{fmt.folder} is a transformer bundle without text encoders; export the whole "
                              "pipeline folder (the one with model_index.json) to generate from prompts")
    return _text(decl, backend, threads)


def _text(decl: PipelineDecl, backend: str, threads: Optional[int]) -> TextStack:
    encoders = {}
    for name, e in decl.text_encoders.items():
        tok = TextTokenizer(decl.file(e["tokenizer"], f"the {name} tokenizer"), e["tokenizer"], name)
        run, _ = _session_run(decl.file(e, f"the {name}"), e, backend, threads)
        encoders[name] = (tok, run, bool(e["tokenizer"].get("attention_mask")))
    return TextStack(decl.family, decl.section["recipe"], encoders)


def to_pixels(decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VAE output (N, 3, H, W) in [-1, 1] -> (float32 [0, 1] NHWC, uint8 NHWC) as diffusers' postprocess."""
    px = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)
    return px, (px * 255).round().astype(np.uint8)


def decode_latents(run, vae: dict, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents (N, C, h, w) in the transformer's scale -> (pixels float32 [0, 1], images uint8), through a
    VAE decoder ``run(feeds)``: ``latents / scaling_factor + shift_factor``, one call, then :func:`to_pixels`."""
    z = np.asarray(latents, np.float32)
    c = int(vae["latent_channels"])
    if z.ndim != 4 or z.shape[1] != c:
        raise ConfigError(f"latents of shape {tuple(z.shape)} cannot be decoded: the VAE takes (N, {c}, h, w)")
    z = z / np.float32(vae["scaling_factor"]) + np.float32(vae["shift_factor"])
    return to_pixels(run({"latents": z.astype(np.float32)})["image"])


class Decoder:
    """A pipeline bundle's VAE decoder alone (what ``sample --out`` and ``serve``'s ``"format": "png"``
    use on a latent bundle): ``decoder(latents) -> (pixels, images)``; ``calls`` counts its runs."""

    def __init__(self, decl: PipelineDecl, backend: str = "ort-cpu", threads: Optional[int] = None) -> None:
        self.vae = decl.vae
        self.run, self.providers = _session_run(decl.file(self.vae["decoder"], "the VAE decoder"), self.vae["decoder"],
                                                backend, threads)
        self.calls = 0

    def __call__(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = decode_latents(self.run, self.vae, latents)
        self.calls += 1
        return out


def load_decoder(path: str | os.PathLike, backend: str = "ort-cpu", threads: Optional[int] = None) -> Optional[Decoder]:
    """The VAE decoder of a pipeline bundle, or None for a transformer-only bundle (it has none)."""
    fmt = read_bundle(path)
    decl = parse_pipeline(fmt.meta, fmt.folder)
    return None if decl is None else Decoder(decl, backend, threads)


class Pipeline:
    """A pipeline bundle opened for generation (see the module docstring). ``calls``: part -> calls so far."""

    def __init__(self, path: str | os.PathLike, backend: str = "ort-cpu", threads: Optional[int] = None,
                 allow_fallback: bool = False) -> None:
        from ..bundles.load import load_bundle

        self.bundle = load_bundle(path, backend=backend, allow_fallback=allow_fallback, threads=threads)
        decl = parse_pipeline(self.bundle.meta, self.bundle.path)
        if decl is None:
            raise CheckpointError(f"{self.bundle.path} is a transformer bundle without text encoders or VAE; export "
                                  "the whole pipeline folder (model_index.json) to generate from prompts")
        self.decl = decl
        self.text = _text(decl, backend, threads)
        vae = decl.vae
        self._decode, _ = _session_run(decl.file(vae["decoder"], "the VAE decoder"), vae["decoder"], backend, threads)
        self._encoder_entry = vae.get("encoder")
        self._encode = None
        self.backend, self.threads = backend, threads
        self.calls = {"vae_decoder": 0, "vae_encoder": 0}
        from ..bundles.tuned_grids import read_tuning

        self.tuning = read_tuning(self.bundle.format)  # grids 'anchorflow tune' recorded, or None

    # -- parts -----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.decl.family

    @property
    def factor(self) -> int:
        return int(self.decl.vae["spatial_factor"])

    def decode(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latents (N, C, h, w) -> (pixels float32 [0, 1], images uint8), one VAE decoder call."""
        out = decode_latents(self._decode, self.decl.vae, latents)
        self.calls["vae_decoder"] += 1
        return out

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1] (float) or uint8 -> latents in the transformer's scale (posterior mean)."""
        if self._encoder_entry is None:
            raise CheckpointError("the bundle has no VAE encoder; re-export the pipeline")
        if self._encode is None:
            self._encode, _ = _session_run(self.decl.file(self._encoder_entry, "the VAE encoder"), self._encoder_entry,
                                           self.backend, self.threads)
        x = np.asarray(pixels)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        img = (x.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)
        lat = self._encode({"image": img})["latent"]
        self.calls["vae_encoder"] += 1
        v = self.decl.vae
        return ((lat - np.float32(v["shift_factor"])) * np.float32(v["scaling_factor"])).astype(np.float32)

    def sigmas(self, steps: int, height: int, width: int) -> np.ndarray:
        from .schedule import pipeline_sigmas

        return pipeline_sigmas(self.family, self.decl.scheduler, steps, (height // self.factor, width // self.factor))

    # -- generation ------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: Optional[str | Sequence[str]] = None, *,
                 nfe: Optional[int] = None, solver: Optional[str] = None, cfg: Optional[float] = None,
                 height: Optional[int] = None, width: Optional[int] = None, seed: int = 0, n: int = 1,
                 latents: Optional[np.ndarray] = None, grid: Any = None, sidenet: bool = True,
                 names: Optional[dict] = None, quality: Any = None, **options: Any) -> Generation:
        """``quality``: a preset recorded by ``anchorflow tune B --target-psnr Q --prompts FILE`` (its
        name, or a number of dB: the fastest preset whose bound meets it) instead of ``solver`` /
        ``nfe`` / ``grid`` (giving both is refused); ``cfg`` then defaults to the guidance it was
        tuned at (:func:`preset_guidance`)."""
        import dataclasses

        from ..plan import check_request, plan
        from ..solving.solvers import get_solver

        prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        if not prompts:
            raise ConfigError("give at least one prompt")
        d = self.decl.defaults
        chosen = None
        if quality is not None:
            chosen, solver, nfe, grid, tuned_cfg = self.resolve_quality(quality, solver, nfe, grid, names)
            cfg = tuned_cfg if cfg is None else cfg
        solver = "euler" if solver is None else solver
        # every number through runtime.plan's checks (the same caps and messages as sample / serve);
        # the plan itself is not built: a pipeline's state shape follows --height/--width
        a = check_request(solver=solver, nfe=int(d["num_inference_steps"]) if nfe is None else nfe,
                          grid=grid if isinstance(grid, str) else None,
                          cfg_scale=float(d["guidance_scale"]) if cfg is None else cfg, n=n, seed=seed,
                          names={**{"cfg_scale": "cfg"}, **(names or {})})
        solver, nfe, cfg, n, seed = a["solver"], a["nfe"], a["cfg_scale"], a["n"], a["seed"]
        height = int(self.decl.image["opt"] if height is None else height)
        width = int(self.decl.image["opt"] if width is None else width)
        self.decl.check_size(height, width)
        mode = self.bundle.format.guidance.mode
        variant = self.decl.variant
        if negative_prompt is not None and mode != "rows":
            raise ConfigError(f"a {variant} bundle has no negative-prompt guidance (its guidance is {mode}); drop "
                              "--negative-prompt")
        if variant == "flux-schnell" and cfg != 1.0:
            raise ConfigError(f"FLUX-schnell has no guidance; drop --cfg (got {cfg})")
        spec = get_solver(solver)
        steps = spec.steps_for_nfe(nfe, 0)
        rows = [p for p in prompts for _ in range(int(n))]
        guided_rows = mode == "rows" and cfg > 1.0
        if guided_rows:
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) or negative_prompt is None \
                else [str(p) for p in negative_prompt]
            neg = ["" if p is None else p for p in neg]
            if len(neg) != len(prompts):
                raise ConfigError(f"{len(neg)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
            neg_rows = [p for p in neg for _ in range(int(n))]
        before = {**self.text.calls, **self.calls}
        emb = self.text.encode(rows, neg_rows if guided_rows else None)
        cond, null = dict(emb.cond), emb.null
        if mode == "embedded":
            cond[self.bundle.format.guidance.input or "guidance"] = np.full((len(rows),), cfg, np.float32)
        c = int(self.decl.vae["latent_channels"])
        shape = (len(rows), c, height // self.factor, width // self.factor)
        if latents is None:
            x0 = np.random.default_rng(int(seed)).standard_normal(shape).astype(np.float32)
        else:
            x0 = np.asarray(latents, dtype=np.float32)
            if x0.shape != shape:
                raise ConfigError(f"latents have shape {x0.shape}, but {len(rows)} images of {height}x{width} need "
                                  f"{shape} (N, C, H/{self.factor}, W/{self.factor})")
        grid_note = "given"
        if grid is None:
            from ..bundles.tuned_grids import resolve_sampling

            tuned, _, note = resolve_sampling(self.tuning, solver, nfe, None)
            t_grid, grid_note = (tuned, note) if note else (self.sigmas(steps, height, width), "scheduler sigmas")
        else:
            t_grid = grid
        # one front door: the plan checks the conditions against the declaration and runs solve
        model = self.bundle if sidenet else dataclasses.replace(self.bundle, sidenet=None)
        p = plan(model, solver=solver, nfe=nfe, grid=t_grid, cfg_scale=cfg if guided_rows else 1.0, cond=cond,
                 null_cond=null, noise=x0, options=options, tuning=None,
                 names={"cfg_scale": "cfg", **(names or {})})
        t0 = time.perf_counter()
        res = p.run()
        t1 = time.perf_counter()
        pixels, images = self.decode(res.x)
        t2 = time.perf_counter()
        after = {**self.text.calls, **self.calls}
        calls = {**{k: after[k] - before[k] for k in after}, "transformer": res.nfe, "sidenet": res.sidenet_calls}
        timing = {"tokenise": emb.tokenise_s, "encode": emb.encode_s, "denoise": t1 - t0, "decode": t2 - t1}
        if chosen is not None:
            grid_note = f"quality {chosen.name}: {chosen.grid_label}"
        return Generation(images, pixels, res.x, res, rows, calls, timing, grid_note, solver, int(nfe), float(cfg),
                          chosen)

    def resolve_quality(self, quality: Any, solver: Any = None, nfe: Any = None, grid: Any = None,
                        names: Optional[dict] = None) -> tuple:
        """(preset, solver, nfe, grid times, guidance it was tuned at or None) for ``quality``;
        one-line ConfigError when solver / nfe / grid are given too or the preset is not recorded."""
        from ..bundles.presets import resolve_quality

        nm = {"solver": "solver", "nfe": "nfe", "grid": "grid", **(names or {})}
        given = [nm[k] for k, v in (("solver", solver), ("nfe", nfe), ("grid", grid)) if v is not None]
        if given:
            raise ConfigError(f"quality {quality} chooses the solver, NFE and grid; drop {', '.join(given)}")
        if not str(quality).strip():
            raise ConfigError("quality is empty; give a preset name or a number of dB")
        p = resolve_quality(self.tuning, quality)
        if p.first_call != "backbone":
            raise ConfigError(f"quality {p.name} uses the cached first call, which generate does not run; "
                              "record a preset with 'anchorflow tune B --target-psnr Q --prompts FILE'")
        return p, p.solver, p.nfe, np.asarray(p.times, np.float64), preset_guidance(self.tuning, p.name)


PRESETS_KEY = "pipeline_presets"  # tuned.json settings: preset name -> how a pipeline preset was tuned


def preset_guidance(tuning: Any, name: str) -> Optional[float]:
    """The guidance scale a pipeline preset was tuned at (tuned.json ``settings.pipeline_presets``), or
    None where it is not recorded (then the pipeline's default guidance applies)."""
    rec = ((getattr(tuning, "settings", None) or {}).get(PRESETS_KEY) or {}).get(name)
    v = rec.get("cfg") if isinstance(rec, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        return None
    return float(v)


def load_pipeline(path: str | os.PathLike, backend: str = "ort-cpu", threads: Optional[int] = None,
                  allow_fallback: bool = False) -> Pipeline:
    """Open a pipeline bundle (``anchorflow export PIPELINE_FOLDER --out B``) for prompt -> image generation."""
    return Pipeline(path, backend=backend, threads=threads, allow_fallback=allow_fallback)
