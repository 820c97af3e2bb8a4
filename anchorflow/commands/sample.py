"""`anchorflow sample`: generate with any solver; torch-free on an exported bundle."""

from __future__ import annotations

import click

from .common import BACKENDS, MAX_N, PRECISIONS, MAX_NFE, cfg_scale as cfg_check, count, seed as seed_check, thread_options


@click.command("sample")
@click.argument("model")
@click.option("--solver", default="ba", show_default=True, help="Solver name (see `anchorflow solvers`).")
@click.option("--nfe", type=int, default=7, show_default=True, callback=count(MAX_NFE),
              help=f"Backbone calls to spend (for fastflow: the grid size T); at most {MAX_NFE}.")
@click.option("--n", "n", type=int, default=None, callback=count(MAX_N),
              help="Number of samples [default: 16, or the rows of --noise].")
@click.option("--labels", default=None, help="Comma-separated class labels, cycled over the samples (default 0..C-1).")
@click.option("--cfg", "cfg_scale", type=float, default=1.0, show_default=True, callback=cfg_check,
              help="Classifier-free guidance scale (> 0); 1.0 means none.")
@click.option("--cfg-interval", default="0,1", show_default=True, help="Guidance applies for t in (lo, hi].")
@click.option("--grid", default=None,
              help="'uniform', 'shift:S' (SD3/FLUX time shift) or 'warp:S,P'. Default: the bundle's tuned grid for "
                   "this solver and NFE ('anchorflow tune'), else uniform.")
@click.option("--first-call", type=click.Choice(["backbone", "cached"]), default="backbone", show_default=True,
              help="'cached': the t = 1 velocity from the bundle's tuned table, so NFE buys one more interval.")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check, help="Seed of the start noise.")
@thread_options
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Execution backend; 'auto' takes the best available and reports it.")
@click.option("--allow-fallback", is_flag=True, help="Fall back to CPU when a GPU provider fails to load.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Which of the bundle's ONNX variants to run.")
@click.option("--bandit-state", type=click.Path(dir_okay=False), default=None,
              help="fastflow: JSON file the bandit learns into across invocations (created if missing).")
@click.option("--calls", type=float, default=None,
              help="fastflow: budget of backbone calls per sample batch; the bandit adapts its price mu to it.")
@click.option("--speedup", type=float, default=None,
              help="fastflow: budget as a speed-up over the T-step grid (calls = T / speedup); default 3.")
@click.option("--mu-factor", type=float, default=None,
              help="fastflow: scales the first, calibrated mu (the budget then adapts it).")
@click.option("--cond", "cond_file", type=click.Path(dir_okay=False), default=None,
              help="Conditions: .npz or .safetensors with one array per condition name, rows n or 1 "
                   "(`anchorflow inspect` lists what the bundle declares).")
@click.option("--null-cond", "null_file", type=click.Path(dir_okay=False), default=None,
              help="Null conditions for guidance rows (--cfg), same format (e.g. empty-prompt embeddings).")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False), default=None,
              help="Start noise (n, *state) .npy instead of --seed's.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Sample grid image to write (.png, .jpg or .webp) [default: samples.png]. Latents (bundle.json "
                   "data_range null) are decoded through a pipeline bundle's VAE; without one give --npy alone.")
@click.option("--npy", type=click.Path(dir_okay=False), default=None, help="Also save the raw samples as .npy.")
# -- quality presets, per-sample error estimates, escalation
@click.option("--quality", default=None,
              help="Instead of --solver/--nfe/--grid/--first-call: a preset recorded by 'anchorflow tune "
                   "--target-psnr' (its name, or a number of dB: the fastest preset whose bound meets it).")
@click.option("--max-error", type=float, default=None,
              help="With --quality: re-solve the samples whose error estimate exceeds this (state units) with the "
                   "next costlier recorded preset, then the preset's reference; reports samples and calls spent.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write what ran as JSON: configuration, backbone calls, per-sample error estimate, escalation.")
