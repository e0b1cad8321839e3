"""The admission wait queue's order (sans-IO: times come in, no awaits): who gets the next
free slot among the requests waiting for one (:mod:`lmgw.admission` does the waiting).

Two orders, ``limits.queue_policy``:

* :class:`FifoQueue` (``"fifo"``): oldest first, whoever sent it.
* :class:`FairQueue` (``"fair"``, the default):

  1. **Priority levels.** A request's ``priority`` is vLLM's: an integer, lower runs first,
     default 0. The next slot goes to the level whose *oldest* waiter has the lowest
     *effective* priority, ``priority - waited / aging_s``: a waiter moves up one level per
     ``aging_s`` seconds of wait, so a low level is never starved for good (ties: the lower
     raw priority). The comparison of two levels never changes with the clock (``p1 -
     (now - t1) / A < p2 - (now - t2) / A`` is ``p1 * A + t1 < p2 * A + t2``), so each level
     has a fixed sort key while its oldest waiter stays, and a heap orders them. ``aging_s``
     0: strict priority.
  2. **Fair share within a level** (virtual token counters, as in VTC, Sheng et al. 2024):
     waiters are grouped by tenant; each tenant of a level has a counter of the service it
     got, ``cost / weight`` added per request admitted, and the slot goes to the tenant with
     the lowest counter, then to that tenant's oldest waiter. A tenant that starts waiting
     again is lifted to the level's current virtual time (the counter of the last tenant
     served), so time spent idle earns no credit. The counters live while the level has
     waiters (a busy period); a level that empties starts from zero next time.

  Every operation is O(log n) in the levels and tenants waiting, except eviction
  (:meth:`FairQueue.evict_for`, on the full-queue path only), which scans them.

Cancelled waiters are dropped lazily (marked, skipped when reached) with a compaction when a
level holds more dead entries than live ones, so a cancellation is O(1) and memory stays
bounded by the waiters alive.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterator
from itertools import count

import trio

__all__ = ["EVICTED", "GONE", "GRANTED", "WAITING", "FairQueue", "FifoQueue", "Waiter"]

#: a waiter's ``state``
WAITING, GRANTED, EVICTED, GONE = 0, 1, 2, 3
#: tenants kept per level besides those waiting (their counters), before idle ones are pruned
_IDLE_TENANTS = 64


class Waiter:
    """One request waiting for a slot: its terms, and how its wait ended (``state``)."""

    __slots__ = ("arrival", "basis", "cost", "event", "label", "level", "model", "priority",
                 "queue", "state", "tenant", "weight")  # fmt: skip

    def __init__(
        self,
        priority: int = 0,
        tenant: Hashable = None,
        cost: float = 1.0,
        weight: float = 1.0,
        label: str = "-",
        arrival: float = 0.0,
    ) -> None:
        self.priority = priority
        #: who is charged (an API key, a header value, or None: one tenant for all)
        self.tenant = tenant
        self.cost = cost
        self.weight = weight
        #: the tenant's name in metrics (a key name, else "-": bounded)
        self.label = label
        self.arrival = arrival
        self.state = WAITING
        self.event = trio.Event()
        self.level: _Level | None = None
        self.queue: _Tenant | None = None
        #: what ``cost`` was estimated from (``lmgw.admission``: the estimated tokens)
        self.basis = 0.0
        #: the model the request names (None: none named), for the planner's view of demand
        self.model: str | None = None

    def __repr__(self) -> str:
        return f"Waiter(p={self.priority}, tenant={self.label}, state={self.state})"


class FifoQueue:
    """Oldest first (``limits.queue_policy = "fifo"``): the order before priorities existed."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._q)

    def push(self, w: Waiter) -> None:
        self._q.append(w)

    def pop(self) -> Waiter:
        """The next waiter to get a slot, marked GRANTED (the queue must not be empty)."""
        w = self._q.popleft()
        w.state = GRANTED
        return w

    def remove(self, w: Waiter) -> None:
        self._q.remove(w)
        w.state = GONE

    def evict_for(self, w: Waiter) -> Waiter | None:
        """FIFO never evicts: a full queue turns the newcomer away."""
        return None

    def charge(self, w: Waiter, amount: float) -> None:
        """FIFO keeps no counters."""


