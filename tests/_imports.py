"""Static import graph of the package (a helper of tests/test_architecture.py).

Walks every ``.py`` file under the folders mapped by pyproject's package-dir, and records each
import: module level or inside a function, ``from . import x`` (resolved to the sub-module when
there is one), ``importlib.import_module("literal"[, package])`` (with a name made at run time:
an edge to :data:`DYNAMIC`), ``_deps.require("literal")``,
the ``_LAZY`` tables served by :func:`anchorflow.base._lazy.lazy_attributes` and the CLI's
``COMMANDS`` table served by its LazyGroup.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DYNAMIC = "<a module named at run time>"  # the target of ``import_module(variable)``: no rule can check it
PACKAGE_DIRS = {"anchorflow": "anchorflow", "anchorflow.base": "base", "anchorflow.runtime": "runtime", "anchorflow.trainers": "trainers",
                "anchorflow.export": "export", "anchorflow.engines": "engines"}


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (a module name, internal or third-party) at ``line``."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function (or served lazily by a table / importlib)
    name: str = ""  # for ``from package import name``: the attribute imported


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" else list(rel.parts)
            if rel.name == "__init__":
                parts = list(rel.parts[:-1])
            name = ".".join([package, *parts]) if parts else package
            if package == "anchorflow" and parts and parts[0] in {v for v in PACKAGE_DIRS.values()} - {"anchorflow"}:
                continue
            found.setdefault(name, path)
    return found


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool, known: set[str]):
        self.module, self.is_pkg, self.known = module, is_pkg, known
        self.depth = 0
        self.lazy_table: dict[str | None, str] = {}
        self.edges: list[Edge] = []

    def add(self, target: str, node: ast.AST, lazy: bool | None = None, name: str = "") -> None:
        self.edges.append(Edge(self.module, target, node.lineno, self.depth > 0 if lazy is None else lazy, name))

    def visit_FunctionDef(self, node):  # noqa: N802
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):  # noqa: N802  (``if TYPE_CHECKING:`` imports never run)
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node):  # noqa: N802
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node):  # noqa: N802
        base = _resolve(self.module, self.is_pkg, node.level, node.module)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.add(sub, node) if sub in self.known else self.add(base, node, name=alias.name)

    def visit_Call(self, node):  # noqa: N802
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = _literal(node.args[0]) if node.args else None
        if fname == "import_module" and first:
            package = _literal(node.args[1]) if len(node.args) > 1 else None
            if first.startswith(".") and package:
                level = len(first) - len(first.lstrip("."))
                first = _resolve(package, True, level, first.lstrip(".") or None)
            self.add(first, node, lazy=True)
        elif fname in ("import_module", "__import__") and node.args:  # a name made at run time
            self.add(DYNAMIC, node, lazy=True)
        elif fname == "require" and first:
            self.add(first, node, lazy=True)
        self.generic_visit(node)

    def visit_Assign(self, node):  # noqa: N802
        names = {t.id for t in node.targets if isinstance(t, ast.Name)}
        self._table(names, node.value, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node):  # noqa: N802
        if isinstance(node.target, ast.Name) and node.value is not None:
            self._table({node.target.id}, node.value, node)
        self.generic_visit(node)

    def _table(self, names: set[str], value: ast.AST, node: ast.AST) -> None:
        if not isinstance(value, ast.Dict):
            return
        if "_LAZY" in names:  # attribute -> relative sub-module
            for k, v in zip(value.keys, value.values):
                target = _literal(v)
                if target:
                    self.lazy_table[_literal(k)] = target
                    level = len(target) - len(target.lstrip("."))
                    self.add(_resolve(self.module, self.is_pkg, level, target.lstrip(".") or None)
                             if level else target, node, lazy=True)
        elif "COMMANDS" in names and self.module == "anchorflow.cli":  # LazyGroup: (module, attr, help)
            for v in value.values:
                if isinstance(v, ast.Tuple) and v.elts and _literal(v.elts[0]):
                    mod = _literal(v.elts[0])
                    self.add(mod if "." in mod else f"anchorflow.commands.{mod}", node, lazy=True)


def edges() -> list[Edge]:
    """Every import of every module of the package."""
    mods = modules()
    known = set(mods)
    out: list[Edge] = []
    served: dict[tuple[str, str], str] = {}  # (package, attribute) -> the sub-module its _LAZY names
    for name, path in mods.items():
        visitor = _Visitor(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out.extend(visitor.edges)
        for attr, target in visitor.lazy_table.items():
            level = len(target) - len(target.lstrip("."))
            served[(name, str(attr))] = _resolve(name, True, level, target.lstrip(".") or None) if level else target
    # ``from anchorflow.runtime import solve`` runs anchorflow/runtime/__init__.py, then (on first use)
    # the sub-module its _LAZY table names: the edge goes to both
    extra = [Edge(e.source, served[(e.target, e.name)], e.line, True) for e in out if (e.target, e.name) in served]
    return out + extra


def internal_target(target: str, known: set[str]) -> str | None:
    """The package module ``target`` names (``a.b.c`` attribute imports resolved to ``a.b``), or None."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def top(target: str) -> str:
    return target.split(".")[0]


if __name__ == "__main__":  # python tests/_imports.py: print the graph
    for e in edges():
        print(f"{e.source} -> {e.target}{' (lazy)' if e.lazy else ''}  :{e.line}", file=sys.stdout)
