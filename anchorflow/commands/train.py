"""`anchorflow train {backbone,classifier,sidenet}`: training commands (need the [train] extra).

torch is imported inside the command functions only, so `anchorflow train --help` is instant.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .lazygroup import LazyGroup
from .common import MAX_BATCH, count, positive, seed as seed_check

# sub-command -> (module, attribute or None for a command defined here, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "backbone": (__name__, "backbone", "Train a class-conditional flow-matching backbone (DiT / MLP)."),
    "classifier": (__name__, "classifier", "Train the digits evaluation classifier (accuracy, FD features)."),
    "sidenet": ("anchorflow.commands.train_sidenet", "sidenet", "Train a SideNet next to a frozen backbone."),
}


class LazyTrainGroup(LazyGroup):
    """Sub-commands are resolved from :data:`SUBCOMMANDS` only when used."""

    commands_table = SUBCOMMANDS


def command_line() -> str:
    """The exact command line of this process, as a shell-quoted string (recorded in configs).

    ``python -m anchorflow`` is recorded as such; under torchrun (``WORLD_SIZE`` > 1) the launcher
    is recorded as ``torchrun --nnodes=N --nproc_per_node=K -m anchorflow ...``.
    """
    import os

    argv = list(sys.argv)
    name = Path(argv[0]).name if argv else ""
    if name == "cli.py":
        argv = ["python", "-m", "anchorflow.cli", *argv[1:]]
    elif name == "__main__.py":
        argv = ["python", "-m", "anchorflow", *argv[1:]]
    elif argv:
        argv[0] = name
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    if world.isdigit() and local.isdigit() and int(world) > 1:
        nodes = max(int(world) // max(int(local), 1), 1)
        prefix = ["python", "-m"] if argv[:2] == ["python", "-m"] else []
        rest = argv[len(prefix):] if prefix else ["anchorflow", *argv[1:]]
        argv = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={local}", "-m", *rest]
    return shlex.join(argv)


def _start(out: str, threads, what: str) -> None:
    """Before any work: the [train] extra is there and --out can be written; set torch's threads."""
    from ..base._deps import require_extra
    from ..base._io import check_output

    require_extra("train", f"anchorflow train {what}")
    check_output(out, "--out", folder=True)
    import torch

    if threads:
        torch.set_num_threads(threads)


@click.group("train", cls=LazyTrainGroup)
def train() -> None:
    """Train the networks anchorflow needs: a backbone, a SideNet, the evaluation classifier.

    Training runs on the CPU or a CUDA GPU with torch (pip install 'anchorflow[train]').
    Time convention: t = 1 is noise, t = 0 is data.
    """


@train.command("backbone")
@click.option("--data", default="digits", show_default=True,
              help="Bundled data set: digits (8x8, 10 classes) or gaussians8 (2-D toy). Nothing is downloaded.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--steps", type=int, default=6000, show_default=True, callback=positive, help="Optimizer steps.")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check,
              help="Seed of initialisation, batches and noise.")
@click.option("--batch", type=int, default=128, show_default=True, callback=count(MAX_BATCH), help="Batch size.")
@click.option("--lr", type=float, default=6e-4, show_default=True, help="Peak AdamW learning rate (warm-up, cosine).")
@click.option("--ckpt-every", type=int, default=500, show_default=True, callback=positive,
              help="Write a checkpoint (and resume state) every N steps.")
@click.option("--hidden", type=int, default=None, callback=positive, help="Override the width (DiT: 128, MLP: 256).")
@click.option("--depth", type=int, default=None, callback=positive, help="Override the depth (DiT: 4, MLP: 3).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (same data, seed, batch, size).")
@click.option("--threads", type=int, default=None, callback=positive, help="torch CPU threads (default: torch's).")
def backbone(data, out, steps, seed, batch, lr, ckpt_every, hidden, depth, resume, threads) -> None:
    """Train a class-conditional velocity backbone by flow matching (linear path, EMA weights).

    Labels are dropped 10% of the time so the model supports classifier-free guidance.
    The folder gets config.json (with this exact command), model.safetensors (EMA weights)
    and the resume state. Several processes: `torchrun --standalone --nproc_per_node=K -m
    anchorflow train backbone ...` (DDP; --batch is the global batch, split over the processes).
    """
    _start(out, threads, "backbone")
    from anchorflow.trainers.distributed import session
    from anchorflow.trainers.train_backbone import BackboneTrainSettings, train_backbone

    arch = {k: v for k, v in (("hidden", hidden), ("depth", depth)) if v is not None}
    settings = BackboneTrainSettings(data=data, steps=steps, seed=seed, batch=batch, lr=lr,
                                     ckpt_every=ckpt_every, arch=arch)
    with session() as dist:
        cfg = train_backbone(out, settings, resume=resume, command=command_line(), dist=dist)
    if not dist.main:
        return
    t = cfg["training"]
    click.echo(f"wrote {out}: {cfg['param_count']:,} parameters, step {t['step']}, "
               f"final loss {t['final_loss']:.4g}, {t['wall_s']:.0f} s")


@train.command("classifier")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the classifier checkpoint.")
@click.option("--epochs", type=int, default=40, show_default=True, callback=positive, help="Training epochs.")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check, help="Seed.")
@click.option("--threads", type=int, default=None, callback=positive, help="torch CPU threads (default: torch's).")
def classifier(out, epochs, seed, threads) -> None:
    """Train the digits evaluation classifier (a small CNN) and write its checkpoint,
    classifier.onnx (outputs logits, features) and real_stats.npz (feature mean/covariance of
    the real test digits, the Frechet-distance reference)."""
    _start(out, threads, "classifier")
    from anchorflow.trainers.classifier import train_classifier

    cfg = train_classifier(out, epochs=epochs, seed=seed, command=command_line())
    click.echo(f"wrote {out}: test accuracy {cfg['metrics']['test_accuracy']:.4f}")
