"""`anchorflow train ...`: lazy help, one-line user errors (exit 1, no traceback), a tiny real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from anchorflow.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process exactly as the `anchorflow` script does; returns (status, out, err)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def test_train_help_lists_subcommands_without_importing_torch() -> None:
    code = ("import sys\nfrom anchorflow.cli import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "NO-TORCH" in out
    for name in ("backbone", "classifier", "sidenet"):
        assert name in out


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "error: --steps must be a positive integer, got 0"),
    (["--batch", "-4"], "error: --batch must be a positive integer, got -4"),
    (["--data", "mnist"], "error: data set 'mnist' needs a download"),
    (["--data", "foo"], "error: unknown data set 'foo'; known data sets: digits, gaussians8"),
])
def test_bad_arguments_give_one_line_and_exit_1(argv, message, tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    status, _, err = _run(["train", "backbone", "--out", str(tmp_path / "o"), *argv], capsys)
    assert status == 1
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_resume_of_a_missing_checkpoint_is_one_line(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    status, _, err = _run(["train", "backbone", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert status == 1 and err.count("\n") == 1
    assert "does not exist" in err and "drop --resume" in err


def test_tiny_backbone_run_records_its_command_and_resumes(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bb"
    argv = ["train", "backbone", "--data", "gaussians8", "--out", str(out), "--steps", "4", "--batch", "16",
            "--hidden", "16", "--depth", "1", "--ckpt-every", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/anchorflow", *argv])
    status, stdout, _ = _run(argv, capsys)
    assert status == 0 and f"wrote {out}" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["command"] == "anchorflow " + " ".join(argv)
    assert cfg["training"]["step"] == 4 and cfg["data"]["name"] == "gaussians8"
    assert cfg["arch"] == {"type": "mlp", "state_shape": [2], "num_classes": 8, "hidden": 16, "depth": 1}
    more = [a if a != "4" else "6" for a in argv] + ["--resume"]
    status, _, _ = _run(more, capsys)
    assert status == 0 and json.loads((out / "config.json").read_text())["training"]["step"] == 6
