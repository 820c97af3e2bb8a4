"""Prompts in a request, on a pipeline bundle: ``"prompt"`` / ``"negative_prompt"`` -> conditions (Ray-free).

A pipeline bundle (``anchorflow export PIPELINE_FOLDER``) holds its text encoders and VAE, so a
request may send ``{"prompt": "a red cat", "negative_prompt": "blurry", "cfg": 4, "format": "png"}``
instead of base64 conditions. The service then does what ``anchorflow generate`` does for the same
prompt, seed, solver and NFE at the bundle's image size (its exported ``opt``):

- the prompt(s) and, for guidance rows (SD3, Sana) with ``cfg`` > 1, the negative prompt ("" by
  default, as diffusers) are encoded torch-free in one call per text encoder (:mod:`anchorflow.runtime.pipelines.text`);
- FLUX-dev's ``cfg`` is its embedded ``guidance`` input (no CFG rows); FLUX-schnell takes none;
- without ``"grid"``: the bundle's tuned grid for (solver, NFE) when it has one, else the pipeline
  scheduler's own sigmas (not ``sample``'s uniform grid), as ``generate`` picks.

``"prompt"`` is one string (shared by the n samples) or a list of n strings; ``"negative_prompt"``
one string. Whatever is wrong is a :class:`~.errors.RequestError` (HTTP 400) naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..base.errors import ConfigError
from .errors import RequestError

# a prompt longer than this many characters is refused before tokenising (the tokenizers cut far sooner)
MAX_PROMPT_CHARS = 20_000


class PromptConditions:
    """The prompt side of a pipeline bundle for the service: its text stack, guidance mode and scheduler."""

    def __init__(self, bundle: str | Path, decls: Sequence, backend: str = "ort-cpu",
                 threads: Optional[int] = None) -> None:
        from ..runtime.bundles.format import read_bundle
        from ..runtime.pipelines.pipeline import _text
        from ..runtime.pipelines.format import parse_pipeline

        fmt = read_bundle(bundle)
        self.decl = parse_pipeline(fmt.meta, fmt.folder)
        if self.decl is None:
            raise ConfigError(f"{bundle} has no text encoders (a transformer bundle)")
        self.text = _text(self.decl, backend, threads)
        self.mode = fmt.guidance.mode
        self.guidance_input = fmt.guidance.input or "guidance"
        self.per_row = {d.name: d.per_row for d in decls}
        self.state_shape = tuple(int(s) for s in fmt.meta["model"]["state_shape"])

    @property
    def variant(self) -> str:
        return self.decl.variant

    def __call__(self, prompt: Any, negative: Any, n: int, cfg: float) -> tuple[tuple, Optional[tuple], float]:
        """``(conditions, null_conditions, cfg for the plan)`` as :func:`.conditions.parse_conditions` gives them:
        sorted ``(name, array, per_row)`` tuples, 1 row (a shared prompt) or n rows."""
        prompts = _texts(prompt, "prompt", n)
        if negative is not None:
            _texts(negative, "negative_prompt", 1, one=True)
            if self.mode != "rows":
                raise RequestError(f"a {self.variant} bundle has no negative-prompt guidance (its guidance is "
                                   f"{self.mode}); drop 'negative_prompt'")
        if self.mode == "none" and cfg != 1.0:
            raise RequestError(f"{self.variant} has no guidance; drop 'cfg' (got {cfg:g})")
        guided = self.mode == "rows" and cfg > 1.0  # diffusers: classifier-free guidance when guidance_scale > 1
        try:
            emb = self.text.encode(prompts, [negative or ""] if guided else None)
        except ConfigError as exc:
            raise RequestError(str(exc)[:400]) from None
        cond = dict(emb.cond)
        if self.mode == "embedded":
            cond[self.guidance_input] = np.full((len(prompts),), cfg, np.float32)
        flat = lambda d: tuple((k, v, self.per_row.get(k, True)) for k, v in sorted(d.items()))  # noqa: E731
        return flat(cond), (flat(emb.null) if guided else None), (cfg if guided else 1.0)

    def default_grid(self, steps: int) -> tuple:
        """The pipeline scheduler's sigmas for ``steps`` steps at the bundle's latent size (1 -> 0)."""
        from ..runtime.pipelines.schedule import pipeline_sigmas

        h, w = self.state_shape[-2:]
        return tuple(float(t) for t in pipeline_sigmas(self.decl.family, self.decl.scheduler, steps, (h, w)))


def _texts(value: Any, name: str, n: int, one: bool = False) -> list:
    """A string, or (unless ``one``) a list of n strings, checked."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or (one and len(items) != 1) or \
            not all(isinstance(s, str) for s in items):
        raise RequestError(f"{name!r} must be a string" + ("" if one else f" or a list of n = {n} strings"))
    if len(items) not in (1, n):
        raise RequestError(f"{name!r} has {len(items)} prompts; give one (shared by the n = {n} samples) or n")
    for s in items:
        if len(s) > MAX_PROMPT_CHARS:
            raise RequestError(f"{name!r} is {len(s)} characters, over this service's {MAX_PROMPT_CHARS}")
    return items
