"""Bundled data sets: shapes, ranges, deterministic stratified splits, refusals."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers.data import (  # noqa: E402
    DATASETS, GAUSSIANS8_RADIUS, GAUSSIANS8_STD, load_dataset, sample_gaussians8,
)


@pytest.mark.parametrize("split,n", [("train", 1437), ("test", 360), ("all", 1797)])
def test_digits_shapes_and_range(split: str, n: int) -> None:
    x, y = load_dataset("digits", split)
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_digits_values_are_sklearn_pixels_mapped_to_unit_range() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = load_dataset("digits", "all")
    # 0 -> -1, 8 -> 0, 16 -> 1: an exact affine map of the integer pixel values.
    np.testing.assert_array_equal(x[:, 0], bunch.images.astype(np.float32) / 8 - 1)
    np.testing.assert_array_equal(y, bunch.target)


def test_digits_split_is_stratified_deterministic_and_seeded() -> None:
    _, y_all = load_dataset("digits", "all")
    x_tr, y_tr = load_dataset("digits", "train")
    x_te, y_te = load_dataset("digits", "test")
    # 80/20 per class (stratified): each class's test share is within one sample of 20 %.
    for c in range(10):
        total = int((y_all == c).sum())
        assert abs(int((y_te == c).sum()) - 0.2 * total) <= 1
    # Train and test together are exactly the full set (multiset of rows).
    both = np.concatenate([x_tr, x_te]).reshape(1797, -1)
    full = load_dataset("digits", "all")[0].reshape(1797, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, full))
    np.testing.assert_array_equal(load_dataset("digits", "test")[0], x_te)
    assert not np.array_equal(load_dataset("digits", "test", seed=1)[0], x_te)


def test_gaussians8_points_sit_on_their_circle_centres() -> None:
    x, y = sample_gaussians8(4000, seed=3)
    assert x.shape == (4000, 2) and x.dtype == np.float32 and y.dtype == np.int64
    angle = 2 * np.pi * y / 8
    centre = GAUSSIANS8_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    resid = x - centre
    # Residuals are N(0, std^2 I): sample std within 5 % (4000 samples: rel. s.e. ~1.1 %).
    assert np.std(resid) == pytest.approx(GAUSSIANS8_STD, rel=0.05)
    assert np.abs(resid).max() < 6 * GAUSSIANS8_STD
    assert np.bincount(y, minlength=8).min() > 400  # 500 expected per class


def test_gaussians8_splits_differ_and_have_fixed_sizes() -> None:
    x_tr, _ = load_dataset("gaussians8", "train")
    x_te, _ = load_dataset("gaussians8", "test")
    assert x_tr.shape == (8000, 2) and x_te.shape == (2000, 2)
    assert not np.array_equal(x_tr[:2000], x_te)
    assert load_dataset("gaussians8", "all")[0].shape == (10000, 2)


def test_registry_metadata() -> None:
    assert DATASETS["digits"].meta() == {"name": "digits", "state_shape": [1, 8, 8], "num_classes": 10,
                                         "data_range": [-1.0, 1.0]}
    assert DATASETS["gaussians8"].state_shape == (2,) and DATASETS["gaussians8"].num_classes == 8


@pytest.mark.parametrize("name", ["mnist", "CIFAR10", "imagenet", "celeba"])
def test_download_only_sets_are_refused_with_the_alternatives(name: str) -> None:
    with pytest.raises(ConfigError, match="needs a download") as info:
        load_dataset(name)
    assert "digits" in str(info.value) and "gaussians8" in str(info.value)


def test_unknown_names_and_splits_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'nope'; known data sets: digits, gaussians8"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError, match="positive"):
        sample_gaussians8(0)
