"""SideNet training (trainers/train_sidenet.py, Algorithm 2 of BA-solver) and `anchorflow train sidenet`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers.backbone import MLPBackbone  # noqa: E402
from anchorflow.trainers.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from anchorflow.trainers.cond_rows import as_cond_backbone  # noqa: E402
from anchorflow.trainers.data import dataset_info  # noqa: E402
from anchorflow.trainers.sidenet import SideNet, load_sidenet  # noqa: E402
from anchorflow.trainers.train_sidenet import (  # noqa: E402
    SideNetTrainSettings, chain_loss, sample_h, simulate_step, train_sidenet)

torch.set_num_threads(1)
TINY = {"cond_dim": 16, "freq_dim": 16}


def settings(**kw) -> SideNetTrainSettings:
    # lr 1e-2 and rates (50, 5) so that 8 iterations of a tiny net visibly learn (the defaults need more)
    base = dict(iters=8, chain=3, batch=16, lr=1e-2, rates=(50.0, 5.0), width=8, arch=TINY, ckpt_every=4, seed=0)
    return SideNetTrainSettings(**{**base, **kw})


class GaussianVelocity(torch.nn.Module):
    """The exact flow-matching velocity of class-wise Gaussian data N(mu_y, s^2 I) on the linear path.

    With x_t = (1 - t) x0 + t eps: ``v = -mu + (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) * (x - (1-t) mu)``.
    A tiny backbone with parameters (mu per label incl. the null row, log s) and a smooth field in t.
    """

    state_shape, num_classes, null_label = (1, 4, 4), 3, 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.mu = torch.nn.Parameter(torch.randn(4, *self.state_shape, generator=g))
        self.log_s = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, t, y):
        s2, tb, mu = torch.exp(2 * self.log_s), t.reshape(-1, 1, 1, 1), self.mu[y]
        return -mu + (tb - (1 - tb) * s2) / ((1 - tb) ** 2 * s2 + tb ** 2) * (x - (1 - tb) * mu)


def tiny_backbone() -> GaussianVelocity:
    return GaussianVelocity().eval()


def tiny_data(n=64):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by several tests: (backbone, state before, output folder, config)."""
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = tmp_path_factory.mktemp("run") / "side"
    cfg = train_sidenet(backbone, *tiny_data(), out, settings(), progress=False)
    return backbone, before, out, cfg


def test_backbone_weights_are_bit_identical_after_training(trained):
    backbone, before, _, _ = trained
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_training_reduces_the_chain_loss(trained):
    """Same batch, same noise, same offsets: the trained EMA SideNet beats 'reuse the anchor v'."""
    backbone, _, out, _ = trained
    ema, _ = load_checkpoint(out, kind="sidenet")
    fresh = SideNet(ema.arch).eval()  # zero output layer: delta = 0
    x, y = tiny_data()
    losses = []
    for net in (fresh, ema):
        with torch.no_grad():
            losses.append(float(chain_loss(as_cond_backbone(backbone), net, x, {"y": y}, torch.Generator().manual_seed(9),
                                           settings(chain=4))))
    assert losses[1] < 0.85 * losses[0], losses  # measured: 0.74 of the untrained loss


def test_trained_sidenet_is_still_zero_at_zero_offset_and_records_its_backbone(trained):
    backbone, _, out, cfg = trained
    side = load_sidenet(out, backbone)
    x, y = tiny_data(5)
    with torch.no_grad():
        assert torch.count_nonzero(side(x, torch.randn_like(x), torch.rand(5), torch.zeros(5), y)) == 0
        assert torch.count_nonzero(side(x, torch.randn_like(x), torch.rand(5), torch.full((5,), 0.1), y)) > 0
    assert cfg["backbone"]["state_shape"] == [1, 4, 4] and cfg["backbone"]["null_label"] == 3
    assert cfg["training"]["step"] == 8 and cfg["training"]["finished"]
    assert (out / "train_state.safetensors").is_file()


def test_resume_continues_the_same_run_exactly(trained, tmp_path):
    backbone, _, straight, _ = trained
    x, y = tiny_data()
    train_sidenet(backbone, x, y, tmp_path / "r", settings(iters=4), progress=False)
    train_sidenet(backbone, x, y, tmp_path / "r", settings(iters=8), resume=True, progress=False)
    a, _ = load_checkpoint(straight, kind="sidenet")
    b, cfg = load_checkpoint(tmp_path / "r", kind="sidenet")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert cfg["training"]["step"] == 8


