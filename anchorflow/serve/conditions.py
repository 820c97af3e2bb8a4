"""Named conditions in a request: base64 ``.npy`` per name, checked against the bundle (Ray-free).

A request for a model with named conditions (bundle.json schema /2: e.g. a text embedding
``encoder_hidden_states`` (batch, L, D)) sends ``"conditions": {"name": "<base64 of .npy bytes>"}``
and, for guidance when the bundle declares no null value of a condition,
``"null_conditions": {...}`` alike. Each condition has n rows, or one row (broadcast to all n).
Class labels stay ``"labels"`` (the condition ``y``); giving both is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Sequence

import numpy as np

from .errors import RequestError

_KINDS = {"float32": "f", "float16": "f", "int64": "iu", "int32": "iu", "bool": "b"}
_NP = {"float32": np.float32, "float16": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def decode_npy(name: str, text: Any) -> np.ndarray:
    """One base64 .npy string -> array (no pickles)."""
    if not isinstance(text, str):
        raise RequestError(f"condition {name!r} must be a base64 string of .npy bytes, got {type(text).__name__}")
    try:
        return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as exc:
        raise RequestError(f"condition {name!r} is not base64 .npy data ({exc}); send "
                           "base64.b64encode(<bytes np.save wrote>)") from None


def check_condition(decl, value: np.ndarray, n: int, axis_range) -> np.ndarray:
    """Cast ``value`` to the declared dtype and check rows (n or 1) and trailing dims; RequestError otherwise."""
    kind = _KINDS.get(decl.dtype)
    if kind is not None and value.dtype.kind not in kind and not (kind == "f" and value.dtype.kind in "iu"):
        raise RequestError(f"condition {decl.name!r} must be {decl.dtype}, got {value.dtype}")
    shape = tuple(decl.shape)
    if value.ndim != len(shape):
        raise RequestError(f"condition {decl.name!r} must have shape ({', '.join(map(str, shape))}), got {value.shape}")
    if decl.per_row and value.shape[0] not in (1, n):
        raise RequestError(f"condition {decl.name!r} has {value.shape[0]} rows; give n = {n} rows or 1 (shared)")
    skip = 1 if decl.per_row else 0
    for dim, size in zip(shape[skip:], value.shape[skip:]):
        if isinstance(dim, int) and dim != size:
            raise RequestError(f"condition {decl.name!r} must have shape ({', '.join(map(str, shape))}), got {value.shape}")
        rng = axis_range(dim) if isinstance(dim, str) else None
        if rng is not None and not rng[0] <= size <= rng[2]:
            raise RequestError(f"condition {decl.name!r}: axis {dim} is {size}, the bundle takes {rng[0]}..{rng[2]}")
    if value.dtype.kind == "u" and decl.dtype in ("int64", "int32") and value.size and value.max() > np.iinfo(decl.dtype).max:
        raise RequestError(f"condition {decl.name!r} holds values beyond {decl.dtype}")
    return value.astype(_NP.get(decl.dtype, value.dtype), copy=False)


def parse_conditions(body: dict, n: int, decls: Sequence, axis_range, null_values: dict, guided: bool):
    """``(conditions, null_conditions)`` as sorted tuples of (name, array, per_row), or (None, None).

    The transport and layout are checked here (base64 .npy, declared dtype kind, shape, axis ranges);
    the values (label ranges, finiteness) by :func:`anchorflow.runtime.plan.plan`, as for the CLI."""
    given, nulls = body.get("conditions"), body.get("null_conditions")
    if given is None:
        if nulls is not None:
            raise RequestError("'null_conditions' needs 'conditions'")
        return None, None
    if not isinstance(given, dict) or not given:
        raise RequestError("'conditions' must be an object: condition name -> base64 .npy")
    by_name = {d.name: d for d in decls}
    if body.get("labels") is not None:
        raise RequestError("give class labels either as 'labels' or as the condition 'y', not both" if "y" in by_name
                           else "this model takes no class labels (a model with classes takes them either as 'labels' "
                                "or as the condition 'y'); drop 'labels', its conditions go in 'conditions'")
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        have = ", ".join(d.describe() for d in decls) or "none"
        raise RequestError(f"unknown condition(s) {', '.join(map(repr, unknown))}; this model takes: {have}")
    cond = {k: (check_condition(by_name[k], decode_npy(k, v), n, axis_range), by_name[k].per_row)
            for k, v in given.items()}
    null = {}
    if nulls is not None:
        if not isinstance(nulls, dict) or set(nulls) - set(cond):
            raise RequestError("'null_conditions' must be an object over names given in 'conditions'")
        null = {k: (check_condition(by_name[k], decode_npy(k, v), 1, axis_range), True) for k, v in nulls.items()}
    if guided:
        lacking = sorted(k for k in cond if k not in null and k not in null_values)
        if lacking:
            raise RequestError(f"guidance (cfg != 1) needs a null value for {', '.join(lacking)}: the bundle declares "
                               "none, so send it in 'null_conditions'")
    flat = lambda d: tuple((k, v, per_row) for k, (v, per_row) in sorted(d.items(), key=lambda kv: kv[0]))  # noqa: E731
    return flat(cond), (flat(null) or None)
