"""`anchorflow demo`."""

from __future__ import annotations

import click

from .common import MAX_N, MAX_NFE, cfg_scale as cfg_check, count, seed as seed_check


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="anchorflow-demo", show_default=True,
              help="Folder for the results (created; files in it are replaced).")
@click.option("--nfe", type=int, default=6, show_default=True, callback=count(MAX_NFE),
              help="Backbone calls each few-step method gets.")
@click.option("--n", "n", type=int, default=30, show_default=True, callback=count(MAX_N), help="Samples per method.")
@click.option("--cfg", "cfg_scale", type=float, default=1.5, show_default=True, callback=cfg_check,
              help="Guidance scale (> 0; 1.0 = none).")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check, help="Seed of the start noise.")
@click.option("--backend", type=click.Choice(["auto", "ort-cpu", "ort-cuda", "ort-trt", "trt"]), default="auto",
              show_default=True, help="Execution backend (the demo is torch-free).")
def demo(out, nfe, n, cfg_scale, seed, backend) -> None:
    """Show what anchorflow does, on the bundled digits model (torch-free).

    Generates the same class-conditional batch with Euler, Heun, AB2, DPM-Solver++(2M) and the
    BA-solver at a few backbone calls, against a 256-call RK4 reference and Euler at 100 calls,
    and writes comparison.png, one grid per method, summary.md and summary.json to --out.
    """

    from ..base._io import check_output
    from ..demo import run_demo

    path = check_output(out, "--out", folder=True)
    run_demo(path, nfe=nfe, n=n, cfg_scale=cfg_scale, seed=seed, backend=backend, echo=click.echo)
    click.echo(f"results in {path.resolve()} (comparison.png: rows = methods, same noise and labels)")
