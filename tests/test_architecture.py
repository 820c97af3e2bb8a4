"""The dependency rule of docs/architecture.md ("Dependency rule"), checked on every import.

The graph (tests/_imports.py) holds module-level and function-level imports, importlib calls with
a literal name, ``require("...")``, the ``_LAZY`` tables and the CLI's command table. The test
fails on an import cycle between modules and on an import a folder's rule forbids.
"""

from __future__ import annotations

import sys

import _imports as graph

STD = set(sys.stdlib_module_names)
BASE = {"anchorflow.base", "anchorflow.base.errors", "anchorflow.base._io", "anchorflow.base._deps", "anchorflow.base._lazy"}
CLI_LAYER = ("anchorflow.cli", "anchorflow.commands", "anchorflow.modelref")

# layer -> (third-party packages allowed at module level, allowed only inside functions / lazily,
#           package modules (prefixes) allowed at module level, allowed lazily)
RULES: dict[str, tuple[set, set, tuple, tuple]] = {
    "base": (set(), set(), tuple(BASE), ()),
    "runtime": ({"numpy", "filelock"}, {"onnxruntime", "tokenizers"}, (*BASE, "anchorflow.runtime"),
                ("anchorflow.engines", "anchorflow.trainers.torch_wrappers")),  # the trt and torch backends
    "engines": ({"numpy", "filelock", "tqdm"}, {"tensorrt", "cuda", "polygraphy", "onnx"},
                (*BASE, "anchorflow.engines", "anchorflow.runtime"), ()),
    "export": ({"numpy", "tqdm", "torch", "onnx", "onnxruntime"},
               {"onnxslim", "onnxconverter_common", "polygraphy", "safetensors", "diffusers", "tokenizers", "ml_dtypes"},
               (*BASE, "anchorflow.export", "anchorflow.runtime"), ("anchorflow.trainers", "anchorflow.engines")),
    "trainers": ({"numpy", "tqdm", "torch", "safetensors"}, {"sklearn", "diffusers", "onnxruntime"},
                 (*BASE, "anchorflow.trainers"), ("anchorflow.runtime",)),
    "integrations": ({"numpy", "torch", "diffusers"}, set(),
                     (*BASE, "anchorflow.integrations", "anchorflow.runtime"), ("anchorflow.trainers",)),
    "serve": ({"numpy", "PIL"}, {"ray", "starlette"}, (*BASE, "anchorflow.serve", "anchorflow.runtime"),
              ("anchorflow.sampling", "anchorflow.plots")),
    # the application layer: CLI, its commands, the MODEL resolver, demo, bench, plots
    "app": ({"numpy", "click", "tqdm", "PIL"},
            {"onnxruntime", "torch", "tensorrt", "matplotlib", "onnx", "diffusers", "ray", "sklearn", "safetensors"},
            ("anchorflow",), ("anchorflow",)),
}

# Known violations still in the code, each with why it stays (remove a line when it is fixed).
ALLOWED: set[tuple[str, str]] = {
    # serve/deployment.py is the Ray module itself, imported only by `anchorflow serve` (lazily)
    ("anchorflow.serve.deployment", "ray"), ("anchorflow.serve.deployment", "starlette"),
}
ALLOWED_CYCLES: list[set[str]] = []
# Modules that may import a module named at run time (import_module(variable)), each with why the
# graph still sees every import: anywhere else such a call (e.g. a string table of backends) hides
# an import from this test and fails it.
DYNAMIC_ALLOWED: dict[str, str] = {
    "anchorflow.base._lazy": "serves the _LAZY tables, which the walker reads",
    "anchorflow.base._deps": "require(name): the walker reads each literal require call",
    "anchorflow.commands.lazygroup": "serves cli.COMMANDS, which the walker reads",
    "anchorflow.trainers.checkpoint": "its own package's builder modules (backbone, sidenet, classifier)",
    "anchorflow.trainers.adapters.factory": "the user's pkg.module:factory, named on the command line",
}
# Modules that must not reach the named packages even where their folder's rule would let them:
# the torch reference sampler is the runtime's test oracle and shares no code with what it checks.
ISOLATED: dict[str, tuple[str, ...]] = {"anchorflow.trainers.reference_sampler": ("anchorflow.runtime",)}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RULES and parts[1] != "base":
        return parts[1]
    return "app"


