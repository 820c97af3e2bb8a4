"""A bundle is data: opening, inspecting, verifying, sampling or tuning a bundle never imports or
runs code named in it; every path it names stays inside it; inspect and verify check what they report.

Fixtures come from the real exporter: a factory module exported once per session (tests/_trust_bundles.py)
and copies of the bundled digits bundle. Each command runs in-process through ``anchorflow.cli.main``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from anchorflow.cli import main

from _trust_bundles import point_source_at, write_evil, write_factory

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="session")
def factory_bundle(tmp_path_factory) -> dict:
    """A bundle exported from a factory file (fp32, max batch 4) and that factory's source string."""
    base = tmp_path_factory.mktemp("trust-factory")
    source = write_factory(base / "src")
    out = base / "bundle"
    try:
        main(["export", source, "--out", str(out), "--max-batch", "4"])
    except SystemExit as exc:
        assert not exc.code, exc.code
    return {"bundle": out, "source": source}


@pytest.fixture
def evil(factory_bundle, tmp_path, monkeypatch):
    """A copy of the factory bundle whose bundle.json names a factory that writes a marker when imported."""
    marker = tmp_path / "MARKER"
    sources = write_evil(tmp_path / "evil", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "evil"))
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "c.npz", text=np.ones((2, 3, 3), np.float32))
    np.savez(tmp_path / "n.npz", text=np.zeros((1, 3, 3), np.float32))
    bundle = tmp_path / "bundle"
    shutil.copytree(factory_bundle["bundle"], bundle)
    return {"bundle": bundle, "marker": marker, "sources": sources, "good": factory_bundle["source"]}


SAMPLE = ["--solver", "euler", "--nfe", "2", "--n", "2", "--cond", "c.npz", "--null-cond", "n.npz", "--npy", "s.npy"]


@pytest.mark.parametrize("form", ["file", "module"])
def test_no_command_imports_the_factory_a_bundle_names(evil, form, capsys):
    b, marker = evil["bundle"], evil["marker"]
    point_source_at(b, evil["sources"][form])
    code, out, _ = run(["inspect", b], capsys)
    assert code == 0 and "evil" in out  # the recorded source is shown, never imported
    for backends in ("torch", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch,ort-cpu"):
        code, out, err = run(["verify", b, "--backends", backends], capsys)
        assert code == 1 and not marker.exists(), backends
    assert "--source" in out and "--trust-source" in out  # the torch row says how to give the source
    for backend in ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch"):
        code, _, err = run(["sample", b, "--backend", backend, *SAMPLE], capsys)
        assert code == (0 if backend in ("auto", "ort-cpu") else 1), err
    for backend in ("auto", "torch"):
        run(["tune", b, "--solvers", "euler", "--nfe", "2", "--samples", "2", "--max-evals", "1",
             "--reference-steps", "2", "--quiet", "--backend", backend], capsys)
    # serve: the pre-flight of `anchorflow serve` opens the sampler exactly as each replica does
    from anchorflow.serve.app import ServeOptions, check

    for backend in ("auto", "ort-cpu"):
        check(ServeOptions(model=str(b), backend=backend, port=1))
    assert not marker.exists()
    # the comparison with torch works with the source given on the command line ...
    code, out, err = run(["verify", b, "--backends", "torch,ort-cpu", "--source", evil["good"]], capsys)
    assert code == 0 and "reference: torch" in out and "differs from the one bundle.json records" in err
    assert not marker.exists()
    # ... and the documented opt-in really runs what the bundle names (so the checks above could fail)
    code, _, err = run(["verify", b, "--backends", "torch,ort-cpu", "--trust-source"], capsys)
    assert marker.exists()


def test_verify_lists_an_asked_backend_or_precision_it_did_not_compare(evil, capsys):
    b = evil["bundle"]
    code, out, err = run(["verify", b, "--backends", "torch,ort-cpu", "--source", evil["good"],
                          "--precision", "fp32,fp16"], capsys)
    assert code == 1 and "asked but not compared: precision fp16" in error_line(err)
    code, out, err = run(["verify", b, "--backends", "torch,ort-cpu,trt", "--source", evil["good"]], capsys)
    assert code == 1 and "asked but not compared: backend trt" in error_line(err)
    code, out, err = run(["verify", b, "--source", evil["good"]], capsys)  # defaults: unavailable ones only listed
    assert code == 0 and "skipped trt/fp32" in out
