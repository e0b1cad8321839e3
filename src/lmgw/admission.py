"""Admission control: how many requests the gateway runs at once, and who waits.

Two caps, both off (0) by default (``[limits]``):

* ``max_concurrent_requests``: requests running in the gateway's pipeline. Over it a request
  waits in a bounded FIFO queue (``queue_size``) for at most ``queue_timeout_s``; a full queue
  or a wait that times out is a 429 with ``Retry-After``. Without this, an overloaded fleet
  sees every request forwarded at once (ANCHORS.md complaint 17) and all of them get slower.
* ``max_in_flight_per_worker``: a worker with that many legs in flight is not a candidate;
  when every routable worker is at its cap the request gets a 503 with ``Retry-After``
  (:func:`with_capacity`, called from ``Pipeline.pick``).

The hot path pays for a counter: :meth:`Admission.enter` is a compare and an increment when a
slot is free (always, with the cap off), :meth:`Admission.leave` a decrement. A slot freed while
requests wait passes straight to the oldest waiter (no thundering herd, strict FIFO, and a
newcomer cannot overtake the queue). Cancellation anywhere (client gone, deadline) gives the
slot or the queue place back: see :meth:`Admission.wait`.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from .errors import GatewayError, error_body

if TYPE_CHECKING:
    from .http.types import Responder
    from .metrics import Metrics
    from .workers.worker import Worker

__all__ = ["REASONS", "Admission", "Rejected", "with_capacity", "worker_capacity_error"]

#: the ``reason`` label values of ``lmgw_admission_rejected_total``
REASONS = ("queue_full", "queue_timeout", "worker_capacity")
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
            await admission.wait()      # queued; raises Rejected (429) or returns admitted
        try:
            ...                          # no checkpoint between admission and this try
        finally:
            admission.leave(t_start)
    """

    __slots__ = ("_hold_s", "_limit", "_metrics", "_waiters", "cap", "in_flight",
                 "queue_size", "queue_timeout_s")  # fmt: skip

    def __init__(
        self,
        cap: int = 0,
        queue_size: int = 0,
        queue_timeout_s: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        #: 0 = unlimited
        self.cap = cap
        #: requests admitted and not yet finished (``lmgw_requests_in_flight``)
        self.in_flight = 0
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        # the comparison bound of enter(): with the cap off it is never reached, so the off
        # case costs the same compare as the on case and no extra branch
        self._limit = cap if cap > 0 else sys.maxsize
        self._waiters: deque[trio.Event] = deque()
        self._hold_s = 0.0  # running mean of request durations, only kept with a cap
        self._metrics = metrics
        if metrics is not None:
            metrics.requests_in_flight.collect = self._in_flight_sample
            metrics.admission_queue_depth.collect = self._queue_sample

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def _in_flight_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(self.in_flight))]

    def _queue_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(len(self._waiters)))]

    # -- the hot path -------------------------------------------------------------------------
    def enter(self) -> bool:
        """Take a slot if one is free and nobody waits for one (FIFO); False: call :meth:`wait`."""
        n = self.in_flight
        if n < self._limit and not self._waiters:
            self.in_flight = n + 1
            return True
        return False

    def leave(self, t_start: float) -> None:
        """Give the slot back (``t_start``: when the request arrived, for Retry-After); the
        oldest waiter, if any, takes it over."""
        if self.cap:
            self._hold_s += (_now() - t_start - self._hold_s) * _EWMA_ALPHA
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes on: in_flight unchanged
                return
        self.in_flight -= 1

    # -- the queue ----------------------------------------------------------------------------
    async def wait(self) -> None:
        """Wait in line for a slot (after :meth:`enter` said no). Returns holding a slot.

        Raises:
            Rejected: 429 at once when the queue is full, or after ``queue_timeout_s``.
        """
        waiters = self._waiters
        if len(waiters) >= self.queue_size:
            raise self._reject(
                429,
                "queue_full",
                f"the gateway is at its limit of {self.cap} concurrent requests and its wait"
                f" queue ({self.queue_size}) is full; retry later",
            )
        ready = trio.Event()
        waiters.append(ready)
        try:
            with trio.move_on_after(self.queue_timeout_s):
                await ready.wait()
        except BaseException:  # cancelled while queued: the client left or the deadline passed
            if ready.is_set():
                self._pass_on()  # a slot was handed over just now: hand it on
            else:
                waiters.remove(ready)
            raise
        # a slot handed over in the same tick as the timeout still counts: take it
        if not ready.is_set():
            waiters.remove(ready)
            raise self._reject(
                429,
                "queue_timeout",
                f"the gateway is at its limit of {self.cap} concurrent requests and no slot"
                f" freed within {self.queue_timeout_s:g} s; retry later",
            )

    def _pass_on(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self.in_flight -= 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request: the mean request duration
        times the requests ahead (waiting, plus this one) per slot, within 1..60 s."""
        if not self.cap:
            return RETRY_AFTER_MIN_S
        estimate = self._hold_s * (len(self._waiters) + 1) / self.cap
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(estimate)))

    def _reject(self, status: int, reason: str, message: str) -> Rejected:
        if self._metrics is not None:
            self._metrics.admission_rejected.inc((reason,))
        return Rejected(status, message, self.retry_after(), reason)


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
