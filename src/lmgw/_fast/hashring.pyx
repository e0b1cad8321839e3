# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Consistent-hash ring with virtual nodes over XXH64 (the compiled half of a twin pair).

Routing hashes every request key (session id, prompt prefix) onto the ring, so lookups are the hot
path: the key is hashed in C straight from the bytes/str buffer and located by a branch-free binary
search over a C array of uint64 points; no Python object is touched in the loop. Adding or removing a
node merges or filters those arrays in linear time. `hashring_py.py` is the pure-Python twin with the
same API and the same answers; the property tests hold the two together.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcpy

from bisect import bisect_left
from operator import index as _index

__all__ = ["DEFAULT_VNODES", "HashRing", "hash64"]

# Must equal hashring_py.DEFAULT_VNODES (a test checks); see there for why 4096.
DEFAULT_VNODES = 4096

cdef extern from *:
    """
    #define LMGW_XXH_P1 0x9E3779B185EBCA87ULL
    #define LMGW_XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define LMGW_XXH_P3 0x165667B19E3779F9ULL
    #define LMGW_XXH_P4 0x85EBCA77C2B2AE63ULL
    #define LMGW_XXH_P5 0x27D4EB2F165667C5ULL
    """
    const uint64_t P1 "LMGW_XXH_P1"
    const uint64_t P2 "LMGW_XXH_P2"
    const uint64_t P3 "LMGW_XXH_P3"
    const uint64_t P4 "LMGW_XXH_P4"
    const uint64_t P5 "LMGW_XXH_P5"


# ---------------------------------------------------------------------------------------------
# XXH64, seed 0. Little-endian reads are assembled byte by byte: portable, and GCC/Clang fold
# them into single unaligned loads on little-endian targets.

cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64(const uint8_t* p) noexcept nogil:
    return (
        (<uint64_t>p[0])
        | (<uint64_t>p[1] << 8)
        | (<uint64_t>p[2] << 16)
        | (<uint64_t>p[3] << 24)
        | (<uint64_t>p[4] << 32)
        | (<uint64_t>p[5] << 40)
        | (<uint64_t>p[6] << 48)
        | (<uint64_t>p[7] << 56)
    )


cdef inline uint64_t _read32(const uint8_t* p) noexcept nogil:
    return (
        (<uint64_t>p[0])
        | (<uint64_t>p[1] << 8)
        | (<uint64_t>p[2] << 16)
        | (<uint64_t>p[3] << 24)
    )


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * P2
    return _rotl(acc, 31) * P1


cdef inline uint64_t _merge(uint64_t acc, uint64_t val) noexcept nogil:
    acc ^= _round(0, val)
    return acc * P1 + P4


