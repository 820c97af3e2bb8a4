"""How close is sampling to its physical floor: NFE x one backbone call?

For Euler, AB2 and BA at NFE 5 and 10, batch 1 / 16 / 256, guidance 1.0 and 1.5 (interval
(0, 0.7], the BA authors' default), on the bundled digits bundle (ORT CPU): the median solve
latency divided by the floor, the median time of the solve's backbone calls alone, made back
to back at each call's rows (B rows, or 2B where guidance is on), same batch and threads; solve
and floor alternate repeat by repeat, so machine load hits both alike. With the split
backbone / SideNet / other (the runtime's own timing). Goals (issue
18): Euler <= 1.05, BA <= 1.25, other <= 5 % at batch 1.

Then peak memory of ``anchorflow sample default --solver ba --nfe 5 --n 4096 --npy out.npy``
(goal <= 600 MiB) and whether its output equals an unchunked solve (one onnxruntime call per
network evaluation on every row, same seed).

    python benchmarks/floor.py [--repeats 7] [--skip-memory]
    python benchmarks/floor.py --backbone dit30m    # batch 1 and 16, 3 repeats: ~7 min on 2 quiet cores
    python benchmarks/floor.py --bundle B --name poly3  # another digits bundle (no memory check)

Writes benchmarks/results/floor.json and floor.md (``--backbone dit30m``: floor_dit30m.json /
.md); the load average is recorded with them. ``--backbone dit30m`` runs the same table on a
~33 M-parameter random-init backbone (goal BA <= 1.10 there): our DiT at DiT-S/2 width and depth
(hidden 384, depth 12, 6 heads, patch 2) on a 4 x 16 x 16 latent with 1000 classes, and a SideNet
sized the way training sizes it (1.5 % of the backbone), saved as checkpoints and exported to a
temporary bundle by ``export_bundle`` (fp32; parity validation off, because its reference
inputs are 512 torch samples of 16 Euler steps, minutes on 2 cores: one torch-vs-ONNX call is
checked here instead). Latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
from anchorflow.runtime import load_bundle, solve

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLE = BUNDLED / DEFAULT_NAME / "bundle"
INTERVAL = (0.0, 0.7)
DIT30M = {"type": "dit", "state_shape": [4, 16, 16], "num_classes": 1000, "hidden": 384, "depth": 12, "heads": 6,
          "patch": 2}


class Rows:
    """Records the rows of every backbone call (the floor repeats them)."""

    def __init__(self, velocity) -> None:
        self.velocity, self.rows = velocity, []

    def __call__(self, x, t, cond):
        self.rows.append(int(x.shape[0]))
        return self.velocity(x, t, cond)


def floor_inputs(rows: list[int], shape, classes: int) -> list[tuple]:
    """(x, t, cond) for each backbone call of a solve, at that call's rows (made before timing)."""
    rng, out = np.random.default_rng(0), []
    for r in rows:
        out.append((rng.standard_normal((r, *shape)).astype(np.float32), np.full(r, 0.5, np.float32),
                    {"y": np.arange(r) % classes}))
    return out


def floor_s(velocity, calls: list[tuple]) -> float:
    """Seconds for the solve's backbone calls alone, back to back: the floor."""
    start = time.perf_counter()
    for x, t, c in calls:
        velocity(x, t, c)
    return time.perf_counter() - start


def floor_rows(b, args) -> list[dict]:
    """One row per (batch, cfg, solver, NFE). Each repeat times one solve and then the floor (its
    backbone calls alone, same rows), so load changes hit both alike; ratio = median / median."""
    rows = []
    shape, classes = b.state_shape, int(b.model["num_classes"])
    for batch in args.batches:
        noise = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        y = np.arange(batch) % classes
        for cfg in args.cfg:
            for method in args.solvers:
                for nfe in args.nfe:
                    counted = Rows(b.velocity)
                    kw = dict(y=y, null_label=b.null_label, cfg_scale=cfg, cfg_interval=INTERVAL,
                              sidenet=b.sidenet if method == "ba" else None)
                    solve(method, counted, noise, nfe, **kw)  # warm-up, and the rows of each call
                    calls = floor_inputs(counted.rows, shape, classes)  # the counted solve warmed every shape
                    runs, floors = [], []
                    for _ in range(args.repeats):
                        runs.append(solve(method, b.velocity, noise, nfe, **kw))
                        floors.append(floor_s(b.velocity, calls))
                    floor = 1e3 * statistics.median(floors)
                    total = statistics.median(1e3 * r.timing.total_s for r in runs)
                    bb = statistics.median(1e3 * r.timing.backbone_s for r in runs)
                    sn = statistics.median(1e3 * r.timing.sidenet_s for r in runs)
                    row = dict(method=method, nfe=nfe, batch=batch, cfg=cfg, solve_ms=round(total, 3),
                               floor_ms=round(floor, 3), ratio=round(total / floor, 3), backbone_ms=round(bb, 3),
                               sidenet_ms=round(sn, 3), other_frac=round(max(total - bb - sn, 0.0) / total, 4),
                               rows_per_call=counted.rows)
                    rows.append(row)
                    print(f"{method:5s} nfe={nfe:2d} batch={batch:3d} cfg={cfg:.1f}: {total:8.2f} ms / floor {floor:8.2f}"
                          f" = {row['ratio']:.2f}x (SideNet {sn:.2f} ms, other {100 * row['other_frac']:.1f} %)",
                          flush=True)
    return rows


