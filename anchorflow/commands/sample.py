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
def sample(model, solver, nfe, n, labels, cfg_scale, cfg_interval, grid, first_call, seed, backend, allow_fallback,
           precision, bandit_state, calls, speedup, mu_factor, cond_file, null_file, noise_file, out, npy, threads,
           thread_mode) -> None:
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

    check_sample_outputs("samples.png" if out is None else out, npy, (bandit_state,) if bandit_state else ())
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
                   need_sidenet=get_solver(solver).needs_sidenet)
    # --- latent models: pictures through the bundle's VAE, or --out refused ---
    from .generate import latent_outputs, write_latent_outputs

    decoder, out = latent_outputs(m, model, out, npy, backend)
    latent = m.meta.get("data_range") is None
    # --- end latent models ---
    noise = read_noise(noise_file, m.meta["state_shape"]) if noise_file else None
    p = plan(m, **asked, noise=noise, names=CLI_NAMES,
             cond=read_arrays(cond_file, "--cond") if cond_file else None,
             null_cond=read_arrays(null_file, "--null-cond") if null_file else None)
    if p.tuned_spec is not None:
        click.echo(f"grid: {p.grid_source} (from the bundle; --grid overrides)", err=True)
    pending = p.begin()
    res = pending.result
    if latent:  # a pipeline bundle
        wrote = write_latent_outputs(res.x, decoder, out, npy)
    else:
        write_samples(res.x, out, npy, tuple(m.meta.get("data_range") or (-1.0, 1.0)))
        wrote = f"wrote {out}" + (f" and {npy}" if npy else "")
    pending.commit()  # learn only once every output is written (all or nothing)
    t = res.timing
    click.echo(
        f"{solver}: {res.nfe} backbone calls, {res.sidenet_calls} SideNet calls, {t.total_s * 1e3:.1f} ms "
        f"(backbone {t.backbone_s * 1e3:.1f}, SideNet {t.sidenet_s * 1e3:.1f}, other {t.overhead_s * 1e3:.1f}) "
        f"on {', '.join(m.providers) or 'unknown backend'}"
    )
    click.echo(wrote)
