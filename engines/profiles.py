"""TensorRT optimisation profiles derived from a bundle's metadata (``bundle.json``).

An engine accepts input shapes between a profile's min and max and is tuned for opt. The only
dynamic axis of a bundle is the leading ``"batch"`` axis; every other dim is static and taken
from the input shapes in ``bundle.json``.

Rows versus samples. A solve on B samples sends more rows than B to the networks:

* backbone: ``g * B`` rows, g = 2 when the model can be guided (it has a null label; CFG puts
  the cond and uncond rows into one call), else 1;
* SideNet (BA-solver, arXiv 2601.21542, Algorithm 1): the forward probe evaluates three offsets
  ``a*h, (1-a)*h, h`` in ONE call on ``3 * g * B`` rows; the backward probe uses ``g * B`` rows.

``bundle.json`` records each network's range in rows (the exporter's ``--max-batch N`` gives
the backbone ``max = 2N`` and the SideNet ``max = 6N``); without overrides those ranges are the
profiles. Overrides (``anchorflow build --min-batch/--opt-batch/--max-batch``) are in samples
per solve and become rows by the rule above, with ``probes = 3``: backbone
``[B_min, g*B_opt, g*B_max]``, SideNet ``[B_min, probes*g*B_opt, probes*g*B_max]``; the min
stays at ``B_min`` so an unguided single-sample call (1 row) also fits. A SideNet without its
own range gets ``probes`` times the backbone's. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import CheckpointError, ConfigError

BATCH = "batch"
DEFAULT_SAMPLES = (1, 16, 64)  # used only when bundle.json records no backbone batch range
PROBES = 3  # SideNet offsets per forward probe (BA-solver, 4-node quadrature minus the anchor)


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX input or output: name, shape (ints and ``"batch"``), dtype name."""

    name: str
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class NetworkSpec:
    """One network of a bundle (``backbone`` or ``sidenet``) as bundle.json describes it."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: Optional[dict]
    variants: dict  # precision -> {"file", "sha256"} (reduced-precision ONNX, float32 I/O)

    def onnx_for(self, precision: str) -> tuple[str, str]:
        """(file, sha256) of the ONNX graph that carries ``precision``."""
        if precision == "fp32":
            return self.file, self.sha256
        if precision not in self.variants:
            have = ", ".join(["fp32", *sorted(self.variants)])
            raise ConfigError(
                f"the bundle has no {precision} variant of the {self.name} (it has: {have}); "
                f"re-export with `anchorflow export ... --precision {precision}`"
            )
        variant = self.variants[precision]
        return variant["file"], variant["sha256"]


@dataclass(frozen=True)
class SampleRange:
    """Samples per solve (B) an engine must accept: ``1 <= min <= opt <= max``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ConfigError(
                f"batch range must satisfy 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}; "
                "fix --min-batch/--opt-batch/--max-batch"
            )

    def override(self, min: Optional[int] = None, opt: Optional[int] = None, max: Optional[int] = None) -> "SampleRange":
        """Replace the given bounds; bounds not given are clamped into the new range."""
        new_max = self.max if max is None else int(max)
        new_min = (self.min if min is None else int(min))
        if min is None:
            new_min = _clamp(new_min, 1, new_max)
        new_opt = _clamp(self.opt, new_min, new_max) if opt is None else int(opt)
        return replace(self, min=new_min, opt=new_opt, max=new_max)


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(value, hi))


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: per input name its (min, opt, max) shapes; ``rows`` the batch triple."""

    network: str
    rows: tuple[int, int, int]
    shapes: dict  # input name -> (min_shape, opt_shape, max_shape)

    def to_json(self) -> dict:
        return {"rows": list(self.rows), "shapes": {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}}


# -- bundle.json ---------------------------------------------------------------------------------
def read_bundle(path: str | Path) -> tuple[Path, dict]:
    """(bundle folder, bundle.json dict) for a bundle folder or a model root with ``bundle/`` inside,
    read and validated by the one bundle-format module (:mod:`anchorflow.runtime.bundle_format`)."""
    from ..runtime.bundle_format import read_bundle as read_format

    bundle = read_format(path)
    return bundle.folder, bundle.meta


def _tensors(entries: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(e["name"], tuple(e["shape"]), e.get("dtype", "float32")) for e in entries)


def network_specs(meta: dict) -> dict[str, NetworkSpec]:
    """The networks of a bundle.json. The one place that knows its per-network layout::

        "networks": {"backbone": {"file", "sha256", "inputs": [{"name", "shape", "dtype"}], "outputs": [...],
                                  "batch": {"min", "opt", "max"}, "precisions": {"fp16": {"file", "sha256"}}},
                     "sidenet": {...}}
    """
    networks = meta.get("networks")
    if not isinstance(networks, dict) or "backbone" not in networks:
        raise CheckpointError("bundle.json lists no backbone network under 'networks'; re-export the bundle")
    specs = {}
    for name, entry in networks.items():
        if entry is None:
            continue
        try:
            specs[name] = NetworkSpec(
                name=name, file=entry["file"], sha256=entry["sha256"],
                inputs=_tensors(entry["inputs"]), outputs=_tensors(entry["outputs"]),
                batch=entry.get("batch"), variants=dict(entry.get("precisions") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"bundle.json entry for {name!r} is incomplete ({exc!r}); re-export the bundle") from None
    return specs


def guidance_rows(meta: dict) -> int:
    """2 when the model can be sampled with classifier-free guidance (it has a null label), else 1."""
    model = meta.get("model") or {}
    return 2 if model.get("null_label") is not None else 1


def bundle_rows(meta: dict, probes: int = PROBES) -> dict[str, tuple[int, int, int]]:
    """Rows per network as bundle.json records them (SideNet: ``probes`` x backbone when it records none)."""
    specs = network_specs(meta)
    backbone = specs["backbone"].batch
    if backbone is None:
        rows = row_ranges(SampleRange(*DEFAULT_SAMPLES), guidance_rows(meta), probes)
    else:
        lo, opt, hi = _triple(backbone, "backbone")
        rows = {"backbone": (lo, opt, hi), "sidenet": (lo, probes * opt, probes * hi)}
    for name, spec in specs.items():
        if spec.batch is not None:
            rows[name] = _triple(spec.batch, name)
    return rows


def _triple(batch: dict, name: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(batch[k]) for k in ("min", "opt", "max"))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"bundle.json's batch range of the {name} must be {{min, opt, max}}, got {batch!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise CheckpointError(f"bundle.json's batch range of the {name} must satisfy 1 <= min <= opt <= max, got {batch}")
    return lo, opt, hi


def sample_range(meta: dict, min: Optional[int] = None, opt: Optional[int] = None, max: Optional[int] = None) -> SampleRange:
    """Samples per solve the bundle's backbone range implies (rows / g), with optional overrides."""
    g = guidance_rows(meta)
    lo, opt_rows, hi = bundle_rows(meta)["backbone"]
    hi_s = _clamp(hi // g, lo, hi)
    base = SampleRange(lo, _clamp(opt_rows // g, lo, hi_s), hi_s)
    return base.override(min=min, opt=opt, max=max)


# -- profiles ----------------------------------------------------------------------------------
def row_ranges(samples: SampleRange, guidance: int, probes: int = PROBES) -> dict[str, tuple[int, int, int]]:
    """Rows per call for each network (see the module docstring for the rule)."""
    if guidance not in (1, 2) or probes < 1:
        raise ConfigError(f"guidance must be 1 or 2 and probes >= 1, got {guidance} and {probes}")
    g = guidance
    return {
        "backbone": (samples.min, g * samples.opt, g * samples.max),
        "sidenet": (samples.min, probes * g * samples.opt, probes * g * samples.max),
    }


def profile_for(spec: NetworkSpec, rows: tuple[int, int, int]) -> Profile:
    """Shapes of every input at the (min, opt, max) row counts; static dims copied from the spec."""
    shapes = {}
    for tensor in spec.inputs:
        if not tensor.shape or tensor.shape[0] != BATCH:
            raise ConfigError(f"{spec.name} input {tensor.name!r} has shape {list(tensor.shape)}; the first axis must be 'batch'")
        rest = tensor.shape[1:]
        if any(not isinstance(d, int) or d < 1 for d in rest):
            raise ConfigError(
                f"{spec.name} input {tensor.name!r} has a dynamic non-batch axis {list(tensor.shape)}; "
                "TensorRT profiles here support a dynamic batch axis only: re-export with static state shapes"
            )
        shapes[tensor.name] = tuple((r, *rest) for r in rows)
    return Profile(spec.name, tuple(rows), shapes)


def derive_profiles(meta: dict, samples: Optional[SampleRange] = None, probes: int = PROBES) -> dict[str, Profile]:
    """One :class:`Profile` per network: bundle.json's row ranges, or the rows ``samples`` needs."""
    specs = network_specs(meta)
    rows = bundle_rows(meta, probes) if samples is None else row_ranges(samples, guidance_rows(meta), probes)
    return {name: profile_for(spec, rows.get(name, rows["backbone"])) for name, spec in specs.items()}
