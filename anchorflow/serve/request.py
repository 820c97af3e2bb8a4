"""Parsing and validating one ``POST /v1/sample`` body into a :class:`SampleRequest` (Ray-free).

Every problem raises :class:`RequestError` (an AnchorflowError, answered as HTTP 400 with
``{"error": message}``). The request mirrors ``anchorflow sample``'s options:

    {"solver": "ba", "nfe": 6, "n": 3, "labels": [0, 1, 2], "cfg": 1.5, "cfg_interval": [0, 1],
     "seed": 0, "grid": null, "format": "npy" | "png" | "json"}

``grid`` is null (what ``anchorflow sample`` uses by default: the bundle's tuned grid for the solver
and NFE where it has one, else uniform), "uniform", "shift:S" or an explicit list of times from 1
(noise) to 0 (data).

``quality`` names a preset recorded by ``anchorflow tune --target-psnr`` (or a number of dB: the
fastest preset whose bound meets it) instead of solver / nfe / grid / first_call (giving both is
refused); a request naming none of the five gets the service's ``--quality``, if it has one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..base.errors import ConfigError
from ..runtime.solving.solvers import max_sidenet_offsets
from .errors import BodyTooLarge, RequestError  # noqa: F401  (raised here; their home is below conditions)

FORMATS = ("npy", "png", "json")
FIELDS = ("solver", "nfe", "n", "labels", "cfg", "cfg_interval", "seed", "grid", "first_call", "format",
          "conditions", "null_conditions", "prompt", "negative_prompt", "quality")
# What a quality preset chooses (a request gives either "quality" or these).
CONFIG_FIELDS = ("solver", "nfe", "grid", "first_call")
DEFAULTS: dict[str, Any] = {"solver": "ba", "nfe": 7, "n": 16, "labels": None, "cfg": 1.0,
                            "cfg_interval": [0.0, 1.0], "seed": 0, "grid": None, "first_call": "backbone",
                            "format": "npy", "conditions": None, "null_conditions": None,
                            "prompt": None, "negative_prompt": None,  # prompts: pipeline bundles (.prompts)
                            "quality": None}  # None: the service's --quality, else the defaults above
# How runtime.plan's messages name each argument over HTTP (the CLI says --cfg, the API says 'cfg').
HTTP_NAMES = {"solver": "'solver'", "nfe": "'nfe'", "grid": "'grid'", "first_call": "'first_call'",
              "cfg_scale": "'cfg'", "cfg_interval": "'cfg_interval'", "labels": "'labels'", "cond": "'conditions'",
              "null_cond": "'null_conditions'", "n": "'n'", "seed": "'seed'", "noise": "the start noise",
              "bandit_state": "the service's bandit state", "calls": "calls", "speedup": "speedup",
              "mu_factor": "the service's --mu-factor"}


@dataclass(frozen=True)
class Limits:
    """What the service accepts: ``max_rows`` per solve (state rows, before CFG doubling), ``max_n``
    per request (larger non-FastFlow requests are split into several solves), ``max_nfe``,
    ``max_cost`` (n x nfe: backbone row-calls of one request, before CFG doubling), ``max_body``
    (bytes of one request body; more: HTTP 413) and ``time_budget_s`` (wall time a request may take
    from arrival; its remaining solves are dropped past it: HTTP 504)."""

    max_rows: int
    max_n: int
    max_nfe: int = 512
    max_cost: int = 16384
    max_body: int = 16 * 1024**2
    time_budget_s: float = 60.0


# JSON nesting a request body may have: {"conditions": {"name": "..."}} and {"grid": [...]} are depth 2.
MAX_DEPTH = 4
# Seeds as ``anchorflow sample --seed`` takes them.
MAX_SEED = 2**32 - 1


# The most SideNet offsets per state row in one call, from the solver registry (BA's merged probe: 4).
SIDENET_PROBES = max_sidenet_offsets()


def rows_limit(cap: int, guided: bool, sidenet: bool, backbone_max: Optional[int], sidenet_max: Optional[int]) -> int:
    """State rows one solve may hold so every network call stays inside the bundle's batch range."""
    g = 2 if guided else 1
    limits = [cap]
    if backbone_max:
        limits.append(backbone_max // g)
    if sidenet and sidenet_max:
        limits.append(sidenet_max // (g * SIDENET_PROBES))
    return max(1, min(limits))


@dataclass(frozen=True)
class SampleRequest:
    """One validated request: its HTTP fields and the :class:`~anchorflow.runtime.plan.SamplePlan`
    they mean on this model (set by :meth:`SamplerService.parse`). ``key`` groups requests that may
    share one solve."""

    solver: str
    nfe: int
    n: int
    labels: Optional[tuple[int, ...]]
    cfg: float
    cfg_interval: tuple[float, float]
    seed: int
    grid: Any  # None, "uniform", "shift:S" or a tuple of times
    format: str
    arrived: float = field(default=0.0, compare=False)
    # named conditions: sorted ((name, array), ...) with n or 1 rows each, and their null values
    conditions: Optional[tuple] = field(default=None, compare=False)
    null_conditions: Optional[tuple] = field(default=None, compare=False)
    first_call: str = "backbone"
    plan: Any = field(default=None, compare=False, repr=False)
    prompt: Any = field(default=None, compare=False)  # the request's "prompt" (pipeline bundles), else None
    quality: Optional[str] = field(default=None, compare=False)  # the preset's name (its fields set the above)

    @property
    def key(self) -> tuple:
        """The plan's key (every field that changes the numbers, derived from the plan's fields) and
        the layout of its per-row conditions (names, trailing shapes, dtypes: rows must concatenate)."""
        if self.plan is None:
            raise ValueError("a SampleRequest has a key once SamplerService.parse has planned it")
        layout = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.plan.rows.items()))
        return (self.plan.key, layout)


