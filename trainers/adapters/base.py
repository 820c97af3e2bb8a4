"""Backbone adapters: any flow-matching network seen in OUR convention, for export and SideNet training.

A :class:`BackboneAdapter` is a torch module with ``forward(x, t, cond) -> v``:

- ``x`` (B, C, H, W) float32, the state; ``t`` (B,) float32 in OUR time (t = 1 noise, t = 0 data);
- ``cond`` a dict name -> tensor of the declared conditions (row axis first when ``per_row``);
- ``v`` (B, C, H, W) = dx/dt in our time.

Its :class:`AdapterSpec` says what bundle.json declares (:mod:`anchorflow.runtime.bundles.format`):
the conditions with dtype and shape (named axes such as ``"L"`` for text length, ``"H"``/``"W"``
for latent size), the ranges of every named axis (min, opt, max), the time map the adapter applies
before calling the model (``scale``: model time = scale * t, e.g. SD3/Sana's timestep = 1000 sigma;
``identity``: FLUX, which scales inside; ``flip``: a model trained with t = 0 noise, whose velocity
then changes sign), and the guidance mode: ``rows`` (CFG on [cond; null] rows, with inline null
values such as a null label), ``embedded`` (a scalar condition such as FLUX-dev's ``guidance``, one
row per sample) or ``none``. Model-specific layout (FLUX's 2x2 packing, its position ids) lives in
the adapter's forward, so the exported graph still takes x (B, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...base.errors import ConfigError

BATCH = "batch"
_TORCH = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


@dataclass(frozen=True)
class Condition:
    """One declared condition: ``shape`` with ``"batch"`` first when per row, ints and axis names.

    ``low``/``high``: the range random example values are drawn from (ints: labels 0..high-1;
    floats: N(0, 1) when both are None, else uniform).
    """

    name: str
    dtype: str
    shape: tuple
    per_row: bool = True
    low: Optional[float] = None
    high: Optional[float] = None

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": "condition",
                "per_row": self.per_row}


@dataclass(frozen=True)
class AdapterSpec:
    """What a backbone takes, in bundle.json's terms (see the module docstring).

    ``state`` is x's shape without the batch axis, ints and axis names (e.g. ``(16, "H", "W")``);
    ``axes`` maps every axis name used by ``state`` and the conditions to (min, opt, max);
    ``multiples`` the axes whose sizes must be multiples of m (e.g. ``{"H": 2, "W": 2}`` for 2x2 patches).
    """

    name: str
    state: tuple
    conditions: tuple = ()
    axes: dict = field(default_factory=dict)
    time: dict = field(default_factory=lambda: {"map": "identity"})
    guidance: dict = field(default_factory=lambda: {"mode": "none"})
    data_range: Optional[tuple] = None
    family: str = "custom"
    multiples: dict = field(default_factory=dict)  # axis -> m: sizes must be multiples of m (patching)

    def __post_init__(self) -> None:
        used = {d for shape in [self.state, *(c.shape for c in self.conditions)] for d in shape if isinstance(d, str)}
        missing = sorted(used - {BATCH} - set(self.axes))
        if missing:
            raise ConfigError(f"adapter {self.name!r}: axes {missing} have no (min, opt, max) range; add them to axes")
        for axis, r in self.axes.items():
            if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
                raise ConfigError(f"adapter {self.name!r}: axis {axis} range must be (min, opt, max) with "
                                  f"1 <= min <= opt <= max, got {r}")
        if self.time.get("map") not in ("identity", "scale", "flip"):
            raise ConfigError(f"adapter {self.name!r}: time map must be identity, scale or flip, got {self.time}")
        if self.guidance.get("mode") not in ("rows", "embedded", "none"):
            raise ConfigError(f"adapter {self.name!r}: guidance mode must be rows, embedded or none, got {self.guidance}")

    def sizes(self, **overrides: int) -> dict:
        """Axis name -> size: the opt of each range, with ``overrides`` (e.g. ``L=7``)."""
        return {**{a: r[1] for a, r in self.axes.items()}, **overrides}

    def state_shape(self, **overrides: int) -> tuple[int, ...]:
        """x's shape (without batch) at the given axis sizes (default: opt)."""
        sizes = self.sizes(**overrides)
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.state)

    def inputs(self) -> list[dict]:
        """bundle.json's ``inputs`` of the backbone: x, t, then the conditions in order."""
        return [{"name": "x", "dtype": "float32", "shape": [BATCH, *self.state], "role": "state", "per_row": True},
                {"name": "t", "dtype": "float32", "shape": [BATCH], "role": "time", "per_row": True},
                *(c.to_json() for c in self.conditions)]

    def example(self, batch: int, rng: np.random.Generator, **sizes: int) -> dict[str, np.ndarray]:
        """Random inputs of the declared shapes: x ~ N(0, 1), t ~ U(0, 1) and every condition."""
        size = self.sizes(**sizes)
        dims = lambda shape: tuple(batch if d == BATCH else size[d] if isinstance(d, str) else int(d)  # noqa: E731
                                   for d in shape)
        out = {"x": rng.standard_normal((batch, *dims(self.state))).astype(np.float32),
               "t": rng.random(batch).astype(np.float32)}
        for c in self.conditions:
            shape = dims(c.shape)
            if c.dtype in ("int64", "int32"):
                out[c.name] = rng.integers(int(c.low or 0), int(c.high or 2), shape).astype(c.dtype)
            elif c.dtype == "bool":
                out[c.name] = np.ones(shape, bool)
            elif c.low is None and c.high is None:
                out[c.name] = rng.standard_normal(shape).astype(np.float32)
            else:
                out[c.name] = rng.uniform(c.low, c.high, shape).astype(np.float32)
        return out

    def to_bundle(self) -> dict:
        """The bundle.json pieces this spec fixes: model, time, guidance, backbone inputs and axes."""
        model: dict[str, Any] = {"name": self.name, "family": self.family, "state_shape": list(self.state_shape()),
                                 "data_range": list(self.data_range) if self.data_range else None}
        null = (self.guidance.get("null") or {}).get("y")
        labels = next((c for c in self.conditions if c.name == "y"), None)
        if labels is not None and labels.high is not None:
            model["num_classes"] = int(labels.high) - (1 if null is not None else 0)
        if null is not None:
            model["null_label"] = int(null)
        axes = {a: dict(zip(("min", "opt", "max"), map(int, r))) for a, r in self.axes.items()}
        return {"model": model, "time": dict(self.time), "guidance": dict(self.guidance),
                "inputs": self.inputs(), "axes": axes}


