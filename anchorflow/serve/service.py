"""The sampling service's core, free of Ray: a model, its limits, batched solves, routing.

:class:`SamplerService` opens an exported bundle (numpy + onnxruntime, never torch), validates
requests, runs a list of concurrent requests as few solves as fit (:mod:`.batching`), and
answers the GET endpoints. The Ray Serve deployment (:mod:`.deployment`) only adapts HTTP to it,
so another server (e.g. a Triton Python backend) could reuse it unchanged.
Time convention: t = 1 noise, t = 0 data; NFE counts backbone calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..base.errors import AnchorflowError, CheckpointError, ConfigError
from .batching import Piece, Solve, gather, plan, scatter
from .encode import HttpReply, Reply, error_reply, json_reply
from .request import (DEFAULTS, FIELDS, FORMATS, HTTP_NAMES, Limits, RequestError, SampleRequest, image_range, parse_request,
                      rows_limit)

DEFAULT_MAX_N = 1024
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_COST = 16384  # n x nfe of one request: 16384 row-calls take ~20 s on the digits model, 2 loaded cores
DEFAULT_MAX_BODY = 16 * 1024**2  # bytes of one request body (HTTP 413 above)
DEFAULT_TIME_BUDGET_S = 60.0  # a request's wall time from arrival; its remaining solves are dropped past it (504)
# Requests of at most max_cost / FAST_LANE_SHARE row-calls are "small": the deployment solves them in
# their own lane, so a large request in progress cannot hold a small one back for its whole duration.
FAST_LANE_SHARE = 16
log = logging.getLogger("anchorflow.serve")


class NonFinite(AnchorflowError):
    """A solve whose samples are not finite (answered 500: the model or its inputs diverged)."""


def _failure(exc: BaseException) -> tuple[int, str]:
    """(status, message) for a solve that failed: 400 for a user error, else 500 without internals."""
    if isinstance(exc, ConfigError):
        return 400, str(exc)
    if isinstance(exc, NonFinite):
        return 500, "the solve returned NaN or infinite samples; try a smaller cfg or another solver"
    log.error("a solve failed", exc_info=exc)
    return 500, "the solve failed inside the service; its log has the details"


def open_replica(service_kwargs: dict) -> tuple["SamplerService", Optional[tuple[float, float]]]:
    """What one replica holds: the sampler and its image range (None: latents, PNG refused at parse time).
    ``anchorflow serve`` calls this once before Ray starts, so a replica cannot fail where it did not."""
    core = SamplerService(**service_kwargs)
    return core, image_range(core.meta)


class SamplerService:
    """Serve one bundle.

    Args:
        model: a MODEL argument naming an exported bundle (``default`` = the bundled digits model).
        backend, precision, allow_fallback: as for ``anchorflow sample``.
        max_batch: most state rows per solve (default: what the bundle's batch range allows).
        max_n: most samples per request (larger non-FastFlow requests are split over solves).
        max_queue: most requests admitted at once; more get 503 (see :meth:`admit`).
        bandit_dir: folder of FastFlow bandit state files (one per model, grid and guidance).
        mu_factor: FastFlow's mu factor for new bandit states (as ``anchorflow sample --mu-factor``).
        threads: onnxruntime intra-op threads (None: one per physical core).
        quality: the default of requests that name no solver, nfe, grid, first call or quality: a preset
            recorded by ``anchorflow tune --target-psnr`` (its name, or a number of dB: the fastest preset
            whose bound meets it), resolved once here (:attr:`preset`); None: ``ba`` at NFE 7.
    """

    def __init__(self, model: str = "default", *, backend: str = "auto", precision: str = "fp32",
                 allow_fallback: bool = False, max_batch: Optional[int] = None, max_n: int = DEFAULT_MAX_N,
                 max_queue: int = DEFAULT_MAX_QUEUE, bandit_dir: Optional[str] = None,
                 mu_factor: Optional[float] = None, threads: Optional[int] = None,
                 max_cost: int = DEFAULT_MAX_COST, max_body: int = DEFAULT_MAX_BODY,
                 time_budget_s: float = DEFAULT_TIME_BUDGET_S, quality: Optional[str] = None) -> None:
        from ..runtime.bundles.load import open_bundle, read_bundle
        from ..runtime.bundles.models import locate

        files = locate(model)
        if files.bundle is None or backend == "torch":
            raise CheckpointError(f"{model}: the service runs exported bundles only (torch-free); "
                                  f"export one with 'anchorflow export {model} --out BUNDLE' and serve that")
        for name, value in (("max_n", max_n), ("max_queue", max_queue), ("max_batch", max_batch or 1),
                            ("max_cost", max_cost), ("max_body", max_body)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(time_budget_s, (int, float)) and math.isfinite(time_budget_s) and time_budget_s > 0):
            raise ConfigError(f"time_budget_s must be a finite number > 0, got {time_budget_s!r}")
        self.model = open_bundle(files, backend=backend, allow_fallback=allow_fallback, precision=precision,
                                 threads=threads)
        self.meta = self.model.meta
        fmt = read_bundle(files.bundle)
        from ..runtime.bundles.tuned_grids import read_tuning

        self.tuning = read_tuning(fmt)  # tuned grids: a request without "grid" gets what `sample` would use
        self.preset = None  # the service's default quality preset (anchorflow serve --quality)
        if quality is not None:
            from ..runtime.bundles.presets import resolve_quality

            self.preset = resolve_quality(self.tuning, quality)
        self.batch_max = {k: (fmt.networks[k].batch[2] if k in fmt.networks and fmt.networks[k].batch else None)
                          for k in ("backbone", "sidenet")}
        decls = fmt.backbone.conditions
        self.null_cond = dict(fmt.guidance.null)
        self.model_conditions = (decls, fmt.backbone.axis_range, self.null_cond) if decls else None
        # --- pipeline bundles: "prompt" requests and "format": "png" decoded through the VAE ---
        self.prompts = self.decoder = None
        if "pipeline" in fmt.meta:
            from ..runtime.pipelines.pipeline import load_decoder
            from .prompts import PromptConditions

            ort = backend if backend in ("auto", "ort-cpu", "ort-cuda", "ort-trt") else "auto"
            self.prompts = PromptConditions(files.bundle, decls, ort, threads)
            self.decoder = load_decoder(files.bundle, ort, threads)
        # --- end pipeline bundles ---
        cap = max_batch or self.batch_max["backbone"] or 128
        self.limits = Limits(max_rows=cap, max_n=max_n, max_cost=max_cost, max_body=max_body,
                             time_budget_s=float(time_budget_s))
        self.max_queue = max_queue
        self.bandit_dir = Path(bandit_dir or Path.home() / ".cache" / "anchorflow" / "serve" / "bandits")
        self.mu_factor = mu_factor
        self.stats = {"requests": 0, "solves": 0, "batches": 0, "rows": 0, "merged_requests": 0,
                      "bad_requests": 0, "rejected": 0, "failed": 0}
        self._pending = 0
        self._solving = 0  # requests inside sample_batch now
        self._lock = threading.Lock()
        self._solve_s = 0.05  # running mean of one solve's wall time, for Retry-After

    # -- limits and validation -------------------------------------------------------------------
    def rows_for(self, req: SampleRequest) -> int:
        from ..runtime import get_solver

        return rows_limit(self.limits.max_rows, req.cfg != 1.0, get_solver(req.solver).needs_sidenet,
                          self.batch_max["backbone"], self.batch_max["sidenet"])

    def parse(self, raw: bytes) -> SampleRequest:
        """Validate a body alone (RequestError -> HTTP 400/413): its JSON here, its meaning by
        :func:`anchorflow.runtime.plan.plan` (the checks ``anchorflow sample`` runs), and the per-solve
        row limit for FastFlow. Nothing of a request reaches a shared solve unless it passed."""
        try:
            req = parse_request(raw, self.meta, self.limits, self.model.sidenet is not None, time.perf_counter(),
                                self.model_conditions, self.prompts, self.decoder is not None, self.tuning,
                                None if self.preset is None else self.preset.name)
            req = self._prompt_grid(req)
            req = dataclasses.replace(req, plan=self.plan_for(req))
            if req.solver == "fastflow" and req.n > self.rows_for(req):
                raise RequestError(
                    f"fastflow requests are solved as one batch (its skip decisions are per batch), so n must be "
                    f"<= {self.rows_for(req)} here, got {req.n}; send several requests instead")
        except RequestError:
            with self._lock:
                self.stats["bad_requests"] += 1
            raise
        return req

    def _prompt_grid(self, req: SampleRequest) -> SampleRequest:
        """A "prompt" request without "grid" gets ``anchorflow generate``'s grid: the bundle's tuned one for
        (solver, NFE) when it has one (the plan picks it), else the pipeline scheduler's sigmas."""
        if req.prompt is None or req.grid is not None or req.first_call != "backbone":
            return req
        from ..runtime import get_solver

        if self.tuning is not None and self.tuning.grid_for(req.solver, req.nfe, "backbone") is not None:
            return req
        return dataclasses.replace(req, grid=self.prompts.default_grid(get_solver(req.solver).steps_for_nfe(req.nfe, 0)))

    def plan_for(self, req: SampleRequest):
        """The request's :class:`~anchorflow.runtime.plan.SamplePlan` on this model (FastFlow: on the
        service's shared bandit state for its grid and guidance, with the service's mu factor)."""
        from ..runtime.plan import plan

        config = dict(quality=req.quality) if req.quality is not None else dict(  # a preset: plan(quality=) as the API
            solver=req.solver, nfe=req.nfe, grid=None if req.grid is None else
            (req.grid if isinstance(req.grid, str) else list(req.grid)), first_call=req.first_call)
        kw = dict(**config, cfg_scale=req.cfg, cfg_interval=req.cfg_interval, labels=None if req.labels is None else
                  list(req.labels), n=req.n, seed=req.seed, tuning=self.tuning, names=HTTP_NAMES)
        if req.conditions:
            kw["cond"] = {k: v for k, v, _ in req.conditions}
            kw["null_cond"] = {k: v for k, v, _ in req.null_conditions} if req.null_conditions else None
        if req.solver == "fastflow" and self.mu_factor is not None:
            kw["mu_factor"] = self.mu_factor
        try:
            p = plan(self.model, **kw)
        except ConfigError as exc:
            raise RequestError(str(exc)[:400]) from None
        if p.solver == "fastflow":
            p = dataclasses.replace(p, bandit_state=str(self.bandit_path(p)))
        return p

    # -- admission (bounded queue) ---------------------------------------------------------------
    def admit(self) -> Optional[int]:
        """Take a queue slot; None when admitted, else the Retry-After seconds for a 503."""
        with self._lock:
            if self._pending >= self.max_queue:
                self.stats["rejected"] += 1
                return max(1, math.ceil(self._solve_s * self._pending / max(1, self.limits.max_rows)))
            self._pending += 1
            return None

    def release(self) -> None:
        with self._lock:
            self._pending -= 1

    # -- sampling --------------------------------------------------------------------------------
    def small(self, req: SampleRequest) -> bool:
        """Whether ``req`` goes to the fast lane (at most max_cost / FAST_LANE_SHARE row-calls)."""
        return req.n * req.nfe <= max(1, self.limits.max_cost // FAST_LANE_SHARE)

    def sample_batch(self, requests: Sequence[SampleRequest]) -> list[Reply]:
        """Solve concurrent requests in as few solves as fit; one :class:`Reply` per request, in order.

        Every request was validated alone (:meth:`parse`) before it got here. Should a merged solve
        still fail, each of its requests is solved again alone, so only the one at fault fails; a
        request whose time budget ran out gets 504 and its remaining solves are dropped."""
        replies = [Reply(wait_s=time.perf_counter() - r.arrived if r.arrived else 0.0) for r in requests]
        noises: list = [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                if r.plan is None:
                    raise ConfigError("the request was not planned (SamplerService.parse)")
                noises[i] = r.plan.start_noise()
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                replies[i].status, replies[i].error = _failure(exc)
        parts: list[list[tuple[int, np.ndarray]]] = [[] for _ in requests]
        ok = [i for i, r in enumerate(replies) if r.error is None]
        solves = [Solve(s.key, [Piece(ok[p.index], p.start, p.stop) for p in s.pieces])
                  for s in plan([requests[i] for i in ok], self.rows_for)]
        with self._lock:
            self._solving += len(requests)
        try:
            for solve in solves:
                self._run_checked(solve, requests, noises, parts, replies)
        finally:
            with self._lock:
                self._solving -= len(requests)
        for reply, got, req in zip(replies, parts, requests):
            if reply.error is None:
                got = sorted(got, key=lambda p: p[0])
                reply.x = np.concatenate([x for _, x, _ in got], axis=0)
                if all(e is not None for _, _, e in got):  # the solver's per-sample estimate, this request's rows
                    reply.error_estimate = np.concatenate([e for _, _, e in got], axis=0)
                reply.quality = req.quality
                if req.format == "png" and self.decoder is not None:  # pipeline bundles: latents -> images
                    self._decode(reply)
        with self._lock:
            self.stats["requests"] += len(requests)
            self.stats["batches"] += 1
            self.stats["solves"] += len(solves)
            self.stats["merged_requests"] += sum(s.requests for s in solves if s.requests > 1)
            self.stats["failed"] += sum(r.error is not None for r in replies)
        return replies

    def _run_checked(self, solve: Solve, requests, inputs, parts, replies) -> None:
        """Run one planned solve: drop failed or late requests first, isolate a failure to its request."""
        now = time.perf_counter()
        for p in solve.pieces:
            r, req = replies[p.index], requests[p.index]
            if r.error is None and req.arrived and now - req.arrived > self.limits.time_budget_s:
                r.status, r.error = 504, (f"the request ran past this service's time budget of "
                                          f"{self.limits.time_budget_s:g} s ('anchorflow serve --time-budget-s'); "
                                          "send fewer samples or NFE per request")
        live = Solve(solve.key, [p for p in solve.pieces if replies[p.index].error is None])
        if not live.pieces:
            return
        try:
            self._run_one(live, requests, inputs, parts, replies)
        except Exception as exc:  # noqa: BLE001 - isolate, then answer each request on its own
            if live.requests > 1:
                for i in dict.fromkeys(p.index for p in live.pieces):
                    self._run_checked(Solve(live.key, [p for p in live.pieces if p.index == i]), requests, inputs,
                                      parts, replies)
                return
            for p in live.pieces:
                replies[p.index].status, replies[p.index].error = _failure(exc)

    def _run_one(self, solve: Solve, requests, noises, parts, replies) -> None:
        """One solve: the first piece's plan with the pieces' rows and noise concatenated (equal keys:
        the same numbers per row), run exactly as ``SamplePlan.run`` runs it."""
        first = requests[solve.pieces[0].index].plan
        rows = {k: np.concatenate([requests[p.index].plan.rows[k][p.start:p.stop] for p in solve.pieces], axis=0)
                for k in first.rows}
        noise = gather(solve, noises)
        merged = dataclasses.replace(first, rows=rows, n=int(noise.shape[0]), noise=None)
        pending = merged.begin(noise)
        res = pending.result
        if not np.isfinite(res.x).all():
            raise NonFinite("the solve returned NaN or infinite samples")
        pending.commit()
        state = None if first.bandit_state is None else Path(first.bandit_state).name
        scatter(solve, res.x, parts, res.error_estimate)
        with self._lock:
            self.stats["rows"] += solve.rows
            self._solve_s = 0.8 * self._solve_s + 0.2 * res.timing.total_s
        for i in {p.index for p in solve.pieces}:
            r = replies[i]
            r.nfe, r.sidenet_calls = max(r.nfe, res.nfe), max(r.sidenet_calls, res.sidenet_calls)
            r.solve_s += res.timing.total_s
            r.solves += 1
            r.batch_requests = max(r.batch_requests, solve.requests)
            r.batch_rows = max(r.batch_rows, solve.rows)
            r.bandit_state = state

    def _decode(self, reply: Reply) -> None:
        """The reply's latents through the bundle's VAE decoder (one call): ``reply.images`` uint8 (n, H, W, 3)."""
        try:
            pixels, images = self.decoder(reply.x)
            if not np.isfinite(pixels).all():
                raise NonFinite("the VAE decoded the samples to NaN or Inf")
            reply.images = images
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            reply.status, reply.error = _failure(exc)

    def grid_for(self, req: SampleRequest) -> np.ndarray:
        """The request's time grid (1 -> 0): its plan's, i.e. ``anchorflow sample``'s for the same
        arguments (the bundle's tuned grid where it has one and the request gives none)."""
        return np.asarray(req.plan.grid, np.float64)

    def bandit_path(self, p) -> Path:
        """The bandit state file shared by every FastFlow plan with this grid and guidance."""
        from ..runtime.fastflow.bandit import BanditKey
        from ..runtime.fastflow.learning import guided_model_id

        key = BanditKey.of(np.asarray(p.grid, np.float64), guided_model_id(self.meta["model_id"], p.cfg_scale,
                                                                          p.cfg_interval))
        digest = hashlib.sha256(f"{key.model_id}\n{key.grid_sha256}".encode()).hexdigest()[:16]
        return self.bandit_dir / f"fastflow-T{key.T}-{digest}.json"

    # -- GET endpoints ---------------------------------------------------------------------------
    def info(self) -> dict:
        """``GET /v1/model``: the model's metadata, the solvers and the limits."""
        from ..runtime import SOLVERS, get_solver

        get_solver("euler")  # registers the built-ins
        keep = ("name", "state_shape", "num_classes", "null_label", "data_range", "model_id")
        solvers = [{"name": s.name, "summary": s.summary, "needs_sidenet": s.needs_sidenet, "min_nfe": s.min_nfe,
                    "nfe_rule": s.nfe_rule, "available": self.model.sidenet is not None or not s.needs_sidenet}
                   for s in SOLVERS.values()]
        return {"model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.meta.items() if k in keep},
                "providers": list(self.model.providers), "solvers": solvers,
                "formats": [f for f in FORMATS if f != "png" or image_range(self.meta) is not None
                            or self.decoder is not None],
                "prompt": None if self.prompts is None else {"variant": self.prompts.variant,
                                                             "guidance": self.prompts.mode},
                "conditions": [{"name": d.name, "dtype": d.dtype, "shape": list(d.shape), "per_row": d.per_row,
                                "null": self.null_cond.get(d.name)} for d in (self.model_conditions or [()])[0]],
                "request": {**{k: DEFAULTS[k] for k in FIELDS},
                            "quality": None if self.preset is None else self.preset.name},
                "quality": self._presets(),
                "limits": {"max_n": self.limits.max_n, "max_nfe": self.limits.max_nfe, "max_queue": self.max_queue,
                           "max_rows_per_solve": self.limits.max_rows, "network_batch_max": self.batch_max},
                "torch_imported": "torch" in sys.modules}

    def _presets(self) -> list:
        """The bundle's recorded quality presets (what "quality" may name), fastest first."""
        presets = {} if self.tuning is None else dict(getattr(self.tuning, "presets", {}) or {})
        keep = ("name", "solver", "nfe", "first_call", "grid_label", "target_psnr", "reference", "confidence",
                "lower_bound", "latency_s", "batch", "backend")
        return [{k: getattr(p, k) for k in keep} for p in sorted(presets.values(), key=lambda p: (p.latency_s, p.name))]

    def stats_snapshot(self) -> dict:
        with self._lock:
            return {**self.stats, "pending": self._pending, "solving": self._solving}

    def get(self, path: str) -> HttpReply:
        """Answer ``GET /healthz``, ``/v1/model`` and ``/v1/stats``; 405 for ``/v1/sample``, 404 otherwise."""
        return self.route("GET", path)

    def route(self, method: str, path: str) -> Optional[HttpReply]:
        """The reply to any request but ``POST /v1/sample`` (None for that one: the caller samples).

        GET and HEAD on the GET endpoints (HEAD: the same status and headers, no body); 405 with an
        ``Allow`` header for a known path asked with another method; 404 for an unknown path."""
        path = path.rstrip("/") or "/"
        allowed = ENDPOINTS.get(path)
        if allowed is None:
            return error_reply(404, f"no such endpoint {method} {_short(path)}; try GET /healthz, /v1/model, "
                                    "/v1/stats or POST /v1/sample")
        if method not in allowed:
            return error_reply(405, f"{method} {path} is not allowed; use {' or '.join(allowed)} {path}",
                               {"Allow": ", ".join(allowed)})
        if path == "/v1/sample":
            return None
        reply = {"/healthz": lambda: json_reply(200, {"status": "ok"}),
                 "/v1/model": lambda: json_reply(200, self.info()),
                 "/v1/stats": lambda: json_reply(200, self.stats_snapshot())}[path]()
        return HttpReply(reply.status, b"", reply.media_type, {**reply.headers, "Content-Length": str(len(reply.body))}) \
            if method == "HEAD" else reply


ENDPOINTS = {"/healthz": ("GET", "HEAD"), "/v1/model": ("GET", "HEAD"), "/v1/stats": ("GET", "HEAD"),
             "/v1/sample": ("POST",)}


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
