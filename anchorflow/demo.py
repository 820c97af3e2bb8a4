"""`anchorflow demo`: what the toolkit does, on the bundled digits model, in one command.

Torch-free: the bundled ONNX bundle runs on onnxruntime. The demo draws one batch of start
noise, solves it with a reference (RK4, 256 backbone calls) and with each few-step method at the same
small NFE, and writes a folder with a comparison grid, per-method sample grids, a summary
table (PSNR against the reference, class accuracy by the bundled classifier) and JSON.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .base import _io
from .base.errors import ConfigError
from .modelref import open_model

DEMO_METHODS = ("euler", "heun", "ab2", "dpmpp2m", "ba")
REFERENCE_NFE = 256  # RK4, 64 steps: agrees with RK4-512 to > 60 dB on the bundled model


def _classifier(classifier_dir: Optional[Path]) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The bundled classifier as ``x -> predicted labels`` (one ONNX session), or None."""
    if classifier_dir is None:
        return None
    from .runtime.evaluation.classifier import Classifier

    return Classifier(classifier_dir).labels


def run_demo(
    out: Path,
    nfe: int = 6,
    n: int = 30,
    cfg_scale: float = 1.5,
    seed: int = 0,
    backend: str = "auto",
    methods: tuple[str, ...] = DEMO_METHODS,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the demo and write its folder; returns the summary dict."""
    from .plots import save_grid, save_labeled_rows
    from .runtime import get_solver
    from .runtime.evaluation.metrics import psnr
    from .runtime.plan import plan

    if nfe < 2 or n < 1:
        raise ConfigError("the demo needs --nfe >= 2 and --n >= 1")
    model = open_model("default", backend=backend)
    meta = model.meta
    echo(f"model: bundled '{meta['name']}' backbone on {', '.join(model.providers)}; "
         f"{n} samples, guidance {cfg_scale}, NFE {nfe}")
    def run(method: str, budget: int):  # every run on the uniform grid, the same noise and labels (0..C-1 cycled)
        return plan(model, solver=method, nfe=budget, grid="uniform", cfg_scale=cfg_scale, n=n, seed=seed,
                    tuning=None, names={"cfg_scale": "--cfg", "n": "--n", "nfe": "--nfe", "seed": "--seed"}).run()

    lo, hi = meta.get("data_range") or (-1.0, 1.0)
    t0 = time.perf_counter()
    ref = run("rk4", REFERENCE_NFE)
    y = plan(model, solver="euler", nfe=1, grid="uniform", n=n, tuning=None).labels
    echo(f"reference: RK4 with {REFERENCE_NFE} calls ({time.perf_counter() - t0:.1f} s)")
    classify = _classifier(model.classifier)
    rows = {f"reference (rk4, {REFERENCE_NFE} calls)": ref.x}
    files = {f"reference (rk4, {REFERENCE_NFE} calls)": f"samples_reference_rk4_{REFERENCE_NFE}.png"}
    table = []
    runs = [(m, nfe) for m in methods] + [("euler", 100)]
    for method, budget in runs:
        spec = get_solver(method)
        if spec.needs_sidenet and model.sidenet is None:
            echo(f"{method}: skipped (the model has no SideNet)")
            continue
        try:
            spec.steps_for_nfe(budget)
        except ConfigError:
            budget = budget + 1  # e.g. Heun needs an even NFE: say so in the table
        res = run(method, budget)
        pred = None if classify is None else classify(res.x)
        row = {
            "method": method, "nfe": res.nfe, "sidenet_calls": res.sidenet_calls,
            "psnr_db": float(psnr(res.x, ref.x, data_range=hi - lo)),
            "class_accuracy": None if pred is None else float((pred == y).mean()),
            "ms": res.timing.total_s * 1e3,
        }
        table.append(row)
        rows[f"{method} ({res.nfe} calls)"] = res.x
        files[f"{method} ({res.nfe} calls)"] = f"samples_{method}_{res.nfe}.png"
        acc = "" if pred is None else f", class accuracy {row['class_accuracy']:.0%}"
        echo(f"{method:>8} @ {res.nfe:>3} calls: PSNR {row['psnr_db']:5.1f} dB vs reference{acc}")

    out.mkdir(parents=True, exist_ok=True)
    for name, x in rows.items():
        save_grid(x, out / files[name], nrow=min(n, 10), data_range=(lo, hi))
    save_labeled_rows({k: x[:10] for k, x in rows.items()}, out / "comparison.png", data_range=(lo, hi))
    summary = {
        "anchorflow": __version__, "model": meta["name"], "providers": model.providers, "nfe": nfe,
        "n": n, "cfg_scale": cfg_scale, "seed": seed, "platform": platform.platform(),
        "rows_of_comparison_png": list(rows), "results": table,
    }
    _io.write_json(out / "summary.json", summary)
    _io.write_text(out / "summary.md", _markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    lines = [
        f"# anchorflow demo: bundled {summary['model']} model",
        "",
        f"{summary['n']} class-conditional samples, guidance {summary['cfg_scale']}, seed {summary['seed']}, "
        f"on {', '.join(summary['providers'])}. PSNR is against an RK4 solve with {REFERENCE_NFE} backbone calls from the "
        "same noise; class accuracy is the bundled digits classifier's.",
        "",
        "| method | backbone calls | SideNet calls | PSNR (dB) | class accuracy | time (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.0%}"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['sidenet_calls']} | {r['psnr_db']:.1f} | {acc} | {r['ms']:.0f} |")
    lines += ["", "`comparison.png` rows, top to bottom: " + "; ".join(summary["rows_of_comparison_png"]), ""]
    return "\n".join(lines)

