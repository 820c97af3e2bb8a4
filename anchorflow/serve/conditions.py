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
import hashlib
import io
from typing import Any, Optional, Sequence

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
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise RequestError(f"condition {decl.name!r} holds NaN or infinite values")
    if value.dtype.kind == "u" and decl.dtype in ("int64", "int32") and value.size and value.max() > np.iinfo(decl.dtype).max:
        raise RequestError(f"condition {decl.name!r} holds values beyond {decl.dtype}")
    return value.astype(_NP.get(decl.dtype, value.dtype), copy=False)


def check_labels(name: str, value: np.ndarray, num_classes: int, null_label: Optional[int] = None) -> None:
    """Class labels sent as the condition ``y``: integers in [0, C) exactly (the null label too for a null
    row), so a negative label cannot wrap to another class and a large one cannot fail a shared solve."""
    allowed = f"0..{num_classes - 1}" + ("" if null_label is None else f" or the null label {null_label}")
    bad = (value < 0) | (value >= num_classes)
    if null_label is not None:
        bad &= value != null_label
    if bad.any():
        raise RequestError(f"condition {name!r} holds class labels, which must be in {allowed}; "
                           f"got {value[bad].ravel()[0]}")


def parse_conditions(body: dict, n: int, decls: Sequence, axis_range, null_values: dict, guided: bool,
                     num_classes: int = 0):
    """``(conditions, null_conditions)`` as sorted tuples of (name, array, per_row), or (None, None).

    Every array is checked here, before the request can share a solve: declared dtype (an integer
    condition takes integers only), shape, axis ranges and, for class labels ``y``, their range."""
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
                           else "this model takes no class labels; drop 'labels' (its conditions go in 'conditions')")
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
    if num_classes and "y" in cond and by_name["y"].dtype in ("int64", "int32"):
        check_labels("y", cond["y"][0], num_classes)
        if "y" in null:
            check_labels("null_conditions.y", null["y"][0], num_classes, null_values.get("y", num_classes))
    if guided:
        lacking = sorted(k for k in cond if k not in null and k not in null_values)
        if lacking:
            raise RequestError(f"guidance (cfg != 1) needs a null value for {', '.join(lacking)}: the bundle declares "
                               "none, so send it in 'null_conditions'")
    flat = lambda d: tuple((k, v, per_row) for k, (v, per_row) in sorted(d.items(), key=lambda kv: kv[0]))  # noqa: E731
    return flat(cond), (flat(null) or None)


def _digest(items: Sequence) -> str:
    h = hashlib.sha256()
    for k, v, _ in items:
        h.update(k.encode() + str(v.shape).encode() + str(v.dtype).encode() + np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def signature(conditions: Optional[tuple], nulls: Optional[tuple]) -> tuple:
    """What must agree for two requests to share a solve: names, per-row shapes and dtypes; the values
    of conditions without a row axis; the null values."""
    if conditions is None:
        return ()
    rows = tuple((k, v.shape[1:], str(v.dtype)) for k, v, per_row in conditions if per_row)
    shared = _digest([c for c in conditions if not c[2]])
    return rows + (shared, None if nulls is None else _digest(nulls))


def rows_of(conditions: tuple, n: int) -> dict:
    """Condition name -> (n, ...) rows (a one-row condition repeated); row-less conditions as given."""
    return {k: (np.broadcast_to(v, (n, *v.shape[1:])) if per_row and v.shape[0] == 1 and n != 1 else v)
            for k, v, per_row in conditions}
