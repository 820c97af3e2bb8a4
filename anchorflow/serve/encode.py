"""Encoding a served result: ``.npy`` bytes, a PNG grid (as ``anchorflow sample --out``) or JSON.

Every sample response carries headers with the backbone calls, SideNet calls and time, the quality
preset that chose the configuration (if any) and the solver's per-sample error estimate (if it gives
one) (Ray-free).
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
    quality: Optional[str] = None  # the quality preset whose configuration was solved, if any
    error_estimate: Optional[np.ndarray] = None  # (n,) float64, state units: Result.error_estimate of these rows


# Longest X-Anchorflow-Error-Estimate value sent (~2700 samples at %.6g); a longer one is left out (the
# JSON format's "error_estimate" has every value): HTTP clients cap a header line (Python's at 64 KiB).
MAX_ESTIMATE_HEADER = 32 * 1024


def estimate_header(estimate: np.ndarray) -> Optional[str]:
    """The per-sample estimates, comma-separated, ``%.6g`` each; None when over MAX_ESTIMATE_HEADER."""
    text = ",".join(f"{float(v):.6g}" for v in np.asarray(estimate).reshape(-1))
    return text if len(text) <= MAX_ESTIMATE_HEADER else None


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
    """Backbone calls, SideNet calls, solve time, how the request was batched, its quality preset and
    the per-sample error estimate (the last two only when there is one)."""
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
    if reply.quality:
        h["X-Anchorflow-Quality"] = reply.quality
    if reply.error_estimate is not None:
        est = estimate_header(reply.error_estimate)
        if est is None:
            h["X-Anchorflow-Error-Estimate-Omitted"] = (f"{len(reply.error_estimate)} values, over "
                                                        f"{MAX_ESTIMATE_HEADER} bytes; 'format': 'json' has them")
        else:
            h["X-Anchorflow-Error-Estimate"] = est
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
                "time_ms": round(reply.solve_s * 1e3, 3), "batch_requests": reply.batch_requests,
                "quality": reply.quality, "error_estimate": None if reply.error_estimate is None
                else [float(v) for v in reply.error_estimate]}
        return json_reply(200, body, headers)
    return HttpReply(200, npy_bytes(x), "application/x-npy", headers)
