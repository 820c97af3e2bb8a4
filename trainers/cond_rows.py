"""Condition dicts of row tensors for training: ``{name: tensor (B, ...)}``, the runtime's ``cond``.

A class-conditional backbone's labels are the condition ``{"y": int64 (B,)}``; text models carry
e.g. ``encoder_hidden_states`` (B, L, D) and ``pooled_projections`` (B, P). The null condition
(classifier-free guidance) is a dict of the same names with ONE row, broadcast where it is used.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .distributed import Dist

Cond = dict[str, torch.Tensor]


class LabelBackbone(nn.Module):
    """``forward(x, t, cond)`` for a backbone whose forward is ``(x, t, y)`` (our DiT / MLP checkpoints).

    Declares the one condition ``y`` (int64, per row) with the null label ``num_classes``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.state_shape = tuple(module.state_shape)
        self.num_classes, self.null_label = int(module.num_classes), int(module.null_label)
        self.conditions = {"y": {"dtype": "int64", "shape": []}}
        for name in ("patch", "patch_size"):
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def null_cond(self) -> Cond:
        return {"y": torch.tensor([self.null_label], dtype=torch.int64)}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.module(x, t, cond["y"])


def as_cond_backbone(backbone: Any) -> Any:
    """``backbone`` itself if it takes ``(x, t, cond)`` (declares ``conditions``), else a :class:`LabelBackbone`."""
    return backbone if hasattr(backbone, "conditions") else LabelBackbone(backbone)


def take(cond: Mapping[str, torch.Tensor], idx: torch.Tensor, device: str = "cpu") -> Cond:
    """Rows ``idx`` of every condition, on ``device``."""
    return {k: v[idx].to(device) for k, v in cond.items()}


def repeat(cond: Mapping[str, torch.Tensor], k: int) -> Cond:
    """Every condition tiled k times along the row axis (rows [c; c; ...], as ``x.repeat(k, ...)``)."""
    return {n: v.repeat(k, *[1] * (v.dim() - 1)) for n, v in cond.items()}


def drop_to_null(cond: Mapping[str, torch.Tensor], null: Optional[Mapping[str, torch.Tensor]], p: float,
                 gen: torch.Generator, dist: Optional[Dist] = None) -> Cond:
    """Replace each row's conditions by the null condition with probability p (CFG training).

    One uniform draw per row of the global batch (the same draw as label dropout always made,
    so class-conditional runs are unchanged); the null dict's single row is broadcast.
    """
    cond = dict(cond)
    if p <= 0 or not cond:
        return cond
    if null is None:
        from ..errors import ConfigError

        raise ConfigError("label/prompt dropout needs the null condition: pass --null-cond FILE (e.g. the "
                          "empty prompt's embeddings) or --label-dropout 0")
    b = next(iter(cond.values())).shape[0]
    drop = (dist or Dist()).draw(torch.rand, gen, b) < p
    out = {}
    for name, v in cond.items():
        nv = null[name].to(v.device, v.dtype).reshape(1, *v.shape[1:]) if name in null else None
        if nv is None:
            from ..errors import ConfigError

            raise ConfigError(f"the null condition has no {name!r}; it must name every condition "
                              f"({', '.join(cond)})")
        mask = drop.to(v.device).reshape(-1, *[1] * (v.dim() - 1))
        out[name] = torch.where(mask, nv.expand_as(v), v)
    return out
