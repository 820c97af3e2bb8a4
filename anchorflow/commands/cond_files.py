"""Condition files for `anchorflow sample --cond/--null-cond` and start noise for `--noise`.

A condition file holds one array per condition name: ``.npz`` (``np.savez``) or ``.safetensors``.
What they must contain is the bundle's declaration (checked by
:func:`anchorflow.runtime.networks.check_conditions`, one line listing what is expected).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError


def read_arrays(path: str, what: str) -> dict:
    """name -> array from a .npz or .safetensors file (ConfigError for anything else)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if p.suffix == ".safetensors":
            from .._deps import require

            return dict(require("safetensors.numpy", extra="train", purpose="reading .safetensors conditions")
                        .load_file(str(p)))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is not a readable {p.suffix} file ({exc})") from None
    raise ConfigError(f"{what} {path}: expected a .npz or .safetensors file with one array per condition name")


def read_noise(path: str, state_shape: tuple) -> np.ndarray:
    """Start noise (n, *state) float32 from a .npy file."""
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--noise {path} is not a readable .npy file ({exc})") from None
    if noise.ndim < 2 or not np.issubdtype(noise.dtype, np.floating):
        raise ConfigError(f"--noise {path}: expected a float array (n, {', '.join(map(str, state_shape))}), "
                          f"got {noise.dtype} {noise.shape}")
    return noise.astype(np.float32, copy=False)
