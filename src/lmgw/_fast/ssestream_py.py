"""A streamed answer relayed as it comes, sans I/O: the compiled lane's per-stream state.
Pure-Python twin of `ssestream.pyx`, its reference in the tests and the fallback without a
compiler (:mod:`lmgw.transport.sse_stream` picks one).

Why: the compiled lane (:mod:`lmgw._fast.relay_py`) moves a streamed answer's bytes from the
worker's socket to the client's in its own loop, with no trio task and no wake-up per read.
What it must know of the bytes is here, one call per socket read (:meth:`SseStream.feed`):
the worker's chunked framing undone (:class:`~lmgw.transport.chunked.ChunkedDecoder`), only
whole SSE events passed on (a stream that breaks mid-event must not leave the client a torn
one before the error event or the continuation), as one chunk per read, the events counted
(the per-token latency metric), and every payload kept in the migration journal when the
stream may be continued elsewhere. The same rules as :func:`lmgw.transport.openai_http.
relay_sse`, the trio relay.
"""

from __future__ import annotations

from collections.abc import Callable

from ..transport.chunked import ChunkedDecoder, count_events
from ..transport.sse import split_complete

__all__ = ["SseStream"]


class SseStream:
    """One streamed answer's relay state (see the module docstring).

    ``stall_s``: the longest silence allowed between two reads (0: no limit); ``journal``: the
    payload kept for a continuation (a :class:`lmgw.pipeline.migration.Journal`, folded as it
    grows), or None; ``tap``: called with each group of whole events, returns what goes to the
    client (the routing audit reads the usage there)."""

    __slots__ = ("decoder", "done", "events", "journal", "keep", "kept", "pending", "stall_s",
                 "started", "tap")  # fmt: skip

    def __init__(
        self,
        stall_s: float = 0.0,
        journal: list[bytes] | None = None,
        tap: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.decoder = ChunkedDecoder()
        self.stall_s = stall_s
        self.journal = journal
        self.tap = tap
        self.pending = b""  # a torn event, held until it is whole
        self.events = 0
        self.kept = 0  # journal bytes since its last fold
        self.started = False  # a payload byte came: the first token
        self.done = False  # the last chunk came
        self.keep = True  # the worker's connection may serve again (set by the relay)

    def feed(self, data: bytes) -> bytes:
        """The client's bytes that ``data``, a read of the worker's body, completes: its whole
        events as one chunk, and after the worker's last chunk whatever was held and the
        end of the client's body.

        Raises:
            ChunkedError: the worker's framing is broken.
        """
        payload = self.decoder.feed(data)
        out = b""
        if payload:
            self.started = True
            journal = self.journal
            if journal is not None:
                journal.append(payload)
                self.kept += len(payload)
                fold = getattr(journal, "fold", None)
                if fold is not None and self.kept >= journal.fold_bytes:  # type: ignore[attr-defined]
                    fold()
                    self.kept = 0
            held = self.pending + payload if self.pending else payload
            cut = len(held) if held.endswith(b"\n\n") else split_complete(held)
            if cut:
                whole = held[:cut]
                self.pending = held[cut:]
                self.events += count_events(whole)
                if self.tap is not None:
                    whole = self.tap(whole)
                if whole:
                    out = b"%x\r\n%b\r\n" % (len(whole), whole)
            else:
                self.pending = held
        if self.decoder.done:
            self.done = True
            rest, self.pending = self.pending, b""
            if rest:  # a last event without its blank line: as the trio relay, passed on
                out += b"%x\r\n%b\r\n" % (len(rest), rest)
            out += b"0\r\n\r\n"
        return out
