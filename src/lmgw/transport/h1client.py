"""Sans-IO HTTP/1.1 response reader on httptools, for the upstream (worker-facing) client.

:class:`ResponseReader` is fed socket bytes and exposes the status, headers and the body bytes
parsed so far. Body bytes are handed out in whatever groups the socket delivered them, so SSE
events that arrive together leave together (the relay writes each group in one send).
"""

from __future__ import annotations

import functools

import httptools

from ..http.types import Headers


class UpstreamProtocolError(Exception):
    """The worker sent bytes that are not a valid HTTP/1.1 response."""


def build_request_head(
    method: str, path: str, host: bytes, headers: Headers, body_len: int | None
) -> bytes:
    """Request line and headers. ``body_len`` None means no body (GET)."""
    parts = [_request_line(method, path, host)]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    if body_len is not None:
        parts.append(b"content-length: %d\r\n\r\n" % body_len)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _request_line(method: str, path: str, host: bytes) -> bytes:
    """The request line and Host header: the same few per worker, so formatted once."""
    return b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode("latin-1"), host)


class ResponseReader:
    """State of one response being read. Reusable: :meth:`reset` before the next request."""

    __slots__ = (
        "_conn_hdr",
        "_parser",
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
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.headers_complete = False
        self.complete = False
        self.keep_alive = False
        self.content_type = b""
        self._conn_hdr = b""
        self.body: list[bytes] = []

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:
                # Bytes after a complete response (we never pipeline, so they answer nothing):
                # on_message_begin stopped the parser before they could touch this response.
                # Keep the response; never reuse the connection.
                self.keep_alive = False
                return
            raise UpstreamProtocolError(f"invalid response from worker: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise UpstreamProtocolError("worker switched protocols on an HTTP request") from None

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
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._parser
        self.status = p.get_status_code()
        if self.status < 200:  # interim (100 Continue, 103 Early Hints): the final one follows
            self.headers = []
            self._conn_hdr = b""
            self.content_type = b""
            return
        self.keep_alive = (
            (b"close" not in self._conn_hdr)
            if p.get_http_version() == "1.1"
            else (b"keep-alive" in self._conn_hdr)
        )
        self.headers_complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_complete:  # not for an interim response
            self.complete = True
