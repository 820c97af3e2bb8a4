"""The digits evaluation classifier: class accuracy of samples and Frechet-distance features.

A small CNN on (B, 1, 8, 8) digits in [-1, 1]: ``forward(x) -> logits`` (B, 10) and
``features(x) -> (B, 64)`` (the penultimate layer), used like Inception features in FID
(Heusel et al., "GANs trained by a two time-scale update rule", 2017) but for 8x8 digits.

:func:`train_classifier` writes a checkpoint (kind "classifier"), ``classifier.onnx``
(input ``x`` -> outputs ``logits``, ``features``; dynamic batch, checked against torch with
onnxruntime) and ``real_stats.npz`` (``mu``, ``sigma``, ``n`` of the real TEST digits' features).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base._deps import require
from ..base.errors import ConfigError
from .checkpoint import register_builder, save_checkpoint
from .data import dataset_info, load_dataset

ONNX_NAME = "classifier.onnx"
STATS_NAME = "real_stats.npz"
ONNX_TOL = 1e-4  # float32 torch vs onnxruntime on a net this small differs by ~1e-6; 1e-4 leaves margin


class DigitsCNN(nn.Module):
    """conv32-conv64-pool-conv64-pool -> 256 -> 64 features -> logits; input (B, C, 8, 8)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 64, size: int = 8) -> None:
        super().__init__()
        if size % 4 or min(in_channels, num_classes, feature_dim) <= 0:
            raise ConfigError(f"DigitsCNN needs a positive size divisible by 4 and positive widths, got size {size}")
        self.num_classes = int(num_classes)
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, feature_dim) penultimate activations."""
        return self.fc(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


class _LogitsAndFeatures(nn.Module):
    """Export wrapper: x -> (logits, features) in one graph."""

    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(x)
        return self.net.head(f), f


@register_builder("classifier")
def build_classifier(arch: dict) -> nn.Module:
    """Build from a config ``arch`` dict (``{"type": "cnn", ...constructor args}``)."""
    arch = dict(arch)
    if arch.pop("type", "cnn") != "cnn":
        raise ConfigError("unknown classifier type; known: cnn")
    return DigitsCNN(**arch)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: translate each image by up to 1 pixel (padding with the background value -1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + h, dx:dx + w]


def fit(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool = True) -> None:
    """Adam with a cosine schedule, batch 64, pixel-shift augmentation."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    net.train()
    for _ in tqdm(range(epochs), desc="train classifier", disable=not progress):
        for idx in torch.randperm(x.shape[0], generator=gen).split(64):
            loss = F.cross_entropy(net(_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    return float((net.eval()(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def feature_stats(net: DigitsCNN, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) (float64, ddof 1) of the features of x."""
    f = net.eval().features(x).double().numpy()
    return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False), "n": np.array(f.shape[0])}


def export_onnx(net: DigitsCNN, sample: torch.Tensor, opset: int = 18) -> bytes:
    """ONNX bytes of x -> (logits, features) with a dynamic batch axis, checked against torch.

    Uses the same exporter as the bundles (``torch.onnx.export(dynamo=True)``).
    """
    import contextlib
    import logging
    import warnings

    ort = require("onnxruntime")
    wrapper = _LogitsAndFeatures(net).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(wrapper, (sample,), None, input_names=["x"],
                                        output_names=["logits", "features"],
                                        dynamo=True, dynamic_shapes={"x": {0: batch}}, opset_version=opset,
                                        external_data=False, verbose=False)
        finally:
            logger.setLevel(level)
    data = program.model_proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits, feats = sess.run(None, {"x": sample.numpy()})
    with torch.no_grad():
        ref_logits, ref_feats = wrapper(sample)
    err = max(np.abs(logits - ref_logits.numpy()).max(), np.abs(feats - ref_feats.numpy()).max())
    if not err <= ONNX_TOL:
        raise RuntimeError(f"classifier ONNX export differs from torch by {err:.2e} (> {ONNX_TOL})")
    return data


def _stats_bytes(stats: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **stats)
    return buf.getvalue()


def train_classifier(out: str | Path, epochs: int = 40, seed: int = 0, data: str = "digits",
                     command: Optional[str] = None, progress: bool = True) -> dict:
    """Train the CNN on the train split of ``data``, report held-out test accuracy, write ``out``.

    Returns the saved config (``metrics.test_accuracy``, ``metrics.train_accuracy``).
    """
    info = dataset_info(data)
    if len(info.state_shape) != 3:
        raise ConfigError(f"the evaluation classifier needs an image data set, {data!r} has state {info.state_shape}")
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}")
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_tr, y_tr = (torch.from_numpy(a) for a in load_dataset(data, "train"))
    x_te, y_te = (torch.from_numpy(a) for a in load_dataset(data, "test"))
    c, h, _ = info.state_shape
    arch = {"type": "cnn", "in_channels": c, "num_classes": info.num_classes, "feature_dim": 64, "size": h}
    net = build_classifier(arch)
    fit(net, x_tr, y_tr, epochs, seed, progress)
    metrics = {"test_accuracy": accuracy(net, x_te, y_te), "train_accuracy": accuracy(net, x_tr, y_tr),
               "n_test": int(x_te.shape[0]), "onnx_max_abs_err_tol": ONNX_TOL}
    cfg = {"kind": "classifier", "arch": arch, "data": info.meta(), "metrics": metrics,
           "training": {"command": command, "epochs": epochs, "seed": seed,
                        "wall_s": round(time.perf_counter() - start, 1)},
           "real_stats": {"split": "test", "file": STATS_NAME}}
    extra = {ONNX_NAME: export_onnx(net, x_te[:7]), STATS_NAME: _stats_bytes(feature_stats(net, x_te))}
    save_checkpoint(out, net, cfg, extra_files=extra)
    return cfg
