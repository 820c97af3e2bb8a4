"""Our own checkpoints as a :class:`~.base.BackboneAdapter`: ``module(x, t, y)`` already in our time.

The digits DiT (and any backbone of :mod:`anchorflow.trainers.backbone`) exposes ``state_shape``,
``num_classes`` and ``null_label``; its only condition is the class label ``y`` int64 (batch,),
guidance is ``rows`` with the null label, the time map the identity. Time: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import AdapterSpec, BackboneAdapter, Condition


class NativeAdapter(BackboneAdapter):
    """Wraps a backbone ``module(x, t, y) -> v``; ``cond["y"]`` missing means the null label."""

    def __init__(self, module: nn.Module, name: str = "model", data_range: Optional[tuple] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.module = module
        classes, null = int(module.num_classes), getattr(module, "null_label", None)
        labels = (Condition("y", "int64", ("batch",), low=0, high=classes + (null is not None)),) if classes else ()
        guidance = {"mode": "rows", "null": {"y": int(null)}} if null is not None and classes else {"mode": "none"}
        self.spec = AdapterSpec(name=name, state=tuple(int(s) for s in module.state_shape), conditions=labels,
                                guidance=guidance, data_range=data_range, family="anchorflow")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        y = None if cond is None else cond.get("y")
        if y is None and self.spec.conditions:
            y = torch.full((x.shape[0],), int(self.module.null_label), dtype=torch.int64)
        return self.module(x, t, y)