def _fail(msg: str) -> RequestError:
    return RequestError(msg)


def _show(v: Any) -> str:
    """A JSON value for a message, cut to 60 characters (a 4000-digit integer stays readable)."""
    text = json.dumps(v)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _int(body: dict, name: str, lo: int, hi: Optional[int] = None) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{name!r} must be an integer, got {_show(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise _fail(f"{name!r} must be {rng}, got {_show(v)}")
    return v


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 1e300 or not math.isfinite(v):
        raise _fail(f"{name!r} must be a finite number, got {_show(v)}")
    return float(v)


def _depth(v: Any, limit: int, level: int = 1) -> None:
    """RequestError when ``v`` nests deeper than ``limit`` (iterative over siblings, recursion <= limit)."""
    if level > limit:
        raise _fail(f"the body nests deeper than {limit} levels; a request is a flat JSON object (see GET /v1/model)")
    for child in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()):
        if isinstance(child, (dict, list)):
            _depth(child, limit, level + 1)


def check_body_size(size: int, limit: int) -> None:
    """BodyTooLarge (HTTP 413) when a body of ``size`` bytes is over ``limit``."""
    if size > limit:
        raise BodyTooLarge(f"the request body is {size} bytes or more, over this service's limit of {limit} bytes "
                           f"({limit / 1024**2:.3g} MiB, 'anchorflow serve --max-body-mb'); send fewer or smaller "
                           "conditions per request")


def decode_body(raw: bytes, max_body: Optional[int] = None) -> dict:
    """The JSON object of a request body (RequestError for anything else, BodyTooLarge over ``max_body``),
    with :data:`DEFAULTS` for the fields it leaves out or sets to null (``grid``: null is kept)."""
    body = _json_object(raw, max_body)
    return {**DEFAULTS, **{k: v for k, v in body.items() if v is not None or k == "grid"}}


def _json_object(raw: bytes, max_body: Optional[int]) -> dict:
    """The body's JSON object as sent (its known fields only, nothing filled in)."""
    if max_body is not None:
        check_body_size(len(raw), max_body)
    try:
        body = json.loads(raw.decode("utf-8") if raw else "{}")
    except RecursionError:
        raise _fail(f"the body nests deeper than {MAX_DEPTH} levels; a request is a flat JSON object") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise _fail(f"the body is not valid JSON ({str(exc)[:120]}); send a JSON object such as "
                    '{"solver": "ba", "nfe": 6, "n": 4}') from None
    if not isinstance(body, dict):
        raise _fail(f"the body must be a JSON object, got {type(body).__name__}")
    _depth(body, MAX_DEPTH)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _fail(f"unknown field(s) {', '.join(_show(k) for k in unknown[:5])}; known: {', '.join(FIELDS)}")
    return body


def _quality(sent: dict, tuning: Any, default: Optional[str]):
    """The preset a request asks for (its "quality", else the service's ``default`` when it names none of
    :data:`CONFIG_FIELDS`), or None; RequestError for a bad or unknown one, or one given with those fields."""
    quality = sent.get("quality")
    given = [k for k in CONFIG_FIELDS if sent.get(k) is not None]
    if quality is None:
        if given or default is None:
            return None
        quality = default
    elif given:
        raise _fail(f"'quality' chooses the solver, nfe, grid and first call; drop {', '.join(map(repr, given))} "
                    f"or 'quality'")
    if isinstance(quality, bool) or not isinstance(quality, (str, int, float)) or not str(quality).strip() \
            or len(str(quality)) > 64:
        raise _fail(f"'quality' must be a preset name (1-64 characters) or a number of dB, got {_show(quality)}")
    from ..runtime.bundles.presets import resolve_quality

    try:
        return resolve_quality(tuning, quality)
    except ConfigError as exc:  # its words are the CLI's; over HTTP the field is 'quality'
        raise _fail(str(exc).replace("--quality", "'quality'")) from None


def parse_request(raw: bytes, meta: dict, limits: Limits, has_sidenet: bool, arrived: float = 0.0,
                  model_conditions: Optional[tuple] = None, prompts: Any = None,
                  decodes: bool = False, tuning: Any = None, quality: Optional[str] = None) -> SampleRequest:
    """Validate a request body against the model (``meta``: state_shape, num_classes, data_range) and
    the limits, alone: nothing of it reaches a solve shared with other requests unless it passed.

    ``model_conditions``: (declared conditions, axis_range(name) -> (min, opt, max) or None, the
    bundle's null values) of a bundle whose backbone declares conditions; None: labels only.
    ``prompts``: a pipeline bundle's :class:`~.prompts.PromptConditions` ("prompt" requests), else None;
    ``decodes``: the service decodes latents through the bundle's VAE ("format": "png" on latents).
    ``tuning``: the bundle's :class:`~anchorflow.runtime.bundles.tuned_grids.Tuning` (its presets answer
    "quality"); ``quality``: the service's default preset name (``anchorflow serve --quality``), or None.
    """
    from ..runtime import get_solver, make_grid, solver_names

    sent = _json_object(raw, limits.max_body)
    body = {**DEFAULTS, **{k: v for k, v in sent.items() if v is not None or k == "grid"}}
    preset = _quality(sent, tuning, quality)
    if preset is not None:  # the preset's configuration, checked below like a request's own
        body.update(solver=preset.solver, nfe=preset.nfe, grid=list(preset.times), first_call=preset.first_call)
    solver = body["solver"]
    if not isinstance(solver, str) or solver not in solver_names():
        raise _fail(f"unknown solver {_show(solver)}; choose from {', '.join(solver_names())}")
    spec = get_solver(solver)
    if spec.needs_sidenet and not has_sidenet:
        raise _fail(f"solver {solver!r} needs a SideNet and this model has none; pick another solver")
    nfe = _int(body, "nfe", 1, limits.max_nfe)
    n = _int(body, "n", 1, limits.max_n)
    if n * nfe > limits.max_cost:
        raise _fail(f"n x nfe = {n} x {nfe} = {n * nfe} backbone row-calls is over this service's per-request "
                    f"limit of {limits.max_cost}; send several smaller requests")
    seed = _int(body, "seed", 0, MAX_SEED)
    cfg = _number(body["cfg"], "cfg")  # JSON-level: a number Python can hold; then the CLI's own rule
    try:
        from ..runtime.plan import check_cfg_scale

        cfg = check_cfg_scale(cfg, HTTP_NAMES["cfg_scale"])  # before the conditions: their null rows depend on it
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    interval = body["cfg_interval"]
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise _fail(f"'cfg_interval' must be two numbers [lo, hi], got {_show(interval)}")
    lo, hi = (_number(v, "cfg_interval") for v in interval)
    if not 0.0 <= lo < hi <= 1.0:
        raise _fail(f"'cfg_interval' must satisfy 0 <= lo < hi <= 1, got [{lo:g}, {hi:g}]")
    fmt = body["format"]
    if fmt not in FORMATS:
        raise _fail(f"unknown format {_show(fmt)}; choose from {', '.join(FORMATS)}")
    if fmt == "png" and image_range(meta) is None and not decodes:
        raise _fail("this model's state is not an image (bundle.json data_range is null: latents) and the service "
                    "has no decoder for it, so it cannot answer 'format': 'png'; ask for 'npy' or 'json'")
    num_classes = int(meta.get("num_classes", 0) or 0)
    decls = model_conditions[0] if model_conditions else ()
    conds = nulls = None
    prompted = body["prompt"] is not None or body["negative_prompt"] is not None
    if prompted:  # --- prompts (pipeline bundles) ---
        if prompts is None:
            raise _fail("this model has no text encoders (a transformer bundle), so it takes no 'prompt'; send "
                        "'conditions' as base64 .npy, or serve a pipeline bundle ('anchorflow export PIPELINE_FOLDER')")
        if body["prompt"] is None:
            raise _fail("'negative_prompt' needs 'prompt'")
        if body["conditions"] is not None or body["null_conditions"] is not None:
            raise _fail("give either 'prompt' or 'conditions', not both")
        if body["labels"] is not None:
            raise _fail("this model takes no class labels; drop 'labels' (its conditions come from 'prompt')")
        conds, nulls, cfg = prompts(body["prompt"], body["negative_prompt"], n, cfg)
    elif body["conditions"] is not None or body["null_conditions"] is not None:  # --- end prompts ---
        from .conditions import parse_conditions

        if not decls:
            raise _fail("this model declares no named conditions; drop 'conditions'")
        conds, nulls = parse_conditions(body, n, *model_conditions, guided=cfg != 1.0)
    else:
        _require_conditions(decls, model_conditions[2] if model_conditions else {}, num_classes)
    labels = _labels(body["labels"], num_classes, decls)
    first_call = body["first_call"]
    if first_call not in ("backbone", "cached"):
        raise _fail(f"'first_call' must be 'backbone' or 'cached', got {_show(first_call)}")
    grid = body["grid"]
    if isinstance(grid, list):
        grid = tuple(_number(v, "grid") for v in grid)
    elif grid is not None and not isinstance(grid, str):
        raise _fail(f"'grid' must be null, 'uniform', 'shift:S' or a list of times, got {_show(grid)}")
    try:
        make_grid(spec.steps_for_nfe(nfe, 1 if first_call == "cached" else 0), grid)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return SampleRequest(solver, nfe, n, labels, cfg, (lo, hi), seed, grid, fmt, arrived, conds, nulls, first_call,
                         prompt=body["prompt"] if prompted else None, quality=None if preset is None else preset.name)


def image_range(meta: dict) -> Optional[tuple[float, float]]:
    """(lo, hi) of an image state, or None: bundle.json's ``data_range`` null means latents."""
    rng = meta.get("data_range")
    return None if rng is None else (float(rng[0]), float(rng[1]))


def _require_conditions(decls, null_values: dict, num_classes: int) -> None:
    """A request without 'conditions' on a model that needs some (e.g. text embeddings): 400 saying which."""
    lacking = [d for d in decls if d.name not in null_values and not (d.name == "y" and num_classes)]
    if lacking:
        want = "; ".join(d.describe() for d in lacking)
        raise _fail(f"this model needs the condition(s) {want}: send them in 'conditions' as base64 .npy "
                    "(GET /v1/model lists them)")


def _labels(value: Any, num_classes: int, decls=()) -> Optional[tuple]:
    """The JSON shape of 'labels' (a non-empty list); their type and range are runtime.plan's."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _fail(f"'labels' must be a non-empty list of integers (cycled over the n samples), got {_show(value)}")
    if not num_classes:
        raise _fail("this model takes no class labels; drop 'labels'" +
                    (" (its conditions go in 'conditions')" if decls else ""))
    return tuple(value)
