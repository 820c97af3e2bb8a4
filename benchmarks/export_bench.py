"""Export cost and what it buys: ONNX Runtime (CPU) vs the torch sampler on the same weights.

Measures, for the bundled digits model (``anchorflow/bundled/digits``; a checkpoint that is not
there yet is replaced by a stand-in of the same architecture -- default DiT, SideNet sized by
``sidenet_arch`` -- with random weights, which runs exactly as fast):

* export: wall time of ``export_bundle`` (fp32 + fp16, validation included) and bundle size;
* sampling: wall time of one 7-NFE BA-solver sample (arXiv 2601.21542; guidance 1.5 on
  (0, 0.7]) at batch 1 and 16, torch (``trainers.reference_sampler.ba_sample_torch``) against
  ``anchorflow.runtime.solve("ba", ...)`` on onnxruntime CPU sessions of the bundle, for
  several intra-op thread counts and graph optimisation levels (same thread count for torch);
* parity of the two samples (max abs difference; same noise, same labels).

Goal: onnxruntime >= 1.3x faster than torch at batch 1. Medians over ``--repeats`` runs after
warm-up. Time convention: t = 1 noise, t = 0 data.

    python benchmarks/export_bench.py [--repeats 20] [--threads 1,2] [--opt basic,all]

Writes benchmarks/results/export_bench.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from anchorflow.base import _io
from anchorflow.modelref import BUNDLED, DEFAULT_NAME

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_SPEEDUP = 1.3
NFE, CFG, INTERVAL = 7, 1.5, (0.0, 0.7)


def model_root(tmp: Path) -> tuple[Path, str]:
    """The bundled model root; missing parts are replaced by same-architecture stand-ins with
    random weights (which run exactly as fast as trained ones)."""
    import shutil

    import torch

    from anchorflow.trainers.backbone import DiT, default_arch
    from anchorflow.trainers.checkpoint import load_checkpoint, read_config, save_checkpoint
    from anchorflow.trainers.data import dataset_info
    from anchorflow.trainers.sidenet import SideNet, backbone_identity, sidenet_arch

    bundled, root = BUNDLED / DEFAULT_NAME, tmp / "model"
    have = {n: (bundled / n / "config.json").is_file() for n in ("backbone", "sidenet")}
    if all(have.values()):
        return bundled, "bundled digits model (trained backbone and SideNet)"
    torch.manual_seed(0)
    data = dataset_info("digits").meta()
    if have["backbone"]:
        shutil.copytree(bundled / "backbone", root / "backbone")
        backbone = load_checkpoint(root / "backbone")[0]
    else:
        arch = default_arch((1, 8, 8), 10)
        backbone = DiT(**{k: v for k, v in arch.items() if k != "type"})
        _wake(torch, backbone)
        save_checkpoint(root / "backbone", backbone, {"kind": "backbone", "arch": arch, "data": data})
    side = SideNet(sidenet_arch(backbone))
    _wake(torch, side)
    identity = backbone_identity(backbone, read_config(root / "backbone"))
    save_checkpoint(root / "sidenet", side, {"kind": "sidenet", "arch": side.arch, "backbone": identity, "data": data})
    what = "trained bundled backbone" if have["backbone"] else "stand-in default DiT (random weights)"
    return root, f"{what} + stand-in SideNet of the default size (random weights; bundled one not present)"


def _wake(torch, module) -> None:
    """Random weights in the zero-initialised output layers (speed is unaffected)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bundle_size(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def torch_sampler(root: Path):
    """(run(noise, y) -> x, set_threads) for the checkpoints under ``root``."""
    import torch

    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.reference_sampler import ba_sample_torch

    backbone, _ = load_checkpoint(root / "backbone", kind="backbone")
    sidenet, _ = load_checkpoint(root / "sidenet", kind="sidenet")

    def run(noise: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ba_sample_torch(backbone, sidenet, torch.from_numpy(noise), torch.from_numpy(y), NFE,
                               cfg_scale=CFG, cfg_interval=INTERVAL).numpy()

    return run, torch.set_num_threads


def ort_sampler(bundle: Path, threads: int, optimization: str):
    """run(noise, y) -> x with the runtime's BA solver on onnxruntime CPU sessions."""
    from anchorflow.runtime import solve
    from anchorflow.runtime.bundles.backends import OrtSideNet, OrtVelocity, make_session
    from anchorflow.runtime.bundles.format import read_bundle

    fmt = read_bundle(bundle)
    null = fmt.model["null_label"]
    sess = {n: make_session(fmt.network_file(n), "ort-cpu", threads=threads, optimization=optimization)
            for n in ("backbone", "sidenet")}
    velocity = OrtVelocity(sess["backbone"], fmt.networks["backbone"], fmt.guidance.null)
    sidenet = OrtSideNet(sess["sidenet"], fmt.networks["sidenet"], fmt.guidance.null)

    def run(noise: np.ndarray, y: np.ndarray) -> np.ndarray:
        return solve("ba", velocity, noise, NFE, y=y, sidenet=sidenet, cfg_scale=CFG, cfg_interval=INTERVAL,
                     null_label=null).x

    return run


def bench(root: Path, bundle: Path, batches: list[int], threads: list[int], opts: list[str], repeats: int) -> list[dict]:
    run_torch, set_threads = torch_sampler(root)
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        noise = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        y = (np.arange(batch) % 10).astype(np.int64)
        for t in threads:
            set_threads(t)
            ref = run_torch(noise, y)
            torch_ms = median_ms(lambda: run_torch(noise, y), repeats)
            for opt in opts:
                run_ort = ort_sampler(bundle, t, opt)
                diff = float(np.abs(run_ort(noise, y) - ref).max())
                ort_ms = median_ms(lambda: run_ort(noise, y), repeats)
                rows.append({"batch": batch, "threads": t, "optimization": opt, "torch_ms": round(torch_ms, 3),
                             "ort_ms": round(ort_ms, 3), "speedup": round(torch_ms / ort_ms, 3),
                             "max_abs_diff": diff})
                print(f"batch {batch:>2} threads {t} opt {opt:<8} torch {torch_ms:7.2f} ms  ort {ort_ms:7.2f} ms  "
                      f"x{torch_ms / ort_ms:.2f}  |diff| {diff:.2e}", flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Export benchmark: ONNX Runtime CPU vs torch, 7-NFE BA-solver", "",
        f"Subject: {report['subject']}. Machine: {report['machine']}.", "",
        f"Export (fp32 + fp16, validation included): {report['export_s']:.1f} s; bundle "
        f"{sum(report['bundle_bytes'].values()) / 1e6:.2f} MB "
        f"({', '.join(f'{k} {v / 1e3:.0f} kB' for k, v in report['bundle_bytes'].items())}).", "",
        "| batch | threads | ORT graph opt | torch ms | ORT ms | speed-up | max abs diff |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['threads']} | {r['optimization']} | {r['torch_ms']:.2f} | {r['ort_ms']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    lines += ["", "Best against best (each side at its fastest setting):", ""]
    for b in report["best"]:
        lines.append(f"- batch {b['batch']}: torch {b['torch_ms']:.2f} ms ({b['torch_threads']} thread(s)), ORT "
                     f"{b['ort_ms']:.2f} ms ({b['ort_threads']} thread(s), optimisation {b['optimization']}): "
                     f"**{b['speedup']:.2f}x**")
    verdict = "met" if report["goal_met"] else "NOT met"
    lines += ["", f"Goal ORT >= {GOAL_SPEEDUP}x faster than torch at batch 1: **{verdict}**."]
    return "\n".join(lines) + "\n"


def best_vs_best(rows: list[dict]) -> list[dict]:
    """Per batch: torch at its fastest thread count against ORT at its fastest setting."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        t, o = min(mine, key=lambda r: r["torch_ms"]), min(mine, key=lambda r: r["ort_ms"])
        out.append({"batch": batch, "torch_ms": t["torch_ms"], "torch_threads": t["threads"], "ort_ms": o["ort_ms"],
                    "ort_threads": o["threads"], "optimization": o["optimization"],
                    "speedup": round(t["torch_ms"] / o["ort_ms"], 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", default="1,2", help="comma list of intra-op thread counts")
    ap.add_argument("--opt", default="basic,all", help="comma list of ORT graph optimisation levels")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args(argv)
    import platform

    import onnxruntime
    import torch

    from anchorflow.export.bundle import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        root, subject = model_root(Path(tmp))
        start = time.perf_counter()
        result = export_bundle(root, Path(tmp) / "bundle", precisions=["fp16"], max_batch=16, progress=False,
                               command="benchmarks/export_bench.py")
        export_s = time.perf_counter() - start
        rows = bench(root, result.path, [int(b) for b in args.batches.split(",")],
                     [int(t) for t in args.threads.split(",")], args.opt.split(","), args.repeats)
        sizes = bundle_size(result.path)
    best = best_vs_best(rows)
    batch1 = next((b for b in best if b["batch"] == 1), best[0])
    report = {
        "subject": subject, "machine": f"{platform.processor() or platform.machine()}, "
                                       f"{__import__('os').cpu_count()} CPUs (shared), torch {torch.__version__}, "
                                       f"onnxruntime {onnxruntime.__version__}",
        "command": " ".join(["benchmarks/export_bench.py", *sys.argv[1:]]), "nfe": NFE, "cfg": CFG,
        "export_s": round(export_s, 2), "bundle_bytes": sizes, "repeats": args.repeats, "rows": rows,
        "best": best, "goal_speedup": GOAL_SPEEDUP, "goal_met": batch1["speedup"] >= GOAL_SPEEDUP,
    }
    _io.write_json(RESULTS / "export_bench.json", report)
    _io.write_text(RESULTS / "export_bench.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
