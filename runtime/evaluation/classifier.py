"""A model's evaluation classifier on onnxruntime (torch-free): the one place that opens it.

A classifier folder holds ``classifier.onnx`` (input ``x`` (N, *state) float32 -> outputs
``logits`` (N, classes) and ``features`` (N, F)) and, for the Frechet distance, ``real_stats.npz``
(``mu`` (F,), ``sigma`` (F, F) of real-data features); ``anchorflow train classifier`` writes it.
Used by the demo (labels), the benchmark harness (FD, accuracy) and the benchmark scripts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ...base.errors import ConfigError

ONNX_FILE = "classifier.onnx"
STATS_FILE = "real_stats.npz"


def check_folder(folder: str | os.PathLike, need_stats: bool = True) -> Path:
    """``folder``, refused (ConfigError) when it lacks the classifier or (``need_stats``) its statistics."""
    folder = Path(folder)
    missing = [f for f in (ONNX_FILE, STATS_FILE)[: 2 if need_stats else 1] if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"classifier folder {folder} lacks {', '.join(missing)}; retrain it with "
                          "'anchorflow train classifier'")
    return folder


class Classifier:
    """``classifier.onnx`` in one onnxruntime CPU session; ``real`` = (mu, sigma) when the folder has them."""

    def __init__(self, folder: str | os.PathLike, threads: Optional[int] = None) -> None:
        from ..bundles.backends import make_session

        folder = check_folder(folder, need_stats=False)
        self.session = make_session(folder / ONNX_FILE, "ort-cpu", threads=threads)
        self.real: Optional[tuple[np.ndarray, np.ndarray]] = None
        if (folder / STATS_FILE).is_file():
            with np.load(folder / STATS_FILE) as stats:
                self.real = (stats["mu"], stats["sigma"])

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, classes), features (N, F)) of samples x (N, *state)."""
        logits, feats = self.session.run(["logits", "features"], {"x": np.asarray(x, np.float32)})
        return logits, feats

    def labels(self, x: np.ndarray) -> np.ndarray:
        """(N,) predicted labels."""
        return self.outputs(x)[0].argmax(axis=1)
