"""Backbone adapters (torch): any flow-matching transformer as ``forward(x, t, cond) -> v`` in our time.

``load_source(SOURCE)`` turns what ``anchorflow export SOURCE`` accepts into an adapter: our
checkpoints, a diffusers transformer folder (``config.json`` with ``_class_name``), or a user's
``pkg.module:factory``. See :mod:`.base` for the contract (t = 1 noise, t = 0 data).
"""

from __future__ import annotations

from .base import AdapterSpec, BackboneAdapter, Condition, Positional

__all__ = ["AdapterSpec", "BackboneAdapter", "Condition", "Positional", "load_source"]


def load_source(source: str, axes: dict | None = None):
    """An adapter for ``source`` (see :func:`.factory.load_source`); ``axes`` overrides axis ranges."""
    from .factory import load_source as _load

    return _load(source, axes)
