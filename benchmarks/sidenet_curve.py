"""Training curves of the digits SideNet (BA-solver Algorithm 2, arXiv 2601.21542) at several learning rates.

For each learning rate (default: the paper's 1e-4 and the bundled SideNet's 3e-3) the SideNet is
trained by ``anchorflow train sidenet`` in chunks of ``--every`` iterations (``--resume``: one
continuous run, the checkpoint and optimiser state carried over), all rates in parallel child
processes; after every chunk the EMA checkpoint is scored: BA at ``--nfe`` calls (uniform grid,
merged probes) by PSNR against RK4 on the same 32 samples of the benchmark's seed-0 noise, next
to AB2 (what BA is with delta = 0 on a uniform grid). The bundled ONNX backbone is the velocity;
the SideNet runs in torch from each checkpoint. Time convention: t = 1 noise, t = 0 data.

    python benchmarks/sidenet_curve.py [--lrs 1e-4,3e-3] [--iters 600] [--every 100] [--work DIR]

Writes benchmarks/results/sidenet_curve.json and sidenet_curve.png (PSNR and training loss
against iterations, one line per learning rate), rewritten after every chunk. Committed run: ``--iters 200 --every 50`` (the default 600 did not
fit the session: ~8 s per iteration at batch 128 on the shared machine, load average 3-11).
Earlier measurement at 250 iterations (benchmarks/sidenet_training.py docstring): lr 1e-4 gives
BA@5 33.3 dB (delta = 0: 33.1 dB), lr 3e-3 gives 36.9 dB.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from anchorflow.base import _io

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sidenet_curve.json"


def train_cmd(args, lr: str, out: Path, iters: int) -> list[str]:
    cmd = [sys.executable, "-m", "anchorflow.cli", "train", "sidenet", "--backbone", "default", "--out", str(out),
           "--iters", str(iters), "--batch", str(args.batch), "--chain", "8", "--rate", "50", "--lr", lr,
           "--seed", "0", "--threads", str(args.threads), "--ckpt-every", str(args.every)]
    cmd += ["--offset", args.offset] if args.offset else []
    return cmd + (["--resume"] if iters > args.every else [])


class Scorer:
    """BA / AB2 PSNR at each NFE against RK4 on fixed noise, for a SideNet checkpoint folder."""

    def __init__(self, n: int, nfes: list[int], reference_steps: int) -> None:
        from anchorflow.bench.evaluate import data_range
        from anchorflow.bench.plan import make_inputs
        from anchorflow.bench.reference import Guidance, _solve_once
        from anchorflow.modelref import open_model, resolve_backbone_checkpoint
        from anchorflow.trainers.checkpoint import load_checkpoint

        self.m = open_model("default", backend="ort-cpu")
        noise, y = make_inputs(self.m.meta["state_shape"], int(self.m.meta["num_classes"]), 128, 0)
        self.noise, self.y, self.nfes = noise[:n], y[:n], nfes
        self.ref, _ = _solve_once(self.m.velocity, self.noise, Guidance(self.y, 1.0, (0.0, 1.0), self.m.meta["null_label"]),
                                  "rk4", reference_steps)
        self.range = data_range(self.m)
        self.backbone_cfg = load_checkpoint(resolve_backbone_checkpoint("default"), kind="backbone")[1]
        self.ab2 = {k: self._psnr("ab2", k, None) for k in nfes}

    def _psnr(self, method: str, nfe: int, sidenet) -> float:
        from anchorflow.runtime.evaluation import metrics as M
        from anchorflow.runtime import solve

        x = solve(method, self.m.velocity, self.noise, nfe, y=self.y, sidenet=sidenet,
                  null_label=self.m.meta["null_label"]).x
        return round(float(M.psnr(x, self.ref, self.range)), 3)

    def score(self, folder: Path) -> dict:
        from anchorflow.trainers.sidenet import load_sidenet
        from anchorflow.trainers.torch_wrappers import TorchSideNet

        side = TorchSideNet(load_sidenet(folder, self.backbone_cfg))
        return {f"ba@{k}": self._psnr("ba", k, side) for k in self.nfes}


def plot(result: dict, path: Path) -> None:
    from anchorflow.plots import plot_curves

    panels = {}
    for k in result["nfes"]:
        lines = {f"lr {lr}": ([p["iters"] for p in c["points"]], [p[f"ba@{k}"] for p in c["points"]])
                 for lr, c in result["curves"].items()}
        its = [p["iters"] for c in result["curves"].values() for p in c["points"]]
        lines["AB2 (delta = 0)"] = ([min(its), max(its)], [result["ab2"][f"ab2@{k}"]] * 2)
        panels[f"BA@{k} PSNR vs RK4 (dB)"] = lines
    panels["training loss"] = {f"lr {lr}": ([s for s, _ in c["loss_log"]], [v for _, v in c["loss_log"]])
                               for lr, c in result["curves"].items()}
    plot_curves(panels, path, "iterations", "PSNR (dB) / loss", logx=False, dashed=["AB2 (delta = 0)"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", default="1e-4,3e-3")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nfe", default="5,10")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--reference-steps", type=int, default=128)
    ap.add_argument("--offset", default=None, help="SideNet offset form (train sidenet --offset), default film")
    ap.add_argument("--work", type=Path, default=None, help="checkpoint folders (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not 1 <= args.every <= args.iters:
        raise SystemExit(f"--every must be in 1..--iters ({args.iters}), got {args.every}")
    lrs, nfes = args.lrs.split(","), [int(k) for k in args.nfe.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="sidenet_curve_"))
    work.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(args.n, nfes, args.reference_steps)
    curves = {lr: {"points": [], "folder": str(work / f"lr{lr}")} for lr in lrs}
    start = time.perf_counter()
    for iters in range(args.every, args.iters + 1, args.every):
        logs = {lr: open(work / f"train-lr{lr}.log", "a") for lr in lrs}  # progress bars and errors
        procs = [subprocess.Popen(train_cmd(args, lr, work / f"lr{lr}", iters), cwd=ROOT, stdout=logs[lr],
                                  stderr=subprocess.STDOUT) for lr in lrs]
        codes = [p.wait() for p in procs]
        for f in logs.values():
            f.close()
        if any(codes):
            raise SystemExit(f"training failed at {iters} iterations; see {work}/train-lr*.log")
        for lr in lrs:
            point = {"iters": iters, **scorer.score(work / f"lr{lr}")}
            curves[lr]["points"].append(point)
            print(f"lr {lr} iters {iters}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in point.items() if k != "iters")
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
        result = report(args, argv, lrs, nfes, work, scorer, curves, start)  # after every chunk: a stopped
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")            # run keeps what it measured
    return result


def report(args, argv, lrs, nfes, work: Path, scorer: Scorer, curves: dict, start: float) -> dict:
    """Write the JSON and the figure for the points measured so far."""
    for lr in lrs:
        cfg = _io.read_json(work / f"lr{lr}" / "config.json")
        curves[lr]["loss_log"] = cfg["training"]["loss_log"]
        curves[lr]["command"] = shlex.join(["python", *train_cmd(args, lr, Path(f"DIR/lr{lr}"), args.iters)[1:]])
    result = {"command": shlex.join(["python", "benchmarks/sidenet_curve.py", *(argv if argv is not None else sys.argv[1:])]),
              "samples": args.n, "reference": f"rk4:{args.reference_steps}", "grid": "uniform", "nfes": nfes,
              "ab2": {f"ab2@{k}": v for k, v in scorer.ab2.items()}, "curves": curves,
              "wall_s": round(time.perf_counter() - start, 1), "load_average_1_5_15": list(os.getloadavg())}
    _io.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
