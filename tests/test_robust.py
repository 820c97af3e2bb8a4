"""Issue 14, "never lie, never lose": one test per finding that failed before the fix.

Real components only (the bundled digits bundle, tiny torch models); the CLI runs in-process
through ``anchorflow.cli.main`` exactly as the ``anchorflow`` script does.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anchorflow.cli import main
from anchorflow.modelref import BUNDLED

ROOT = BUNDLED / "digits"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``anchorflow ARGV``, in-process."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- item 3: a trainer stops at the first non-finite loss and keeps the last good checkpoint -----
def test_sidenet_training_on_a_nan_backbone_stops_and_writes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from anchorflow.errors import NonFiniteError
    from tests.test_train_sidenet import settings, tiny_backbone, tiny_data

    from anchorflow.trainers.train_sidenet import train_sidenet

    backbone = tiny_backbone()
    with torch.no_grad():
        backbone.mu[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="at step 1; stopped, nothing was written"):
        train_sidenet(backbone, *tiny_data(), tmp_path / "side", settings(), progress=False)
    assert not (tmp_path / "side").exists()


def test_training_that_turns_nan_keeps_the_last_good_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from anchorflow._io import sha256_file
    from anchorflow.errors import NonFiniteError
    from anchorflow.trainers.sidenet import backbone_identity
    from tests.test_train_sidenet import settings, tiny_backbone, tiny_data

    from anchorflow.trainers.train_sidenet import train_sidenet

    backbone, out = tiny_backbone(), tmp_path / "side"
    identity = backbone_identity(backbone)
    train_sidenet(backbone, *tiny_data(), out, settings(iters=4), identity=identity, progress=False)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with torch.no_grad():
        backbone.log_s.fill_(float("inf"))  # the backbone turns to NaN from here on
    with pytest.raises(NonFiniteError, match=r"at step 5; stopped, .* keeps its last good checkpoint \(step 4\)"):
        train_sidenet(backbone, *tiny_data(), out, settings(iters=8), identity=identity, resume=True,
                      progress=False)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
