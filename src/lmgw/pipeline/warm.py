"""Background prefills that give a hot prefix another holder (``routing.cache_aware_replicas``;
ANCHORS.md §5.8, proactive hot-prefix replication).

Why: a prefix cached on one worker sends every request that shares it to that worker's queue;
cache-aware routers then either queue behind it or spill a request to a cold worker, which pays
the whole prefill (the affinity/load dilemma of complaints 1-3). When ``cache_aware`` finds a
hot prefix with fewer holders than wanted, it names the least busy other worker
(:meth:`lmgw.routing.policy.Policy.warm_target`), and this module prefills the prompt there
off the client's path: a copy of the request asking for one token, answer dropped. The
policy accounts it as any dispatch (the worker is predicted to hold the prefix at once, and
its queued prefill counts in its wait), so the following requests choose between two holders
by their queues.

Copies run in the warmer's nursery (owned by the gateway), at most ``max_in_flight`` at once
(beyond: skipped and counted), never retried, under the request id of the request that
triggered them plus ``-warm``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..background import Background
from ..errors import DECODE_ERRORS
from ..metrics import Counter, Metrics
from ..mirrors import DiscardResponder
from ..routing.policy import RouteContext
from ..workers.worker import Worker
from .request import GatewayRequest

if TYPE_CHECKING:
    from .runner import Pipeline

_log = logging.getLogger("lmgw.pipeline")
_now = time.perf_counter

#: warm-up prefills in flight at once
MAX_IN_FLIGHT = 4
#: body fields that ask for more than the prompt's prefill (dropped from a warm-up copy)
_DROPPED = ("max_completion_tokens", "stream_options", "n", "best_of", "logprobs",
            "top_logprobs", "prompt_logprobs", "use_beam_search", "min_tokens")  # fmt: skip


def prefill_only(body: bytes) -> bytes | None:
    """The request's body asking for its prefill and one token only (the prompt, tools and
    template settings unchanged, so the worker caches the same blocks); None when it is not a
    JSON object. Sans-IO."""
    try:
        obj = msgspec.json.decode(body)
    except DECODE_ERRORS:
        return None
    if not isinstance(obj, dict):
        return None
    for key in _DROPPED:
        obj.pop(key, None)
    obj["max_tokens"] = 1
    obj["stream"] = False
    return msgspec.json.encode(obj)


def warmup_counter(metrics: Metrics) -> Counter:
    """``lmgw_prefix_warmups_total``, registered whether or not replication is on (every
    gateway exports the same names)."""
    counter = Counter(
        "lmgw_prefix_warmups_total",
        "Background prefills that gave a hot prefix another holder"
        " (routing.cache_aware_replicas), by outcome: ok, error, skipped (max in flight).",
        ("outcome",),
    )
    metrics.add(counter)
    return counter


class PrefixWarmer(Background):
    """Runs the warm-up prefills in the background (one per gateway)."""

    def __init__(self, warmups: Counter, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        super().__init__(max_in_flight)
        self.warmups = warmups  # lmgw_prefix_warmups_total (:func:`warmup_counter`)

    def submit(
        self, pipeline: Pipeline, greq: GatewayRequest, worker: Worker, ctx: RouteContext
    ) -> bool:
        """Prefill ``greq``'s prompt on ``worker`` in the background; never waits."""
        if not self.has_room():  # no copy to build
            self.warmups.inc(("skipped",))
            return False
        body = prefill_only(greq.body)
        if body is None:
            return False
        rid = greq.request_id + "-warm"
        headers = [
            (k, rid.encode()) if k == b"x-request-id" else (k, v) for k, v in greq.forward_headers
        ]
        copy = GatewayRequest(
            greq.endpoint, greq.path, greq.model, False, body, rid, headers, _now()
        )
        if self.start(self._one, pipeline, copy, worker, ctx.fork()):
            return True
        self.warmups.inc(("skipped",))
        return False

    async def _one(
        self, pipeline: Any, greq: GatewayRequest, worker: Worker, ctx: RouteContext
    ) -> None:
        sink = DiscardResponder()
        outcome = "error"
        try:
            await pipeline.dispatch(
                greq, sink, "pd", worker, ctx, False, greq.path, greq.forward_headers, greq.body
            )
            if 200 <= sink.status < 400:
                outcome = "ok"
        except Exception as exc:  # a warm-up's failure is counted, never the client's
            _log.debug("warm-up prefill on %s failed: %r", worker.id, exc)
        finally:
            self.warmups.inc((outcome,))
