"""Atomic file and folder writes, output checks, hashing and JSON helpers.

Nothing that is already on disk is lost or half-written: every writer goes to a temporary
sibling first and is renamed into place (``os.replace`` is atomic on POSIX). A folder is
replaced in two renames (old -> ``.NAME.<pid>.<rand>.old``, new -> NAME); a crash between them
is repaired by :func:`recover_dir` on the next open, which also removes the temporary folders
that killed writers left behind: a writer is alive while it holds its lease (a flock()ed
``.lease`` file), never judged by a pid, which another PID namespace or host cannot see. Write failures become one :class:`OutputError` line naming the
path and the operating system's reason.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ConfigError, OutputError, warn

# The installed package's bundled models: read-only for every command.
BUNDLED = Path(importlib.util.find_spec("anchorflow").origin).resolve().parent / "bundled"
# A temporary folder without a live owner pid in its name counts as stale after this long.
STALE_S = 3600.0


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_output(path: str | os.PathLike, what: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, an output location that cannot be written.

    ``folder``: the output is a folder (replaced whole) rather than a file. Checks that the path
    is not empty, not inside the installed package's bundled models, of the right kind if it
    exists, and that its nearest existing parent folder accepts a new file (a probe file is
    created and removed; nothing else is touched). Raises OutputError / ConfigError.
    """
    if str(path).strip() == "":
        raise ConfigError(f"{what} is empty; give a {'folder' if folder else 'file'} path")
    p = Path(path).expanduser().absolute()
    if p == BUNDLED or BUNDLED in p.resolve().parents:
        raise ConfigError(f"{what} {path} is inside the installed package's bundled models, which are read-only; "
                          "pass --out FOLDER to write somewhere else")
    if p.exists() and not (p.is_dir() or p.is_file()):
        raise OutputError(f"{what} {path} is not a regular file or folder (a device, socket or pipe); "
                          "choose another path")
    if p.exists() and folder and not p.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; choose another {what}")
    if p.exists() and not folder and p.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    parent = _make_parent(p, create=False)
    try:
        fd, probe = tempfile.mkstemp(prefix=".anchorflow-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {parent}: {_reason(exc)}") from None
    return Path(path)


def _make_parent(target: Path, create: bool = True) -> Path:
    """The nearest existing folder above ``target`` (after creating the missing ones if ``create``);
    OutputError when a file stands where a folder must be."""
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is a file, not a folder")
    if create:
        target.parent.mkdir(parents=True, exist_ok=True)
    return parent


def check_image_path(path: str | os.PathLike, what: str = "--out") -> str:
    """The pillow format for an image file name (.png, .jpg/.jpeg, .webp); refuses other suffixes."""
    suffix = Path(path).suffix.lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    if suffix not in formats:
        raise ConfigError(f"{what} {path}: unknown image type {suffix or '(no suffix)'!r}; "
                          "use .png, .jpg or .webp")
    return formats[suffix]


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def refuse_special(target: Path, folder: bool = False) -> None:
    """OutputError when ``target`` exists as something a write must not replace: a device, socket
    or pipe (``/dev/full``, ``/dev/null``: as root, a rename would put a file in the node's place),
    or a file where a folder is written (and the reverse). A symlink itself is replaced, never followed."""
    import stat

    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file above it is _make_parent's error)
        return
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {_reason(exc)}") from None
    if stat.S_ISLNK(mode):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{target} is not a regular file or folder (a device, socket or pipe); nothing was written "
                          "there; choose another path")
    if folder and not stat.S_ISDIR(mode):
        raise OutputError(f"{target} is a file, not a folder; nothing was replaced")
    if not folder and stat.S_ISDIR(mode):
        raise OutputError(f"{target} is a folder; give a file name")


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary file paths next to each of ``paths``; renamed over them only when all were written.

    All-or-nothing for multi-file outputs: a failure while writing any of them leaves every
    target as it was. OSError becomes OutputError naming the target and the reason.
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    current = targets[0] if targets else Path(".")
    for target in targets:
        refuse_special(target)
    try:
        for target in targets:
            current = target
            _make_parent(target)
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        current = targets[0] if targets else current
        yield tmps
        for target, tmp in zip(targets, tmps):
            current = target
            os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; published files are world-readable
        for target, tmp in zip(targets, tmps):
            current = target
            os.replace(tmp, target)
    except OSError as exc:
        named = {str(t): target for t, target in zip(tmps, targets)}
        raise OutputError(f"cannot write {named.get(str(exc.filename), current)}: {_reason(exc)}") from None
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it over ``path``."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- folders ----------------------------------------------------------------------------------
# A writer of a folder holds a lease for its whole life: ``.NAME.<pid>.<rand>.lease``, a file it
# keeps flock()ed. Its temporary folder (``.tmp``) and the old folder it moves aside (``.old``)
# share that stem. Whether a writer is alive is asked of the kernel's lock table, never of a pid:
# a pid means nothing in another PID namespace (a second container on a shared volume) or on
# another host, while a flock held by any process on this kernel (and, on Linux NFS, by the
# server's lock manager for every client) refuses a second one. A folder without a lease (an
# older anchorflow, or a lease removed) counts as stale only after STALE_S.


