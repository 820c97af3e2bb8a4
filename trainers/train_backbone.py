"""Train a backbone by flow matching (see :mod:`anchorflow.trainers.flow`); resumable, no pickles.

The output folder is a checkpoint (``config.json`` + ``model.safetensors`` with the EMA weights)
plus the resume state: ``train_state.safetensors`` (raw weights, optimizer tensors, RNG state)
and ``train_state.json`` (step, optimizer hyper-parameters, wall time). Every write is atomic.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..base.errors import ConfigError
from .backbone import build_backbone, default_arch, param_count
from .checkpoint import read_config, save_checkpoint
from .data import dataset_info, load_dataset
from .distributed import Dist, from_env
from .flow import (EMA, STATE_JSON, STATE_TENSORS, ResumableRun, check_settings, finite_loss, flow_matching_loss,
                   lr_at)



@dataclass
class BackboneTrainSettings:
    """Hyper-parameters of one run (recorded in config.json under ``training``)."""

    data: str = "digits"
    steps: int = 6000
    seed: int = 0
    batch: int = 128
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    ckpt_every: int = 500
    arch: dict = field(default_factory=dict)

    def validate(self) -> None:
        check_settings(self, ("steps", "batch", "ckpt_every"))
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")


class _Run(ResumableRun):
    """Mutable state of a training run: model, EMA, optimizer, generator, counters."""

    kind = "backbone"

    def __init__(self, s: BackboneTrainSettings, dist: Dist) -> None:
        info = dataset_info(s.data)
        self.arch = {**default_arch(info.state_shape, info.num_classes), **s.arch}
        torch.manual_seed(s.seed)
        self.model = build_backbone(self.arch).to(dist.device)
        self.ema = EMA(self.model, s.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.dist, self.ddp = dist, dist.wrap(self.model)
        self._reset_counters()


def _check_resume(out: Path, s: BackboneTrainSettings) -> dict:
    """The saved config, after checking it is a resumable run of the same data/seed/batch/arch."""
    from ..base._io import recover_dir

    recover_dir(out)  # a checkpoint swap a kill interrupted is undone before looking
    if not out.is_dir():
        raise ConfigError(f"--resume: {out} does not exist, so there is no run to continue; drop --resume to start one")
    cfg = read_config(out)
    if not (out / STATE_TENSORS).is_file() or not (out / STATE_JSON).is_file():
        raise ConfigError(f"{out} has no resume state ({STATE_TENSORS}); it cannot be resumed")
    old = cfg.get("training", {}).get("settings", {})
    for key in ("data", "seed", "batch", "arch"):
        if key in old and old[key] != getattr(s, key):
            raise ConfigError(f"--resume: {key} {getattr(s, key)!r} differs from the saved run's {old[key]!r}")
    return cfg


def _config(run: _Run, s: BackboneTrainSettings, command: Optional[str], done: bool) -> dict:
    recent = [v for _, v in run.loss_log[-3:]]
    return {
        "kind": "backbone",
        "arch": run.arch,
        "data": dataset_info(s.data).meta(),
        "param_count": param_count(run.model),
        "training": {
            "command": command, "settings": asdict(s), "step": run.step, "steps": s.steps, "finished": done,
            "seed": s.seed, "batch": s.batch, "wall_s": round(run.wall_s, 1),
            "threads": torch.get_num_threads(), "loss_log": run.loss_log,
            "final_loss": sum(recent) / len(recent) if recent else None,
            "objective": "flow matching, linear path x_t=(1-t)x+t*eps, target eps-x, t~U(0,1), EMA weights",
        },
    }


def _save(out: Path, run: _Run, s: BackboneTrainSettings, command: Optional[str], done: bool) -> dict:
    """Rank 0 writes the checkpoint and resume state (atomically); the other ranks wait for it."""
    cfg = _config(run, s, command, done)
    if run.dist.main:
        tensors, meta = run.state_bytes()
        save_checkpoint(out, run.ema.module, cfg, extra_files={STATE_TENSORS: tensors, STATE_JSON: meta})
    run.dist.barrier()
    return cfg


def train_backbone(out: str | Path, settings: BackboneTrainSettings, resume: bool = False,
                   command: Optional[str] = None, progress: bool = True, dist: Optional[Dist] = None) -> dict:
    """Train (or resume) a backbone on ``settings.data``; returns the saved config dict.

    Writes a checkpoint to ``out`` every ``ckpt_every`` steps and at the end. ``command`` is the
    exact command line recorded in config.json. Under torchrun (``dist``, default: from the
    environment) the global ``batch`` is split over the processes and rank 0 alone writes.
    """
    from tqdm.auto import tqdm

    from ..base._io import check_output

    settings.validate()
    dist = dist or from_env()
    dist.local_batch(settings.batch)
    out = Path(out)
    check_output(out, "--out", folder=True)
    run = _Run(settings, dist)
    if resume:
        _check_resume(out, settings)
        run.restore(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; pass --resume to continue it or choose another --out")
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    x_all, y_all = (torch.from_numpy(a) for a in load_dataset(settings.data, "train", seed=0))
    bar = tqdm(total=settings.steps, initial=run.step, desc=f"train backbone ({settings.data})",
               disable=not (progress and dist.main), dynamic_ncols=True)
    window: list[float] = []
    cfg, saved = None, run.step
    while run.step < settings.steps:
        start = time.perf_counter()
        loss = finite_loss(_train_step(run, settings, x_all, y_all), run.step + 1, out, saved)
        run.wall_s += time.perf_counter() - start
        run.step += 1
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(window[-50:]) / len(window[-50:]):.4g}")
        if run.step % settings.ckpt_every == 0 or run.step == settings.steps:
            run.loss_log.append([run.step, sum(window) / len(window)])
            window = []
            cfg = _save(out, run, settings, command, done=run.step == settings.steps)
            saved = run.step
    bar.close()
    return cfg if cfg is not None else _save(out, run, settings, command, done=True)


def _train_step(run: _Run, s: BackboneTrainSettings, x_all: torch.Tensor, y_all: torch.Tensor) -> float:
    """One optimizer step on this rank's rows of a global batch of ``s.batch``; the global mean loss."""
    d = run.dist
    idx = d.draw(lambda shape, **kw: torch.randint(0, x_all.shape[0], shape, **kw), run.gen,
                 d.local_batch(s.batch)).cpu()
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, s.lr, s.steps, s.warmup)
    run.model.train()
    loss = flow_matching_loss(run.ddp, x_all[idx].to(d.device), y_all[idx].to(d.device), run.gen, s.label_dropout,
                              dist=d, null_label=run.model.null_label)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
    run.opt.step()
    run.ema.update(run.model)
    return d.mean(float(loss.detach()))
