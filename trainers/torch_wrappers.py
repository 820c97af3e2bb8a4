"""numpy-in / numpy-out wrappers so ``anchorflow.runtime.solve`` can drive torch modules.

They match the runtime's callables (:mod:`anchorflow.runtime.field`): ``velocity(x, t, y) -> v``
and ``sidenet(x, v, t, h, y) -> delta``, float32 numpy arrays, per-sample t (B,) with t = 1
noise and t = 0 data, labels int64 (B,) or None. They run on the CPU under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn


def _t(a: Optional[np.ndarray], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


class _Wrapper:
    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().to("cpu")

    def _labels(self, y: Optional[np.ndarray], batch: int) -> torch.Tensor:
        """Labels as int64; for y None the module's null label on every row (unconditional call)."""
        null = getattr(self.module, "null_label", None)
        if y is None and null is not None:
            return torch.full((batch,), int(null), dtype=torch.int64)
        return _t(y, torch.int64)


class TorchVelocity(_Wrapper):
    """``velocity(x, t, y) -> v`` for a torch backbone ``module(x, t, y)``; x (B, ...), t (B,)."""

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray, y: Optional[np.ndarray]) -> np.ndarray:
        xt = _t(x, torch.float32)
        v = self.module(xt, _t(t, torch.float32), self._labels(y, xt.shape[0]))
        return v.numpy().astype(np.float32, copy=False)


class TorchSideNet(_Wrapper):
    """``sidenet(x, v, t, h, y) -> delta`` for a torch SideNet ``module(x, v, t, h, y)``."""

    @torch.no_grad()
    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray,
                 y: Optional[np.ndarray]) -> np.ndarray:
        xt = _t(x, torch.float32)
        d = self.module(xt, _t(v, torch.float32), _t(t, torch.float32), _t(h, torch.float32),
                        self._labels(y, xt.shape[0]))
        return d.numpy().astype(np.float32, copy=False)
