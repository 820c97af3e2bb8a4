"""`anchorflow train sidenet`: train a SideNet next to a frozen backbone (BA-solver Algorithm 2).

torch is imported inside the command function only, so `--help` works without it.
"""

from __future__ import annotations

import click

from ..base.errors import ConfigError
from .common import MAX_BATCH, count, parse_float_list, positive, seed as seed_check

DEFAULT_BUDGET_MINUTES = 10.0  # when neither --iters nor --budget-minutes is given


def budget_seconds(value: str | None, iters_given: bool) -> tuple[float | None, bool]:
    """(``--budget-minutes`` in seconds or None for no limit, whether it is the default budget)."""
    if value is None:
        return (None, False) if iters_given else (60.0 * DEFAULT_BUDGET_MINUTES, True)
    if value.strip().lower() == "none":
        return None, False
    try:
        minutes = float(value)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < 1e6:
        raise ConfigError(f"--budget-minutes must be a positive number of minutes or 'none', got {value!r}")
    return 60.0 * minutes, False


def read_ba_grids(path: str) -> tuple[tuple[float, ...], ...]:
    """The time grids of solver ``ba`` in a bundle's tuned.json (PATH: the bundle folder or the file)."""
    import json
    from pathlib import Path

    file = Path(path)
    file = file / "tuned.json" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"--offset-grids: {file} does not exist; pass a bundle folder holding tuned.json "
                          "(written by `anchorflow tune`) or the tuned.json itself")
    try:
        entries = json.loads(file.read_text())["grids"]
        grids = [tuple(float(v) for v in e["times"]) for e in entries.values() if e.get("solver") == "ba"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--offset-grids: {file} is not a tuned.json with grids ({type(exc).__name__}: {exc}); "
                          "pass the tuned.json of a bundle tuned by `anchorflow tune`") from None
    if not grids:
        raise ConfigError(f"--offset-grids: {file} holds no grids of solver 'ba'; tune the bundle with BA first")
    return tuple(dict.fromkeys(grids))  # distinct grids; checked by SideNetTrainSettings.validate


@click.command("sidenet")
@click.option("--backbone", "model", default="default", show_default=True,
              help="MODEL: 'default' (the bundled digits backbone), a model root or a backbone checkpoint folder, "
                   "a diffusers transformer folder (config.json + safetensors: SD3, FLUX, Sana, ...), or a factory "
                   "'pkg.module:make' / 'path/to/file.py:make' (see docs/byo.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="SideNet checkpoint folder to write.")
@click.option("--iters", type=int, default=250, show_default=True, callback=positive,
              help="Optimizer iterations, at most (the paper: 250 at batch 4096 on ImageNet-256). The first one "
                   "is timed and an ETA printed.")
@click.option("--budget-minutes", default=None, metavar="M",
              help=f"Stop after about M minutes (loading and start states included): after the first iteration "
                   f"--iters is lowered to what fits, and the pick printed. 'none': no limit. Default: "
                   f"{DEFAULT_BUDGET_MINUTES:g} when --iters is not given either (a first run finishes in minutes), "
                   f"else none.")
@click.option("--chain", type=int, default=8, show_default=True, callback=positive,
              help="Simulated steps per iteration (each one backbone call).")
@click.option("--batch", type=int, default=256, show_default=True, callback=count(MAX_BATCH), help="Batch size.")
@click.option("--rate", default="50", show_default=True,
              help="Rate of the truncated exponential for the offset |h| (mean 1/rate). A comma list, e.g. "
                   "'50,5', draws each sample's rate from the list: larger offsets for 5-10 NFE sampling.")
@click.option("--lr", type=float, default=1e-4, show_default=True, callback=positive,
              help="AdamW learning rate (the spec's 1e-4; the bundled digits SideNet used 3e-3 at batch 128, which "
                   "learns far more in 250 iterations of a small net).")
@click.option("--width", type=int, default=None, callback=positive,
              help="SideNet width (default: sized to 1.5% of the backbone's parameters).")
@click.option("--patch", type=int, default=None, callback=positive,
              help="Run the SideNet body on an (H/p, W/p) grid (space-to-depth stem); 1 = full resolution (paper).")
@click.option("--blocks", type=int, default=None, callback=positive, help="ResBlocks in the SideNet body.")
@click.option("--offset", "offset_form", type=click.Choice(["film", "poly2", "poly3", "poly4"]), default=None,
              help="How the offset h enters: 'film' (the paper: h embedded into every block's FiLM), or 'polyD' "
                   "(delta = h f1 + ... + h^D fD, the body sees no h: BA's 4 offsets per interval cost ONE body "
                   "row instead of four).  [default: film]")
@click.option("--offset-grids", "offset_grids", default=None,
              help="A bundle folder or its tuned.json: draw part of the offsets from its tuned BA grids (every "
                   "'ba@N' entry, both first-call variants): BA's probe offsets a L, (1-a) L, L toward data and a L "
                   "toward noise on the grid interval of length L that holds t.")
@click.option("--grid-share", type=float, default=None,
              help="Share of the offsets drawn from --offset-grids (the rest: the exponential).  [default: 0.5]")
@click.option("--data", default="auto", show_default=True,
              help="Start states: 'auto' (the backbone checkpoint's own data set if it names one, else data-free), "
                   "'none' (data-free: the backbone's own many-step samples for the --cond rows), a bundled data "
                   "set (digits, gaussians8) or a folder of .npy latents (N, C, H, W).")
@click.option("--cond", "cond_file", default=None, type=click.Path(dir_okay=False),
              help="Conditions (.npz / .safetensors, one array per condition name, rows first): the prompts or "
                   "labels to generate start states for (data-free), or one row per latent (--data FOLDER). "
                   "Default for class-conditional backbones: every class.")
@click.option("--null-cond", "null_file", default=None, type=click.Path(dir_okay=False),
              help="The null condition (one row, e.g. the empty prompt's embeddings) for the 10% null rows; "
                   "default: the backbone's null label.")
@click.option("--sidenet-cond", default="auto", show_default=True,
              help="What conditions the SideNet: 'auto' (label embedding for y; pooled projection, else masked "
                   "mean of encoder_hidden_states, for text models), 'none' (v already carries the prompt), "
                   "or a condition name.")
@click.option("--start-states", type=int, default=1024, show_default=True, callback=positive,
              help="Data-free: number of start states generated (once, cached) by the backbone.")
@click.option("--solve-steps", type=int, default=32, show_default=True, callback=positive,
              help="Data-free: midpoint steps of that solve (2 backbone calls each).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Data-free start-state cache (default: $ANCHORFLOW_CACHE/datafree or ~/.cache/anchorflow/datafree).")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check,
              help="Seed of initialisation, batches, noise, offsets.")
