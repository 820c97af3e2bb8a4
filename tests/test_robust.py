"""Issue 14, "never lie, never lose": one test per finding that failed before the fix.

Real components only (the bundled digits bundle, tiny torch models); the CLI runs in-process
through ``anchorflow.cli.main`` exactly as the ``anchorflow`` script does.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def shown(err: str) -> list[str]:
    """The non-empty lines a terminal shows for ``err`` (a progress bar redrawn with \\r leaves nothing)."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def one_error_line(err: str) -> str:
    # informational lines (a tuned grid's note, warnings) may precede; exactly one error line, last
    lines = [line for line in shown(err) if not line.startswith(("grid: ", "note: ", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- item 3: a trainer stops at the first non-finite loss and keeps the last good checkpoint -----
def test_sidenet_training_on_a_nan_backbone_stops_and_writes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from anchorflow.base.errors import NonFiniteError
    from test_train_sidenet import settings, tiny_backbone, tiny_data

    from anchorflow.trainers.train_sidenet import train_sidenet

    backbone = tiny_backbone()
    with torch.no_grad():
        backbone.mu[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="at step 1; stopped, nothing was written"):
        train_sidenet(backbone, *tiny_data(), tmp_path / "side", settings(), progress=False)
    assert not (tmp_path / "side").exists()


def test_training_that_turns_nan_keeps_the_last_good_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from anchorflow.base._io import sha256_file
    from anchorflow.base.errors import NonFiniteError
    from anchorflow.trainers.sidenet import backbone_identity
    from test_train_sidenet import settings, tiny_backbone, tiny_data

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


from _bundles import copy_root, flip_byte, poison_onnx, snapshot, train_further  # noqa: E402

NO_TORCH = "import sys\nsys.modules['torch'] = None\nfrom anchorflow.cli import main\nmain(sys.argv[1:])\n"


@pytest.fixture
def root(tmp_path) -> Path:
    """A private copy of the bundled digits model root (bundle, backbone, sidenet, classifier)."""
    return copy_root(tmp_path / "digits")


# -- item 1: verify exits 0 only when something was compared and everything passed --------------
@pytest.mark.parametrize("breakage, precision", [("backbone.onnx", "fp32"), ("backbone.fp16.onnx", "fp32,fp16")])
def test_verify_fails_on_a_tampered_file(root, capsys, breakage, precision):
    flip_byte(root / "bundle" / breakage)
    code, out, err = run(["verify", root, "--backends", "ort-cpu", "--precision", precision], capsys)
    assert code == 1
    assert "sha256" in one_error_line(err) and "all comparisons passed" not in out


def test_verify_that_compares_nothing_fails(root, capsys):
    # ort-cpu fp32 is the reference itself and the bundle has no bf16 variant: nothing to compare
    code, out, err = run(["verify", root, "--backends", "ort-cpu", "--precision", "fp32,bf16"], capsys)
    assert code == 1 and "nothing was compared" in one_error_line(err)
    assert "skipped ort-cpu/bf16" in out


def test_verify_without_its_checkpoints_fails_instead_of_passing(root, capsys):
    import shutil

    bundle = root.parent / "moved"
    shutil.move(str(root / "bundle"), bundle)  # the recorded ../backbone is not beside it any more
    code, out, err = run(["verify", bundle, "--backends", "torch,ort-cpu"], capsys)
    assert code == 1 and "nothing was compared" in one_error_line(err)


def test_verify_accepts_allow_fallback_and_passes_a_good_bundle(root, capsys):
    code, out, err = run(["verify", root / "bundle", "--backends", "ort-cpu", "--precision", "fp32,fp16",
                          "--allow-fallback"], capsys)
    assert code == 0, err
    assert "comparisons passed" in out


# -- item 2: inspect exits 1 on any integrity failure --------------------------------------------
def test_inspect_of_a_tampered_bundle_exits_1(root, capsys):
    code, _, _ = run(["inspect", root], capsys)
    assert code == 0
    flip_byte(root / "bundle" / "sidenet.fp16.onnx")
    code, out, err = run(["inspect", root], capsys)
    assert code == 1 and "NOT OK" in out and "integrity" in one_error_line(err)


# -- item 3: NaN / Inf never reach an output file ------------------------------------------------
@pytest.mark.parametrize("network, solver", [("backbone", "euler"), ("sidenet", "ba")])
def test_a_nan_weight_stops_sampling_and_writes_nothing(root, tmp_path, capsys, network, solver):
    poison_onnx(root / "bundle", network)
    out, npy = tmp_path / "s.png", tmp_path / "s.npy"
    code, _, err = run(["sample", root / "bundle", "--solver", solver, "--nfe", "4", "--n", "2", "--out", out,
                        "--npy", npy], capsys)
    line = one_error_line(err)
    assert code == 1 and ("NaN" in line or "non-finite" in line), line
    assert not out.exists() and not npy.exists()


def test_the_runtime_names_the_network_call_and_time_of_the_first_nan():
    from anchorflow.base.errors import NonFiniteError
    from anchorflow.runtime import solve

    def velocity(x, t, cond):  # v = x, except NaN once t drops below 0.5
        return np.where(t.reshape(-1, 1) < 0.5, np.nan, x)

    noise = np.ones((3, 2), np.float32)
    # euler on 4 uniform steps calls at t = 1, 0.75, 0.5, 0.25: the 4th call (t = 0.25) is the first NaN
    with pytest.raises(NonFiniteError, match=r"the backbone returned NaN/Inf \(6 of 6 values\) at its call 4, t = 0.25"):
        solve("euler", velocity, noise, 4)
    assert np.isnan(solve("euler", velocity, noise, 4, check_finite=False).x).all()  # off for speed: no check


def test_an_infinite_grid_shift_is_refused(root, tmp_path, capsys):
    code, _, err = run(["sample", root, "--grid", "shift:inf", "--out", tmp_path / "s.png"], capsys)
    assert code == 1 and "finite" in one_error_line(err) and not (tmp_path / "s.png").exists()


# -- item 4: outputs are checked before the work; multi-file outputs are all-or-nothing ---------
def test_sample_png_is_not_written_when_the_npy_cannot_be(root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "ok.png"
    code, _, err = run(["sample", root, "--solver", "euler", "--nfe", "2", "--n", "2", "--out", out,
                        "--npy", blocker / "x.npy"], capsys)
    assert code == 1 and str(blocker) in one_error_line(err)
    assert not out.exists()


def test_a_write_failure_after_the_work_is_one_line_and_leaves_every_target(tmp_path):
    from anchorflow.base._io import atomic_paths
    from anchorflow.base.errors import OutputError

    good, blocker = tmp_path / "a.png", tmp_path / "file"
    good.write_bytes(b"old")
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*file/b\.npy: .*file is a file, not a folder"):
        with atomic_paths([good, blocker / "b.npy"]) as tmps:
            for t in tmps:
                t.write_bytes(b"new")
    assert good.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "file"]


@pytest.mark.parametrize("argv", [
    ["bench", "default", "--out", "{file}/bench", "--n", "4", "--nfe", "2"],
    ["demo", "--out", "{file}/demo"],
    ["train", "backbone", "--out", "{file}/bb", "--steps", "1"],
    ["train", "sidenet", "--out", "{file}/side", "--iters", "1"],
    ["export", "default", "--out", "{file}/bundle"],
])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, argv):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if argv[0] in ("train", "export"):
        pytest.importorskip("torch")
    code, out, err = run([a.format(file=blocker) for a in argv], capsys)
    assert code == 1 and "is a file, not a folder" in one_error_line(err)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- item 5: one extra named per command --------------------------------------------------------
@pytest.mark.parametrize("argv, extra", [
    (["train", "backbone", "--out", "o"], "train"),
    (["train", "sidenet", "--out", "o"], "train"),
    (["sample", "default", "--backend", "torch", "--out", "s.png"], "train"),
    (["export", "default", "--out", "b"], "export"),
])
def test_without_torch_the_message_names_the_one_extra(tmp_path, argv, extra):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = one_error_line(proc.stderr)
    assert line.count("anchorflow[") == 1 and f"pip install 'anchorflow[{extra}]'" in line, line
    assert list(tmp_path.iterdir()) == []


# -- item 7: the bundled model is read-only ------------------------------------------------------
def test_export_default_refuses_the_bundled_folder(capsys):
    before = snapshot(ROOT)
    code, _, err = run(["export", "default"], capsys)
    assert code == 1 and "read-only" in (line := one_error_line(err)) and "--out" in line
    assert snapshot(ROOT) == before


# -- item 8: a folder replacement interrupted by a crash is undone on the next open -------------
CRASH_MID_SWAP = """
import os, sys
from pathlib import Path
from anchorflow.base import _io
real = os.replace
def replace(a, b):
    real(a, b)
    if str(a) == sys.argv[1]:   # the old folder was just moved aside: die before the new one moves in
        os._exit(9)
_io.os.replace = replace
with _io.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "bundle.json").write_text("{}")
"""


def test_a_crash_between_the_two_renames_is_recovered(root, capsys):
    before = snapshot(root / "bundle")
    proc = subprocess.run([sys.executable, "-c", CRASH_MID_SWAP, str(root / "bundle")], timeout=60)
    assert proc.returncode == 9 and not (root / "bundle").exists()  # the crash left no folder at the path
    code, out, err = run(["inspect", root], capsys)
    assert code == 0 and "restored" in err
    assert snapshot(root / "bundle") == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_stale_temporary_folders_of_dead_writers_are_removed(root, capsys):
    """A writer is alive while it holds its flock()ed lease, whatever pid its folder names (a pid means
    nothing in another PID namespace or host): the dead writer below carries this live process's pid, the
    live one a dead pid, and the lease decides. A folder with no lease at all goes only after STALE_S."""
    import fcntl

    from anchorflow.base._io import STALE_S

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()

    def writer(stem: str) -> Path:
        tmp = root / f".bundle.{stem}.tmp"
        tmp.mkdir()
        (tmp / "backbone.onnx").write_bytes(b"\0" * 1024)
        return tmp

    dead = writer(f"{os.getpid()}.abc123")         # its lease file is there, and nobody holds it
    dead.with_suffix(".lease").write_text("")
    live = writer(f"{dead_pid.pid}.def456")        # its lease is held (flock) for the whole inspect
    fd = os.open(live.with_suffix(".lease"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    old = writer(f"{dead_pid.pid}.aaa111")         # no lease (an older writer), untouched for longer than STALE_S
    os.utime(old, (time.time() - STALE_S - 60,) * 2)
    young = writer(f"{dead_pid.pid}.bbb222")       # no lease, recent: it may still be written
    try:
        code, _, _ = run(["inspect", root], capsys)
        assert code == 0
        assert not dead.exists() and not dead.with_suffix(".lease").exists() and not old.exists()
        assert live.exists() and live.with_suffix(".lease").exists() and young.exists()
    finally:
        os.close(fd)
    code, _, _ = run(["inspect", root], capsys)    # the writer let go of its lease: now it is a dead one
    assert code == 0 and not live.exists() and not live.with_suffix(".lease").exists() and young.exists()


# -- item 9: a stale bundle is refused (model root) or warned about (the bundle itself) ---------
def test_a_bundle_older_than_its_checkpoint_is_not_used_silently(root, tmp_path, capsys):
    pytest.importorskip("safetensors")
    train_further(root / "backbone")
    out = tmp_path / "s.png"
    code, _, err = run(["sample", root, "--solver", "euler", "--nfe", "2", "--n", "2", "--out", out], capsys)
    assert code == 1 and "stale" in one_error_line(err) and not out.exists()
    code, _, err = run(["sample", root / "bundle", "--solver", "euler", "--nfe", "2", "--n", "2", "--out", out],
                       capsys)
    assert code == 0 and err.startswith("warning: ") and "stale" in err and out.exists()


# -- item 11: the smaller ones -------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["sample", "default", "--seed", "-1"], "--seed must be in 0.."),
    (["sample", "default", "--n", "10000000000"], "above the cap"),
    (["sample", "default", "--nfe", "1000000"], "above the cap"),
    (["sample", "default", "--cfg", "0"], "--cfg must be finite and > 0"),
    (["sample", "default", "--cfg", "-1.5"], "--cfg must be finite and > 0"),
    (["sample", "default", "--cfg-interval", "0,0.5,1"], "exactly two numbers"),
    (["bench", "default", "--cfg", "1.0,0"], "--cfg must be finite and > 0"),
    (["bench", "default", "--nfe", "4,5000"], "above the cap"),
    (["verify", "default", "--atol", "-1"], "--atol must be >= 0"),
    (["sample", "default", "--out", "o.gif"], "unknown image type"),
])
def test_small_findings_are_refused(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 1 and words in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_out_jpg_writes_a_jpeg(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "o.jpg"
    code, _, err = run(["sample", "default", "--solver", "euler", "--nfe", "2", "--n", "2", "--out", out], capsys)
    assert code == 0, err
    with Image.open(out) as img:
        assert img.format == "JPEG"


def test_demo_file_names_and_help(tmp_path, capsys):
    from anchorflow.demo import REFERENCE_NFE, run_demo

    run_demo(tmp_path / "d", nfe=2, n=2, methods=("euler",), echo=lambda s: None)
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert f"samples_reference_rk4_{REFERENCE_NFE}.png" in names and not any("," in n for n in names)
    code, out, _ = run(["demo", "--help"], capsys)
    assert f"{REFERENCE_NFE}-call" in out and "512" not in out


def test_checkpoint_files_are_world_readable(tmp_path):
    torch = pytest.importorskip("torch")
    from anchorflow.trainers.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", torch.nn.Linear(2, 2), {"kind": "test", "arch": {}},
                    extra_files={"train_state.json": b"{}"})
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "train_state.json": 0o644}
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755


# -- item 12: one exit-status rule ---------------------------------------------------------------
@pytest.mark.parametrize("argv, status", [
    (["sample", "default", "--n", "0"], 1),
    (["bench", "default", "--n", "0"], 1),
    (["train", "backbone", "--out", "o", "--steps", "0"], 1),
    (["train", "sidenet", "--out", "o", "--iters", "0"], 1),
    (["sample", "default", "--n", "many"], 2),
    (["bench", "default", "--no-such-option"], 2),
    (["train", "sidenet"], 2),
])
def test_one_exit_status_rule(tmp_path, capsys, monkeypatch, argv, status):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == status
    one_error_line(err)
