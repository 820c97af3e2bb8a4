"""The CLI as a user meets it: demo and sample on the bundled model, one-line errors, torch-free.

Each run is a subprocess so that the check on ``sys.modules`` sees a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorflow.modelref import BUNDLED

BUNDLE = BUNDLED / "digits" / "bundle" / "bundle.json"
needs_bundle = pytest.mark.skipif(not BUNDLE.is_file(), reason="the bundled digits bundle is not exported")

# Runs the CLI's main() in-process of a fresh interpreter, then reports heavy imports on stderr.
RUNNER = (
    "import sys\n"
    "from anchorflow.cli import main\n"
    "try:\n    main(sys.argv[1:])\n"
    "finally:\n"
    "    heavy = [m for m in ('torch', 'tensorrt') if m in sys.modules]\n"
    "    print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def heavy(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sample", "--help"], ["bench", "--help"],
                                  ["train", "--help"], ["export", "--help"], ["build", "--help"]])
def test_help_is_torch_free(args):
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert heavy(proc) == "HEAVY="


@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "/no/such/model"], "not found"),
        (["sample", "default", "--solver", "nope"], "unknown solver"),
        (["sample", "default", "--solver", "heun", "--nfe", "4"], "must be one of 3, 5, 7"),
        (["sample", "default", "--labels", "42"], "--labels"),
        (["sample", "default", "--solver", "euler", "--bandit-state", "x.json"], "only apply"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, words, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("HEAVY=")]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_positive_count_is_exit_1_like_every_other_fixable_value(tmp_path):
    proc = run_cli("sample", "default", "--n", "0", cwd=tmp_path)
    assert proc.returncode == 1 and "must be a positive integer" in proc.stderr and "Traceback" not in proc.stderr


@needs_bundle
@pytest.mark.parametrize("solver, nfe", [("ba", 5), ("euler", 5)])
def test_sample_default_writes_a_grid_without_torch(tmp_path, solver, nfe):
    out, npy = tmp_path / "s.png", tmp_path / "s.npy"
    proc = run_cli("sample", "default", "--solver", solver, "--nfe", str(nfe), "--n", "12", "--cfg", "1.5",
                   "--out", str(out), "--npy", str(npy))
    assert proc.returncode == 0, proc.stderr
    assert heavy(proc) == "HEAVY="
    assert f"{nfe} backbone calls" in proc.stdout
    x = np.load(npy)
    assert x.shape == (12, 1, 8, 8) and np.isfinite(x).all()
    assert Image.open(out).size[0] > 0


@needs_bundle
def test_sample_fastflow_learns_across_invocations(tmp_path):
    state = tmp_path / "bandit.json"
    for _ in range(2):
        proc = run_cli("sample", "default", "--solver", "fastflow", "--nfe", "12", "--n", "4",
                       "--bandit-state", str(state), "--out", str(tmp_path / "f.png"))
        assert proc.returncode == 0, proc.stderr
    assert json.loads(state.read_text())  # a versioned JSON state that the next call reads
    proc = run_cli("bandit", "show", str(state))
    assert proc.returncode == 0, proc.stderr


@needs_bundle
def test_demo_writes_its_folder_without_torch(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--n", "10", "--nfe", "6")
    assert proc.returncode == 0, proc.stderr
    assert heavy(proc) == "HEAVY="
    summary = json.loads((out / "summary.json").read_text())
    methods = {r["method"] for r in summary["results"]}
    assert {"euler", "ba"} <= methods
    assert (out / "comparison.png").is_file() and (out / "summary.md").is_file()
    # the BA-solver beats Euler at the same budget against the 512-call reference
    psnr = {(r["method"], r["nfe"]): r["psnr_db"] for r in summary["results"]}
    assert psnr[("ba", 6)] > psnr[("euler", 6)]
