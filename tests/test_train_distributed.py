"""Multi-process training (trainers/distributed.py): torchrun with 2 gloo processes on the CPU
gives the same weights as one process with the same global batch and seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from anchorflow.base.errors import ConfigError  # noqa: E402
from anchorflow.trainers.backbone import MLPBackbone  # noqa: E402
from anchorflow.trainers.checkpoint import read_config, save_checkpoint  # noqa: E402
from anchorflow.trainers.data import dataset_info  # noqa: E402
from anchorflow.trainers.distributed import Dist  # noqa: E402

LR = 1e-2
SIDENET = ["train", "sidenet", "--iters", "3", "--batch", "16", "--chain", "2", "--width", "8", "--rate", "50,5",
           "--lr", str(LR), "--ckpt-every", "2", "--threads", "1"]
BACKBONE = ["train", "backbone", "--data", "gaussians8", "--hidden", "16", "--depth", "1", "--batch", "16",
            "--lr", str(LR), "--ckpt-every", "2", "--threads", "1"]
# Float reduction order differs (DDP averages two 8-row gradients, one process one 16-row mean; the
# convolutions run on 8 or 16 rows). AdamW normalises each gradient, so such rounding-level
# differences move a weight by a small fraction of one step (measured: 2e-5 for the SideNet at
# lr 1e-2, 1e-8 for the backbone). A real fault (a rank on other rows, a gradient not averaged,
# generators out of step) moves weights by about one step, lr = 1e-2; allowed: lr / 100.
TOL = LR / 100


def _mlp_backbone(path) -> None:
    torch.manual_seed(0)
    net = MLPBackbone((2,), num_classes=8, hidden=16, depth=1)
    for p in net.parameters():  # non-zero output layer, so the SideNet has something to learn
        torch.nn.init.normal_(p, std=0.3)
    arch = {"type": "mlp", "state_shape": [2], "num_classes": 8, "hidden": 16, "depth": 1}
    save_checkpoint(path, net, {"kind": "backbone", "arch": arch, "data": dataset_info("gaussians8").meta()})


def _torchrun(args: list[str], cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANCHORFLOW_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "anchorflow",
           *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, res.stdout  # rank 0 alone reports


def _single(args: list[str], monkeypatch) -> None:
    from anchorflow.cli import main

    monkeypatch.setenv("ANCHORFLOW_DEVICE", "cpu")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    try:
        main(args)
    except SystemExit as exc:  # click's standalone exit
        assert not exc.code


def _raw_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "train_state.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k != "rng")


@pytest.mark.slow
def test_two_process_sidenet_run_equals_one_process_run(tmp_path, monkeypatch):
    _mlp_backbone(tmp_path / "bb")
    monkeypatch.chdir(tmp_path)
    _single([*SIDENET, "--backbone", "bb", "--out", "one"], monkeypatch)
    _torchrun([*SIDENET, "--backbone", "bb", "--out", "two"], tmp_path)
    one, two = _raw_state(tmp_path / "one"), _raw_state(tmp_path / "two")
    assert torch.equal(one["rng"], two["rng"])  # the generators consumed the same global stream
    assert _max_diff(one, two) < TOL  # raw weights and AdamW moments
    moved = max(float((one[k] - torch.zeros_like(one[k])).abs().max()) for k in one if "conv_out" in k)
    assert moved > 10 * TOL  # the output layer left its zero init: the comparison is not vacuous
    cfg1, cfg2 = read_config(tmp_path / "one"), read_config(tmp_path / "two")
    for (s1, l1), (s2, l2) in zip(cfg1["training"]["loss_log"], cfg2["training"]["loss_log"]):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)  # the logged loss is the global batch's
    assert cfg2["training"]["command"].startswith("torchrun --nnodes=1 --nproc_per_node=2 -m anchorflow train sidenet")


@pytest.mark.slow
def test_two_process_backbone_run_resumes_and_equals_one_process_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _single([*BACKBONE, "--steps", "3", "--out", "one"], monkeypatch)
    _torchrun([*BACKBONE, "--steps", "2", "--out", "two"], tmp_path)
    _torchrun([*BACKBONE, "--steps", "3", "--out", "two", "--resume"], tmp_path)
    one, two = _raw_state(tmp_path / "one"), _raw_state(tmp_path / "two")
    assert torch.equal(one["rng"], two["rng"])
    assert _max_diff(one, two) < TOL
    assert read_config(tmp_path / "two")["training"]["step"] == 3


def test_rows_are_split_in_contiguous_blocks_of_the_global_draw():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = Dist().draw(torch.randn, g1, 12, 2)
    parts = [Dist(rank=r, world=3).draw(torch.randn, torch.Generator().manual_seed(3), 4, 2) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    Dist(rank=1, world=3).draw(torch.randn, g2, 4, 2)
    assert torch.equal(g1.get_state(), g2.get_state())  # every rank advances its generator by the global draw


def test_a_global_batch_the_ranks_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        Dist(rank=0, world=3).local_batch(16)
    assert Dist(rank=0, world=4).local_batch(16) == 4


def test_python_dash_m_anchorflow_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "anchorflow", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "sidenet" in res.stdout
