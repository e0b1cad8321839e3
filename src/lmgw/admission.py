"""Admission control: how many requests the gateway runs at once, and who waits.

Two caps, both off (0) by default (``[limits]``):

* ``max_concurrent_requests``: requests running in the gateway's pipeline. Over it a request
  waits in a bounded queue (``queue_size``) for at most ``queue_timeout_s``; a full queue or a
  wait that times out is a 429 with ``Retry-After``. Without this, an overloaded fleet sees
  every request forwarded at once (ANCHORS.md complaint 17) and all of them get slower. The
  queue's order (``queue_policy``) is :mod:`lmgw.fairqueue`'s: by priority (the body's
  ``priority``, vLLM's semantics, with aging) and fair share between tenants (API keys) by
  default, or plain FIFO.
* ``max_in_flight_per_worker``: a worker with that many legs in flight is not a candidate;
  when every routable worker is at its cap the request gets a 503 with ``Retry-After``
  (:func:`with_capacity`, called from ``Pipeline.pick``).

The hot path pays for a counter: :meth:`Admission.enter` is a compare and an increment when a
slot is free and nobody waits (always, with the cap off), :meth:`Admission.leave` a decrement.
A request's priority, tenant and cost are only looked at when it has to wait. A slot freed
while requests wait passes straight to the waiter the queue's order picks (no thundering herd;
a newcomer never overtakes the queue: it queues too, and the order decides). Cancellation
anywhere (client gone, deadline) gives the slot or the queue place back: see
:meth:`Admission.wait`. When the queue is full, the fair order may evict a waiter (lower
priority, or a tenant holding more places) for the newcomer: the evicted one gets the 429.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .errors import GatewayError, error_body
from .fairqueue import EVICTED, GRANTED, WAITING, FairQueue, FifoQueue, Waiter

if TYPE_CHECKING:
    from .http.types import Request, Responder
    from .metrics import Metrics
    from .workers.worker import Worker

__all__ = [
    "REASONS",
    "Admission",
    "Rejected",
    "estimated_tokens",
    "priority_class",
    "with_capacity",
    "worker_capacity_error",
]

#: the ``reason`` label values of ``lmgw_admission_rejected_total``
REASONS = ("queue_full", "queue_timeout", "evicted", "worker_capacity")
#: the cost of a request in fair sharing (``limits.fair_share_cost = "tokens"``): its body's
#: bytes per token (as the key meter's estimate), and the output tokens assumed when it sets
#: no max_tokens (a client that sets none is charged as if it asked for this many)
BYTES_PER_TOKEN = 4
DEFAULT_OUTPUT_TOKENS = 256
#: Retry-After bounds in seconds: at least 1 (HTTP's unit), at most a minute (a client told to
#: come back later than that has in practice been told "go elsewhere")
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
#: weight of the newest request in the running mean of request durations (Retry-After estimate)
_EWMA_ALPHA = 0.1
_now = time.perf_counter


class Rejected(GatewayError):
    """A request turned away for capacity: a 429 or 503 that carries ``Retry-After``."""

    def __init__(self, status: int, message: str, retry_after: int, reason: str) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after
        self.reason = reason

    async def send(self, responder: Responder, request_id: str | None = None) -> None:
        """Answer with the OpenAI error body plus ``Retry-After``."""
        headers = [
            (b"content-type", b"application/json"),
            (b"retry-after", str(self.retry_after).encode()),
        ]
        if request_id:
            headers.append((b"x-request-id", request_id.encode()))
        await responder.send_full(
            self.status, headers, error_body(self.status, self.message, type=self.type)
        )


class Admission:
    """The gateway-wide concurrency cap and its wait queue (one per gateway).

    Use as::

        if not admission.enter():
            await admission.wait(req, view)  # queued; raises Rejected (429) or returns admitted
        try:
            ...                          # no checkpoint between admission and this try
        finally:
            admission.leave(t_start)
    """

    __slots__ = ("_by_cost", "_hold_s", "_kv_rate", "_limit", "_metrics", "_queue", "by_kv",
                 "cap", "in_flight", "policy", "queue_size", "queue_timeout_s", "tenant_header",
                 "waiting", "waiting_by_model")  # fmt: skip

    def __init__(
        self,
        cap: int = 0,
        queue_size: int = 0,
        queue_timeout_s: float = 60.0,
        metrics: Metrics | None = None,
        *,
        policy: str = "fair",
        aging_s: float = 10.0,
        cost: str = "tokens",
        tenant_header: str | None = None,
    ) -> None:
        #: 0 = unlimited
        self.cap = cap
        #: requests admitted and not yet finished (``lmgw_requests_in_flight``)
        self.in_flight = 0
        #: requests in the queue (what enter() compares: a plain int, whatever the order)
        self.waiting = 0
        #: requests waiting, by the model they name (None: none named): the planner's demand
        self.waiting_by_model: dict[str | None, int] = {}
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        #: "fair" (priority levels, fair share by tenant) or "fifo"
        self.policy = policy
        self._queue: FairQueue | FifoQueue = FairQueue(aging_s) if policy == "fair" else FifoQueue()
        self._by_cost = cost in ("tokens", "kv_seconds") and policy == "fair"
        #: fair_share_cost = "kv_seconds": a grant charges an estimate, :meth:`settle` the rest
        self.by_kv = cost == "kv_seconds" and policy == "fair"
        # KV token-seconds per estimated token of the requests settled lately (the estimate's
        # scale; a running mean from a start of one second per token)
        self._kv_rate = 1.0
        #: without API keys: the header that names a request's tenant (None: one tenant)
        self.tenant_header = tenant_header.lower().encode() if tenant_header else None
        # the comparison bound of enter(): with the cap off it is never reached, so the off
        # case costs the same compare as the on case and no extra branch
        self._limit = cap if cap > 0 else sys.maxsize
        self._hold_s = 0.0  # running mean of request durations, only kept with a cap
        self._metrics = metrics
        if metrics is not None:
            metrics.requests_in_flight.collect = self._in_flight_sample
            metrics.admission_queue_depth.collect = self._queue_sample
            metrics.admission_waiting.collect = self._waiting_sample

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self.waiting

    def _in_flight_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(self.in_flight))]

    def _queue_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(self.waiting))]

    def _waiting_sample(self) -> list[tuple[tuple[str, ...], float]]:
        counts: dict[tuple[str, str], int] = {}
        for w in self._queue:
            labels = (priority_class(w.priority), w.label)
            counts[labels] = counts.get(labels, 0) + 1
        return [(labels, float(n)) for labels, n in sorted(counts.items())]

    # -- the hot path -------------------------------------------------------------------------
    def enter(self) -> bool:
        """Take a slot if one is free and nobody waits for one; False: call :meth:`wait`."""
        n = self.in_flight
        if n < self._limit and not self.waiting:
            self.in_flight = n + 1
            return True
        return False

    def leave(self, t_start: float) -> None:
        """Give the slot back (``t_start``: when the request arrived, for Retry-After); the
        waiter the queue's order picks, if any, takes it over."""
        if self.cap:
            self._hold_s += (_now() - t_start - self._hold_s) * _EWMA_ALPHA
            if self.waiting:
                self._hand_over()  # the slot passes on: in_flight unchanged
                return
        self.in_flight -= 1

    # -- the queue ----------------------------------------------------------------------------
    def waiter(self, req: Request | None = None, view: Any = None) -> Waiter:
        """A request's terms in the queue: its priority (the body's ``priority``, else its
        key's default, else 0), its tenant (its API key; without keys the
        ``limits.tenant_header`` value, else one tenant for all), the key's weight, and its
        cost (estimated tokens, or 1 per request)."""
        priority = getattr(view, "priority", None)
        if priority is None:  # an in-process request's own (lmgw.http.local: batch lines)
            priority = getattr(req, "priority", None)
        key = getattr(req, "principal", None)
        tenant: Any = None
        weight, label = 1.0, "-"
        if key is not None:
            tenant, weight, label = key, key.weight, key.name
            if priority is None:
                priority = key.priority
        elif self.tenant_header is not None and req is not None:
            tenant = req.header(self.tenant_header)
        cost = basis = 1.0
        if self._by_cost and req is not None:
            cost = basis = float(estimated_tokens(len(req.body), view))
            if self.by_kv:
                cost = basis * self._kv_rate
        w = Waiter(priority or 0, tenant, cost, weight, label, trio.current_time())
        w.basis = basis
        model = getattr(view, "model", None)
        w.model = model if isinstance(model, str) else None
        return w

    def settle(self, w: Waiter, kv_token_seconds: float) -> None:
        """A request granted from the queue (``w``) ended having held ``kv_token_seconds`` in
        the engines' KV cache (``fair_share_cost = "kv_seconds"``): its tenant's counter is
        corrected from the estimate charged at the grant to that, and the estimate's scale
        learns from it."""
        if not self.by_kv or w.state != GRANTED:
            return
        self._queue.charge(w, kv_token_seconds - w.cost)
        if w.basis > 0:
            self._kv_rate += (kv_token_seconds / w.basis - self._kv_rate) * _EWMA_ALPHA
            self._kv_rate = max(self._kv_rate, 1e-6)

    async def wait(self, req: Request | None = None, view: Any = None) -> Waiter:
        """Wait in line for a slot (after :meth:`enter` said no). Returns holding a slot, with
        the waiter it was granted as (for :meth:`settle`).

        ``req`` and ``view`` (the decoded body) give the request's place in the order (see
        :meth:`waiter`); without them it is a priority-0 request of the one anonymous tenant.

        Raises:
            Rejected: 429 at once when the queue is full (and nobody yields a place), after
                ``queue_timeout_s``, or when a more entitled request takes its place.
        """
        w = self.waiter(req, view)
        if not self._enqueue(w):
            self._count(w, "queue_full", 0.0)
            raise self._reject(
                429,
                "queue_full",
                f"the gateway is at its limit of {self.cap} concurrent requests and its wait"
                f" queue ({self.queue_size}) is full; retry later",
            )
        try:
            with trio.move_on_after(self.queue_timeout_s):
                await w.event.wait()
        except BaseException:  # cancelled while queued: the client left or the deadline passed
            self.unpark(w, False)
            raise
        # a slot handed over in the same tick as the timeout still counts: take it
        if w.state == GRANTED:
            self.granted(w)
            return w
        if w.state == EVICTED:
            raise self.evicted(w)
        timed_out = self.unpark(w, True)  # (out of the queue: WAITING still)
        assert timed_out is not None
        raise timed_out

    def _enqueue(self, w: Waiter) -> bool:
        """Put ``w`` in the queue, evicting a less entitled waiter when it is full (the
        evicted one's event is set: state EVICTED); False when full and nobody yields."""
        if self.waiting >= self.queue_size:
            victim = self._queue.evict_for(w)
            if victim is None:
                return False
            self._left(victim)
            victim.event.set()  # it wakes up to its 429 (state EVICTED)
        self._queue.push(w)
        self.waiting += 1
        by_model = self.waiting_by_model
        by_model[w.model] = by_model.get(w.model, 0) + 1
        return True

    # -- the queue without a task (the compiled lane parks its requests) ----------------------
    def park(self, req: Request | None, view: Any, on_event: Callable[[], None]) -> Waiter | None:
        """:meth:`wait`'s place in the queue without waiting in a task: the waiter, whose
        grant or eviction calls ``on_event()`` (its ``state`` says which; then
        :meth:`granted` or :meth:`evicted`); None when the queue is full and nobody yields
        a place (nothing done: :meth:`wait` answers that 429). A parked request that ends
        otherwise (its deadline, its client gone) calls :meth:`unpark`."""
        w = self.waiter(req, view)
        w.event = _Signal(on_event)  # type: ignore[assignment]
        return w if self._enqueue(w) else None

    def granted(self, w: Waiter) -> float:
        """A waiter holds a slot now (``state`` GRANTED): accounted; returns how long it
        waited."""
        waited = self._count(w, "admitted")
        if self._metrics is not None:
            self._metrics.admission_wait.observe((priority_class(w.priority),), waited)
        return waited

    def evicted(self, w: Waiter) -> Rejected:
        """A waiter whose place went to another (``state`` EVICTED): its 429."""
        self._count(w, "evicted")
        return self._reject(
            429,
            "evicted",
            f"the gateway is at its limit of {self.cap} concurrent requests and its wait"
            f" queue ({self.queue_size}) is full: this request yielded its place to one"
            " of higher priority or of a tenant with fewer requests waiting; retry later",
        )

    def unpark(self, w: Waiter, timed_out: bool) -> Rejected | None:
        """A waiter's request ended before it ran (``timed_out``: after ``queue_timeout_s``,
        whose 429 this returns; else its deadline or its client): out of the queue, or the
        slot granted to it meanwhile passed on."""
        if w.state == GRANTED:
            self._pass_on()
        elif w.state == WAITING:
            self._queue.remove(w)
            self._left(w)
        if timed_out:
            return self._timed_out(w)
        self._count(w, "cancelled")
        return None

    def _timed_out(self, w: Waiter) -> Rejected:
        """The 429 of a waiter out of the queue after ``queue_timeout_s``."""
        self._count(w, "queue_timeout")
        return self._reject(
            429,
            "queue_timeout",
            f"the gateway is at its limit of {self.cap} concurrent requests and no slot"
            f" freed within {self.queue_timeout_s:g} s; retry later",
        )

    def _hand_over(self) -> None:
        w = self._queue.pop()
        self._left(w)
        w.state = GRANTED
        w.event.set()

    def _left(self, w: Waiter) -> None:
        """``w`` is out of the queue (granted, evicted, timed out or gone)."""
        self.waiting -= 1
        by_model = self.waiting_by_model
        left = by_model[w.model] - 1
        if left:
            by_model[w.model] = left
        else:
            del by_model[w.model]

    def _pass_on(self) -> None:
        if self.waiting:
            self._hand_over()
        else:
            self.in_flight -= 1

    def _count(self, w: Waiter, outcome: str, waited: float | None = None) -> float:
        """Per-tenant accounting of a request that found no free slot; returns its wait."""
        if waited is None:
            waited = trio.current_time() - w.arrival
        metrics = self._metrics
        if metrics is not None:
            metrics.admission_tenant_requests.inc((w.label, outcome))
            metrics.admission_tenant_wait.inc((w.label,), waited)
        return waited

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request: the mean request duration
        times the requests ahead (waiting, plus this one) per slot, within 1..60 s."""
        if not self.cap:
            return RETRY_AFTER_MIN_S
        estimate = self._hold_s * (self.waiting + 1) / self.cap
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(estimate)))

    def _reject(self, status: int, reason: str, message: str) -> Rejected:
        if self._metrics is not None:
            self._metrics.admission_rejected.inc((reason,))
        return Rejected(status, message, self.retry_after(), reason)


class _Signal:
    """A parked waiter's ``event``: its grant or eviction calls back instead of waking a
    task."""

    __slots__ = ("_on_set",)

    def __init__(self, on_set: Callable[[], None]) -> None:
        self._on_set = on_set

    def set(self) -> None:
        self._on_set()


def priority_class(priority: int) -> str:
    """The bounded label of a raw priority: ``high`` (< 0), ``normal`` (0), ``low`` (> 0)."""
    return "normal" if priority == 0 else "high" if priority < 0 else "low"


def estimated_tokens(body_bytes: int, view: Any) -> int:
    """A request's cost in fair sharing: its prompt (body bytes / 4) plus the output it may
    ask for (``max_tokens``, ``max_completion_tokens`` or SGLang's ``max_new_tokens``; 256 when
    unset) times its choices ``n``."""
    out = getattr(view, "max_completion_tokens", None)
    if out is None:
        out = getattr(view, "max_tokens", None)
    if out is None:
        params = getattr(view, "sampling_params", None)
        if params is not None:
            total = 0
            for p in params if isinstance(params, list) else (params,):
                m = p.max_new_tokens
                total += (DEFAULT_OUTPUT_TOKENS if m is None else m) * (p.n or 1)
            return body_bytes // BYTES_PER_TOKEN + total
        out = DEFAULT_OUTPUT_TOKENS
    return body_bytes // BYTES_PER_TOKEN + out * (getattr(view, "n", None) or 1)


def with_capacity(candidates: Sequence[Worker], cap: int) -> Sequence[Worker]:
    """The candidates with fewer than ``cap`` requests in flight: ``candidates`` itself (no
    copy) when every one has room, the common case."""
    for w in candidates:
        if w.in_flight >= cap:
            return tuple(w for w in candidates if w.in_flight < cap)
    return candidates


def worker_capacity_error(model: str, role_name: str, cap: int, metrics: Metrics) -> Rejected:
    """The 503 for "every routable worker is at ``limits.max_in_flight_per_worker``" (counted
    in ``lmgw_admission_rejected_total{reason="worker_capacity"}``)."""
    metrics.admission_rejected.inc(("worker_capacity",))
    return Rejected(
        503,
        f"every {role_name} worker for model {model!r} is at its limit of {cap} requests in"
        " flight; retry later",
        RETRY_AFTER_MIN_S,
        "worker_capacity",
    )
