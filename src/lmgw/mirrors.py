"""Traffic mirroring: a copy of a share of a model route's requests also goes to another model,
whose answer is read and dropped (``model_routes[].mirror``).

Why: before a new model (or engine version, or LoRA adapter) takes any client's request, run it
under the real traffic's shape and rate and compare its latency and error rate with the serving
model's, per model, in the gateway's own histograms (``lmgw_ttft_seconds{model}``,
``lmgw_mirror_requests_total``); then canary it with the route's weights. Istio and LiteLLM
call this mirroring (shadow traffic).

The copies never cost the client anything: they are started after the request was routed,
run in the mirror service's nursery (owned by the gateway, cancelled when it stops), take no
admission slot of the client traffic, and are skipped, not queued, beyond ``max_in_flight``.
Each is bounded by ``timeout_s``; the worker sees its own request id (the client's plus
``-mirror``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from .background import Background
from .http.types import Headers
from .metrics import Counter, Histogram, Metrics

_log = logging.getLogger("lmgw.mirrors")
_now = time.perf_counter

#: copies in flight at once across routes, beyond which new ones are skipped
MAX_IN_FLIGHT = 64
#: no copy runs longer than this (its answer is dropped anyway; a stuck one would hold a slot)
TIMEOUT_S = 600.0


class DiscardResponder:
    """Reads an answer to its end and keeps only its status and size."""

    __slots__ = ("bytes", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.bytes = 0

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = True
        self.status = status
        self.bytes += len(body)

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status

    async def send(self, data: bytes) -> None:
        self.bytes += len(data)

    async def end(self, data: bytes = b"") -> None:
        self.bytes += len(data)


Run = Callable[[DiscardResponder], Awaitable[None]]


class Mirrors(Background):
    """The gateway's mirror copies: where they run, how many at once, what became of them."""

    def __init__(
        self, metrics: Metrics, max_in_flight: int = MAX_IN_FLIGHT, timeout_s: float = TIMEOUT_S
    ) -> None:
        super().__init__(max_in_flight)
        self.timeout_s = timeout_s
        self.requests = Counter(
            "lmgw_mirror_requests_total",
            "Copies of model-route requests sent to the route's mirror model, by outcome: ok"
            " (a 2xx answer read to its end), error (an error answer or a failure), timeout,"
            " skipped (max in flight reached, or the gateway stopping).",
            ("route", "model", "outcome"),
        )
        self.seconds = Histogram(
            "lmgw_mirror_request_seconds",
            "How long a mirror model took to answer a copy, to its last byte.",
            ("model",),
        )
        metrics.add(self.requests)
        metrics.add(self.seconds)

    def submit(self, route: str, model: str, run: Run) -> bool:
        """Start ``run(responder)`` (which sends the copy to ``model``) unless too many run or
        the service is not running; never waits. True when it was started."""
        if self.start(self._one, route, model, run):
            return True
        self.requests.inc((route, model, "skipped"))
        return False

    async def _one(self, route: str, model: str, run: Run) -> None:
        sink = DiscardResponder()
        t0 = _now()
        outcome = "error"
        try:
            with trio.move_on_after(self.timeout_s) as scope:
                await run(sink)
            if scope.cancelled_caught:
                outcome = "timeout"
            elif 200 <= sink.status < 400:
                outcome = "ok"
                self.seconds.observe((model,), _now() - t0)
        except Exception as exc:  # a copy's failure is counted, never the gateway's
            _log.debug("mirror copy to %s failed: %r", model, exc)
        finally:
            self.requests.inc((route, model, outcome))
