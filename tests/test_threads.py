"""The onnxruntime thread policy (runtime/threads.py): decided once per process, applied to every session."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anchorflow.errors import ConfigError
from anchorflow.runtime import threads


@pytest.mark.parametrize("load, mode, want", [(0.1, "shared", 2), (99.0, "session", 1)])
def test_auto_follows_the_load(monkeypatch, load, mode, want):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    got = threads.decide()
    assert (got.mode, got.threads) == (mode, want)
    assert got.spin is (mode == "shared")  # no spinning next to busy neighbours


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        threads.decide(bad)
    with pytest.raises(ConfigError, match="thread mode"):
        threads.decide(None, "many")


CHECK = r"""
import numpy as np
from anchorflow.errors import ConfigError
from anchorflow.runtime import load_bundle, threads
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
mode = __import__("sys").argv[1]
pol = threads.configure(1, mode)
b = load_bundle(BUNDLED / DEFAULT_NAME / "bundle", backend="ort-cpu", threads=1)
x = np.zeros((2, 1, 8, 8), np.float32)
v = b.velocity(x, np.ones(2, np.float32), {"y": np.array([0, 1])})
assert v.shape == x.shape and threads.policy() == pol
other = "session" if mode == "shared" else "shared"
try:
    threads.configure(2, other)
except ConfigError as exc:
    print("refused:", exc)
print("policy:", pol.mode)
"""


@pytest.mark.parametrize("mode", ["shared", "session"])
def test_a_process_keeps_its_first_policy(mode):
    """Both sessions (backbone, SideNet) open under the chosen policy; onnxruntime cannot change it later,
    so a second, different explicit policy is refused with a one-line reason."""
    proc = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"policy: {mode}" in proc.stdout
    assert "refused: this process already runs onnxruntime with" in proc.stdout
