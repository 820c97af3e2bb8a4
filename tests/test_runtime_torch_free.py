"""The runtime and the CLI's entry points never import torch or tensorrt (fresh subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("torch", "tensorrt")

# Any attempt to import a forbidden package is recorded and fails, as on an edge box without it.
BLOCKER = r"""
import importlib.abc, sys
FORBIDDEN = %r
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            attempts.append(name)
            raise ModuleNotFoundError(f"{name} is blocked by the torch-free test", name=name)
        return None
sys.meta_path.insert(0, Block())
""" % (FORBIDDEN,)

SOLVE_ALL = r"""
import json
import numpy as np
import anchorflow.cli
import anchorflow.runtime as rt
from anchorflow.runtime.evaluation.analytic import GaussianMixture

mix = GaussianMixture.random((1, 2, 2), 4, classes=2)
noise = np.random.default_rng(0).standard_normal((3, 1, 2, 2)).astype(np.float32)
done = {}
for name in rt.solver_names():
    spec = rt.SOLVERS[name]
    if spec.needs_sidenet:
        continue
    nfe = 4 if spec.nfe_rule == "grid" else spec.nfe_for_steps(max(spec.min_nfe, 4))
    res = rt.solve(name, mix, noise, nfe, y=np.array([0, 1, 0]), cfg_scale=1.5, null_label=mix.null_label)
    done[name] = [res.nfe, str(res.x.dtype), bool(np.isfinite(res.x).all())]
print(json.dumps({"done": done, "attempts": attempts, "loaded": [m for m in FORBIDDEN if m in sys.modules]}))
"""


def _python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_runtime_solves_with_every_plain_method_without_torch():
    proc = _python("-c", BLOCKER + SOLVE_ALL)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["loaded"] == []
    assert {"euler", "heun", "rk4", "ab2", "ipndm", "dpmpp2m"} <= set(report["done"])
    for name, (nfe, dtype, finite) in report["done"].items():
        assert finite and dtype == "float32", name


@pytest.mark.parametrize("argv, expect", [(["--help"], "solvers"), (["solvers"], "dpmpp2m")])
def test_cli_runs_without_torch(argv, expect):
    code = BLOCKER + f"""
from anchorflow.cli import main
main({argv!r})
print("IMPORT-ATTEMPTS", attempts, [m for m in FORBIDDEN if m in sys.modules])
"""
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert "IMPORT-ATTEMPTS [] []" in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["solvers"]])
def test_real_entry_point_imports_no_torch(argv):
    """``python -m anchorflow.cli``, unpatched; the interpreter's own import log must not name torch."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = _python("-m", "anchorflow.cli", *argv, env=env)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "click" in imported  # the log is really there
    assert not imported & set(FORBIDDEN)


def _readme_python_api() -> str:
    """The code block under README.md's "## Python API" heading, as printed."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_readme_python_api_example_runs_without_torch():
    """The README's API example, taken from its text, runs in the torch-free install (torch blocked)."""
    example = _readme_python_api()
    assert 'load_bundle("default"' in example  # it needs nothing but the installed package
    check = """
print("RESULT", json.dumps({"shape": list(res.x.shape), "nfe": res.nfe, "side": res.sidenet_calls,
                            "finite": bool(np.isfinite(res.x).all()), "attempts": attempts,
                            "loaded": [m for m in FORBIDDEN if m in sys.modules]}))
"""
    proc = _python("-c", BLOCKER + "import json\n" + example + "\n" + check)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # the example asks for 16 digits by the BA-solver at 7 backbone calls (one SideNet call per step)
    assert report == {"shape": [16, 1, 8, 8], "nfe": 7, "side": 7, "finite": True, "attempts": [], "loaded": []}
