"""`anchorflow invert` / `anchorflow edit` library: image files in, noise or edited images out.

Images reach the model's state space through a :class:`Codec`: on a model without a VAE (the
bundled digits model) the identity (:class:`PixelCodec`: the pixels mapped linearly onto the
model's ``data_range``, size and channels as the state's); a latent model supplies a codec with a
VAE ``encode`` / ``decode`` pair. Conditions, labels and guidance are checked and resolved by
:func:`anchorflow.runtime.plan.plan`, the one front door every front end uses; the numbers come from
:func:`anchorflow.runtime.solving.invert.invert` / :func:`~anchorflow.runtime.solving.invert.edit`.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from .base.errors import ConfigError

IMAGE_MODES = {"L": 1, "RGB": 3}
NAMES = {"labels": "--labels", "cond": "--cond", "null_cond": "--null-cond", "cfg_scale": "--cfg",
         "cfg_interval": "--cfg-interval", "nfe": "--nfe", "solver": "--solver", "grid": "--grid"}


class Codec(Protocol):
    """Pixels <-> model states. ``encode(pixels (N, H, W, C) float32 in [0, 1]) -> states (N, *state)``;
    ``decode(states) -> pixels (N, H, W, C) in [0, 1]``; ``channels``: C the encoder takes (1 or 3)."""

    channels: int

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...

    def decode(self, states: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PixelCodec:
    """The identity codec of a pixel-space model: state (C, H, W) = the image, 0..1 mapped onto ``data_range``."""

    state_shape: tuple[int, ...]
    data_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def channels(self) -> int:
        return int(self.state_shape[0])

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        lo, hi = self.data_range
        return (lo + (hi - lo) * pixels.transpose(0, 3, 1, 2)).astype(np.float32)

    def decode(self, states: np.ndarray) -> np.ndarray:
        lo, hi = self.data_range
        return np.clip((np.asarray(states, np.float64) - lo) / (hi - lo), 0.0, 1.0).transpose(0, 2, 3, 1)


def _pixels(path: Path, codec, state_shape: tuple, latent: bool) -> np.ndarray:
    """(1, H, W, C) float32 in [0, 1] from an image file, checked against what the codec takes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            if mode not in IMAGE_MODES:
                raise ConfigError(f"--image {path}: pillow mode {mode!r}; save it as 8-bit grey (L) or RGB")
            channels = IMAGE_MODES[mode]
            if channels != codec.channels:
                if channels == 3 and not latent:
                    raise ConfigError(f"--image {path} is an RGB image, but this model's state has "
                                      f"{codec.channels} channel(s) and its bundle has no VAE encoder to map RGB "
                                      "images into it; give a grey (L) image")
                if not (channels == 1 and codec.channels == 3):
                    raise ConfigError(f"--image {path} has {channels} channel(s); this model takes {codec.channels}")
                img = img.convert("RGB")  # grey into an RGB encoder: the three channels equal
            arr = np.asarray(img, np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"--image {path} is not an image pillow can read ({type(exc).__name__}); "
                          "give a PNG/JPEG/WebP file or a .npy state") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not latent and (size[1], size[0]) != tuple(state_shape[1:]):
        want = "x".join(map(str, state_shape[1:][::-1]))
        raise ConfigError(f"--image {path} is {size[0]}x{size[1]} pixels; this model takes {want} images "
                          f"(width x height)")
    return arr[None]


def read_image(path: str, state_shape: Sequence[int], data_range: Sequence[float] = (-1.0, 1.0),
               codec: Optional[Codec] = None) -> np.ndarray:
    """The model state(s) (N, *state) float32 of an image file (through ``codec``) or a .npy state file.

    A ``.npy`` holds states as they are: (*state) or (N, *state), finite, inside ``data_range`` on a
    pixel model (a latent model's states have no range). Anything else is read with pillow: grey or
    RGB, of the model's size on a pixel model. Every refusal is one :class:`ConfigError` line.
    """
    p = Path(path)
    state_shape = tuple(int(s) for s in state_shape)
    if not p.is_file():
        raise ConfigError(f"--image {path}: no such file")
    latent = codec is not None
    if p.suffix.lower() == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--image {path} is not a readable .npy file ({exc})") from None
        if tuple(x.shape) == state_shape:
            x = x[None]
        if tuple(x.shape[1:]) != state_shape or x.ndim < 2 or x.shape[0] < 1:
            raise ConfigError(f"--image {path} has shape {x.shape}; this model's state is "
                              f"({', '.join(map(str, state_shape))}) (optionally with a leading batch axis)")
        if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
            raise ConfigError(f"--image {path} must hold finite floating-point values, got {x.dtype}")
        lo, hi = (float(v) for v in data_range)
        tol = 1e-3 * (hi - lo)
        if not latent and (x.min() < lo - tol or x.max() > hi + tol):
            raise ConfigError(f"--image {path} holds values in [{x.min():.3g}, {x.max():.3g}], outside the model's "
                              f"data range [{lo:g}, {hi:g}]")
        return x.astype(np.float32)
    codec = codec or PixelCodec(state_shape, (float(data_range[0]), float(data_range[1])))
    x = np.asarray(codec.encode(_pixels(p, codec, state_shape, latent)), np.float32)
    if tuple(x.shape[1:]) != state_shape:
        raise ConfigError(f"--image {path} encodes to shape {x.shape[1:]}; this model's state is {state_shape}")
    return x


