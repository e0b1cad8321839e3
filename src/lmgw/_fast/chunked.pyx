# cython: boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of `chunked_py.py` (read its docstring: the grammar and why this exists).

One call per socket read: the size lines are walked byte by byte (a few bytes each), chunk
data is copied with memcpy into one output buffer. ``count_events`` finds newlines with memchr.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcpy

from .chunked_py import MAX_LINE, MAX_TRAILERS, ChunkedError

__all__ = ["MAX_LINE", "MAX_TRAILERS", "ChunkedDecoder", "ChunkedError", "count_events"]

cdef enum:
    S_SIZE = 0
    S_EXT
    S_SIZE_LF
    S_DATA
    S_DATA_CR
    S_DATA_LF
    S_TRAILER
    S_TRAILER_LF
    S_DONE

cdef Py_ssize_t _MAX_LINE = MAX_LINE
cdef Py_ssize_t _MAX_TRAILERS = MAX_TRAILERS


cdef inline int _hex(unsigned char c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


def count_events(bytes data not None) -> int:
    """``data.count(b"\\n\\n")`` (non-overlapping, left to right), by memchr."""
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef const char* end = p + PyBytes_GET_SIZE(data)
    cdef const char* hit
    cdef Py_ssize_t count = 0
    while p < end:
        hit = <const char*>memchr(p, 10, end - p)
        if hit == NULL:
            break
        if hit + 1 < end and hit[1] == 10:
            count += 1
            p = hit + 2
        else:
            p = hit + 1
    return count


cdef class ChunkedDecoder:
    """See `chunked_py.ChunkedDecoder`."""

    cdef int _state
    cdef unsigned long long _left
    cdef int _digits
    cdef Py_ssize_t _line
    cdef Py_ssize_t _trailer_bytes
    cdef char* _buf
    cdef Py_ssize_t _cap
    cdef public Py_ssize_t chunks
    cdef public bint extra

    def __cinit__(self):
        self._state = S_SIZE
        self._left = 0
        self._digits = 0
        self._line = 0
        self._trailer_bytes = 0
        self._buf = NULL
        self._cap = 0
        self.chunks = 0
        self.extra = False

    def __dealloc__(self):
        free(self._buf)

    @property
    def done(self) -> bool:
        return self._state == S_DONE

    def feed(self, bytes data not None) -> bytes:
        """The payload ``data`` completes (b"" if none). Raises ChunkedError on bad framing."""
        cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t outn = 0
        cdef Py_ssize_t take
        cdef unsigned char c
        cdef int digit
        cdef int state = self._state
        cdef char* grown
        # the payload of this read is at most its length: one buffer, grown rarely
        if n > self._cap:
            grown = <char*>realloc(self._buf, n)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = n
        while i < n:
            if state == S_DATA:
                take = n - i
                if <unsigned long long>take > self._left:
                    take = <Py_ssize_t>self._left
                memcpy(self._buf + outn, src + i, take)
                outn += take
                i += take
                self._left -= take
                if self._left == 0:
                    state = S_DATA_CR
                continue
            c = src[i]
            i += 1
            if state == S_SIZE:
                self._line += 1
                if self._line > _MAX_LINE:
                    self._state = state
                    raise ChunkedError("chunk-size line too long")
                digit = _hex(c)
                if digit >= 0:
                    if self._digits == 15:
                        self._state = state
                        raise ChunkedError("chunk size too large")
                    self._left = self._left * 16 + digit
                    self._digits += 1
                elif self._digits == 0:
                    self._state = state
                    raise ChunkedError("chunk size expected")
                elif c == 59:
                    state = S_EXT
                elif c == 13:
                    state = S_SIZE_LF
                else:
                    self._state = state
                    raise ChunkedError("invalid character in chunk size")
            elif state == S_EXT:
                self._line += 1
                if self._line > _MAX_LINE:
                    self._state = state
                    raise ChunkedError("chunk-size line too long")
                if c == 13:
                    state = S_SIZE_LF
                elif c == 10:
                    self._state = state
                    raise ChunkedError("bare LF in chunk-size line")
            elif state == S_SIZE_LF:
                if c != 10:
                    self._state = state
                    raise ChunkedError("CRLF expected after the chunk size")
                self._line = 0
                self._digits = 0
                if self._left == 0:
                    state = S_TRAILER
                else:
                    self.chunks += 1
                    state = S_DATA
            elif state == S_DATA_CR:
                if c != 13:
                    self._state = state
                    raise ChunkedError("CRLF expected after chunk data")
                state = S_DATA_LF
            elif state == S_DATA_LF:
                if c != 10:
                    self._state = state
                    raise ChunkedError("CRLF expected after chunk data")
                state = S_SIZE
            elif state == S_TRAILER:
                self._trailer_bytes += 1
                if self._trailer_bytes > _MAX_TRAILERS:
                    self._state = state
                    raise ChunkedError("trailer section too long")
                if c == 13:
                    state = S_TRAILER_LF
                elif c == 10:
                    self._state = state
                    raise ChunkedError("bare LF in the trailer section")
                else:
                    self._line += 1
            elif state == S_TRAILER_LF:
                if c != 10:
                    self._state = state
                    raise ChunkedError("CRLF expected in the trailer section")
                if self._line == 0:
                    state = S_DONE
                    if i < n:
                        self.extra = True
                    break
                self._line = 0
                state = S_TRAILER
            else:
                self.extra = True
                break
        self._state = state
        if outn == 0:
            return b""
        return PyBytes_FromStringAndSize(self._buf, outn)
