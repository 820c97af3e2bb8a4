"""A bundle's networks as the runtime's callables: one rule for conditions and null rows, any backend.

Every backend (onnxruntime, TensorRT, torch) supplies only ``run(feeds) -> output``, a function
of a dict input name -> array; :class:`BundleVelocity` and :class:`BundleSideNet` turn it into
``velocity(x, t, cond)`` / ``sidenet(x, v, t, h, cond)`` the same way for all of them:

- the feeds are exactly the inputs the network declares (bundle.json), so a SideNet that takes
  fewer conditions than the backbone is fed only its own;
- a declared condition missing from ``cond`` is filled with the bundle's null value for it
  (class labels: the null label) on every row, or refused, naming what the network expects;
- an input declared without a row axis (``per_row`` false) is fed row 0 of what it was given;
- dtypes are cast to the declared ones, ranks, static sizes and named axes checked (the range
  is in the message);
- no graph or engine ever sees more rows than it was exported for: a larger call runs in chunks
  of at most the exported maximum (rows are independent), fewer than the minimum is refused.

Time convention: t = 1 noise, t = 0 data (the graph applies the model's own time map).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ...base.errors import BackendError, ConfigError
from .format import NetworkDecl, TensorDecl

Run = Callable[[dict], np.ndarray]
_NP = {"float32": np.float32, "float16": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
NETWORK_ROLES = {"backbone": ("state", "time"), "sidenet": ("state", "velocity", "time", "offset")}
_OK_MAX = 256  # checked input signatures remembered per network (a solve uses a handful)


def expected(decl: NetworkDecl) -> str:
    """``y int64 (batch), ...``: the conditions a network declares, for error messages."""
    return ", ".join(c.describe() for c in decl.conditions) or "no conditions"


class BundleNet:
    """A declared network over a backend's ``run``. ``null``: condition name -> null value."""

    KIND = LABEL = "backbone"

    def __init__(self, decl: NetworkDecl, run: Run, null: Optional[dict] = None,
                 providers: Optional[list] = None) -> None:
        roles = sorted(i.role for i in decl.inputs if i.role != "condition")
        if roles != sorted(NETWORK_ROLES[self.KIND]):
            names = [i.name for i in decl.inputs]
            raise BackendError(f"this ONNX graph is not a {self.LABEL} (inputs {names}, roles {roles}; expected the roles "
                               f"{list(NETWORK_ROLES[self.KIND])} plus conditions); re-export the bundle")
        self.decl, self.run, self.null = decl, run, dict(null or {})
        self.providers = list(providers or [])
        self._ok: dict = {}  # (input, shape, dtype, rows) already checked -> the declared dtype
        # per input: its role (None: a condition), and the rank at which a shared input loses its row axis
        self._plan = [(i, None if i.role == "condition" else i.role, 0 if i.per_row else len(i.shape) + 1)
                      for i in decl.inputs]

    def _condition(self, inp: TensorDecl, cond: Optional[dict], rows: int) -> np.ndarray:
        if cond is not None and inp.name in cond:
            return np.asarray(cond[inp.name])
        if inp.name in self.null:
            value = np.asarray(self.null[inp.name])
            if not inp.per_row:
                return value
            body = value.shape[1:] if value.ndim == len(inp.shape) else value.shape  # with or without a row axis
            return np.broadcast_to(value, (rows, *body))
        raise ConfigError(f"the {self.decl.name} needs the condition {inp.name!r} and this bundle has no null value for "
                          f"it; it expects: {expected(self.decl)} (pass cond=... or --cond FILE)")

    def feeds(self, tensors: dict, cond: Optional[dict]) -> dict:
        """Inputs by role (``state``, ``time``...) and conditions -> the declared feed dict."""
        rows = int(tensors["state"].shape[0])
        self.decl.check_rows(rows)
        out = {}
        for inp, role, squeeze in self._plan:
            value = tensors[role] if role is not None else self._condition(inp, cond, rows)
            if squeeze and value.ndim == squeeze:
                value = value[0]
            out[inp.name] = self._checked(inp, value, rows)
        return out

    def _checked(self, inp: TensorDecl, value: np.ndarray, rows: int) -> np.ndarray:
        key = (inp.name, value.shape, value.dtype, rows)  # the check depends on nothing else
        dtype = self._ok.get(key)
        if dtype is None:
            dtype = self._check(inp, value, rows)
            if len(self._ok) >= _OK_MAX:
                self._ok.clear()
            self._ok[key] = dtype
        return np.ascontiguousarray(value, dtype)

    def _check(self, inp: TensorDecl, value: np.ndarray, rows: int) -> type:
        """The declared numpy dtype of ``inp``, after checking ``value``'s rank, sizes and axis ranges."""
        dtype = _NP.get(inp.dtype)
        if dtype is None:
            raise BackendError(f"the {self.decl.name} input {inp.name!r} is {inp.dtype}, which numpy cannot feed")
        bad = value.ndim != len(inp.shape)
        for size, want in zip(value.shape, inp.shape):
            if want == "batch":
                bad = bad or size != rows
            elif isinstance(want, int):
                bad = bad or size != want
            else:
                r = self.decl.axis_range(want)
                bad = bad or (r is not None and not r[0] <= size <= r[2])
        if bad:
            raise ConfigError(f"the {self.decl.name} input {inp.name!r} got shape {tuple(value.shape)}, expected "
                              f"{inp.describe()} (batch = {rows} rows{_ranges(self.decl, inp)}); it expects: "
                              f"{expected(self.decl)}")
        return dtype

    def _call(self, tensors: dict, cond: Optional[dict], row_axis: Optional[dict] = None, out_axis: int = 0) -> np.ndarray:
        """Run on ``tensors`` (by role; rows on axis 0, or ``row_axis[role]``), in chunks of at most
        the exported rows; the output's row axis is ``out_axis``."""
        rows = int(tensors["state"].shape[0])
        top = self.decl.batch[2] if self.decl.batch is not None else rows
        if rows <= top:
            return np.asarray(self.run(self.feeds(tensors, cond)))
        axes = row_axis or {}
        parts = []  # more rows than exported: chunks of at most `top` rows (rows are independent)
        for lo in range(0, rows, top):
            cut = slice(lo, lo + top)
            part = {k: v[(slice(None),) * axes.get(k, 0) + (cut,)] for k, v in tensors.items()}
            part_cond = None if cond is None else {
                k: (v[cut] if np.ndim(v) and np.shape(v)[0] == rows else v) for k, v in cond.items()}
            parts.append(np.asarray(self.run(self.feeds(part, part_cond))))
        return np.concatenate(parts, axis=out_axis)


