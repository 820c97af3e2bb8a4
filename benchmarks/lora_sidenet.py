"""A LoRA on the SD3-on-digits model: what a refit costs, and whether the SideNet survives it.

1. **A LoRA trained here** (PEFT, rank ``--rank`` on every attention and feed-forward projection of
   the frozen SD3 transformer in benchmarks/results/sd3_digits/model): a "style" the base model never
   saw, mirrored digits (each training image flipped left-right, the same class prompts, 10 % empty
   prompts), flow matching in anchorflow's convention (x_t = (1-t) x + t eps, t = 1 noise, target
   eps - x, timestep 1000 t). Saved as diffusers saves it (``save_lora_weights`` with its metadata).
2. **Refit vs re-export**: the base model is exported once with its SideNet (``anchorflow export``);
   then ``anchorflow refit BASE --lora L.safetensors --out REFIT`` against ``anchorflow export`` of the
   transformer with the LoRA fused by diffusers (the re-export a user would otherwise run). Wall time
   of each command and the disk blocks each adds (hard-linked files counted once). Parity: the refit
   bundle's backbone on onnxruntime against diffusers' fused model in torch (max abs, random inputs).
3. **Does the SideNet survive?** On the LoRA model (fused, torch through the adapter), against the
   LoRA model's own RK4 reference (``--ref`` calls, float64 state), same noise and prompts for every
   method: BA with the base SideNet, AB2 (no SideNet), and BA with the base SideNet fine-tuned for the
   LoRA model by ``anchorflow train sidenet --init`` for ``--ft-iters`` iterations (time recorded),
   at 5 and 10 calls, guidance 1.0 and 1.5. The base model's own figures are in
   benchmarks/results/sd3_digits/bench.md (same noise, prompts and reference settings).

    python benchmarks/lora_sidenet.py [--lora-steps 300] [--rank 8] [--ft-iters 40] [--n 64] [--ref 256]

Writes benchmarks/results/lora_digits/result.json and result.md (the command and load average in
both); the trained LoRA and the fine-tuned SideNet stay in benchmarks/results/lora_digits/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"
OUT = ROOT / "benchmarks" / "results" / "lora_digits"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
CFGS = (1.0, 1.5)
NFES = (5, 10)


def _cli(*args: str) -> float:
    """Run ``anchorflow ARGS`` in a child process (as a user would); returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anchorflow", *args], cwd=ROOT, check=True)
    return round(time.perf_counter() - start, 1)


