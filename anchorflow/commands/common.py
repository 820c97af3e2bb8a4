"""Option parsing and checks shared by the CLI commands.

Every check here runs before any work and raises :class:`ConfigError` (exit status 1): a value
of the right type but outside its range is something the user can fix, not a malformed command
line (exit 2 is click's, for what cannot be parsed; see docs/architecture.md).
"""

from __future__ import annotations

from typing import Optional

import click
import numpy as np

from ..base.errors import ConfigError
from ..runtime import plan as _plan
from ..runtime.bundles.load import BACKENDS as _BACKENDS, PRECISIONS as _PRECISIONS

BACKENDS = list(_BACKENDS)  # the runtime's registry (runtime/bundles/load.py), for click.Choice
PRECISIONS = list(_PRECISIONS)  # the precisions a bundle may hold (runtime/bundles/format.py)
# The caps live with the rules, in the sampling plan (runtime/plan.py): the CLI and the service share them.
MAX_NFE, MAX_N, MAX_SEED = _plan.MAX_NFE, _plan.MAX_N, _plan.MAX_SEED
# Steps of an RK4 reference (4 calls each): rk4:512 is the default, 4096 already costs 16384 calls.
MAX_REFERENCE_STEPS = 4096
# How the CLI names each argument of runtime.plan.plan in its messages.
CLI_NAMES = {"solver": "--solver", "nfe": "--nfe", "grid": "--grid", "first_call": "--first-call", "cfg_scale": "--cfg",
             "cfg_interval": "--cfg-interval", "labels": "--labels", "cond": "--cond", "null_cond": "--null-cond",
             "n": "--n", "seed": "--seed", "noise": "--noise", "bandit_state": "--bandit-state", "calls": "--calls",
             "speedup": "--speedup", "mu_factor": "--mu-factor"}


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


def parse_interval(text: str, what: str = "--cfg-interval") -> tuple[float, float]:
    """'lo,hi' with 0 <= lo < hi <= 1: guidance applies for t in (lo, hi] (the plan's rule)."""
    return _plan.check_interval(text, what)


def check_cfg(scales: list[float], what: str = "--cfg") -> list[float]:
    """Guidance scales: finite, > 0 and capped (1.0 means no guidance); the plan's rule."""
    return [_plan.check_cfg_scale(s, what) for s in scales]


def check_nfe(values: list[int], what: str = "--nfe") -> list[int]:
    big = [v for v in values if v > MAX_NFE]
    if big:
        raise ConfigError(f"{what} {big[0]} is above the cap of {MAX_NFE} backbone calls; ask for fewer")
    return values


def make_labels(labels: Optional[str], n: int, num_classes: int) -> Optional[np.ndarray]:
    """Labels for n samples: given list (cycled) or 0..C-1 cycled; None for unconditional models."""
    return _plan.label_rows(_plan.parse_labels(labels or None, "--labels"), n, num_classes, CLI_NAMES)


def _name(param: click.Parameter) -> str:
    return max(param.opts, key=len) if param.opts else param.name


def positive(ctx: click.Context, param: click.Parameter, value):
    """click callback: refuse a non-positive number (exit status 1, one line)."""
    if value is not None and not value > 0:
        kind = "a positive integer" if isinstance(value, int) else "positive"
        raise ConfigError(f"{_name(param)} must be {kind}, got {value}")
    return value


MAX_BATCH = 65536  # a training batch beyond this is a typo, not a batch (it used to try 8 TB)


def count(limit: int):
    """click callback factory: a positive integer no larger than ``limit``."""

    def check(ctx: click.Context, param: click.Parameter, value):
        positive(ctx, param, value)
        if value is not None and value > limit:
            raise ConfigError(f"{_name(param)} {value} is above the cap of {limit}; ask for fewer")
        return value

    return check


def non_negative(ctx: click.Context, param: click.Parameter, value):
    """click callback: refuse a negative (or NaN) number."""
    if value is not None and not value >= 0:
        raise ConfigError(f"{_name(param)} must be >= 0, got {value}")
    return value


