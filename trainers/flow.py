"""Flow matching on the linear path (Lipman et al. 2023; Liu et al., rectified flow, 2023).

Time convention: t = 1 noise, t = 0 data. ``x_t = (1 - t) x + t eps`` with eps ~ N(0, I), so
the regression target is ``dx_t/dt = eps - x``; sampling integrates from t = 1 down to t = 0.
Also: label dropout for classifier-free guidance (Ho & Salimans 2022), EMA weights, the
learning-rate schedule, and (de)serialising the optimizer state without pickles.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .distributed import Dist

SINGLE = Dist()  # a single-process run on the CPU


def drop_labels(y: torch.Tensor, null_label: int, p: float, gen: torch.Generator,
                dist: Optional[Dist] = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability p (classifier-free guidance training).

    y (b,) holds this rank's rows; the draw covers the global batch (see :mod:`.distributed`).
    """
    if p <= 0:
        return y
    drop = (dist or SINGLE).draw(torch.rand, gen, y.shape[0]).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def flow_matching_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                       label_dropout: float = 0.1, dist: Optional[Dist] = None,
                       null_label: Optional[int] = None) -> torch.Tensor:
    """Mean squared error between ``model(x_t, t, y)`` and ``eps - x``, t ~ U(0, 1).

    x: (b, *state_shape) data (t = 0 end), y: (b,) int64 labels, this rank's rows of the global
    batch (``dist``; the whole batch in a single process); labels are replaced by the null label
    (``null_label``, default ``model.null_label``) with probability ``label_dropout``.
    """
    dist = dist or SINGLE
    b = x.shape[0]
    t = dist.draw(torch.rand, gen, b).to(x.device)
    eps = dist.draw(torch.randn, gen, b, *x.shape[1:]).to(x.device)
    tb = t.view(b, *([1] * (x.dim() - 1)))
    x_t = (1 - tb) * x + tb * eps
    y = drop_labels(y, model.null_label if null_label is None else null_label, label_dropout, gen, dist)
    return torch.mean((model(x_t, t, y) - (eps - x)) ** 2)


class EMA:
    """Exponential moving average of a module's parameters and buffers (the weights that get saved).

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                target.copy_(value)
        self.updates += 1


def lr_at(step: int, base_lr: float, total: int, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10 % of ``base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (for safetensors) and JSON-ready rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def check_settings(s, positive: tuple[str, ...]) -> None:
    """Refuse non-positive counts (named as their CLI options), and dropout / EMA decay outside [0, 1)."""
    from ..base.errors import ConfigError

    for key in positive:
        if getattr(s, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(s, key)}")
    if not 0 <= s.label_dropout < 1 or not 0 <= s.ema_decay < 1:
        raise ConfigError("label dropout and EMA decay must lie in [0, 1)")


def finite_loss(loss: float, step: int, out: Path, saved_step: int) -> float:
    """``loss`` if finite; else stop the run (NonFiniteError) before anything computed from it is saved.

    ``step``: the 1-based step that produced it; ``saved_step``: the step of the last checkpoint
    in ``out`` (0: none), which stays as it was.
    """
    if math.isfinite(loss):
        return loss
    from ..base.errors import NonFiniteError

    kept = f"{out} keeps its last good checkpoint (step {saved_step})" if saved_step else "nothing was written"
    raise NonFiniteError(f"the training loss is {loss} at step {step}; stopped, {kept}. Check the data, lower --lr, "
                         "or check the backbone for NaN/Inf weights")


STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


class ResumableRun:
    """Shared resume state of a training run (no pickles).

    Subclasses set ``kind`` (the checkpoint kind) and create ``model``, ``ema``, ``opt`` and
    ``gen`` in ``__init__``, then call :meth:`_reset_counters`. ``state_bytes`` gives the two
    files saved beside the checkpoint (``train_state.safetensors``: raw weights, optimizer
    tensors, RNG state; ``train_state.json``: step, optimizer hyper-parameters, wall time);
    ``restore`` reads them back so a resumed run continues bit for bit.
    """

    kind: str = ""

    def _reset_counters(self) -> None:
        self.step, self.wall_s, self.loss_log = 0, 0.0, []

    def state_bytes(self) -> tuple[bytes, bytes]:
        from safetensors.torch import save

        tensors, opt_meta = optimizer_tensors(self.opt)
        tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()})
        tensors["rng"] = self.gen.get_state()
        meta = {"step": self.step, "wall_s": self.wall_s, "ema_updates": self.ema.updates,
                "loss_log": self.loss_log, "optimizer": opt_meta}
        return save(tensors), (json.dumps(meta) + "\n").encode()

    def restore(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from ..base._io import read_json
        from .checkpoint import load_checkpoint

        tensors = load_file(str(folder / STATE_TENSORS))
        meta = read_json(folder / STATE_JSON)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.module, _ = load_checkpoint(folder, kind=self.kind)
        self.ema.module.to(next(self.model.parameters()).device).requires_grad_(False)
        self.ema.updates = int(meta["ema_updates"])
        load_optimizer_tensors(self.opt, tensors, meta["optimizer"])
        self.gen.set_state(tensors["rng"])
        self.step, self.wall_s, self.loss_log = int(meta["step"]), float(meta["wall_s"]), meta["loss_log"]
