"""Prompt -> transformer conditions, torch-free: tokenizers (the ``tokenizers`` package), the exported
text encoders (onnxruntime) and one small recipe function per pipeline family.

Tokenisation is the pipeline's: ``tokenizer(prompt, padding="max_length", max_length=M,
truncation=True)`` with the special tokens the tokenizer.json's post-processor adds; a prompt longer
than M tokens is cut to M as diffusers cuts it, and a ``warning:`` line says so.

Recipes (what diffusers' ``encode_prompt`` computes, written from its definition):

- ``sd3``: CLIP-L and CLIP-G penultimate hidden states concatenated on features, zero-padded to the
  T5 width, then concatenated with T5's last hidden state on tokens (77 + M tokens);
  ``pooled_projections`` = the two CLIP projections concatenated. Negative prompt: "" by default.
- ``flux``: ``encoder_hidden_states`` = T5's last hidden state (M tokens), ``pooled_projections`` =
  CLIP's pooled output. No negative prompt (FLUX-dev guidance is embedded, schnell has none).
- ``sana``: prompts lower-cased and stripped, prefixed with the pipeline's complex human
  instruction (C tokens), tokenised to C + M - 2 tokens (right padding, attention mask); Gemma's last
  hidden state and the mask at rows ``[0] + [-M+1 .. -1]`` (M = 300); negative prompts ("" by
  default) without the instruction at M tokens. One Gemma call carries both: the negative rows are
  padded (mask 0) to the prompt length, which a causal encoder's first M outputs do not see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ...base._deps import require
from ...base.errors import ConfigError, warn


class TextTokenizer:
    """A bundle's ``tokenizer.json`` set up as the pipeline calls its tokenizer."""

    def __init__(self, path: str | Path, entry: dict, name: str = "tokenizer") -> None:
        tokenizers = require("tokenizers", extra="pipeline", purpose="tokenising prompts of a pipeline bundle")
        self.name, self.max_length, self.path, self.entry = name, int(entry["max_length"]), Path(path), dict(entry)
        self.full = tokenizers.Tokenizer.from_file(str(path))
        self.full.no_padding()
        self.full.no_truncation()
        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self.tok.enable_truncation(self.max_length)
        self.tok.enable_padding(length=self.max_length, pad_id=int(entry["pad_id"]), pad_token=str(entry["pad_token"]),
                                direction=str(entry.get("padding_side", "right")))

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(input_ids int64 (B, M), attention_mask int64 (B, M), untruncated token counts)."""
        enc = self.tok.encode_batch(list(prompts))
        lengths = [len(e.ids) for e in self.full.encode_batch(list(prompts))]
        ids = np.asarray([e.ids for e in enc], dtype=np.int64).reshape(len(enc), self.max_length)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), self.max_length)
        return ids, mask, lengths


def sd3_recipe(out: dict, recipe: dict) -> dict:
    h1, p1 = out["text_encoder"]["hidden"], out["text_encoder"]["pooled"]
    h2, p2 = out["text_encoder_2"]["hidden"], out["text_encoder_2"]["pooled"]
    clip = np.concatenate([h1, h2], axis=-1)
    t5 = out["text_encoder_3"]["hidden"]
    clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    return {"encoder_hidden_states": np.concatenate([clip, t5], axis=-2),
            "pooled_projections": np.concatenate([p1, p2], axis=-1)}


def flux_recipe(out: dict, recipe: dict) -> dict:
    return {"encoder_hidden_states": out["text_encoder_2"]["hidden"], "pooled_projections": out["text_encoder"]["pooled"]}


RECIPES: dict[str, Callable[[dict, dict], dict]] = {"sd3": sd3_recipe, "flux": flux_recipe}
FAMILIES = (*RECIPES, "sana")  # Sana's rows differ per prompt kind: TextStack._encode_sana


@dataclass
class Embeddings:
    """Conditions for the prompts (``cond``) and, when asked, for the negative prompts (``null``)."""

    cond: dict
    null: Optional[dict] = None
    truncated: list = field(default_factory=list)  # (encoder, prompt index, tokens) per cut prompt
    tokenise_s: float = 0.0
    encode_s: float = 0.0


class TextStack:
    """The text encoders of a pipeline bundle with their tokenizers and the family's recipe.

    ``encoders``: name -> (tokenizer, run) with ``run(feeds) -> dict`` of named outputs.
    ``calls``: encoder name -> number of encoder calls (one per :meth:`encode`, prompts and negative
    prompts in the same call)."""

    def __init__(self, family: str, recipe: dict, encoders: dict) -> None:
        if family not in FAMILIES:
            raise ConfigError(f"no prompt recipe for the {family!r} family")
        self.family, self.recipe, self.encoders = family, recipe, encoders
        self.calls = {name: 0 for name in encoders}

    def encode(self, prompts: Sequence[str], negative: Optional[Sequence[str]] = None) -> Embeddings:
        if self.family == "sana":
            return self._encode_sana([str(p) for p in prompts], None if negative is None else [str(p) for p in negative])
        prompts = [str(p) for p in prompts]
        rows = prompts + ([str(p) for p in negative] if negative is not None else [])
        outs, cut, tok_s, enc_s = {}, [], 0.0, 0.0
        for name, (tokenizer, run, masked) in self.encoders.items():
            t0 = time.perf_counter()
            ids, mask, lengths = tokenizer(rows)
            t1 = time.perf_counter()
            feeds = {"input_ids": ids, **({"attention_mask": mask} if masked else {})}
            outs[name] = run(feeds)
            self.calls[name] += 1
            tok_s, enc_s = tok_s + t1 - t0, enc_s + time.perf_counter() - t1
            for i, n in enumerate(lengths):
                if n > tokenizer.max_length:
                    cut.append((name, i, n))
        for name, i, n in cut:
            which = f"prompt {i + 1}" if i < len(prompts) else f"negative prompt {i - len(prompts) + 1}"
            warn(f"{which} is {n} tokens for the {name}, which takes {self.encoders[name][0].max_length}: "
                 "truncated as diffusers does (the rest is ignored)")
        both = RECIPES[self.family](outs, self.recipe)
        b = len(prompts)
        cond = {k: np.ascontiguousarray(v[:b]) for k, v in both.items()}
        null = {k: np.ascontiguousarray(v[b:]) for k, v in both.items()} if negative is not None else None
        return Embeddings(cond, null, cut, tok_s, enc_s)

    def _encode_sana(self, prompts: list, negative: Optional[list]) -> Embeddings:
        name = "text_encoder"
        tok, run, _ = self.encoders[name]
        chi, m = str(self.recipe.get("complex_human_instruction") or ""), int(self.recipe["max_sequence_length"])
        t0 = time.perf_counter()
        ids, mask, lengths = tok([chi + p.lower().strip() for p in prompts])
        cut = [(name, i, n) for i, n in enumerate(lengths) if n > tok.max_length]
        if negative is not None:
            if not hasattr(self, "_short"):
                self._short = TextTokenizer(tok.path, {**tok.entry, "max_length": m}, name)
            nids, nmask, nlen = self._short([p.lower().strip() for p in negative])
            cut += [(name, len(prompts) + i, n) for i, n in enumerate(nlen) if n > m]
            pad = ids.shape[1] - m
            nids = np.pad(nids, ((0, 0), (0, pad)), constant_values=int(tok.entry["pad_id"]))
            ids, mask = np.concatenate([ids, nids]), np.concatenate([mask, np.pad(nmask, ((0, 0), (0, pad)))])
        t1 = time.perf_counter()
        hidden = run({"input_ids": ids, "attention_mask": mask})["hidden"]
        self.calls[name] += 1
        t2 = time.perf_counter()
        for _, i, n in cut:
            which = f"prompt {i + 1}" if i < len(prompts) else f"negative prompt {i - len(prompts) + 1}"
            warn(f"{which} is {n} tokens for the {name} (the instruction included), which takes "
                 f"{tok.max_length if i < len(prompts) else m}: truncated as diffusers does (the rest is ignored)")
        b = len(prompts)
        sel = [0, *range(ids.shape[1] - m + 1, ids.shape[1])] if chi else list(range(m))
        cond = {"encoder_hidden_states": np.ascontiguousarray(hidden[:b][:, sel]),
                "encoder_attention_mask": np.ascontiguousarray(mask[:b][:, sel])}
        null = None if negative is None else {"encoder_hidden_states": np.ascontiguousarray(hidden[b:, :m]),
                                              "encoder_attention_mask": np.ascontiguousarray(mask[b:, :m])}
        return Embeddings(cond, null, cut, t1 - t0, t2 - t1)


def read_prompts(path, what: str = "--prompts") -> list[str]:
    """The prompts of a text file, one a line (empty lines skipped); one-line ConfigError otherwise."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.rstrip("\r\n") for ln in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    found = [ln for ln in lines if ln.strip()]
    if not found:
        raise ConfigError(f"{what} {path} holds no prompt (one a line)")
    return found
