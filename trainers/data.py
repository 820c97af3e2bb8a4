"""Training data sets that need no download: scikit-learn's digits and a 2-D toy.

``load_dataset(name, split, seed) -> (x, y)``: x float32, (N, C, H, W) for images or (N, 2) for
the toy; y int64 (N,) class labels 0..C-1. Data live in ``data_range`` (digits: [-1, 1]).
In the flow-matching convention these are the t = 0 end of the path (t = 1 is noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..base._deps import require
from ..base.errors import ConfigError

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
# Well-known sets that need a download; anchorflow never downloads anything.
DOWNLOAD_ONLY = ("mnist", "fashion-mnist", "fashion_mnist", "cifar10", "cifar-10", "cifar100", "imagenet",
                 "celeba", "lsun", "ffhq", "svhn", "afhq")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a data set needs to know: state shape, classes, value range."""

    name: str
    state_shape: tuple[int, ...]
    num_classes: int
    data_range: tuple[float, float]
    description: str
    loader: Callable[[str, int], tuple[np.ndarray, np.ndarray]]

    def meta(self) -> dict:
        """JSON-ready metadata (recorded in checkpoint configs)."""
        return {"name": self.name, "state_shape": list(self.state_shape), "num_classes": self.num_classes,
                "data_range": list(self.data_range)}


def _split_indices(y: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Deterministic stratified 80/20 split: indices of ``split`` ('all' = every index)."""
    if split == "all":
        return np.arange(len(y))
    ms = require("sklearn.model_selection", extra="train", purpose="the bundled digits data set")
    train, test = ms.train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return np.sort(train if split == "train" else test)


def _load_digits(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits (values 0..16) mapped to [-1, 1], shape (N, 1, 8, 8)."""
    ds = require("sklearn.datasets", extra="train", purpose="the bundled digits data set")
    bunch = ds.load_digits()
    x = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx = _split_indices(y, split, seed)
    return np.ascontiguousarray(x[idx]), y[idx]


GAUSSIANS8_RADIUS = 2.0
GAUSSIANS8_STD = 0.15
GAUSSIANS8_SIZES = {"train": 8000, "test": 2000}


def sample_gaussians8(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points from 8 isotropic Gaussians (std 0.15) centred on a circle of radius 2.

    Returns x (n, 2) float32 and y (n,) int64, the index of the Gaussian (angle 2 pi k / 8).
    """
    if n <= 0:
        raise ConfigError(f"number of samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, size=n).astype(np.int64)
    angle = 2 * np.pi * y / 8
    centres = GAUSSIANS8_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = centres + GAUSSIANS8_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32), y


def _load_gaussians8(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-size draws; train and test use different streams of the same seed."""
    if split == "all":
        parts = [_load_gaussians8(s, seed) for s in ("train", "test")]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    stream = 0 if split == "train" else 1
    return sample_gaussians8(GAUSSIANS8_SIZES[split], seed=2 * seed + stream)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (-1.0, 1.0),
                          "scikit-learn's bundled 8x8 handwritten digits, scaled to [-1, 1]", _load_digits),
    "gaussians8": DatasetInfo("gaussians8", (2,), 8, (-3.0, 3.0),
                              "2-D toy: 8 Gaussians on a circle of radius 2, label = which Gaussian",
                              _load_gaussians8),
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; refuses download-only and unknown names with ConfigError."""
    key = name.strip().lower()
    if key in DATASETS:
        return DATASETS[key]
    known = ", ".join(DATASETS)
    if key in DOWNLOAD_ONLY:
        raise ConfigError(f"data set {name!r} needs a download, which anchorflow does not do; "
                          f"use one of the bundled data sets: {known}")
    raise ConfigError(f"unknown data set {name!r}; known data sets: {known}")


def load_dataset(name: str, split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load a bundled data set: x float32 (N, *state_shape), y int64 (N,).

    ``split`` is "train", "test" or "all"; the split is deterministic for a given ``seed``
    (digits: stratified 80/20).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return info.loader(split, int(seed))
