"""``load_source(SOURCE)``: what ``anchorflow export SOURCE`` accepts, as a :class:`~.base.BackboneAdapter`.

SOURCE is one of:

1. ``pkg.module:factory`` (or ``path/to/file.py:factory``): ``factory()`` returns a
   BackboneAdapter, or ``(module, description)`` where ``module(x, model_time, **conditions)``
   returns the model's velocity and ``description`` is an :class:`~.base.AdapterSpec` (or a dict
   of its fields, conditions as dicts);
2. a diffusers transformer folder (``config.json`` with ``_class_name``; :mod:`.diffusers`);
3. our own checkpoints: ``default``, a model root or a backbone checkpoint folder (:mod:`.native`).

Time convention of every adapter: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...base.errors import ConfigError
from .base import AdapterSpec, BackboneAdapter, Condition

_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_]\w*)$")


class FactoryAdapter(BackboneAdapter):
    """A user's module ``module(x, model_time, **conditions) -> v`` with its description."""

    def __init__(self, module: nn.Module, spec: AdapterSpec) -> None:
        super().__init__()
        self.module, self.spec = module.eval(), spec

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        return self.our_velocity(self.module(x, self.model_time(t), **(cond or {})))


def as_spec(description: Any) -> AdapterSpec:
    """An AdapterSpec from itself or from a dict of its fields (conditions as dicts or Conditions)."""
    if isinstance(description, AdapterSpec):
        return description
    if not isinstance(description, dict):
        raise ConfigError(f"a factory's description must be an AdapterSpec or a dict, got {type(description).__name__}")
    fields = dict(description)
    fields["conditions"] = tuple(c if isinstance(c, Condition) else Condition(**{**c, "shape": tuple(c["shape"])})
                                 for c in fields.get("conditions", ()))
    fields["state"] = tuple(fields.get("state", ()))
    try:
        return AdapterSpec(**fields)
    except TypeError as exc:
        raise ConfigError(f"a factory's description has unknown or missing fields ({exc}); see AdapterSpec") from None


def _import(target: str) -> Any:
    m = _FACTORY.match(target)
    module_name, attr = m.group("module"), m.group("attr")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{target}: no file {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{target}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{target}: module {module_name} has no {attr!r}")
    return getattr(module, attr)


def from_factory(target: str) -> BackboneAdapter:
    """Call ``pkg.module:factory`` and wrap what it returns."""
    made = _import(target)()
    if isinstance(made, BackboneAdapter):
        return made
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
        raise ConfigError(f"{target} must return a BackboneAdapter or (torch module, description), "
                          f"got {type(made).__name__}")
    return FactoryAdapter(made[0], as_spec(made[1]))


def is_factory(source: str) -> bool:
    return bool(_FACTORY.match(str(source))) and not Path(str(source)).exists()


def load_source(source: str, axes: Optional[dict] = None) -> BackboneAdapter:
    """The adapter for SOURCE (see the module docstring); ``axes`` overrides diffusers' axis ranges."""
    from .diffusers import is_diffusers_folder, load_diffusers

    source = str(source)
    if is_factory(source):
        return from_factory(source)
    if source != "default" and is_diffusers_folder(Path(source).expanduser()):
        return load_diffusers(Path(source).expanduser(), axes)
    from ...runtime.bundles.models import locate
    from ..checkpoint import load_checkpoint
    from .native import NativeAdapter

    files = locate(source)
    if files.backbone is None:
        raise ConfigError(f"{source} has no backbone checkpoint (only a bundle); give a checkpoint, a diffusers "
                          "transformer folder or pkg.module:factory")
    module, cfg = load_checkpoint(files.backbone, kind="backbone")
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    return NativeAdapter(module, data.get("name") or "model", tuple(data.get("data_range", (-1.0, 1.0))))
