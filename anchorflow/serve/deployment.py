"""The Ray Serve deployment: HTTP in, :class:`SamplerService` underneath, ``@serve.batch`` merging.

One replica holds one :class:`~anchorflow.serve.service.SamplerService` (numpy + onnxruntime,
no torch). Concurrent ``POST /v1/sample`` requests reaching a replica are gathered by
``serve.batch`` (up to ``max_batch_requests`` requests or ``batch_wait_s`` seconds) and handed
to the core, which merges compatible ones into single solves in a worker thread, so the replica
keeps accepting (and batching) requests while it solves. Small requests (see
:meth:`SamplerService.small`) have their own batch queue and worker thread: a large request in
progress cannot hold them back. A request whose client disconnects while it waits for its batch
is cancelled by Ray Serve and dropped from the batch before solving. Needs ``anchorflow[serve]``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .encode import HttpReply, encode, error_reply
from .request import RequestError, SampleRequest, check_body_size
from .service import open_replica

log = logging.getLogger("anchorflow.serve")
# Seconds a stopping replica waits for its requests in flight (SIGTERM drains; see app.stop).
DRAIN_S = 120.0


class SamplerDeployment:
    """Ray Serve ingress for one model. ``options``: see :func:`anchorflow.serve.app.build_app`."""

    def __init__(self, options: dict[str, Any]) -> None:
        # exactly what `anchorflow serve` opened once before starting Ray (app.check): a failure here was seen there
        self.core, self.data_range = open_replica(options["service"])
        self.pools = {lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"anchorflow-{lane}")
                      for lane in ("small", "large")}
        for method in (self.sample_small, self.sample_large):
            method.set_max_batch_size(int(options["max_batch_requests"]))
            method.set_batch_wait_timeout_s(float(options["batch_wait_s"]))

    async def _solve_in(self, lane: str, requests: list[SampleRequest]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pools[lane], self.core.sample_batch, requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def sample_small(self, requests: list[SampleRequest]) -> list:
        """A batch of small requests -> one Reply each, solved off the event loop in the small lane."""
        return await self._solve_in("small", requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def sample_large(self, requests: list[SampleRequest]) -> list:
        """A batch of the other requests -> one Reply each, in the large lane."""
        return await self._solve_in("large", requests)

    async def __call__(self, request: Request) -> Response:
        try:
            reply = self.core.route(request.method, request.url.path)
            if reply is None:
                reply = await self._sample(request)
        except Exception:  # noqa: BLE001 - a bug must still answer JSON, not a stack trace
            log.exception("request failed")
            reply = error_reply(500, "internal error in the service; its log has the details")
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)

    async def _read(self, request: Request) -> bytes:
        """The body, or BodyTooLarge (413) once it passes the limit: the rest is read and dropped (so the
        client, still sending, gets the answer instead of a reset connection), never held."""
        limit = self.core.limits.max_body
        declared = request.headers.get("content-length", "")
        chunks, size = [], 0
        too_large = declared.isdigit() and int(declared) > limit
        async for chunk in request.stream():
            size += len(chunk)
            too_large = too_large or size > limit
            if not too_large:
                chunks.append(chunk)
            else:
                chunks.clear()
        if too_large:
            check_body_size(max(size, int(declared) if declared.isdigit() else 0), limit)
        return b"".join(chunks)

    async def _sample(self, request: Request) -> HttpReply:
        retry = self.core.admit()
        if retry is not None:
            return error_reply(503, f"the service is at its queue limit ({self.core.max_queue} requests); "
                               f"retry after {retry} s", {"Retry-After": str(retry)})
        try:
            try:
                req = self.core.parse(await self._read(request))
            except RequestError as exc:
                return error_reply(exc.status, str(exc))
            lane = self.sample_small if self.core.small(req) else self.sample_large
            reply = await lane(req)
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
        graceful_shutdown_timeout_s=DRAIN_S,
        # a constructor that fails twice fails the deployment (Ray's default retries for minutes); the CLI
        # reports its error at once (app._deploy), having run the same constructor once itself (app.check)
        max_constructor_retry_count=2,
        graceful_shutdown_wait_loop_s=0.5,
    )
