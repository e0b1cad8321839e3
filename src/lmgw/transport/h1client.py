"""Sans-IO HTTP/1.1 response reader on httptools, for the upstream (worker-facing) client.

:class:`ResponseReader` is fed socket bytes and exposes the status, headers and the body bytes
parsed so far. Body bytes are handed out in whatever groups the socket delivered them, so SSE
events that arrive together leave together (the relay writes each group in one send).

A chunked body (every streamed answer) is decoded by the compiled :mod:`.chunked` decoder
instead of httptools: httptools calls back into Python once per chunk, i.e. once per SSE event,
where the decoder takes a whole socket read in one call. The head still goes through httptools
(what is accepted or refused there does not change): ``on_headers_complete`` of a chunked answer
stops the parser, and the decoder takes the bytes after the head's blank line. Other bodies stay
with httptools at no extra cost, as does a chunked body after a head without CRLF CRLF.
"""

from __future__ import annotations

import functools

import httptools

from ..http.types import Headers
from .chunked import IMPLEMENTATION, ChunkedDecoder, ChunkedError

#: decode chunked bodies ourselves only when that is faster than httptools (the compiled one)
_FAST_CHUNKED = IMPLEMENTATION == "cython"


class UpstreamProtocolError(Exception):
    """The worker sent bytes that are not a valid HTTP/1.1 response."""


def build_request_head(
    method: str,
    path: str,
    host: bytes,
    headers: Headers,
    body_len: int | None,
    fixed: bytes = b"",
) -> bytes:
    """Request line and headers. ``body_len`` None means no body (GET). ``fixed``: header
    lines (each ending in CRLF) every request to this host carries, right after ``Host``
    (a data-parallel rank's ``X-data-parallel-rank``: :class:`~lmgw.transport.pool.Origin`)."""
    parts = [_request_line(method, path, host, fixed)]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    if body_len is not None:
        parts.append(b"content-length: %d\r\n\r\n" % body_len)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _request_line(method: str, path: str, host: bytes, fixed: bytes = b"") -> bytes:
    """The request line, Host header and the host's fixed headers: the same few per worker,
    so formatted once."""
    line = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode("latin-1"), host)
    return line + fixed if fixed else line


class _SwitchToDecoder(Exception):
    """Raised in ``on_headers_complete`` to stop httptools where a chunked body begins."""


class ResponseReader:
    """State of one response being read. Reusable: :meth:`reset` before the next request."""

    __slots__ = (
        "_chunked",
        "_conn_hdr",
        "_cut",
        "_feeding",
        "_head_tail",
        "_heads",
        "_parser",
        "_te",
        "body",
        "complete",
        "content_type",
        "headers",
        "headers_complete",
        "keep_alive",
        "status",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._chunked: ChunkedDecoder | None = None
        self.reset()

    def reset(self) -> None:
        if self._chunked is not None:  # httptools was stopped at that body: a fresh one
            self._parser = httptools.HttpResponseParser(self)
            self._chunked = None
        self._feeding = b""  # the bytes of the feed in progress
        self._heads = 0  # heads completed within it (interim ones included)
        self._head_tail = b""  # the last bytes of earlier feeds of an unfinished head
        self._cut = -1  # where the chunked body starts in ``_feeding``
        self._te = b""
        self.status = 0
        self.headers: Headers = []
        self.headers_complete = False
        self.complete = False
        self.keep_alive = False
        self.content_type = b""
        self._conn_hdr = b""
        self.body: list[bytes] = []

    def feed(self, data: bytes) -> None:
        dec = self._chunked
        if dec is not None:
            self._feed_chunked(dec, data)
            return
        self._feeding = data
        self._heads = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._feeding = b""
            cut = self._cut
            if cut >= 0:  # on_headers_complete stopped the parser: the body is ours
                self._cut = -1
                self._chunked = dec = ChunkedDecoder()
                if cut < len(data):
                    self._feed_chunked(dec, data[cut:])
                return
            if self.complete:
                # Bytes after a complete response (we never pipeline, so they answer nothing):
                # on_message_begin stopped the parser before they could touch this response.
                # Keep the response; never reuse the connection.
                self.keep_alive = False
                return
            raise UpstreamProtocolError(f"invalid response from worker: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise UpstreamProtocolError("worker switched protocols on an HTTP request") from None
        self._feeding = b""  # a pooled connection must not hold on to the last read
        if not self.headers_complete:  # a head split across reads (rare): keep its end
            self._head_tail = (self._head_tail + data[-3:])[-3:]

    def _body_offset(self) -> int:
        """Where the body of the head just completed starts in the current feed, or -1.

        Heads contain no CRLF CRLF and interim heads have no body, so the head completed
        ``_heads``-th in this feed ends at the ``_heads``-th (non-overlapping) CRLF CRLF of
        the feed, counting from the end of the earlier feeds' unfinished head. -1 when it is
        not there (a head that llhttp accepted with bare LFs): httptools then keeps the body."""
        tail = self._head_tail
        buf = tail + self._feeding if tail else self._feeding
        end = -4
        for _ in range(self._heads):
            end = buf.find(b"\r\n\r\n", end + 4)
            if end < 0:
                return -1
        cut = end + 4 - len(tail)
        return cut if 0 < cut <= len(self._feeding) else -1

    def _feed_chunked(self, dec: ChunkedDecoder, data: bytes) -> None:
        try:
            body = dec.feed(data)
        except ChunkedError as exc:
            raise UpstreamProtocolError(f"invalid response from worker: {exc}") from None
        if body:
            self.body.append(body)
        if dec.done:
            self.complete = True
            if dec.extra:  # bytes after the response: keep it, never reuse the connection
                self.keep_alive = False

    def feed_eof(self) -> None:
        """The worker closed the connection. A body delimited by close is complete now."""
        if self.headers_complete and not self.complete and self._read_until_close:
            self.complete = True
            self.keep_alive = False

    @property
    def _read_until_close(self) -> bool:
        return all(k not in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def take_body(self) -> bytes:
        """All body bytes parsed so far (and forget them)."""
        body = self.body
        if not body:
            return b""
        self.body = []
        return body[0] if len(body) == 1 else b"".join(body)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # a second message before reset(): stop here (see feed)
            raise UpstreamProtocolError("data after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"connection":
            self._conn_hdr = value.lower()
        elif name == b"content-type":
            self.content_type = value
        elif name == b"transfer-encoding":
            self._te = value.lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._parser
        self._heads += 1
        self.status = p.get_status_code()
        if self.status < 200:  # interim (100 Continue, 103 Early Hints): the final one follows
            self.headers = []
            self._conn_hdr = b""
            self.content_type = b""
            self._te = b""
            return
        self.keep_alive = (
            (b"close" not in self._conn_hdr)
            if p.get_http_version() == "1.1"
            else (b"keep-alive" in self._conn_hdr)
        )
        self.headers_complete = True
        te = self._te
        if (
            te
            and _FAST_CHUNKED
            and self.status not in (204, 304)  # no body, whatever the headers say
            and te.rsplit(b",", 1)[-1].strip() == b"chunked"
        ):
            cut = self._body_offset()
            if cut >= 0:
                self._cut = cut
                raise _SwitchToDecoder

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_complete:  # not for an interim response
            self.complete = True
