"""onnxruntime's optimised graphs, cached (runtime/bundles/graph_cache.py): the key, its invalidation,
atomic entries, and sessions from the cache computing exactly what uncached sessions compute.

Truth: an uncached session on the same graph (``ANCHORFLOW_ORT_GRAPH_CACHE=0``): the cached
file is onnxruntime's own optimised graph, so the outputs must be bit-identical.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from anchorflow.runtime.bundles import graph_cache
from anchorflow.runtime import load_bundle

FEEDS = dict(x=np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32),
             t=np.array([0.9, 0.5, 0.1], np.float32), cond={"y": np.array([1, 2, 10])})


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANCHORFLOW_ORT_GRAPH_CACHE", raising=False)
    return tmp_path / "cache" / "ort-graphs"


def _v(bundle):
    return bundle.velocity(FEEDS["x"], FEEDS["t"], FEEDS["cond"])


def _entries(root):
    return sorted(p.name for p in root.iterdir() if p.name != graph_cache.KEY_FILE) if root.is_dir() else []


def test_key_changes_with_every_field():
    base = graph_cache.key_fields("ab" * 32, ["CPUExecutionProvider"], "all")
    assert graph_cache.graph_key(base) == graph_cache.graph_key(dict(base))
    for field, other in [("onnxruntime", "0.0.1"), ("graph_sha256", "cd" * 32), ("optimization", "basic"),
                         ("providers", ["CUDAExecutionProvider"]), ("cpu", "other-cpu"), ("format", "x/2")]:
        assert graph_cache.graph_key({**base, field: other}) != graph_cache.graph_key(base), field


def test_cached_sessions_compute_what_uncached_ones_do(root, monkeypatch):
    monkeypatch.setenv("ANCHORFLOW_ORT_GRAPH_CACHE", "0")
    want = _v(load_bundle("default", backend="ort-cpu"))
    assert _entries(root) == []  # switched off: nothing written
    monkeypatch.delenv("ANCHORFLOW_ORT_GRAPH_CACHE")
    first = _v(load_bundle("default", backend="ort-cpu"))  # builds the entries
    names = _entries(root)
    assert len(names) == 4 and not any(n.endswith(".tmp") for n in names)  # graph + record per network
    second = _v(load_bundle("default", backend="ort-cpu"))  # opens the cached graphs
    assert np.array_equal(first, want) and np.array_equal(second, want)
    assert _entries(root) == names  # a hit writes nothing


def test_a_hit_opens_the_cached_file(root, monkeypatch):
    load_bundle("default", backend="ort-cpu")
    opened = []
    real = ort.InferenceSession

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    load_bundle("default", backend="ort-cpu")
    assert len(opened) == 2 and all(p.startswith(str(root)) for p in opened)


def test_a_damaged_entry_is_rebuilt(root):
    want = _v(load_bundle("default", backend="ort-cpu"))
    record = next(p for p in root.glob("*.json") if json.loads(p.read_text())["source"].endswith("backbone.onnx"))
    graph = record.with_suffix(".onnx")
    good = graph.read_bytes()
    graph.write_bytes(good[: len(good) // 2])  # truncated
    assert graph_cache.lookup(root, json.loads(record.read_text())["key"]) is None
    assert np.array_equal(_v(load_bundle("default", backend="ort-cpu")), want)
    assert graph.read_bytes() == good  # rebuilt in place, and whole


def test_a_new_onnxruntime_version_makes_a_new_entry(root, monkeypatch):
    load_bundle("default", backend="ort-cpu")
    before = set(_entries(root))
    monkeypatch.setattr(ort, "__version__", ort.__version__ + ".test")
    load_bundle("default", backend="ort-cpu")
    after = set(_entries(root))
    assert before < after and len(after - before) == 4  # the old entries are never read for the new key
    fields = [json.loads((root / n).read_text())["key"]["onnxruntime"] for n in after - before if n.endswith(".json")]
    assert fields == [ort.__version__] * 2


def test_an_unwritable_cache_only_costs_the_speed_up(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ANCHORFLOW_CACHE", str(blocker))  # ort-graphs cannot be made under a file
    monkeypatch.setenv("ANCHORFLOW_ORT_GRAPH_CACHE", "0")
    want = _v(load_bundle("default", backend="ort-cpu"))
    monkeypatch.delenv("ANCHORFLOW_ORT_GRAPH_CACHE")
    assert np.array_equal(_v(load_bundle("default", backend="ort-cpu")), want)
    assert blocker.read_text() == "x"


def test_a_swapped_graph_with_its_record_rewritten_is_not_run(root):
    """A forger swaps the cached backbone graph for the SideNet's and rewrites the record's sha256:
    the MAC (keyed by the cache's secret) no longer verifies, so the entry is rebuilt, not run."""
    want = _v(load_bundle("default", backend="ort-cpu"))
    records = {json.loads(p.read_text())["source"].rsplit("/", 1)[-1]: p for p in root.glob("*.json")}
    bb, side = records["backbone.onnx"], records["sidenet.onnx"]
    bb.with_suffix(".onnx").write_bytes(side.with_suffix(".onnx").read_bytes())
    record = json.loads(bb.read_text())
    record["sha256"] = graph_cache._sha256(bb.with_suffix(".onnx"))
    bb.write_text(json.dumps(record))
    assert graph_cache.lookup(root, record["key"]) is None
    assert np.array_equal(_v(load_bundle("default", backend="ort-cpu")), want)
    # the same forgery with the right MAC would be accepted: the MAC is what refuses it
    forged = dict(record, mac=graph_cache.mac(graph_cache.secret(root), record["key"], record["sha256"]))
    bb.with_suffix(".onnx").write_bytes(side.with_suffix(".onnx").read_bytes())
    bb.write_text(json.dumps(forged))
    assert graph_cache.lookup(root, record["key"]) == bb.with_suffix(".onnx")


def test_an_entry_or_key_writable_by_others_is_not_trusted(root):
    load_bundle("default", backend="ort-cpu")
    record = next(root.glob("*.json"))
    key = json.loads(record.read_text())["key"]
    assert graph_cache.lookup(root, key) is not None
    record.with_suffix(".onnx").chmod(0o666)
    assert graph_cache.lookup(root, key) is None
    record.with_suffix(".onnx").chmod(0o644)
    (root / graph_cache.KEY_FILE).chmod(0o644)  # a key others can read is no secret
    assert graph_cache.lookup(root, key) is None