def memory_check(n: int = 4096) -> dict:
    """Peak RSS of the CLI run, and its output against an unchunked solve in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "out.npy"
        cmd = [sys.executable, "-c", "from anchorflow.cli import main; main()", "sample", "default", "--solver", "ba", "--nfe", "5", "--n", str(n),
               "--npy", str(npy), "--out", str(Path(tmp) / "out.png")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(cmd, check=True, capture_output=True)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        chunked = np.load(npy)
    import onnxruntime as ort

    from anchorflow.sampling import start_noise

    # unchunked: the raw sessions, every network evaluation in ONE call on all rows
    sess = {k: ort.InferenceSession(str(BUNDLE / f"{k}.onnx"), providers=["CPUExecutionProvider"])
            for k in ("backbone", "sidenet")}
    vel = lambda x, t, c: sess["backbone"].run(None, {"x": x, "t": t, "y": c["y"]})[0]  # noqa: E731
    side = lambda x, v, t, h, c: sess["sidenet"].run(None, {"x": x, "v": v, "t": t, "h": h, "y": c["y"]})[0]  # noqa: E731
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    tuned = read_tuning(BUNDLE)  # sample's default grid: the bundle's tuned one for (ba, 5), else uniform
    grid = None if tuned is None or tuned.grid_for("ba", 5) is None else np.asarray(tuned.grid_for("ba", 5).times)
    noise = start_noise(0, n, (1, 8, 8))
    whole = solve("ba", vel, noise, 5, sidenet=side, y=np.arange(n) % 10, null_label=10, grid=grid).x
    return {"command": f"anchorflow sample default --solver ba --nfe 5 --n {n} --npy out.npy", "n": n, "peak_rss_mib": round(peak_mib, 1),
            "measured_before_mib": round(before / 1024, 1), "goal_mib": 600,
            "max_abs_diff_vs_unchunked": float(np.abs(chunked - whole).max()),
            "identical": bool(np.array_equal(chunked, whole))}


def dit30m_bundle(folder: Path, max_batch: int) -> tuple[Path, dict]:
    """Checkpoints of a random-init ~33 M-parameter DiT and its SideNet under ``folder``, exported
    with ``export_bundle`` to ``folder/bundle``; returns the bundle and what was built (sizes,
    export seconds, one torch-vs-ONNX parity figure)."""
    import torch

    from anchorflow.export.bundle import export_bundle
    from anchorflow.trainers.backbone import build_backbone
    from anchorflow.trainers.checkpoint import read_config, save_checkpoint
    from anchorflow.trainers.sidenet import SideNet, backbone_identity, count_params, sidenet_arch

    torch.manual_seed(0)
    backbone = build_backbone(DIT30M).eval()
    n_back = count_params(backbone)
    side_arch = sidenet_arch(backbone, backbone_params=n_back)
    side = SideNet(side_arch).eval()
    with torch.no_grad():  # adaLN-Zero and the SideNet head start at zero: small random values instead
        for p in [*backbone.parameters(), *side.parameters()]:
            if not p.any():
                p.normal_(0.0, 0.02)
    data = {"name": "random-init", "state_shape": DIT30M["state_shape"], "num_classes": DIT30M["num_classes"],
            "data_range": [-1.0, 1.0]}
    training = {"command": "benchmarks/floor.py --backbone dit30m (random init, not trained)"}
    save_checkpoint(folder / "backbone", backbone, {"kind": "backbone", "arch": DIT30M, "data": data, "training": training})
    identity = backbone_identity(backbone, read_config(folder / "backbone"))
    save_checkpoint(folder / "sidenet", side, {"kind": "sidenet", "arch": side_arch, "backbone": identity,
                                               "data": data, "training": training})
    start = time.perf_counter()
    export_bundle(folder, folder / "bundle", precisions=["fp32"], max_batch=max_batch, validate=False,
                  progress=False, command="benchmarks/floor.py --backbone dit30m")
    seconds = time.perf_counter() - start
    b = load_bundle(folder / "bundle", backend="ort-cpu")
    x = torch.randn(2, *DIT30M["state_shape"])
    t, y = torch.tensor([0.9, 0.3]), torch.tensor([3, DIT30M["num_classes"]])
    with torch.no_grad():
        ref = backbone(x, t, y).numpy()
    got = b.velocity(x.numpy(), t.numpy(), {"y": y.numpy()})
    info = {"backbone_params": n_back, "sidenet_params": count_params(side), "sidenet_arch": side_arch,
            "export_s": round(seconds, 1), "parity_max_abs": float(np.abs(got - ref).max()),
            "output_scale": float(np.abs(ref).max())}
    print(f"dit30m: backbone {n_back:,} params, SideNet {info['sidenet_params']:,}, exported in {seconds:.0f} s; "
          f"torch vs ONNX max abs {info['parity_max_abs']:.2g} (outputs up to {info['output_scale']:.2g})", flush=True)
    return folder / "bundle", info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="default 7 (dit30m: 3)")
    p.add_argument("--solvers", default="euler,ab2,ba")
    p.add_argument("--nfe", default="5,10")
    p.add_argument("--batches", default=None, help="default 1,16,256 (dit30m: 1,16)")
    p.add_argument("--cfg", default="1.0,1.5")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--backbone", choices=("digits", "dit30m"), default="digits",
                   help="digits: the bundled bundle; dit30m: a ~33 M-parameter random-init DiT exported here "
                        "(no memory check; default batches 1,16 and 3 repeats)")
    p.add_argument("--bundle", default=None,
                   help="digits only: measure this bundle instead of the bundled one (e.g. a shared-body "
                        "poly3 SideNet); results go to floor_<--name>.json / .md")
    p.add_argument("--name", default=None, help="with --bundle: results file suffix (default: the folder name)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (7 if args.backbone == "digits" else 3)
    args.solvers = args.solvers.split(",")
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.batches = [int(v) for v in (args.batches or ("1,16,256" if args.backbone == "digits" else "1,16")).split(",")]
    args.cfg = [float(v) for v in args.cfg.split(",")]
    load = os.getloadavg()
    from anchorflow.runtime.bundles.threads import configure, policy

    configure(args.threads)  # before any session (the dit30m export validates nothing, but opens one)
    tmp, built, name = None, None, "floor"
    bundle = BUNDLE
    if args.bundle is not None and args.backbone == "digits":
        bundle, name = Path(args.bundle), f"floor_{args.name or Path(args.bundle).name}"
        args.skip_memory = True  # the memory check runs `anchorflow sample default`
    if args.backbone == "dit30m":
        tmp = tempfile.TemporaryDirectory()
        bundle, built = dit30m_bundle(Path(tmp.name), max(args.batches))
        name = "floor_dit30m"
    b = load_bundle(bundle, backend="ort-cpu", threads=args.threads)
    rows = floor_rows(b, args)
    if tmp is not None:
        tmp.cleanup()
    mem = None if args.skip_memory or args.backbone != "digits" else memory_check()
    if mem:
        print(f"sample --n 4096: peak RSS {mem['peak_rss_mib']} MiB (goal 600), identical to unchunked: {mem['identical']}"
              f" (max abs diff {mem['max_abs_diff_vs_unchunked']:.3g})")
    cmd = "python benchmarks/floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd.strip(), "threads": policy().describe(), "load_before": load, "load_after": os.getloadavg(),
           "backbone": args.backbone, "built": built, "rows": rows, "memory": mem}
    _io.write_json(RESULTS / f"{name}.json", out)
    md = [f"`{cmd.strip()}` ({out['threads']}; load {load[0]:.1f} -> {out['load_after'][0]:.1f})", ""]
    if built:
        md += [f"Backbone: random-init DiT {DIT30M['hidden']} x {DIT30M['depth']} on {DIT30M['state_shape']}, "
               f"{built['backbone_params']:,} parameters; SideNet {built['sidenet_params']:,} "
               f"({100 * built['sidenet_params'] / built['backbone_params']:.2f} %); exported by export_bundle in "
               f"{built['export_s']} s; torch vs ONNX max abs {built['parity_max_abs']:.2g}.", ""]
    md += [
          "| solver | NFE | batch | cfg | solve (ms) | floor (ms) | ratio | SideNet (ms) | other |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['method']} | {r['nfe']} | {r['batch']} | {r['cfg']} | {r['solve_ms']:.2f} | {r['floor_ms']:.2f} | "
           f"{r['ratio']:.2f} | {r['sidenet_ms']:.2f} | {100 * r['other_frac']:.1f} % |" for r in rows]
    if mem:
        md += ["", f"`{mem['command']}`: peak RSS {mem['peak_rss_mib']} MiB (goal 600); identical to an unchunked solve: "
               f"{mem['identical']} (max abs diff {mem['max_abs_diff_vs_unchunked']:.3g})"]
    _io.write_bytes(RESULTS / f"{name}.md", ("\n".join(md) + "\n").encode())


if __name__ == "__main__":
    main()
