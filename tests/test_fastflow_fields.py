"""The benchmark's closed-form fields (benchmarks/fastflow_fields.py): exact flows against RK4.

Time convention: t = 1 noise, t = 0 data. Truth: the closed-form end state of each field
against :func:`anchorflow.runtime.analytic.exact_flow` (classic RK4, float64).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anchorflow.runtime.analytic import exact_flow

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
