"""`anchorflow bench`: every solver on the same noise, against a reference; writes a report folder."""

from __future__ import annotations

import click

from .common import BACKENDS, MAX_N, count, seed as seed_check, thread_options

DEFAULT_NFE = "3,4,5,6,8,10,20,50,100"


@click.command("bench")
@click.argument("model")
@click.option("--solvers", default=None,
              help="Comma-separated solver names (see `anchorflow solvers`). Default: every registered solver "
                   "the model can run (those needing a SideNet only when it has one).")
@click.option("--nfe", default=DEFAULT_NFE, show_default=True,
              help="Comma-separated backbone-call budgets (fastflow: grid sizes T; its real calls are reported). "
                   "Budgets a solver cannot honour (odd NFE for heun) are skipped with the reason in the report.")
@click.option("--n", "n", type=int, default=256, show_default=True, callback=count(MAX_N),
              help="Samples per run (same noise for every solver); with --cond and no --n, the rows of --cond.")
@click.option("--cfg", "cfg", default="1.0", show_default=True,
              help="Comma-separated classifier-free guidance scales, e.g. 1.0,1.5; each gets its own reference.")
@click.option("--cfg-interval", default="0,1", show_default=True, help="Guidance applies for t in (lo, hi].")
@click.option("--reference", default="rk4:512", show_default=True,
              help="Reference solver: 'rk4:N' (N uniform steps, checked against N/2) or 'dopri5[:TOL]' "
                   "(adaptive Dormand-Prince at rtol = atol = TOL, default 1e-6).")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check, help="Seed of the start noise.")
@thread_options
@click.option("--first-call", "first_call", default="backbone", show_default=True,
              help="'backbone', 'cached' or both ('backbone,cached'): with 'cached' every solver also runs with "
                   "the bundle's tuned t = 1 table (rows 'NAME+cache'; N calls buy N + 1 intervals).")
@click.option("--grids", type=click.Choice(["uniform", "tuned"]), default="uniform", show_default=True,
              help="'tuned': each solver on the bundle's tuned grid for its budget ('anchorflow tune'); the Euler "
                   "ladder always runs uniform from the backbone.")
@click.option("--no-self-check", "no_self_check", is_flag=True,
              help="Skip the reference's self-check (its second solve at half the steps); the report says so.")
@click.option("--euler-ladder", default=None,
              help="Comma-separated Euler NFEs for the 'Euler NFE to match' table (default 1..10,12,15,...,200).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Execution backend; 'auto' takes the best available and reports it.")
@click.option("--allow-fallback", is_flag=True, help="Fall back to CPU when a GPU provider fails to load.")
@click.option("--out", type=click.Path(file_okay=False), default="bench", show_default=True,
              help="Folder for results.json, report.md, quality_vs_nfe.png, calibration.png / .csv (error "
                   "estimate vs true per-sample error) and sample grids.")
@click.option("--cond", "cond_file", type=click.Path(dir_okay=False), default=None,
              help="Conditions for every run: .npz or .safetensors, one array per condition name, rows --n or 1 "
                   "(`anchorflow inspect` lists what the bundle declares). Default: balanced class labels.")
@click.option("--null-cond", "null_file", type=click.Path(dir_okay=False), default=None,
              help="Null conditions for the guidance rows (--cfg), same format (e.g. empty-prompt embeddings).")
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON to stdout (messages go to stderr).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench(model, solvers, nfe, n, cfg, cfg_interval, reference, seed, first_call, grids, no_self_check, euler_ladder,
          backend, allow_fallback, out, cond_file, null_file, as_json, quiet, threads, thread_mode) -> None:
    """Benchmark solvers on MODEL: quality against a reference, counted NFE, timing split.

    Every solver gets the same start noise, labels (balanced over classes) and guidance. For
    each (solver, NFE, guidance) the report gives PSNR and RMSE against the reference, the
    Euler NFE needed to match that PSNR, FD and class accuracy with the model's classifier,
    and the wall-clock split into backbone, SideNet and runtime overhead; per solver the
    empirical order (slope of log RMSE against log NFE); for the solvers with a free per-sample
    error estimate (ba, ab2, ipndm, unipc) its Spearman and median ratio against the true
    per-sample error (calibration.png, calibration.csv). MODEL is `default`, a model folder
    or an exported bundle; on a bundle this runs without torch.

    \b
    Examples:
      anchorflow bench default --solvers euler,heun,ba --nfe 4,6,8,10 --cfg 1.0,1.5
      anchorflow bench default --n 64 --nfe 5,10 --reference dopri5 --json > bench.json
    """
    import json

    from ..base._io import check_output
    from ..bench import EULER_LADDER, check_counts, parse_reference, run_bench, select_solvers
    from ..runtime.bundles.tuned_grids import read_tuning
    from ..base.errors import ConfigError
    from ..modelref import open_model
    from .common import (MAX_REFERENCE_STEPS, apply_threads, check_cfg, check_nfe, parse_float_list,
                         parse_int_list, parse_interval, rows_default)

    check_output(out, "--out", folder=True)
    nfes = check_nfe(parse_int_list(nfe, "--nfe"))
    check_counts(n, nfes)
    interval = parse_interval(cfg_interval)
    names = None if solvers is None else [s.strip() for s in solvers.split(",") if s.strip()]
    if names is not None:
        select_solvers(names, has_sidenet=True)  # unknown names fail here, before the model loads
    method, steps = parse_reference(reference)
    if method == "rk4" and steps > MAX_REFERENCE_STEPS:
        raise ConfigError(f"--reference {reference}: at most rk4:{MAX_REFERENCE_STEPS} (4 backbone calls a step)")
    cfgs = check_cfg(parse_float_list(cfg, "--cfg"))
    apply_threads(threads, thread_mode)
    ladder = EULER_LADDER if euler_ladder is None else parse_int_list(euler_ladder, "--euler-ladder")
    modes = [f.strip() for f in first_call.split(",") if f.strip()]
    from .cond_files import read_arrays

    cond = read_arrays(cond_file, "--cond") if cond_file else None
    null_cond = read_arrays(null_file, "--null-cond") if null_file else None
    m = open_model(model, backend=backend, allow_fallback=allow_fallback)
    n = rows_default(n, "n", m, cond)
    tuning = read_tuning(m.files.bundle) if m.files.bundle is not None else None
    results = run_bench(m, names, nfes, n, cfgs, seed, out, reference=reference, progress=not quiet,
                        cfg_interval=interval, euler_ladder=ladder, first_calls=modes,
                        grids=grids, tuning=tuning, self_check=not no_self_check, cond=cond, null_cond=null_cond)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    click.echo(f"wrote {out}/report.md and {out}/results.json", err=as_json)
