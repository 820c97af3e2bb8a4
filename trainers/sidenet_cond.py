"""How a SideNet sees the backbone's conditions: one pooled vector per row, or nothing.

The SideNet's FiLM conditioning is ``silu(emb(t) + emb(h) + c)`` with ``c`` (B, cond_dim) from
the backbone's own conditions (the dict the runtime passes as ``cond``):

=========  ==========================================  ===================================
kind       inputs (ONNX names = condition names)        c
=========  ==========================================  ===================================
label      ``y`` int64 (B,)                             embedding table, null label included
pooled     e.g. ``pooled_projections`` (B, P)           Linear(P, cond_dim)
mean       ``encoder_hidden_states`` (B, L, D) [+ mask  Linear(D, cond_dim) of the mean over
           ``encoder_attention_mask`` (B, L)]           L (masked where a mask is declared)
none       --                                           0 (v already carries the prompt)
=========  ==========================================  ===================================

Per family (``choose``): our class-conditional DiTs -> label; SD3 (``pooled_projections``, the
CLIP pooled text vector) and FLUX (its ``pooled_projections``) -> pooled; Sana (T5/Gemma
sequence without a pooled vector) -> mean, masked with ``encoder_attention_mask``; a backbone
without conditions -> none. ``--sidenet-cond none`` forces an unconditional SideNet.

A checkpoint's arch stores ``cond`` (absent in SideNets written before it: label kind with
``num_classes``, so they load bit-exactly, the table keeping its name ``y_embed``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..base.errors import ConfigError

KINDS = ("label", "pooled", "mean", "none")
POOLED_NAMES = ("pooled_projections", "pooled_prompt_embeds", "text_embeds")
SEQUENCE_NAMES = ("encoder_hidden_states", "prompt_embeds")
MASK_NAMES = ("encoder_attention_mask", "attention_mask", "prompt_attention_mask")


def spec_from_arch(arch: Mapping[str, Any]) -> dict:
    """The ``cond`` entry of a SideNet arch, defaulting to the label table of old checkpoints."""
    spec = arch.get("cond")
    if spec is None:
        return {"kind": "label", "inputs": ["y"], "num_classes": int(arch["num_classes"])}
    if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
        raise ConfigError(f"SideNet arch 'cond' must name a kind in {KINDS}, got {spec!r}")
    return dict(spec)


class CondEmbed(nn.Module):
    """Float conditions of one row -> (B, cond_dim) for kinds 'pooled' and 'mean' (see the module
    docstring; the label kind is the SideNet's own ``y_embed`` table, named as in old checkpoints)."""

    def __init__(self, spec: dict, cond_dim: int) -> None:
        super().__init__()
        self.kind, self.inputs = spec["kind"], tuple(spec.get("inputs", ()))
        if self.kind not in ("pooled", "mean"):
            raise ConfigError(f"CondEmbed handles the pooled and mean kinds, not {self.kind!r}")
        self.proj = nn.Linear(int(spec["dim"]), cond_dim)

    def forward(self, *conds: torch.Tensor) -> torch.Tensor:
        if self.kind == "pooled":
            return self.proj(conds[0].float())
        seq = conds[0].float()  # (B, L, D)
        if len(conds) > 1:  # mask (B, L): 1 / True = a real token
            w = conds[1].to(seq.dtype)[:, :, None]
            return self.proj((seq * w).sum(1) / w.sum(1).clamp_min(1.0))
        return self.proj(seq.mean(1))


def choose(conditions: Mapping[str, Mapping[str, Any]], want: str = "auto", num_classes: int = 0) -> dict:
    """The ``cond`` spec for a backbone declaring ``conditions`` (name -> {dtype, shape, ...}).

    ``want``: 'auto' (label > pooled > mean > none, per the module docstring), 'none', or a
    condition name to use. ``shape`` lists the dims after the row axis as ints or axis names.
    """
    want = (want or "auto").strip()
    if want == "none" or not conditions:
        if want not in ("none", "auto"):
            raise ConfigError(f"--sidenet-cond {want!r}: the backbone declares no conditions; use 'none'")
        return {"kind": "none", "inputs": []}
    if want != "auto":
        if want not in conditions:
            raise ConfigError(f"--sidenet-cond {want!r} is not one of the backbone's conditions "
                              f"({', '.join(conditions)}), 'auto' or 'none'")
        return _spec_for(want, conditions, num_classes)
    for names in (("y",), POOLED_NAMES, SEQUENCE_NAMES):
        for name in names:
            if name in conditions:
                return _spec_for(name, conditions, num_classes)
    return {"kind": "none", "inputs": []}


def _spec_for(name: str, conditions: Mapping[str, Mapping[str, Any]], num_classes: int) -> dict:
    info = conditions[name]
    dtype, shape = str(info.get("dtype", "float32")), list(info.get("shape", []))
    if dtype.startswith("int"):
        if len(shape) != 0 or num_classes <= 0:
            raise ConfigError(f"condition {name!r} ({dtype}, shape {shape}) cannot be a SideNet label: "
                              "a label is one int64 per row with a known number of classes")
        return {"kind": "label", "inputs": [name], "num_classes": int(num_classes)}
    if len(shape) == 1 and isinstance(shape[0], int):
        return {"kind": "pooled", "inputs": [name], "dim": int(shape[0])}
    if len(shape) == 2 and isinstance(shape[1], int):
        mask = next((m for m in MASK_NAMES if m in conditions), None)
        return {"kind": "mean", "inputs": [name] + ([mask] if mask else []), "dim": int(shape[1])}
    raise ConfigError(f"condition {name!r} of shape {shape} cannot condition the SideNet (a vector (P,) or a "
                      "sequence (L, D) with fixed P / D is needed); pass --sidenet-cond none or another name")


def pick(cond: Optional[Mapping[str, torch.Tensor]], inputs: tuple[str, ...]) -> list[torch.Tensor]:
    """The SideNet's positional condition inputs from a cond dict (refuses a missing one)."""
    if not inputs:
        return []
    missing = [n for n in inputs if cond is None or n not in cond]
    if missing:
        raise ConfigError(f"the SideNet needs the condition(s) {', '.join(missing)}, which the caller did not pass")
    return [cond[n] for n in inputs]
