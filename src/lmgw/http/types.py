"""The contract between HTTP servers (native trio server, ASGI adapter) and request handlers.

A handler is ``async def handler(request: Request, responder: Responder) -> None``. It must answer
exactly once, either with :meth:`Responder.send_full` or with ``start`` / ``send``... / ``end``.
The server cancels the handler (a normal trio cancellation) when the client goes away, so handlers
clean up in ``finally`` blocks and never poll for disconnects themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

Headers = list[tuple[bytes, bytes]]


class Request:
    """A fully received HTTP request. Header names are lower-case bytes; the body is complete."""

    __slots__ = (
        "body",
        "client",
        "deadline_exceeded",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "path",
        "principal",
        "query",
        "request_id",
        "stream_scope",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        keep_alive: bool = True,
        client: str = "",
        http10: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.client = client
        self.http10 = http10
        #: set by the handler once it knows the request's id (used in timeout answers)
        self.request_id: str | None = None
        #: set by the server before it cancels a handler that ran past the request deadline
        self.deadline_exceeded = False
        #: a streamed answer's handler sets it around the stream: a deadline after the stream
        #: began cancels only that (the stream ends with an error event, and the connection
        #: goes on, as its head promised), not the whole connection
        self.stream_scope: Any = None
        #: the client's API key entry (``lmgw.auth.KeyEntry``) once the key check passed;
        #: None when no keys are configured
        self.principal = None

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case bytes), or None. Linear: headers are few."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} body={len(self.body)}B>"


class UpgradeRequest(Request):
    """A request that asks to switch protocols (``Upgrade: websocket``): the server hands the
    connection to the application's ``upgrade`` hook instead of its request handler.
    ``trailing`` holds the bytes that followed the head in the same read (the new protocol's
    first bytes)."""

    __slots__ = ("trailing",)

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.trailing = b""


class Responder(Protocol):
    """How a handler answers. Implemented by each server; headers must not include framing ones
    (``content-length``, ``transfer-encoding``, ``connection``): the server adds those."""

    started: bool

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        """Send a complete response (head and body in one write)."""

    async def start(self, status: int, headers: Headers) -> None:
        """Begin a streamed response. The head is held back and written with the first chunk."""

    async def send(self, data: bytes) -> None:
        """Send one body chunk of a streamed response (empty data is ignored)."""

    async def end(self, data: bytes = b"") -> None:
        """Finish a streamed response, with ``data`` as its last chunk (one write for both)."""


Handler = Callable[[Request, Responder], Awaitable[None]]

#: Answers a request whose handler was cancelled at the deadline (``request.deadline_exceeded``):
#: an error response if none started, else whatever ends the started stream honestly.
TimeoutHandler = Callable[[Request, Responder], Awaitable[None]]


class AbortResponse(Exception):
    """Raise from a handler to drop the connection at once, without an error log.

    For deliberate aborts (fault injection, a response that cannot be finished honestly); the
    client sees the connection close, mid-body if the response had started.
    """


def accepted_request_id(value: bytes) -> str | None:
    """A client's ``X-Request-Id`` as the gateway echoes and forwards it: printable ASCII of at
    most 256 characters; None for anything else (a new id is made then)."""
    if len(value) <= 256 and value.isascii():
        text = value.decode("ascii")
        if text.isprintable() and text:
            return text
    return None
