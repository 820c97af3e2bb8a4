"""Offsets drawn from a sampler's time grids (trainers/train_sidenet.py ``offset_grids``) and
`anchorflow train sidenet --offset-grids`.

Truths: BA's probe offsets on an interval of length L are a L, (1 - a) L, L toward data and a L
toward noise (a = runtime.solvers.ba.LOBATTO_A, docs: /work/shared/spec/ba-solver.md); the
exponential sampler without grids is the code before this option (copied below).
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from anchorflow.commands.train_sidenet import read_ba_grids  # noqa: E402
from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.runtime.solving.solvers.ba import LOBATTO_A  # noqa: E402
from anchorflow.trainers.distributed import Dist  # noqa: E402
from anchorflow.trainers.train_sidenet import SideNetTrainSettings, sample_h, train_sidenet  # noqa: E402
from test_train_sidenet import settings, tiny_backbone, tiny_data  # noqa: E402

torch.set_num_threads(1)
GRID = (1.0, 0.6, 0.25, 0.0)
BUNDLE = "anchorflow/bundled/digits/bundle"


def old_sample_h(t, rates, gen):
    """sample_h as it was before offset grids (single process), the reference for bit-identity."""
    b = t.shape[0]
    toward_data = torch.rand((b,), generator=gen) < 0.5
    room = torch.where(toward_data, t, 1 - t).double()
    rate = torch.tensor(rates, dtype=torch.float64)[torch.randint(0, len(rates), (b,), generator=gen)]
    u = torch.rand((b,), generator=gen, dtype=torch.float64)
    d = torch.minimum(-torch.log1p(u * torch.expm1(-rate * room)) / rate, room).to(t.dtype)
    return torch.where(toward_data, d, -d)


def probe_offsets(t: float, grid=GRID) -> list[float]:
    """The 4 clipped probe offsets at time t, from the grid interval (t_{i+1}, t_i] holding t (by hand)."""
    i = next(i for i in range(len(grid) - 1) if grid[i + 1] < t <= grid[i]) if t > 0 else len(grid) - 2
    length = grid[i] - grid[i + 1]
    return [min(f * length, t) for f in (LOBATTO_A, 1 - LOBATTO_A, 1.0)] + [-min(LOBATTO_A * length, 1 - t)]


def test_without_grids_the_draws_are_the_old_samplers_bit_for_bit():
    t = torch.rand(500, generator=torch.Generator().manual_seed(1))
    g_new, g_old = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(3):  # several chain steps: the generators must stay in step too
        assert torch.equal(sample_h(t, (50.0, 5.0), g_new), old_sample_h(t, (50.0, 5.0), g_old))
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_grid_mode_offsets_are_the_probe_offsets_of_the_containing_interval():
    # t includes grid nodes, both ends and times where the room clips the probe (near 0 and 1)
    t = torch.cat([torch.rand(3000, generator=torch.Generator().manual_seed(2)),
                   torch.tensor([0.0, 1.0, 0.6, 0.25, 0.01, 0.99, 0.6000001, 0.2499])])
    h = sample_h(t, (50.0,), torch.Generator().manual_seed(3), grids=(GRID,), grid_share=1.0)
    hits = [0, 0, 0, 0]
    for ti, hi in zip(t.tolist(), h.tolist()):
        cands = probe_offsets(ti)
        err = [abs(hi - c) for c in cands]
        k = min(range(4), key=err.__getitem__)
        assert err[k] < 1e-6, (ti, hi, cands)  # float32 offsets of float64 probes
        assert 0.0 <= ti - hi <= 1.0
        if min(abs(a - b) for i, a in enumerate(cands) for b in cands[i + 1:]) > 1e-4:  # none clipped together
            hits[k] += 1
    m, n = sum(hits), len(t)
    # each probe with prob. 1/4 where all four differ (binomial sd sqrt(m 3/16)): within 5 sd
    assert m > 1000 and all(abs(c - m / 4) < 5 * math.sqrt(m * 3 / 16) for c in hits), hits
    forward = float((h > 0).double().mean())
    assert abs(forward - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n), forward


def test_grid_share_splits_the_samples_between_the_modes():
    n = 4000
    t = torch.rand(n, generator=torch.Generator().manual_seed(5)) * 0.98 + 0.01
    h = sample_h(t, (50.0,), torch.Generator().manual_seed(6), grids=(GRID,), grid_share=0.3)
    on_probe = sum(min(abs(hi - c) for c in probe_offsets(ti)) < 1e-6 for ti, hi in zip(t.tolist(), h.tolist()))
    # exponential draws land on a probe offset with probability ~0: the share is 0.3 (sd ~0.007)
    assert abs(on_probe / n - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n), on_probe / n
    # toward data: 0.3 * 3/4 + 0.7 * 1/2 = 0.575
    assert abs(float((h > 0).double().mean()) - 0.575) < 5 * math.sqrt(0.25 / n)


def test_grid_draws_are_the_same_global_tensors_on_every_rank():
    t = torch.rand(12, generator=torch.Generator().manual_seed(7))
    grids = (GRID, (1.0, 0.5, 0.0))
    full = sample_h(t, (50.0, 5.0), torch.Generator().manual_seed(8), grids=grids, grid_share=0.5)
    parts = [sample_h(t[4 * r:4 * r + 4], (50.0, 5.0), torch.Generator().manual_seed(8), Dist(rank=r, world=3),
                      grids, 0.5) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)


def test_settings_check_the_grids_and_the_share():
    s = SideNetTrainSettings(offset_grids=([1, 0.5, 0],))
    s.validate()
    assert s.offset_grids == ((1.0, 0.5, 0.0),) and s.grid_share == 0.5
    for kw, msg in [({"offset_grids": ((1.0, 0.5, 0.6, 0.0),)}, "decrease"),
                    ({"offset_grids": ((0.9, 0.0),)}, "from 1 to 0"), ({"grid_share": 0.5}, "--offset-grids"),
                    ({"offset_grids": (GRID,), "grid_share": 1.5}, r"\[0, 1\]")]:
        with pytest.raises(ConfigError, match=msg):
            SideNetTrainSettings(**kw).validate()


def test_bundle_grids_are_every_ba_grid_of_tuned_json():
    entries = json.loads(open(f"{BUNDLE}/tuned.json").read())["grids"]
    want = {tuple(e["times"]) for e in entries.values() if e["solver"] == "ba"}
    assert any(k.endswith("+cached") for k, e in entries.items() if e["solver"] == "ba")  # both variants present
    got = read_ba_grids(BUNDLE)
    assert set(got) == want and len(got) == len(want) and read_ba_grids(f"{BUNDLE}/tuned.json") == got


def test_a_run_records_the_grids_and_resume_refuses_other_ones(tmp_path):
    backbone, (x, y) = tiny_backbone(), tiny_data(16)
    cfg = train_sidenet(backbone, x, y, tmp_path / "g", settings(iters=1, chain=2, batch=8, offset_grids=(GRID,)),
                        progress=False)
    recorded = cfg["training"]["settings"]
    assert recorded["offset_grids"] == [list(GRID)] and recorded["grid_share"] == 0.5
    with pytest.raises(ConfigError, match="grid_share"):
        train_sidenet(backbone, x, y, tmp_path / "g", settings(iters=2, chain=2, batch=8, offset_grids=(GRID,),
                                                               grid_share=0.25), resume=True, progress=False)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "not a tuned.json"),
    ('{"grids": {"euler@5": {"solver": "euler", "times": [1.0, 0.0]}}}', "no grids of solver 'ba'"),
])
def test_cli_bad_offset_grids_are_one_line_errors(content, message, tmp_path, capsys, monkeypatch):
    from anchorflow.cli import main

    path = tmp_path / "tuned.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "sidenet", "--out", "o", "--offset-grids", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
