"""The pipeline: runs a request's stages on workers chosen by the role's policy.

For now the only flow is ``pd`` (one merged prefill+decode stage); the disaggregated flows add
stages here. Retries happen only before any byte reached the client and only for failures that
cannot have started work on the worker (connection refused, stale socket, 503 from the worker).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from ..config import GatewayConfig
from ..errors import GatewayError
from ..http.types import Responder
from ..metrics import Metrics
from ..routing.policy import Policy, RouteContext
from ..transport import openai_http
from ..transport.pool import ConnectionPool, UpstreamError
from ..workers.registry import Registry
from ..workers.worker import Worker
from .request import GatewayRequest

log = logging.getLogger("lmgw.pipeline")


class Pipeline:
    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        pool: ConnectionPool,
        policies: Mapping[str, Policy],
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        self.max_attempts = cfg.upstream.max_attempts
        self.response_timeout_s = cfg.upstream.response_timeout_s
        self.flows = {m.name: m.flow for m in cfg.models}

    def _pick(self, greq: GatewayRequest, role: str, ctx: RouteContext, exclude: set[Worker]) -> Worker:
        candidates = self.registry.candidates(greq.model, role)
        if exclude:
            candidates = tuple(w for w in candidates if w not in exclude)
        if not candidates:
            if exclude:
                raise GatewayError(502, f"every {role} worker tried for model {greq.model!r} failed")
            raise GatewayError(503, f"no healthy worker available for model {greq.model!r} (role {role})")
        return self.policies[role].choose(candidates, ctx)

    async def run(self, greq: GatewayRequest, responder: Responder) -> None:
        flow = self.flows.get(greq.model, "pd")
        if flow != "pd":
            raise GatewayError(501, f"flow {flow!r} of model {greq.model!r} is not implemented yet")
        await self._run_merged(greq, responder)

    async def _run_merged(self, greq: GatewayRequest, responder: Responder) -> None:
        role = "pd"
        ctx = RouteContext(greq.model, greq.request_id)
        policy = self.policies[role]
        tried: set[Worker] = set()
        rid = greq.request_id.encode()
        metrics = self.metrics
        for attempt in range(self.max_attempts):
            worker = self._pick(greq, role, ctx, tried)
            ok = False
            with self.registry.lease(worker):
                policy.on_dispatch(worker, ctx)
                metrics.worker_requests.inc((role, worker.id))
                try:
                    resp = await openai_http.send_stage(self.pool, worker, greq, self.response_timeout_s)
                    try:
                        if resp.status >= 400:
                            err = await openai_http.read_error(resp, worker)
                            if resp.status == 503 and attempt + 1 < self.max_attempts:
                                self.registry.record_failure(worker, err.message, eject=False)
                                tried.add(worker)
                                metrics.retries.inc((role,))
                                continue
                            if resp.status >= 500:
                                self.registry.record_failure(worker, err.message, eject=False)
                            raise err
                        if greq.stream and resp.content_type.startswith(b"text/event-stream"):
                            await openai_http.relay_sse(resp, responder, rid, lambda: self._first_byte(greq))
                        else:
                            await openai_http.relay_json(resp, responder, rid)
                        ok = True
                    finally:
                        resp.release()
                except UpstreamError as exc:
                    metrics.upstream_errors.inc((role, worker.id, "timeout" if exc.status == 504 else "transport"))
                    self.registry.record_failure(worker, exc.message, eject=exc.retryable)
                    if responder.started:
                        return  # the stream already carries the error event
                    if exc.retryable and attempt + 1 < self.max_attempts:
                        tried.add(worker)
                        metrics.retries.inc((role,))
                        log.info("request %s: retrying after %s", greq.request_id, exc.message)
                        continue
                    raise GatewayError(exc.status, exc.message) from None
                finally:
                    policy.on_finish(worker, ctx, ok)
            if ok:
                self.registry.record_success(worker)
            return

    def _first_byte(self, greq: GatewayRequest) -> None:
        self.metrics.ttft.observe((greq.model,), trio.current_time() - greq.t_start)