def _rel(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results files stay portable)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _blocks(*folders: Path) -> int:
    """Bytes on disk of the files under ``folders``, each inode counted once (hard links share)."""
    seen, total = set(), 0
    for folder in folders:
        for p in folder.rglob("*"):
            st = p.lstat()
            if p.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _prompts() -> tuple[dict, dict]:
    def read(name):
        with np.load(MODEL / name) as z:
            return {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    return read("prompts.npz"), read("null_prompt.npz")


def train_lora(args: argparse.Namespace, out: Path) -> dict:
    """Train the mirrored-digits LoRA; writes OUT/lora/pytorch_lora_weights.safetensors."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from tqdm.auto import tqdm

    from anchorflow.trainers.data import load_dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tr = SD3Transformer2DModel.from_pretrained(str(MODEL / "transformer")).requires_grad_(False)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS)
    tr.add_adapter(cfg)
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lora_lr)
    x_all, y_all = (torch.from_numpy(a) for a in load_dataset("digits", "train", seed=0))
    x_all = x_all.flip(-1)  # the style: mirrored digits
    prompts, null = _prompts()
    ehs = torch.from_numpy(np.concatenate([prompts["encoder_hidden_states"], null["encoder_hidden_states"]]))
    pooled = torch.from_numpy(np.concatenate([prompts["pooled_projections"], null["pooled_projections"]]))
    gen, log, window, start = torch.Generator().manual_seed(args.seed), [], [], time.perf_counter()
    for step in tqdm(range(args.lora_steps), desc="train LoRA (mirrored digits)", dynamic_ncols=True, mininterval=10):
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(args.batch, generator=gen) < 0.1, torch.full_like(y, 10), y)
        t = torch.rand(args.batch, generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
        v = tr(x_t, ehs[y], pooled[y], 1000.0 * t, return_dict=False)[0]
        loss = torch.mean((v - (eps - x)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log.append([step + 1, round(sum(window) / len(window), 5)])
            window = []
    folder = out / "lora"
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(tr),
                                               transformer_lora_adapter_metadata=cfg.to_dict())
    n_lora = sum(p.numel() for p in params)
    return {"file": _rel(folder / "pytorch_lora_weights.safetensors"), "rank": args.rank,
            "targets": TARGETS, "params": n_lora, "steps": args.lora_steps, "lr": args.lora_lr,
            "wall_s": round(time.perf_counter() - start, 1), "loss_log": log}


def fused_transformer(lora: Path, out: Path) -> Path:
    """The transformer with the LoRA fused by diffusers (``fuse_lora``), saved to ``out``."""
    from diffusers import SD3Transformer2DModel

    tr = SD3Transformer2DModel.from_pretrained(str(MODEL / "transformer"))
    tr.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix="transformer", adapter_name="style")
    tr.fuse_lora(lora_scale=1.0)
    tr.unload_lora()
    tr.save_pretrained(str(out))
    return out


def refit_vs_export(lora: Path, fused: Path, work: Path) -> dict:
    base, refit, reexport = work / "base", work / "refit", work / "reexport"
    common = ["--max-batch", "16"]
    t_base = _cli("export", str(MODEL / "transformer"), "--sidenet", str(MODEL / "sidenet"), "--out", str(base), *common)
    t_refit = _cli("refit", str(base), "--lora", str(lora), "--out", str(refit))
    t_export = _cli("export", str(fused), "--out", str(reexport), *common)
    return {"export_base_s": t_base, "refit_s": t_refit, "reexport_s": t_export,
            "base_bytes": _blocks(base), "refit_added_bytes": _blocks(base, refit) - _blocks(base),
            "reexport_bytes": _blocks(reexport), "parity_max_abs": parity(refit, fused)}


def parity(bundle: Path, fused: Path) -> float:
    """Max abs of the refit bundle's backbone (onnxruntime) against the fused torch transformer."""
    from anchorflow.runtime.bundles.load import load_bundle
    from anchorflow.trainers.adapters import load_source

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    t = np.array([0.95, 0.6, 0.3, 0.05], np.float32)
    prompts, _ = _prompts()
    cond = {k: v[[1, 3, 5, 7]] for k, v in prompts.items()}
    ort = load_bundle(str(bundle), backend="ort-cpu").velocity(x, t, cond)
    ref = load_source(str(fused)).call_numpy(x, t, cond)
    return float(np.abs(np.asarray(ort) - ref).max())


def fine_tune(args: argparse.Namespace, fused: Path, out: Path) -> dict:
    from sd3_digits_bench import cond_files  # the class prompts without y, as the base SideNet's run wrote them

    cond, _ = cond_files(MODEL)
    base_cfg = json.loads((MODEL / "sidenet" / "config.json").read_text())["training"]
    st = base_cfg["settings"]
    side = out / "sidenet_ft"
    shutil.rmtree(side, ignore_errors=True)
    cmd = ["train", "sidenet", "--backbone", str(fused), "--init", str(MODEL / "sidenet"), "--out", str(side),
           "--data", "none", "--cond", str(cond), "--null-cond", str(MODEL / "null_prompt.npz"),
           "--iters", str(args.ft_iters), "--batch", str(st["batch"]), "--lr", str(args.ft_lr),
           "--rate", ",".join(f"{r:g}" for r in st["rates"]), "--start-states", str(args.start_states),
           "--solve-steps", str(args.solve_steps), "--threads", str(args.threads), "--cache-dir", str(out / ".cache"),
           "--ckpt-every", str(args.ft_iters)]
    wall = _cli(*cmd)
    return {"folder": _rel(side), "iters": args.ft_iters, "lr": args.ft_lr, "wall_s": wall,
            "base_iters": base_cfg.get("step"), "base_wall_s": base_cfg.get("wall_s"),
            "command": shlex.join(["anchorflow", *cmd]).replace(str(ROOT) + "/", "")}


def evaluate(args: argparse.Namespace, fused: Path, side_ft: Path) -> list[dict]:
    import torch

    from anchorflow.runtime.evaluation import metrics as M
    from anchorflow.runtime import solve
    from anchorflow.trainers.adapters import load_source
    from anchorflow.trainers.sidenet import load_sidenet
    from anchorflow.trainers.torch_wrappers import TorchSideNet

    torch.set_num_threads(args.threads)
    adapter = load_source(str(fused))
    velocity = adapter.call_numpy

    def v64(x, t, cond):
        return velocity(np.asarray(x, np.float32), np.asarray(t, np.float32), cond).astype(np.float64)

    prompts, null = _prompts()
    labels = np.arange(args.n) % 10
    cond = {k: v[labels] for k, v in prompts.items()}
    noise = np.random.default_rng(args.seed).standard_normal((args.n, 1, 8, 8)).astype(np.float32)
    from anchorflow.trainers.checkpoint import load_checkpoint

    base_side, _ = load_checkpoint(MODEL / "sidenet", kind="sidenet")  # trained for the base weights, on purpose
    sides = {"ba (base SideNet)": TorchSideNet(base_side),
             f"ba (SideNet fine-tuned {args.ft_iters} it)": TorchSideNet(load_sidenet(side_ft, adapter))}
    rows = []
    for cfg in CFGS:
        common = dict(cond=cond, null_cond=null, cfg_scale=cfg)
        ref = solve("rk4", v64, noise.astype(np.float64), args.ref, **common).x
        chk = solve("rk4", v64, noise.astype(np.float64), args.ref // 2, **common).x
        print(f"cfg {cfg}: RK4-{args.ref} self-check {M.psnr(chk, ref, (-1, 1)):.1f} dB", flush=True)
        for nfe in NFES:
            runs = {name: solve("ba", velocity, noise, nfe, sidenet=s, **common) for name, s in sides.items()}
            runs["ab2 (no SideNet)"] = solve("ab2", velocity, noise, nfe, **common)
            for name, res in runs.items():
                p = M.psnr(res.x, ref, (-1, 1))
                rows.append({"cfg": cfg, "nfe": nfe, "method": name, "backbone_calls": res.nfe, "psnr": round(p, 2),
                             "reference_self_check_psnr": round(M.psnr(chk, ref, (-1, 1)), 1)})
                print(f"cfg {cfg} nfe {nfe} {name}: {p:.2f} dB ({res.nfe} calls)", flush=True)
    return rows


def markdown(r: dict) -> str:
    rv = r["refit"]
    mb = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    lines = ["# LoRA on the SD3-on-digits model (benchmarks/lora_sidenet.py)", "",
             f"Command: `{r['command']}`  ", f"Load average: {r['loadavg']}", "",
             f"LoRA: mirrored digits, rank {r['lora']['rank']}, {r['lora']['params']} parameters, "
             f"{r['lora']['steps']} steps in {r['lora']['wall_s']} s (loss {r['lora']['loss_log'][0][1]} -> "
             f"{r['lora']['loss_log'][-1][1]}).", "",
             "## Refit against a re-export", "",
             "| | wall (s) | disk added |", "|---|---:|---:|",
             f"| `anchorflow refit` (base bundle + LoRA) | {rv['refit_s']} | {mb(rv['refit_added_bytes'])} |",
             f"| `anchorflow export` of the fused transformer | {rv['reexport_s']} | {mb(rv['reexport_bytes'])} |", "",
             f"Base bundle: {mb(rv['base_bytes'])}, exported in {rv['export_base_s']} s. Refit parity against "
             f"diffusers' fused model (torch): max abs {rv['parity_max_abs']:.2e} (export's fp32 bound 1e-4).", "",
             "## BA after the LoRA: PSNR (dB) against the LoRA model's RK4 reference", "",
             "| guidance | NFE | method | PSNR |", "|---:|---:|---|---:|"]
    lines += [f"| {x['cfg']} | {x['nfe']} | {x['method']} | {x['psnr']:.2f} |" for x in r["rows"]]
    ft = r["fine_tune"]
    lines += ["", f"Fine-tuning: {ft['iters']} iterations in {ft['wall_s']} s (the base SideNet: "
                  f"{ft['base_iters']} iterations, {ft['base_wall_s']} s). Command: `{ft['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora-steps", type=int, default=300)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ft-iters", type=int, default=40)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--start-states", type=int, default=512)
    ap.add_argument("--solve-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--ref", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--reuse", action="store_true", help="evaluate only, from result.partial.json of an earlier run")
    args = ap.parse_args()
    from anchorflow.base import _io

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join(["python", *sys.argv]).replace(str(ROOT) + "/", ""),
              "loadavg": os.getloadavg()}
    prev = out / "result.partial.json"
    if args.reuse and prev.exists():  # the LoRA, refit figures and fine-tuned SideNet of an earlier run
        result.update({k: v for k, v in _io.read_json(prev).items() if k in ("lora", "refit", "fine_tune")})
        fused = out / "transformer_lora"
        result["rows"] = evaluate(args, fused, ROOT / result["fine_tune"]["folder"])
        return _finish(out, result, _io)
    result["lora"] = train_lora(args, out)
    lora = ROOT / result["lora"]["file"]
    with tempfile.TemporaryDirectory() as tmp:
        fused = fused_transformer(lora, out / "transformer_lora")
        result["refit"] = refit_vs_export(lora, fused, Path(tmp))
    result["fine_tune"] = fine_tune(args, fused, out)
    _io.write_json(prev, result)
    result["rows"] = evaluate(args, fused, ROOT / result["fine_tune"]["folder"])
    _finish(out, result, _io)


def _finish(out: Path, result: dict, _io) -> None:
    result["loadavg_end"] = os.getloadavg()
    _io.write_json(out / "result.json", result)
    _io.write_text(out / "result.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