# -- end auto
def sample(model, solver, nfe, n, labels, cfg_scale, cfg_interval, grid, first_call, seed, backend, allow_fallback,
           precision, bandit_state, calls, speedup, mu_factor, cond_file, null_file, noise_file, out, npy, threads,
           thread_mode, quality=None, max_error=None, json_out=None) -> None:
    """Generate N samples from MODEL with SOLVER in NFE backbone calls and write a PNG grid.

    MODEL is `default` (the bundled digits model), a model folder or an exported bundle. On a
    bundle this runs on numpy + onnxruntime (or TensorRT) only: torch is never imported.

    \b
    Examples:
      anchorflow sample default --solver ba --nfe 7 --n 16 --cfg 1.5 --out ba7.png
      anchorflow sample default --solver fastflow --nfe 50 --bandit-state bandit.json
      anchorflow sample sd3-bundle --solver euler --nfe 28 --cond prompt.npz --null-cond empty.npz \
          --cfg 4 --noise noise.npy --npy latents.npy
    """
    from ..modelref import open_model
    from ..runtime.plan import check_request, plan
    from .common import CLI_NAMES, apply_threads, check_sample_outputs, write_samples
    from .cond_files import read_arrays, read_noise

    check_sample_outputs("samples.png" if out is None else out, npy, tuple(p for p in (bandit_state, json_out) if p))
    if quality is not None or max_error is not None:  # checked before the model loads
        from ..autoconfig import check_quality_request

        ctx = click.get_current_context()
        check_quality_request(quality, max_error, [f"--{k.replace('_', '-')}" for k in ("solver", "nfe", "grid",
                              "first_call", "bandit_state", "calls", "speedup", "mu_factor")
                              if ctx.get_parameter_source(k).name != "DEFAULT"])
    asked = dict(solver=solver, nfe=nfe, grid=grid, first_call=first_call, cfg_scale=cfg_scale,
                 cfg_interval=cfg_interval, labels=labels or None, n=n, seed=seed, bandit_state=bandit_state,
                 calls=calls, speedup=speedup, mu_factor=mu_factor)
    check_request(**asked, names=CLI_NAMES)  # every number checked before the model loads
    if solver == "fastflow" and not bandit_state:
        click.echo("note: without --bandit-state FastFlow cannot learn across runs; this run is its calibration "
                   "pass (every step computed)", err=True)
    apply_threads(threads, thread_mode)
    from ..runtime import get_solver

    m = open_model(model, backend=backend, allow_fallback=allow_fallback, precision=precision,
                   need_sidenet=quality is None and get_solver(solver).needs_sidenet)
    # --- latent models: pictures through the bundle's VAE, or --out refused ---
    from .generate import latent_outputs, write_latent_outputs

    decoder, out = latent_outputs(m, model, out, npy, backend)
    latent = m.meta.get("data_range") is None
    # --- end latent models ---
    noise = read_noise(noise_file, m.meta["state_shape"]) if noise_file else None
    conds = dict(cond=read_arrays(cond_file, "--cond") if cond_file else None,
                 null_cond=read_arrays(null_file, "--null-cond") if null_file else None)
    if quality is not None:  # the preset's solver, budget, grid and first call
        from ..autoconfig import describe, quality_plans

        chosen, p, rungs = quality_plans(m, quality, **{k: v for k, v in asked.items() if k in QUALITY_KEEPS},
                                         noise=noise, names=CLI_NAMES, **conds)
        solver = chosen.solver
        click.echo(describe(chosen), err=True)
    else:
        chosen, rungs = None, []
        p = plan(m, **asked, noise=noise, names=CLI_NAMES, **conds)
    if p.tuned_spec is not None:
        click.echo(f"grid: {p.grid_source} (from the bundle; --grid overrides)", err=True)
    pending = p.begin()
    res = pending.result
    x, esc = res.x, None
    if max_error is not None:
        from ..autoconfig import escalate

        esc = escalate(p, res, max_error, [q for _, q in rungs], [label for label, _ in rungs])
        x = esc.x
    if latent:  # a pipeline bundle
        wrote = write_latent_outputs(x, decoder, out, npy)
    else:
        write_samples(x, out, npy, tuple(m.meta.get("data_range") or (-1.0, 1.0)))
        wrote = f"wrote {out}" + (f" and {npy}" if npy else "")
    pending.commit()  # learn only once every output is written (all or nothing)
    if json_out:
        from ..autoconfig import run_record
        from ..base import _io

        _io.write_json(json_out, run_record(p, res, chosen, esc))
    t = res.timing
    click.echo(
        f"{solver}: {res.nfe} backbone calls, {res.sidenet_calls} SideNet calls, {t.total_s * 1e3:.1f} ms "
        f"(backbone {t.backbone_s * 1e3:.1f}, SideNet {t.sidenet_s * 1e3:.1f}, other {t.overhead_s * 1e3:.1f}) "
        f"on {', '.join(m.providers) or 'unknown backend'}"
    )
    if esc is not None:
        steps = "; ".join(f"{r['samples']} with {r['config']} ({r['backbone_calls']} calls)" for r in esc.rungs)
        click.echo(f"escalation (--max-error {max_error:g}): {esc.resolved} of {len(x)} samples re-solved, "
                   f"{esc.extra_calls} extra backbone calls" + (f": {steps}" if steps else "")
                   + (f"; {esc.above} still above" if esc.above else ""))
    click.echo(wrote + (f" and {json_out}" if json_out else ""))


QUALITY_KEEPS = ("cfg_scale", "cfg_interval", "labels", "n", "seed")  # what --quality leaves the user
