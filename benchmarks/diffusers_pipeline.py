"""anchorflow inside a diffusers pipeline: PSNR against a many-step reference, and transformer calls.

Everything runs inside a real ``StableDiffusion3Pipeline`` (no text encoders or VAE: random prompt
embeddings are given, ``output_type="latent"``), on the same noise, prompts and guidance:

- diffusers' default scheduler (FlowMatchEulerDiscreteScheduler) at N steps, on SD3's shift-3
  schedule and on the uniform one (sigmas linspace(1, 0, N + 1) given to the pipeline, shift 1);
  every method below steps on the same sigmas;
- ``AnchorflowScheduler`` with ab2, ipndm, dpmpp2m and unipc at N steps (same sigmas);
- ``run_ba`` with the model's SideNet at N calls (when the model has one);
- ``apply_fastflow`` on the default scheduler's T-step grid: the bandits learn over a stream of
  generations (fresh noise and prompts each), then run on the evaluation batch; compared with the
  default scheduler and ours at the calls FastFlow used (rounded).

Reference: the runtime's RK4 on the same transformer (``capture_pipeline``) with 128 steps of the
pipeline's own sigma schedule (512 calls); its own error is checked against RK4 with 64 steps.
PSNR uses the reference latents' own min..max. Transformer calls are counted by a hook on the
transformer, i.e. what the pipeline really ran (one call carries the cond and uncond rows).

The model: the SD3-architecture digits model (benchmarks/results/sd3_digits/model, with
``run_ba`` and its SideNet when one is there) or, until it lands, a random-init SD3 transformer, on
which PSNR measures how well each method integrates that model's ODE, not image quality.

    python benchmarks/diffusers_pipeline.py [--model auto|random|sd3-digits] [--batch 8] [--stream 40]
Writes benchmarks/results/diffusers_pipeline.json and diffusers_pipeline.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.hooks import HookRegistry, ModelHook
from tqdm import tqdm

from anchorflow.base._io import write_json, write_text
from anchorflow.integrations.diffusers import AnchorflowScheduler, apply_fastflow, capture_pipeline, run_ba
from anchorflow.runtime import solve
from anchorflow.runtime.evaluation.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
STEPS = (4, 6, 8, 10, 14, 20)
SOLVERS = ("ab2", "ipndm", "dpmpp2m", "unipc")
FASTFLOW_T = (20, 28)
GUIDANCE = {"random": (1.0, 4.0), "sd3-digits": (1.0, 1.5)}  # digits: the guidance of its own bench
# SD3's default schedule (FlowMatchEuler, shift 3) and the uniform one the digits model's own bench used
# (shift 1 with sigmas = linspace(1, 0, N + 1) given to the pipeline; diffusers' own shift-1 sigmas end
# at sigma_min = 0.001 with a last step of 0.001, one call spent on nothing)
SCHEDULES = ("shift 3", "uniform")


def steps(schedule: str, n: int) -> dict:
    """Pipeline arguments for n steps of ``schedule`` (the same sigmas for every method)."""
    if schedule == "uniform":
        return {"num_inference_steps": n, "sigmas": [float(v) for v in np.linspace(1.0, 0.0, n + 1)[:-1]]}
    return {"num_inference_steps": n}


TEXT_LEN, TEXT_DIM, POOLED = 8, 32, 16


SD3_DIGITS = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"  # the SD3 digits model, when it is there


class Setup:
    """The pipeline, how to make its inputs, and (for the digits model) its SideNet."""

    def __init__(self, model: str) -> None:
        self.sidenet = None
        if model == "auto":
            model = "sd3-digits" if (SD3_DIGITS / "transformer" / "config.json").exists() else "random"
        self.model = model
        if model == "sd3-digits":
            tr = SD3Transformer2DModel.from_pretrained(SD3_DIGITS / "transformer").eval()
            self.prompts = dict(np.load(SD3_DIGITS / "prompts.npz"))
            self.null = dict(np.load(SD3_DIGITS / "null_prompt.npz"))
            self.shape, self.pixels = (1, 8, 8), 64
            self.name = f"SD3Transformer2DModel trained on the digits ({SD3_DIGITS.relative_to(ROOT)})"
            if (SD3_DIGITS / "sidenet").exists():
                from anchorflow.trainers.adapters import load_source
                from anchorflow.trainers.sidenet import load_sidenet
                from anchorflow.trainers.torch_wrappers import TorchSideNet

                self.sidenet = TorchSideNet(load_sidenet(SD3_DIGITS / "sidenet", load_source(str(SD3_DIGITS / "transformer"))))
        else:
            torch.manual_seed(0)
            tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16,
                                       num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=64,
                                       pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=32).eval()
            self.shape, self.pixels = (4, 16, 16), 128
            self.name = ("random-init SD3Transformer2DModel (4 blocks, 4 heads x 16, 4x16x16 latents, patch 2; "
                         "the SD3 digits model is not there)")
        self.pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                             vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                             tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        self.pipe.set_progress_bar_config(disable=True)

    def prompts_for(self, batch: int, seed: int) -> dict:
        if self.model == "sd3-digits":
            y = np.arange(seed, seed + batch) % 10
            rows = {k: torch.from_numpy(v[y]) for k, v in self.prompts.items() if k != "y"}
            null = {k: torch.from_numpy(np.repeat(v, batch, axis=0)) for k, v in self.null.items()}
            return dict(prompt_embeds=rows["encoder_hidden_states"], pooled_prompt_embeds=rows["pooled_projections"],
                        negative_prompt_embeds=null["encoder_hidden_states"],
                        negative_pooled_prompt_embeds=null["pooled_projections"])
        g = torch.Generator().manual_seed(10_000 + seed)
        return dict(prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
                    pooled_prompt_embeds=torch.randn(batch, POOLED, generator=g),
                    negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(batch, POOLED, generator=g))

    def inputs(self, batch: int, seed: int, cfg: float, steps: int) -> dict:
        noise = torch.randn(batch, *self.shape, generator=torch.Generator().manual_seed(seed))  # same for every method
        return dict(**self.prompts_for(batch, seed), guidance_scale=cfg, num_inference_steps=steps,
                    height=self.pixels, width=self.pixels, output_type="latent", latents=noise)


class Count(ModelHook):
    """Counts the transformer's real forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def run(pipe, count: Count, scheduler, kw: dict) -> tuple[np.ndarray, int]:
    """The pipeline's latents (float32) and the transformer calls it made."""
    default = pipe.scheduler
    pipe.scheduler = scheduler or default
    before = count.calls
    try:
        x = pipe(**kw).images.float().numpy()
    finally:
        pipe.scheduler = default
    return x, count.calls - before


