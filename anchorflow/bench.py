"""The evaluation harness behind ``anchorflow bench`` (see the project's evaluation spec).

Every solver is judged on the same backbone, noise, labels and guidance in one run:

- a reference solution of that noise (RK4 on 512 uniform steps, or adaptive Dormand-Prince
  5(4) at rtol = atol = 1e-6), whose own error is checked by halving the step (RK4) or
  tightening the tolerance tenfold (Dormand-Prince);
- per (solver, NFE, guidance scale): PSNR (per sample, averaged; range = the data's own
  lo..hi) and RMSE against the reference, the backbone and SideNet calls the runtime counted,
  and the wall-clock split (backbone / SideNet / overhead);
- per solver: the empirical order (slope of log RMSE against log NFE) and the Euler NFE that
  reaches the same PSNR (an Euler ladder of NFE 1..200, interpolated in log NFE);
- with the model's classifier: Frechet distance of classifier features to the real-data
  statistics ("FD") and class accuracy; with a data sampler in ``meta["sampler"]``: sliced
  Wasserstein distance to held-out data.

Time convention: t = 1 noise, t = 0 data. Torch-free: numpy, onnxruntime, pillow, tqdm
(matplotlib only for the figures, skipped with a note when it is missing).
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .bench_report import _done, render_report, write_outputs  # noqa: F401  (render_report: public API)
from .errors import ConfigError
from .runtime import metrics as M

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 20, 50, 100)
EULER_LADDER = (*range(1, 11), 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 128, 160, 200)
FASTFLOW_WARMUP = 16  # bandit learning generations before a FastFlow run is measured
SCHEMA = "anchorflow.bench/1"


# -- arguments ---------------------------------------------------------------------------------
def check_counts(n: int, nfes: Sequence[int]) -> None:
    """Refuse non-positive sample counts and NFE budgets (one-line ConfigError)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n (number of samples) must be a positive integer, got {n!r}")
    bad = [k for k in nfes if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad or not nfes:
        raise ConfigError(f"every NFE must be a positive integer, got {list(nfes)!r}")


def select_solvers(names: Optional[Sequence[str]], has_sidenet: bool) -> list[str]:
    """Requested names, checked against the registry; None: every registered solver that can run."""
    from .runtime import get_solver, solver_names

    if names is None:
        return [s for s in solver_names() if has_sidenet or not get_solver(s).needs_sidenet]
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError(f"no solver given; known solvers: {', '.join(sorted(solver_names()))}")
    for name in names:
        get_solver(name)  # unknown -> ConfigError listing the known ones
    return names


def parse_reference(text: str) -> tuple[str, float]:
    """``rk4:N`` (N even, >= 2 uniform steps) or ``dopri5[:TOL]`` -> (method, steps or tolerance)."""
    method, _, arg = str(text).partition(":")
    try:
        if method == "rk4":
            steps = int(arg or 512)
            if steps >= 2 and steps % 2 == 0:
                return "rk4", steps
        elif method == "dopri5":
            tol = float(arg or 1e-6)
            if 0 < tol < 1:
                return "dopri5", tol
    except ValueError:
        pass
    raise ConfigError(
        f"bad reference {text!r}; use 'rk4:N' (N even, e.g. rk4:512) or 'dopri5[:TOL]' (e.g. dopri5:1e-6)"
    )


def make_inputs(
    state_shape: Sequence[int], num_classes: int, n: int, seed: int
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Start noise (n, *state_shape) float32 at t = 1 and balanced labels ``i mod C`` (None if C = 0)."""
    noise = np.random.default_rng(seed).standard_normal((n, *state_shape)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % num_classes if num_classes else None
    return noise, labels


# -- the reference solution ----------------------------------------------------------------
def _f64(velocity: Callable) -> Callable:
    """A velocity that takes float64 states (cast to float32 for the model) and returns float64."""

    def v(x: np.ndarray, t: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        return np.asarray(velocity(x.astype(np.float32), t.astype(np.float32), cond), np.float64)

    return v


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae": 5th-order solution b5,
# embedded 4th-order b4; the last stage is evaluated at the new state (first same as last).
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B5 = DP_A[6] + (0.0,)
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _dp_step(field, x: np.ndarray, t: float, dt: float, k1: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    ks = [k1]
    for a_row, c in zip(DP_A[1:], DP_C[1:]):
        ks.append(field(x + dt * sum(a * k for a, k in zip(a_row, ks) if a), t + c * dt))
    err = dt * sum((b5 - b4) * k for b5, b4, k in zip(DP_B5, DP_B4, ks))
    return x + dt * sum(b * k for b, k in zip(DP_B5, ks) if b), err, ks


def dopri5(field, x: np.ndarray, rtol: float = 1e-6, atol: float = 1e-6, h0: float = 0.02) -> tuple[np.ndarray, dict]:
    """Adaptive Dormand-Prince 5(4) from t = 1 (noise, ``x``) to t = 0 on a guided field.

    ``field(x, t)`` is a :class:`anchorflow.runtime.GuidedField` (it counts the calls). The
    error norm is the RMS over every element of ``err / (atol + rtol max(|x|, |x_new|))``;
    steps with norm > 1 are retried, sizes follow ``0.9 norm^(-1/5)`` clipped to [0.2, 5].
    """
    t, h, k1 = 1.0, h0, field(x, 1.0)
    accepted = rejected = 0
    while t > 0.0:
        h = min(h, t)
        x_new, err, ks = _dp_step(field, x, t, -h, k1)
        norm = float(np.sqrt(np.mean((err / (atol + rtol * np.maximum(np.abs(x), np.abs(x_new)))) ** 2)))
        if norm <= 1.0:
            t, x, k1, accepted = (0.0 if h >= t else t - h), x_new, ks[-1], accepted + 1
        else:
            rejected += 1
        h *= min(5.0, max(0.2, 0.9 * norm ** -0.2)) if norm > 0 else 5.0
        if accepted + rejected > 100_000:
            raise RuntimeError("dopri5 reference did not finish in 100000 steps")
    return x, {"accepted_steps": accepted, "rejected_steps": rejected}


def _reference_once(model, noise, y, cfg: float, cfg_interval, method: str, arg: float) -> tuple[np.ndarray, int]:
    from .runtime import GuidedField, solve

    vel, x64 = _f64(model.velocity), noise.astype(np.float64)
    common = dict(y=y, cfg_scale=cfg, cfg_interval=cfg_interval, null_label=model.meta.get("null_label"))
    if method == "rk4":
        res = solve("rk4", vel, x64, 4 * int(arg), **common)
        return res.x, res.nfe
    field = GuidedField(vel, x64.shape[0], dtype=np.float64, **common)
    x, _ = dopri5(field, x64, rtol=arg, atol=arg)
    return x, field.nfe


def reference_solution(model, noise, y, cfg: float, cfg_interval, reference: str) -> tuple[np.ndarray, dict]:
    """The reference samples (float64) and a record of how they were made and how exact they are.

    The self-check solves again with half the steps (RK4) or a tenfold looser tolerance
    (Dormand-Prince) and reports the RMSE / PSNR between the two solves.
    """
    method, arg = parse_reference(reference)
    x, nfe = _reference_once(model, noise, y, cfg, cfg_interval, method, arg)
    check_arg = arg // 2 if method == "rk4" else arg * 10
    x_chk, _ = _reference_once(model, noise, y, cfg, cfg_interval, method, check_arg)
    label = f"rk4:{int(check_arg)} vs rk4:{int(arg)}" if method == "rk4" else f"dopri5:{check_arg:g} vs dopri5:{arg:g}"
    info = {
        "method": reference, "cfg": cfg, "nfe": int(nfe),
        "self_check": {"compare": label, "rmse": M.rmse(x_chk, x), "psnr": M.psnr(x_chk, x, _range(model))},
    }
    return x, info


# -- evaluating samples ------------------------------------------------------------------------
def _range(model) -> tuple[float, float]:
    lo, hi = model.meta.get("data_range", (-1.0, 1.0))
    return float(lo), float(hi)


class Evaluator:
    """Scores samples (n, *state_shape) against the reference and, where possible, the data.

    ``classifier``: a folder with ``classifier.onnx`` (input x -> outputs logits, features) and
    ``real_stats.npz`` (mu, sigma) of real-data features; ``held_out``: data samples for the
    sliced Wasserstein distance.
    """

    def __init__(self, data_range, labels, classifier: Optional[Path] = None, held_out: Optional[np.ndarray] = None):
        self.data_range, self.labels, self.held_out = data_range, labels, held_out
        self.session = self.real = None
        self.ref: Optional[np.ndarray] = None
        if classifier is not None:
            from ._deps import require

            ort = require("onnxruntime")
            onnx_file = str(Path(classifier) / "classifier.onnx")
            self.session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
            with np.load(Path(classifier) / "real_stats.npz") as stats:
                self.real = (stats["mu"], stats["sigma"])

    def distribution(self, x: np.ndarray) -> dict[str, Any]:
        """FD / accuracy (classifier) and SWD (held-out data) of samples x; empty where unavailable."""
        out: dict[str, Any] = {}
        if self.session is not None:
            logits, feats = self.session.run(["logits", "features"], {"x": x.astype(np.float32)})
            if x.shape[0] >= 2:
                out["fd"] = M.frechet_distance(*M.feature_statistics(feats), *self.real)
            if self.labels is not None:
                out["accuracy"] = M.class_accuracy(logits, self.labels)
        if self.held_out is not None:
            flat = x.reshape(x.shape[0], -1)
            out["swd"] = M.sliced_wasserstein(flat, self.held_out.reshape(self.held_out.shape[0], -1), 256, 0)
        return out

    def __call__(self, x: np.ndarray) -> dict[str, Any]:
        return {"psnr": M.psnr(x, self.ref, self.data_range), "rmse": M.rmse(x, self.ref), **self.distribution(x)}


# -- running solvers ---------------------------------------------------------------------------
def skip_reason(name: str, nfe: int, has_sidenet: bool) -> Optional[str]:
    """Why ``name`` cannot run at ``nfe`` on this model (None when it can)."""
    from .runtime import get_solver

    spec = get_solver(name)
    if spec.needs_sidenet and not has_sidenet:
        return f"{name} needs a SideNet and this model has none"
    try:
        spec.steps_for_nfe(int(nfe))
    except ConfigError as exc:
        return str(exc)
    return None


def _fastflow_options(model, nfe: int, noise, common: dict, seed: int) -> dict:
    """A fresh FastFlow bandit warmed on FASTFLOW_WARMUP generations of other noise (batch <= 16).

    The measured generation is the next one of that stream, still learning, as in deployment.
    """
    from .runtime import solve
    from .runtime.fastflow import FastFlowBandit

    bandit = FastFlowBandit(nfe, model_id=str(model.meta.get("model_id", "")), seed=seed)
    rng = np.random.default_rng([seed, 2])
    b = min(16, noise.shape[0])
    warm = dict(common, y=None if common["y"] is None else common["y"][:b])
    for _ in range(FASTFLOW_WARMUP):
        solve("fastflow", model.velocity, rng.standard_normal((b, *noise.shape[1:])).astype(np.float32), nfe,
              bandit=bandit, **warm)
    return {"bandit": bandit}


# Solvers that need options prepared per (model, nfe) before a fair measurement.
PREPARE: dict[str, Callable[..., dict]] = {"fastflow": _fastflow_options}


def run_one(model, name: str, nfe: int, cfg: float, noise, y, cfg_interval, evaluate: Evaluator, seed: int) -> dict:
    """One (solver, NFE, guidance) measurement, or a record of why it was skipped."""
    from .runtime import solve

    rec: dict[str, Any] = {"solver": name, "nfe_requested": int(nfe), "cfg": cfg}
    reason = skip_reason(name, nfe, model.sidenet is not None)
    if reason:
        return {**rec, "skipped": reason}
    common = dict(y=y, sidenet=model.sidenet, cfg_scale=cfg, cfg_interval=cfg_interval,
                  null_label=model.meta.get("null_label"))
    options = PREPARE[name](model, nfe, noise, common, seed) if name in PREPARE else {}
    res = solve(name, model.velocity, noise, int(nfe), **common, **options)
    t = res.timing
    rec.update(nfe=int(res.nfe), sidenet_calls=int(res.sidenet_calls), timing={
        "total_ms": t.total_s * 1e3, "backbone_ms": t.backbone_s * 1e3, "sidenet_ms": t.sidenet_s * 1e3,
        "overhead_ms": t.overhead_s * 1e3, "overhead_frac": t.overhead_s / t.total_s if t.total_s > 0 else 0.0,
    })
    rec.update(evaluate(res.x))
    rec["x"] = res.x  # removed before JSON; kept for the sample grids
    return rec


def euler_nfe_to_match(ladder: Sequence[tuple[int, float]], target: float) -> dict[str, Any]:
    """Smallest Euler NFE whose PSNR reaches ``target``, interpolated linearly in log NFE.

    ``ladder``: (nfe, psnr) pairs of Euler runs. Returns ``nfe`` (float, None when even the top
    rung falls short) and the ``bracket`` [lower rung, upper rung] (lower None: Euler at the
    first rung is already as good; upper None: the ladder never gets there).
    """
    pts = sorted((int(k), float(p)) for k, p in ladder)
    for i, (k, p) in enumerate(pts):
        if p >= target:
            if i == 0 or p == target:
                return {"nfe": float(k), "bracket": [None if p > target else k, k]}
            k0, p0 = pts[i - 1]
            frac = (target - p0) / (p - p0) if p > p0 else 1.0
            return {"nfe": float(math.exp(math.log(k0) + frac * (math.log(k) - math.log(k0)))), "bracket": [k0, k]}
    return {"nfe": None, "bracket": [pts[-1][0], None]}


def _orders(runs: list[dict], solvers: Sequence[str], nfes: Sequence[int], cfgs: Sequence[float]) -> list[dict]:
    from .runtime import get_solver

    out = []
    for cfg in cfgs:
        for name in solvers:
            pts = sorted({(r["nfe"], r["rmse"]) for r in _done(runs, name, cfg, nfes)})
            try:
                p = M.empirical_order([k for k, _ in pts], [e for _, e in pts])
            except ConfigError:
                p = None
            out.append({"solver": name, "cfg": cfg, "empirical": p, "textbook": get_solver(name).order,
                        "fit_nfes": [k for k, _ in pts]})
    return out


# -- the harness -------------------------------------------------------------------------------
def machine_info(model) -> dict[str, Any]:
    """Platform, CPU count, library versions and the providers the model really runs on."""

    def version(pkg: str) -> Optional[str]:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    ort = version("onnxruntime") or version("onnxruntime-gpu")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "onnxruntime": ort, "providers": list(getattr(model, "providers", []) or [])}


def _classifier_dir(model) -> Optional[Path]:
    folder = getattr(model, "classifier", None) or model.meta.get("classifier")
    if folder is None:
        return None
    folder = Path(folder)
    missing = [f for f in ("classifier.onnx", "real_stats.npz") if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"classifier folder {folder} lacks {', '.join(missing)}; retrain it with 'anchorflow train classifier'"
        )
    return folder


def _check_cfgs(cfg_scales: Sequence[float], num_classes: int) -> list[float]:
    cfgs = [float(s) for s in cfg_scales]
    if not cfgs or not all(math.isfinite(s) for s in cfgs):
        raise ConfigError(f"guidance scales must be finite numbers, got {list(cfg_scales)!r}")
    if not num_classes and any(s != 1.0 for s in cfgs):
        raise ConfigError("this model is unconditional, so guidance scales other than 1.0 do not apply; use --cfg 1.0")
    return list(dict.fromkeys(cfgs))


def run_bench(
    model,
    solvers: Optional[Sequence[str]] = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    n: int = 256,
    cfg_scales: Sequence[float] = (1.0,),
    seed: int = 0,
    out: str | os.PathLike = "bench",
    reference: str = "rk4:512",
    progress: bool = True,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    euler_ladder: Sequence[int] = EULER_LADDER,
    command: Optional[str] = None,
) -> dict:
    """Benchmark ``solvers`` on ``model`` at every NFE and guidance scale; write ``out``; return the results.

    Args:
        model: an opened model (:func:`anchorflow.modelref.open_model`): ``velocity``, ``sidenet``
            (or None), ``meta`` (name, state_shape, num_classes, null_label, data_range, model_id;
            optional ``sampler(n, y, seed) -> (n, *state_shape)`` held-out data), ``providers``,
            ``classifier`` (folder or None).
        solvers: registry names; None: every registered solver this model can run.
        nfes: backbone-call budgets (FastFlow: grid sizes; its counted calls are reported).
        n: samples per run; noise (n, *state_shape) from ``seed``, labels ``i mod C``.
        cfg_scales: guidance scales; each gets its own reference.
        out: folder for results.json, report.md, quality_vs_nfe.png and the sample grids.
        reference: "rk4:512" or "dopri5[:tol]".
    """
    check_counts(n, list(nfes))
    meta = model.meta
    num_classes = int(meta.get("num_classes") or 0)
    cfgs = _check_cfgs(cfg_scales, num_classes)
    names = select_solvers(solvers, model.sidenet is not None)
    parse_reference(reference)
    nfes, ladder = sorted({int(k) for k in nfes}), sorted({int(k) for k in euler_ladder})
    noise, y = make_inputs(tuple(meta["state_shape"]), num_classes, int(n), seed)
    sampler = meta.get("sampler")
    held_out = None if sampler is None else np.asarray(sampler(int(n), y, seed + 1))
    evaluate = Evaluator(_range(model), y, _classifier_dir(model), held_out)

    refs, runs, ref_x = _measure_all(model, names, nfes, ladder, cfgs, noise, y, cfg_interval, reference, evaluate,
                                     seed, progress)
    results = _assemble(model, names, nfes, ladder, cfgs, runs, refs, dict(
        n=int(n), seed=int(seed), reference=reference, cfg_interval=list(cfg_interval),
        command=command or shlex.join(sys.argv),
    ))
    write_outputs(Path(out), results, runs, ref_x, _range(model), y, held_out)
    return results


def _measure_all(model, names, nfes, ladder, cfgs, noise, y, cfg_interval, reference, evaluate, seed, progress):
    """Per guidance scale: the reference, then every (solver, NFE) job and the Euler ladder (tqdm bar)."""
    from tqdm.auto import tqdm

    jobs = [(s, k, True) for s in names for k in nfes]
    jobs += [("euler", k, False) for k in ladder if "euler" not in names or k not in nfes]
    bar = tqdm(total=len(cfgs) * (1 + len(jobs)), desc="bench", unit="run", disable=not progress)
    refs, runs, ref_x = [], [], {}
    for cfg in cfgs:
        bar.set_postfix_str(f"reference {reference} cfg={cfg:g}")
        evaluate.ref, info = reference_solution(model, noise, y, cfg, cfg_interval, reference)
        refs.append(info | evaluate.distribution(evaluate.ref))
        ref_x[cfg] = evaluate.ref
        bar.update()
        for name, k, keep_samples in jobs:
            bar.set_postfix_str(f"{name} nfe={k} cfg={cfg:g}")
            runs.append(run_one(model, name, k, cfg, noise, y, cfg_interval, evaluate, seed))
            if not keep_samples:
                runs[-1].pop("x", None)  # ladder-only runs feed the Euler-to-match table, not the grids
            bar.update()
    bar.close()
    return refs, runs, ref_x


def _assemble(model, names, nfes, ladder, cfgs, runs, refs, settings) -> dict:
    """The results dict (JSON-ready): settings, machine, references, runs, ladder, orders."""
    ladder_runs = [r for r in runs if r["solver"] == "euler" and r["nfe_requested"] in ladder and "skipped" not in r]
    for r in runs:
        if "skipped" not in r:
            pts = [(e["nfe"], e["psnr"]) for e in ladder_runs if e["cfg"] == r["cfg"]]
            r["euler_nfe_to_match"] = euler_nfe_to_match(pts, r["psnr"])
    meta = model.meta
    return {
        "schema": SCHEMA,
        "model": {k: meta.get(k) for k in ("name", "model_id", "num_classes", "null_label", "data_range")}
        | {"state_shape": list(meta["state_shape"])},
        "machine": machine_info(model),
        "settings": {"solvers": names, "nfes": nfes, "cfg_scales": cfgs, "euler_ladder": ladder, **settings},
        "references": refs,
        "runs": [{k: v for k, v in r.items() if k != "x"} for r in runs
                 if r["solver"] in names and r["nfe_requested"] in nfes],
        "euler_ladder": [{k: r[k] for k in ("cfg", "nfe", "psnr", "rmse")} for r in ladder_runs],
        "orders": _orders(runs, names, nfes, cfgs),
    }

