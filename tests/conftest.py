"""Shared fixtures: the closed-form test problem, its reference solution, a counting backbone.

Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# the suite's caches (onnxruntime's optimised graphs, data-free start states) go to a temporary
# folder, never to the home of the machine running it
if "ANCHORFLOW_CACHE" not in os.environ:
    os.environ["ANCHORFLOW_CACHE"] = tempfile.mkdtemp(prefix="anchorflow-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ANCHORFLOW_CACHE"], True)

from anchorflow.runtime.evaluation.analytic import GaussianMixture, exact_flow

# One table of tolerances; each entry says where its number comes from.
TOL = {
    # |measured - textbook| slope of log RMSE vs log NFE over three NFE values in the asymptotic
    # regime of MIXTURE; measured slopes sit within 0.2 of theory, 0.3 leaves room for the seed.
    "order": 0.3,
    # Same arithmetic in a different association, float64 on states of size ~3: a few hundred ulp.
    "float64": 1e-12,
    # The reference flow (RK4, 2000 steps) changes by 8e-14 when the step count is halved.
    "reference": 1e-11,
    # Monte Carlo check of the closed-form velocity: standard errors allowed (5 sigma: p < 1e-6).
    "mc_sigmas": 5.0,
}

# A smooth 2-D mixture (3 components, 2 classes) whose solvers reach their asymptotic order by
# 64-128 NFE; sharper mixtures (small stds) need many more steps before the slopes settle.
MIXTURE = dict(state_shape=(2,), components=3, classes=2, seed=0, spread=1.5, std=(0.4, 0.7))


@pytest.fixture(scope="session")
def tol() -> dict:
    return TOL


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(**MIXTURE)


@pytest.fixture(scope="session")
def noise() -> np.ndarray:
    """(32, 2) float64 start states at t = 1."""
    return np.random.default_rng(0).standard_normal((32, 2))


@pytest.fixture(scope="session")
def reference(mixture: GaussianMixture, noise: np.ndarray) -> np.ndarray:
    """The exact flow of ``noise`` from t = 1 to t = 0 (RK4, 2000 steps)."""
    return exact_flow(mixture, noise, 1.0, 0.0, steps=2000)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


class Counting:
    """Wraps a velocity callable; records every call's rows, times, labels and conditions."""

    def __init__(self, velocity) -> None:
        self.velocity, self.calls = velocity, []

    def __call__(self, x, t, cond):
        y = None if cond is None else cond.get("y")
        self.calls.append({"rows": x.shape[0], "t": np.array(t), "y": None if y is None else np.array(y),
                           "cond": cond})
        return self.velocity(x, t, cond)


@pytest.fixture
def counting():
    """The :class:`Counting` wrapper class."""
    return Counting


@pytest.fixture(scope="session")
def rmse():
    """``rmse(a, b)``: root-mean-square difference over all entries."""
    return _rmse
