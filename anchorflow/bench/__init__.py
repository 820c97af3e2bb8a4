"""The evaluation harness behind ``anchorflow bench``: what it measures is written out below.

Every solver is judged on the same backbone, noise, labels and guidance in one run:

- a reference solution of that noise (RK4 on N uniform steps, or adaptive Dormand-Prince
  5(4) at rtol = atol = 1e-6), whose own error is checked by halving the step (RK4) or
  tightening the tolerance tenfold (Dormand-Prince);
- per (solver, NFE, guidance scale): PSNR (per sample, averaged; range = the data's own
  lo..hi) and RMSE against the reference, the backbone and SideNet calls the runtime counted,
  and the wall-clock split (backbone / SideNet / overhead);
- per solver: the empirical order (slope of log RMSE against log NFE) and the Euler NFE that
  reaches the same PSNR (an Euler ladder of NFE 1..200, interpolated in log NFE);
- per run of a solver with a free per-sample error estimate (``Result.error_estimate``): the
  true per-sample error (RMSE against the reference, state units), Spearman of estimate vs true
  error and the median ratio estimate / true (``calibration``: calibration.csv, calibration.png);
- with the model's classifier: Frechet distance of classifier features to the real-data
  statistics ("FD") and class accuracy; with a data sampler in ``meta["sampler"]``: sliced
  Wasserstein distance to held-out data.

Modules: ``plan`` (the frozen, checked :class:`BenchPlan`), ``reference`` (the reference
solve), ``evaluate`` (scores), ``runs`` (typed :class:`RunRecord` per job), ``results`` (the
results dict), ``report`` (report.md), ``calibration`` (the error estimate against the true
error), ``outputs`` (files and figures), ``harness`` (:func:`run_bench`). Time convention: t = 1 noise, t = 0 data. Torch-free: numpy, onnxruntime,
pillow, tqdm (matplotlib only for the figures, skipped with a note when it is missing).
"""

from ..base.errors import ConfigError
from .evaluate import Evaluator
from .harness import run_bench
from .plan import DEFAULT_NFES, EULER_LADDER, BenchPlan, Job, check_counts, make_inputs, parse_reference, select_solvers
from .reference import reference_solution
from .report import render_report
from .results import SCHEMA, euler_nfe_to_match, machine_info
from .runs import FASTFLOW_WARMUP, RunRecord, skip_reason

__all__ = [
    "BenchPlan", "ConfigError", "DEFAULT_NFES", "EULER_LADDER", "Evaluator", "FASTFLOW_WARMUP", "Job", "RunRecord",
    "SCHEMA", "check_counts", "euler_nfe_to_match", "machine_info", "make_inputs", "parse_reference",
    "reference_solution", "render_report", "run_bench", "select_solvers", "skip_reason",
]
