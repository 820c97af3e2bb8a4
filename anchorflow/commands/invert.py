"""`anchorflow invert` and `anchorflow edit`: an image to its noise, and an image edited through its noise."""

from __future__ import annotations

import click

from .common import BACKENDS, MAX_NFE, PRECISIONS, cfg_scale as cfg_check, count


def _model_options(fn):
    for opt in reversed([
        click.option("--image", required=True, type=click.Path(dir_okay=False),
                     help="The image: a PNG/JPEG/WebP of the model's size (grey or RGB as the model takes), or a "
                          ".npy state (*state) / (n, *state) in the model's data range."),
        click.option("--solver", default="ba", show_default=True, help="Solver name (see `anchorflow solvers`)."),
        click.option("--nfe", type=int, default=10, show_default=True, callback=count(MAX_NFE),
                     help="Backbone calls per direction."),
        click.option("--cfg", "cfg_scale", type=float, default=1.0, show_default=True, callback=cfg_check,
                     help="Classifier-free guidance scale; 1.0 means none."),
        click.option("--cfg-interval", default="0,1", show_default=True, help="Guidance applies for t in (lo, hi]."),
        click.option("--grid", default=None, help="'uniform' (default), 'shift:S' or 'warp:S,P'."),
        click.option("--null-cond", "null_file", type=click.Path(dir_okay=False), default=None,
                     help="Null conditions for guidance rows (.npz / .safetensors)."),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="Execution backend."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="Which of the bundle's ONNX variants to run."),
    ]):
        fn = opt(fn)
    return fn


def _open(model: str, backend: str, precision: str, solver: str, out_paths: list, null_file):
    from ..base import _io
    from ..modelref import open_model
    from ..runtime import get_solver
    from .cond_files import read_arrays

    for path, what in out_paths:
        if path is not None:
            _io.check_output(path, what)
    null = read_arrays(null_file, "--null-cond") if null_file else None
    spec = get_solver(solver)
    return open_model(model, backend=backend, precision=precision, need_sidenet=spec.needs_sidenet), null


@click.command("invert")
@click.argument("model")
@_model_options
@click.option("--labels", default=None, help="Comma-separated class labels of the image(s), cycled.")
@click.option("--cond", "cond_file", type=click.Path(dir_okay=False), default=None,
              help="Conditions of the image(s): .npz / .safetensors, one array per condition name.")
@click.option("--t-end", type=float, default=1.0, show_default=True, help="Invert up to this time (1: pure noise).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The noise to write (.npy).")
def invert(model, image, solver, nfe, cfg_scale, cfg_interval, grid, null_file, backend, precision, labels,
           cond_file, t_end, out) -> None:
    """Invert IMAGE to its noise on MODEL: the probability-flow ODE from t = 0 (data) up to t = 1, in NFE calls.

    \b
    Example:
      anchorflow invert default --image three.png --labels 3 --solver ba --nfe 10 --out noise.npy
    """
    import numpy as np

    from ..base import _io
    from ..editing import invert_image
    from ..base.errors import ConfigError, NonFiniteError
    from .common import parse_interval
    from .cond_files import read_arrays

    if not out.lower().endswith(".npy"):
        raise ConfigError(f"--out {out}: the noise is written as .npy; give a file name ending in .npy")
    m, null = _open(model, backend, precision, solver, [(out, "--out")], null_file)
    cond = read_arrays(cond_file, "--cond") if cond_file else None
    res = invert_image(m, image, solver=solver, nfe=nfe, labels=labels, cond=cond, null_cond=null,
                       cfg_scale=cfg_scale, cfg_interval=parse_interval(cfg_interval), grid=grid, t_end=t_end)
    if not np.all(np.isfinite(res.x)):
        raise NonFiniteError(f"the inversion holds NaN or Inf values; nothing was written to {out}")
    with _io.atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, res.x)
    click.echo(f"{solver}: {res.nfe} backbone calls, {res.sidenet_calls} SideNet calls, t = 0 -> {t_end:g}; wrote {out}")


@click.command("edit")
@click.argument("model")
@_model_options
@click.option("--source", required=True, help="The image's condition: class labels ('3') or a condition file.")
@click.option("--target", required=True, help="The wanted condition: class labels ('8') or a condition file.")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="Fraction of the trajectory re-solved, in (0, 1]: invert to t = strength, regenerate from there.")
@click.option("--switch", type=float, default=None,
              help="Where the target condition takes over (t in [0, strength]; above it the source's). "
                   "Default: strength.")
@click.option("--inject", type=int, default=0, show_default=True,
              help="Regeneration steps (below --switch) whose velocity blends in the source condition's.")
@click.option("--inject-weight", type=float, default=1.0, show_default=True, help="That blend's source weight.")
@click.option("--invert-solver", default=None, help="Solver of the inversion (default: --solver).")
@click.option("--invert-nfe", type=int, default=None, callback=count(MAX_NFE), help="Its calls (default: --nfe).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Edited image (.png, .jpg or .webp).")
@click.option("--npy", type=click.Path(dir_okay=False), default=None, help="Also save the edited states as .npy.")
def edit(model, image, solver, nfe, cfg_scale, cfg_interval, grid, null_file, backend, precision, source, target,
         strength, switch, inject, inject_weight, invert_solver, invert_nfe, out, npy) -> None:
    """Edit IMAGE: invert it under --source to t = strength, regenerate under --target, NFE calls each way.

    \b
    Example:
      anchorflow edit default --image three.png --source 3 --target 8 --nfe 10 --out eight.png
    """
    from ..base._io import check_image_path
    from ..editing import edit_image, write_image
    from .common import parse_interval

    check_image_path(out, "--out")
    m, null = _open(model, backend, precision, solver, [(out, "--out"), (npy, "--npy")], null_file)
    res = edit_image(m, image, source=source, target=target, solver=solver, nfe=nfe, invert_solver=invert_solver,
                     invert_nfe=invert_nfe, null_cond=null, strength=strength, switch=switch, inject=inject,
                     inject_weight=inject_weight, cfg_scale=cfg_scale, cfg_interval=parse_interval(cfg_interval),
                     grid=grid)
    write_image(res.x, out, npy, m.meta.get("data_range") or (-1.0, 1.0))
    click.echo(f"{solver}: {res.inversion.nfe} calls to invert + {res.regeneration.nfe} to regenerate "
               f"(strength {res.strength:g}, switch {res.switch:g}); wrote {out}" + (f" and {npy}" if npy else ""))