def _lease_of(sibling: Path) -> Path:
    return sibling.with_suffix(".lease")


def _owner_alive(sibling: Path, name: str = "") -> bool:
    """Whether the writer of ``.NAME.<pid>.<rand>.tmp|old`` still holds its lease (no lease: by age)."""
    import fcntl

    try:
        fd = os.open(_lease_of(sibling), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        try:
            return time.time() - sibling.stat().st_mtime < STALE_S
        except OSError:
            return True
    except OSError:
        return True  # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: the writer (in any process, namespace or, on NFS, host) holds it
        return True
    finally:
        os.close(fd)  # also releases the probe's own lock
    return False


@contextlib.contextmanager
def _lease(tmp: Path) -> Iterator[None]:
    """Hold the lease of the writer of ``tmp`` (``.NAME.<pid>.<rand>.tmp``, and its ``.old``)."""
    import fcntl

    lease = _lease_of(tmp)
    fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lease)
        os.close(fd)


def recover_dir(path: str | os.PathLike) -> bool:
    """Repair what an interrupted :func:`atomic_dir` left next to ``path``; True when ``path`` is
    missing because a live writer is replacing it right now (retry shortly).

    A folder moved aside (``.NAME.<pid>.*.old``) by a writer that died before the new folder
    was renamed in is moved back; the ``.tmp`` / ``.old`` folders and leases of dead writers are
    removed. Live writers (holding their lease) are left alone; a read-only parent is left as it is.
    """
    path = Path(path)
    parent = path.parent
    if not path.name or not parent.is_dir():
        return False
    pattern = glob.escape(f".{path.name}.") + "*"
    try:
        entries = list(parent.glob(pattern))
        siblings = [p for p in entries if p.suffix in (".tmp", ".old") and p.is_dir() and not p.is_symlink()]
        alive = {p for p in siblings if _owner_alive(p, path.name)}
        dead = [p for p in siblings if p not in alive]
        olds = sorted((p for p in dead if p.suffix == ".old"), key=lambda p: p.stat().st_mtime)
        if olds and not path.exists():
            os.replace(olds.pop(), path)
            warn(f"{path} was restored from an interrupted replacement (the new version was not complete)")
        for p in dead:
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
        for lease in (p for p in entries if p.suffix == ".lease" and p.is_file()):
            if not any(s.with_suffix(".lease") == lease for s in alive) and not _lease_held(lease):
                with contextlib.suppress(OSError):
                    lease.unlink()
        return not path.exists() and any(p.suffix == ".old" for p in alive)
    except OSError:
        return False


