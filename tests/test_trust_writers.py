"""Writers never lose work: concurrent tunes, a kill at each write step of tune, of a
folder swap (export, checkpoints) and of train --resume's checkpoint swap, and a reader in another
PID namespace while a writer works.

A kill is real: the writer runs in a subprocess whose ``os.replace`` sends itself SIGKILL at its
k-th call (before doing it) inside the folder under test; every step of the sequence is killed once.
Bundles are copies of the bundled digits bundle (made by the real exporter).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from anchorflow.base.errors import CheckpointError
from anchorflow.runtime.bundles.tuned_grids import read_tuning

from _bundles import copy_root

KILLER = '''
import os, signal, sys
_real, _count, _k, _under = os.replace, [0], int(sys.argv[1]), sys.argv[2]
def _replace(src, dst, *a, **kw):
    if str(dst).startswith(_under) or str(src).startswith(_under):
        _count[0] += 1
        if _count[0] == _k:
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(src, dst, *a, **kw)
os.replace = _replace
'''


def run_killed(k: int, under: Path, body: str, timeout: float = 60) -> int:
    """Run ``body`` (Python) with os.replace killing the process at its k-th call under ``under``;
    returns the exit status (-9 when killed)."""
    code = KILLER + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code, str(k), str(under)], capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


def inspect_ok(bundle: Path) -> bool:
    from anchorflow.cli import main

    try:
        main(["inspect", str(bundle)])
    except SystemExit as exc:
        return not exc.code
    return True


def cli(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anchorflow.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)


def grids(bundle: Path) -> set[str]:
    return set(read_tuning(bundle).grids)


def no_journal(bundle: Path) -> bool:
    return not [p.name for p in bundle.iterdir() if p.name.endswith((".next", ".tmp"))]


# -- tune ------------------------------------------------------------------------------------------
TUNE = ["--nfe", "11", "--first-call", "backbone", "--samples", "2", "--max-evals", "2", "--reference-steps", "2",
        "--quiet"]


def test_four_concurrent_tunes_keep_every_grid_and_readers_never_see_a_mismatch(tmp_path):
    b = copy_root(tmp_path, ("bundle",)) / "bundle"
    before = grids(b)
    solvers = ["euler", "ab2", "ipndm", "unipc"]
    assert not any(f"{s}@11" in before for s in solvers)
    faults: list[str] = []
    stop = threading.Event()

    def reader():  # what `sample` does while the tunes write: read the tuning, hash-checked
        while not stop.is_set():
            try:
                read_tuning(b)
            except CheckpointError as exc:
                faults.append(str(exc))

    t = threading.Thread(target=reader)
    t.start()
    procs = [subprocess.Popen([sys.executable, "-m", "anchorflow.cli", "tune", str(b), "--solvers", s, *TUNE],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in solvers]
    outs = [p.communicate(timeout=240) for p in procs]
    stop.set()
    t.join()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "stored in" in out, err
    after = grids(b)
    assert after == before | {f"{s}@11" for s in solvers}  # every earlier grid, and each tune's own
    assert not faults, faults[:2]
    assert no_journal(b)
    assert cli("inspect", b).returncode == 0


def test_a_tune_keeps_the_grids_it_did_not_tune(tmp_path):
    b = copy_root(tmp_path, ("bundle",)) / "bundle"
    before = read_tuning(b)
    proc = cli("tune", b, "--solvers", "euler", *TUNE)
    assert proc.returncode == 0 and "kept 91 earlier tuned grid(s)" in proc.stderr, proc.stderr
    after = read_tuning(b)
    assert set(after.grids) == set(before.grids) | {"euler@11"}
    assert all(after.grids[k] == g for k, g in before.grids.items())  # untouched, value for value
    assert (after.first_call.means == before.first_call.means).all()  # the table not re-measured is kept


WRITE = '''
from dataclasses import replace
from anchorflow.runtime.bundles.tuned_grids import read_tuning, write_tuning, Tuning
b = sys.argv[2]
old = read_tuning(b)
g = old.grids["euler@10"]
new = Tuning({"euler@12": replace(g, nfe=12)}, None, None, {"by": "the killed test"})
write_tuning(b, new)
'''


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_a_kill_at_each_step_of_a_tune_write_recovers_on_the_next_open(tmp_path, k):
    """Steps: .tuned.json.next, .first_call.npy.next, .bundle.json.next (the commit record), then the
    renames tuned.json, first_call.npy, bundle.json. Killed before the record: the old state; after: the new."""
    b = copy_root(tmp_path, ("bundle",)) / "bundle"
    before = grids(b)
    assert run_killed(k, b, WRITE) == -signal.SIGKILL
    if k >= 4:  # the old code's state here: tuned.json renamed in, bundle.json's hash of the old one
        assert not no_journal(b)
    after = grids(b)  # the next open repairs (find_bundle), then reads hash-checked
    assert after == (before | {"euler@12"} if k >= 4 else before)
    assert no_journal(b)
    assert inspect_ok(b)
    assert run_killed(99, b, WRITE) == 0 and grids(b) == before | {"euler@12"}  # and the next write works


# -- folder swaps: export's bundle, a checkpoint -----------------------------------------------------
SWAP = '''
import shutil
from pathlib import Path
from anchorflow.base._io import atomic_dir
out = Path(sys.argv[2])
with atomic_dir(out) as tmp:
    for f in out.iterdir():
        shutil.copy2(f, tmp / f.name)
    (tmp / "NEW").write_text("the new version")
'''


@pytest.mark.parametrize("k", [1, 2])
def test_sample_after_an_export_killed_mid_swap_uses_the_bundle(tmp_path, k):
    """export replaces MODEL/bundle in two renames (old aside, new in); killed before either, the
    model root must be sampled from its (recovered) bundle, never silently from torch checkpoints."""
    root = copy_root(tmp_path / "R", ("bundle", "backbone", "sidenet"))
    rc = run_killed(k, root / "bundle", SWAP)
    assert rc == -signal.SIGKILL
    if k == 2:
        assert not (root / "bundle").exists()  # the state a kill leaves: bundle/ moved aside, new not in
    from anchorflow.runtime.bundles.models import locate

    files = locate(root)
    assert files.bundle == root / "bundle" and (root / "bundle" / "bundle.json").is_file()
    assert not (root / "bundle" / "NEW").exists()  # the old, complete version, not the half-published one
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the dead writer's folders removed
    proc = cli("sample", root, "--solver", "euler", "--nfe", "2", "--n", "2", "--out", tmp_path / "s.png")
    assert proc.returncode == 0, proc.stderr


HOLD = SWAP.replace('    (tmp / "NEW")', '    print("writing", flush=True)\n    sys.stdin.readline()\n    (tmp / "NEW")')


def _held_writer(folder: Path) -> subprocess.Popen:
    """A writer of ``folder`` paused inside atomic_dir (its temporary folder half-written) until we
    write a line to its stdin."""
    p = subprocess.Popen([sys.executable, "-c", KILLER + textwrap.dedent(HOLD), "0", str(folder)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def _tmp_of(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_a_reader_in_another_pid_namespace_never_removes_a_live_writers_folder(tmp_path):
    root = copy_root(tmp_path / "R", ("bundle",))
    w = _held_writer(root / "bundle")
    try:
        assert len(_tmp_of(root, "bundle")) == 1
        # a second container on the shared volume: the writer's pid means nothing there
        probe = ("from anchorflow.base._io import recover_dir; from anchorflow.runtime.bundles.models import locate; "
                 f"recover_dir({str(root / 'bundle')!r}); print(locate({str(root)!r}).bundle)")
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", probe],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode and "Operation not permitted" in proc.stderr:
            pytest.skip("unshare is not permitted here")
        assert proc.returncode == 0, proc.stderr
        inspect = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
                                  "anchorflow.cli", "inspect", str(root / "bundle")], capture_output=True, text=True,
                                 timeout=60)
        assert inspect.returncode == 0, inspect.stderr
        assert len(_tmp_of(root, "bundle")) == 1  # the live writer's folder is still there
    finally:
        out, err = w.communicate("go\n", timeout=60)
    assert w.returncode == 0, err
    assert (root / "bundle" / "NEW").is_file() and (root / "bundle" / "backbone.onnx").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_dead_writers_folder_is_removed_at_once_whatever_its_age(tmp_path):
    """The lease, not an age or pid guess: a killed writer's folder goes on the next open."""
    root = copy_root(tmp_path / "R", ("bundle",))
    w = _held_writer(root / "bundle")
    w.kill()
    w.wait(timeout=30)
    assert len(_tmp_of(root, "bundle")) == 1  # fresh (seconds old), and its writer is dead
    from anchorflow.runtime.bundles.models import locate

    assert locate(root).bundle == root / "bundle"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    pytest.importorskip("torch")
    from anchorflow.trainers.train_backbone import train_backbone

    from test_backbone import _toy_settings

    return train_backbone(tmp_path_factory.mktemp("full") / "run", _toy_settings(), progress=False)


@pytest.mark.parametrize("k", [1, 2])
def test_train_resume_after_a_kill_in_the_checkpoint_swap_continues_the_run(tmp_path, k, full_run):
    from anchorflow.trainers.train_backbone import train_backbone

    from test_backbone import _toy_settings

    full = full_run
    part = tmp_path / "part"
    train_backbone(part, _toy_settings(steps=3), progress=False)
    assert run_killed(k, part, SWAP) == -signal.SIGKILL  # the next checkpoint's swap, killed
    resumed = train_backbone(part, _toy_settings(), resume=True, progress=False)
    assert resumed["training"]["step"] == 6  # from the saved step 3, not from 0
    assert resumed["training"]["loss_log"] == full["training"]["loss_log"]
    assert json.loads((part / "train_state.json").read_text())["step"] == 6