@click.option("--ckpt-every", type=int, default=50, show_default=True, callback=positive,
              help="Write the checkpoint (and resume state) every N iterations.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (same settings; --iters may grow).")
@click.option("--init", "init", default=None, type=click.Path(file_okay=False, exists=True),
              help="Start from this SideNet checkpoint (its architecture is kept; the backbone's shapes must fit it), "
                   "e.g. to fine-tune the base SideNet for a backbone with a LoRA fused in (`anchorflow refit`).")
@click.option("--threads", type=int, default=None, callback=positive, help="torch CPU threads (default: torch's).")
def sidenet(model, out, iters, budget_minutes, chain, batch, rate, lr, width, patch, blocks, offset_form, offset_grids, grid_share,
            data, cond_file, null_file, sidenet_cond,
            start_states, solve_steps, cache_dir, seed, ckpt_every, resume, threads, init=None) -> None:
    """Train a SideNet for a frozen backbone by chain-based simulation (BA-solver, arXiv 2601.21542).

    Each iteration starts a batch on the path x_t = (1-t) x + t noise (t = 1 noise, t = 0 data)
    and takes CHAIN simulated steps of signed offset h with the SideNet's own Gauss-Legendre rule,
    matching v + S(x, v, t, h, y) to the backbone's velocity at t - h. Labels are dropped 10% of
    the time (guided sampling needs the unguided field). The folder gets config.json (with this
    exact command and the backbone's identity), model.safetensors (EMA weights) and the resume state.
    Several processes: `torchrun --standalone --nproc_per_node=K -m anchorflow train sidenet ...`
    (DDP; --batch is the global batch, split over the processes; rank 0 writes).
    Ctrl-C or SIGTERM: the iteration under way finishes, the checkpoint of the last finished one is
    written (continue with --resume), exit status 130.
    """
    from .train import _start, command_line

    budget_s, budget_default = budget_seconds(
        budget_minutes, click.get_current_context().get_parameter_source("iters").name != "DEFAULT")
    grids = read_ba_grids(offset_grids) if offset_grids is not None else ()
    _start(out, threads, "sidenet")
    from anchorflow.trainers.distributed import session
    from anchorflow.trainers.sidenet_run import train_sidenet_for_source
    from anchorflow.trainers.train_sidenet import SideNetTrainSettings

    settings = SideNetTrainSettings(iters=iters, chain=chain, batch=batch, rates=tuple(parse_float_list(rate, "--rate")),
                                    lr=lr, width=width, seed=seed, ckpt_every=ckpt_every,
                                    arch={k: v for k, v in (("patch", patch), ("blocks", blocks), ("offset", offset_form))
                                          if v is not None},
                                    sidenet_cond=sidenet_cond, offset_grids=grids, grid_share=grid_share,
                                    init=init)
    settings.validate()  # bad grids or --grid-share: one line, before any work
    with session() as dist:
        cfg = train_sidenet_for_source(model, out, settings, data=data, cond_file=cond_file, null_file=null_file,
                                       n_states=start_states, solve_steps=solve_steps, cache_dir=cache_dir,
                                       resume=resume, command=command_line(), dist=dist,
                                       budget_s=budget_s, budget_default=budget_default)
    if not dist.main:
        return
    t = cfg["training"]
    click.echo(f"wrote {out}: {cfg['param_count']:,} parameters ({100 * cfg['param_ratio']:.2f}% of the backbone), "
               f"iteration {t['step']}, final loss {t['final_loss']:.4g}, {t['wall_s']:.0f} s")
