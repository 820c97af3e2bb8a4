""".ci/run runs the README's test command verbatim, then the linter."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim_then_ruff():
    readme = (ROOT / "README.md").read_text().splitlines()
    command = [line for line in readme if "-m pytest" in line and "pip install" in line]
    assert len(command) == 1, f"README.md should give one install-and-test command line, found {command}"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command[0].strip() in ci, "the README's test command changed: copy it into .ci/run"
    assert "ruff check ." in ci and ci.index("ruff check .") > ci.index(command[0].strip())
    assert ci[0].startswith("#!") and "set -euo pipefail" in ci  # a failing step fails the run
