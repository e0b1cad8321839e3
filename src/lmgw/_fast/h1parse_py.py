"""Pure-Python twin of :mod:`lmgw._fast.h1parse`: whole simple HTTP/1.1 messages in one call.

Why: on the data plane nearly every message is small and arrives whole in one read, yet
httptools calls back into Python for the URL, every header, the head's end, the body and the
message's end (about ten calls and their state updates per message, in each direction). These
functions take such a message in one call and answer ``None`` for anything else, which then
goes through httptools as before, so what is accepted or refused does not change: they accept
a strict subset of what llhttp accepts (the tests check both agree on it) and never refuse.

Accepted: HTTP/1.1 only; ``Content-Length`` framing (or no body); header names of token
characters; values of visible characters, spaces and tabs (none trailing: llhttp keeps those
in the value; no obs-fold); CRLF line ends; a head within ``max_head`` by H1Connection's count.
Everything else (chunked bodies, upgrades, ``Expect``, HTTP/1.0, interim responses, a message
that is not complete yet, a request with bytes after it) is ``None``.
"""

from __future__ import annotations

#: tchar (RFC 9110 5.6.2): what a header name (and a method) may hold
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: field-vchar, SP and HTAB (RFC 9110 5.5), obs-text included: what a header value may hold
_VALUE = bytes([9, *range(32, 127), *range(128, 256)])
#: what a request target may hold here (RFC 3986 unreserved, reserved but "#", and "%")
_TARGET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?[]@!$&'()*+,;=%"
_METHODS = (b"POST", b"GET")
_MAX_LENGTH_DIGITS = 15

Headers = list[tuple[bytes, bytes]]
#: method, target, headers, body, keep_alive, bytes used
RequestParts = tuple[str, bytes, Headers, bytes, bool, int]
#: status, headers, content type, keep_alive, body
ResponseParts = tuple[int, Headers, bytes, bool, bytes]


def _fields(data: bytes, start: int, end: int) -> tuple[Headers, int, bytes, bytes] | None:
    """The header lines in ``data[start:end]`` (each ending CRLF): headers with lower-case
    names, the content length (-1: none), the last Connection value lower-cased and the last
    Content-Type; None when a header is malformed or makes the message one for httptools."""
    headers: Headers = []
    length = -1
    connection = b""
    content_type = b""
    pos = start
    while pos < end:
        eol = data.find(b"\r\n", pos, end)
        colon = data.find(b":", pos, eol)
        if colon <= pos:
            return None
        name = data[pos:colon]
        value = data[colon + 1 : eol].lstrip(b" \t")
        if name.translate(None, _TOKEN) or value.translate(None, _VALUE):
            return None
        if value.endswith((b" ", b"\t")):
            return None  # llhttp strips only the leading OWS: the value would differ
        name = name.lower()
        if name == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                return None
            length = int(value)
        elif name == b"connection":
            connection = value.lower()
        elif name == b"content-type":
            content_type = value
        elif name in (b"transfer-encoding", b"upgrade", b"expect"):
            return None
        headers.append((name, value))
        pos = eol + 2
    return headers, length, connection, content_type


def parse_request(data: bytes, max_head: int, max_body: int) -> RequestParts | None:
    """One whole request at the start of ``data`` that ends where ``data`` ends, within the
    limits (over one: None, and httptools answers 431/413), else None."""
    head_end = data.find(b"\r\n\r\n", 0, max_head + 4)
    if head_end < 0 or head_end > max_head:
        return None
    sp1 = data.find(b" ", 0, 8)
    method = data[:sp1]
    if method not in _METHODS:
        return None
    line_end = data.find(b"\r\n", sp1)
    if data[line_end - 9 : line_end] != b" HTTP/1.1":
        return None
    target = data[sp1 + 1 : line_end - 9]
    if not target.startswith(b"/") or target.translate(None, _TARGET):
        return None
    if line_end == head_end:
        fields: tuple[Headers, int, bytes, bytes] | None = ([], -1, b"", b"")
    else:
        fields = _fields(data, line_end + 2, head_end + 2)
    if fields is None:
        return None
    headers, length, connection, _ = fields
    # H1Connection counts a head as its target plus name, value and 4 per header and answers 431
    # past max_head. That count passes head_end only past 13 headers (the request line has 13
    # bytes more than its target, a header line at most 1 less than its count): short ones
    if len(headers) > 13 and len(target) + sum(len(n) + len(v) + 4 for n, v in headers) > max_head:
        return None
    body_start = head_end + 4
    if length < 0:
        length = 0
    if length > max_body or len(data) != body_start + length:
        return None
    keep_alive = b"close" not in connection
    return (
        method.decode("latin-1"),
        target,
        headers,
        data[body_start:] if length else b"",
        keep_alive,
        body_start + length,
    )


def parse_response(data: bytes) -> ResponseParts | None:
    """One whole final response with a ``Content-Length`` body that ends where ``data`` ends,
    else None."""
    if not data.startswith(b"HTTP/1.1 "):
        return None
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    code = data[9:12]
    if not code.isdigit() or (data[12:13] != b" " and data[12:14] != b"\r\n"):
        return None
    status = int(code)
    if status < 200 or status in (204, 304):
        return None
    line_end = data.find(b"\r\n", 9)
    if data[13:line_end].translate(None, _VALUE):
        return None
    if line_end == head_end:
        return None  # no Content-Length
    fields = _fields(data, line_end + 2, head_end + 2)
    if fields is None:
        return None
    headers, length, connection, content_type = fields
    body_start = head_end + 4
    if length < 0 or len(data) != body_start + length:
        return None
    return status, headers, content_type, b"close" not in connection, data[body_start:]