def test_resume_and_overwrite_are_refused_when_they_would_mix_runs(trained, tmp_path):
    backbone, _, out, _ = trained
    x, y = tiny_data()
    with pytest.raises(ConfigError, match="lr"):
        train_sidenet(backbone, x, y, out, settings(iters=9, lr=1e-3), resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train_sidenet(backbone, x, y, out, settings(), progress=False)
    with pytest.raises(ConfigError, match="--rate"):
        train_sidenet(backbone, x, y, tmp_path / "n", settings(rates=(50.0, -1.0)), progress=False)


# -- sample_h ----------------------------------------------------------------------------------
def test_offsets_never_cross_zero_or_one():
    t = torch.cat([torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7]), torch.rand(20000)]).repeat(5)
    h = sample_h(t, (50.0, 2.0), torch.Generator().manual_seed(0))
    assert bool(torch.all(h <= t)) and bool(torch.all(-h <= 1 - t))
    assert bool(torch.all((t - h >= 0) & (t - h <= 1)))


@pytest.mark.parametrize("rates", [(50.0,), (5.0,), (50.0, 5.0)])
def test_offset_magnitude_has_the_truncated_exponential_mean(rates):
    n, room = 400_000, 0.5
    t = torch.full((n,), room)  # the same room toward data and toward noise
    h = sample_h(t, rates, torch.Generator().manual_seed(1))

    def mean(r):  # mean of Exp(r) truncated to [0, room]
        return 1 / r - room * math.exp(-r * room) / (1 - math.exp(-r * room))

    want = sum(mean(r) for r in rates) / len(rates)
    se = float(h.abs().std()) / math.sqrt(n)
    assert abs(float(h.abs().mean()) - want) < 5 * se  # 5 standard errors: a false alarm ~1e-6
    assert abs(float((h > 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_simulated_step_is_exact_gauss_legendre_for_quintics():
    """With an oracle 'SideNet' of a time-only field g (degree 5), the 3-point Gauss-Legendre step
    gives exactly ``x - integral_{t-h}^{t} g``."""
    c = torch.tensor([0.3, -1.0, 2.0, 0.5, -1.5, 1.0], dtype=torch.float64)
    g = lambda s: sum(ck * s ** k for k, ck in enumerate(c))  # noqa: E731
    big_g = lambda s: sum(ck * s ** (k + 1) / (k + 1) for k, ck in enumerate(c))  # noqa: E731
    oracle = lambda x, v, t, h, y: (g(t - h) - g(t))[:, None] * torch.ones_like(x)  # noqa: E731
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    h = torch.tensor([0.3, -0.4, 0.2, -0.9], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    got = simulate_step(oracle, x, g(t)[:, None] * torch.ones_like(x), t, h, torch.zeros(4, dtype=torch.int64))
    torch.testing.assert_close(got, x - (big_g(t) - big_g(t - h))[:, None], atol=1e-12, rtol=0)


# -- the command ----------------------------------------------------------------------------------
def _mlp_checkpoint(path):
    torch.manual_seed(0)
    net = MLPBackbone((2,), num_classes=8, hidden=16, depth=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    arch = {"type": "mlp", "state_shape": [2], "num_classes": 8, "hidden": 16, "depth": 1}
    save_checkpoint(path, net, {"kind": "backbone", "arch": arch, "data": dataset_info("gaussians8").meta()})


def test_cli_trains_a_sidenet_for_a_checkpoint(tmp_path, capsys, monkeypatch):
    from anchorflow.cli import main

    _mlp_checkpoint(tmp_path / "model" / "backbone")
    out = tmp_path / "model" / "sidenet"
    args = ["train", "sidenet", "--backbone", str(tmp_path / "model" / "backbone"), "--out", str(out), "--iters", "2",
            "--batch", "8", "--chain", "2", "--width", "8", "--rate", "50,5"]
    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])  # the command line recorded in the config
    main(args)
    assert "wrote" in capsys.readouterr().out
    side = load_sidenet(out, tmp_path / "model" / "backbone")
    cfg = side.checkpoint_config
    assert cfg["backbone"]["path"] == "../backbone" and cfg["data"]["name"] == "gaussians8"
    assert "train sidenet" in cfg["training"]["command"] and cfg["training"]["settings"]["rates"] == [50.0, 5.0]


@pytest.mark.parametrize("args, message", [
    (["--backbone", "/nonexistent/model", "--out", "o"], "not found"),
    (["--backbone", "default", "--out", "o", "--rate", "fast"], "--rate"),
])
def test_cli_user_errors_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    from anchorflow.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "sidenet", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error:") and message in err and err.count("\n") == 1


def test_cli_help_does_not_import_torch():
    code = ("import sys; from anchorflow.cli import main\n"
            "try: main(['train', 'sidenet', '--help'])\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--rate" in res.stdout and "Gauss-Legendre" in res.stdout
