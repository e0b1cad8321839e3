"""Conditional disaggregation: when a P/D request is better prefilled on its decode worker.

Why: a vLLM decode instance is a whole engine. A prompt that leaves few tokens to prefill is
done sooner there than by a prefill leg plus a KV transfer (``models[].local_prefill_tokens``,
Dynamo's ``isl_bounding``), and when the prefill workers are the bottleneck a request waits
less on a decode engine with room than in the prefill queue (``models[].local_prefill_busy``,
Dynamo's ``prefill_load``; both set: its ``isl_or_load``).

Under load the choice is between two queues of prefills: the prefill worker's (the gateway's
requests in flight there are exactly its prefills) and the decode worker's own
(:class:`LocalQueues`: the local legs sent there whose prefill is not known done). A request
goes to the shorter one, so deflection shares the prefill work out instead of moving the queue
from the prefill worker to the decode workers. The decode engine's scraped queue and KV usage
only veto (they are seconds old).

Sans-IO: the runner (:meth:`lmgw.pipeline.disagg.DisaggRunner._local`) reads the counts and
loads and reports the legs; this decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing.policy import RouteContext

#: a decode engine whose KV cache is fuller than this prefills nothing for a busy prefill pool
#: (its running decodes would be preempted for the newcomer's KV)
DECODE_KV_CEILING = 0.9

#: why a request was prefilled on its decode worker (``lmgw_pd_local_prefill_total{reason}``)
REASONS = ("short", "cached", "busy")


@dataclass(frozen=True, slots=True)
class LocalPrefill:
    """One model's thresholds; 0 turns an arm off."""

    tokens: int = 0  #: models[].local_prefill_tokens
    busy: int = 0  #: models[].local_prefill_busy

    def reason(
        self,
        prompt_tokens: int,
        cached: Callable[[], int],
        prefill_load: float,
        decode_queued: int,
        decode_waiting: float,
        decode_kv_usage: float,
    ) -> str | None:
        """Why this request should run whole on its decode worker, or None for the two legs.

        ``prompt_tokens``: the prompt's length; ``cached()``: how many of them the decode
        worker's policy predicts cached there (asked only when the length alone is over the
        limit); ``prefill_load``: the picked prefill worker's requests in flight and queued
        (not counting this one); ``decode_queued``: the local prefills the decode worker has
        not finished (:class:`LocalQueues`); ``decode_waiting``, ``decode_kv_usage``: what
        the decode engine last reported (requests it queues; KV cache use, 0..1).

        * ``short``: the prompt has at most ``tokens`` tokens;
        * ``busy``: the prefill worker has at least ``busy`` requests and more than the decode
          worker's unfinished local prefills, while the decode engine queues none and its KV
          cache has room (any prompt length: the longer queue is the wait to avoid);
        * ``cached``: the tokens left after the decode worker's cached prefix are at most
          ``tokens``.
        """
        limit = self.tokens
        if limit and prompt_tokens <= limit:
            return "short"
        if (
            self.busy
            and prefill_load >= self.busy
            and decode_queued < prefill_load
            and decode_waiting <= 0
            and decode_kv_usage < DECODE_KV_CEILING
        ):
            return "busy"
        if limit and prompt_tokens - cached() <= limit:
            return "cached"
        return None


class _Entry:
    __slots__ = ("live", "worker")

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.live = True


class LocalQueues:
    """Per decode worker, the local prefills sent there and not known done, oldest first.

    Engines prefill first come, first served: a leg's first token (or its whole answer) ends
    its prefill and every earlier one on that worker; a failed leg ends only itself. The entry
    of a request's current local leg lives in its route's scratch, so the runner's first-token
    hook finds it without knowing the leg."""

    def __init__(self) -> None:
        self._fifo: dict[str, deque[_Entry]] = {}
        self._count: dict[str, int] = {}

    def queued(self, worker: str) -> int:
        """Local prefills on ``worker`` not known done."""
        return self._count.get(worker, 0)

    def sent(self, worker: str, route: RouteContext) -> None:
        """A local leg of ``route``'s request left for ``worker``."""
        entry = _Entry(worker)
        self._fifo.setdefault(worker, deque()).append(entry)
        self._count[worker] = self._count.get(worker, 0) + 1
        route.memo()[_Entry] = entry

    def first_token(self, route: RouteContext) -> None:
        """The request's local leg sent its first token: its prefill, and the older ones on
        that worker, are done."""
        entry = route.scratch.get(_Entry) if route.scratch else None
        if entry is not None and entry.live:
            self._drain(entry)

    def ended(self, route: RouteContext, ok: bool) -> None:
        """The request's local leg ended (``ok``: with its answer, which also ends the
        prefills before it)."""
        entry = route.scratch.pop(_Entry, None) if route.scratch else None
        if entry is None or not entry.live:
            return
        if ok:
            self._drain(entry)
        else:
            entry.live = False
            self._less(entry.worker, 1)
            self._trim(entry.worker)

    def _drain(self, entry: _Entry) -> None:
        q = self._fifo[entry.worker]
        done = 0
        while q:
            old = q.popleft()
            if old.live:
                old.live = False
                done += 1
            if old is entry:
                break
        self._less(entry.worker, done)
        self._trim(entry.worker)

    def _trim(self, worker: str) -> None:
        q = self._fifo[worker]
        while q and not q[0].live:
            q.popleft()
        if not q:
            del self._fifo[worker]

    def _less(self, worker: str, n: int) -> None:
        left = self._count[worker] - n
        if left:
            self._count[worker] = left
        else:
            del self._count[worker]
