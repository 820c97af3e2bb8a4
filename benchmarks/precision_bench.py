"""Reduced-precision bundles: what fp16 ONNX costs the BA-solver in quality.

Runs the bundled digits bundle in fp32 and in its fp16 variant (float32 I/O, sensitive ops kept in
float32; see anchorflow.export.precision) on ORT CPU, solves the same noise and labels with the
BA-solver at 5 and 10 NFE (guidance 1.0 and 1.5), and reports PSNR against the fp32 RK4 reference
(512 calls) and against the fp32 BA result. bf16 is not run: onnxruntime's CPU provider has no
bf16 kernels (the exporter checks the bf16 graphs with onnx's reference evaluator instead).

    python benchmarks/precision_bench.py [--n 64]
Writes benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from anchorflow.base._io import write_json, write_text
from anchorflow.modelref import BUNDLED
from anchorflow.runtime import load_bundle, solve
from anchorflow.runtime.evaluation.metrics import psnr

BUNDLE = BUNDLED / "digits" / "bundle"
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    nets = {prec: load_bundle(BUNDLE, backend="ort-cpu", precision=prec) for prec in ("fp32", "fp16")}
    meta = nets["fp32"].meta["model"]
    rng = np.random.default_rng(args.seed)
    noise = rng.standard_normal((args.n, *meta["state_shape"])).astype(np.float32)
    y = np.arange(args.n, dtype=np.int64) % meta["num_classes"]
    lo, hi = meta.get("data_range", [-1.0, 1.0])
    rows = []
    for cfg in (1.0, 1.5):
        common = dict(y=y, cfg_scale=cfg, null_label=meta["null_label"])
        ref = solve("rk4", nets["fp32"].velocity, noise, 512, **common).x
        for nfe in (5, 10):
            out = {prec: solve("ba", b.velocity, noise, nfe, sidenet=b.sidenet, **common).x for prec, b in nets.items()}
            for prec in ("fp32", "fp16"):
                rows.append({
                    "cfg": cfg, "nfe": nfe, "precision": prec,
                    "psnr_vs_reference_db": float(psnr(out[prec], ref, data_range=(lo, hi))),
                    "psnr_vs_fp32_ba_db": None if prec == "fp32" else float(psnr(out[prec], out["fp32"], data_range=(lo, hi))),
                    "max_abs_vs_fp32_ba": None if prec == "fp32" else float(np.abs(out[prec] - out["fp32"]).max()),
                })
                print(rows[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "precision.json", {"bundle": str(BUNDLE.relative_to(BUNDLED.parent.parent)), "n": args.n,
                                        "seed": args.seed, "rows": rows})
    lines = ["# fp16 bundle: BA-solver quality (ORT CPU, bundled digits model)", "",
             f"{args.n} samples; PSNR against the fp32 RK4 reference (512 calls) and against the fp32 BA result.", "",
             "| guidance | NFE | precision | PSNR vs reference (dB) | PSNR vs fp32 BA (dB) | max abs diff vs fp32 BA |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        vs = "-" if r["psnr_vs_fp32_ba_db"] is None else f"{r['psnr_vs_fp32_ba_db']:.1f}"
        mx = "-" if r["max_abs_vs_fp32_ba"] is None else f"{r['max_abs_vs_fp32_ba']:.2e}"
        lines.append(f"| {r['cfg']} | {r['nfe']} | {r['precision']} | {r['psnr_vs_reference_db']:.2f} | {vs} | {mx} |")
    write_text(OUT / "precision.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
