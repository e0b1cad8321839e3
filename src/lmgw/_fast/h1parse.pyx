# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Compiled twin of `h1parse_py.py` (read its docstring: what is accepted, and why this exists).

One pass over the head with a byte pointer: the request or status line, then each header line,
classified by 256-entry tables built from the twin's own character sets (so the two cannot
drift). Python objects are made only for what is returned. The header list is filled as the
lines are read: a None found after that (a chunked answer, say) wastes a few small objects, but
such a message goes through httptools anyway, which costs far more.

Same answers as the twin for every ``bytes`` ``data``; the limits must fit a ``Py_ssize_t``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp

from .h1parse_py import _MAX_LENGTH_DIGITS, _TARGET, _TOKEN, _VALUE

__all__ = ["parse_request", "parse_response"]

# bits of _CLASS: what a byte may be part of
cdef enum:
    TOKEN = 1  # a header name (tchar)
    VALUE = 2  # a header value or a reason phrase
    TARGET = 4  # a request target

cdef enum:
    SP = 32
    HTAB = 9
    CR = 13
    LF = 10

cdef unsigned char _CLASS[256]
cdef unsigned char _LOWER[256]  # what bytes.lower() makes of each byte (ASCII letters only)
cdef Py_ssize_t _MAX_DIGITS = _MAX_LENGTH_DIGITS


cdef void _mark(bytes members, unsigned char bit):
    # by an unsigned pointer: iterating over bytes gives C chars, negative past 127 here
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(members)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(members)):
        _CLASS[b[i]] |= bit


cdef void _build_tables():
    cdef int i
    for i in range(256):
        _CLASS[i] = 0
        _LOWER[i] = i + 32 if 65 <= i <= 90 else i
    _mark(_TOKEN, TOKEN)
    _mark(_VALUE, VALUE)
    _mark(_TARGET, TARGET)


_build_tables()


cdef struct Fields:
    Py_ssize_t body  # where the body starts: after the blank line
    Py_ssize_t length  # Content-Length, -1 without one
    Py_ssize_t counted  # H1Connection's count of the headers: name + value + 4 each
    Py_ssize_t conn_start  # the last Connection value is p[conn_start:conn_end] (empty: none)
    Py_ssize_t conn_end
    Py_ssize_t ctype  # index in the list of the last Content-Type header, -1 without one


cdef list _fields(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, Fields* f):
    """The header lines from ``pos`` through the blank line, all before ``end``: the headers
    (names lower-cased) and ``f`` filled in; None as `h1parse_py._fields` would answer it.

    A name is the token bytes up to the first other byte, which must be ":"; a value is the
    value bytes after leading OWS up to the first other byte, which must start the CRLF. (The
    twin finds the CRLF and the colon first, then checks the bytes between: the same thing,
    since neither CR nor ":" is a token byte and CR is no value byte.)
    """
    cdef list headers = []
    cdef Py_ssize_t start, colon, vs, ve, n, i, length
    cdef bytes name
    cdef char* low
    f.length = -1
    f.counted = 0
    f.conn_start = f.conn_end = 0
    f.ctype = -1
    while True:
        if pos + 1 < end and p[pos] == CR and p[pos + 1] == LF:  # the blank line
            f.body = pos + 2
            return headers
        start = pos
        while pos < end and _CLASS[p[pos]] & TOKEN:
            pos += 1
        if pos == start or pos == end or p[pos] != 58:  # 58: ":"
            return None
        colon = pos
        pos += 1
        while pos < end and (p[pos] == SP or p[pos] == HTAB):
            pos += 1
        vs = pos
        while pos < end and _CLASS[p[pos]] & VALUE:
            pos += 1
        if pos + 1 >= end or p[pos] != CR or p[pos + 1] != LF:
            return None  # a CTL or a bare CR/LF in the value, or no line end before ``end``
        ve = pos
        if ve > vs and (p[ve - 1] == SP or p[ve - 1] == HTAB):
            return None  # trailing whitespace: llhttp keeps it, the twin leaves it to llhttp
        pos += 2

        n = colon - start
        name = PyBytes_FromStringAndSize(NULL, n)
        low = PyBytes_AS_STRING(name)
        for i in range(n):
            low[i] = _LOWER[p[start + i]]
        # the names that change the framing or the answer, by length first
        if n == 14 and memcmp(low, b"content-length", 14) == 0:
            if f.length >= 0 or ve == vs or ve - vs > _MAX_DIGITS:
                return None  # a second one, an empty one or one too long
            length = 0
            for i in range(vs, ve):
                if p[i] < 48 or p[i] > 57:
                    return None  # not all ASCII digits
                length = length * 10 + (p[i] - 48)
            f.length = length
        elif n == 10 and memcmp(low, b"connection", 10) == 0:
            f.conn_start = vs
            f.conn_end = ve
        elif n == 12 and memcmp(low, b"content-type", 12) == 0:
            f.ctype = len(headers)
        elif (
            (n == 17 and memcmp(low, b"transfer-encoding", 17) == 0)
            or (n == 7 and memcmp(low, b"upgrade", 7) == 0)
            or (n == 6 and memcmp(low, b"expect", 6) == 0)
        ):
            return None
        headers.append((name, PyBytes_FromStringAndSize(<char*>p + vs, ve - vs)))
        f.counted += n + (ve - vs) + 4