def reference(pipe, kw: dict, schedule: str) -> tuple[np.ndarray, float]:
    """RK4 with 128 steps of the pipeline's schedule, and its PSNR against RK4 with 64 steps."""
    outs = []
    for n in (128, 64):
        f = capture_pipeline(pipe, **{**kw, **steps(schedule, n)})
        outs.append(solve("rk4", f.velocity, f.noise, 4 * n, **f.solve_kwargs()).x)
    return outs[0], psnr(outs[1], outs[0], (outs[0].min(), outs[0].max()))


def fastflow_rows(setup: Setup, count: Count, kw_eval: dict, ref: np.ndarray, span, cfg: float, batch: int,
                  stream: int, schedule: str) -> list[dict]:
    pipe, rows = setup.pipe, []
    for T in FASTFLOW_T:
        hook = apply_fastflow(pipe, model_id=f"{setup.model}-sd3|{schedule}|cfg {cfg}")
        try:
            for g in tqdm(range(stream), desc=f"FastFlow T={T} cfg {cfg} learning", leave=False):
                run(pipe, count, None, {**setup.inputs(batch, 1000 + g, cfg, T), **steps(schedule, T)})
            x, calls = run(pipe, count, None, {**kw_eval, **steps(schedule, T)})
        finally:
            hook.remove()
        settled = [h["transformer_calls"] for h in hook.history[-10:-1]]
        rows.append({"method": f"fastflow (T={T})", "steps": T, "calls": calls, "psnr": psnr(x, ref, span),
                     "stream_calls_last10": settled, "mu": hook.history[-1]["mu"]})
        n = max(2, int(round(calls)))
        for name, sched in [("diffusers default (Euler)", None)] + [
                (s, AnchorflowScheduler.from_config(pipe.scheduler.config, solver=s)) for s in SOLVERS]:
            x, c = run(pipe, count, sched, {**kw_eval, **steps(schedule, n)})
            rows.append({"method": f"{name} at FastFlow's calls", "steps": n, "calls": c, "psnr": psnr(x, ref, span)})
    return rows


