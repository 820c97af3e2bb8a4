"""`anchorflow tune`: a time grid per solver and budget (and the cached first call), stored in the bundle."""

from __future__ import annotations

import click

from .common import BACKENDS, cfg_scale as cfg_check, seed as seed_check

DEFAULT_SOLVERS = "euler,ab2,unipc,ba"


@click.command("tune")
@click.argument("model")
@click.option("--solvers", default=DEFAULT_SOLVERS, show_default=True,
              help="Comma-separated solver names (see `anchorflow solvers`); those needing a SideNet only "
                   "when the model has one.")
@click.option("--nfe", default="5,10", show_default=True, help="Comma-separated backbone-call budgets.")
@click.option("--first-call", "first_calls", default="backbone,cached", show_default=True,
              help="Tune for the first call from the backbone, from the cached t = 1 table, or both. The "
                   "table is measured here and refused when its residual exceeds the stated bound.")
@click.option("--cfg", "cfg", type=float, default=1.0, show_default=True, callback=cfg_check,
              help="Guidance scale to tune at (> 0; 1.0 = none).")
@click.option("--samples", type=int, default=32, show_default=True,
              help="Held-out samples (noise from --seed, never the benchmark's seed 0); with --cond and no "
                   "--samples, the rows of --cond.")
@click.option("--seed", type=int, default=1, show_default=True, callback=seed_check, help="Seed of the held-out noise.")
@click.option("--cond", "cond_file", type=click.Path(dir_okay=False), default=None,
              help="Held-out conditions: .npz or .safetensors, one array per condition name, rows --samples or 1 "
                   "(recorded, with its sha256, in the tuning). Default: balanced class labels.")
@click.option("--null-cond", "null_file", type=click.Path(dir_okay=False), default=None,
              help="Null conditions for the guidance rows (--cfg), same format (e.g. empty-prompt embeddings).")
@click.option("--reference-steps", type=int, default=64, show_default=True,
              help="Plain RK4 steps of the reference the grids are scored against (4 calls each).")
@click.option("--max-evals", type=int, default=16, show_default=True,
              help="Solves per (solver, budget) in the coordinate descent over the grid's (shift, power).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Execution backend; 'auto' takes the best available.")
# -- --target-psnr searches for the fastest configuration that keeps a quality
@click.option("--target-psnr", type=float, default=None,
              help="Instead of tuning grids: record a quality preset, the fastest configuration (solvers x --nfe x "
                   "--grids) whose bootstrap lower bound on the mean PSNR against --reference meets this many dB.")
