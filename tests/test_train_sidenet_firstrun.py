"""The first run of `anchorflow train sidenet`: an ETA after the first iteration, a time budget
(default when no --iters is given), and a usable checkpoint on Ctrl-C / SIGTERM, even before the
first periodic checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from anchorflow.commands.train_sidenet import DEFAULT_BUDGET_MINUTES, budget_seconds  # noqa: E402
from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers import train_sidenet as ts  # noqa: E402
from anchorflow.trainers.backbone import MLPBackbone  # noqa: E402
from anchorflow.trainers.checkpoint import read_config, save_checkpoint  # noqa: E402
from anchorflow.trainers.data import dataset_info  # noqa: E402
from anchorflow.trainers.sidenet import load_sidenet  # noqa: E402

torch.set_num_threads(1)


class Linear(torch.nn.Module):
    """v = a x + b_y: a tiny class-conditional backbone (3 classes + the null row)."""

    state_shape, num_classes, null_label = (1, 4, 4), 3, 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.a = torch.nn.Parameter(torch.tensor(-0.7))
        self.b = torch.nn.Parameter(torch.randn(4, *self.state_shape, generator=g))

    def forward(self, x, t, y):
        return self.a * x + self.b[y] * t.reshape(-1, 1, 1, 1)


def data(n=32):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def settings(**kw):
    base = dict(iters=6, chain=2, batch=8, lr=1e-2, width=8, arch={"cond_dim": 16, "freq_dim": 16}, ckpt_every=50)
    return ts.SideNetTrainSettings(**{**base, **kw})


def test_pick_iters_is_the_whole_iterations_that_fit_between_one_and_the_cap():
    assert ts.pick_iters(1, 2.0, 10.5, 250) == 1 + 5      # 10.5 s left, 2 s each: 5 more
    assert ts.pick_iters(3, 2.0, 10.0, 250) == 3 + 5
    assert ts.pick_iters(1, 2.0, -4.0, 250) == 2          # spent already: still one more
    assert ts.pick_iters(1, 0.01, 1e4, 250) == 250        # never above --iters


def test_budget_option_default_applies_only_without_iters():
    assert budget_seconds(None, iters_given=False) == (60.0 * DEFAULT_BUDGET_MINUTES, True)
    assert budget_seconds(None, iters_given=True) == (None, False)
    assert budget_seconds("none", iters_given=False) == (None, False)
    assert budget_seconds("2.5", iters_given=True) == (150.0, False)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError, match="--budget-minutes"):
            budget_seconds(bad, iters_given=False)


def test_eta_is_printed_after_the_first_iteration(tmp_path, capsys):
    ts.train_sidenet(Linear().eval(), *data(), tmp_path / "side", settings(iters=3), progress=False)
    err = capsys.readouterr().err
    assert "first iteration" in err and "3 iterations: ETA" in err, err


def test_a_spent_budget_lowers_the_iterations_and_the_checkpoint_says_so(tmp_path, capsys):
    # 1 ms for the whole run: spent by the first iteration, so one more is trained (2 of 40)
    cfg = ts.train_sidenet(Linear().eval(), *data(), tmp_path / "side", settings(iters=40), progress=False,
                           budget_s=1e-3, budget_default=True)
    err = capsys.readouterr().err
    assert cfg["training"]["step"] == 2 and cfg["training"]["iters"] == 2 and cfg["training"]["finished"]
    assert "40 iterations would take" in err and "training 2" in err and "--budget-minutes M" in err, err
    assert read_config(tmp_path / "side")["training"]["step"] == 2


def test_a_budget_that_fits_leaves_the_iterations_alone(tmp_path, capsys):
    cfg = ts.train_sidenet(Linear().eval(), *data(), tmp_path / "side", settings(iters=3), progress=False,
                           budget_s=3600.0)
    assert cfg["training"]["step"] == 3 and "would take" not in capsys.readouterr().err


def _signal_during(monkeypatch, at_calls: dict[int, list[int]]):
    """Send the listed signals to this process inside the given _train_step calls (1-based)."""
    real, calls = ts._train_step, []

    def step(*a, **kw):
        calls.append(1)
        for sig in at_calls.get(len(calls), []):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # let the handler run here, mid-iteration
        return real(*a, **kw)

    monkeypatch.setattr(ts, "_train_step", step)
    return calls


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_first_checkpoint_keeps_a_usable_resumable_one(sig, tmp_path, monkeypatch, capsys):
    out = tmp_path / "side"
    calls = _signal_during(monkeypatch, {1: [sig]})
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        ts.train_sidenet(Linear().eval(), *data(), out, settings(iters=6, ckpt_every=50), progress=False)
    assert len(calls) == 1 and signal.getsignal(sig) is before  # stopped after the one under way; handler restored
    assert "wrote the checkpoint of iteration 1" in capsys.readouterr().err
    cfg = read_config(out)
    assert cfg["training"]["step"] == 1 and not cfg["training"]["finished"]
    side = load_sidenet(out, Linear().eval())  # usable as it is
    assert side.checkpoint_config["training"]["step"] == 1
    monkeypatch.undo()
    done = ts.train_sidenet(Linear().eval(), *data(), out, settings(iters=6, ckpt_every=50), progress=False,
                            resume=True)
    assert done["training"]["step"] == 6 and done["training"]["finished"]


def test_a_second_signal_aborts_at_once_without_writing(tmp_path, monkeypatch):
    out = tmp_path / "side"
    _signal_during(monkeypatch, {1: [signal.SIGINT, signal.SIGINT]})
    with pytest.raises(KeyboardInterrupt):
        ts.train_sidenet(Linear().eval(), *data(), out, settings(), progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_cli_sigint_exits_130_with_a_checkpoint(tmp_path):
    """The real command in its own process: SIGINT after the first iteration -> exit 130, a checkpoint."""
    net = MLPBackbone(state_shape=(2,), num_classes=8, hidden=16, depth=1)
    arch = {"type": "mlp", "state_shape": [2], "num_classes": 8, "hidden": 16, "depth": 1}
    save_checkpoint(tmp_path / "backbone", net, {"kind": "backbone", "arch": arch,
                                                 "data": dataset_info("gaussians8").meta()})
    out = tmp_path / "side"
    cmd = [sys.executable, "-m", "anchorflow", "train", "sidenet", "--backbone", str(tmp_path / "backbone"),
           "--out", str(out), "--iters", "1000000", "--batch", "64", "--chain", "4", "--width", "8", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    err = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the ETA line: the first iteration is done
            line = proc.stderr.readline()
            err += line
            if "ETA" in line or not line:
                break
        assert "1000000 iterations: ETA" in err, err
        proc.send_signal(signal.SIGINT)
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err += rest_err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "wrote the checkpoint of iteration" in err and "--resume" in err, err
    cfg = read_config(out)
    assert cfg["training"]["step"] >= 1 and not cfg["training"]["finished"]


FACTORY = '''
import torch


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), 0.5))

    def forward(self, x, tau, text):
        return torch.tanh(x * self.w[None, :, None, None] * tau[:, None, None, None] + text.mean(1)[:, :, None, None])


def make():
    spec = {"name": "toy", "state": (2, "H", "W"), "axes": {"H": (2, 4, 8), "W": (2, 4, 8), "L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 2)}],
            "time": {"map": "flip"}, "guidance": {"mode": "rows"}}
    return Toy(), spec
'''


def test_conditions_without_a_null_row_fail_first_naming_options_that_exist(tmp_path, capsys, monkeypatch):
    """Guidance on [cond; null] rows needs a null row: one line before any work, naming --null-cond
    (there is no --label-dropout option), and nothing written."""
    import numpy as np

    from anchorflow.cli import main
    from anchorflow.trainers.sidenet_run import load_backbone

    (tmp_path / "toy.py").write_text(FACTORY)
    np.savez(tmp_path / "cond.npz", text=np.ones((2, 3, 2), np.float32))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "sidenet", "--backbone", "toy.py:make", "--out", "side", "--cond", "cond.npz", "--data", "none",
              "--iters", "1", "--batch", "2", "--chain", "1", "--start-states", "2", "--solve-steps", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error:") and err.count("\n") == 1, err
    assert "--null-cond FILE" in err and "label_dropout=0" in err, err
    from anchorflow.commands.train_sidenet import sidenet

    options = {o for p in sidenet.params for o in p.opts}
    assert "--null-cond" in options and not any("dropout" in o for o in options)  # the message names what exists
    assert sorted(set(os.listdir(tmp_path)) - {"__pycache__"}) == ["cond.npz", "toy.py"]
    # the library refuses too, before writing (a caller passing conditions and no null row)
    src = load_backbone("toy.py:make", tmp_path / "lib")
    with pytest.raises(ConfigError, match="--null-cond"):
        ts.train_sidenet(src.module, torch.zeros(2, 2, 4, 4), {"text": torch.ones(2, 3, 2)}, tmp_path / "lib",
                         settings(iters=1, arch={}), progress=False)
    assert not (tmp_path / "lib").exists()
    ts.train_sidenet(src.module, torch.zeros(2, 2, 4, 4), {"text": torch.ones(2, 3, 2)}, tmp_path / "lib",
                     settings(iters=1, arch={}, label_dropout=0.0), progress=False)  # the named way out works
