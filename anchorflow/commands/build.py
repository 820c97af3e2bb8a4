"""`anchorflow build`: TensorRT engines for a bundle, cached inside it."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..runtime.solving.solvers import rows_note
from .common import PRECISIONS


@click.command("build")
@click.argument("bundle")
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Engine precision; repeat for several. fp16/bf16 use the bundle's reduced-precision ONNX "
                   "variants (strongly typed: the precision comes from the graph). Default: fp32.")
@click.option("--workspace-mb", type=int, default=None,
              help="Builder workspace limit in MiB (default: TensorRT's, i.e. the GPU's memory).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimisation level: higher searches more tactics (slower build, maybe faster engine).")
@click.option("--min-batch", type=int, default=None, help="Smallest samples per solve the engines accept (default: from bundle.json).")
@click.option("--opt-batch", type=int, default=None, help="Samples per solve the engines are tuned for (default: from bundle.json).")
@click.option("--max-batch", type=int, default=None,
              help="Largest samples per solve (default: bundle.json's row ranges as exported). Rows per call: "
                   f"{rows_note()}; the profiles account for both.")
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine is cached.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tactic timing cache to load and update (default: one per TensorRT version and GPU in the bundle).")
@click.option("--tf32", is_flag=True,
              help="Let fp32 MatMul/Gemm run in TF32 (faster on Ampere+, ~5e-4 relative error: fails verify's 1e-4 "
                   "fp32 tolerance). Off by default; part of the cache key.")
@click.option("--no-progress", is_flag=True, help="Do not show the builder's progress bars (Ctrl-C still cancels).")
@click.option("--refittable", is_flag=True,
              help="Build engines whose weights can be swapped later (BuilderFlag.REFIT; for LoRAs: `anchorflow refit`, "
                   "then `build --refit`). Part of the cache key.")
@click.option("--strip-weights", is_flag=True,
              help="With --refittable: a weight-stripped plan (STRIP_PLAN), filled from the bundle's ONNX on load.")
@click.option("--refit", is_flag=True,
              help="Refit the newest cached refittable engine with the bundle's current weights instead of "
                   "building (seconds, not minutes); the result is cached under its own key.")
def build(bundle: str, precisions: tuple[str, ...], workspace_mb: int | None, opt_level: int,
          min_batch: int | None, opt_batch: int | None, max_batch: int | None, force: bool,
          timing_cache: Path | None, tf32: bool, no_progress: bool, refittable: bool, strip_weights: bool,
          refit: bool) -> None:
    """Build TensorRT engines for BUNDLE: `default`, a bundle folder or a model root with bundle/ inside.

    One engine per network (backbone, SideNet) and precision, with one optimisation profile
    that covers the solver's calls for the batch range. Engines go to BUNDLE/engines/trt/ with
    a manifest; a cached engine is reused when its key (ONNX sha256, precision, profile,
    builder options, TensorRT version, GPU) matches. Engines are not portable: build on the
    machine (TensorRT version and GPU model) that runs them; `anchorflow sample --backend trt`
    then uses them. Ctrl-C cancels a build cleanly. Needs an NVIDIA GPU and
    `pip install 'anchorflow[trt-cu12]'` (any CUDA 12 or 13 driver) or `'anchorflow[trt-cu13]'`
    (CUDA 13 drivers); see docs/tensorrt.md.
    """
    from anchorflow.base._deps import require
    from anchorflow.engines.build import BuildOptions, build_engines

    batch = {k: v for k, v in (("min", min_batch), ("opt", opt_batch), ("max", max_batch)) if v is not None}
    options = BuildOptions(precisions=precisions or ("fp32",), workspace_mb=workspace_mb, opt_level=opt_level,
                           batch=batch, force=force, timing_cache=timing_cache, progress=not no_progress,
                           tf32=tf32, refittable=refittable, strip_weights=strip_weights, refit=refit)
    require("tensorrt", extra="trt", purpose="building TensorRT engines")  # after the options' own checks
    from anchorflow.base.errors import CheckpointError
    from anchorflow.modelref import locate

    folder = locate(bundle).bundle
    if folder is None:
        raise CheckpointError(f"{bundle} has no exported bundle; create one with `anchorflow export {bundle} --out BUNDLE`")
    start = time.perf_counter()
    records = build_engines(folder, options, echo=click.echo)
    built = sum(not r.cached for r in records)
    click.echo(f"{len(records)} engine(s), {built} built, {len(records) - built} cached, "
               f"{time.perf_counter() - start:.1f} s total")
