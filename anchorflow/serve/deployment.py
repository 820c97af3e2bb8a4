"""The Ray Serve deployment: HTTP in, :class:`SamplerService` underneath, ``@serve.batch`` merging.

One replica holds one :class:`~anchorflow.serve.service.SamplerService` (numpy + onnxruntime,
no torch). Concurrent ``POST /v1/sample`` requests reaching a replica are gathered by
``serve.batch`` (up to ``max_batch_requests`` requests or ``batch_wait_s`` seconds) and handed
to the core, which merges compatible ones into single solves in a worker thread, so the replica
keeps accepting (and batching) requests while it solves. Needs ``anchorflow[serve]``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .encode import HttpReply, encode, error_reply
from .request import RequestError, SampleRequest
from .service import SamplerService


class SamplerDeployment:
    """Ray Serve ingress for one model. ``options``: see :func:`anchorflow.serve.app.build_app`."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.core = SamplerService(**options["service"])
        self.data_range = tuple(self.core.meta.get("data_range", (-1.0, 1.0)))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchorflow-solve")
        self.sample_many.set_max_batch_size(int(options["max_batch_requests"]))
        self.sample_many.set_batch_wait_timeout_s(float(options["batch_wait_s"]))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def sample_many(self, requests: list[SampleRequest]) -> list:
        """A batch of requests -> one Reply each, solved off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.core.sample_batch, requests)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            if request.method == "GET":
                reply = self.core.get(path)
            elif path == "/v1/sample" and request.method == "POST":
                reply = await self._sample(request)
            else:
                reply = error_reply(405 if path == "/v1/sample" else 404,
                                    f"{request.method} {path} is not served; use POST /v1/sample, "
                                    "GET /healthz, GET /v1/model or GET /v1/stats")
        except Exception as exc:  # noqa: BLE001 - a bug must still answer JSON, not a stack trace
            reply = error_reply(500, f"internal error ({type(exc).__name__}: {exc}); see the replica's log")
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)

    async def _sample(self, request: Request) -> HttpReply:
        retry = self.core.admit()
        if retry is not None:
            return error_reply(503, f"the service is at its queue limit ({self.core.max_queue} requests); "
                               f"retry after {retry} s", {"Retry-After": str(retry)})
        try:
            body = await request.body()
            try:
                req = self.core.parse(body)
            except RequestError as exc:
                return error_reply(400, str(exc))
            reply = await self.sample_many(req)
            return encode(reply, req.solver, req.format, self.data_range)
        finally:
            self.core.release()


def deployment(replicas: int, replica_cpus: float, max_queue: int):
    """The Ray Serve deployment with its replica count, CPUs and queue bounds."""
    return serve.deployment(SamplerDeployment, name="anchorflow-sampler").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # Let every admitted request reach the replica (it answers 503 with Retry-After past max_queue);
        # the callers' own queue is bounded too, answered by Ray with 503 + Retry-After.
        max_ongoing_requests=max_queue + 8,
        max_queued_requests=max_queue,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
    )
