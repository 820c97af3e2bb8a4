"""`anchorflow verify`: one bundle, the same inputs through every available backend, one table.

Per network (backbone, SideNet) on random and real inputs at batch 1, 7 and the bundle's maximum,
and end to end: a full BA-solver sample (arXiv 2601.21542) at 7 NFE from the same noise (Euler
for a bundle without a SideNet). Each backend x precision is compared with the reference backend
in fp32 (:mod:`anchorflow.export.validate` statistics and tolerances). "Real" inputs are states
of the reference's own 16-step Euler samples, noised again at several t (t = 1 noise, t = 0 data),
so no data set and no torch is needed: with ``--backends ort-cpu`` this runs on numpy +
onnxruntime only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np

from .common import non_negative, seed as seed_check

BACKEND_NAMES = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "trt")
E2E_NFE = 7
E2E_BATCH = 4
# End to end the per-call error is integrated over E2E_NFE steps of size <= 1 / E2E_NFE through a
# guided field with Lipschitz factor ~ cfg scale 1.5; 10x the per-call tolerance bounds that
# growth ((1 + 1.5 / 7)^7 ~ 3.9, times the 1.5 guidance amplification of each call's error).
E2E_FACTOR = 10.0
CFG_SCALE, CFG_INTERVAL = 1.5, (0.0, 0.7)


@dataclass
class Opened:
    """One backend x precision, opened: the runtime's callables and what it really runs on."""

    name: str
    precision: str
    velocity: Callable
    sidenet: Optional[Callable]
    providers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.precision}"


def open_backend(folder: Path, meta: dict, name: str, precision: str, allow_fallback: bool = False) -> Opened:
    """Open ``name`` (any backend of the runtime's registry, torch included) on a bundle; raises
    AnchorflowError (the reason it is unavailable)."""
    from ..runtime.bundle import load_bundle

    b = load_bundle(folder, backend=name, allow_fallback=allow_fallback, precision=precision)
    return Opened(name, precision, b.velocity, b.sidenet, list(b.providers))


def _runner(opened: Opened, network: str) -> Callable[[dict], np.ndarray]:
    if network == "backbone":
        return lambda f: np.asarray(opened.velocity(f["x"], f["t"], _cond(f)))
    return lambda f: np.asarray(opened.sidenet(f["x"], f["v"], f["t"], f["h"], _cond(f)))


def _cond(feeds: dict) -> dict:
    return {k: v for k, v in feeds.items() if k not in ("x", "v", "t", "h")}


def _cases(meta: dict, ref: Opened, seed: int) -> dict[str, list]:
    """Per network: random and real cases at batch 1, 7 and the bundle's maximum rows."""
    from ..export.onnx_export import NETS
    from ..export.validate import PRIME_BATCH, RealData, make_cases
    from ..runtime import solve

    model = meta["model"]
    shape, classes = tuple(model["state_shape"]), int(model["num_classes"])
    rng = np.random.default_rng(seed)
    y0 = rng.integers(0, classes, 256) if classes else None
    noise = rng.standard_normal((256, *shape)).astype(np.float32)
    x0 = solve("euler", ref.velocity, noise, 16, y=y0).x
    real = RealData(x0, y0, ref.velocity)
    out = {}
    for name, entry in meta["networks"].items():
        top = int((entry.get("batch") or {}).get("max", PRIME_BATCH))
        out[name] = make_cases(NETS[name], shape, classes, sorted({1, min(PRIME_BATCH, top), top}), real, seed)
    return out


def end_to_end(opened: Opened, meta: dict, seed: int) -> np.ndarray:
    """A full sample at E2E_NFE from fixed noise: BA-solver with a SideNet, else Euler."""
    from ..runtime import solve, solver_names

    model = meta["model"]
    rng = np.random.default_rng(seed + 1)
    noise = rng.standard_normal((E2E_BATCH, *model["state_shape"])).astype(np.float32)
    classes, null = int(model["num_classes"]), model.get("null_label")
    y = np.arange(E2E_BATCH, dtype=np.int64) % classes if classes else None
    guided = dict(cfg_scale=CFG_SCALE, cfg_interval=CFG_INTERVAL, null_label=null) if y is not None and null is not None else {}
    method = "ba" if opened.sidenet is not None and "ba" in solver_names() else "euler"
    return solve(method, opened.velocity, noise, E2E_NFE, y=y, sidenet=opened.sidenet, **guided).x