def ba_rows(setup: Setup, count: Count, kw: dict, ref: np.ndarray, span, schedule: str) -> list[dict]:
    """run_ba with the model's SideNet at each N (exactly N transformer calls)."""
    rows = []
    for n in STEPS:
        before = count.calls
        args = {k: v for k, v in {**kw, **steps(schedule, n)}.items() if k != "num_inference_steps"}
        out = run_ba(setup.pipe, setup.sidenet, n, **args)
        rows.append({"method": "ba (run_ba)", "steps": n, "calls": count.calls - before,
                     "psnr": psnr(out.images.float().numpy(), ref, span)})
    return rows


def bench(setup: Setup, batch: int, stream: int) -> dict:
    pipe = setup.pipe
    count = Count()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(count, "count")
    results = []
    for schedule in SCHEDULES:  # every method steps on these sigmas
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if schedule == "shift 3" else 1.0)
        for cfg in GUIDANCE[setup.model]:
            results.append(one_setting(setup, count, batch, stream, schedule, cfg))
    return {"results": results, "batch": batch, "stream": stream}


def one_setting(setup: Setup, count: Count, batch: int, stream: int, schedule: str, cfg: float) -> dict:
    """Every method at one schedule and guidance scale, on the same noise and prompts."""
    pipe = setup.pipe
    kw = setup.inputs(batch, 0, cfg, 8)
    ref, ref_check = reference(pipe, kw, schedule)
    span = (float(ref.min()), float(ref.max()))
    rows = []
    for n in tqdm(STEPS, desc=f"schedulers {schedule} cfg {cfg}", leave=False):
        for name, sched in [("diffusers default (Euler)", None)] + [
                (s, AnchorflowScheduler.from_config(pipe.scheduler.config, solver=s)) for s in SOLVERS]:
            x, c = run(pipe, count, sched, {**kw, **steps(schedule, n)})
            rows.append({"method": name, "steps": n, "calls": c, "psnr": psnr(x, ref, span)})
    if setup.sidenet is not None:
        rows += ba_rows(setup, count, kw, ref, span, schedule)
    rows += fastflow_rows(setup, count, kw, ref, span, cfg, batch, stream, schedule)
    return {"schedule": schedule, "guidance": cfg, "reference_self_psnr": ref_check, "rows": rows}


def markdown(rep: dict) -> str:
    lines = ["# anchorflow inside a diffusers StableDiffusion3Pipeline\n",
             f"Command: `{rep['command']}` ({rep['seconds']:.0f} s; load before: {rep['load']}). "
             f"Model: {rep['model']}. Batch {rep['batch']}; FastFlow learned over {rep['stream']} generations "
             "(fresh noise and prompts) before the evaluation batch. PSNR (dB) against RK4 with 128 steps "
             "(512 calls) of the pipeline's schedule; calls = transformer forward calls the pipeline made "
             "(one call carries the cond and uncond rows).\n"]
    for r in rep["results"]:
        lines.append(f"\n## {r.get('schedule', 'shift 3')} schedule, guidance {r['guidance']:g} "
                     f"(reference vs RK4-64: {r['reference_self_psnr']:.1f} dB)\n")
        methods = ["diffusers default (Euler)", *SOLVERS, "ba (run_ba)"]
        lines.append("| scheduler | " + " | ".join(f"{n} calls" for n in STEPS) + " |")
        lines.append("|---|" + "---:|" * len(STEPS))
        for m in methods:
            cells = [f"{x['psnr']:.1f}" for n in STEPS for x in r["rows"] if x["method"] == m and x["steps"] == n]
            if cells:
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("\n| FastFlow and the schedulers at its calls | steps | calls | PSNR |")
        lines.append("|---|---:|---:|---:|")
        for x in r["rows"]:
            if "FastFlow" in x["method"] or x["method"].startswith("fastflow"):
                lines.append(f"| {x['method']} | {x['steps']} | {x['calls']} | {x['psnr']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stream", type=int, default=40, help="generations FastFlow learns over before evaluation")
    ap.add_argument("--model", choices=["auto", "random", "sd3-digits"], default="auto",
                    help="auto: the SD3 digits model when benchmarks/results/sd3_digits/model exists")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} cores)"
    start = time.time()
    setup = Setup(args.model)
    rep = bench(setup, args.batch, args.stream)
    rep.update(command="python " + " ".join(sys.argv), seconds=time.time() - start, load=load,
               model=setup.name, torch=torch.__version__, machine=platform.machine())
    write_json(args.out / "diffusers_pipeline.json", rep)
    write_text(args.out / "diffusers_pipeline.md", markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