def _allowed(target: str, prefixes: tuple) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def violations() -> list[str]:
    known = set(graph.modules())
    found = []
    for e in graph.edges():
        if e.target == graph.DYNAMIC:
            if e.source not in DYNAMIC_ALLOWED:
                found.append(f"{e.source}:{e.line} imports a module named at run time (write a literal import)")
            continue
        rule = RULES[layer(e.source)]
        internal = graph.internal_target(e.target, known)
        if internal is None:
            pkg = graph.top(e.target)
            ok = pkg in STD or pkg in rule[0] or (e.lazy and pkg in rule[1])
            shown = pkg
        else:
            ok = internal in (e.source, "anchorflow") or _allowed(internal, rule[2]) or (e.lazy and _allowed(internal, rule[3]))
            if layer(e.source) != "app" and _allowed(internal, CLI_LAYER):
                ok = False  # library packages never import the CLI layer
            if _allowed(internal, ISOLATED.get(e.source, ())):
                ok = False
            shown = internal
        if not ok and (e.source, shown) not in ALLOWED:
            found.append(f"{e.source}:{e.line} imports {shown}{' (lazily)' if e.lazy else ''}")
    return sorted(set(found))


# The runtime's rooms (docs/architecture.md, "Rooms of the runtime"): room -> (rooms it may import at module
# level, rooms it may import only lazily). "front" is anchorflow/runtime/__init__.py, "plan" runtime/plan.py;
# every other runtime module lives in a room. ROOM_EXTRA: single modules a room may import besides.
ROOMS: dict[str, tuple[set, set]] = {
    "solving": ({"solving"}, set()),
    "fastflow": ({"fastflow", "solving"}, set()),
    "bundles": ({"bundles", "solving"}, {"plan"}),  # LoadedBundle.plan / .sample
    "plan": ({"plan", "solving", "bundles", "fastflow"}, set()),
    "evaluation": ({"evaluation", "solving", "bundles"}, {"plan"}),  # verify samples through the plan
    "pipelines": ({"pipelines", "solving", "bundles"}, {"plan"}),  # generate runs a plan
    "front": ({"front", "solving"}, {"bundles", "fastflow", "plan", "pipelines", "evaluation"}),
}
ROOM_EXTRA = {"solving": ("anchorflow.runtime.fastflow.bandit",)}  # the pure UCB maths the FastFlow loop runs


def room(module: str) -> str | None:
    """The room of a runtime module ("?" for a module outside every room), None outside the runtime."""
    parts = module.split(".")
    if parts[:2] != ["anchorflow", "runtime"]:
        return None
    if len(parts) == 2:
        return "front"
    return parts[2] if parts[2] in ROOMS and parts[2] != "front" else "?"


def room_violations() -> list[str]:
    known = set(graph.modules())
    found = [f"{m} is in no room of the runtime (move it into one: docs/architecture.md)"
             for m in known if room(m) == "?"]
    for e in graph.edges():
        src = room(e.source)
        target = graph.internal_target(e.target, known)
        dst = None if target is None else room(target)
        if src in (None, "?") or dst is None or dst == src:
            continue
        now, lazily = ROOMS[src]
        ok = dst in now or (e.lazy and dst in lazily) or _allowed(target, ROOM_EXTRA.get(src, ()))
        if not ok:
            found.append(f"{e.source}:{e.line} ({src}) imports {target} ({dst}){' lazily' if e.lazy else ''}")
    return sorted(set(found))


