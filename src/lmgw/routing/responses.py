"""Responses API affinity (sans-IO): which worker stored which response.

vLLM keeps a stored response in the serving process's memory, so a follow-up
(``previous_response_id``, ``GET /v1/responses/{id}``, ``.../cancel``) must reach the worker that
created it; any other worker answers 404. The gateway reads each new response's id from the
answer as it passes (the JSON's ``id``, or the stream's ``response.created`` event) and keeps
``id -> (worker, model, owner)`` in a bounded LRU whose entries expire after a TTL
(``routing.response_affinity_entries`` / ``routing.response_affinity_ttl_s``).

Reading the id costs one typed decode of a non-streamed answer, and for a stream a bytes search
per group of events until the ``response.created`` event is seen (the first one).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import msgspec

from ..errors import DECODE_ERRORS


class Stored(NamedTuple):
    """Where a response lives: the worker that created it, its model, and the API key (name)
    that asked for it (None without keys); ``expires``: monotonic seconds."""

    worker_id: str
    model: str
    owner: str | None
    expires: float


#: ``(response_id, stored)``: told of every entry recorded here (not of imported ones)
Listener = Callable[[str, Stored], None]


class ResponseAffinity:
    """A bounded LRU of response id -> :class:`Stored`, entries expiring ``ttl_s`` after they
    were recorded. ``counts`` tallies outcomes for the metrics (recorded, hit, unknown, gone)."""

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self.counts: dict[str, int] = {"recorded": 0, "hit": 0, "unknown": 0, "gone": 0}
        #: set by the replica sync to share what this replica records
        self.listener: Listener | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self,
        response_id: str,
        worker_id: str,
        model: str,
        owner: str | None = None,
        ttl_s: float | None = None,
        *,
        share: bool = True,
    ) -> None:
        """Remember that ``worker_id`` stored ``response_id`` (the oldest entry goes when full).
        ``share=False`` for entries learnt from another replica."""
        if self.max_entries <= 0 or not response_id:
            return
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            return
        stored = Stored(worker_id, model, owner, self._clock() + ttl)
        entries = self._entries
        entries[response_id] = stored
        entries.move_to_end(response_id)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        self.counts["recorded"] += 1
        if share and self.listener is not None:
            self.listener(response_id, stored)

    def lookup(self, response_id: str) -> Stored | None:
        """The entry of ``response_id``, or None (unknown or expired: then forgotten)."""
        entries = self._entries
        stored = entries.get(response_id)
        if stored is None:
            return None
        if stored.expires <= self._clock():
            del entries[response_id]
            return None
        entries.move_to_end(response_id)
        return stored

    def remaining_s(self, stored: Stored) -> float:
        """Seconds until ``stored`` expires (for sharing it with another replica)."""
        return max(0.0, stored.expires - self._clock())


# -- reading the id from an answer ---------------------------------------------------------------


class _Answer(msgspec.Struct):
    id: str | None = None
    object: str | None = None


class _Created(msgspec.Struct):
    type: str | None = None
    response: _Answer | None = None


_answer = msgspec.json.Decoder(_Answer)
_created = msgspec.json.Decoder(_Created)
_CREATED = b"response.created"


def response_id_of(body: bytes) -> str | None:
    """The id of a non-streamed Responses API answer (``"object": "response"``), else None."""
    try:
        answer = _answer.decode(body)
    except DECODE_ERRORS:
        return None
    return answer.id if answer.object == "response" and isinstance(answer.id, str) else None


def created_id_of(events: bytes) -> str | None:
    """The response id in a group of complete SSE events, when it holds ``response.created``
    (vLLM writes ``event: <type>`` then ``data: <json>``; the ``data`` line is read)."""
    if _CREATED not in events:
        return None
    for block in events.split(b"\n\n"):
        if _CREATED not in block:
            continue
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                event = _created.decode(line[5:].strip())
            except DECODE_ERRORS:
                continue
            if event.type == "response.created" and event.response is not None:
                rid = event.response.id
                if isinstance(rid, str) and rid:
                    return rid
    return None


class IdReader:
    """Read-only taps on one answer that call ``found(response_id)`` once, for the JSON body
    (:meth:`body`) or the stream's event groups (:meth:`events`); both return what they get."""

    __slots__ = ("_done", "_found")

    def __init__(self, found: Callable[[str], None]) -> None:
        self._found = found
        self._done = False

    def body(self, data: bytes) -> bytes:
        rid = response_id_of(data)
        if rid is not None:
            self._done = True
            self._found(rid)
        return data

    def events(self, data: bytes) -> bytes:
        if not self._done:
            rid = created_id_of(data)
            if rid is not None:
                self._done = True
                self._found(rid)
        return data
