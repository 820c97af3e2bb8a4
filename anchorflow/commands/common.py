"""Option parsing shared by the CLI commands."""

from __future__ import annotations

from typing import Optional

import click
import numpy as np

from ..errors import ConfigError

BACKENDS = ["auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch"]


def parse_int_list(text: str, what: str) -> list[int]:
    """'3,4,5' -> [3, 4, 5]; every value must be a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def parse_interval(text: str) -> tuple[float, float]:
    lo, hi = (parse_float_list(text, "--cfg-interval") + [None])[:2]
    if hi is None:
        raise ConfigError(f"--cfg-interval takes two numbers 'lo,hi', got {text!r}")
    return lo, hi


def make_labels(labels: Optional[str], n: int, num_classes: int) -> Optional[np.ndarray]:
    """Labels for n samples: given list (cycled) or 0..C-1 cycled; None for unconditional models."""
    if num_classes <= 0:
        if labels:
            raise ConfigError("this model is unconditional; drop --labels")
        return None
    if labels:
        try:
            values = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(not 0 <= v < num_classes for v in values):
            raise ConfigError(f"--labels must be integers in 0..{num_classes - 1}, got {labels!r}")
    else:
        values = list(range(num_classes))
    return np.resize(np.asarray(values, np.int64), n)


def positive(ctx: click.Context, param: click.Parameter, value):
    """click callback: refuse non-positive counts with a one-line usage error."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value
