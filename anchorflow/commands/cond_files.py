"""Condition files for `anchorflow sample --cond/--null-cond` and start noise for `--noise`.

A condition file holds one array per condition name: ``.npz`` (``np.savez``) or ``.safetensors``.
What they must contain is the bundle's declaration (checked by
:func:`anchorflow.runtime.bundles.networks.check_conditions`, one line listing what is expected).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.errors import ConfigError


MAX_HEADER = 100 << 20  # a safetensors header is kilobytes; the format itself caps it at 100 MB


def read_arrays(path: str, what: str) -> dict:
    """name -> array from a .npz or .safetensors file (ConfigError for anything else: one line
    naming the file and what is wrong; never a pickle)."""
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise ValueError("a single .npy array, not an .npz archive")
                return {k: data[k] for k in data.files}
        if p.suffix == ".safetensors":
            return _read_safetensors(p, what)
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{what} {path} is not a readable {p.suffix} file ({str(exc)[:200]})") from None
    raise ConfigError(f"{what} {path}: expected a .npz or .safetensors file with one array per condition name")


def _read_safetensors(p: Path, what: str) -> dict:
    """A .safetensors file, its header checked first (size, JSON, offsets inside the file)."""
    import json

    from ..base._deps import require

    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise ConfigError(f"{what} {p}: not a safetensors file (it declares a {n}-byte header in a {size}-byte "
                              "file)")
        header_text = fh.read(n)
    try:
        header = json.loads(header_text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"{what} {p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{what} {p}: not a safetensors file (its header is not a JSON object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise ConfigError(f"{what} {p}: tensor {str(name)[:40]!r} lies outside the file (truncated or damaged)")
    st = require("safetensors.numpy", extra="train", purpose="reading .safetensors conditions")
    try:
        return dict(st.load_file(str(p)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"{what} {p} is not a readable .safetensors file ({str(exc)[:200]})") from None


def read_noise(path: str, state_shape: tuple) -> np.ndarray:
    """Start noise (n, *state) float32 from a .npy file (finite values; never a pickle, never an .npz)."""
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--noise {path} is not a readable .npy file ({str(exc)[:200]})") from None
    if not isinstance(noise, np.ndarray):  # np.load opened an .npz archive
        noise.close()
        raise ConfigError(f"--noise {path} is an .npz archive; give one .npy array (n, "
                          f"{', '.join(map(str, state_shape))}) (np.save)")
    if noise.ndim < 2 or not np.issubdtype(noise.dtype, np.floating):
        raise ConfigError(f"--noise {path}: expected a float array (n, {', '.join(map(str, state_shape))}), "
                          f"got {noise.dtype} {noise.shape}")
    if not np.all(np.isfinite(noise)):
        raise ConfigError(f"--noise {path} holds NaN or Inf")
    return noise.astype(np.float32, copy=False)
