"""Scoring samples: against the reference (PSNR, RMSE) and against the data (FD, accuracy, SWD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..runtime.evaluation import metrics as M
from ..runtime.evaluation.classifier import Classifier, check_folder


def data_range(model, ref: Optional[np.ndarray] = None) -> Optional[tuple[float, float]]:
    """The data's own (lo, hi) from the model's meta (default (-1, 1)); PSNR's peak is hi - lo.

    ``data_range: null`` in bundle.json means the state is latents, not an image: then the
    reference samples' own (min, max) when ``ref`` is given, else None (scored per reference)."""
    dr = model.meta.get("data_range", (-1.0, 1.0))
    if dr is None:
        return None if ref is None else span_of(ref)
    lo, hi = dr
    return float(lo), float(hi)


def span_of(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of an array of latents (a unit span when it is constant)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return lo, hi if hi > lo else lo + 1.0


def classifier_dir(model) -> Optional[Path]:
    """The model's classifier folder (classifier.onnx + real_stats.npz), or None when it has none."""
    folder = getattr(model, "classifier", None) or model.meta.get("classifier")
    return None if folder is None else check_folder(folder)


class Evaluator:
    """Scores samples (n, *state_shape) against the reference and, where possible, the data.

    ``classifier``: a folder with ``classifier.onnx`` (input x -> outputs logits, features) and
    ``real_stats.npz`` (mu, sigma) of real-data features; ``held_out``: data samples for the
    sliced Wasserstein distance. Set ``ref`` (float64 reference samples) before scoring.
    """

    def __init__(self, data_range, labels, classifier: Optional[Path] = None, held_out: Optional[np.ndarray] = None):
        self.data_range, self.labels, self.held_out = data_range, labels, held_out
        self.classifier = Classifier(check_folder(classifier)) if classifier is not None else None
        self.ref: Optional[np.ndarray] = None

    def distribution(self, x: np.ndarray) -> dict[str, Any]:
        """FD / accuracy (classifier) and SWD (held-out data) of samples x; empty where unavailable."""
        out: dict[str, Any] = {}
        if self.classifier is not None:
            logits, feats = self.classifier.outputs(x)
            if x.shape[0] >= 2:
                out["fd"] = M.frechet_distance(*M.feature_statistics(feats), *self.classifier.real)
            if self.labels is not None:
                out["accuracy"] = M.class_accuracy(logits, self.labels)
        if self.held_out is not None:
            flat = x.reshape(x.shape[0], -1)
            out["swd"] = M.sliced_wasserstein(flat, self.held_out.reshape(self.held_out.shape[0], -1), 256, 0)
        return out

    def __call__(self, x: np.ndarray) -> dict[str, Any]:
        peak = self.data_range if self.data_range is not None else span_of(self.ref)  # latents: the reference's span
        return {"psnr": M.psnr(x, self.ref, peak), "rmse": M.rmse(x, self.ref), **self.distribution(x)}
