"""SideNet offset forms on the digits: the paper's FiLM-on-h body against shared-body polynomials.

``film`` (the bundled SideNet, arXiv 2601.21542): h is embedded and drives every block, so BA's
merged probe (4 offsets per interval) runs the body on 4B rows. ``polyD`` (trainers/sidenet.py,
``--offset polyD``): ``delta = h f_1 + ... + h^D f_D`` from a body that never sees h, so the same
probe runs the body on B rows. All SideNets here were trained by the same recipe (250 iterations,
batch 128, chain 8, rate 50, lr 3e-3, seed 0; commands in each checkpoint's config.json).

Quality: BA (merged probes) at 3 / 5 / 10 calls on the uniform grid and on the bundle's tuned BA
grid (``tuned.json``, ``ba@N``), guidance 1.0 and 1.5 (interval (0, 0.7]), PSNR against RK4 with
256 steps on the same 64 noise draws and labels (seed 0); the SideNets run in torch, the bundled
backbone too. Cost: ``python benchmarks/overhead.py --bundle B`` on an exported bundle (see the
README); not measured here.

    python benchmarks/sidenet_offsets.py [--n 64] [SIDENET_DIR ...]

Writes benchmarks/results/digits/sidenet_offsets.json and .md. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from anchorflow.base import _io

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "anchorflow" / "bundled" / "digits"
OUT = ROOT / "benchmarks" / "results" / "digits" / "sidenet_offsets"
DEFAULT = [DIGITS / "sidenet", ROOT / "benchmarks/results/digits/sidenet_poly3",
           ROOT / "benchmarks/results/digits/sidenet_poly4"]


def main(argv=None, *, script: str = "benchmarks/sidenet_offsets.py", out: Path = OUT, key: str = "form",
         default: tuple = tuple(DEFAULT), description: str = __doc__) -> dict:
    """Score the SideNets named on the command line; each column is keyed by the SideNet's offset
    form (``key="form"``) or its folder name (``key="folder"``, for SideNets of one form)."""
    ap = argparse.ArgumentParser(description=description.split("\n")[0])
    ap.add_argument("sidenets", nargs="*", type=Path, default=list(default))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--nfe", default="3,5,10")
    ap.add_argument("--reference-steps", type=int, default=256)
    args = ap.parse_args(argv)
    import torch

    from anchorflow.runtime import solve
    from anchorflow.runtime.evaluation.metrics import psnr
    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.sidenet import load_sidenet
    from anchorflow.trainers.torch_wrappers import TorchSideNet, TorchVelocity

    torch.set_num_threads(1)
    start, load = time.perf_counter(), os.getloadavg()
    backbone, cfg = load_checkpoint(DIGITS / "backbone", kind="backbone")
    velocity = TorchVelocity(backbone)
    tuned = json.loads((DIGITS / "bundle" / "tuned.json").read_text())["grids"]
    noise = np.random.default_rng(0).standard_normal((args.n, *backbone.state_shape)).astype(np.float32)
    y = np.arange(args.n) % int(backbone.num_classes)
    sides = {}
    for folder in args.sidenets:
        module = load_sidenet(folder, cfg)
        form = module.checkpoint_config["arch"].get("offset", "film")
        name = form if key == "form" else Path(folder).resolve().name
        if name in sides:
            raise SystemExit(f"two SideNets keyed {name!r} ({key}); pass SideNets with distinct {key}s")
        sides[name] = (TorchSideNet(module), folder, module.checkpoint_config, form)
    rows = []
    for scale in (1.0, 1.5):
        kw = {"y": y, "null_label": int(backbone.null_label), "cfg_scale": scale,
              "cfg_interval": (0.0, 0.7) if scale != 1.0 else (0.0, 1.0)}
        ref = solve("rk4", velocity, noise, 4 * args.reference_steps, **kw).x
        for nfe in (int(v) for v in args.nfe.split(",")):
            for grid_name in ("uniform", "tuned"):
                grid = None if grid_name == "uniform" else list(tuned[f"ba@{nfe}"]["times"])
                row = {"cfg": scale, "nfe": nfe, "grid": grid_name}
                for name, (side, *_) in sides.items():
                    x = solve("ba", velocity, noise, nfe, sidenet=side, **({"grid": grid} if grid else {}), **kw).x
                    row[name] = round(float(psnr(x, ref, (-1.0, 1.0))), 2)
                rows.append(row)
                print(row, flush=True)
    names = list(sides)
    result = {"command": shlex.join(["python", script, *(argv if argv is not None else sys.argv[1:])]),
              "samples": args.n, "reference": f"rk4, {args.reference_steps} uniform steps",
              "sidenets": {name: {"path": str(Path(p).resolve().relative_to(ROOT)), "params": c.get("param_count"),
                                  "command": c["training"]["command"], "offset": form}
                           for name, (_, p, c, form) in sides.items()},
              "rows": rows, "seconds": round(time.perf_counter() - start, 1), "load_before": load,
              "load_after": os.getloadavg()}
    _io.write_json(out.with_suffix(".json"), result)
    md = [f"`{result['command']}` ({args.n} samples, reference {result['reference']}, {result['seconds']} s, load "
          f"{load[0]:.1f} -> {result['load_after'][0]:.1f}). PSNR (dB) of BA, merged probes:", "",
          "| guidance | NFE | grid | " + " | ".join(names) + " |", "|---:|---:|---|" + "---:|" * len(names)]
    md += [f"| {r['cfg']} | {r['nfe']} | {r['grid']} | " + " | ".join(f"{r[f]:.2f}" for f in names) + " |" for r in rows]
    _io.write_bytes(out.with_suffix(".md"), ("\n".join(md) + "\n").encode())
    print(f"wrote {out}.json / .md")
    return result


if __name__ == "__main__":
    main()