def _lease_held(lease: Path) -> bool:
    import fcntl

    try:
        fd = os.open(lease, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on failure it is removed.

    An existing folder at ``path`` stays untouched until the new one is complete; a crash during
    the swap is repaired by :func:`recover_dir` on the next open. The writer holds a lease (see
    above) for the folder's whole life, so no reader anywhere takes its folders for stale ones.
    """
    path = Path(path)
    refuse_special(path, folder=True)
    recover_dir(path)
    try:
        _make_parent(path)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
    try:
        with _lease(tmp):
            ino = tmp.stat().st_ino
            yield tmp
            if not tmp.is_dir() or tmp.stat().st_ino != ino:
                raise OutputError(f"cannot write {path}: its temporary folder {tmp.name} was removed by another "
                                  "process while it was being written; nothing was replaced")
            _publish(tmp)
            if path.exists():
                if not overwrite:
                    raise ConfigError(f"{path} already exists; choose another --out or remove it")
                old = tmp.with_suffix(".old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith((str(tmp.with_suffix("")), str(path))):
            raise
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(folder: Path) -> None:
    """Give a finished temporary folder (mkdtemp: 0700) and its files ordinary modes (0755 / 0644)."""
    os.chmod(folder, 0o755)
    for child in folder.rglob("*"):
        os.chmod(child, 0o755 if child.is_dir() else 0o644)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


MAX_JSON_BYTES = 64 << 20  # bundle.json, tuned.json, configs: kilobytes; a bigger file is not ours
MAX_JSON_DEPTH = 64  # nesting of a bundle.json is < 10; a deeper file is refused before it is parsed


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(text: str, where: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses, as one CheckpointError naming ``where``: nesting deeper than
    ``max_depth``, integers of more than 4300 digits, and anything that is not JSON."""
    from .errors import CheckpointError

    if json_depth(text) > max_depth:
        raise CheckpointError(f"{where} is nested more than {max_depth} levels deep; not a file anchorflow wrote")
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where} is nested too deeply to read; not a file anchorflow wrote") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a number of thousands of digits
        raise CheckpointError(f"{where} is not readable JSON ({str(exc)[:200]})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, read defensively: size, encoding (UTF-8), nesting and number limits; one
    CheckpointError naming the file and what is wrong otherwise."""
    from .errors import CheckpointError

    path = Path(path)
    try:
        if not path.is_file() and path.exists():
            raise CheckpointError(f"{path} is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size} bytes, more than the {max_bytes >> 20} MiB a JSON file of "
                                  "anchorflow may have; not a file anchorflow wrote")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); not readable JSON") from None
    except OSError as exc:
        raise CheckpointError(f"{path} is not readable JSON ({_reason(exc)})") from None
    return parse_json(text, path)


# -- several files of one folder replaced together ----------------------------
# A folder's writer holds a flock of its commit record (bundle.json) from reading the current state to
# the last rename, so two writers never read the same old state (read-modify-write) and a reader that
# found a file half-way through a replacement can wait for the writer. The lock is taken on the file
# that is there *after* the lock was granted (a writer that waited re-locks the newly renamed-in file),
# so no lock file is ever added to the folder. The replacement is journaled: every new file is first
# written whole as ``.NAME.next``, the commit record last; then each is renamed over its target, the
# commit record last. A writer killed before the commit record exists left only ``.next`` files
# (removed: nothing happened); one killed after it left a complete journal (rolled forward: the new
# state). :func:`recover_files` does either.
LOCK_WAIT_S = 600.0


def _next_of(folder: Path, name: str) -> Path:
    return folder / f".{name}.next"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold a flock of the file now at ``path`` (exclusive, or ``shared`` for readers), waiting up to
    ``wait_s`` seconds (then one OutputError line). Opened read-only: a read-only folder can be
    locked too. A file replaced by rename while we waited is re-locked, so every holder saw the
    latest version of ``path`` when it got its lock."""
    import fcntl

    path = Path(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise OutputError(f"cannot lock {path}: {_reason(exc)}") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OutputError(f"{path.parent} is being written by another anchorflow process (for over "
                                          f"{wait_s:g} s); retry when it has finished") from None
                    time.sleep(0.02)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # renamed over while we waited: lock the file that is there now
    try:
        yield
    finally:
        os.close(fd)


def replace_files(folder: str | os.PathLike, files: dict[str, bytes], last: str) -> None:
    """Replace ``files`` (name -> new bytes) in ``folder`` as one change: all of them or none, also
    across a kill at any step. ``last`` names the commit record (renamed last). Call it holding
    :func:`file_lock` of ``folder / last``."""
    folder = Path(folder)
    order = [n for n in files if n != last] + [last]
    try:
        for name in order:
            target = folder / name
            refuse_special(target)
            write_bytes(_next_of(folder, name), files[name])  # atomic: a .next file is whole or absent
        for name in order:
            os.replace(_next_of(folder, name), folder / name)
    except OSError as exc:
        raise OutputError(f"cannot write {folder}: {_reason(exc)}") from None


def _partial_next(folder: Path, names: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for n in names:
        out += folder.glob(glob.escape(_tmp_prefix(_next_of(folder, n)).rsplit(".", 2)[0]) + ".*.tmp")
    return out


def recover_files(folder: str | os.PathLike, names: Sequence[str], last: str) -> bool:
    """Finish or undo a :func:`replace_files` a kill interrupted (caller holds the lock): roll forward
    when the commit record ``.LAST.next`` exists, else remove the stray ``.next`` files. True when
    anything was repaired; a read-only folder is left as it is."""
    folder = Path(folder)
    record = _next_of(folder, last)
    stray = [n for n in names if _next_of(folder, n).is_file()]
    partial = _partial_next(folder, names)  # a .next file a kill caught while it was written
    for p in partial:
        with contextlib.suppress(OSError):
            p.unlink()
    if not stray:
        return bool(partial)
    try:
        if record.is_file():
            for name in [n for n in stray if n != last] + [last]:
                os.replace(_next_of(folder, name), folder / name)
            warn(f"{folder}: finished a replacement of {', '.join(stray)} that a killed writer had left complete")
        else:
            for name in stray:
                _next_of(folder, name).unlink()
    except OSError:
        return False
    return True


def recover_journal(folder: str | os.PathLike, names: Sequence[str], last: str) -> bool:
    """:func:`recover_files` under the lock of ``folder / last``, when any ``.NAME.next`` is there
    (one stat per name otherwise); a folder that cannot be repaired (read-only) is left as it is."""
    folder = Path(folder)
    if not any(_next_of(folder, n).exists() for n in names) and not _partial_next(folder, names):
        return False
    try:
        with file_lock(folder / last, wait_s=60.0):
            return recover_files(folder, names, last)
    except OutputError:
        return False