cdef uint64_t _xxh64(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef const uint8_t* end = p + n
    cdef const uint8_t* limit
    cdef uint64_t h, v1, v2, v3, v4
    if n >= 32:
        limit = end - 32
        v1 = P1 + P2
        v2 = P2
        v3 = 0
        v4 = 0 - P1
        while p <= limit:
            v1 = _round(v1, _read64(p))
            v2 = _round(v2, _read64(p + 8))
            v3 = _round(v3, _read64(p + 16))
            v4 = _round(v4, _read64(p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = P5
    h += <uint64_t>n
    while p + 8 <= end:
        h ^= _round(0, _read64(p))
        h = _rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        h ^= _read32(p) * P1
        h = _rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h ^= (<uint64_t>p[0]) * P5
        h = _rotl(h, 11) * P1
        p += 1
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


cdef inline int _key_buffer(object key, const char** buf, Py_ssize_t* size) except -1:
    """Borrow the bytes of `key` without copying (str: CPython's cached UTF-8 form)."""
    if PyBytes_Check(key):
        buf[0] = PyBytes_AS_STRING(key)
        size[0] = PyBytes_GET_SIZE(key)
        return 0
    if PyUnicode_Check(key):
        buf[0] = PyUnicode_AsUTF8AndSize(key, size)
        return 0
    raise TypeError(f"expected bytes or str, got {type(key).__name__}")


cdef inline uint64_t _key_hash(object key) except? 0:
    cdef const char* buf
    cdef Py_ssize_t size
    _key_buffer(key, &buf, &size)
    return _xxh64(<const uint8_t*>buf, size)


def hash64(data) -> int:
    """XXH64 (seed 0) of `data`; str is hashed as its UTF-8 encoding.

    A fixed, portable hash (unlike `hash()`, which is salted per process) so every gateway replica
    places nodes and keys identically.
    """
    return _key_hash(data)


# ---------------------------------------------------------------------------------------------
# The ring: parallel C arrays sorted by (point, owner rank), where rank is the position of the
# owner's name in the sorted name tuple, so equal points break ties by name as in the twin.

cdef int _cmp_u64(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef inline Py_ssize_t _lower_bound(
    const uint64_t* pts, Py_ssize_t n, uint64_t h
) noexcept nogil:
    """Index of the first point >= h (n when none); needs n > 0. Branch-free: random keys defeat
    the branch predictor, a conditional move does not care."""
    cdef const uint64_t* base = pts
    cdef Py_ssize_t half
    while n > 1:
        half = n >> 1
        base = base + half if base[half - 1] < h else base
        n -= half
    return (base - pts) + (base[0] < h)


cdef inline int _write_uint(char* out, Py_ssize_t v) noexcept nogil:
    """Decimal digits of v >= 0 into out (no terminator); returns the length."""
    cdef char tmp[24]
    cdef int k = 0, i
    while True:
        tmp[k] = <char>(48 + v % 10)
        k += 1
        v //= 10
        if v == 0:
            break
    for i in range(k):
        out[i] = tmp[k - 1 - i]
    return k


@cython.final
cdef class HashRing:
    """Consistent-hash ring with `vnodes` virtual nodes per node.

    Virtual node i of `name` sits at `hash64(f"{name}#{i}")`; a key belongs to the first point at or
    after its hash, wrapping around. Equal points are ordered by node name so every replica agrees.
    add/remove are a linear merge/filter of the point arrays (no full re-sort), so a worker joining
    a 64-node ring costs about a millisecond of event-loop time, not tens.
    """

    cdef uint64_t* _points
    cdef uint32_t* _owners
    cdef Py_ssize_t _npoints
    cdef set _members
    cdef tuple _names  # sorted node names; _owners[i] indexes this
    cdef readonly Py_ssize_t vnodes

    def __cinit__(self):
        self._points = NULL
        self._owners = NULL
        self._npoints = 0
        self._members = set()
        self._names = ()

    def __init__(self, vnodes: int = DEFAULT_VNODES) -> None:
        if not isinstance(vnodes, int) or isinstance(vnodes, bool):
            raise TypeError("vnodes must be an int")
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes

    def __dealloc__(self):
        free(self._points)
        free(self._owners)

    @property
    def nodes(self) -> tuple:
        """Node names, sorted."""
        return self._names

    cdef void _swap(self, uint64_t** points, uint32_t** owners, Py_ssize_t n) noexcept:
        """Install new arrays; the caller's pointers receive the old ones (to free)."""
        points[0], self._points = self._points, points[0]
        owners[0], self._owners = self._owners, owners[0]
        self._npoints = n

    def add(self, node: str) -> None:
        """Add `node`; adding a present node is a no-op."""
        if not isinstance(node, str):
            raise TypeError(f"node must be str, got {type(node).__name__}")
        if node in self._members:
            return
        cdef bytes enc = (<str>node).encode("utf-8")
        cdef Py_ssize_t vnodes = self.vnodes, nlen = len(enc), old_n = self._npoints
        cdef Py_ssize_t total = old_n + vnodes, i = 0, j = 0, k = 0
        cdef uint32_t r = <uint32_t>bisect_left(self._names, node), o
        cdef uint64_t* fresh = NULL
        cdef uint64_t* points = NULL
        cdef uint32_t* owners = NULL
        cdef char* buf = NULL
        if len(self._names) >= 0xFFFFFFFF:
            raise OverflowError("too many nodes")
        try:
            fresh = <uint64_t*>malloc(vnodes * sizeof(uint64_t))
            points = <uint64_t*>malloc(total * sizeof(uint64_t))
            owners = <uint32_t*>malloc(total * sizeof(uint32_t))
            buf = <char*>malloc(nlen + 24)
            if fresh == NULL or points == NULL or owners == NULL or buf == NULL:
                raise MemoryError()
            memcpy(buf, PyBytes_AS_STRING(enc), nlen)
            buf[nlen] = 35  # '#'
            for i in range(vnodes):
                fresh[i] = _xxh64(<const uint8_t*>buf, nlen + 1 + _write_uint(buf + nlen + 1, i))
            qsort(fresh, vnodes, sizeof(uint64_t), _cmp_u64)
            # Merge the old arrays (ranks >= r shift up by one) with the new node's sorted points.
            i = 0
            j = 0
            while i < old_n and j < vnodes:
                o = self._owners[i]
                if o >= r:
                    o += 1
                if self._points[i] < fresh[j] or (self._points[i] == fresh[j] and o < r):
                    points[k] = self._points[i]
                    owners[k] = o
                    i += 1
                else:
                    points[k] = fresh[j]
                    owners[k] = r
                    j += 1
                k += 1
            while i < old_n:
                o = self._owners[i]
                points[k] = self._points[i]
                owners[k] = o + 1 if o >= r else o
                i += 1
                k += 1
            while j < vnodes:
                points[k] = fresh[j]
                owners[k] = r
                j += 1
                k += 1
            names = self._names[:r] + (node,) + self._names[r:]
            self._members.add(node)
            self._names = names
            self._swap(&points, &owners, total)
        finally:
            free(buf)
            free(fresh)
            free(points)  # the old arrays after the swap, the new ones after a failure
            free(owners)

    def remove(self, node: str) -> None:
        """Remove `node`; removing an absent node is a no-op."""
        if not isinstance(node, str):
            raise TypeError(f"node must be str, got {type(node).__name__}")
        if node not in self._members:
            return
        cdef uint32_t r = <uint32_t>bisect_left(self._names, node), o
        cdef Py_ssize_t old_n = self._npoints, total = old_n - self.vnodes, i, k = 0
        cdef uint64_t* points = NULL
        cdef uint32_t* owners = NULL
        try:
            if total > 0:
                points = <uint64_t*>malloc(total * sizeof(uint64_t))
                owners = <uint32_t*>malloc(total * sizeof(uint32_t))
                if points == NULL or owners == NULL:
                    raise MemoryError()
                for i in range(old_n):
                    o = self._owners[i]
                    if o == r:
                        continue
                    points[k] = self._points[i]
                    owners[k] = o - 1 if o > r else o
                    k += 1
            names = self._names[:r] + self._names[r + 1 :]
            self._members.discard(node)
            self._names = names
            self._swap(&points, &owners, total)
        finally:
            free(points)
            free(owners)

    cdef inline Py_ssize_t _start(self, uint64_t h) noexcept:
        cdef Py_ssize_t i = _lower_bound(self._points, self._npoints, h)
        return 0 if i == self._npoints else i

    def lookup(self, key) -> str | None:
        """The node owning `key` (bytes or str), or None when the ring is empty."""
        cdef uint64_t h = _key_hash(key)
        if self._npoints == 0:
            return None
        return self._names[self._owners[self._start(h)]]

    def candidates(self, key, n) -> list:
        """The first `n` distinct nodes clockwise from `key` (fallback order; [0] is `lookup`)."""
        cdef uint64_t h = _key_hash(key)
        cdef Py_ssize_t want = min(_index(n), len(self._names))
        cdef Py_ssize_t idx, step, got = 0
        cdef uint32_t owner
        cdef char* seen
        cdef list out = []
        if self._npoints == 0 or want <= 0:
            return out
        seen = <char*>calloc(len(self._names), 1)
        if seen == NULL:
            raise MemoryError()
        try:
            idx = self._start(h)
            for step in range(self._npoints):
                owner = self._owners[idx]
                if not seen[owner]:
                    seen[owner] = 1
                    out.append(self._names[owner])
                    got += 1
                    if got == want:
                        break
                idx += 1
                if idx == self._npoints:
                    idx = 0
        finally:
            free(seen)
        return out

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, node) -> bool:
        return node in self._members

    def __repr__(self) -> str:
        return f"HashRing(nodes={len(self._names)}, vnodes={self.vnodes})"