def write_image(x: np.ndarray, out: str, npy: Optional[str], data_range: Sequence[float],
                codec: Optional[Codec] = None) -> None:
    """The edited image(s) at the model's size (several side by side) and optionally the raw states; all or nothing."""
    from .base import _io
    from .base.errors import NonFiniteError
    from PIL import Image

    if not np.all(np.isfinite(x)):
        raise NonFiniteError(f"the edit holds NaN or Inf values; nothing was written to {out}")
    fmt = _io.check_image_path(out)
    codec = codec or PixelCodec(tuple(x.shape[1:]), (float(data_range[0]), float(data_range[1])))
    px = np.rint(np.asarray(codec.decode(x)) * 255.0).astype(np.uint8)  # (N, H, W, C)
    strip = np.concatenate(list(px), axis=1)
    img = Image.fromarray(strip[:, :, 0] if strip.shape[2] == 1 else strip, "L" if strip.shape[2] == 1 else "RGB")
    with _io.atomic_paths([out] + ([npy] if npy else [])) as tmps:
        img.save(tmps[0], format=fmt)
        if npy:
            with open(tmps[1], "wb") as fh:
                np.save(fh, x)


def _condition_args(model, labels: Any, cond: Optional[Mapping], null_cond: Optional[Mapping], n: int,
                    solver: str, nfe: int, grid: Any, cfg_scale: float, cfg_interval: Any,
                    names: Optional[Mapping[str, str]] = None) -> dict:
    """solve-style keyword arguments (cond, null_cond, sidenet, guidance, grid) checked by the plan."""
    from .runtime.plan import plan

    p = plan(model, solver=solver, nfe=nfe, grid="uniform" if grid is None else grid, cfg_scale=cfg_scale,
             cfg_interval=cfg_interval, labels=labels, cond=cond, null_cond=null_cond, n=n, names={**NAMES, **(names or {})})
    kw = p.solve_kwargs()
    kw.pop("first_call")
    return kw


def invert_image(model, image: str, *, solver: str = "ba", nfe: int = 10, labels: Any = None,
                 cond: Optional[Mapping] = None, null_cond: Optional[Mapping] = None, cfg_scale: float = 1.0,
                 cfg_interval: Any = (0.0, 1.0), grid: Any = None, t_end: float = 1.0,
                 codec: Optional[Codec] = None):
    """Read ``image`` and invert it to noise on ``model`` (a LoadedBundle / OpenModel): the runtime Result."""
    from .runtime.solving.invert import invert

    if labels is None and not cond and int(model.meta.get("num_classes") or 0) > 0:
        # sampling cycles the labels 0..C-1 by default; an image has ONE class, which only the user knows
        raise ConfigError(f"this model is class-conditional: give the image's class with --labels "
                          f"(0..{int(model.meta['num_classes']) - 1}), or its conditions with --cond")
    x0 = read_image(image, model.meta["state_shape"], model.meta.get("data_range") or (-1.0, 1.0), codec)
    kw = _condition_args(model, labels, cond, null_cond, len(x0), solver, nfe, grid, cfg_scale, cfg_interval)
    return invert(solver, model.velocity, x0, nfe, t_end=t_end, **kw)


def _side(model, value: Any, what: str) -> tuple[Any, Optional[Mapping]]:
    """(labels, cond) of a --source / --target value: a condition file, or class labels."""
    if isinstance(value, Mapping):
        return None, value
    text = str(value)
    if text.lower().endswith((".npz", ".safetensors")):
        from .commands.cond_files import read_arrays

        return None, read_arrays(text, what)
    return text, None


def edit_image(model, image: str, *, source: Any, target: Any, solver: str = "ba", nfe: int = 10,
               invert_solver: Optional[str] = None, invert_nfe: Optional[int] = None,
               null_cond: Optional[Mapping] = None, strength: float = 0.8, switch: Optional[float] = None,
               inject: int = 0, inject_weight: float = 1.0, cfg_scale: float = 1.0, cfg_interval: Any = (0.0, 1.0),
               grid: Any = None, codec: Optional[Codec] = None):
    """Read ``image``, invert it under ``source``, regenerate under ``target`` (labels "3" / a condition
    file / a dict): the runtime :class:`~anchorflow.runtime.solving.invert.EditResult`."""
    from .runtime.solving.invert import edit

    x0 = read_image(image, model.meta["state_shape"], model.meta.get("data_range") or (-1.0, 1.0), codec)
    sides = []
    for value, what in ((source, "--source"), (target, "--target")):
        labels, cond = _side(model, value, what)
        sides.append(_condition_args(model, labels, cond, null_cond, len(x0), solver, nfe, grid, cfg_scale,
                                     cfg_interval, names={"labels": what, "cond": what}))
    src, tgt = sides
    return edit(solver, model.velocity, x0, nfe, source=src["cond"], target=tgt["cond"], null_cond=tgt["null_cond"],
                sidenet=tgt["sidenet"], strength=strength, switch=switch, inject=inject, inject_weight=inject_weight,
                cfg_scale=cfg_scale, cfg_interval=tgt["cfg_interval"], invert_method=invert_solver,
                invert_nfe=invert_nfe, grid="uniform" if grid is None else grid)
