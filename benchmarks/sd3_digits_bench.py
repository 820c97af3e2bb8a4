"""A real architecture on real data: the SD3-architecture digits model and its data-free SideNet.

1. ``--train-sidenet``: ``anchorflow train sidenet --backbone MODEL/transformer --data none
   --cond MODEL/cond_train.npz --null-cond MODEL/null_prompt.npz`` in a child process (data-free:
   start states from the backbone's own many-step solves of the 10 class prompts; 10 % empty-
   prompt rows). The SideNet is conditioned on the pooled prompt vector (``--sidenet-cond auto``).
2. Evaluation through the runtime (``anchorflow.runtime.solve``, conditions as the cond dict,
   the empty prompt as null_cond): ``--n`` samples (class i % 10, prompts as conditions), the
   same noise for every method, guidance 1.0 and 1.5; reference RK4 with ``--ref`` calls (float64
   state), self-checked against half as many calls. Per method and NFE: PSNR against the
   reference, the bundled digits classifier's accuracy on the asked class, backbone and SideNet
   calls counted by the runtime, and for BA the SideNet's share of time per BA interval. An
   Euler ladder gives the Euler NFE that reaches each PSNR. Time: t = 1 noise, t = 0 data.

The backbone and the SideNet run in torch through the adapter (``trainers/adapters``) and
:class:`~anchorflow.trainers.torch_wrappers.TorchSideNet`; with ``--bundle DIR`` (an exported
bundle) they run on onnxruntime instead.

    python benchmarks/sd3_digits_bench.py [--train-sidenet] [--iters 400] [--rate 50,5] [--n 64] [--ref 256]

Writes benchmarks/results/sd3_digits/bench.json and bench.md.

``--variants DIR...``: BA only, at ``--variant-nfes`` (same noise, prompts and reference as the
full run), for other SideNet checkpoints of the same backbone (offset rates, iterations, body
patch), each with its training settings and the Euler NFE matching it (the Euler ladder is
recomputed here, Euler's settings unchanged); writes ``sidenet_variants.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"
OUT = ROOT / "benchmarks" / "results" / "sd3_digits"
METHODS = ("ba", "euler", "ab2", "dpmpp2m")
NFES = (3, 4, 5, 6, 7, 8, 10)
LADDER = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100)
CFGS = (1.0, 1.5)


def cond_files(model: Path) -> tuple[Path, Path]:
    """MODEL/cond_train.npz (the class prompts without the ``y`` column) and MODEL/null_prompt.npz."""
    with np.load(model / "prompts.npz") as z:
        cond = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    buf = io.BytesIO()
    np.savez(buf, **cond)
    _io.write_bytes(model / "cond_train.npz", buf.getvalue())
    return model / "cond_train.npz", model / "null_prompt.npz"


def train_sidenet(args: argparse.Namespace, model: Path) -> dict:
    cond, null = cond_files(model)
    cmd = [sys.executable, "-m", "anchorflow", "train", "sidenet", "--backbone", str(model / "transformer"),
           "--out", str(model / "sidenet"), "--data", "none", "--cond", str(cond), "--null-cond", str(null),
           "--iters", str(args.iters), "--batch", str(args.batch), "--lr", str(args.lr), "--rate", args.rate,
           "--start-states", str(args.start_states), "--solve-steps", str(args.solve_steps),
           "--threads", str(args.threads), "--cache-dir", str(model / ".cache")]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return {"command": shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", ""),
            "wall_s": round(time.perf_counter() - start, 1)}


def open_nets(model: Path):
    """(velocity, sidenet) callables for the runtime: torch through the adapter, the SideNet checkpoint."""
    import torch

    from anchorflow.trainers.adapters import load_source
    from anchorflow.trainers.sidenet import load_sidenet
    from anchorflow.trainers.torch_wrappers import TorchSideNet

    torch.set_num_threads(1)
    adapter = load_source(str(model / "transformer"))
    side = load_sidenet(model / "sidenet", adapter)
    return adapter.call_numpy, TorchSideNet(side)


def f64(velocity):
    def v(x, t, cond):
        return velocity(np.asarray(x, np.float32), np.asarray(t, np.float32), cond).astype(np.float64)

    return v


def classifier():
    from anchorflow.runtime.evaluation.classifier import Classifier

    return Classifier(ROOT / "anchorflow" / "bundled" / "digits" / "classifier")


def evaluate(args: argparse.Namespace, model: Path) -> dict:
    from anchorflow.bench import euler_nfe_to_match
    from anchorflow.runtime.evaluation import metrics as M
    from anchorflow.runtime import solve

    velocity, sidenet = open_nets(model)
    with np.load(model / "prompts.npz") as z:
        prompts = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    with np.load(model / "null_prompt.npz") as z:
        null = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    labels = np.arange(args.n) % 10
    cond = {k: v[labels] for k, v in prompts.items()}
    noise = np.random.default_rng(args.seed).standard_normal((args.n, 1, 8, 8)).astype(np.float32)
    clf, rng_ = classifier(), (-1.0, 1.0)
    acc = lambda x: M.class_accuracy(clf.outputs(x)[0], labels)  # noqa: E731
    rows, refs = [], {}
    for cfg in CFGS:
        common = dict(cond=cond, null_cond=null, cfg_scale=cfg)
        ref = solve("rk4", f64(velocity), noise.astype(np.float64), args.ref, **common).x
        chk = solve("rk4", f64(velocity), noise.astype(np.float64), args.ref // 2, **common).x
        refs[cfg] = {"method": f"rk4:{args.ref}", "self_check_psnr": M.psnr(chk, ref, rng_), "accuracy": acc(ref)}
        print(f"cfg {cfg}: reference RK4-{args.ref}, self-check {refs[cfg]['self_check_psnr']:.1f} dB, "
              f"accuracy {refs[cfg]['accuracy']:.3f}", flush=True)
        ladder = []
        for nfe in LADDER:
            x = solve("euler", velocity, noise, nfe, **common).x
            ladder.append((nfe, M.psnr(x, ref, rng_)))
        for method in METHODS:
            for nfe in NFES:
                res = solve(method, velocity, noise, nfe, sidenet=sidenet if method == "ba" else None, **common)
                p = M.psnr(res.x, ref, rng_)
                tm = res.timing
                row = {"cfg": cfg, "method": method, "nfe": nfe, "backbone_calls": res.nfe,
                       "sidenet_calls": res.sidenet_calls, "psnr": round(p, 2), "accuracy": acc(res.x),
                       "euler_nfe_equivalent": euler_nfe_to_match(ladder, p)["nfe"]}
                if method == "ba":
                    row["sidenet_over_backbone_time"] = round(tm.sidenet_s / tm.backbone_s, 4)
                rows.append(row)
                print(f"cfg {cfg} {method:8s} nfe {nfe:2d}: {p:5.1f} dB, acc {row['accuracy']:.3f}, "
                      f"calls {res.nfe}", flush=True)
        rows += [{"cfg": cfg, "method": "euler-ladder", "nfe": k, "psnr": round(p, 2)} for k, p in ladder]
    return {"reference": refs, "rows": rows}


def _setup(model: Path):
    with np.load(model / "prompts.npz") as z:
        prompts = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    with np.load(model / "null_prompt.npz") as z:
        null = {k: z[k] for k in ("encoder_hidden_states", "pooled_projections")}
    return prompts, null


def variants(args: argparse.Namespace, model: Path) -> dict:
    """BA PSNR at ``--variant-nfes`` for each SideNet checkpoint in ``--variants`` (see the docstring)."""
    from anchorflow.bench import euler_nfe_to_match
    from anchorflow.runtime.evaluation import metrics as M
    from anchorflow.runtime import solve
    from anchorflow.trainers.sidenet import load_sidenet
    from anchorflow.trainers.torch_wrappers import TorchSideNet

    import torch

    from anchorflow.trainers.adapters import load_source

    torch.set_num_threads(1)
    adapter = load_source(str(model / "transformer"))
    velocity = adapter.call_numpy
    prompts, null = _setup(model)
    labels = np.arange(args.n) % 10
    cond = {k: v[labels] for k, v in prompts.items()}
    noise = np.random.default_rng(args.seed).standard_normal((args.n, 1, 8, 8)).astype(np.float32)
    nfes = [int(k) for k in args.variant_nfes.split(",")]
    sides = {d: load_sidenet(d, adapter) for d in args.variants}
    rows = []
    for cfg in CFGS:
        common = dict(cond=cond, null_cond=null, cfg_scale=cfg)
        ref = solve("rk4", f64(velocity), noise.astype(np.float64), args.ref, **common).x
        ladder = [(k, M.psnr(solve("euler", velocity, noise, k, **common).x, ref, (-1, 1))) for k in LADDER]
        for d, side in sides.items():
            c = side.checkpoint_config
            st = c["training"]["settings"]
            for nfe in nfes:
                p = M.psnr(solve("ba", velocity, noise, nfe, sidenet=TorchSideNet(side), **common).x, ref, (-1, 1))
                rows.append({"sidenet": os.path.relpath(d, ROOT), "cfg": cfg, "nfe": nfe, "psnr": round(p, 2),
                             "euler_nfe_equivalent": euler_nfe_to_match(ladder, p)["nfe"], "rates": st["rates"],
                             "iters": c["training"]["step"], "lr": st["lr"], "patch": c["arch"].get("patch"),
                             "final_loss": c["training"]["final_loss"], "command": c["training"]["command"]})
                print(f"cfg {cfg} {d}: nfe {nfe} {p:.2f} dB", flush=True)
        rows += [{"cfg": cfg, "method": "euler-ladder", "nfe": k, "psnr": round(p, 2)} for k, p in ladder]
    return {"rows": rows}


def variants_markdown(result: dict) -> str:
    lines = ["# SideNet variants for the SD3 digits model: BA PSNR (dB) vs RK4 reference "
             "(benchmarks/sd3_digits_bench.py --variants)", "", f"Command: `{result['command']}`  ",
             f"Load average: {result['loadavg']}", "",
             "| SideNet | rates | iters | patch | guidance | NFE | PSNR | Euler NFE matching |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "sidenet" in r:
            eq = "-" if r["euler_nfe_equivalent"] is None else f"{r['euler_nfe_equivalent']:.1f}"
            lines.append(f"| {r['sidenet']} | {','.join(f'{x:g}' for x in r['rates'])} | {r['iters']} | {r['patch']} | "
                         f"{r['cfg']} | {r['nfe']} | {r['psnr']:.2f} | {eq} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    lines = ["# SD3-architecture digits model, data-free SideNet (benchmarks/sd3_digits_bench.py)", "",
             f"Command: `{result['command']}`  ", f"Load average: {result['loadavg']}", ""]
    for cfg in CFGS:
        lines += [f"## guidance {cfg}: PSNR (dB) vs RK4 reference [classifier accuracy]", "",
                  "| method | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---:|" * len(NFES)]
        for m in METHODS:
            cells = [next(r for r in result["rows"] if r["cfg"] == cfg and r["method"] == m and r["nfe"] == k)
                     for k in NFES]
            lines.append(f"| {m} | " + " | ".join(f"{c['psnr']:.1f} [{100 * c['accuracy']:.0f}%]" for c in cells) + " |")
        ladder = [r for r in result["rows"] if r["cfg"] == cfg and r["method"] == "euler-ladder"]
        lines += ["", "Euler ladder: " + ", ".join(f"{r['nfe']}: {r['psnr']:.1f}" for r in ladder), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--train-sidenet", action="store_true")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rate", default="50,5")
    ap.add_argument("--start-states", type=int, default=1024)
    ap.add_argument("--solve-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--ref", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--variants", nargs="+", default=None, help="SideNet checkpoint folders: BA only (see docstring)")
    ap.add_argument("--variant-nfes", default="5,10")
    args = ap.parse_args()
    model = Path(args.model)
    result = {"command": shlex.join(["python", *sys.argv]), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    if args.variants:
        result.update(variants(args, model))
        result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        _io.write_json(Path(args.out) / "sidenet_variants.json", result)
        _io.write_text(Path(args.out) / "sidenet_variants.md", variants_markdown(result))
        print((Path(args.out) / "sidenet_variants.md").read_text())
        return
    if args.train_sidenet:
        result["sidenet_training"] = train_sidenet(args, model)
    result.update(evaluate(args, model))
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    out = Path(args.out)
    _io.write_json(out / "bench.json", result)
    _io.write_text(out / "bench.md", markdown(result))
    print((out / "bench.md").read_text())


if __name__ == "__main__":
    main()
