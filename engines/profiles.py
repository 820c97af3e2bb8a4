"""TensorRT optimisation profiles from a bundle's declared inputs (``bundle.json``, via the bundle-format module).

An engine accepts input shapes between a profile's min and max and is tuned for opt. Every
input's shape is declared with ints and axis names (``["batch", 16, "H", "W"]``, ``["batch",
"L", 4096]``, ``[7, 3]``): ints are static, ``batch`` is the network's rows per call, and every
other named axis (latent ``H``/``W``, text length ``L``...) takes the range bundle.json declares
for it under ``axes``. An input without a batch axis (``per_row: false``) simply has no row
dimension. A named axis without a declared range is refused before TensorRT sees the graph.

Opt is the expected size, not the largest: where bundle.json declares ``opt == max`` (the
digits bundle says batch 1/128/128), opt becomes the expected batch, 16 samples per solve in
rows (below), and a named axis gets the largest multiple of ``gcd(min, max)`` at or below half
its max (so a patch-size constraint that min and max obey still holds), but never below min.

Rows versus samples. A solve on B samples sends more rows than B to the networks:

* backbone: ``g * B`` rows, g = 2 when the model is guided by rows (CFG puts the cond and
  uncond rows into one call), else 1;
* SideNet (BA-solver, arXiv 2601.21542, Algorithm 1): the merged probe evaluates four offsets
  ``-a*h, a*h', (1-a)*h', h'`` in ONE call on ``4 * g * B`` rows (the most of any registered solver,
  ``runtime.solvers.max_sidenet_offsets``); the paper's probes use ``3 * g * B`` and ``g * B``.

``bundle.json`` records each network's range in rows (the exporter's ``--max-batch N`` gives
the backbone ``max = 2N`` and the SideNet ``max = 8N``); without overrides those ranges are the
profiles. Overrides (``anchorflow build --min-batch/--opt-batch/--max-batch``) are in samples
per solve and become rows by the rule above, with ``probes = 3``: backbone
``[B_min, g*B_opt, g*B_max]``, SideNet ``[B_min, probes*g*B_opt, probes*g*B_max]``; they must
stay inside the rows the bundle was exported (and validated) for. Time convention: t = 1
noise, t = 0 data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..base.errors import ConfigError
from ..runtime.solving.solvers import max_sidenet_offsets, rows_note

BATCH = "batch"
DEFAULT_SAMPLES = (1, 16, 64)  # samples per solve: the backbone range when bundle.json has none; [1] = expected
# SideNet offsets per call, from the solver registry (BA's merged probe: -a h, a h', (1-a) h', h' = 4)
PROBES = max_sidenet_offsets()


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
    """One optimisation profile: per input name its (min, opt, max) shapes.

    ``rows``: the batch triple; ``axes``: every named axis's triple (``batch`` included), so the
    cache key holds the resolution and text-length ranges explicitly.
    """

    network: str
    rows: tuple[int, int, int]
    shapes: dict  # input name -> (min_shape, opt_shape, max_shape)
    axes: dict = None  # axis name -> (min, opt, max)

    def describe(self) -> str:
        """``rows 1..128 (opt 32), H 32..128 (opt 64)``: every dynamic axis with its range."""
        axes = self.axes or {BATCH: self.rows}
        return ", ".join(f"{'rows' if k == BATCH else k} {lo}..{hi} (opt {opt})" for k, (lo, opt, hi) in axes.items())

    def to_json(self) -> dict:
        axes = self.axes if self.axes is not None else {BATCH: self.rows}
        return {"rows": list(self.rows), "axes": {k: list(v) for k, v in sorted(axes.items())},
                "shapes": {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}}


# -- bundle.json (through the bundle-format module) -----------------------------------------------
def read_bundle(path: str | Path) -> tuple[Path, dict]:
    """(bundle folder, bundle.json dict) for a bundle folder or a model root with ``bundle/`` inside,
    read and validated by the one bundle-format module (:mod:`anchorflow.runtime.bundles.format`)."""
    from ..runtime.bundles.format import read_bundle as read_format

    bundle = read_format(path)
    return bundle.folder, bundle.meta


def _format(meta: dict) -> Any:
    from ..runtime.bundles.format import parse_meta

    return parse_meta(meta, Path("."), "bundle.json")


def network_specs(meta: dict) -> dict[str, Any]:
    """name -> ``NetworkDecl`` (inputs with dtype, shape and axis names; ``batch``; ``axes``; ``entry(precision)``)."""
    return dict(_format(meta).networks)


def guidance_rows(meta: dict) -> int:
    """2 when the model is guided by rows (CFG on [cond; null] rows in one call), else 1."""
    return 2 if _format(meta).guidance.mode == "rows" else 1


def bundle_rows(meta: dict, probes: int = PROBES) -> dict[str, tuple[int, int, int]]:
    """Rows per network as bundle.json records them (SideNet: ``probes`` x backbone when it records none)."""
    specs = network_specs(meta)
    backbone = specs["backbone"].batch
    if backbone is None:
        rows = row_ranges(SampleRange(*DEFAULT_SAMPLES), guidance_rows(meta), probes)
    else:
        lo, opt, hi = backbone
        rows = {"backbone": (lo, opt, hi), "sidenet": (lo, probes * opt, probes * hi)}
    for name, spec in specs.items():
        if spec.batch is not None:
            rows[name] = tuple(spec.batch)
    return rows


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


def expected_rows(network: str, guidance: int, probes: int = PROBES) -> int:
    """Rows of a call at the expected batch (``DEFAULT_SAMPLES[1]`` samples per solve)."""
    return DEFAULT_SAMPLES[1] * guidance * (probes if network == "sidenet" else 1)


def opt_below_max(triple: tuple[int, int, int], expected: Optional[int] = None) -> tuple[int, int, int]:
    """(min, opt, max) with opt moved below max when it equals max (and min < max).

    ``expected`` (rows): the opt to use then, clamped into [min, max - 1]; None (a named axis
    such as H or L): the largest multiple of gcd(min, max) at or below max // 2, at least min.
    """
    lo, opt, hi = (int(v) for v in triple)
    if opt < hi or lo == hi:
        return lo, opt, hi
    if expected is not None:
        return lo, _clamp(int(expected), lo, hi - 1), hi
    step = math.gcd(lo, hi)
    return lo, max(lo, (hi // 2) // step * step), hi


def profile_for(spec: Any, rows: tuple[int, int, int], axes: Optional[dict] = None) -> Profile:
    """Shapes of every input of ``spec`` (a ``NetworkDecl``) at the (min, opt, max) of each of its axes.

    ``rows``: the batch triple; ``axes``: other named axes (default: the ranges ``spec`` declares,
    with :func:`opt_below_max` applied). A named axis without a range is a ConfigError.
    """
    ranges = {BATCH: tuple(rows)}
    for tensor in spec.inputs:
        for dim in tensor.shape:
            if isinstance(dim, int) or dim in ranges:
                continue
            declared = (axes or {}).get(dim) or spec.axis_range(dim)
            if declared is None:
                raise ConfigError(
                    f"{spec.name} input {tensor.name!r} has shape {list(tensor.shape)} but bundle.json declares no "
                    f"range for axis {dim!r}; re-export the bundle (anchorflow export declares every dynamic axis)"
                )
            ranges[dim] = declared if axes and dim in axes else opt_below_max(declared)
    shapes = {t.name: tuple(tuple(d if isinstance(d, int) else ranges[d][i] for d in t.shape) for i in range(3))
              for t in spec.inputs}
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)} | {BATCH}
    return Profile(spec.name, tuple(rows), shapes, {k: v for k, v in ranges.items() if k in used})


def _inside_export(spec: Any, rows: tuple[int, int, int]) -> None:
    """Refuse engine rows outside what the bundle was exported (and validated) for."""
    if spec.batch is not None and (rows[0] < spec.batch[0] or rows[2] > spec.batch[2]):
        lo, _, hi = spec.batch
        raise ConfigError(
            f"the {spec.name} was exported for {lo}..{hi} rows per call, but the batch options ask for "
            f"{rows[0]}..{rows[2]} rows ({rows_note()}); "
            "choose --min-batch/--max-batch inside it or re-export with a larger --max-batch"
        )


def derive_profiles(meta: dict, samples: Optional[SampleRange] = None, probes: int = PROBES,
                    explicit_opt: bool = False) -> dict[str, Profile]:
    """One :class:`Profile` per network: bundle.json's ranges (opt below max), or the rows ``samples`` needs.

    ``explicit_opt``: the caller chose the opt (``--opt-batch``); it is kept even when it equals max.
    """
    specs = network_specs(meta)
    g = guidance_rows(meta)
    rows = bundle_rows(meta, probes) if samples is None else row_ranges(samples, g, probes)
    profiles = {}
    for name, spec in specs.items():
        triple = tuple(rows.get(name, rows["backbone"]))
        if samples is not None:
            _inside_export(spec, triple)
        if not explicit_opt:
            triple = opt_below_max(triple, expected_rows(name, g, probes))
        profiles[name] = profile_for(spec, triple)
    return profiles