def cycles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    known = graph.modules()
    adj: dict[str, set[str]] = {m: set() for m in known}
    for e in graph.edges():
        t = graph.internal_target(e.target, set(known))
        if t and t != e.source:
            adj[e.source].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    for root in adj:
        if root in index:
            continue
        work = [(root, iter(sorted(adj[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(adj[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_the_walker_sees_lazy_imports():
    # the checker must see what it claims to: a function-level import, a _LAZY entry, the CLI table
    edges = {(e.source, e.target) for e in graph.edges()}
    assert ("anchorflow.runtime", "anchorflow.runtime.bundles.load") in edges  # _LAZY
    assert ("anchorflow.cli", "anchorflow.commands.sample") in edges  # LazyGroup's COMMANDS
    assert any(e.source == "anchorflow.commands.train" and e.lazy and graph.top(e.target) == "torch"
               for e in graph.edges())  # inside a function
    assert len(graph.modules()) > 50


def test_cycle_detection_finds_a_planted_cycle(monkeypatch):
    real = graph.edges()
    planted = real + [graph.Edge("anchorflow.base.errors", "anchorflow.base._io", 1, True)]
    monkeypatch.setattr(graph, "edges", lambda: planted)
    assert any({"anchorflow.base.errors", "anchorflow.base._io"} <= c for c in cycles())


def test_no_import_cycle():
    found = [c for c in cycles() if c not in ALLOWED_CYCLES]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_dependency_rule():
    found = violations()
    assert not found, "imports breaking docs/architecture.md's dependency rule:\n" + "\n".join(found)


def test_each_room_imports_only_what_its_rule_allows():
    found = room_violations()
    assert not found, "imports breaking the rooms' rule (docs/architecture.md):\n" + "\n".join(found)


def test_a_planted_import_between_rooms_fails(monkeypatch):
    real = graph.edges()
    planted = real + [graph.Edge("anchorflow.runtime.solving.field", "anchorflow.runtime.bundles.format", 7, True),
                      graph.Edge("anchorflow.runtime.bundles.format", "anchorflow.runtime.plan", 8, False)]
    monkeypatch.setattr(graph, "edges", lambda: planted)
    found = room_violations()
    assert ("anchorflow.runtime.solving.field:7 (solving) imports anchorflow.runtime.bundles.format (bundles) lazily"
            in found)
    assert "anchorflow.runtime.bundles.format:8 (bundles) imports anchorflow.runtime.plan (plan)" in found
    mods = graph.modules()
    monkeypatch.setattr(graph, "modules", lambda: {**mods, "anchorflow.runtime.loose": mods["anchorflow.runtime"]})
    assert "anchorflow.runtime.loose is in no room of the runtime (move it into one: docs/architecture.md)" in \
        room_violations()


def test_the_oracle_may_not_import_the_runtime(monkeypatch):
    # trainers may import the runtime lazily, but not the reference sampler that checks it
    real = graph.edges()
    planted = real + [graph.Edge("anchorflow.trainers.reference_sampler", "anchorflow.runtime.solving.field", 1, True)]
    monkeypatch.setattr(graph, "edges", lambda: planted)
    assert any("reference_sampler:1 imports anchorflow.runtime.solving.field" in v for v in violations())


PLANTED_TABLE = """
import importlib
BACKENDS = {"cli": ("anchorflow.commands.sample:sample", "click")}
def runs(backend):
    module, _, fn = BACKENDS[backend][0].partition(":")
    return getattr(importlib.import_module(module), fn)
def literal():
    from anchorflow.commands import sample
"""


def test_a_planted_import_through_a_table_fails_the_rule(monkeypatch):
    """The mutant that once passed: a backend table entry making the runtime import the CLI layer
    through ``importlib`` with a variable. The walker sees the call; the rule refuses it (and the
    same import written literally, as a backend must be)."""
    import ast

    real = graph.edges()
    visitor = graph._Visitor("anchorflow.runtime.planted", False, set(graph.modules()))
    visitor.visit(ast.parse(PLANTED_TABLE))
    monkeypatch.setattr(graph, "edges", lambda: real + visitor.edges)
    found = violations()
    assert "anchorflow.runtime.planted:6 imports a module named at run time (write a literal import)" in found
    assert "anchorflow.runtime.planted:8 imports anchorflow.commands.sample (lazily)" in found