@click.option("--reference", default="euler@50", show_default=True,
              help="With --target-psnr: what the PSNR is measured against, SOLVER@NFE on a uniform grid.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="With --target-psnr: bound level.")
@click.option("--batch", "promise_batch", type=int, default=None,
              help="With --target-psnr: the promise is about the mean PSNR of a fresh batch of this many samples "
                   "[default: --samples]; more --samples than --batch tightens the bound (e.g. --samples 128 --batch 32).")
@click.option("--bound", "bound", type=click.Choice(("samples", "conditions")), default="samples", show_default=True,
              help="With --target-psnr: bootstrap over samples, or two-level over the class labels, then samples "
                   "(pays for how much the classes differ: a promise for classes the search did not see).")
@click.option("--grids", default="uniform,tuned", show_default=True,
              help="With --target-psnr: grids to try ('tuned' = the bundle's grid where recorded, shift:S, warp:S,P).")
@click.option("--name", default=None, help="With --target-psnr: the preset's name for `sample --quality` "
                                           "[default: psnrQ].")
@click.option("--plot", default=None, type=click.Path(dir_okay=False),
              help="With --target-psnr: write the Pareto figure (quality vs latency and calls, every configuration "
                   "tried, the chosen one marked) to this .png.")
# -- end auto
@click.option("--dry-run", is_flag=True, help="Print the grids without storing them in the bundle.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tune(model, solvers, nfe, first_calls, cfg, samples, seed, cond_file, null_file, reference_steps, max_evals,
         backend, dry_run, quiet, target_psnr=None, reference="euler@50", confidence=0.95, grids="uniform,tuned",
         name=None, plot=None, promise_batch=None, bound="samples") -> None:
    """Tune the time grid of each solver and budget on MODEL (an exported bundle) and record it.

    For every solver and NFE the grid ``warp:S,P`` (the SD3 shift S of u^P; (1, 1) is uniform)
    that maximises PSNR against an RK4 reference on a small held-out batch is found by
    coordinate descent in (log S, log P). With the cached first call the t = 1 velocity
    ``x - E[x0 | c]`` is tabulated per label (refused when the model's residual is large) and
    each budget buys one more interval. Results go into the bundle (tuned.json, first_call.npy,
    hashed in bundle.json); `sample` and `bench --grids tuned` use them.

    \b
    Examples:
      anchorflow tune my-bundle --solvers ba,ab2 --nfe 5,7,10
      anchorflow tune my-bundle --first-call backbone --samples 16 --dry-run
    """
    from ..base.errors import ConfigError
    from ..modelref import BUNDLED, DEFAULT_NAME, open_model
    from ..runtime.bundles.tuned_grids import write_tuning
    from ..tuning import MAX_TUNE_SAMPLES, check_tune, held_out_record, tune as run_tune
    from .common import parse_int_list, rows_default
    from .cond_files import read_arrays

    if target_psnr is not None:  # one library call
        from ..autoconfig import tune_to_target

        explicit = click.get_current_context().get_parameter_source("nfe").name != "DEFAULT"
        for line in tune_to_target(model, target_psnr, reference=reference, solvers=solvers,
                                   nfe=nfe if explicit else None, grids=grids, samples=samples, seed=seed, cfg=cfg,
                                   confidence=confidence, name=name, backend=backend, dry_run=dry_run,
                                   plot=plot, batch=promise_batch, bound=bound,
                                   first_calls=[f.strip() for f in first_calls.split(",") if f.strip()]):
            click.echo(line)
        return
    names = [s.strip() for s in solvers.split(",") if s.strip()]
    nfes = parse_int_list(nfe, "--nfe")
    modes = [f.strip() for f in first_calls.split(",") if f.strip()]
    check_tune(names, nfes, modes, cfg, samples, seed, reference_steps, max_evals)  # before anything is read
    from ..tuning import check_tune_options

    check_tune_options(names, nfes, cfg, samples, seed, reference_steps, max_evals)  # caps
    if model == "default" and not dry_run:
        raise ConfigError(f"the bundled model is read-only; pass a copy of its bundle folder "
                          f"({BUNDLED / DEFAULT_NAME / 'bundle'}) or use --dry-run")
    cond = read_arrays(cond_file, "--cond") if cond_file else None
    null_cond = read_arrays(null_file, "--null-cond") if null_file else None
    m = open_model(model, backend=backend)
    samples = rows_default(samples, "samples", m, cond, MAX_TUNE_SAMPLES)
    folder = m.files.bundle
    if not dry_run and folder is None:
        raise ConfigError(f"{model} is not an exported bundle; export it first ('anchorflow export {model} --out DIR')")
    runnable = [s for s in names if m.sidenet is not None or not _needs_sidenet(s)]
    if not runnable:
        raise ConfigError(f"--solvers {solvers}: every one needs a SideNet and this model has none; nothing to tune")
    result = run_tune(m, runnable, nfes, modes, cfg=cfg, samples=samples, seed=seed, reference_steps=reference_steps,
                      max_evals=max_evals, progress=not quiet, cond=cond, null_cond=null_cond,
                      held_out=held_out_record(cond_file, null_file))
    if result.first_call is None and result.first_call_refused:
        click.echo(f"first-call table: not measured, refused: {result.first_call_refused}")
    if result.first_call is not None:
        state = "refused: " + result.first_call_refused if result.first_call_refused else "accepted"
        click.echo(f"first-call table: residual {result.first_call.residual:.4f} "
                   f"(bound {result.first_call.bound:g}), {state}")
    for key, g in sorted(result.grids.items()):
        click.echo(f"{key:<18} {g.spec:<18} PSNR {g.psnr:6.2f} dB (uniform {g.uniform_psnr:6.2f})")
    if not result.grids:
        raise ConfigError("no grid could be tuned (every budget is one these solvers cannot spend exactly); "
                          "nothing was stored")
    if not dry_run:
        if result.first_call_refused:
            result.first_call = None
        notes: list = []
        write_tuning(folder, result, notes=notes)  # merged with the grids already there, under the bundle's lock
        for line in notes:
            click.echo(f"note: {line}", err=True)
        click.echo(f"stored in {folder}/bundle.json (tuned.json" + (", first_call.npy)" if result.first_call else ")"))


def _needs_sidenet(name: str) -> bool:
    from ..runtime import get_solver

    return get_solver(name).needs_sidenet