def seed(ctx: click.Context, param: click.Parameter, value):
    """click callback: a seed in 0 .. 2^32 - 1."""
    if value is not None:
        _plan.check_int(value, _name(param), 0, MAX_SEED)
    return value


def cfg_scale(ctx: click.Context, param: click.Parameter, value):
    """click callback: one guidance scale, finite and > 0."""
    if value is not None:
        _plan.check_cfg_scale(value, _name(param))
    return value


def thread_options(fn):
    """``--threads N`` and ``--thread-mode auto|shared|session`` (onnxruntime CPU threads; see
    :mod:`anchorflow.runtime.bundles.threads` and the README's thread table)."""
    fn = click.option("--thread-mode", type=click.Choice(["auto", "shared", "session"]), default="auto",
                      show_default=True,
                      help="onnxruntime CPU threads: a non-spinning pool per session (auto: one thread per CPU on a "
                           "quiet machine, 1 thread when the load average is at least the CPU count), or one "
                           "process-wide pool shared by the backbone and SideNet sessions (shared: fastest on a "
                           "quiet machine, opt-in because other onnxruntime sessions in the process must then "
                           "join it).")(fn)
    return click.option("--threads", type=int, default=None, callback=positive,
                        help="onnxruntime CPU threads (shared pool size, or threads per session).")(fn)


def apply_threads(threads: Optional[int], mode: str) -> None:
    """Fix this process's onnxruntime thread policy before any session is made."""
    from ..runtime.bundles.threads import configure

    configure(threads, mode)


def check_sample_outputs(out: str, npy: Optional[str], extra: tuple[str, ...] = ()) -> str:
    """Before any work: the grid image (format by suffix), the .npy and ``extra`` files can be written.

    Returns the pillow format of ``out``.
    """
    from ..base._io import check_image_path, check_output

    fmt = check_image_path(check_output(out, "--out"))
    seen = {_same(out): "--out"}
    for path, what in ((npy, "--npy"), *((p, "output") for p in extra)):
        if path is not None:
            check_output(path, what)
            if _same(path) in seen:
                raise ConfigError(f"{what} {path} names the same file as {seen[_same(path)]}; give each output its "
                                  "own file")
            seen[_same(path)] = what
    return fmt


def _same(path: str) -> str:
    """A path's identity for "the same file" checks (symlinks and relative parts resolved)."""
    import os

    return os.path.realpath(os.path.expanduser(str(path)))


def write_samples(x: np.ndarray, out: str, npy: Optional[str], data_range: tuple[float, float]) -> None:
    """The sample grid image and (optionally) the raw samples, all-or-nothing (both or neither)."""
    from ..base import _io
    from ..base.errors import NonFiniteError
    from ..plots import grid_image

    if not np.isfinite(x).all():
        raise NonFiniteError(f"the samples hold NaN or Inf values ({int((~np.isfinite(x)).sum())} of {x.size}); "
                             f"nothing was written to {out}")
    fmt = _io.check_image_path(out)
    img = grid_image(x, nrow=min(len(x), 10), data_range=data_range)
    with _io.atomic_paths([out] + ([npy] if npy else [])) as tmps:
        img.save(tmps[0], format=fmt)
        if npy:
            with open(tmps[1], "wb") as fh:
                np.save(fh, x)


def rows_default(value: int, option: str, m, cond, high: int = MAX_N) -> int:
    """``value``, or the rows of ``cond`` on the opened model ``m`` when the click option ``option`` was
    not given (:func:`anchorflow.runtime.plan.cond_rows`, the rule ``sample`` follows), checked in 1..high."""
    if click.get_current_context().get_parameter_source(option).name != "DEFAULT":
        return value
    rows = _plan.cond_rows(m, cond)
    return value if rows is None else _plan.check_int(rows, "the rows of --cond", 1, high)
