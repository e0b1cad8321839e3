"""Sans-IO HTTP/1.1 server connection on the httptools (llhttp) C parser.

Bytes go in with :meth:`H1Connection.receive_data`; complete requests (or one protocol error) come
out of :meth:`next_event`. There are no sockets, clocks or awaits here, so the same object serves
the trio server and the tests (fed whole, byte-at-a-time, or with trailing pipelined data).

Limits are constructor arguments; going over one produces a :class:`ProtocolError` carrying the
HTTP status to answer with (400, 413, 431), after which the connection accepts nothing more.
"""

from __future__ import annotations

from collections import deque

import httptools

from .types import Headers, Request, UpgradeRequest

#: What the reader found out about a message still in flight, for the server's timeouts.
IDLE, HEAD, BODY = 0, 1, 2


class ProtocolError(Exception):
    """The peer sent something we will not process; ``status`` is the response to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with ``status`` (400, 413, 431)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class H1Connection:
    """One client connection's parser state.

    Args:
        max_header_bytes: request line plus headers; more gives 431 (nginx 8-32 KiB, h11 16 KiB;
            the default in config is 64 KiB because long bearer tokens and trace headers exist).
        max_body_bytes: request body; more gives 413 before the body is read when Content-Length
            says so, or as soon as a chunked body crosses it.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_conn_hdr",
        "_content_length",
        "_error",
        "_expect_continue",
        "_gap",
        "_head_raw",
        "_head_size",
        "_headers",
        "_http10",
        "_keep_alive",
        "_parser",
        "_progress",
        "_upgrade",
        "_upgraded",
        "_url",
        "client",
        "events",
        "max_body_bytes",
        "max_header_bytes",
        "state",
    )

    def __init__(
        self, max_header_bytes: int = 65536, max_body_bytes: int = 32 << 20, client: str = ""
    ):
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.client = client
        self._parser = httptools.HttpRequestParser(self)
        self.events: deque[Request | ProtocolError] = deque()
        self.state = IDLE
        self._error: ProtocolError | None = None
        self._head_raw = 0
        self._gap = 0
        self._progress = False
        self._keep_alive = True
        self._http10 = False
        #: the queued UpgradeRequest once the parser stopped at its head (nothing more is read)
        self._upgraded: UpgradeRequest | None = None
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._head_size = 0
        self._body_size = 0
        self._content_length = -1
        self._conn_hdr = b""
        self._expect_continue = False
        self._upgrade = False

    # -- public API -------------------------------------------------------------------------
    @property
    def content_length(self) -> int:
        """The request in progress's declared ``Content-Length`` (-1: none, or chunked)."""
        return self._content_length

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the socket. After an error, further data is ignored."""
        if self._error is not None or self._upgraded is not None:
            return
        before = self.state
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._fail(cause.status, cause.message)
            else:  # a bug in our callbacks: surface it
                raise
            return
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops after the head of a request that asks to switch protocols (only
            # WebSocket ones get here: on_headers_complete rejects the others)
            upgraded = self.events[-1] if self.events else None
            if not isinstance(upgraded, UpgradeRequest):
                self._fail(400, "protocol upgrades are not supported")
                return
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            upgraded.trailing = bytes(data[offset:])
            self._upgraded = upgraded
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self.state == HEAD:
            # The head is still incomplete. httptools buffers a header line until it ends, so
            # the callbacks alone cannot bound a head that never ends: count raw bytes too.
            # on_message_begin sets -1 ("began in this chunk"): the whole chunk is head if the
            # connection was idle before it and no event is queued (so none completed in it),
            # else the share is unknown and only the following chunks count (on_url/on_header
            # count the rest). Undercounting is safe; overcounting would reject good requests.
            if self._head_raw >= 0:
                self._head_raw += len(data)
            elif before == IDLE and not self.events:
                self._head_raw = len(data)
            else:
                self._head_raw = 0
            if self._head_raw > self.max_header_bytes:
                self._fail(431, f"request head exceeds {self.max_header_bytes} bytes")
        elif self.state == BODY:
            # Same for a chunked body's framing and trailers (httptools buffers a trailer line
            # until it ends, too): whole reads that started in the body and brought no body
            # byte and no complete trailer are counted; any progress resets the count.
            if self._progress or before != BODY:
                self._progress = False
                self._gap = 0
            else:
                self._gap += len(data)
                if self._gap > self.max_header_bytes:
                    self._fail(431, f"request trailers exceed {self.max_header_bytes} bytes")

    def next_event(self) -> Request | ProtocolError | None:
        """The next complete request or protocol error, in arrival order; None if none yet."""
        return self.events.popleft() if self.events else None

    @property
    def expect_continue(self) -> bool:
        """True while the head of a request that asked for ``100-continue`` awaits its body."""
        return self._expect_continue and self.state == BODY

    def continue_sent(self) -> None:
        self._expect_continue = False

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _fail(self, status: int, message: str) -> None:
        self._error = ProtocolError(status, message)
        self.events.append(self._error)
        self.state = IDLE

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.state = HEAD
        self._head_raw = -1

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            raise _Reject(431, f"request head exceeds {self.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_header_bytes:
            raise _Reject(431, f"request head exceeds {self.max_header_bytes} bytes")
        if self.state == BODY:
            # a chunked body's trailer: counted against the head limit, but never merged into
            # the headers that were judged (and routed on) before the body was read. llhttp
            # honours a trailing "Connection: close" (it rejects any later request), so do we.
            if name.lower() == b"connection" and b"close" in value.lower():
                self._keep_alive = False
            self._progress = True
            return
        name = name.lower()
        if name == b"content-length":
            try:
                self._content_length = int(value)
            except ValueError:
                raise _Reject(400, "invalid Content-Length") from None
            if self._content_length > self.max_body_bytes:
                raise _Reject(413, f"request body exceeds {self.max_body_bytes} bytes")
        elif name == b"connection":
            self._conn_hdr = value.lower()
        elif name == b"expect" and value.rstrip().lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._parser
        if p.should_upgrade():  # Upgrade + Connection: upgrade, or CONNECT
            if not self._wants_websocket():
                raise _Reject(400, "protocol upgrades are not supported")
            self._upgrade = True
        # Decided from the header ourselves: httptools' should_keep_alive() is unreliable at
        # on_headers_complete and always False after the message completes.
        version = p.get_http_version()
        if version == "1.1":
            self._keep_alive = b"close" not in self._conn_hdr
            self._http10 = False
        elif version == "1.0":
            self._keep_alive = b"keep-alive" in self._conn_hdr
            self._http10 = True
        else:  # llhttp also parses HTTP/0.9 simple requests and "HTTP/2.0" request lines
            raise _Reject(400, f"unsupported HTTP version {version}")
        self.state = BODY

    def _wants_websocket(self) -> bool:
        if self._parser.get_method() != b"GET":
            return False
        for name, value in self._headers:
            if name == b"upgrade":
                return b"websocket" in value.lower()
        return False

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._body_size += len(body)
        if self._body_size > self.max_body_bytes:
            raise _Reject(413, f"request body exceeds {self.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = self._url
        qpos = url.find(b"?")
        if qpos >= 0:
            path, query = url[:qpos].decode("latin-1"), url[qpos + 1 :].decode("latin-1")
        else:
            path, query = url.decode("latin-1"), ""
        body = self._body
        req = (UpgradeRequest if self._upgrade else Request)(
            self._parser.get_method().decode("latin-1"),
            path,
            query,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
            self._keep_alive and not self._upgrade,
            self.client,
            self._http10,
        )
        self.events.append(req)
        self.state = IDLE
        self._reset()
