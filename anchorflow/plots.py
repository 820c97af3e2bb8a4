"""Figures: a pure-pillow sample grid, and matplotlib line / scatter plots (matplotlib lazily).

:func:`save_grid` needs only numpy and pillow, so a torch-free, matplotlib-free install can
still write sample images. Every writer goes through :mod:`anchorflow.base._io` (atomic replace).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .base._io import atomic_path, check_image_path
from .base.errors import ConfigError

# A small image is upscaled (nearest neighbour) until its longer side is at least this many pixels.
MIN_TILE_PX = 32


def to_uint8(images: np.ndarray, data_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Map float images from ``data_range`` (lo, hi) linearly to 0..255 (clipped); uint8 passes through.

    ``data_range`` None: the state is latents, not an image (bundle.json ``data_range: null``); the
    images' own (min, max) is used so the picture still shows structure."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if data_range is None:
        finite = images[np.isfinite(images)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        data_range = (lo, hi if hi > lo else lo + 1.0)
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise ConfigError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    scaled = (images.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) with C in {1, 3} -> (N, H, W, C); other C: first channel only."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    return images.transpose(0, 2, 3, 1)


def grid_array(images: np.ndarray, nrow: int, pad: int = 1, upscale: Optional[int] = None) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) canvas.

    ``nrow`` images per row; each tile is upscaled by ``upscale`` (nearest neighbour), by
    default the smallest integer factor that makes it at least :data:`MIN_TILE_PX` pixels.
    """
    n, h, w, c = images.shape
    if nrow < 1 or n < 1:
        raise ConfigError(f"a grid needs at least one image and nrow >= 1, got {n} images, nrow={nrow}")
    k = upscale or max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    tiles = images.repeat(k, axis=1).repeat(k, axis=2)
    th, tw = h * k, w * k
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (th + pad) + pad, nrow * (tw + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (th + pad), pad + q * (tw + pad)
        canvas[y0 : y0 + th, x0 : x0 + tw] = tiles[i]
    return canvas


def grid_image(
    images: np.ndarray,
    nrow: int = 8,
    data_range: Sequence[float] = (-1.0, 1.0),
    upscale: Optional[int] = None,
    pad: int = 1,
):
    """A pillow image of the grid of ``images`` (see :func:`save_grid` for the arguments)."""
    from PIL import Image

    canvas = grid_array(_as_nhwc(to_uint8(images, data_range)), int(nrow), pad, upscale)
    return Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)


def save_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    nrow: int = 8,
    data_range: Sequence[float] = (-1.0, 1.0),
    upscale: Optional[int] = None,
    pad: int = 1,
) -> Path:
    """Write images as one grid image with pillow only (no matplotlib), atomically.

    Args:
        images: (N, H, W) or (N, C, H, W) (C = 1 grey, 3 RGB, else the first channel); float
            values in ``data_range`` (mapped to 0..255) or uint8.
        path: the image file to write; its suffix picks the format (.png, .jpg/.jpeg, .webp).
        nrow: images per row.
        data_range: (lo, hi) of float images, e.g. the model's ``meta["data_range"]``.
        upscale: integer nearest-neighbour factor; default: tiles at least 32 px (8x8 -> 32x32).
        pad: black pixels between tiles.
    """
    fmt = check_image_path(path)
    img = grid_image(images, nrow, data_range, upscale, pad)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path


def save_labeled_rows(
    rows: "dict[str, np.ndarray]",
    path: str | os.PathLike,
    data_range: Sequence[float] = (-1.0, 1.0),
    upscale: Optional[int] = None,
    pad: int = 2,
) -> Path:
    """One PNG with a row of images per entry of ``rows``, its label written on the left (pillow only).

    Args:
        rows: label -> images (N, H, W) or (N, C, H, W); every row shows the same N.
        path: the PNG file to write (atomically).
    """
    from PIL import Image, ImageDraw, ImageFont

    strips = [grid_array(_as_nhwc(to_uint8(x, data_range)), len(x), pad, upscale) for x in rows.values()]
    width = max(s.shape[1] for s in strips)
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(k, font=font)) for k in rows)
    height = sum(s.shape[0] for s in strips)
    canvas = Image.new("RGB", (label_w + width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, strip in zip(rows, strips):
        tile = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).convert("RGB")
        canvas.paste(tile, (label_w, y))
        draw.text((4, y + strip.shape[0] // 2 - 6), label, fill=(0, 0, 0), font=font)
        y += strip.shape[0]
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


# -- matplotlib figures (lazy) ----------------------------------------------------------------
def _figure(ncols: int, width: float = 4.5, height: float = 3.6):
    """A matplotlib Figure with ``ncols`` panels, made without pyplot (no global state, Agg)."""
    from anchorflow.base._deps import require

    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# Distinct line colours (tab10 without its grey, then two extra), so a grey baseline stays apart.
LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                "#17becf", "#000000", "#7b4173", "#637939")


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    dashed: Sequence[str] = (),
) -> Path:
    """One panel per outer key (its title), one line per inner key (legend): ``(xs, ys)``.

    Lines named in ``dashed`` are drawn dashed and grey (e.g. a baseline ladder); every other
    line gets its own colour (no grey, no repeats up to 12 lines).
    """
    fig, axes = _figure(max(len(panels), 1))
    for ax, (title, lines) in zip(axes, panels.items()):
        solid = [label for label in lines if label not in dashed]
        for label, (xs, ys) in lines.items():
            if label in dashed:
                style = {"ls": "--", "color": "0.45"}
            else:
                style = {"color": LINE_COLOURS[solid.index(label) % len(LINE_COLOURS)]}
            ax.plot(xs, ys, marker="o", ms=3, label=label, **style)
        if logx:
            ax.set_xscale("log")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save_figure(fig, path)


def plot_points(
    clouds: Mapping[str, np.ndarray], path: str | os.PathLike, labels: Optional[np.ndarray] = None
) -> Path:
    """Scatter panels of 2-D point clouds (N, 2), one per key; colours by ``labels`` (N,) if given."""
    fig, axes = _figure(max(len(clouds), 1), width=3.2, height=3.2)
    for ax, (title, pts) in zip(axes, clouds.items()):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c=labels, cmap="tab10" if labels is not None else None)
        ax.set(title=title, aspect="equal")
    return _save_figure(fig, path)
