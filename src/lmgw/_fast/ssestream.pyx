# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Compiled twin of `ssestream_py.py` (read its docstring): one call per read of a streamed
answer, the event cut and the client's chunk built in C.

The compiled lane calls :meth:`SseStream.feed` once per socket read of every stream it relays
(a paced engine: once per token), so what the twin does in a dozen bytecode steps (the
decoder, the last event's end, the count, the chunk's framing) is one C function here.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from .chunked import ChunkedDecoder, count_events

__all__ = ["SseStream"]

cdef bytes _END = b"0\r\n\r\n"
cdef const char* _HEX = b"0123456789abcdef"


cdef Py_ssize_t _split_complete(const char* p, Py_ssize_t n) noexcept nogil:
    """`lmgw.transport.sse.split_complete`: the end of the last event (``\\n\\n`` or
    ``\\n\\r\\n``), 0 without one."""
    cdef Py_ssize_t i = n - 1
    while i >= 1:
        if p[i] == 10:
            if p[i - 1] == 10:
                return i + 1
            if i >= 2 and p[i - 1] == 13 and p[i - 2] == 10:
                return i + 1
        i -= 1
    return 0


cdef bytes _frame(const char* p, Py_ssize_t n):
    """``n`` bytes at ``p`` as one HTTP chunk."""
    cdef char digits[16]
    cdef int k = 0
    cdef Py_ssize_t v = n
    cdef bytes out
    cdef char* o
    while True:
        digits[k] = _HEX[v & 15]
        k += 1
        v >>= 4
        if v == 0:
            break
    out = PyBytes_FromStringAndSize(NULL, k + 2 + n + 2)
    o = PyBytes_AS_STRING(out)
    for v in range(k):
        o[v] = digits[k - 1 - v]
    o[k] = 13
    o[k + 1] = 10
    memcpy(o + k + 2, p, n)
    o[k + 2 + n] = 13
    o[k + 3 + n] = 10
    return out


cdef class SseStream:
    """See `ssestream_py.SseStream` (the same attributes and behaviour)."""

    cdef public object decoder, journal, tap
    cdef public double stall_s
    cdef public bytes pending
    cdef public Py_ssize_t events, kept
    cdef public bint started, done, keep
    cdef object _fold
    cdef Py_ssize_t _fold_at

    def __init__(self, double stall_s=0.0, journal=None, tap=None):
        self.decoder = ChunkedDecoder()
        self.stall_s = stall_s
        self.journal = journal
        self.tap = tap
        self.pending = b""
        self.events = 0
        self.kept = 0
        self.started = False
        self.done = False
        self.keep = True
        self._fold = getattr(journal, "fold", None) if journal is not None else None
        self._fold_at = journal.fold_bytes if self._fold is not None else 0

    cpdef bytes feed(self, bytes data):
        """See `ssestream_py.SseStream.feed`."""
        cdef bytes payload = self.decoder.feed(data)
        cdef bytes out = b""
        cdef bytes held, whole, rest
        cdef Py_ssize_t n, cut
        cdef const char* p
        if PyBytes_GET_SIZE(payload):
            self.started = True
            if self.journal is not None:
                self.journal.append(payload)
                self.kept += PyBytes_GET_SIZE(payload)
                if self._fold is not None and self.kept >= self._fold_at:
                    self._fold()
                    self.kept = 0
            held = self.pending + payload if PyBytes_GET_SIZE(self.pending) else payload
            n = PyBytes_GET_SIZE(held)
            p = PyBytes_AS_STRING(held)
            if n >= 2 and p[n - 1] == 10 and p[n - 2] == 10:
                cut = n
            else:
                cut = _split_complete(p, n)
            if cut:
                whole = held if cut == n else held[:cut]
                self.pending = b"" if cut == n else held[cut:]
                self.events += count_events(whole)
                if self.tap is not None:
                    whole = self.tap(whole)
                if PyBytes_GET_SIZE(whole):
                    out = _frame(PyBytes_AS_STRING(whole), PyBytes_GET_SIZE(whole))
            else:
                self.pending = held
        if self.decoder.done:
            self.done = True
            rest = self.pending
            self.pending = b""
            if PyBytes_GET_SIZE(rest):
                out += _frame(PyBytes_AS_STRING(rest), PyBytes_GET_SIZE(rest))
            out += _END
        return out