class BackboneAdapter(nn.Module):
    """``forward(x, t, cond) -> v`` in our convention (see the module docstring); ``spec`` declares it."""

    spec: AdapterSpec
    float32_scopes: tuple = ()  # module-path regexes kept float32 in fp16 exports (export.precision.to_low)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Our t (t = 1 noise) -> the model's time input, by the declared map."""
        kind = self.spec.time["map"]
        if kind == "scale":
            return t * float(self.spec.time["scale"])
        return 1.0 - t if kind == "flip" else t

    def our_velocity(self, v: torch.Tensor) -> torch.Tensor:
        """The model's dx/d(model time) -> dx/dt in our time (sign flip for the ``flip`` map)."""
        return -v if self.spec.time["map"] == "flip" else v

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        raise NotImplementedError

    def call_numpy(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict] = None) -> np.ndarray:
        """The runtime's ``velocity(x, t, cond)`` on numpy arrays (CPU, no grad)."""
        with torch.no_grad():
            tc = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in (cond or {}).items()}
            return self(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                        torch.from_numpy(np.ascontiguousarray(t, np.float32)), tc).float().numpy()


class Positional(nn.Module):
    """``forward(x, t, *conditions)`` in declared order, for ``torch.onnx.export`` (named graph inputs)."""

    def __init__(self, adapter: BackboneAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.names = [c.name for c in adapter.spec.conditions]

    def forward(self, x: torch.Tensor, t: torch.Tensor, *conds: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, t, dict(zip(self.names, conds)))
