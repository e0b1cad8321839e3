"""Requests made inside the gateway process and the responder that keeps their answers: how
the in-process SDK (:mod:`lmgw.sdk.inprocess`) and the batch runner (:mod:`lmgw.batch`) call
the same handlers the HTTP servers run, with the same answers."""

from __future__ import annotations

import math

import trio

from .types import Headers, Request


class LocalRequest(Request):
    """A request made in-process. ``deadline_exceeded`` is computed from its deadline scope (the
    HTTP server sets the flag before cancelling a late handler; here the scope cancels it)."""

    __slots__ = ("deadline", "priority")

    def __init__(self, path: str, headers: Headers, body: bytes, method: str = "POST") -> None:
        self.deadline = math.inf
        #: the admission queue's priority when the body names none (a batch's lines run at
        #: the batch priority without it in the body the worker gets); None: the key's default
        self.priority: int | None = None
        super().__init__(method, path, "", headers, body, client="in-process")

    @property  # type: ignore[override]
    def deadline_exceeded(self) -> bool:
        return trio.current_time() >= self.deadline

    @deadline_exceeded.setter
    def deadline_exceeded(self, value: bool) -> None:
        pass  # Request.__init__ sets it; ours is derived


class Collector:
    """A responder that keeps a whole answer (``send_full``, or a start/send/end stream)."""

    __slots__ = ("finished", "headers", "parts", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.status = 0
        self.headers: Headers = []
        self.parts: list[bytes] = []

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.headers, self.parts, self.finished = status, headers, [body], True

    async def start(self, status: int, headers: Headers) -> None:
        self.started, self.status, self.headers = True, status, headers

    async def send(self, data: bytes) -> None:
        if data:
            self.parts.append(data)

    async def end(self, data: bytes = b"") -> None:
        if data:
            self.parts.append(data)
        self.finished = True

    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