class _Tenant:
    """A tenant's waiters within one level, and its service counter there."""

    __slots__ = ("in_heap", "live", "served", "waiters", "weight")

    def __init__(self, weight: float) -> None:
        self.waiters: deque[Waiter] = deque()
        self.live = 0
        self.served = 0.0
        self.weight = weight
        self.in_heap = False


class _Level:
    """The waiters of one priority: by arrival (for the level's key) and by tenant."""

    __slots__ = ("arrivals", "dead", "gone", "heap", "live", "priority", "tenants", "vtime")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.tenants: dict[Hashable, _Tenant] = {}
        # (served, seq, tenant) of tenants with waiters; at most one entry per tenant
        self.heap: list[tuple[float, int, _Tenant]] = []
        self.arrivals: deque[Waiter] = deque()
        self.live = 0
        self.dead = 0
        self.vtime = 0.0
        self.gone = False

    def oldest(self) -> float:
        """The arrival time of the level's oldest live waiter (the level must have one)."""
        arrivals = self.arrivals
        while arrivals[0].state != WAITING:
            arrivals.popleft()
        return arrivals[0].arrival


class FairQueue:
    """Priority levels with aging, fair share by tenant within a level (see the module)."""

    __slots__ = ("_levels", "_order", "_seq", "aging_s", "live")

    def __init__(self, aging_s: float = 0.0) -> None:
        #: seconds of wait per level of priority gained; 0: strict priority
        self.aging_s = aging_s
        self._levels: dict[int, _Level] = {}
        # (key, seq, level): one entry per live level, plus entries of levels gone or with a
        # key that grew since (skipped or re-filed when they reach the top)
        self._order: list[tuple[tuple[float, float], int, _Level]] = []
        self._seq = count()
        #: waiters in the queue
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def __iter__(self) -> Iterator[Waiter]:
        for level in self._levels.values():
            for w in level.arrivals:
                if w.state == WAITING:
                    yield w

    def _key(self, priority: int, oldest: float) -> tuple[float, float]:
        if self.aging_s:
            return (priority * self.aging_s + oldest, priority)
        return (priority, oldest)

    def push(self, w: Waiter) -> None:
        """Queue ``w`` (its ``arrival`` not before the waiters already queued)."""
        level = self._levels.get(w.priority)
        if level is None:
            level = self._levels[w.priority] = _Level(w.priority)
            entry = (self._key(w.priority, w.arrival), next(self._seq), level)
            heapq.heappush(self._order, entry)
        tenant = level.tenants.get(w.tenant)
        if tenant is None:
            if len(level.tenants) > _IDLE_TENANTS + 2 * level.live:
                self._prune(level)
            tenant = level.tenants[w.tenant] = _Tenant(w.weight)
        tenant.weight = w.weight  # the key's current weight (a reload may change it)
        tenant.waiters.append(w)
        tenant.live += 1
        if not tenant.in_heap:  # (re)starts waiting: no credit for the time it was idle
            if tenant.served < level.vtime:
                tenant.served = level.vtime
            heapq.heappush(level.heap, (tenant.served, next(self._seq), tenant))
            tenant.in_heap = True
        level.arrivals.append(w)
        level.live += 1
        self.live += 1
        w.level = level
        w.queue = tenant

    def pop(self) -> Waiter:
        """The next waiter to get a slot, out of the queue and marked GRANTED (the queue must
        not be empty)."""
        order = self._order
        while True:
            key, seq, level = order[0]
            if level.gone:
                heapq.heappop(order)
                continue
            actual = self._key(level.priority, level.oldest())
            if actual > key:  # its oldest waiter left: file it again under its new key
                heapq.heapreplace(order, (actual, seq, level))
                continue
            break
        heap = level.heap
        while True:
            served, seq, tenant = heap[0]
            if tenant.live and served == tenant.served:
                break
            heapq.heappop(heap)
            if served == tenant.served:  # its entry, and it was emptied by cancellations
                tenant.in_heap = False
            # else an entry from before a charge() moved its counter: the new one is queued
        waiters = tenant.waiters
        w = waiters.popleft()
        while w.state != WAITING:
            w = waiters.popleft()
        w.state = GRANTED
        level.vtime = served
        tenant.served = served + w.cost / tenant.weight
        tenant.live -= 1
        if tenant.live:  # a fresh seq: ties between tenants go round robin
            heapq.heapreplace(heap, (tenant.served, next(self._seq), tenant))
        else:
            heapq.heappop(heap)
            tenant.in_heap = False
        self._left(level)
        return w

    def charge(self, w: Waiter, amount: float) -> None:
        """Add ``amount`` (negative: a refund) to the counter of the tenant ``w`` was granted
        from, once the request's actual cost is known (``fair_share_cost = "kv_seconds"``:
        the grant charged an estimate). Nothing when the level's busy period ended since:
        its counters are gone, as they would be for any cost."""
        level, tenant = w.level, w.queue
        if not amount or level is None or tenant is None or level.gone:
            return
        if level.tenants.get(w.tenant) is not tenant:  # pruned while idle
            return
        tenant.served += amount / tenant.weight
        if tenant.in_heap:  # its heap entry holds the old counter: a new one (the old skipped)
            heapq.heappush(level.heap, (tenant.served, next(self._seq), tenant))

    def remove(self, w: Waiter) -> None:
        """Take out a waiter that gave up (cancelled, timed out)."""
        w.state = GONE
        self._forget(w)

    def _forget(self, w: Waiter) -> None:
        level, tenant = w.level, w.queue
        assert level is not None and tenant is not None
        tenant.live -= 1
        level.dead += 1
        self._left(level)
        if not level.gone and level.dead > 32 + 2 * level.live:
            self._compact(level)

    def _left(self, level: _Level) -> None:
        level.live -= 1
        self.live -= 1
        if not level.live:
            level.gone = True
            del self._levels[level.priority]
            if len(self._order) > 64 + 2 * len(self._levels):
                self._order = [e for e in self._order if not e[2].gone]
                heapq.heapify(self._order)

    @staticmethod
    def _compact(level: _Level) -> None:
        level.arrivals = deque(w for w in level.arrivals if w.state == WAITING)
        for tenant in level.tenants.values():
            if len(tenant.waiters) != tenant.live:
                tenant.waiters = deque(w for w in tenant.waiters if w.state == WAITING)
        level.dead = 0

    @staticmethod
    def _prune(level: _Level) -> None:
        """Forget idle tenants' counters (a level with many tenants coming and going): they
        come back at the level's virtual time, as from idle."""
        for key in [k for k, t in level.tenants.items() if not t.live]:
            level.tenants.pop(key).in_heap = False
        level.heap = [e for e in level.heap if e[2].live]
        heapq.heapify(level.heap)

    def evict_for(self, w: Waiter) -> Waiter | None:
        """The queue is full and ``w`` wants in: take out (state EVICTED) and return the
        waiter that yields its place, or None when ``w`` is the one turned away.

        The victim is the newest waiter of the tenant holding the most places (per unit of
        weight) in the least urgent level (raw priorities: aging does not count here), when
        that level is less urgent than ``w``, or as urgent and that tenant would still hold
        more places per weight than ``w``'s tenant after the swap. So a flood at one
        priority cannot lock other tenants or more urgent requests out of the queue.
        """
        if not self._levels:
            return None
        worst = max(self._levels)
        if w.priority > worst:
            return None
        level = self._levels[worst]
        heaviest = max(
            (t for t in level.tenants.values() if t.live),
            key=lambda t: (t.live / t.weight, t.served),
        )
        if w.priority == worst:
            own = level.tenants.get(w.tenant)
            if own is heaviest:
                return None
            if heaviest.live / heaviest.weight <= ((own.live if own else 0) + 1) / w.weight:
                return None
        waiters = heaviest.waiters
        victim = waiters.pop()
        while victim.state != WAITING:
            victim = waiters.pop()
        victim.state = EVICTED
        self._forget(victim)
        return victim
