"""onnxruntime's optimised graphs, cached: a session opens the pre-optimised file and skips graph
optimisation (measured 2.2x faster session creation on the digits bundle, benchmarks/session_cache.py).

``open_cached(path, sha256, opts, providers, optimization, make)`` returns a session. The cache
entry for a graph is ``<root>/<key>.onnx`` with ``<key>.json`` beside it, the key being the sha256
of everything the optimised graph depends on (:func:`graph_key`): the onnxruntime version, the
source graph's sha256, the providers, the optimisation level and the CPU (level ``all`` writes
hardware-specific NCHWc layouts: onnxruntime says such a file is only for the machine that made
it). A changed key is a different file, so a new onnxruntime, a re-export or another CPU never
reads a stale graph; an entry whose ``.json`` does not match its key or whose ``.onnx`` does not
match the recorded sha256 (truncated, edited) is ignored and rebuilt. Both files are written
together through :func:`anchorflow.base._io.atomic_paths` (temporary files, then rename): a crash leaves
no half entry. A cache that cannot be written (read-only home) only costs the speed-up.

Integrity (the graph that runs must be the one derived from the bundle's hash-checked file):
the key holds the bundle file's sha256, so another bundle's entry is never looked up; each record
carries an HMAC-SHA256 over its key and the cached graph's sha256, made with a per-cache secret
(``<root>/.key``, 32 random bytes, mode 0600, owned by this user). An entry whose MAC does not
verify (a cached graph swapped or edited, its record rewritten to match), an entry or key file
owned by another user or writable by group / others is never opened: it is rebuilt, or the
session is made uncached. Whoever can read the key as this user can forge entries; they could
equally edit anchorflow itself, which is outside what a cache can defend.

Root: ``$ANCHORFLOW_CACHE/ort-graphs`` or ``~/.cache/anchorflow/ort-graphs``;
``ANCHORFLOW_ORT_GRAPH_CACHE=0`` turns the cache off. Only CPU-only sessions are cached (GPU
providers partition the graph at load time and have their own engine caches). numpy + onnxruntime only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import platform
from pathlib import Path
from typing import Any, Callable, Optional

CACHE_ENV, SWITCH_ENV = "ANCHORFLOW_CACHE", "ANCHORFLOW_ORT_GRAPH_CACHE"
FORMAT = "anchorflow.ort-graph/1"


def cache_root() -> Optional[Path]:
    """The cache folder, or None when ``ANCHORFLOW_ORT_GRAPH_CACHE`` is 0 / off / false."""
    if os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "anchorflow") / "ort-graphs"


def cpu_tag() -> str:
    """The machine and its CPU feature flags (what NCHWc and kernel choices depend on), hashed."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def key_fields(graph_sha256: str, providers: list, optimization: str) -> dict:
    """What the optimised graph depends on (the key is their hash)."""
    import onnxruntime as ort

    return {"format": FORMAT, "onnxruntime": ort.__version__, "graph_sha256": graph_sha256,
            "providers": [p if isinstance(p, str) else p[0] for p in providers], "optimization": optimization,
            "cpu": cpu_tag()}


def graph_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    from ...base._io import sha256_file

    return sha256_file(path)


KEY_FILE = ".key"


def _trusted(st: os.stat_result) -> bool:
    """Owned by this user and not writable by group or others."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def secret(root: Path, create: bool = False) -> Optional[bytes]:
    """The cache's MAC key (made on first use when ``create``); None when missing or untrusted."""
    path = root / KEY_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if not create or not _make_secret(root, path):
                return None
            continue
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        ok = _trusted(st) and not st.st_mode & 0o077 and len(data) == 32
        return data if ok else None
    return None


def _make_secret(root: Path, path: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".key.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return True
    except OSError:
        return False


def mac(key: bytes, fields: dict, graph_sha256: str) -> str:
    message = json.dumps({"key": fields, "sha256": graph_sha256}, sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def lookup(root: Path, fields: dict) -> Optional[Path]:
    """The cached optimised graph for ``fields`` if its entry is whole, this user's, and its MAC
    verifies (see the module docstring), else None."""
    key = graph_key(fields)
    graph, meta = root / f"{key}.onnx", root / f"{key}.json"
    secret_key = secret(root)
    if secret_key is None:
        return None
    try:
        if not (_trusted(graph.lstat()) and _trusted(meta.lstat())) or graph.is_symlink() or meta.is_symlink():
            return None
        record = json.loads(meta.read_text())
        digest = _sha256(graph)
        if record.get("key") != fields or record.get("sha256") != digest:
            return None
        if not hmac.compare_digest(str(record.get("mac", "")), mac(secret_key, fields, digest)):
            return None
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return graph


def open_cached(path: Path, graph_sha256: Optional[str], opts: Any, providers: list, optimization: str,
                make: Callable[[str, Any], Any], disabled: Any) -> Any:
    """A session for ``path``: from the cached optimised graph when one matches (optimisation
    then off: ``disabled`` is the level to set), else built by ``make(path, opts)`` while
    onnxruntime writes its optimised graph into the cache. Anything the cache cannot do falls
    back to ``make(path, opts)``."""
    root = cache_root()
    if root is None or optimization == "disable":
        return make(str(path), opts)
    fields = key_fields(graph_sha256 or _sha256(path), providers, optimization)
    hit = lookup(root, fields)
    if hit is not None:
        level, opts.graph_optimization_level = opts.graph_optimization_level, disabled
        try:
            return make(str(hit), opts)
        except Exception:  # noqa: BLE001 - a cache entry onnxruntime cannot read is rebuilt below
            opts.graph_optimization_level = level
    return _build(path, root, fields, opts, make)


def _build(path: Path, root: Path, fields: dict, opts: Any, make: Callable[[str, Any], Any]) -> Any:
    from ...base import _io
    from ...base.errors import OutputError

    key = graph_key(fields)
    try:
        with _io.atomic_paths([root / f"{key}.onnx", root / f"{key}.json"]) as (graph, meta):
            opts.optimized_model_filepath = str(graph)
            session = make(str(path), opts)
            if graph.stat().st_size == 0:
                raise OSError("onnxruntime wrote no optimised graph")
            key_bytes = secret(root, create=True)
            if key_bytes is None:
                raise OSError("the cache's key is missing or not this user's")
            digest = _sha256(graph)
            meta.write_text(json.dumps({"key": fields, "sha256": digest, "mac": mac(key_bytes, fields, digest),
                                        "source": str(path)}, indent=2))
        return session
    except (OSError, OutputError):  # a cache we cannot write only costs the speed-up
        opts.optimized_model_filepath = ""
        return make(str(path), opts)
