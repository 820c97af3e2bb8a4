"""`anchorflow verify`: cross-backend parity of one bundle, per network and end to end.

Truths: the torch checkpoints (reference), exit statuses (a failed comparison exits 1), and
sys.modules of a fresh interpreter (``--backends ort-cpu`` never imports torch).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from anchorflow.runtime.evaluation.parity.verify import BACKEND_NAMES, E2E_FACTOR, verify_bundle
from anchorflow.runtime.evaluation.parity import TOLERANCES

from test_export import tiny_bundle, tiny_root  # noqa: F401  (session fixtures, exported once)


@pytest.fixture(scope="module")
def torch_report(tiny_bundle):  # noqa: F811
    return verify_bundle(tiny_bundle, ["torch", "ort-cpu", "ort-cuda"], ["fp32", "fp16"])


def test_ort_matches_torch_per_network_and_end_to_end(torch_report):
    r = torch_report
    assert r.reference == "torch" and r.passed
    rows = {(x.network, x.runtime, x.precision): x for x in r.reports}
    assert set(rows) == {(n, "ort-cpu", p) for n in ("backbone", "sidenet", "e2e ba@7") for p in ("fp32", "fp16")}
    for net in ("backbone", "sidenet"):
        rep = rows[(net, "ort-cpu", "fp32")]
        assert len(rep.results) == 6  # batch 1, 7, max x random / real
        assert rep.worst().max_abs <= TOLERANCES["fp32"].atol and rep.tolerance.stat == "max"
        assert rows[(net, "ort-cpu", "fp16")].tolerance == TOLERANCES["fp16"]
    e2e = rows[("e2e ba@7", "ort-cpu", "fp32")]
    assert e2e.tolerance.atol == pytest.approx(TOLERANCES["fp32"].atol * E2E_FACTOR)
    assert 0 < e2e.worst().max_abs <= e2e.tolerance.atol  # different kernels, same samples
    assert r.providers["ort-cpu/fp32"] == ["CPUExecutionProvider"]
    assert "torch backend runs the checkpoints in fp32 only" in r.unavailable["torch/fp16"]
    if "ort-cuda/fp32" in r.unavailable:
        assert "CUDAExecutionProvider" in r.unavailable["ort-cuda/fp32"]


def test_report_json_lists_every_comparison(torch_report):
    d = json.loads(json.dumps(torch_report.as_dict()))
    assert d["passed"] and d["reference"] == "torch" and len(d["comparisons"]) == 6
    first = d["comparisons"][0]
    assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel", "needed_atol"} <= set(first["worst"])


def test_a_failed_comparison_exits_1(tiny_bundle):  # noqa: F811
    from click.testing import CliRunner

    from anchorflow.cli import cli

    out = CliRunner().invoke(cli, ["verify", str(tiny_bundle), "--backends", "torch,ort-cpu", "--atol", "1e-12"])
    assert out.exit_code == 1
    assert "FAIL" in out.output and "FAILED: backbone fp32 on ort-cpu vs torch" in out.output


def test_bundle_without_sidenet_is_checked_with_euler(tiny_bundle, tmp_path):  # noqa: F811
    folder = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    meta = json.loads((folder / "bundle.json").read_text())
    del meta["networks"]["sidenet"]
    (folder / "bundle.json").write_text(json.dumps(meta))
    r = verify_bundle(folder, ["ort-cpu"], ["fp16"])
    assert r.reference == "ort-cpu" and r.passed
    assert [x.network for x in r.reports] == ["backbone", "e2e euler@7"]


VERIFY_WITHOUT_TORCH = r"""
import json, sys
from anchorflow.cli import main
try:
    main(["verify", sys.argv[1], "--backends", "ort-cpu", "--precision", "fp32,fp16", "--json"])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"torch_loaded": "torch" in sys.modules, "code": code}))
"""


def test_verify_on_ort_cpu_runs_without_torch(tiny_bundle):  # noqa: F811
    proc = subprocess.run([sys.executable, "-c", VERIFY_WITHOUT_TORCH, str(tiny_bundle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *report, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"torch_loaded": False, "code": 0}
    d = json.loads("\n".join(report))
    assert d["reference"] == "ort-cpu" and d["passed"]
    # ort-cpu fp32 is the reference itself; its fp16 variant is compared against it
    assert {(c["network"], c["precision"]) for c in d["comparisons"]} == {
        ("backbone", "fp16"), ("sidenet", "fp16"), ("e2e ba@7", "fp16")}


def test_bad_backend_name_is_a_usage_error(tiny_bundle):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "verify", str(tiny_bundle), "--backends", "gpu"],
                          capture_output=True, text=True, timeout=60)
    # the choices are the runtime's backend registry, less "auto"
    assert proc.returncode == 1 and f"--backends takes a comma list of {', '.join(BACKEND_NAMES)};" in proc.stderr
    assert "torch" in BACKEND_NAMES and "auto" not in BACKEND_NAMES