class BundleVelocity(BundleNet):
    """``velocity(x, t, cond) -> v`` for a bundle's backbone."""

    KIND = "backbone"

    def __call__(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        return self._call({"state": x, "time": t}, cond)


class BundleSideNet(BundleNet):
    """``sidenet(x, v, t, h, cond) -> delta`` for a bundle's SideNet (v_hat(t - h) = v + delta).

    A shared-body SideNet (``h`` declared (offsets, batch): the polynomial offset forms) takes K
    offsets per row, h (K, B), and returns delta (K, B, ...): its body runs once on the B rows.
    """

    KIND, LABEL = "sidenet", "SideNet"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        h = next(i for i in self.decl.inputs if i.role == "offset")
        self.shared_body = len(h.shape) == 2 and h.shape[1] == "batch"

    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        tensors = {"state": x, "velocity": v, "time": t, "offset": h}
        if not self.shared_body:
            return self._call(tensors, cond)
        return self._call(tensors, cond, row_axis={"offset": 1}, out_axis=1)  # h (K, B), delta (K, B, ...)


WRAPPERS = {"backbone": BundleVelocity, "sidenet": BundleSideNet}


def check_conditions(decl: NetworkDecl, cond: dict, rows: int, null: Optional[dict] = None, what: str = "--cond") -> dict:
    """Check user conditions against a network's declaration before any work (CLI, services).

    Each value needs ``rows`` (or 1, shared) rows, the declared rank, static sizes and named-axis
    ranges; names must be declared; a declared condition may be missing only when ``null`` has a
    value for it. One-line ConfigError listing what the bundle expects otherwise. Returns ``cond``
    with dtypes cast to the declared ones.
    """
    declared = {c.name: c for c in decl.conditions}
    expects = f"the bundle expects: {expected(decl)}"
    extra = sorted(set(cond) - set(declared))
    missing = sorted(set(declared) - set(cond) - set(null or {}))
    if extra or missing:
        parts = ([f"unknown {', '.join(extra)}"] if extra else []) + ([f"missing {', '.join(missing)}"] if missing else [])
        raise ConfigError(f"{what}: {'; '.join(parts)}; {expects}")
    out = {}
    for name, value in cond.items():
        inp, value = declared[name], np.asarray(value)
        body = inp.shape[1:] if inp.per_row else inp.shape
        got = value.shape[1:] if inp.per_row and value.ndim == len(inp.shape) else None
        ok = got is not None and value.shape[0] in (rows, 1) and all(
            (d == g) if isinstance(d, int) else (decl.axis_range(d) is None or
                                                decl.axis_range(d)[0] <= g <= decl.axis_range(d)[2])
            for d, g in zip(body, got))
        if not ok:
            raise ConfigError(f"{what}: {name} has shape {tuple(value.shape)}, expected {inp.describe()} with "
                              f"batch = {rows} (or 1){_ranges(decl, inp)}; {expects}")
        if inp.dtype in ("int64", "int32") and name in (null or {}):
            check_labels(name, value, null[name], what)  # labels in range, exactly
        out[name] = value.astype(_NP.get(inp.dtype, value.dtype), copy=False)
    return out


def check_labels(name: str, value: np.ndarray, null_value, what: str = "--cond") -> None:
    """Integer labels of a condition whose null value is the label C (classes 0..C-1): integers (a
    float label is refused, not truncated) in 0..C-1, the null label C also allowed in null rows
    (``what`` --null-cond). A negative label must never wrap around to another class."""
    try:
        classes = int(null_value)
    except (TypeError, ValueError):
        return
    if value.dtype == np.bool_ or not (np.issubdtype(value.dtype, np.integer) or value.size == 0):
        raise ConfigError(f"{what}: {name} must hold integer labels, got {value.dtype}")
    top = classes if what == "--null-cond" else classes - 1
    if value.size and (int(value.min()) < 0 or int(value.max()) > top):
        bad = int(value.min()) if int(value.min()) < 0 else int(value.max())
        raise ConfigError(f"{what}: {name} holds the label {bad}; labels are integers in 0..{top}"
                          + (f" ({classes} is the null label)" if what == "--null-cond" else ""))


def _ranges(decl: NetworkDecl, inp: TensorDecl) -> str:
    rs = {a: decl.axis_range(a) for a in inp.shape if isinstance(a, str) and a != "batch"}
    return "".join(f", {a} in {r[0]}..{r[2]}" for a, r in rs.items() if r)
