"""Issue 31's classes that are not a refusal, so not rows of the bad-input matrix (tests/test_bad_input.py):
an unwritable start-state cache (was a hang: minutes of solving, then a failed write) and ``bandit show
--model`` accepting the state of its own model (the matrix has the refusal of another model's state)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from anchorflow.cli import main

from _bundles import ROOT


def _read_only(folder) -> list[str] | None:
    """A command prefix under which ``folder`` is read-only: a read-only bind mount in a private mount
    namespace (root: permission bits do not stop root), or mode 0555 for another user; None if neither."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && ! touch "$0/probe"',
                            str(folder)], capture_output=True, timeout=30)
    if probe.returncode:
        return None
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]


@pytest.mark.timeout(180)
def test_train_sidenet_with_a_read_only_cache_dir_says_so_first_and_trains(tmp_path):
    pytest.importorskip("torch")
    cache, out = tmp_path / "cache", tmp_path / "sn"
    cache.mkdir()
    prefix = _read_only(cache)
    if prefix is None:
        pytest.skip("no way to make a read-only folder here (root without unshare)")
    argv = [sys.executable, "-m", "anchorflow.cli", "train", "sidenet", "--backbone", str(ROOT / "backbone"),
            "--out", str(out), "--data", "none", "--iters", "1", "--batch", "8", "--start-states", "4",
            "--solve-steps", "2", "--cache-dir", str(cache)]
    proc = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr
    warning = err.find("warning: ")
    assert warning >= 0 and "--cache-dir" in err[warning:].splitlines()[0], err
    assert "without caching" in err[warning:].splitlines()[0]
    assert warning < err.find("data-free start states"), "the unwritable cache must be found before the solve"
    assert list(cache.iterdir()) == [] and (out / "model.safetensors").is_file()


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_bandit_show_with_its_own_model_shows_the_state(tmp_path, capsys):
    """The state `sample MODEL --solver fastflow` wrote is accepted for MODEL, given as `default`, as its
    bundle folder or as a copy of it (same weights); guided states (cfg != 1) too."""
    bundle = tmp_path / "copy"
    shutil.copytree(ROOT / "bundle", bundle)
    for cfg in ("1", "2"):
        state = tmp_path / f"s{cfg}.json"
        code, _, err = _run(["sample", "default", "--solver", "fastflow", "--nfe", "10", "--n", "2", "--cfg", cfg,
                             "--bandit-state", state, "--out", tmp_path / "s.png"], capsys)
        assert code == 0, err
        code, plain, _ = _run(["bandit", "show", state, "--json"], capsys)
        assert code == 0
        for model in ("default", ROOT / "bundle", bundle):
            code, out, err = _run(["bandit", "show", state, "--json", "--model", model], capsys)
            assert code == 0 and out == plain, err
        assert json.loads(plain)["model_id"].split("|")[0] == json.loads((ROOT / "bundle" / "bundle.json").read_text(
        ))["networks"]["backbone"]["checkpoint"]["weights_sha256"]


def test_a_service_on_nan_weights_answers_500_and_never_nan_samples(tmp_path):
    """The service's other line of defence (the request is valid, the model is not): a bundle whose
    backbone computes NaN (sha256 updated, as a re-export of NaN weights) gives a 500 without samples and
    without internal exception text, never a 200 with NaN; the same service's good requests are unharmed."""
    import numpy as np

    from anchorflow.serve.service import SamplerService

    from _bundles import copy_root, poison_onnx

    root = copy_root(tmp_path / "r", ("bundle",))
    poison_onnx(root / "bundle", "backbone")
    bad = SamplerService(str(root / "bundle"), backend="ort-cpu", bandit_dir=str(tmp_path / "bd"))
    body = json.dumps({"solver": "euler", "nfe": 3, "n": 2}).encode()
    rep = bad.sample_batch([bad.parse(body)])[0]
    assert rep.status == 500 and rep.x is None
    assert "NonFiniteError" not in rep.error and "Traceback" not in rep.error and len(rep.error) < 300
    good = SamplerService("default", backend="ort-cpu", bandit_dir=str(tmp_path / "bd"))
    ok = good.sample_batch([good.parse(body)])[0]
    assert ok.status == 200 and np.isfinite(ok.x).all()
