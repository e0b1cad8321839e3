# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
# distutils: define_macros=_GNU_SOURCE=1
"""Compiled twin of `relay_py.py`: the compiled lane's event loop (read that docstring first).

One epoll set holds the lane's client connections and its upstream connections. Each
:meth:`Relay.run` takes every ready event in one ``epoll_wait`` and does the reads, framing and
writes in C; Python runs only where the gateway decides something (a request's admission and
route, an answer's accounting and head): one call each. Connections are arrays indexed by fd;
an event carries the fd and a generation, so a stale event for a reused fd is dropped.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from libc.errno cimport EAGAIN, EINPROGRESS, EINTR, errno
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

cdef extern from "string.h":
    void* memmem(const void* hay, size_t hl, const void* needle, size_t nl) nogil

cdef extern from "unistd.h":
    int close(int fd) nogil

cdef extern from "sys/epoll.h":
    ctypedef union epoll_data_t:
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags) nogil
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event) nogil
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout) nogil
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "sys/socket.h":
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        pass
    ssize_t recv(int fd, void* buf, size_t n, int flags) nogil
    ssize_t send(int fd, const void* buf, size_t n, int flags) nogil
    int socket(int domain, int type, int protocol) nogil
    int connect(int fd, const sockaddr* addr, socklen_t alen) nogil
    int setsockopt(int fd, int level, int name, const void* val, socklen_t vlen) nogil
    int getsockopt(int fd, int level, int name, void* val, socklen_t* vlen) nogil
    int shutdown(int fd, int how) nogil
    enum:
        MSG_NOSIGNAL
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        SHUT_RDWR

cdef extern from "netinet/in.h":
    enum:
        IPPROTO_TCP

cdef extern from "netinet/tcp.h":
    enum:
        TCP_NODELAY

from . import relay_py as _twin
from .relay_py import _log

__all__ = ["Relay", "request_frame", "response_frame", "stream_head"]

cdef enum:
    # the twin's values (checked below): frame results and failure kinds
    MORE = 0
    NOT_OURS = -1
    WHOLE = 1
    HANDOFF = 2
    STREAM = 3
    BAD = 4
    CONNECT = 1
    LOCAL = 2
    DROPPED = 3
    TIMEOUT = 4
    PROTOCOL = 5
    ABORTED = 6
    CONNECT_TIMEOUT = 7
    DEADLINE = 8
    SIDE = 9
    CANCELLED = 10

assert (MORE, NOT_OURS, WHOLE, HANDOFF, STREAM, BAD) == (
    _twin.MORE, _twin.NOT_OURS, _twin.WHOLE, _twin.HANDOFF, _twin.STREAM, _twin.BAD
)
assert (CONNECT, LOCAL, DROPPED, TIMEOUT, PROTOCOL, ABORTED, CONNECT_TIMEOUT, DEADLINE, SIDE,
        CANCELLED) == (
    _twin.CONNECT, _twin.LOCAL, _twin.DROPPED, _twin.TIMEOUT, _twin.PROTOCOL, _twin.ABORTED,
    _twin.CONNECT_TIMEOUT, _twin.DEADLINE, _twin.SIDE, _twin.CANCELLED,
)

cdef enum:
    MAXEV = 256
    FREE = 0
    CLIENT = 1
    UPSTREAM = 2
    # client states
    C_IDLE = 0  # reading requests
    C_WAIT = 1  # a request upstream
    C_WRITE = 2  # writing an answer
    C_STREAM = 3  # relaying a streamed answer
    # upstream states
    U_CONNECT = 0
    U_SEND = 1
    U_WAIT = 2
    U_IDLE = 3
    U_STREAM = 4  # its streamed answer's body
    # head flags
    F_CHUNKED = 1
    F_CLOSE = 2
    F_EXPECT = 4
    F_BAD = 8  # duplicate or malformed Content-Length: not ours to judge
    F_UPGRADE = 16

cdef Py_ssize_t PIPELINE_CAP = 1 << 20  # client bytes read ahead while a request is upstream
cdef Py_ssize_t RESPONSE_HEAD_CAP = 1 << 16
cdef int PARK = _twin.PARK  # a plan's slot that parks the request (Relay.resume)
cdef Py_ssize_t STREAM_HIGH = _twin.STREAM_HIGH  # untaken stream bytes before the worker waits
cdef Py_ssize_t PUSH_MAX = _twin.PUSH_MAX  # untaken pushed bytes before the client is gone
cdef Py_ssize_t BURST_EVENTS = _twin.BURST_EVENTS  # events in one read that make it a burst
cdef double BURST_WAIT_S = _twin.BURST_WAIT_S  # how long a burst on a busy loop is not read


cdef inline unsigned char _low(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef bint _name_is(const unsigned char* p, Py_ssize_t n, const char* name, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i
    if n != k:
        return False
    for i in range(k):
        if _low(p[i]) != <unsigned char>name[i]:
            return False
    return True


cdef Py_ssize_t _scan_head(const unsigned char* p, Py_ssize_t line, Py_ssize_t head_end, int* flags) noexcept nogil:
    """The header lines from ``line`` to ``head_end`` (the blank line's CR): the
    Content-Length (-1 without one) and ``flags``."""
    cdef Py_ssize_t length = -1, eol, colon, vs, ve, i, v
    cdef int seen_length = 0
    flags[0] = 0
    while line < head_end:
        eol = line
        while eol < head_end and p[eol] != 13:
            eol += 1
        colon = line
        while colon < eol and p[colon] != 58:
            colon += 1
        if colon < eol:
            vs = colon + 1
            while vs < eol and (p[vs] == 32 or p[vs] == 9):
                vs += 1
            ve = eol
            while ve > vs and (p[ve - 1] == 32 or p[ve - 1] == 9):
                ve -= 1
            if _name_is(p + line, colon - line, "content-length", 14):
                if seen_length or ve == vs or ve - vs > 18:
                    flags[0] |= F_BAD
                seen_length = 1
                v = 0
                for i in range(vs, ve):
                    if p[i] < 48 or p[i] > 57:
                        flags[0] |= F_BAD
                        break
                    v = v * 10 + (p[i] - 48)
                length = v
            elif _name_is(p + line, colon - line, "transfer-encoding", 17):
                flags[0] |= F_CHUNKED
            elif _name_is(p + line, colon - line, "connection", 10):
                for i in range(vs, ve - 4):
                    if (_low(p[i]) == 99 and _low(p[i + 1]) == 108 and _low(p[i + 2]) == 111
                            and _low(p[i + 3]) == 115 and _low(p[i + 4]) == 101):
                        flags[0] |= F_CLOSE
                        break
            elif _name_is(p + line, colon - line, "expect", 6):
                flags[0] |= F_EXPECT
            elif _name_is(p + line, colon - line, "upgrade", 7):
                flags[0] |= F_UPGRADE
        line = eol + 2
    return length


cdef inline Py_ssize_t _head_fields(const unsigned char* p, Py_ssize_t head_end, int* flags) noexcept nogil:
    """The header lines after a head's first line (:func:`_scan_head`): the Content-Length
    (-1 without one) and ``flags``."""
    cdef Py_ssize_t first = 0
    while first < head_end and p[first] != 13:
        first += 1
    return _scan_head(p, first + 2, head_end, flags)


cdef Py_ssize_t _request_frame(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head, Py_ssize_t max_body) noexcept nogil:
    cdef Py_ssize_t window = n if n < max_head + 4 else max_head + 4
    cdef const unsigned char* h = <const unsigned char*>memmem(p, window, b"\r\n\r\n", 4)
    cdef Py_ssize_t head_end, length
    cdef int flags
    if h == NULL:
        return MORE if n < max_head + 4 else NOT_OURS
    head_end = h - p
    length = _head_fields(p, head_end, &flags)
    if flags & (F_CHUNKED | F_EXPECT | F_BAD | F_UPGRADE):
        return NOT_OURS
    if length < 0:
        length = 0
    if length > max_body:
        return NOT_OURS
    if n < head_end + 4 + length:
        return MORE
    return head_end + 4 + length


cdef Py_ssize_t _response_head(const unsigned char* p, Py_ssize_t n, int* status) noexcept nogil:
    """Where an answer's head ends (-1: not whole yet) and its status (-1: not an HTTP/1.1
    status line)."""
    cdef const unsigned char* h = <const unsigned char*>memmem(p, n, b"\r\n\r\n", 4)
    cdef Py_ssize_t head_end
    status[0] = -1
    if h == NULL:
        return -1
    head_end = h - p
    if head_end < 12 or memcmp(p, b"HTTP/1.1 ", 9) != 0:
        return head_end
    if not (48 <= p[9] <= 57 and 48 <= p[10] <= 57 and 48 <= p[11] <= 57):
        return head_end
    status[0] = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    return head_end


cdef Py_ssize_t _response_frame(const unsigned char* p, Py_ssize_t n, Py_ssize_t cap, int* kind, int* keep) noexcept nogil:
    cdef Py_ssize_t head_end, length
    cdef int flags, status
    keep[0] = 0
    head_end = _response_head(p, n, &status)
    if head_end < 0:
        kind[0] = MORE if n < RESPONSE_HEAD_CAP else HANDOFF
        return 0
    kind[0] = HANDOFF
    if status < 200 or status >= 400 or status == 204 or status == 304:
        return 0
    length = _head_fields(p, head_end, &flags)
    if flags & (F_CHUNKED | F_BAD) or length < 0 or length > cap:
        return 0
    keep[0] = not (flags & F_CLOSE)
    if n < head_end + 4 + length:
        kind[0] = MORE
        return 0
    kind[0] = WHOLE
    return head_end + 4 + length


cdef Py_ssize_t _stream_head(const unsigned char* p, Py_ssize_t n, int* kind, int* keep) noexcept nogil:
    cdef Py_ssize_t head_end, length
    cdef int flags, status
    keep[0] = 0
    head_end = _response_head(p, n, &status)
    if head_end < 0:
        kind[0] = MORE if n < RESPONSE_HEAD_CAP else HANDOFF
        return 0
    kind[0] = HANDOFF
    if status < 200 or status >= 300 or status == 204:
        return 0
    length = _head_fields(p, head_end, &flags)
    if flags & F_BAD or not flags & F_CHUNKED or length >= 0:
        return 0
    keep[0] = not (flags & F_CLOSE)
    kind[0] = STREAM
    return head_end + 4


cdef Py_ssize_t _chunked_end(const unsigned char* p, Py_ssize_t n, Py_ssize_t at) noexcept nogil:
    """See `relay_py._chunked_end`: where a chunked body from ``at`` ends; 0 while it is not
    whole, -1 when its framing is wrong."""
    cdef const unsigned char* h
    cdef Py_ssize_t eol, s, e, size, digits, i
    cdef unsigned char ch
    while True:
        h = <const unsigned char*>memmem(p + at, n - at, b"\r\n", 2)
        if h == NULL:
            return MORE if n - at < 1024 else -1
        eol = h - p
        e = at
        while e < eol and p[e] != 59:  # ';': a chunk extension
            e += 1
        s = at
        while s < e and (p[s] == 32 or p[s] == 9):
            s += 1
        while e > s and (p[e - 1] == 32 or p[e - 1] == 9):
            e -= 1
        digits = e - s
        if digits == 0 or digits > 15:
            return -1
        size = 0
        for i in range(s, e):
            ch = p[i]
            if 48 <= ch <= 57:
                size = size * 16 + (ch - 48)
            elif 97 <= _low(ch) <= 102:
                size = size * 16 + (_low(ch) - 87)
            else:
                return -1
        at = eol + 2
        if size == 0:
            break
        if n < at + size + 2:
            return MORE
        if p[at + size] != 13 or p[at + size + 1] != 10:
            return -1
        at += size + 2
    while True:  # trailers, up to an empty line
        h = <const unsigned char*>memmem(p + at, n - at, b"\r\n", 2)
        if h == NULL:
            return MORE if n - at < 8192 else -1
        eol = h - p
        if eol == at:
            return eol + 2
        at = eol + 2


cdef Py_ssize_t _side_frame(const unsigned char* p, Py_ssize_t n, Py_ssize_t cap, bint eof, int* kind, int* keep) noexcept nogil:
    cdef Py_ssize_t head_end, length, start, stop
    cdef int flags, status
    keep[0] = 0
    head_end = _response_head(p, n, &status)
    if head_end < 0:
        kind[0] = MORE if n < RESPONSE_HEAD_CAP else BAD
        return 0
    kind[0] = BAD
    if status < 0:
        return 0
    length = _head_fields(p, head_end, &flags)
    start = head_end + 4
    if flags & F_BAD or (flags & F_CHUNKED and length >= 0):
        return 0
    keep[0] = not (flags & F_CLOSE)
    if status < 200 or status == 204 or status == 304:
        kind[0] = WHOLE
        return start
    if flags & F_CHUNKED:
        stop = _chunked_end(p, n, start)
        if stop < 0 or stop - start > cap:
            keep[0] = 0
            return 0
        if stop == MORE:
            keep[0] = 0
            kind[0] = BAD if n - start > cap else MORE
            return 0
        kind[0] = WHOLE
        return stop
    if length >= 0:
        if length > cap:
            keep[0] = 0
            return 0
        if n < start + length:
            keep[0] = 0
            kind[0] = MORE
            return 0
        kind[0] = WHOLE
        return start + length
    keep[0] = 0
    if n - start > cap:
        return 0
    kind[0] = WHOLE if eof else MORE
    return n if eof else 0


def side_frame(bytes data not None, Py_ssize_t cap, bint eof):
    """See `relay_py.side_frame`."""
    cdef int kind, keep
    cdef Py_ssize_t n = _side_frame(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), cap, eof, &kind, &keep)
    return kind, n, bool(keep)


def stream_head(bytes data not None):
    """See `relay_py.stream_head`."""
    cdef int kind, keep
    cdef Py_ssize_t n = _stream_head(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &kind, &keep)
    return kind, n, bool(keep)


def request_frame(bytes data not None, Py_ssize_t max_head, Py_ssize_t max_body):
    """See `relay_py.request_frame`."""
    return _request_frame(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), max_head, max_body)


def response_frame(bytes data not None, Py_ssize_t cap):
    """See `relay_py.response_frame`."""
    cdef int kind, keep
    cdef Py_ssize_t n = _response_frame(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), cap, &kind, &keep)
    return kind, n, bool(keep)


cdef struct Conn:
    int kind
    int state
    unsigned int gen
    int peer
    int slot
    int reused
    int aborted
    int keep
    unsigned int mask
    char* rbuf
    Py_ssize_t rlen
    Py_ssize_t rcap
    char* wbuf
    Py_ssize_t wlen
    Py_ssize_t woff
    double since
    double deadline
    double resp_deadline
    double beat_at  # the next SSE keep-alive comment of a stream waiting for its first event
    PyObject* ident
    PyObject* token
    PyObject* stream  # a client's streamed answer (lmgw.transport.sse_stream.SseStream)
    # a client's side leg in flight (its fd); a side leg's client while its request is in
    # flight (a side leg's ``token`` is its request's; a main leg's is NULL)
    int side
    int owner


cdef struct Slot:
    int active
    unsigned int alen
    char addr[128]
    int* idle
    int nidle
    int idlecap


cdef class Relay:
    """See `relay_py.Relay` (the same API and behaviour)."""

    cdef int epfd
    cdef Conn* conns
    cdef int nconns
    cdef Slot* slots
    cdef int nslots
    cdef epoll_event events[MAXEV]
    cdef object on_request, on_answer, on_handoff, on_failure, on_timeout, on_abandon, on_demote
    cdef object on_stream, on_first, on_stream_end, on_broken, on_beat, on_side
    cdef public double beat_s
    cdef public Py_ssize_t max_head, max_body, answer_cap
    cdef public double keepalive_s, write_timeout_s, upstream_idle_s, partial_s, connect_timeout_s
    cdef public Py_ssize_t lane_body
    cdef public int max_idle
    cdef readonly long clients, in_flight, upstreams, closed, connects, reuses, served
    cdef readonly long demoted, stale, streamed, sides
    cdef bint _closed
    cdef bint _busy  # this pass has more than one ready connection
    cdef list _paused  # (fd, gen, until): streams not read for a moment (burst pacing)
    cdef list _closed_idents  # the idents of the client connections closed since take_closed
    cdef dict _parked  # token -> client fd: requests parked (PARK)

    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.conns = NULL
        self.nconns = 0
        self.slots = NULL
        self.nslots = 0
        self._closed = False
        self._closed_idents = []
        self._busy = False
        self._paused = []
        self._parked = {}

    def __init__(self, on_request, on_answer, on_handoff, on_failure, on_timeout, on_abandon,
                 on_demote, *, on_stream=None, on_first=None, on_stream_end=None,
                 on_broken=None, on_beat=None, on_side=None, double beat_s=0.0, Py_ssize_t max_head=65536, Py_ssize_t max_body=32 << 20,
                 Py_ssize_t answer_cap=8 << 20, double keepalive_s=75.0,
                 double write_timeout_s=60.0, double upstream_idle_s=55.0,
                 double partial_s=1.0, Py_ssize_t lane_body=1 << 20,
                 double connect_timeout_s=5.0, int max_idle=256):
        self.on_request = on_request
        self.on_answer = on_answer
        self.on_handoff = on_handoff
        self.on_failure = on_failure
        self.on_timeout = on_timeout
        self.on_abandon = on_abandon
        self.on_demote = on_demote
        self.on_stream = on_stream
        self.on_first = on_first
        self.on_stream_end = on_stream_end
        self.on_broken = on_broken
        self.on_beat = on_beat
        self.on_side = on_side
        self.beat_s = beat_s
        self.max_head = max_head
        self.max_body = max_body
        self.answer_cap = answer_cap
        self.keepalive_s = keepalive_s
        self.write_timeout_s = write_timeout_s
        self.upstream_idle_s = upstream_idle_s
        self.partial_s = partial_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.lane_body = lane_body if lane_body < max_body else max_body

    def __dealloc__(self):
        cdef int fd
        if self.conns != NULL:
            for fd in range(self.nconns):
                if self.conns[fd].kind != FREE:
                    Py_XDECREF(self.conns[fd].ident)
                    Py_XDECREF(self.conns[fd].token)
                    Py_XDECREF(self.conns[fd].stream)
                    free(self.conns[fd].rbuf)
                    free(self.conns[fd].wbuf)
                    close(fd)
            free(self.conns)
        if self.slots != NULL:
            for fd in range(self.nslots):
                free(self.slots[fd].idle)
            free(self.slots)
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    # -- table ------------------------------------------------------------------------------
    cdef Conn* _conn(self, int fd) except NULL:
        """``fd``'s entry, the table grown to hold it. Growing may move the table: a ``Conn*``
        held across anything that may add a connection (``_checkout``, so ``_start`` and all
        that can lead to it) must be read again before use."""
        cdef int n
        cdef Conn* grown
        if fd >= self.nconns:
            n = self.nconns * 2 if self.nconns else 1024
            while n <= fd:
                n *= 2
            grown = <Conn*>realloc(self.conns, n * sizeof(Conn))
            if grown == NULL:
                raise MemoryError()
            memset(grown + self.nconns, 0, (n - self.nconns) * sizeof(Conn))
            self.conns = grown
            self.nconns = n
        return &self.conns[fd]

    cdef int _register(self, int fd, Conn* c, unsigned int mask) except -1:
        cdef epoll_event ev
        c.gen += 1
        c.mask = mask
        ev.events = mask
        ev.data.u64 = (<unsigned long long>c.gen << 32) | <unsigned int>fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl ADD failed")
        return 0

    cdef void _mask(self, int fd, Conn* c, unsigned int mask) noexcept:
        cdef epoll_event ev
        if c.mask == mask:
            return
        c.mask = mask
        ev.events = mask
        ev.data.u64 = (<unsigned long long>c.gen << 32) | <unsigned int>fd
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)

    cdef void _forget(self, int fd, Conn* c) noexcept:
        """Drop ``fd`` from the set and its state (the caller closes or hands it on)."""
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        free(c.rbuf)
        free(c.wbuf)
        c.rbuf = c.wbuf = NULL
        c.rlen = c.rcap = c.wlen = c.woff = 0
        if c.kind == CLIENT:
            self.clients -= 1
        elif c.kind == UPSTREAM:
            self.upstreams -= 1
        c.kind = FREE
        c.peer = c.side = c.owner = -1
        c.gen += 1
        Py_XDECREF(c.ident)
        c.ident = NULL
        Py_XDECREF(c.token)
        c.token = NULL
        Py_XDECREF(c.stream)
        c.stream = NULL

    cdef int _reserve(self, Conn* c, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap
        cdef char* grown
        if c.rcap - c.rlen >= need:
            return 0
        cap = c.rcap * 2 if c.rcap else 16384
        while cap - c.rlen < need:
            cap *= 2
        grown = <char*>realloc(c.rbuf, cap)
        if grown == NULL:
            raise MemoryError()
        c.rbuf = grown
        c.rcap = cap
        return 0

    # -- public API -------------------------------------------------------------------------
    def add_client(self, int fd, ident, double now):
        """Serve the client connection ``fd`` (non-blocking; the lane owns it from now on);
        ``ident`` is passed back with each of its requests."""
        cdef Conn* c = self._conn(fd)
        if c.kind != FREE:
            raise ValueError(f"fd {fd} is already in the lane")
        c.kind = CLIENT
        c.state = C_IDLE
        c.peer = c.side = c.owner = -1
        c.slot = -1
        c.keep = 1
        c.since = now
        c.deadline = c.resp_deadline = c.beat_at = 0
        c.rlen = c.rcap = c.wlen = c.woff = 0
        c.rbuf = c.wbuf = NULL
        Py_INCREF(ident)
        c.ident = <PyObject*>ident
        c.token = NULL
        c.stream = NULL
        self.clients += 1
        self._register(fd, c, EPOLLIN | EPOLLRDHUP)

    def set_origin(self, int slot, bytes sockaddr not None):
        """Where the upstream connections of ``slot`` go: a packed ``struct sockaddr``."""
        cdef int n, i
        cdef Slot* grown
        if slot < 0 or PyBytes_GET_SIZE(sockaddr) > 128:
            raise ValueError("bad slot or address")
        if slot >= self.nslots:
            n = slot + 16
            grown = <Slot*>realloc(self.slots, n * sizeof(Slot))
            if grown == NULL:
                raise MemoryError()
            memset(grown + self.nslots, 0, (n - self.nslots) * sizeof(Slot))
            self.slots = grown
            self.nslots = n
        self.slots[slot].active = 1
        self.slots[slot].alen = <unsigned int>PyBytes_GET_SIZE(sockaddr)
        memcpy(self.slots[slot].addr, PyBytes_AS_STRING(sockaddr), self.slots[slot].alen)

    def forget_origin(self, int slot):
        """Close ``slot``'s idle connections and take no more requests for it."""
        if 0 <= slot < self.nslots:
            self._close_idle(slot)
            self.slots[slot].active = 0

    def abort_origin(self, int slot):
        """Fail the requests waiting for ``slot``'s answer (a worker ejected or removed): their
        connections are shut down, and the loop's next pass gives each to ``on_failure`` as
        ABORTED (as the pool's abort: the caller is not re-entered)."""
        cdef int fd
        cdef int n = 0
        for fd in range(self.nconns):
            c = &self.conns[fd]
            # (a side leg's token: its request's)
            if c.kind == UPSTREAM and c.slot == slot and (c.peer >= 0 or c.token != NULL) and c.state != U_IDLE:
                c.aborted = 1
                shutdown(fd, SHUT_RDWR)
                n += 1
        return n

    def sweep(self, double now):
        """Timeouts: requests past their deadline (``on_timeout``) or without an answer in
        time (``on_failure`` TIMEOUT), idle clients past keep-alive, stalled writes, idle
        upstream connections past their lifetime."""
        cdef int fd
        cdef Conn* c
        for fd in range(self.nconns):
            c = &self.conns[fd]
            if c.kind == CLIENT:
                if c.state == C_WAIT:
                    if c.deadline and now >= c.deadline:
                        self._deadline(fd, now)
                    elif c.resp_deadline and now >= c.resp_deadline:
                        self._fail(fd, TIMEOUT)
                    elif c.beat_at and now >= c.beat_at:
                        self._beat(fd, c, now)
                elif c.state == C_IDLE:
                    if c.rlen and c.deadline and now >= c.deadline:
                        self._demote(fd, None)  # a request in pieces: the server's timeouts
                    elif now - c.since > self.keepalive_s:
                        self._close_client(fd)
                elif c.state == C_STREAM:
                    if c.wlen and self.write_timeout_s and now - c.since > self.write_timeout_s:
                        self._gone(fd)  # the client stopped reading its stream
                    elif c.deadline and now >= c.deadline:
                        self._broken(fd, DEADLINE, now)
                    elif c.resp_deadline and now >= c.resp_deadline:
                        self._broken(fd, TIMEOUT, now)
                    elif c.beat_at and now >= c.beat_at:
                        self._beat(fd, c, now)
                elif self.write_timeout_s and now - c.since > self.write_timeout_s:
                    self._close_client(fd)
            elif c.kind == UPSTREAM:
                if c.state == U_IDLE and now - c.since > self.upstream_idle_s:
                    self._close_upstream(fd)
                elif c.token != NULL:  # a side leg
                    if c.state == U_CONNECT and now - c.since > self.connect_timeout_s:
                        self._side_done(fd, CONNECT_TIMEOUT, now, 0, 0)
                    elif c.resp_deadline and now >= c.resp_deadline:
                        self._side_done(fd, TIMEOUT, now, 0, 0)
                elif c.state == U_CONNECT and c.peer >= 0 and now - c.since > self.connect_timeout_s:
                    self._fail(c.peer, CONNECT_TIMEOUT)

    def drain(self):
        """Close the idle clients; busy ones close after their answer."""
        cdef int fd
        for fd in range(self.nconns):
            c = &self.conns[fd]
            if c.kind == CLIENT:
                c.keep = 0
                if c.state == C_IDLE and c.rlen == 0:
                    self._close_client(fd)

    def close(self):
        """Close everything; requests in flight go to ``on_abandon``."""
        cdef int fd
        cdef Conn* c
        cdef object token
        if self._closed:
            return
        self._closed = True
        for fd in range(self.nconns):
            c = &self.conns[fd]
            if c.kind == CLIENT and c.token != NULL:
                self._cancel_side(c.side)
                token = self._finish(fd)
                _call(self.on_abandon, (token,))
        for fd in range(self.nconns):  # the side legs that outlived their request
            if self.conns[fd].kind == UPSTREAM and self.conns[fd].token != NULL:
                self._cancel_side(fd)
        for fd in range(self.nconns):
            c = &self.conns[fd]
            if c.kind == CLIENT:
                self._closed_idents.append(<object>c.ident if c.ident != NULL else None)
                self.closed += 1
            if c.kind != FREE:
                self._forget(fd, c)
                close(fd)
        for fd in range(self.nslots):
            self.slots[fd].nidle = 0
        close(self.epfd)
        self.epfd = -1

    def take_closed(self):
        """The idents of the client connections closed since the last call (the server's
        open count, and its count per client address)."""
        gone = self._closed_idents
        self._closed_idents = []
        self.closed = 0
        return gone

    def idle_upstreams(self):
        cdef int s, n = 0
        for s in range(self.nslots):
            n += self.slots[s].nidle
        return n

    def idle_in(self, int slot):
        """Idle upstream connections of ``slot``."""
        return self.slots[slot].nidle if 0 <= slot < self.nslots else 0

    # -- the loop ----------------------------------------------------------------------------
    @property
    def paused(self):
        """Streams left unread for a moment (burst pacing): run again within BURST_WAIT_S."""
        return len(self._paused)

    cdef void _resume(self, double now):
        """Read the paused streams whose wait is over again."""
        cdef list waiting = []
        cdef tuple entry
        cdef int fd
        cdef Conn* u
        cdef Conn* c
        for entry in self._paused:
            fd = entry[0]
            u = &self.conns[fd]
            if u.kind != UPSTREAM or u.gen != <unsigned int>entry[1] or u.state != U_STREAM:
                continue  # closed, or done, since
            if <double>entry[2] > now:
                waiting.append(entry)
                continue
            if u.peer >= 0:
                c = &self.conns[u.peer]
                if c.wlen > STREAM_HIGH:
                    continue  # the client's turn: its catch-up reads the worker again
            self._mask(fd, u, EPOLLIN | EPOLLRDHUP)
        self._paused = waiting

    def run(self, double now):
        """Handle every ready event; returns how many there were."""
        cdef int n, i, fd
        cdef unsigned int gen, ev
        cdef Conn* c
        if self.epfd < 0:
            return 0
        if self._paused:
            self._resume(now)
        n = epoll_wait(self.epfd, self.events, MAXEV, 0)
        if n <= 0:
            return 0
        self._busy = n > 1
        # first every idle upstream connection with an event (the worker closed it): so that
        # no request of this batch is sent on one
        for i in range(n):
            fd = <int>(self.events[i].data.u64 & 0xffffffff)
            c = &self.conns[fd]
            if c.kind == UPSTREAM and c.state == U_IDLE:
                self.stale += 1
                self._close_upstream(fd)
        for i in range(n):
            fd = <int>(self.events[i].data.u64 & 0xffffffff)
            gen = <unsigned int>(self.events[i].data.u64 >> 32)
            c = &self.conns[fd]
            if c.kind == FREE or c.gen != gen:
                continue  # closed or reused since
            ev = self.events[i].events
            if c.kind == CLIENT:
                self._client_event(fd, c, ev, now)
            else:
                self._upstream_event(fd, c, ev, now)
        return n

    # -- clients -----------------------------------------------------------------------------
    cdef void _client_event(self, int fd, Conn* c, unsigned int ev, double now):
        cdef ssize_t r
        if ev & EPOLLOUT and c.state == C_WRITE:
            if self._flush(fd, c) < 0:
                self._close_client(fd)
                return
            if c.wlen == 0:
                self._written(fd, c, now)
            return
        if ev & EPOLLOUT and c.state == C_STREAM and c.wlen:
            if self._flush(fd, c) < 0:
                self._gone(fd)
                return
            c.since = now
            if c.wlen == 0:  # caught up: read the worker again
                self._mask(fd, c, EPOLLIN | EPOLLRDHUP)
                if c.peer >= 0:
                    self._mask(c.peer, &self.conns[c.peer], EPOLLIN | EPOLLRDHUP)
        if not ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            return
        if c.state != C_IDLE and c.rlen >= PIPELINE_CAP:
            # read ahead enough: only a hang-up matters now
            self._mask(fd, c, EPOLLRDHUP | (EPOLLOUT if c.wlen else 0))
            if not ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                return
            self._gone(fd)
            return
        try:
            self._reserve(c, 16384)
        except MemoryError:
            self._gone(fd)
            return
        r = recv(fd, c.rbuf + c.rlen, c.rcap - c.rlen, 0)
        if r == 0 or (r < 0 and errno != EAGAIN and errno != EINTR):
            self._gone(fd)
            return
        if r < 0:
            return
        c.rlen += r
        if c.state == C_IDLE:
            self._dispatch(fd, c, now)

    cdef void _gone(self, int fd):
        """The client hung up or failed: its request in flight is abandoned."""
        cdef Conn* c = &self.conns[fd]
        cdef object token
        if (c.state == C_WAIT or c.state == C_STREAM) and c.token != NULL:
            self._cancel_side(c.side)
            if c.peer >= 0:
                self._close_upstream(c.peer)  # closing is how the worker learns
            token = self._finish(fd)
            _call(self.on_abandon, (token,))
        self._close_client(fd)

    cdef void _close_client(self, int fd):
        cdef Conn* c = &self.conns[fd]
        self._cancel_side(c.side)
        if c.peer >= 0:
            self._close_upstream(c.peer)
        self._closed_idents.append(<object>c.ident if c.ident != NULL else None)
        self._forget(fd, c)
        close(fd)
        self.closed += 1

    cdef void _dispatch(self, int fd, Conn* c, double now):
        """Start the first whole request in the buffer (the client is idle), or hand the
        connection to Python."""
        cdef Py_ssize_t length
        cdef object data, res
        if c.rlen == 0:
            c.since = now
            return
        length = _request_frame(<const unsigned char*>c.rbuf, c.rlen, self.max_head, self.lane_body)
        if length == MORE:  # the rest is on its way: a while, then the server's
            if c.deadline == 0:
                c.deadline = now + self.partial_s
            return
        if length < 0:
            self._demote(fd, None)
            return
        data = PyBytes_FromStringAndSize(c.rbuf, length)
        res = _call(self.on_request, (<object>c.ident, data))
        if res is _FAILED:
            self._close_client(fd)
            return
        if type(res) is not tuple:
            if res is not None:  # the request is Python's now: it is not in the buffer
                self._consume(c, length)
            self._demote(fd, res)
            return
        self._consume(c, length)
        self._start(fd, c, res, now)

    cdef void _consume(self, Conn* c, Py_ssize_t n) noexcept:
        c.rlen -= n
        if c.rlen:
            memmove(c.rbuf, c.rbuf + n, c.rlen)

    cdef void _demote(self, int fd, object cont):
        """Hand the client connection, with its unread bytes, to Python (``on_demote``)."""
        cdef Conn* c = &self.conns[fd]
        cdef object pending = PyBytes_FromStringAndSize(c.rbuf, c.rlen) if c.rlen else b""
        cdef object ident = <object>c.ident
        if c.peer >= 0:
            self._close_upstream(c.peer)
        self._forget(fd, c)
        self.demoted += 1
        res = _call(self.on_demote, (ident, fd, pending, cont))
        if res is _FAILED:
            close(fd)
            self._closed_idents.append(ident)
            self.closed += 1

    cdef void _start(self, int fd, Conn* c, tuple plan, double now):
        """``plan``: (slot, payload, token, deadline, response deadline[, stream[, beats[,
        side]]]) from on_request (or on_answer: the next leg)."""
        cdef int slot = plan[0]
        cdef object token = plan[2]
        cdef object stream = plan[5] if len(plan) > 5 else None
        if len(plan) > 6 and plan[6] and self.beat_s > 0:
            if not c.beat_at:  # (a next leg keeps the beat's rhythm)
                c.beat_at = now + self.beat_s
        else:
            c.beat_at = 0
        Py_INCREF(token)
        c.token = <PyObject*>token
        if stream is not None:
            Py_INCREF(stream)
            c.stream = <PyObject*>stream
        c.deadline = plan[3]
        c.resp_deadline = plan[4]
        c.state = C_WAIT
        c.since = now
        self.in_flight += 1
        if slot == PARK:
            self._parked[token] = fd
            return
        self._launch(fd, plan, now)

    cdef void _launch(self, int fd, tuple plan, double now):
        """The upstream leg of ``plan`` for the client ``fd`` in C_WAIT (and its side leg)."""
        cdef int slot = plan[0]
        cdef bytes payload = plan[1]
        cdef object token = plan[2]
        cdef object side = plan[7] if len(plan) > 7 else None
        cdef int ufd
        cdef Conn* u
        cdef Conn* c
        if side is not None and self._side_start(fd, <tuple>side, token, now) < 0:
            return  # the side leg's failure ended the request
        ufd = self._checkout(slot, now)
        c = &self.conns[fd]  # (a new connection may have grown the table: ``c`` moved)
        if ufd < 0:
            self._fail(fd, LOCAL if ufd == -2 else CONNECT)
            return
        u = &self.conns[ufd]
        u.peer = fd
        c.peer = ufd
        u.since = now
        u.rlen = 0
        if u.state == U_CONNECT:
            self._queue(u, payload, 0)
            return
        if self._send(ufd, u, payload) < 0:
            self._fail(fd, DROPPED)

    cdef int _send(self, int ufd, Conn* u, bytes payload):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef ssize_t r = send(ufd, PyBytes_AS_STRING(payload), n, MSG_NOSIGNAL)
        if r < 0:
            if errno != EAGAIN and errno != EINTR:
                return -1
            r = 0
        if r < n:
            self._queue(u, payload, r)
            u.state = U_SEND
            self._mask(ufd, u, EPOLLOUT | EPOLLIN | EPOLLRDHUP)
        else:
            u.state = U_WAIT
            self._mask(ufd, u, EPOLLIN | EPOLLRDHUP)
        return 0

    cdef void _queue(self, Conn* c, bytes data, Py_ssize_t offset):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data) - offset
        free(c.wbuf)
        c.wbuf = <char*>malloc(n if n else 1)
        memcpy(c.wbuf, PyBytes_AS_STRING(data) + offset, n)
        c.wlen = n
        c.woff = 0

    cdef int _flush(self, int fd, Conn* c):
        """Write what is queued; -1 on a broken connection."""
        cdef ssize_t r
        while c.wlen:
            r = send(fd, c.wbuf + c.woff, c.wlen, MSG_NOSIGNAL)
            if r < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                return -1
            c.woff += r
            c.wlen -= r
        free(c.wbuf)
        c.wbuf = NULL
        c.woff = 0
        return 0

    cdef void _answer(self, int fd, object answer, bint keep, double now):
        """Write ``answer`` to the client ``fd``; then the next request, or close."""
        cdef Conn* c = &self.conns[fd]
        cdef bytes data = answer
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef ssize_t r
        if not keep:
            c.keep = 0
        c.state = C_WRITE
        c.since = now
        r = send(fd, PyBytes_AS_STRING(data), n, MSG_NOSIGNAL)
        if r < 0:
            if errno != EAGAIN and errno != EINTR:
                self._close_client(fd)
                return
            r = 0
        if r < n:
            self._queue(c, data, r)
            self._mask(fd, c, EPOLLOUT | EPOLLRDHUP)
            return
        self._written(fd, c, now)

    cdef void _written(self, int fd, Conn* c, double now):
        if not c.keep:
            self._close_client(fd)
            return
        c.state = C_IDLE
        c.since = now
        self._mask(fd, c, EPOLLIN | EPOLLRDHUP)
        if c.rlen:
            self._dispatch(fd, c, now)
        elif c.rbuf != NULL:  # an idle keep-alive connection holds no buffer
            free(c.rbuf)
            c.rbuf = NULL
            c.rcap = 0

    cdef int _held_fd(self, object token):
        """See `relay_py.Relay._held_fd`."""
        cdef object found = self._parked.get(token)
        cdef int fd
        cdef Conn* c
        if found is None:
            return -1
        fd = found
        if fd < 0 or fd >= self.nconns:
            return -1
        c = &self.conns[fd]
        if c.kind != CLIENT or c.token != <PyObject*>token or c.peer >= 0:
            return -1
        if c.state != C_WAIT and c.state != C_STREAM:
            return -1
        return fd

    def push(self, token, bytes data, double resp_deadline, double now):
        """See `relay_py.Relay.push`."""
        cdef int fd = self._held_fd(token)
        cdef Conn* c
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef ssize_t r
        if fd < 0:
            return False
        c = &self.conns[fd]
        if c.state == C_WAIT:
            c.state = C_STREAM
            c.since = now
        c.beat_at = 0
        c.resp_deadline = resp_deadline
        if c.wlen:
            if c.wlen > PUSH_MAX or self._push(c, PyBytes_AS_STRING(data), n) < 0:
                shutdown(fd, SHUT_RDWR)
                return False
            return True
        r = send(fd, PyBytes_AS_STRING(data), n, MSG_NOSIGNAL)
        if r < 0:
            if errno != EAGAIN and errno != EINTR:
                shutdown(fd, SHUT_RDWR)
                return False
            r = 0
        if r < n:
            self._queue(c, data, r)
            c.since = now
            self._mask(fd, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT)
        return True

    def broke(self, token, int kind, double now):
        """See `relay_py.Relay.broke`."""
        cdef int fd = self._held_fd(token)
        if fd < 0 or self.conns[fd].state != C_STREAM:
            return False
        self._broken(fd, kind, now)
        return True

    cdef int _parked_fd(self, object token):
        """The client fd of the request ``token`` parked (unparked now), or -1."""
        cdef int fd = self._held_fd(token)
        if fd < 0 or self.conns[fd].state != C_WAIT:
            return -1
        del self._parked[token]
        return fd

    def resume(self, token, tuple plan, double now):
        """See `relay_py.Relay.resume`."""
        cdef int fd = self._parked_fd(token)
        cdef Conn* c
        cdef object stream
        if fd < 0:
            return False
        c = &self.conns[fd]
        stream = plan[5] if len(plan) > 5 else None
        Py_XDECREF(c.stream)
        c.stream = NULL
        if stream is not None:
            Py_INCREF(stream)
            c.stream = <PyObject*>stream
        if len(plan) > 6 and plan[6] and self.beat_s > 0:
            c.beat_at = now + self.beat_s
        else:
            c.beat_at = 0
        c.deadline = plan[3]
        c.resp_deadline = plan[4]
        if plan[0] == PARK:  # parked again, for the rest of its wait (e.g. a native answer)
            self._parked[token] = fd
            return True
        self._launch(fd, plan, now)
        return True

    def reply(self, token, bytes answer, bint keep, double now):
        """See `relay_py.Relay.reply`."""
        cdef int fd = self._held_fd(token)
        cdef Conn* c
        if fd < 0:
            return False
        c = &self.conns[fd]
        self._finish(fd)
        if not keep:
            c.keep = 0
        self._stream_tail(fd, c, answer, now)
        return True

    def hand(self, token, cont):
        """See `relay_py.Relay.hand`."""
        cdef int fd = self._parked_fd(token)
        if fd < 0:
            return False
        self._finish(fd)
        self.conns[fd].state = C_IDLE
        self._demote(fd, cont)
        return True

    cdef object _finish(self, int fd):
        """Unlink the client's exchange; its token (the caller's reference)."""
        cdef Conn* c = &self.conns[fd]
        cdef object token = <object>c.token
        Py_DECREF(token)  # the reference held by ``token`` here stays
        c.token = NULL
        if self._parked:
            self._parked.pop(token, None)
        Py_XDECREF(c.stream)
        c.stream = NULL
        c.peer = -1
        if c.side >= 0:  # the side leg goes on by itself
            self.conns[c.side].owner = -1
            c.side = -1
        c.deadline = c.resp_deadline = c.beat_at = 0
        self.in_flight -= 1
        return token

    cdef void _fail(self, int fd, int kind):
        """The exchange of client ``fd`` failed before an answer: Python decides what next
        (``on_failure`` gives the continuation the demoted connection runs)."""
        cdef Conn* c = &self.conns[fd]
        cdef int reused = 0, sent = 1, got = 0
        cdef object token, cont
        self._cancel_side(c.side)
        if c.peer >= 0:
            u = &self.conns[c.peer]
            reused = u.reused
            got = u.rlen > 0
            if u.aborted and kind != SIDE:
                kind = ABORTED
            sent = u.state == U_WAIT or (u.state == U_SEND and u.woff > 0)
            if kind == CONNECT or kind == LOCAL or kind == CONNECT_TIMEOUT:
                sent = 0
            self._close_upstream(c.peer)
        elif kind == CONNECT or kind == LOCAL:
            sent = 0
        token = self._finish(fd)
        c.state = C_IDLE
        cont = _call(self.on_failure, (token, kind, sent, reused, got))
        if cont is _FAILED:
            self._close_client(fd)
            return
        self._demote(fd, cont)

    cdef void _deadline(self, int fd, double now):
        cdef Conn* c = &self.conns[fd]
        cdef object token, answer
        self._cancel_side(c.side)
        if c.peer >= 0:
            self._close_upstream(c.peer)
        token = self._finish(fd)
        answer = _call(self.on_timeout, (token,))
        if type(answer) is tuple and len(<tuple>answer) == 2 and type((<tuple>answer)[0]) is bytes:
            self._answer(fd, (<tuple>answer)[0], (<tuple>answer)[1], now)
            return
        if type(answer) is not bytes:
            self._close_client(fd)
            return
        self._answer(fd, answer, False, now)

    # -- upstreams ---------------------------------------------------------------------------
    cdef int _checkout(self, int slot, double now):
        """An idle connection of ``slot`` or a new one (connecting): its fd; -1 when the
        connect failed at once, -2 when the gateway is out of descriptors or memory."""
        cdef Slot* s
        cdef int fd, one = 1
        cdef Conn* u
        if slot < 0 or slot >= self.nslots or not self.slots[slot].active:
            return -1
        s = &self.slots[slot]
        while s.nidle:
            s.nidle -= 1
            fd = s.idle[s.nidle]
            u = &self.conns[fd]
            if u.kind == UPSTREAM and u.state == U_IDLE:
                self.reuses += 1
                u.reused = 1
                u.aborted = 0
                u.state = U_WAIT
                return fd
        fd = socket((<unsigned short*>s.addr)[0], SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return -2
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        if connect(fd, <sockaddr*>s.addr, s.alen) < 0 and errno != EINPROGRESS:
            close(fd)
            return -1
        try:
            u = self._conn(fd)
        except MemoryError:
            close(fd)
            return -2
        u.kind = UPSTREAM
        u.state = U_CONNECT
        u.slot = slot
        u.peer = u.side = u.owner = -1
        u.reused = 0
        u.aborted = 0
        u.rlen = u.rcap = u.wlen = u.woff = 0
        u.rbuf = u.wbuf = NULL
        u.ident = u.token = u.stream = NULL
        u.beat_at = 0
        u.since = now
        self.upstreams += 1
        self.connects += 1
        try:
            self._register(fd, u, EPOLLOUT | EPOLLIN | EPOLLRDHUP)
        except OSError:
            self._forget(fd, u)
            close(fd)
            return -2
        return fd

    cdef void _close_upstream(self, int fd):
        cdef Conn* u = &self.conns[fd]
        cdef Slot* s
        cdef int i
        if u.kind != UPSTREAM:
            return
        if u.state == U_IDLE:  # out of its slot's idle stack
            s = &self.slots[u.slot]
            for i in range(s.nidle):
                if s.idle[i] == fd:
                    s.idle[i] = s.idle[s.nidle - 1]
                    s.nidle -= 1
                    break
        if u.peer >= 0:
            self.conns[u.peer].peer = -1
        if u.owner >= 0:
            self.conns[u.owner].side = -1
        self._forget(fd, u)
        close(fd)

    cdef void _close_idle(self, int slot):
        cdef Slot* s = &self.slots[slot]
        while s.nidle:
            self._close_upstream(s.idle[s.nidle - 1])

    cdef void _release(self, int ufd, Conn* u, double now):
        """Back to its slot's idle stack (EOF or stray bytes close it: see run())."""
        cdef Slot* s = &self.slots[u.slot]
        cdef int* grown
        if not s.active or s.nidle >= self.max_idle:
            self._close_upstream(ufd)
            return
        if s.nidle == s.idlecap:
            grown = <int*>realloc(s.idle, (s.idlecap * 2 + 16) * sizeof(int))
            if grown == NULL:
                self._close_upstream(ufd)
                return
            s.idle = grown
            s.idlecap = s.idlecap * 2 + 16
        u.peer = -1
        u.state = U_IDLE
        u.since = now
        u.rlen = 0
        free(u.rbuf)  # (an idle connection holds no buffer: a large answer's goes at once)
        u.rbuf = NULL
        u.rcap = 0
        s.idle[s.nidle] = ufd
        s.nidle += 1
        self._mask(ufd, u, EPOLLIN | EPOLLRDHUP)

    cdef int _ready(self, int ufd, Conn* u, unsigned int ev):
        """An upstream connection's event up to its answer's read: the connect, then the
        request's bytes. 0 when the answer may be read now (room reserved for it), -1 when
        there is nothing to do yet, else how the exchange failed."""
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if u.state == U_CONNECT:
            if not ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                return -1
            getsockopt(ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err or ev & (EPOLLERR | EPOLLHUP):
                return CONNECT
            u.state = U_SEND
            ev |= EPOLLOUT
        if u.state == U_SEND and ev & EPOLLOUT:
            if self._flush(ufd, u) < 0:
                return DROPPED
            if u.wlen:
                self._mask(ufd, u, EPOLLOUT | EPOLLIN | EPOLLRDHUP)
                return -1
            u.state = U_WAIT
            self._mask(ufd, u, EPOLLIN | EPOLLRDHUP)
        if not ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            return -1
        try:
            self._reserve(u, 16384)
        except MemoryError:
            return PROTOCOL
        return 0

    cdef void _upstream_event(self, int ufd, Conn* u, unsigned int ev, double now):
        cdef int kind, keep
        cdef ssize_t r
        cdef Py_ssize_t length
        cdef int cfd = u.peer
        cdef object token, res, data
        cdef double beat_at
        if u.token != NULL:
            self._side_event(ufd, u, ev, now)
            return
        if cfd < 0:
            self._close_upstream(ufd)
            return
        kind = self._ready(ufd, u, ev)
        if kind:
            if kind > 0:
                self._fail(cfd, kind)
            return
        if u.state == U_STREAM:
            u.rlen = 0  # (a stream's reads go on at once: nothing is kept between them)
        r = recv(ufd, u.rbuf + u.rlen, u.rcap - u.rlen, 0)
        if r < 0 and (errno == EAGAIN or errno == EINTR):
            return
        if u.state == U_STREAM:
            if r <= 0:
                self._broken(cfd, DROPPED, now)
                return
            c = &self.conns[cfd]
            stall = (<object>c.stream).stall_s
            if stall:
                c.resp_deadline = now + stall
            self._stream_out(cfd, c, ufd, u, None, PyBytes_FromStringAndSize(u.rbuf, r), now)
            return
        if r <= 0:
            self._fail(cfd, DROPPED)
            return
        u.rlen += r
        if self.conns[cfd].stream != NULL:
            length = _stream_head(<const unsigned char*>u.rbuf, u.rlen, &kind, &keep)
            if kind == MORE:
                return
            if kind == STREAM:
                self._stream_start(cfd, ufd, u, length, keep, now)
                return
        length = _response_frame(<const unsigned char*>u.rbuf, u.rlen, self.answer_cap, &kind, &keep)
        if kind == MORE:
            return
        if kind == HANDOFF:
            self._handoff(cfd, ufd, now)
            return
        # a whole answer: the connection goes back first (its bytes are copied out)
        data = PyBytes_FromStringAndSize(u.rbuf, length)
        if keep and u.rlen == length:
            self._release(ufd, u, now)
        else:
            self._close_upstream(ufd)
        self.served += 1
        c = &self.conns[cfd]
        beat_at = c.beat_at
        token = self._finish(cfd)
        res = _call(self.on_answer, (token, data))
        if type(res) is tuple and len(<tuple>res) == 2 and type((<tuple>res)[0]) is bytes:
            self._answer(cfd, (<tuple>res)[0], (<tuple>res)[1], now)
        elif type(res) is tuple and len(<tuple>res) >= 5:  # the request's next leg
            c.state = C_IDLE
            c.beat_at = beat_at
            self._start(cfd, c, <tuple>res, now)
        elif res is _FAILED:
            self._close_client(cfd)
        else:
            c.state = C_IDLE
            self._demote(cfd, res)

    # -- streamed answers ---------------------------------------------------------------------
    cdef void _stream_start(self, int cfd, int ufd, Conn* u, Py_ssize_t length, int keep, double now):
        """The head of a streamed answer: Python gives the client's (or hands it over)."""
        cdef Conn* c = &self.conns[cfd]
        cdef object res = _call(self.on_stream, (<object>c.token, PyBytes_FromStringAndSize(u.rbuf, length)))
        cdef object stream, rest
        if res is None:  # not an answer to stream here: Python's, as any other
            self._handoff(cfd, ufd, now)
            return
        if res is _FAILED or type(res) is not tuple:
            self._gone(cfd)
            return
        if not (<tuple>res)[1]:
            c.keep = 0
        stream = <object>c.stream
        stream.keep = bool(keep)
        rest = PyBytes_FromStringAndSize(u.rbuf + length, u.rlen - length)
        u.rlen = 0
        u.state = U_STREAM
        c.state = C_STREAM
        c.resp_deadline = now + stream.stall_s if stream.stall_s else 0
        self._stream_out(cfd, c, ufd, u, (<tuple>res)[0], rest, now)

    cdef void _stream_out(self, int cfd, Conn* c, int ufd, Conn* u, object head, object data, double now):
        """Relay what ``data`` completes (after ``head``, the client's head, if not sent)."""
        cdef object stream = <object>c.stream
        cdef bint started = stream.started
        cdef Py_ssize_t before = stream.events
        cdef object out, token
        try:
            out = stream.feed(data) if data else b""
        except Exception:  # (ChunkedError: a worker's bad framing; or a tap's bug)
            _log.warning("a streamed answer could not be read; its stream ends", exc_info=True)
            if head is not None and not self._stream_send(cfd, c, ufd, u, head, now):
                return
            self._broken(cfd, PROTOCOL, now)
            return
        if not started and stream.started:
            c.beat_at = 0  # (keep-alive comments only until the first event)
            _call(self.on_first, (<object>c.token,))
        if head is not None:
            out = head + out
        if stream.done:
            keep = stream.keep and not stream.decoder.extra
            token = self._finish(cfd)
            if keep:
                self._release(ufd, u, now)
            else:
                self._close_upstream(ufd)
            self.streamed += 1
            if _call(self.on_stream_end, (token,)) is _FAILED:
                self._close_client(cfd)
                return
            self._stream_tail(cfd, c, out, now)
            return
        if not out or not self._stream_send(cfd, c, ufd, u, out, now):
            return
        if self._busy and stream.events - before >= BURST_EVENTS and u.mask:
            self._mask(ufd, u, 0)  # a burst on a busy loop: let more pile up
            self._paused.append((ufd, u.gen, now + BURST_WAIT_S))

    cdef bint _stream_send(self, int cfd, Conn* c, int ufd, Conn* u, bytes out, double now):
        """Write ``out`` to the client, after what it has not taken yet; past STREAM_HIGH
        untaken bytes, stop reading the worker. False when the client is gone."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(out)
        cdef ssize_t r
        if c.wlen:
            if self._push(c, PyBytes_AS_STRING(out), n) < 0:
                self._gone(cfd)
                return False
        else:
            r = send(cfd, PyBytes_AS_STRING(out), n, MSG_NOSIGNAL)
            if r < 0:
                if errno != EAGAIN and errno != EINTR:
                    self._gone(cfd)
                    return False
                r = 0
            if r == n:
                return True
            self._queue(c, out, r)
            c.since = now
            self._mask(cfd, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT)
        if c.wlen > STREAM_HIGH:
            self._mask(ufd, u, 0)
        return True

    cdef int _push(self, Conn* c, const char* p, Py_ssize_t n) noexcept:
        """Queue ``n`` more bytes after the unsent ones; -1 out of memory."""
        cdef char* grown
        if c.woff:
            memmove(c.wbuf, c.wbuf + c.woff, c.wlen)
            c.woff = 0
        grown = <char*>realloc(c.wbuf, c.wlen + n)
        if grown == NULL:
            return -1
        memcpy(grown + c.wlen, p, n)
        c.wbuf = grown
        c.wlen += n
        return 0

    cdef void _stream_tail(self, int cfd, Conn* c, bytes out, double now):
        """The last bytes of a stream; then the client connection goes on as after an answer."""
        if c.wlen:
            if self._push(c, PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out)) < 0:
                self._close_client(cfd)
                return
            c.state = C_WRITE
            c.since = now
            self._mask(cfd, c, EPOLLOUT | EPOLLRDHUP)
            return
        self._answer(cfd, out, c.keep, now)

    cdef void _beat(self, int fd, Conn* c, double now):
        """An SSE keep-alive comment for a stream with no event yet: ``on_beat`` gives the
        bytes (the client's head too, the first time before the worker's); None ends them."""
        cdef object out = _call(self.on_beat, (<object>c.token,))
        cdef Py_ssize_t n
        cdef ssize_t r
        if type(out) is not bytes:
            c.beat_at = 0
            return
        c.beat_at = now + self.beat_s
        if c.state == C_STREAM:
            if c.peer >= 0:
                self._stream_send(fd, c, c.peer, &self.conns[c.peer], out, now)
            return
        # waiting for the worker's head: nothing else is written meanwhile, and a client that
        # cannot take a few bytes now took none of the many comments before (it is gone)
        n = PyBytes_GET_SIZE(out)
        r = send(fd, PyBytes_AS_STRING(out), n, MSG_NOSIGNAL)
        if r != n:
            self._gone(fd)

    cdef void _broken(self, int cfd, int kind, double now):
        """The stream ends before its last chunk: Python says how (``on_broken``)."""
        cdef Conn* c = &self.conns[cfd]
        cdef object token, res, unsent
        self._cancel_side(c.side)
        if c.peer >= 0:
            if self.conns[c.peer].aborted and kind != SIDE:
                kind = ABORTED
            self._close_upstream(c.peer)
        token = self._finish(cfd)
        unsent = PyBytes_FromStringAndSize(c.wbuf + c.woff, c.wlen) if c.wlen else b""
        res = _call(self.on_broken, (token, kind, unsent))
        if type(res) is tuple:
            if not (<tuple>res)[1]:
                c.keep = 0
            self._stream_tail(cfd, c, (<tuple>res)[0], now)
            return
        if res is _FAILED:
            self._close_client(cfd)
            return
        free(c.wbuf)  # the continuation sends them first
        c.wbuf = NULL
        c.wlen = c.woff = 0
        c.state = C_IDLE
        self._demote(cfd, res)

    cdef void _handoff(self, int cfd, int ufd, double now):
        """An answer the lane does not relay (an error status, chunked, too large): the
        upstream connection and its bytes go to Python, and with them the client."""
        cdef Conn* u = &self.conns[ufd]
        cdef Conn* c = &self.conns[cfd]
        cdef object data
        cdef object token, cont
        self._cancel_side(c.side)
        data = PyBytes_FromStringAndSize(u.rbuf, u.rlen)
        u.peer = -1
        c.peer = -1
        self._forget(ufd, u)  # not closed: Python reads the rest from it
        token = self._finish(cfd)
        c.state = C_IDLE
        cont = _call(self.on_handoff, (token, ufd, data))
        if cont is _FAILED:
            close(ufd)
            self._close_client(cfd)
            return
        self._demote(cfd, cont)


    # -- side legs ----------------------------------------------------------------------------
    cdef int _side_start(self, int fd, tuple side, object token, double now):
        """Send the side leg of client ``fd``'s request; -1 when its failure at once ended
        the request (``on_side`` said so)."""
        cdef int slot = side[0]
        cdef bytes payload = side[1]
        cdef int ufd = self._checkout(slot, now)
        cdef Conn* u
        cdef Conn* c
        cdef object res
        if ufd < 0:
            res = _call(self.on_side, (token, LOCAL if ufd == -2 else CONNECT, b""))
            if res is True or res is _FAILED:
                self._fail(fd, SIDE)
                return -1
            return 0
        u = &self.conns[ufd]
        Py_INCREF(token)
        u.token = <PyObject*>token
        u.owner = fd
        self.conns[fd].side = ufd
        self.sides += 1
        u.since = now
        u.resp_deadline = side[2]
        u.rlen = 0
        if u.state == U_CONNECT:
            self._queue(u, payload, 0)
            return 0
        if self._send(ufd, u, payload) < 0:
            self._side_done(ufd, DROPPED, now, 0, 0)
            c = &self.conns[fd]
            return -1 if c.kind != CLIENT or c.token != <PyObject*>token else 0
        return 0

    cdef void _side_event(self, int ufd, Conn* u, unsigned int ev, double now):
        cdef int kind, keep
        cdef ssize_t r
        cdef Py_ssize_t length
        kind = self._ready(ufd, u, ev)
        if kind:
            if kind > 0:
                self._side_done(ufd, kind, now, 0, 0)
            return
        r = recv(ufd, u.rbuf + u.rlen, u.rcap - u.rlen, 0)
        if r < 0 and (errno == EAGAIN or errno == EINTR):
            return
        if r <= 0:  # the worker closed: an answer without a length ends so
            length = _side_frame(<const unsigned char*>u.rbuf, u.rlen, self.answer_cap, True, &kind, &keep)
            if u.aborted or kind != WHOLE:
                self._side_done(ufd, ABORTED if u.aborted else DROPPED, now, 0, 0)
            else:
                self._side_done(ufd, 0, now, length, 0)
            return
        u.rlen += r
        length = _side_frame(<const unsigned char*>u.rbuf, u.rlen, self.answer_cap, False, &kind, &keep)
        if kind == MORE:
            return
        if kind == BAD:
            self._side_done(ufd, PROTOCOL, now, 0, 0)
            return
        self._side_done(ufd, 0, now, length, keep and u.rlen == length)

    cdef void _side_done(self, int ufd, int kind, double now, Py_ssize_t length, bint keep):
        """The side leg on ``ufd`` is over (``kind`` 0: its answer is ``length`` bytes): its
        connection back to its slot or closed, then ``on_side``, which may end its request."""
        cdef Conn* u = &self.conns[ufd]
        cdef Conn* c
        cdef int owner = u.owner
        cdef object token = <object>u.token
        cdef object data = PyBytes_FromStringAndSize(u.rbuf, length if kind == 0 else u.rlen)
        Py_DECREF(token)  # the reference held by ``token`` here stays
        u.token = NULL
        self.sides -= 1
        if owner >= 0:
            self.conns[owner].side = -1
            u.owner = -1
        if kind == 0 and keep:
            self._release(ufd, u, now)
        else:
            self._close_upstream(ufd)
        if _call(self.on_side, (token, kind, data)) is not True or owner < 0:
            return
        c = &self.conns[owner]
        if c.kind != CLIENT or c.token != <PyObject*>token:
            return
        if c.state == C_WAIT:
            self._fail(owner, SIDE)
        elif c.state == C_STREAM:
            self._broken(owner, SIDE, now)

    cdef void _cancel_side(self, int ufd):
        """The side leg on ``ufd`` (none: -1) is cancelled (``on_side`` CANCELLED): its
        request ends other than by its answer, or the lane closes."""
        cdef Conn* u
        cdef object token
        if ufd < 0:
            return
        u = &self.conns[ufd]
        token = <object>u.token
        Py_DECREF(token)
        u.token = NULL
        if u.owner >= 0:
            self.conns[u.owner].side = -1
            u.owner = -1
        self.sides -= 1
        self._close_upstream(ufd)
        _call(self.on_side, (token, CANCELLED, b""))


cdef object _call(object fn, tuple args):
    try:
        return fn(*args)
    except Exception:  # a callback's bug must not take the loop down
        _report()
        return _FAILED


_FAILED = object()


def _report():
    _log.exception("a callback of the compiled lane failed; its connection is closed")
