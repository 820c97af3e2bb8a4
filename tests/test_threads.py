"""The onnxruntime thread policy (runtime/bundles/threads.py): decided once per process, applied to every session."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anchorflow.base.errors import ConfigError
from anchorflow.runtime.bundles import threads


@pytest.mark.parametrize("load, want", [(0.1, 2), (99.0, 1)])
def test_auto_follows_the_load(monkeypatch, load, want):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    got = threads.decide()
    assert (got.mode, got.threads, got.spin) == ("session", want, False)  # never the global pool unasked


AUTO_THEN_FOREIGN = r"""
import numpy as np, onnxruntime as ort
from anchorflow.runtime import load_bundle
from anchorflow.modelref import BUNDLED, DEFAULT_NAME
path = BUNDLED / DEFAULT_NAME / "bundle"
b = load_bundle(path, backend="ort-cpu")
x = np.zeros((2, 1, 8, 8), np.float32)
b.velocity(x, np.ones(2, np.float32), {"y": np.array([0, 1])})
onnx = sorted(path.glob("*.onnx"))[0]
ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])  # a host's own session, default options
print("foreign session ok")
"""


@pytest.mark.parametrize("load", ["quiet", "busy"])
def test_the_default_policy_leaves_other_sessions_in_the_process_alone(load):
    """Regression: ``auto`` once made onnxruntime's global pool on a quiet machine, after which every other
    session in the process (the exporter's validation, a user's own) was refused by onnxruntime."""
    code = AUTO_THEN_FOREIGN
    if load == "busy":
        code = "import os; os.getloadavg = lambda: (999.0,) * 3\n" + code
    else:
        code = "import os; os.getloadavg = lambda: (0.0,) * 3\n" + code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "foreign session ok" in proc.stdout


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        threads.decide(bad)
    with pytest.raises(ConfigError, match="thread mode"):
        threads.decide(None, "many")


CHECK = r"""
import numpy as np
from anchorflow.base.errors import ConfigError
from anchorflow.runtime import load_bundle
from anchorflow.runtime.bundles import threads
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
