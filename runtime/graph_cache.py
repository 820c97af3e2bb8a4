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
together through :func:`anchorflow._io.atomic_paths` (temporary files, then rename): a crash leaves
no half entry. A cache that cannot be written (read-only home) only costs the speed-up.

Root: ``$ANCHORFLOW_CACHE/ort-graphs`` or ``~/.cache/anchorflow/ort-graphs``;
``ANCHORFLOW_ORT_GRAPH_CACHE=0`` turns the cache off. Only CPU-only sessions are cached (GPU
providers partition the graph at load time and have their own engine caches). numpy + onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    from .._io import sha256_file

    return sha256_file(path)


def lookup(root: Path, fields: dict) -> Optional[Path]:
    """The cached optimised graph for ``fields`` if its entry is whole and matches, else None."""
    key = graph_key(fields)
    graph, meta = root / f"{key}.onnx", root / f"{key}.json"
    try:
        record = json.loads(meta.read_text())
        if record.get("key") != fields or record.get("sha256") != _sha256(graph):
            return None
    except (OSError, ValueError):
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
    from .. import _io
    from ..errors import OutputError

    key = graph_key(fields)
    try:
        with _io.atomic_paths([root / f"{key}.onnx", root / f"{key}.json"]) as (graph, meta):
            opts.optimized_model_filepath = str(graph)
            session = make(str(path), opts)
            if graph.stat().st_size == 0:
                raise OSError("onnxruntime wrote no optimised graph")
            meta.write_text(json.dumps({"key": fields, "sha256": _sha256(graph), "source": str(path)}, indent=2))
        return session
    except (OSError, OutputError):  # a cache we cannot write only costs the speed-up
        opts.optimized_model_filepath = ""
        return make(str(path), opts)
