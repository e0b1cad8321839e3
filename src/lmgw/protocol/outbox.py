"""Messages queued for one peer, packed into as few ZeroMQ messages as the bounds allow.

Sans-IO: the transport adds messages as they are produced and, whenever it flushes (at once
when it is idle, else when its flusher task runs after the scheduler pass), sends
:meth:`Outbox.peek` and calls :meth:`Outbox.commit` once the send succeeded. Natural
batching, no timers: whatever was queued since the last flush leaves together. Why each
message is encoded when it is added (one msgspec call, as before batching) and the batch
spliced from those bytes: the byte bound is then exact, and a peer without the ``batch``
capability gets the same bytes one by one.

Order is kept: a message with payload frames (tensors) goes out on its own, after what was
queued before it and before what was queued after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .messages import MAX_BATCH, Message, batch_header, encode_message

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BATCH_BYTES", "Outbox"]

DEFAULT_MAX_BATCH = 64
"""Messages per ZeroMQ message, at most. Well under half a gateway's ``stream_buffer`` (256
events per request): a batch that is all one request's deltas cannot overflow its queue."""
DEFAULT_MAX_BATCH_BYTES = 48 << 10
"""Encoded bytes per batch, at most (a single larger message still goes, alone). Below
pyzmq's zero-copy threshold (64 KiB): a smaller frame is copied once, a larger one is
tracked by pyzmq's garbage-collector thread, which costs more than the copy."""


def _size(frame: Any) -> int:
    try:
        return memoryview(frame).nbytes
    except TypeError:
        return 0


class Outbox:
    """A FIFO of encoded messages for one peer (``envelope``: its ROUTER identity, or none).

    ``batching`` False (the peer lacks the capability): every message is its own ZeroMQ
    message, as before. ``meta`` travels with a message so the transport can tell whose
    message a failed send dropped (:meth:`metas`)."""

    __slots__ = (
        "_items",
        "_next",
        "_next_n",
        "batching",
        "envelope",
        "max_batch",
        "max_batch_bytes",
        "nbytes",
    )

    def __init__(
        self,
        *,
        batching: bool = True,
        envelope: Sequence[Any] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH}")
        self.batching = batching
        self.envelope = list(envelope)
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        # (msgpack, payload frames or None, meta, size)
        self._items: list[tuple[bytes, Sequence[Any] | None, Any, int]] = []
        self._next: list[Any] | None = None  # frames of the next ZeroMQ message (peek)
        self._next_n = 0
        self.nbytes = 0  # queued, payload frames included

    def add(self, msg: Message, payload: Sequence[Any] = (), meta: Any = None) -> None:
        """Queue ``msg`` (encoded now) with its payload frames, sent zero-copy later."""
        raw = encode_message(msg)
        size = len(raw)
        if payload:
            size += sum(_size(f) for f in payload)
            self._items.append((raw, payload, meta, size))
        else:
            self._items.append((raw, None, meta, size))
        self.nbytes += size

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def peek(self) -> list[Any]:
        """The frames of the next ZeroMQ message (envelope included); the same list until
        :meth:`commit`. Only when not empty."""
        frames = self._next
        if frames is not None:
            return frames
        items = self._items
        raw, payload, _, _ = items[0]
        n = 1
        if payload is not None:
            frames = [*self.envelope, batch_header((raw,)), *payload]
        else:
            if self.batching:
                limit = min(len(items), self.max_batch)
                size, cap = len(raw), self.max_batch_bytes
                while n < limit:
                    item = items[n]
                    size += item[3]
                    if item[1] is not None or size > cap:
                        break
                    n += 1
            header = batch_header([item[0] for item in items[:n]] if n > 1 else (raw,))
            frames = [*self.envelope, header] if self.envelope else [header]
        self._next, self._next_n = frames, n
        return frames

    def metas(self) -> list[Any]:
        """The metas of the messages in :meth:`peek`'s frames."""
        self.peek()
        return [item[2] for item in self._items[: self._next_n]]

    def commit(self) -> int:
        """The frames of :meth:`peek` were sent: drop their messages; return how many."""
        n = self._next_n
        if self._next is None or n == 0:
            return 0
        items = self._items
        self.nbytes -= sum(item[3] for item in items[:n])
        del items[:n]
        self._next, self._next_n = None, 0
        return n

    def clear(self) -> list[Any]:
        """Drop everything queued; return the metas (the transport fails their owners)."""
        metas = [item[2] for item in self._items]
        self._items.clear()
        self._next, self._next_n = None, 0
        self.nbytes = 0
        return metas
