"""Has the bundled digits backbone learned? Class-conditional accuracy and FD of its samples.

For each guidance scale s: 100 samples per class from the same noise, Euler with 100 NFE
from t = 1 (noise) to t = 0 (data) through ``anchorflow.runtime.solve`` on the torch backbone
(:class:`TorchVelocity`), classifier-free guidance ``v_u + s (v_c - v_u)`` (Ho & Salimans 2022)
with null label 10. The bundled classifier (classifier.onnx on onnxruntime) labels each
sample; "accuracy" is the fraction labelled as the asked class (goal >= 90 %). FD is the
Frechet distance of its 64-d features to those of the real test digits (real_stats.npz).
Real test digits themselves score the classifier's test accuracy and FD ~ 0 (sanity row).

    python benchmarks/eval_backbone.py [--scales 1,1.5,2,3] [--per-class 100] [--nfe 100] [--write-config]

Writes benchmarks/results/backbone_eval.json, backbone_samples.png (10 x 10 grid, one row per
class, at the smallest scale reaching the goal) and, with --write-config, the figures into the
backbone's config.json under "metrics".
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.metrics import class_accuracy, feature_statistics, frechet_distance

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "anchorflow" / "bundled" / "digits"
RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.90


class Judge:
    """The bundled classifier on onnxruntime: logits and features of (N, 1, 8, 8) digits."""

    def __init__(self, folder: Path) -> None:
        from anchorflow.runtime.evaluation.classifier import Classifier, check_folder

        self.classifier = Classifier(check_folder(folder))
        self.mu, self.sigma = self.classifier.real

    def score(self, x: np.ndarray, labels: np.ndarray) -> dict:
        logits, feats = self.classifier.outputs(np.clip(x, -1, 1))
        mu, sigma = feature_statistics(feats)
        pred = logits.argmax(axis=1)
        per_class = [float(np.mean(pred[labels == c] == c)) for c in range(logits.shape[1])]
        return {"accuracy": class_accuracy(logits, labels), "fd": frechet_distance(mu, sigma, self.mu, self.sigma),
                "worst_class_accuracy": min(per_class), "per_class_accuracy": per_class}


def sample(model, scale: float, per_class: int, nfe: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(10 * per_class, 1, 8, 8) samples, labels 0..9 each ``per_class`` times, the same noise for every scale."""
    from anchorflow.trainers.torch_wrappers import TorchVelocity

    labels = np.repeat(np.arange(model.num_classes), per_class).astype(np.int64)
    noise = np.random.default_rng(seed).standard_normal((labels.size, *model.state_shape)).astype(np.float32)
    out = solve("euler", TorchVelocity(model), noise, nfe, y=labels, cfg_scale=scale, null_label=model.null_label)
    return out.x, labels


def save_grid(x: np.ndarray, labels: np.ndarray, path: Path, per_row: int = 10, zoom: int = 4) -> None:
    """One row per class: the first ``per_row`` samples of each, upscaled ``zoom`` x, with a 2-px gap."""
    from PIL import Image

    classes = int(labels.max()) + 1
    cell = 8 * zoom + 2
    canvas = np.full((classes * cell, per_row * cell), 255, np.uint8)
    for c in range(classes):
        for j, img in enumerate(x[labels == c][:per_row]):
            pix = np.round((1 - np.clip(img[0], -1, 1)) * 127.5).astype(np.uint8)  # dark ink on white
            canvas[c * cell + 1:c * cell + 1 + 8 * zoom, j * cell + 1:j * cell + 1 + 8 * zoom] = np.kron(
                pix, np.ones((zoom, zoom), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    _io.write_bytes(path, buf.getvalue())


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.data import load_dataset

    torch.set_num_threads(args.threads)
    model, cfg = load_checkpoint(args.backbone, kind="backbone")
    judge = Judge(args.classifier)
    x_real, y_real = load_dataset("digits", "test")
    report = {"backbone": str(args.backbone), "weights_sha256": cfg["weights_sha256"],
              "training_step": cfg.get("training", {}).get("step"), "solver": "euler", "nfe": args.nfe,
              "per_class": args.per_class, "seed": args.seed, "goal_accuracy": GOAL,
              "real_test_digits": {k: v for k, v in judge.score(x_real, y_real).items() if k != "per_class_accuracy"},
              "scales": {}}
    samples = {}
    for scale in args.scales:
        start = time.perf_counter()
        x, labels = sample(model, scale, args.per_class, args.nfe, args.seed)
        samples[scale] = x
        report["scales"][str(scale)] = {**judge.score(x, labels), "wall_s": round(time.perf_counter() - start, 1)}
        row = report["scales"][str(scale)]
        print(f"cfg {scale:>4}: accuracy {row['accuracy']:.3f} (worst class {row['worst_class_accuracy']:.2f}), "
              f"FD {row['fd']:.2f}, {row['wall_s']} s", flush=True)
    passing = [s for s in args.scales if report["scales"][str(s)]["accuracy"] >= GOAL]
    report["smallest_scale_reaching_goal"] = min(passing) if passing else None
    grid_scale = min(passing) if passing else max(args.scales, key=lambda s: report["scales"][str(s)]["accuracy"])
    report["grid"] = {"file": "backbone_samples.png", "cfg_scale": grid_scale}
    save_grid(samples[grid_scale], labels, args.out / "backbone_samples.png")
    _io.write_json(args.out / "backbone_eval.json", report)
    if args.write_config:
        _write_metrics(Path(args.backbone), report)
    return report


def _write_metrics(folder: Path, report: dict) -> None:
    """Record the figures in the backbone's config.json (the weights and their hash are untouched)."""
    cfg = _io.read_json(folder / "config.json")
    cfg["metrics"] = {
        "eval": "benchmarks/eval_backbone.py", "solver": report["solver"], "nfe": report["nfe"],
        "samples": 10 * report["per_class"], "classifier": "bundled digits classifier",
        "class_accuracy_by_cfg": {s: r["accuracy"] for s, r in report["scales"].items()},
        "fd_by_cfg": {s: r["fd"] for s, r in report["scales"].items()},
        "smallest_cfg_reaching_90pct": report["smallest_scale_reaching_goal"],
    }
    _io.write_json(folder / "config.json", cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", type=Path, default=BUNDLED / "backbone")
    p.add_argument("--classifier", type=Path, default=BUNDLED / "classifier")
    p.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--nfe", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--write-config", action="store_true", help="also store the figures in the backbone's config.json")
    evaluate(p.parse_args())


if __name__ == "__main__":
    main()