def e2e_name(meta: dict) -> str:
    from ..runtime import solver_names

    has_side = meta["networks"].get("sidenet") is not None
    return f"e2e {'ba' if has_side and 'ba' in solver_names() else 'euler'}@{E2E_NFE}"


@dataclass
class VerifyReport:
    """Comparisons run, skipped (``unavailable``: a missing provider, precision or dependency, with
    the reason) and ``broken`` (a file that fails its integrity check: a failure, not a skip).

    ``passed`` only when at least one comparison ran, all of them passed and nothing is broken.
    """

    reference: str
    reports: list = field(default_factory=list)  # validate.NetworkReport
    unavailable: dict[str, str] = field(default_factory=dict)
    providers: dict[str, list[str]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.reports) and not self.broken and all(r.passed for r in self.reports)

    def as_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "passed": self.passed, "unavailable": self.unavailable,
                "broken": self.broken, "providers": self.providers,
                "comparisons": [{"network": r.network, "backend": r.runtime, "precision": r.precision,
                                 **r.as_dict()} for r in self.reports]}


def _tolerance(precision: str, atol: Optional[float], rtol: Optional[float], factor: float = 1.0) -> Any:
    from ..export.validate import TOLERANCES

    tol = TOLERANCES[precision]
    tol = replace(tol, atol=tol.atol if atol is None else atol, rtol=tol.rtol if rtol is None else rtol)
    return replace(tol, atol=tol.atol * factor, rtol=tol.rtol * factor)


def _pick_reference(folder: Path, meta: dict, backends: list[str], reference: Optional[str],
                    report: VerifyReport) -> Opened:
    from ..errors import AnchorflowError, ConfigError

    choices = [reference] if reference else (["torch", "ort-cpu"] if "torch" in backends else ["ort-cpu"])
    for name in choices:
        try:
            return open_backend(folder, meta, name, "fp32")
        except AnchorflowError as exc:
            report.unavailable[f"{name}/fp32"] = str(exc)
    raise ConfigError(f"the reference backend ({' or '.join(choices)}) is unavailable: "
                      + "; ".join(report.unavailable.values()))


def verify_bundle(path: str | Path, backends: list[str], precisions: list[str], reference: Optional[str] = None,
                  atol: Optional[float] = None, rtol: Optional[float] = None, seed: int = 0,
                  progress: bool = True, allow_fallback: bool = False) -> VerifyReport:
    """Compare every backend x precision with the reference (fp32); see the module docstring."""
    from tqdm import tqdm

    from ..errors import AnchorflowError, CheckpointError
    from ..export.validate import Case, NetworkReport, compare, run_report
    from ..runtime.bundle import find_bundle, read_meta

    folder = find_bundle(path)
    meta = read_meta(folder)
    report = VerifyReport(reference or "")
    ref = _pick_reference(folder, meta, backends, reference, report)
    report.reference = ref.name
    cases = _cases(meta, ref, seed)
    refs = {n: [_runner(ref, n)(c.feeds) for c in cs] for n, cs in cases.items()}
    ref_e2e = end_to_end(ref, meta, seed)
    todo = [(b, p) for b in backends for p in precisions if not (b == ref.name and p == "fp32")]
    for name, precision in tqdm(todo, desc="verify", disable=None if progress else True, leave=False):
        try:
            opened = open_backend(folder, meta, name, precision, allow_fallback)
        except CheckpointError as exc:  # a tampered or missing ONNX file: the bundle is broken (a failure)
            (report.unavailable if name == "torch" else report.broken)[f"{name}/{precision}"] = str(exc)
            continue
        except AnchorflowError as exc:
            report.unavailable[f"{name}/{precision}"] = str(exc)
            continue
        report.providers[opened.label] = opened.providers
        tol = _tolerance(precision, atol, rtol)
        for net, cs in cases.items():
            report.reports.append(run_report(net, precision, name, ref.name, cs, refs[net], _runner(opened, net), tol))
        e2e = NetworkReport(e2e_name(meta), precision, name, ref.name, _tolerance(precision, atol, rtol, E2E_FACTOR))
        e2e.results.append((Case("noise", E2E_BATCH, {}), compare(end_to_end(opened, meta, seed), ref_e2e, e2e.tolerance)))
        report.reports.append(e2e)
    return report


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    from ..errors import ConfigError

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{what} takes a comma list of {', '.join(allowed)}; got {text!r}")
    return values


