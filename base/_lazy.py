"""Lazy package attributes: ``__getattr__ = lazy_attributes(__name__, {"name": ".module"})``.

Keeps ``import anchorflow.<package>`` cheap: a name is imported from its sub-module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` serving ``names`` (attribute -> relative sub-module) lazily."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
