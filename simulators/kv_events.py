"""KV-cache events as vLLM publishes them (``--kv-events-config``), from the simulated engine.

Why: exact cache-aware routing needs the engine's own view of its prefix cache; a simulated
worker that publishes it lets the gateway's subscriber and policy be tested, and benchmarked,
against a cache with real capacity and eviction.

Wire format (vLLM's ``ZmqEventPublisher``, ``vllm/distributed/kv_events.py``): multipart
``[topic, seq (8 bytes, big-endian), payload]`` on a PUB socket (here XPUB: the same frames for
a SUB, and the worker can tell a subscriber joined); the payload is a msgpack
``KVEventBatch(ts, events)`` in vLLM's ``array_like`` encoding, events tagged by class name:
``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium)``,
``BlockRemoved(block_hashes, medium)``, ``AllBlocksCleared()``. ``seq`` counts batches from 0.
A LoRA adapter's blocks add vLLM's next field, ``lora_name``, after ``medium``
(:class:`LoraBlockStored`); a decoder that knows fewer fields ignores trailing ones.

Publishing never blocks the engine: the prefix cache hands events to :meth:`KvEventPublisher.add`
(a list append), and one owner task sends them as a batch at its next turn. PUB drops messages
for a slow subscriber at the high-water mark, and a backlog past :data:`MAX_PENDING` is dropped
here with a skipped sequence number: either way the subscriber sees a gap and rebuilds.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import trio
import zmq

from lmgw.transport.zmq import ZmqSocket

log = logging.getLogger("lmgw.simulators.kv_events")

MAX_PENDING = 65536
"""Events held for the next batch at most; past it the backlog is dropped (a sequence gap)."""
SUBSCRIPTION_POLL_S = 0.05
"""How often the idle owner task reads subscription messages (for ``subscriptions``)."""
SNDHWM = 10_000
"""Batches queued per subscriber before PUB drops (vLLM's default HWM is 100k)."""


class _Event(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM's ``KVCacheEvent`` base: encoded as ``[tag, field, ...]``."""


class BlockStored(_Event):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    """The adapter's number (:meth:`.lora.LoraAdapters.lora_id`); None: the base model."""
    medium: str | None = "GPU"


class LoraBlockStored(BlockStored, tag="BlockStored"):
    """``BlockStored`` of an adapter's blocks, with vLLM's ``lora_name``. A subclass rather than
    a field of :class:`BlockStored` because ``array_like`` encodes every field, defaults too:
    the base model's events keep their bytes."""

    lora_name: str | None = None
    """The adapter's name (vLLM keys blocks by it since ``lora_id`` was deprecated)."""


class BlockRemoved(_Event):
    block_hashes: list[int]
    medium: str | None = "GPU"


class AllBlocksCleared(_Event):
    pass


SimKVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[SimKVEvent]


class RankedKVEventBatch(KVEventBatch):
    """A data-parallel rank's batch: vLLM's next field, ``data_parallel_rank`` (a subclass, as
    :class:`LoraBlockStored`: ``array_like`` would encode a default too)."""

    data_parallel_rank: int


_encoder = msgspec.msgpack.Encoder()


def encode_batch(
    events: list[SimKVEvent], ts: float | None = None, rank: int | None = None
) -> bytes:
    """The payload frame of one batch, byte-compatible with vLLM's (``rank``: the engine's
    data-parallel rank, when it has one)."""
    at = time.time() if ts is None else ts
    batch = KVEventBatch(at, events) if rank is None else RankedKVEventBatch(at, events, rank)
    return _encoder.encode(batch)


class KvEventPublisher:
    """Collects a worker's prefix-cache events and publishes them from one owner task.

    Args:
        bind: the ZMQ endpoint to bind (``tcp://127.0.0.1:0`` picks a free port).
        topic: the topic frame (vLLM's default is empty).
        rank: the engine's data-parallel rank (vLLM names it in each batch), if any.
    """

    def __init__(self, bind: str, topic: str = "", rank: int | None = None) -> None:
        self.bind = bind
        self.topic = topic.encode()
        self.rank = rank  #: the engine's data-parallel rank, named in every batch
        #: the bound endpoint, once :meth:`run` bound it
        self.endpoint: str | None = None
        self.seq = 0
        self.batches = 0
        self.events = 0
        self.dropped_events = 0
        self.subscriptions = 0
        self._pending: list[SimKVEvent] = []
        self._wake = trio.Event()

    def add(self, event: Any) -> None:
        """Queue one event for the next batch (synchronous, O(1): the engine calls it)."""
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self.dropped_events += len(pending)
            pending.clear()
            self.seq += 1  # the subscriber sees a gap and rebuilds from later events
        pending.append(event)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the socket: bind, report the endpoint, send batches until cancelled."""
        options = {zmq.XPUB_VERBOSE: 1}
        with ZmqSocket.open(None, zmq.XPUB, hwm=SNDHWM, options=options) as sock:
            self.endpoint = sock.bind(self.bind)
            task_status.started(self.endpoint)
            while True:
                if not self._pending:
                    with trio.move_on_after(SUBSCRIPTION_POLL_S):
                        await self._wake.wait()
                self._wake = trio.Event()
                while (msg := sock.try_recv_multipart()) is not None:
                    if msg and msg[0][:1] == b"\x01":
                        self.subscriptions += 1
                if self._pending:
                    events, self._pending = self._pending, []
                    payload = encode_batch(events, rank=self.rank)
                    frames = [self.topic, self.seq.to_bytes(8, "big"), payload]
                    self.seq += 1
                    self.batches += 1
                    self.events += len(events)
                    sock.try_send_multipart(frames)  # XPUB never blocks: it drops at the HWM
                await trio.sleep(0)  # one batch per turn: the engine's events keep coalescing

    def statistics(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "seq": self.seq,
            "batches": self.batches,
            "events": self.events,
            "dropped_events": self.dropped_events,
            "subscriptions": self.subscriptions,
        }
