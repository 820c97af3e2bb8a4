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


class AdapterView(nn.Module):
    """A backbone adapter (``trainers/adapters``: ``forward(x, t, cond)`` with an ``AdapterSpec``) with
    the facts SideNet training reads: ``state_shape`` (the spec's opt sizes), ``conditions`` (name ->
    dtype, shape after the row axis), ``guidance`` (its mode), the null label / null condition the
    spec declares inline, ``num_classes`` and ``patch_size`` (the transformer's; FLUX packs 2 x 2)."""

    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        from ..base.errors import ConfigError

        self.adapter, spec = adapter, adapter.spec
        fixed = [c.name for c in spec.conditions if not c.per_row]
        if fixed:
            raise ConfigError(f"SideNet training needs per-row conditions; {', '.join(fixed)} have no row axis")
        self.state_shape = tuple(int(s) for s in spec.state_shape())
        self.guidance = dict(spec.guidance)
        self.conditions = {c.name: {"dtype": c.dtype, "shape": list(c.shape[1:])} for c in spec.conditions}
        inline = dict(self.guidance.get("null") or {})
        labels = next((c for c in spec.conditions if c.name == "y"), None)
        self.null_label = None if "y" not in inline else int(inline["y"])
        self.num_classes = 0 if labels is None or labels.high is None else int(labels.high) - ("y" in inline)
        self._inline_null = inline
        cfg = getattr(getattr(adapter, "transformer", None), "config", None)
        patch = int(getattr(cfg, "patch_size", 1) or 1) if cfg is not None else int(getattr(adapter, "patch_size", 1))
        self.patch_size = 2 * patch if getattr(spec, "family", "") == "flux" else patch

    def null_cond(self) -> Optional[Cond]:
        """The inline null condition (e.g. the null label) when it covers every condition, else None."""
        if not self.conditions or set(self.conditions) - set(self._inline_null):
            return None
        return {k: torch.tensor([v], dtype=torch.int64 if self.conditions[k]["dtype"].startswith("int")
                                else torch.float32) for k, v in self._inline_null.items() if k in self.conditions}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter(x, t, dict(cond))


def as_cond_backbone(backbone: Any) -> Any:
    """``backbone`` if it already declares ``conditions``; an adapter (has ``spec``) as an
    :class:`AdapterView`; else a class-conditional ``(x, t, y)`` module as a :class:`LabelBackbone`."""
    if hasattr(backbone, "conditions"):
        return backbone
    if hasattr(getattr(backbone, "spec", None), "conditions"):
        return AdapterView(backbone)
    return LabelBackbone(backbone)


# There is no --label-dropout option: the CLI always trains with null rows where guidance needs them.
NULL_NEEDED = ("this backbone guides on [cond; null] rows, so training drops 10% of the rows to the null condition: "
               "pass --null-cond FILE (one row, e.g. the empty prompt's embeddings, under the --cond names); "
               "from Python, SideNetTrainSettings(label_dropout=0) trains without null rows (a SideNet for "
               "sampling without guidance)")


def uses_null_rows(backbone: Any) -> bool:
    """True when sampling guides on [cond; null] rows (so training needs null rows): guidance mode 'rows'."""
    return dict(getattr(backbone, "guidance", None) or {"mode": "rows"}).get("mode", "rows") == "rows"


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
        from ..base.errors import ConfigError

        raise ConfigError(NULL_NEEDED)
    b = next(iter(cond.values())).shape[0]
    drop = (dist or Dist()).draw(torch.rand, gen, b) < p
    out = {}
    for name, v in cond.items():
        nv = null[name].to(v.device, v.dtype).reshape(1, *v.shape[1:]) if name in null else None
        if nv is None:
            from ..base.errors import ConfigError

            raise ConfigError(f"the null condition has no {name!r}; it must name every condition "
                              f"({', '.join(cond)})")
        mask = drop.to(v.device).reshape(-1, *[1] * (v.dim() - 1))
        out[name] = torch.where(mask, nv.expand_as(v), v)
    return out
