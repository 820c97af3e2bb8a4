"""What one `anchorflow sample` run draws: its start noise and its class labels.

Shared by the ``sample`` command and the HTTP service (``anchorflow serve``) so that a served
request and the command with the same arguments and seed start from the same arrays.
Time convention: the noise is the state at t = 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base.errors import ConfigError


def start_noise(seed: int, n: int, state_shape: Sequence[int]) -> np.ndarray:
    """(n, *state_shape) float32 standard normal noise from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal((n, *state_shape)).astype(np.float32)


def cycle_labels(values: Optional[Sequence[int]], n: int, num_classes: int, what: str = "labels") -> Optional[np.ndarray]:
    """(n,) int64 labels: ``values`` cycled (default 0..C-1 cycled); None for an unconditional model."""
    if num_classes <= 0:
        if values:
            raise ConfigError(f"this model is unconditional; drop {what}")
        return None
    if values is None or len(values) == 0:
        values = list(range(num_classes))
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_classes for v in values):
        raise ConfigError(f"{what} must be integers in 0..{num_classes - 1}, got {list(values)!r}")
    return np.resize(np.asarray(values, np.int64), n)
