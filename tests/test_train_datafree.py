"""Data-free SideNet training (trainers/datafree.py, trainers/sidenet_run.py) and the SideNet's
generic conditioning (trainers/sidenet_cond.py)."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers.cond_rows import as_cond_backbone, drop_to_null  # noqa: E402
from anchorflow.trainers.datafree import solve_to_data, start_states  # noqa: E402
from anchorflow.trainers.sidenet import SideNet  # noqa: E402
from anchorflow.trainers.sidenet_cond import choose  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_train_sidenet import GaussianVelocity  # noqa: E402

torch.set_num_threads(1)


def test_many_step_solve_reaches_the_closed_form_sample():
    """For Gaussian data N(mu_y, s^2 I) the exact flow maps noise z (t = 1) to mu_y + s z (t = 0)."""
    bb = as_cond_backbone(GaussianVelocity().double())
    z = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        want = bb.module.mu[y] + torch.exp(bb.module.log_s) * z
        errs = [float((solve_to_data(bb, z, {"y": y}, n) - want).abs().max()) for n in (16, 32)]
    assert errs[1] < 1e-3  # midpoint, 32 steps: O(h^2) with h = 1/32
    # at least second order: halving h divides the error by >= 4 (measured 7.9 on this field, whose
    # midpoint error happens to fall like h^3); Euler (first order) would give ~2
    assert errs[0] / errs[1] > 3.5


def test_start_states_are_cached_and_cycle_through_the_condition_rows(tmp_path):
    bb = as_cond_backbone(GaussianVelocity())
    cond = {"y": torch.tensor([2, 0, 1])}
    kw = dict(n=7, steps=4, seed=3, backbone_sha="abc", cache_dir=tmp_path, progress=False)
    x0, rows, info = start_states(bb, (1, 4, 4), cond, **kw)
    assert x0.shape == (7, 1, 4, 4) and rows.tolist() == [0, 1, 2, 0, 1, 2, 0] and not info["cache_hit"]
    again, _, info2 = start_states(bb, (1, 4, 4), cond, **kw)
    assert info2["cache_hit"] and torch.equal(again, x0)
    other, _, info3 = start_states(bb, (1, 4, 4), {"y": torch.tensor([2, 0, 0])}, **kw)
    assert not info3["cache_hit"] and not torch.equal(other, x0)  # other conditions: another cache entry


def test_null_rows_replace_every_condition_with_the_broadcast_null_row():
    cond = {"ehs": torch.ones(4000, 3, 2), "pooled": torch.ones(4000, 5)}
    null = {"ehs": torch.zeros(1, 3, 2), "pooled": torch.zeros(1, 5)}
    out = drop_to_null(cond, null, 0.1, torch.Generator().manual_seed(0))
    dropped = out["pooled"][:, 0] == 0
    assert torch.equal(dropped, out["ehs"][:, 0, 0] == 0)  # the same rows for every condition
    assert abs(float(dropped.double().mean()) - 0.1) < 5 * (0.1 * 0.9 / 4000) ** 0.5  # 5 standard errors
    with pytest.raises(ConfigError, match="--null-cond"):
        drop_to_null(cond, None, 0.1, torch.Generator())


SD3 = {"encoder_hidden_states": {"dtype": "float32", "shape": ["L", 64]},
       "pooled_projections": {"dtype": "float32", "shape": [32]}}
SANA = {"encoder_hidden_states": {"dtype": "float32", "shape": ["L", 48]},
        "encoder_attention_mask": {"dtype": "int64", "shape": ["L"]}}


@pytest.mark.parametrize("conditions, want, kind, inputs", [
    ({"y": {"dtype": "int64", "shape": []}}, "auto", "label", ["y"]),
    (SD3, "auto", "pooled", ["pooled_projections"]),
    (SD3, "encoder_hidden_states", "mean", ["encoder_hidden_states"]),
    (SANA, "auto", "mean", ["encoder_hidden_states", "encoder_attention_mask"]),
    (SD3, "none", "none", []),
    ({}, "auto", "none", []),
])
def test_sidenet_conditioning_is_chosen_per_family(conditions, want, kind, inputs):
    spec = choose(conditions, want, num_classes=10)
    assert spec["kind"] == kind and spec["inputs"] == inputs


def test_unknown_sidenet_condition_is_refused():
    with pytest.raises(ConfigError, match="not one of the backbone's conditions"):
        choose(SD3, "prompt", 0)


def test_masked_mean_conditioning_ignores_padded_tokens():
    spec = choose(SANA, "auto")
    arch = {"state_shape": [1, 4, 4], "num_classes": 0, "null_label": None, "width": 8, "cond_dim": 16,
            "freq_dim": 16, "cond": spec}
    net = SideNet(arch).eval()
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5, generator=g)
    x, v, t, h = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.rand(2), torch.full((2,), 0.2)
    ehs = torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = ehs.clone()
    garbage[0, 3:] = 100.0  # padded positions of row 0 change, real tokens do not
    with torch.no_grad():
        a, b = net(x, v, t, h, ehs, mask), net(x, v, t, h, garbage, mask)
    assert torch.equal(a[0], b[0])
    with torch.no_grad():
        c = net(x, v, t, h, garbage, torch.ones_like(mask))
    assert not torch.allclose(a[0], c[0])  # without the mask the padding would count


def test_cli_trains_a_data_free_sidenet_and_records_it(tmp_path, monkeypatch):
    from anchorflow.cli import main
    from anchorflow.trainers.checkpoint import read_config

    from test_train_sidenet import _mlp_checkpoint

    _mlp_checkpoint(tmp_path / "bb")
    args = ["train", "sidenet", "--backbone", str(tmp_path / "bb"), "--out", str(tmp_path / "side"), "--data", "none",
            "--iters", "2", "--batch", "8", "--chain", "2", "--width", "8", "--start-states", "16",
            "--solve-steps", "4", "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code
    cfg = read_config(tmp_path / "side")
    assert cfg["data"]["source"] == "data-free" and cfg["data"]["n"] == 16 and cfg["data"]["cond_rows"] == 8
    assert cfg["arch"]["cond"] == {"kind": "label", "inputs": ["y"], "num_classes": 8}
    assert any((tmp_path / "cache").iterdir())