cdef inline bint _has_close(const unsigned char* p, Py_ssize_t start, Py_ssize_t end) noexcept:
    """``b"close" in p[start:end].lower()``."""
    cdef Py_ssize_t i
    for i in range(start, end - 4):
        if (
            _LOWER[p[i]] == 99  # c
            and _LOWER[p[i + 1]] == 108  # l
            and _LOWER[p[i + 2]] == 111  # o
            and _LOWER[p[i + 3]] == 115  # s
            and _LOWER[p[i + 4]] == 101  # e
        ):
            return True
    return False


def parse_request(bytes data not None, Py_ssize_t max_head, Py_ssize_t max_body):
    """See `h1parse_py.parse_request`."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t end, pos, target_start, length
    cdef Fields f
    cdef str method
    cdef list headers
    if max_head < 0:
        return None
    # the whole head, blank line included, lies in the first max_head + 4 bytes (the twin's
    # find() window), so nothing past them is looked at
    end = n if max_head >= n - 4 else max_head + 4
    if end >= 4 and memcmp(p, b"GET ", 4) == 0:
        method = "GET"
        pos = 4
    elif end >= 5 and memcmp(p, b"POST ", 5) == 0:
        method = "POST"
        pos = 5
    else:
        return None
    # origin-form target: "/" then target bytes up to the first other byte, which must start
    # " HTTP/1.1" CRLF (a space, CR and LF are no target bytes)
    target_start = pos
    if pos == end or p[pos] != 47:  # 47: "/"
        return None
    while pos < end and _CLASS[p[pos]] & TARGET:
        pos += 1
    if end - pos < 11 or memcmp(p + pos, b" HTTP/1.1\r\n", 11) != 0:
        return None
    headers = _fields(p, pos + 11, end, &f)
    # H1Connection also counts the target plus each header's name + value + 4 against max_head
    # (431 past it): that count can pass it first with many short headers
    if headers is None or pos - target_start + f.counted > max_head:
        return None
    length = f.length if f.length >= 0 else 0
    if length > max_body or n - f.body != length:
        return None
    return (
        method,
        PyBytes_FromStringAndSize(<char*>p + target_start, pos - target_start),
        headers,
        PyBytes_FromStringAndSize(<char*>p + f.body, length),
        not _has_close(p, f.conn_start, f.conn_end),
        n,
    )


def parse_response(bytes data not None):
    """See `h1parse_py.parse_response`."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos
    cdef int status
    cdef Fields f
    cdef list headers
    # the shortest status line with its CRLF is 14 bytes ("HTTP/1.1 200" CRLF)
    if n < 14 or memcmp(p, b"HTTP/1.1 ", 9) != 0:
        return None
    if not (48 <= p[9] <= 57 and 48 <= p[10] <= 57 and 48 <= p[11] <= 57):
        return None
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    if status < 200 or status == 204 or status == 304:
        return None  # interim, or no body whatever the headers say
    if p[12] == SP:  # a reason phrase: value bytes up to the CRLF
        pos = 13
        while pos < n and _CLASS[p[pos]] & VALUE:
            pos += 1
    elif p[12] == CR:  # none: the CRLF right after the code
        pos = 12
    else:
        return None
    if n - pos < 2 or p[pos] != CR or p[pos + 1] != LF:
        return None
    headers = _fields(p, pos + 2, n, &f)
    # no Content-Length (no headers at all included): httptools reads until close or chunks
    if headers is None or f.length < 0 or n - f.body != f.length:
        return None
    return (
        status,
        headers,
        headers[f.ctype][1] if f.ctype >= 0 else b"",
        not _has_close(p, f.conn_start, f.conn_end),
        PyBytes_FromStringAndSize(<char*>p + f.body, f.length),
    )