@click.command("verify")
@click.argument("bundle")
@click.option("--backends", default=",".join(BACKEND_NAMES), show_default=True,
              help="Comma list of backends to compare; unavailable ones are listed with the reason.")
@click.option("--reference", type=click.Choice(["torch", "ort-cpu"]), default=None,
              help="Reference backend (fp32). Default: torch when it is in --backends and usable, else ort-cpu.")
@click.option("--precision", "precisions", default="fp32", show_default=True,
              help="Comma list of bundle variants to check: fp32, fp16, bf16.")
@click.option("--atol", type=float, default=None, callback=non_negative,
              help="Override the absolute tolerance (default per precision: fp32 max abs error 1e-4; fp16 / bf16 "
                   "mean abs error u + 32 u |ref| with u = 2^-11 / 2^-8; end to end 10x).")
@click.option("--rtol", type=float, default=None, callback=non_negative,
              help="Override the relative tolerance (times |ref|, added to --atol; fp32 default 0).")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check,
              help="Seed of the inputs and the start noise.")
@click.option("--allow-fallback", is_flag=True,
              help="Compare a GPU backend even when its provider fell back to the CPU (its row then names the "
                   "providers it really ran on).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify(bundle, backends, reference, precisions, atol, rtol, seed, allow_fallback, as_json) -> None:
    """Parity test BUNDLE across backends: per network and end to end (BA-solver, 7 NFE).

    BUNDLE is a bundle folder, a model root with bundle/ inside, or `default`. Prints max / mean /
    p99 absolute and relative errors against the reference and the smallest atol that would
    pass. Exit status 0 only when at least one comparison ran and every one passed; 1 when any
    failed, when a file fails its sha256 check, or when nothing could be compared. A backend or
    precision that is not available here is skipped and listed with the reason. The torch
    backend needs the checkpoints recorded in bundle.json and torch.

    \b
    Examples:
      anchorflow verify default
      anchorflow verify runs/bundle --backends ort-cpu --precision fp32,fp16
    """
    import json

    from ..errors import CheckpointError
    from ..export.validate import format_table, report_rows
    from ..modelref import resolve

    result = verify_bundle(resolve(bundle), _split(backends, BACKEND_NAMES, "--backends"),
                           _split(precisions, ("fp32", "fp16", "bf16"), "--precision"), reference, atol, rtol, seed,
                           allow_fallback=allow_fallback)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(_text(result, format_table, report_rows))
    if not result.passed:
        raise CheckpointError(f"verify failed for {bundle}: {_verdict(result)}")


def _text(result: VerifyReport, format_table: Callable, report_rows: Callable) -> str:
    cols = ("network", "runtime", "precision", "cases", "max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel",
            "p99_rel", "needed_atol", "tolerance", "result")
    lines = [f"reference: {result.reference} (fp32)"]
    lines += [f"  {label}: {', '.join(p)}" for label, p in result.providers.items()]
    if result.reports:
        lines.append(format_table(report_rows(result.reports), cols))
    for label, why in result.unavailable.items():
        lines.append(f"skipped {label}: {why}")
    for label, why in result.broken.items():
        lines.append(f"BROKEN {label}: {why}")
    lines.append(("FAILED: " if not result.passed else "") + _verdict(result))
    return "\n".join(line for line in lines if line)


def _verdict(result: VerifyReport) -> str:
    fails = [r.failure() for r in result.reports if not r.passed] + [f"{k} is broken ({why})" for k, why in result.broken.items()]
    if fails:
        return "; ".join(fails)
    if not result.reports:
        return (f"nothing was compared (reference {result.reference}/fp32; every other backend x precision was "
                "skipped, see above): add --precision fp16, or install torch for the torch reference")
    return f"all {len(result.reports)} comparisons passed"
