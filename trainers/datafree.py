"""Data-free SideNet training: the chain's start states come from the backbone itself.

Algorithm 2 of BA-solver (arXiv 2601.21542) starts each chain at ``x_t = (1 - t) x_0 + t noise``
with x_0 from the data set. Without the data set, x_0 is the backbone's own sample: a many-step
solve of ``dx/dt = v(x, t, cond)`` from noise at t = 1 to t = 0 (explicit midpoint, which never
evaluates the network at t = 0 where learned fields are stiffest), one per start state, each for
one row of the user's conditions (``--cond FILE``, cycled so every row is used equally), without
guidance (the SideNet learns the raw field; guidance happens at sampling time, node by node).

The states are generated once and cached (safetensors, written atomically) under a key of the
backbone's weights hash, the conditions' bytes, the count, the step count and the seed, so a
second run (or a resumed one) reuses them. Under torchrun rank 0 generates, the others wait.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from ..base.errors import ConfigError
from .distributed import Dist

SOLVER = "midpoint"
CACHE_ENV = "ANCHORFLOW_CACHE"


def default_cache_dir() -> Path:
    """``$ANCHORFLOW_CACHE/datafree`` or ``~/.cache/anchorflow/datafree``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "anchorflow"
    return Path(root) / "datafree"


def conditions_digest(cond: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a cond dict (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(cond):
        a = cond[name].detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{list(a.shape)}|".encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()


def cache_key(backbone_sha: str, cond: Mapping[str, torch.Tensor], n: int, steps: int, seed: int) -> str:
    spec = {"backbone": backbone_sha, "cond": conditions_digest(cond), "n": n, "steps": steps, "seed": seed,
            "solver": SOLVER}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def row_count(cond: Mapping[str, torch.Tensor]) -> int:
    """Rows of a cond dict (every array's leading axis); refuses ragged or empty dicts."""
    counts = {name: int(a.shape[0]) for name, a in cond.items()}
    if not counts or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ConfigError(f"the conditions must all have the same, non-zero number of rows; got {counts}")
    return next(iter(counts.values()))


@torch.no_grad()
def solve_to_data(velocity: Callable, noise: torch.Tensor, cond: Mapping[str, torch.Tensor],
                  steps: int) -> torch.Tensor:
    """Explicit midpoint on the uniform grid 1 -> 0 with ``steps`` steps (2 calls each).

    velocity(x, t, cond) -> v with x (B, ...), t (B,); returns the state at t = 0.
    """
    x, b = noise, noise.shape[0]
    for i in range(steps):
        t0, h = 1.0 - i / steps, 1.0 / steps
        v0 = velocity(x, torch.full((b,), t0, dtype=x.dtype, device=x.device), cond)
        xm = x - 0.5 * h * v0
        vm = velocity(xm, torch.full((b,), t0 - 0.5 * h, dtype=x.dtype, device=x.device), cond)
        x = x - h * vm
    return x


def start_states(velocity: Callable, state_shape: tuple[int, ...], cond: Mapping[str, torch.Tensor], *, n: int,
                 steps: int, seed: int, backbone_sha: str, cache_dir: Optional[Path] = None, chunk: int = 256,
                 device: str = "cpu", dist: Optional[Dist] = None,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` start states x_0 (n, *state_shape) and the cond row each was made for (n,) int64.

    Row i uses condition row ``i % R`` (R rows in ``cond``). Cached in ``cache_dir`` (default
    :func:`default_cache_dir`); returns (x0, rows, info) with info the provenance recorded in
    the SideNet's config (count, steps, solver, seed, cache key, whether it was a cache hit).
    """
    from safetensors.torch import load, save
    from tqdm.auto import tqdm

    from ..base import _io

    if n <= 0 or steps <= 0:
        raise ConfigError(f"--start-states and --solve-steps must be positive, got {n} and {steps}")
    dist = dist or Dist()
    rows_total = row_count(cond) if cond else 1  # an unconditional backbone: one (empty) row
    key = cache_key(backbone_sha, cond, n, steps, seed)
    path = Path(cache_dir or default_cache_dir()) / f"start_states_{key}.safetensors"
    info = {"source": "data-free", "n": n, "steps": steps, "solver": SOLVER, "calls_per_state": 2 * steps,
            "seed": seed, "cond_rows": rows_total, "cond_sha256": conditions_digest(cond), "cache_key": key,
            "cache_hit": path.is_file()}
    writable = True
    if dist.main and not path.is_file():
        # an unwritable cache is found before minutes of solving, not after them
        from ..base.errors import AnchorflowError, warn

        try:
            _io.check_output(path, "--cache-dir")
        except AnchorflowError as exc:
            writable = False
            warn(f"{exc}; the start states are computed without caching them (pass a writable --cache-dir)")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *state_shape), generator=gen)
        rows = torch.arange(n) % rows_total
        out = []
        for lo in tqdm(range(0, n, chunk), desc=f"data-free start states ({2 * steps} calls each)",
                       disable=not progress, dynamic_ncols=True):
            idx = rows[lo:lo + chunk]
            c = {k: v[idx].to(device) for k, v in cond.items()}
            out.append(solve_to_data(velocity, noise[lo:lo + chunk].to(device), c, steps).cpu())
        x0 = torch.cat(out)
        if not torch.isfinite(x0).all():
            raise ConfigError("the backbone's many-step solve produced non-finite states; check the backbone "
                              "and the conditions (--cond) before training a SideNet on them")
        if not writable and dist.world == 1:
            return x0, rows, {**info, "cache_hit": False, "cached": False}
        _io.write_bytes(path, save({"x0": x0.contiguous(), "rows": rows}))
    dist.barrier()
    try:
        tensors = load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the start-state cache {path} ({exc}); remove it or pass --cache-dir") from None
    return tensors["x0"], tensors["rows"], info


def load_cond_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A cond file (.npz or .safetensors): one array per condition name, rows on the leading axis."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"condition file {path} not found; give an .npz or .safetensors file with one array "
                          "per condition name (rows first)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    except Exception as exc:  # numpy / safetensors raise many types for a bad file
        raise ConfigError(f"cannot read condition file {path}: {exc}") from None
