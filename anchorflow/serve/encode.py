"""Encoding a served result: ``.npy`` bytes, a PNG grid (as ``anchorflow sample --out``) or JSON.

Every sample response carries headers with the backbone calls, SideNet calls and time (Ray-free).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class Reply:
    """One request's outcome. ``x`` (n, ...) float32 samples (t = 0); calls are per sample trajectory."""

    x: Optional[np.ndarray] = None
    nfe: int = 0
    sidenet_calls: int = 0
    solve_s: float = 0.0
    wait_s: float = 0.0
    solves: int = 0
    batch_requests: int = 0
    batch_rows: int = 0
    bandit_state: Optional[str] = None
    status: int = 200
    error: Optional[str] = None
    images: Optional[np.ndarray] = None  # (n, H, W, 3) uint8: x decoded by a pipeline bundle's VAE (format png)


@dataclass(frozen=True)
class HttpReply:
    """What the HTTP layer sends: status, body bytes, media type and extra headers."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict = field(default_factory=dict)


def json_reply(status: int, obj: object, headers: Optional[dict] = None) -> HttpReply:
    return HttpReply(status, json.dumps(obj).encode("utf-8"), "application/json", dict(headers or {}))


def error_reply(status: int, message: str, headers: Optional[dict] = None) -> HttpReply:
    """``{"error": message}`` with ``status`` (400 bad request, 503 overload, 500 server fault)."""
    return json_reply(status, {"error": message}, headers)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def png_bytes(x: np.ndarray, data_range: Sequence[float], nrow: int) -> bytes:
    """The PNG grid ``anchorflow sample --out`` writes for the same samples (same tiling, same bytes)."""
    from PIL import Image

    from ..plots import _as_nhwc, grid_array, to_uint8

    canvas = grid_array(_as_nhwc(to_uint8(x, data_range)), int(nrow))
    buf = io.BytesIO()
    Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(buf, format="PNG")
    return buf.getvalue()


def headers_of(reply: Reply, solver: str) -> dict:
    """Backbone calls, SideNet calls, solve time and how the request was batched."""
    h = {
        "X-Anchorflow-Solver": solver,
        "X-Anchorflow-Backbone-Calls": str(reply.nfe),
        "X-Anchorflow-SideNet-Calls": str(reply.sidenet_calls),
        "X-Anchorflow-Time-Ms": f"{reply.solve_s * 1e3:.2f}",
        "X-Anchorflow-Wait-Ms": f"{reply.wait_s * 1e3:.2f}",
        "X-Anchorflow-Solves": str(reply.solves),
        "X-Anchorflow-Batch-Requests": str(reply.batch_requests),
        "X-Anchorflow-Batch-Rows": str(reply.batch_rows),
        "X-Anchorflow-Shape": ",".join(str(s) for s in reply.x.shape),
    }
    if reply.bandit_state:
        h["X-Anchorflow-Bandit-State"] = reply.bandit_state
    return h


def encode(reply: Reply, solver: str, fmt: str, data_range: Sequence[float]) -> HttpReply:
    """The HTTP reply for a served request in ``fmt`` (npy | png | json)."""
    if reply.error is not None:
        return error_reply(reply.status, reply.error)
    headers = headers_of(reply, solver)
    x = reply.x
    if fmt == "png":
        pics = x if reply.images is None else reply.images.transpose(0, 3, 1, 2)  # decoded: uint8 NCHW
        return HttpReply(200, png_bytes(pics, data_range, nrow=min(len(x), 10)), "image/png", headers)
    if fmt == "json":
        body = {"shape": list(x.shape), "dtype": str(x.dtype), "byte_order": "little",
                "data": base64.b64encode(np.ascontiguousarray(x, x.dtype.newbyteorder("<")).tobytes()).decode("ascii"),
                "backbone_calls": reply.nfe, "sidenet_calls": reply.sidenet_calls,
                "time_ms": round(reply.solve_s * 1e3, 3), "batch_requests": reply.batch_requests}
        return json_reply(200, body, headers)
    return HttpReply(200, npy_bytes(x), "application/x-npy", headers)
