"""The benchmark's closed-form fields (benchmarks/fastflow_fields.py): exact flows against RK4.

Time convention: t = 1 noise, t = 0 data. Truth: the closed-form end state of each field
against :func:`anchorflow.runtime.evaluation.analytic.exact_flow` (classic RK4, float64).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anchorflow.runtime.evaluation.analytic import exact_flow

_SPEC = importlib.util.spec_from_file_location(
    "fastflow_fields", Path(__file__).resolve().parents[1] / "benchmarks" / "fastflow_fields.py")
fields = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fields)


@pytest.mark.parametrize("make", [fields.Relax, fields.Swirl])
def test_closed_form_flow_matches_rk4(make):
    f = make()
    x1 = np.random.default_rng(0).standard_normal((4, *fields.SHAPE))
    # RK4 with 4000 steps: lam h <= 0.0105 and omega h <= 0.002, so its global error is ~1e-10
    ref = exact_flow(f, x1, 1.0, 0.0, steps=4000)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(f.flow(x1), ref, rtol=0, atol=1e-8)


def test_aniso_mixture_isotropic_case_is_the_runtime_mixture():
    from anchorflow.runtime.evaluation.analytic import GaussianMixture

    f = fields.AnisoMixture(components=4)
    s = np.array([0.3, 0.5, 0.2, 0.6])
    f.stds = np.repeat(s[:, None], f.means.shape[1], 1)
    g = GaussianMixture(f.means.reshape(4, *fields.SHAPE), s, np.exp(f.log_w))
    x = np.random.default_rng(1).standard_normal((3, *fields.SHAPE))
    for t in (0.95, 0.5, 0.05):
        np.testing.assert_allclose(f(x, t), g(x, t), rtol=0, atol=1e-12)  # float64, same formula per pixel


def test_aniso_single_component_flow_is_the_per_pixel_affine_map():
    """One component: x_t - (1 - t) m = sqrt(var_t) z per pixel, var_1 = 1, so x(0) = m + s * x(1)."""
    f = fields.AnisoMixture(components=1)
    assert f.stds.max() / f.stds.min() > 5  # really anisotropic
    x1 = np.random.default_rng(2).standard_normal((3, *fields.SHAPE))
    want = (f.means + f.stds * x1.reshape(3, -1)).reshape(x1.shape)
    # RK4 with 2000 steps on a field with Lipschitz <= 1/min(s) = 50 near t = 0: error ~1e-9
    np.testing.assert_allclose(exact_flow(f, x1, 1.0, 0.0, steps=2000), want, rtol=0, atol=1e-7)
