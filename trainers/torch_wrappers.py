"""numpy-in / numpy-out wrappers so ``anchorflow.runtime.solve`` can drive torch modules.

They match the runtime's callables (:mod:`anchorflow.runtime.field`): ``velocity(x, t, cond) -> v``
and ``sidenet(x, v, t, h, cond) -> delta``, float32 numpy arrays, per-sample t (B,) with t = 1
noise and t = 0 data, cond None or a dict with the labels ``y`` int64 (B,). They run on the CPU
under ``torch.no_grad``. :func:`bundle_runs` is the runtime's ``torch`` backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn


def _t(a: Optional[np.ndarray], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _labels(module: nn.Module, cond: Optional[dict], batch: int) -> Optional[torch.Tensor]:
    """Labels ``cond["y"]`` as int64; without them the module's null label on every row."""
    y = None if cond is None else cond.get("y")
    null = getattr(module, "null_label", None)
    if y is None and null is not None:
        return torch.full((batch,), int(null), dtype=torch.int64)
    return _t(y, torch.int64)


class _Wrapper:
    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().to("cpu")


class TorchVelocity(_Wrapper):
    """``velocity(x, t, cond) -> v`` for a torch backbone ``module(x, t, y)``; x (B, ...), t (B,)."""

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        xt = _t(x, torch.float32)
        v = self.module(xt, _t(t, torch.float32), _labels(self.module, cond, xt.shape[0]))
        return v.numpy().astype(np.float32, copy=False)


class TorchSideNet(_Wrapper):
    """``sidenet(x, v, t, h, cond) -> delta`` for a torch SideNet ``module(x, v, t, h, *conds)``, fed
    the conditions it declares (``module.cond_inputs``; the labels ``y`` when it declares none).
    A shared-body SideNet (polynomial offset form) takes h (K, B) and returns (K, B, *state)."""

    @property
    def shared_body(self) -> bool:
        return bool(getattr(self.module, "shared_body", False))

    @torch.no_grad()
    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray,
                 cond: Optional[dict]) -> np.ndarray:
        xt = _t(x, torch.float32)
        names = tuple(getattr(self.module, "cond_inputs", ("y",)))
        conds = [_labels(self.module, cond, xt.shape[0]) if n == "y" else torch.from_numpy(np.ascontiguousarray(cond[n]))
                 for n in names]
        d = self.module(xt, _t(v, torch.float32), _t(t, torch.float32), _t(h, torch.float32), *conds)
        return d.numpy().astype(np.float32, copy=False)


def module_run(module: nn.Module, names: list) -> Callable[[dict], np.ndarray]:
    """``run(feeds) -> output``: the module called on the feeds in declared input order (CPU, fp32)."""
    module = module.eval().to("cpu")

    @torch.no_grad()
    def run(feeds: dict) -> np.ndarray:
        out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
        return out.float().numpy()

    return run


def bundle_runs(bundle: Any, precision: str = "fp32") -> tuple[dict, list[str]]:
    """The runtime's ``torch`` backend: the checkpoints bundle.json records (paths relative to the
    bundle), each checked against its recorded weights sha256, as ``run(feeds)`` per network; a
    backbone exported from a diffusers folder or a factory is its source's adapter, loaded again."""
    from ..errors import CheckpointError, ConfigError
    from .checkpoint import load_checkpoint

    if precision != "fp32":
        raise ConfigError("the torch backend runs the checkpoints in fp32 only")
    runs = {}
    for name, decl in bundle.networks.items():
        source = bundle.meta["networks"][name].get("source") or {}
        if not bundle.meta["networks"][name].get("checkpoint") and source.get("path"):
            runs[name] = _source_run(source, decl)
            continue
        record = bundle.meta["networks"][name].get("checkpoint") or {}
        path = (bundle.folder / str(record.get("path"))).resolve()
        if not record.get("path") or not path.is_dir():
            raise CheckpointError(f"the {name} checkpoint recorded in bundle.json ({record.get('path')}) is not there")
        module, cfg = load_checkpoint(path)
        if cfg.get("weights_sha256") != record.get("weights_sha256"):
            raise CheckpointError(f"the {name} checkpoint at {path} changed since the export (weights sha256 differs)")
        runs[name] = module_run(module, [i.name for i in decl.inputs])
    return runs, ["torch-cpu"]


def _source_run(source: dict, decl: Any) -> Callable[[dict], np.ndarray]:
    """``run(feeds)`` of the adapter an exported backbone came from (``source.path``: a diffusers
    folder or ``pkg.module:factory``), in our time like the graph."""
    from ..errors import CheckpointError
    from .adapters import load_source

    path = str(source["path"])
    if ":" not in path and not Path(path).is_dir():
        raise CheckpointError(f"the source {path} recorded in bundle.json is not there")
    adapter = load_source(path).eval()
    roles = {i.role: i.name for i in decl.inputs}
    names = [i.name for i in decl.conditions]
    return lambda feeds: adapter.call_numpy(feeds[roles["state"]], feeds[roles["time"]], {n: feeds[n] for n in names})
