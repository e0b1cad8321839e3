"""Engine KV-event subscribers: feed each worker's prefix-cache changes to its role's policy.

Why: cache-aware routing in *exact* mode predicts from what the engine reports it holds
(``workers[].kv_events``, vLLM's ``--kv-events-config`` publisher) instead of from what the
gateway sent where. One SUB socket per worker, owned by one task, a child of the Gateway's
nursery: started when the worker is added, cancelled when it is removed.

Each message is ``[topic, seq (8 bytes big-endian), payload]``; the payload is decoded by
:func:`lmgw.routing.kv_events.decode_vllm_batch` and every event goes to
``policy.on_kv_event(worker, event)`` in order. PUB/SUB drops messages when a side is slow and a
worker that restarts starts its sequence again, so a ``seq`` that is not the previous one + 1
(or a batch that cannot be decoded) means the view of that worker is incomplete: the policy
gets an ``AllBlocksCleared()`` (it forgets the worker's blocks and rebuilds them from later
events, which is safe: a miss only costs locality) and ``lmgw_kv_event_gaps_total{worker}``
counts it. The first message after connecting is taken as it comes (nothing to compare with;
blocks stored before the subscription are unknown until they are stored again).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio
import zmq

from ..routing.kv_events import AllBlocksCleared, KVEventError, decode_vllm_batch
from ..transport.zmq import ZmqSocket

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..routing.policy import Policy
    from .worker import Worker

log = logging.getLogger("lmgw.kv_events")

#: bound on one message (a batch carries the token ids of the blocks it stores)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: messages queued in the SUB socket before ZeroMQ drops (then the sequence shows a gap)
RCVHWM = 100_000


class KvEventFeed:
    """One worker's subscription: its socket's owner task and the sequence bookkeeping."""

    __slots__ = (
        "bad_batches",
        "batches",
        "closed",
        "endpoint",
        "events",
        "gaps",
        "last_seq",
        "metrics",
        "policy",
        "scope",
        "worker",
    )

    def __init__(
        self, worker: Worker, endpoint: str, policy: Policy, metrics: Metrics | None = None
    ) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.policy = policy
        self.metrics = metrics
        self.scope = trio.CancelScope()
        #: set when the worker is removed: nothing more reaches the policy, even a batch
        #: already received when the cancellation arrived
        self.closed = False
        self.last_seq: int | None = None
        self.batches = 0
        self.events = 0
        self.gaps = 0
        self.bad_batches = 0
        if metrics is not None:  # exported as 0 from the start
            metrics.kv_event_gaps.inc((worker.id,), 0.0)

    async def run(self, ctx: zmq.Context | None = None) -> None:
        """Subscribe and feed the policy until cancelled (ZeroMQ reconnects by itself)."""
        options = {zmq.SUBSCRIBE: b""}
        with (
            self.scope,
            ZmqSocket.open(
                ctx, zmq.SUB, hwm=RCVHWM, max_msg_size=MAX_MESSAGE_BYTES, options=options
            ) as sock,
        ):
            sock.connect(self.endpoint)
            log.info("worker %s: KV events from %s", self.worker.id, self.endpoint)
            while True:
                frames = await sock.recv_multipart()
                if self.closed:
                    return
                self.feed(frames)

    def feed(self, frames: list[bytes]) -> None:
        """Apply one message (synchronous: no await between events of a batch)."""
        worker, policy = self.worker, self.policy
        if len(frames) != 3 or len(frames[1]) != 8:
            self._gap(f"a message of {len(frames)} frames is not a KV event batch")
            return
        seq = int.from_bytes(frames[1], "big")
        last, self.last_seq = self.last_seq, seq
        if last is not None and seq != last + 1:
            self._gap(f"sequence {seq} after {last}")
        try:
            _, events, rank = decode_vllm_batch(frames[2])
        except KVEventError as exc:
            self.bad_batches += 1
            self._gap(str(exc))
            return
        mine = worker.dp_rank
        if rank is not None and mine is not None and rank != mine:  # another rank's cache
            self.bad_batches += 1
            self._gap(f"events of data-parallel rank {rank} on rank {mine}'s endpoint")
            return
        self.batches += 1
        self.events += len(events)
        for event in events:
            policy.on_kv_event(worker, event)

    def _gap(self, why: str) -> None:
        """Events were lost: the policy forgets the worker's blocks, rebuilt from later ones."""
        self.gaps += 1
        if self.metrics is not None:
            self.metrics.kv_event_gaps.inc((self.worker.id,))
        level = logging.WARNING if self.gaps == 1 else logging.DEBUG
        log.log(level, "worker %s: KV events lost (%s); cache view reset", self.worker.id, why)
        self.policy.on_kv_event(self.worker, AllBlocksCleared())

    def statistics(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "batches": self.batches,
            "events": self.events,
            "gaps": self.gaps,
            "bad_batches": self.bad_batches,
            "last_seq": self.last_seq,
        }


class KvEventSubscribers:
    """The Gateway's KV-event feeds: one :class:`KvEventFeed` per worker that has an endpoint
    and whose role's policy ``wants_kv_events``, each a task of :meth:`run`'s nursery."""

    def __init__(
        self,
        policies: Mapping[str, Policy],
        metrics: Metrics | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.policies = policies
        self.metrics = metrics
        self._ctx = ctx
        self.feeds: dict[str, KvEventFeed] = {}
        self._nursery: trio.Nursery | None = None

    def watch(self, worker: Worker, endpoint: str | None) -> KvEventFeed | None:
        """Subscribe to ``worker``'s events (now, or when :meth:`run` starts); None when it has
        no endpoint or its role's policy does not use events."""
        policy = self.policies.get(worker.role)
        if not endpoint or policy is None or not policy.wants_kv_events:
            return None
        self.unwatch(worker)
        feed = KvEventFeed(worker, endpoint, policy, self.metrics)
        self.feeds[worker.id] = feed
        if self._nursery is not None:
            self._nursery.start_soon(feed.run, self._ctx)
        return feed

    def unwatch(self, worker: Worker) -> None:
        """Stop ``worker``'s feed (it was removed): nothing more reaches its policy."""
        feed = self.feeds.pop(worker.id, None)
        if feed is not None:
            feed.closed = True
            feed.scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the feeds until cancelled (those watched before start first)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for feed in self.feeds.values():
                nursery.start_soon(feed.run, self._ctx)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Per worker id: endpoint, batches, events, gaps, last sequence number."""
        return {wid: feed.statistics() for wid, feed in self.feeds.items()}
