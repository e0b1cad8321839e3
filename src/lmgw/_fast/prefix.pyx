# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Chained block hashes and the bounded prefix index (the compiled half of a twin pair).

`prefix_py.py` is the reference: same API, same answers, and the docstring there explains the
hash chain and the index. Here a block's tokens are mixed straight from the list's int objects
(CPython's tuple hash and int hash, re-implemented in C), and the index is a linear-probing table of int32 node ids over flat C arrays: per node a
64-bit key, LRU links and a bit set of worker slots. Every byte the index allocates is counted
against its budget; nothing else grows.
"""

cimport cpython.array as carray
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.object cimport PyObject, PyObject_Hash
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from array import array

__all__ = [
    "MAX_SLOTS",
    "TEXT_SEED",
    "TOKEN_SEED",
    "PrefixIndex",
    "best_holder",
    "block_hashes",
    "least_wait",
    "nodes_for_budget",
    "slot_mask",
    "text_block_hashes",
]

TOKEN_SEED = 0
TEXT_SEED = 1
MAX_SLOTS = 4096
cdef tuple _SLOT_INTS = tuple(range(MAX_SLOTS))  # match() keys, made once

cdef extern from *:
    """
    #include <Python.h>
    #define LMGW_XXPRIME_1 11400714785074694791ULL
    #define LMGW_XXPRIME_2 14029467366897019727ULL
    #define LMGW_XXPRIME_5 2870177450012600261ULL
    #define LMGW_HASH_MODULUS ((1ULL << 61) - 1)

    static inline int64_t lmgw_int_hash(int64_t v) {
        /* hash(v) for a 64-bit int: |v| mod (2**61 - 1) with v's sign, -1 mapped to -2.
           Branch-free: the sign of a hash is a coin toss, a branch on it mispredicts. */
        uint64_t sign = (uint64_t)(v >> 63);  /* all ones when negative */
        uint64_t a = ((uint64_t)v ^ sign) - sign;  /* |v|, also for INT64_MIN */
        a = (a & LMGW_HASH_MODULUS) + (a >> 61);
        a -= LMGW_HASH_MODULUS & (0 - (uint64_t)(a >= LMGW_HASH_MODULUS));
        a = (a ^ sign) - sign;
        a -= (uint64_t)(a == (uint64_t)-1);
        return (int64_t)a;
    }

    /* One lane of CPython's tuple hash. */
    #define LMGW_LANE(acc, lane) do { \
        (acc) += (uint64_t)(lane) * LMGW_XXPRIME_2; \
        (acc) = ((acc) << 31) | ((acc) >> 33); \
        (acc) *= LMGW_XXPRIME_1; } while (0)

    /* The end of CPython's tuple hash over `nlanes` lanes. */
    static inline int64_t lmgw_finish(uint64_t acc, Py_ssize_t nlanes) {
        acc += ((uint64_t)nlanes) ^ (LMGW_XXPRIME_5 ^ 3527539ULL);
        return acc == (uint64_t)-1 ? 1546275796 : (int64_t)acc;
    }

    /* The lane value (Python's hash) of a small exact int; 0 when `o` is anything else. */
    static inline int lmgw_small(PyObject* o, uint64_t* v) {
        if (!PyLong_CheckExact(o)) return 0;
    #if PY_VERSION_HEX >= 0x030C0000
        if (!PyUnstable_Long_IsCompact((PyLongObject*)o)) return 0;
        {
            int64_t sv = (int64_t)PyUnstable_Long_CompactValue((PyLongObject*)o);
            *v = (uint64_t)(sv == -1 ? -2 : sv);
        }
        return 1;
    #else
        {
            Py_ssize_t size = Py_SIZE(o);
            if (size == 1) { *v = ((PyLongObject*)o)->ob_digit[0]; return 1; }
            if (size == 0) { *v = 0; return 1; }
            return 0;
        }
    #endif
    }

    /* Chain-hash blocks of small exact ints into dst:
       dst[i] = hash((*items[i*bs:(i+1)*bs], dst[i-1])). The parent lane comes last, so a
       block's tokens are mixed before its parent is known and consecutive blocks overlap in
       the CPU. Stops at the first block holding anything else (the caller hashes that one
       through Python); returns how many blocks it did. */
    static inline __attribute__((always_inline)) Py_ssize_t lmgw_hash_blocks_bs(
            PyObject** items, Py_ssize_t nblocks, Py_ssize_t bs, int64_t parent, int64_t* dst) {
        Py_ssize_t i, j;
        uint64_t v = 0;
        for (i = 0; i < nblocks; i++) {
            PyObject** it = items + i * bs;
            uint64_t acc = LMGW_XXPRIME_5;
            int ok = 1;
            for (j = 0; j < bs; j++) {  /* no exit inside: a branch-free loop is 2x faster */
                ok &= lmgw_small(it[j], &v);
                LMGW_LANE(acc, v);
            }
            if (!ok) return i;
            LMGW_LANE(acc, lmgw_int_hash(parent));
            parent = lmgw_finish(acc, bs + 1);
            dst[i] = parent;
        }
        return nblocks;
    }

    /* Common block sizes get a copy with the size known to the compiler (unrolled: ~1.5x). */
    static Py_ssize_t lmgw_hash_blocks(PyObject** items, Py_ssize_t nblocks, Py_ssize_t bs,
                                       int64_t parent, int64_t* dst) {
        switch (bs) {
        case 16: return lmgw_hash_blocks_bs(items, nblocks, 16, parent, dst);
        case 32: return lmgw_hash_blocks_bs(items, nblocks, 32, parent, dst);
        case 64: return lmgw_hash_blocks_bs(items, nblocks, 64, parent, dst);
        default: return lmgw_hash_blocks_bs(items, nblocks, bs, parent, dst);
        }
    }

    /* The same over lanes that are already Python hashes (a block of arbitrary objects). */
    static int64_t lmgw_hash_lanes(const int64_t* lanes, Py_ssize_t bs, int64_t parent) {
        uint64_t acc = LMGW_XXPRIME_5;
        Py_ssize_t j;
        for (j = 0; j < bs; j++) LMGW_LANE(acc, lanes[j]);
        LMGW_LANE(acc, lmgw_int_hash(parent));
        return lmgw_finish(acc, bs + 1);
    }

    /* Raw bytes as native uint32 words, `wpb` words per block. */
    static void lmgw_hash_words(const char* src, Py_ssize_t nblocks, Py_ssize_t wpb,
                                int64_t parent, int64_t* dst) {
        Py_ssize_t i, j;
        uint32_t w;
        for (i = 0; i < nblocks; i++) {
            const char* p = src + i * wpb * 4;
            uint64_t acc = LMGW_XXPRIME_5;
            for (j = 0; j < wpb; j++) {
                memcpy(&w, p + 4 * j, 4);
                LMGW_LANE(acc, w);
            }
            LMGW_LANE(acc, lmgw_int_hash(parent));
            parent = lmgw_finish(acc, wpb + 1);
            dst[i] = parent;
        }
    }

    /* A fast sequence's item array (list or tuple) without a Python call. */
    static inline PyObject** lmgw_items(PyObject* fast) {
        return PySequence_Fast_ITEMS(fast);
    }
    """
    const uint64_t XP1 "LMGW_XXPRIME_1"
    const uint64_t XP2 "LMGW_XXPRIME_2"
    const uint64_t XP5 "LMGW_XXPRIME_5"
    const uint64_t HMOD "LMGW_HASH_MODULUS"
    Py_ssize_t lmgw_hash_blocks(
        PyObject** items, Py_ssize_t nblocks, Py_ssize_t bs, int64_t parent, int64_t* dst
    ) noexcept
    int64_t lmgw_hash_lanes(const int64_t* lanes, Py_ssize_t bs, int64_t parent) noexcept
    void lmgw_hash_words(
        const char* src, Py_ssize_t nblocks, Py_ssize_t wpb, int64_t parent, int64_t* dst
    ) noexcept
    PyObject** lmgw_items(PyObject* fast) noexcept
    int __builtin_ctzll(unsigned long long x) noexcept nogil
    int __builtin_popcountll(unsigned long long x) noexcept nogil
    object _PyDict_NewPresized(Py_ssize_t minused)


cdef inline Py_ssize_t _nblocks(Py_ssize_t length, Py_ssize_t size, Py_ssize_t max_blocks):
    cdef Py_ssize_t n = length // size
    if 0 <= max_blocks < n:
        n = max_blocks
    return n


cdef carray.array _TEMPLATE = array("q")


cdef inline carray.array _new_array(Py_ssize_t n):
    return carray.clone(_TEMPLATE, n, False)


cdef inline int64_t* _array_data(carray.array arr) noexcept:
    return <int64_t*>arr.data.as_voidptr


def block_hashes(tokens, Py_ssize_t block_size, Py_ssize_t max_blocks=-1, seed=TOKEN_SEED):
    """Chained hashes of the full blocks of ``tokens`` (at most ``max_blocks``; -1: all)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    cdef object fast = PySequence_Fast(tokens, "tokens must be a sequence")
    cdef Py_ssize_t n = _nblocks(PySequence_Fast_GET_SIZE(fast), block_size, max_blocks)
    cdef carray.array out = _new_array(n)
    cdef int64_t* dst = _array_data(out)
    cdef PyObject** items = lmgw_items(<PyObject*>fast)
    cdef int64_t parent = seed
    cdef int64_t* lanes = NULL
    cdef Py_ssize_t i = 0, j
    try:
        while i < n:
            i += lmgw_hash_blocks(items + i * block_size, n - i, block_size, parent, dst + i)
            if i == n:
                break
            # block i holds something other than a small int: each lane's Python hash
            if lanes == NULL:
                lanes = <int64_t*>malloc(block_size * sizeof(int64_t))
                if lanes == NULL:
                    raise MemoryError()
            if i:
                parent = dst[i - 1]
            for j in range(block_size):
                lanes[j] = PyObject_Hash(<object>items[i * block_size + j])
            parent = lmgw_hash_lanes(lanes, block_size, parent)
            dst[i] = parent
            i += 1
    finally:
        free(lanes)
    return out


def text_block_hashes(data, Py_ssize_t block_bytes, Py_ssize_t max_blocks=-1, seed=TEXT_SEED):
    """Chained hashes of the full ``block_bytes`` blocks of raw bytes (a multiple of 4)."""
    if block_bytes < 4 or block_bytes % 4:
        raise ValueError("block_bytes must be a positive multiple of 4")
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    cdef Py_ssize_t n
    cdef carray.array out
    try:
        n = _nblocks(view.len, block_bytes, max_blocks)
        out = _new_array(n)
        lmgw_hash_words(<const char*>view.buf, n, block_bytes // 4, seed, _array_data(out))
    finally:
        PyBuffer_Release(&view)
    return out


def slot_mask(slots) -> bytes:
    """The query bit set for :meth:`PrefixIndex.match`: little-endian uint64 words."""
    mask = 0
    for s in slots:
        if not 0 <= s < MAX_SLOTS:
            raise ValueError(f"slot {s} out of range 0..{MAX_SLOTS - 1}")
        mask |= 1 << s
    return mask.to_bytes(8 * ((mask.bit_length() + 63) // 64), "little")


def least_wait(list bias, list front, slots, list loads, double load_weight, double cap,
               Py_ssize_t start):
    """The candidate with the least ``bias[slot] + load_weight x load`` among those whose load
    is at most ``cap``; ties to the smaller ``front[slot]``, then the first from ``start``.
    -1 when none qualifies. (Same answers as the twin's; one C pass over the fleet.)"""
    cdef Py_ssize_t n = len(loads), last = len(bias) - 1, i, j, s, f, first = 0, best = -1
    cdef double x, w, least = 0.0
    if len(front) != len(bias) or len(slots) != n:
        raise ValueError("least_wait: bias/front and slots/loads must have equal lengths")
    for j in range(n):
        i = start + j
        if i >= n:
            i -= n
        x = loads[i]
        if x > cap:
            continue
        s = slots[i]
        if s < 0 or s >= last:
            s = last
        w = <double>bias[s] + load_weight * x
        f = front[s]
        if best < 0 or w < least or (w == least and f < first):
            best = i
            least = w
            first = f
    return best


def best_holder(dict held, double usable, double block_size, double floor, list bias,
                list loads, list recent, dict pos, double limit, double cap, double load_weight,
                double miss_weight, double ntok, double least, Py_ssize_t best=-1,
                double best_cost=0.0, double best_c=0.0):
    """cache_aware's cheapest holder of the prompt's prefix (same answers as the twin's, which
    says what it computes; here one C pass over the holders)."""
    cdef Py_ssize_t i, s, nb = len(bias)
    cdef double d, c, x, cost, bound
    cdef bint found = False, ties_stop = best >= 0
    if len(recent) != nb:
        raise ValueError("best_holder: bias and recent must have equal lengths")
    if best >= len(loads):
        raise IndexError("best_holder: candidate index out of range")
    for slot, dv in held.items():
        d = dv
        c = (d if d < usable else usable) * block_size
        if c < floor or c <= 0:
            continue
        found = True
        if best >= 0:
            bound = least + miss_weight * (ntok - c)
            if bound > best_cost or (ties_stop and bound == best_cost):
                break
        s = slot
        if s < 0:
            s += nb
        if s < 0 or s >= nb:
            raise IndexError("best_holder: slot out of range")
        if <double>(<object>recent[s]) + 1 > limit:
            continue
        i = pos[slot]
        if i < 0 or i >= len(loads):
            raise IndexError("best_holder: candidate index out of range")
        x = loads[i]
        if x > cap:
            continue
        cost = <double>bias[s] + load_weight * x + miss_weight * (ntok - c)
        if best < 0 or cost < best_cost or (cost == best_cost and x < <double>loads[best]):
            best = i
            best_cost = cost
            best_c = c
    return best, best_cost, best_c, found


# ---------------------------------------------------------------------------------------------
# The index.
#
# Per node: key (8 B), LRU prev/next (2 x 4 B), `words` x 8 B of slot bits. Table: int32 node ids,
# a power of two >= 2 x capacity (load <= 1/2), linear probing with backward-shift deletion (no
# tombstones). Capacity grows by doubling up to max_nodes, the most nodes whose arrays fit the
# budget; the LRU head is evicted when a new node would pass it.

cdef enum:
    FIXED_BYTES = 256  # the object and its bookkeeping
    MIN_CAP = 256  # first allocation, in nodes


cdef inline Py_ssize_t _table_size(Py_ssize_t cap) noexcept nogil:
    cdef Py_ssize_t t = 16
    while t < 2 * cap:
        t <<= 1
    return t


cdef inline Py_ssize_t _arrays_bytes(Py_ssize_t cap, Py_ssize_t words) noexcept nogil:
    if cap == 0:
        return 0
    return cap * (16 + 8 * words) + _table_size(cap) * 4


cdef Py_ssize_t _fit(Py_ssize_t budget, Py_ssize_t words) noexcept nogil:
    """The most nodes whose arrays fit in ``budget`` bytes: for each power-of-two table size,
    the nodes it can serve (at most half of it) within what the table leaves; the best of those."""
    cdef Py_ssize_t avail = budget - FIXED_BYTES, per = 16 + 8 * words, t = 16, n, best = 0
    while t * 4 <= avail and t <= (<Py_ssize_t>1 << 40):
        n = (avail - t * 4) // per
        if n > t // 2:
            n = t // 2
        if n > best and _arrays_bytes(n, words) <= avail:
            best = n
        t <<= 1
    return best


def nodes_for_budget(Py_ssize_t budget_bytes, Py_ssize_t slots=64) -> int:
    """How many nodes this implementation keeps within ``budget_bytes`` at ``slots`` slots."""
    return _fit(budget_bytes, (max(slots, 1) + 63) // 64)


cdef inline uint64_t _mix(int64_t key) noexcept nogil:
    cdef uint64_t x = <uint64_t>key
    x ^= x >> 33
    x *= <uint64_t>0xFF51AFD7ED558CCD
    x ^= x >> 33
    return x


@cython.final
cdef class PrefixIndex:
    """Which worker slots hold which block hashes, within a hard byte budget (LRU)."""

    cdef int64_t* _keys
    cdef int32_t* _prev
    cdef int32_t* _next
    cdef uint64_t* _masks
    cdef int32_t* _table
    cdef Py_ssize_t _cap, _tsize, _count, _used, _words
    cdef int32_t _head, _tail, _free
    cdef readonly Py_ssize_t budget_bytes
    cdef readonly Py_ssize_t max_nodes
    cdef readonly Py_ssize_t evictions
    cdef Py_ssize_t _cap_override

    def __cinit__(self):
        self._keys = NULL
        self._prev = NULL
        self._next = NULL
        self._masks = NULL
        self._table = NULL
        self._cap = self._tsize = self._count = self._used = 0
        self._words = 1
        self._head = self._tail = self._free = -1
        self.evictions = 0

    def __init__(self, Py_ssize_t budget_bytes, max_nodes=None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        if max_nodes is not None and max_nodes < 0:
            raise ValueError("max_nodes must be >= 0")
        self.budget_bytes = budget_bytes
        self._cap_override = -1 if max_nodes is None else max_nodes
        self.max_nodes = self._max_nodes(self._words)

    def __dealloc__(self):
        self._free_arrays()

    cdef void _free_arrays(self) noexcept:
        free(self._keys)
        free(self._prev)
        free(self._next)
        free(self._masks)
        free(self._table)
        self._keys = NULL
        self._prev = NULL
        self._next = NULL
        self._masks = NULL
        self._table = NULL

    cdef Py_ssize_t _max_nodes(self, Py_ssize_t words):
        cdef Py_ssize_t n = _fit(self.budget_bytes, words)
        if 0 <= self._cap_override < n:
            n = self._cap_override
        return n

    # -- table ------------------------------------------------------------------------------
    cdef inline int32_t _find(self, int64_t key) noexcept nogil:
        cdef Py_ssize_t m = self._tsize - 1
        cdef Py_ssize_t i
        cdef int32_t node
        if self._tsize == 0:
            return -1
        i = <Py_ssize_t>(_mix(key) & m)
        while True:
            node = self._table[i]
            if node < 0 or self._keys[node] == key:
                return node
            i = (i + 1) & m

    cdef inline void _table_put(self, int32_t node) noexcept nogil:
        cdef Py_ssize_t m = self._tsize - 1
        cdef Py_ssize_t i = <Py_ssize_t>(_mix(self._keys[node]) & m)
        while self._table[i] >= 0:
            i = (i + 1) & m
        self._table[i] = node

    cdef void _table_del(self, int32_t node) noexcept nogil:
        cdef Py_ssize_t m = self._tsize - 1
        cdef Py_ssize_t i = <Py_ssize_t>(_mix(self._keys[node]) & m)
        cdef Py_ssize_t j, k
        while self._table[i] != node:
            i = (i + 1) & m
        j = i
        while True:  # backward-shift: pull later members of the run into the hole
            j = (j + 1) & m
            if self._table[j] < 0:
                break
            k = <Py_ssize_t>(_mix(self._keys[self._table[j]]) & m)
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue  # its home is between the hole and j: it must stay
            self._table[i] = self._table[j]
            i = j
        self._table[i] = -1

    # -- LRU list ---------------------------------------------------------------------------
    cdef inline void _unlink(self, int32_t node) noexcept nogil:
        cdef int32_t p = self._prev[node], n = self._next[node]
        if p >= 0:
            self._next[p] = n
        else:
            self._head = n
        if n >= 0:
            self._prev[n] = p
        else:
            self._tail = p

    cdef inline void _append(self, int32_t node) noexcept nogil:
        self._prev[node] = self._tail
        self._next[node] = -1
        if self._tail >= 0:
            self._next[self._tail] = node
        else:
            self._head = node
        self._tail = node

    cdef inline void _touch(self, int32_t node) noexcept nogil:
        if self._tail != node:
            self._unlink(node)
            self._append(node)

    cdef void _drop(self, int32_t node) noexcept nogil:
        """Remove a live node: table, list, and onto the free list (its bits zeroed, so a
        sequential scan of the bit sets never mistakes a free node for a holder)."""
        self._table_del(node)
        self._unlink(node)
        memset(&self._masks[node * self._words], 0, self._words * sizeof(uint64_t))
        self._next[node] = self._free
        self._free = node
        self._count -= 1

    # -- storage ------------------------------------------------------------------------------
    cdef int _rebuild(self, Py_ssize_t cap, Py_ssize_t words) except -1:
        """New arrays of ``cap`` nodes x ``words``: live nodes copied oldest to newest (the
        oldest dropped when they do not fit), node ids renumbered densely."""
        cdef Py_ssize_t tsize = _table_size(cap) if cap else 0
        cdef int64_t* keys = NULL
        cdef int32_t* prev = NULL
        cdef int32_t* nxt = NULL
        cdef uint64_t* masks = NULL
        cdef int32_t* table = NULL
        cdef Py_ssize_t keep, skip, k = 0, w, cw
        cdef int32_t node
        if cap:
            keys = <int64_t*>malloc(cap * sizeof(int64_t))
            prev = <int32_t*>malloc(cap * sizeof(int32_t))
            nxt = <int32_t*>malloc(cap * sizeof(int32_t))
            masks = <uint64_t*>malloc(cap * words * sizeof(uint64_t))
            table = <int32_t*>malloc(tsize * sizeof(int32_t))
            if keys == NULL or prev == NULL or nxt == NULL or masks == NULL or table == NULL:
                free(keys)
                free(prev)
                free(nxt)
                free(masks)
                free(table)
                raise MemoryError()
            memset(table, 0xFF, tsize * sizeof(int32_t))
        keep = self._count if self._count < cap else cap
        skip = self._count - keep
        self.evictions += skip
        cw = self._words if self._words < words else words
        node = self._head
        while node >= 0:
            if skip > 0:
                skip -= 1
            else:
                keys[k] = self._keys[node]
                prev[k] = <int32_t>(k - 1)
                nxt[k] = <int32_t>(k + 1) if k + 1 < keep else -1
                for w in range(cw):
                    masks[k * words + w] = self._masks[node * self._words + w]
                for w in range(cw, words):
                    masks[k * words + w] = 0
                k += 1
            node = self._next[node]
        self._free_arrays()
        self._keys, self._prev, self._next, self._masks, self._table = (
            keys, prev, nxt, masks, table
        )
        self._cap, self._tsize, self._words = cap, tsize, words
        self._count = self._used = keep
        self._head = 0 if keep else -1
        self._tail = <int32_t>(keep - 1) if keep else -1
        self._free = -1
        for node in range(keep):
            self._table_put(node)
        return 0

    cdef int _need_slot(self, Py_ssize_t slot) except -1:
        cdef Py_ssize_t words, cap
        if slot < 0 or slot >= MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        if slot >= self._words * 64:
            words = slot // 64 + 1
            self.max_nodes = self._max_nodes(words)
            cap = self._cap if self._cap < self.max_nodes else self.max_nodes
            self._rebuild(cap, words)
        return 0

    cdef int32_t _new_node(self, int64_t key) except -2:
        """A fresh node for ``key`` (evicting the LRU head when full); -1 when max_nodes is 0."""
        cdef int32_t node
        cdef Py_ssize_t cap
        if self._count >= self.max_nodes:
            if self.max_nodes == 0:
                return -1
            node = self._head
            self._drop(node)
            self.evictions += 1
        elif self._free < 0 and self._used >= self._cap:
            cap = self._cap * 2 if self._cap else MIN_CAP
            if cap > self.max_nodes:
                cap = self.max_nodes
            self._rebuild(cap, self._words)
        if self._free >= 0:
            node = self._free
            self._free = self._next[node]
        else:
            node = <int32_t>self._used
            self._used += 1
        self._keys[node] = key
        memset(&self._masks[node * self._words], 0, self._words * sizeof(uint64_t))
        self._append(node)
        self._table_put(node)
        self._count += 1
        return node

    def resize(self, Py_ssize_t budget_bytes) -> None:
        """A new budget; when it holds fewer nodes, the least recently used go first."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.max_nodes = self._max_nodes(self._words)
        if self._cap > self.max_nodes:
            self._rebuild(self.max_nodes, self._words)

    # -- writes -------------------------------------------------------------------------------
    def insert(self, Py_ssize_t slot, hashes, Py_ssize_t n=-1) -> int:
        """``slot`` holds the blocks ``hashes[:n]`` (all when n < 0); returns new nodes."""
        self._need_slot(slot)
        cdef const int64_t[:] hv = hashes
        cdef Py_ssize_t i, added = 0
        cdef int32_t node
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        cdef Py_ssize_t word = slot >> 6
        if n < 0 or n > hv.shape[0]:
            n = hv.shape[0]
        if self.max_nodes == 0:
            return 0
        for i in range(n - 1, -1, -1):
            node = self._find(hv[i])
            if node < 0:
                node = self._new_node(hv[i])
                added += 1
            else:
                self._touch(node)
            self._masks[node * self._words + word] |= bit
        return added

    def remove(self, Py_ssize_t slot, int64_t h) -> bool:
        """``slot`` no longer holds block ``h``; True if it did."""
        if slot < 0 or slot >= MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        cdef int32_t node = self._find(h)
        cdef Py_ssize_t word = slot >> 6, w
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        cdef uint64_t* m
        if node < 0 or word >= self._words:
            return False
        m = &self._masks[node * self._words]
        if not (m[word] & bit):
            return False
        m[word] &= ~bit
        for w in range(self._words):
            if m[w]:
                return True
        self._drop(node)
        return True

    def clear_slot(self, Py_ssize_t slot) -> int:
        """Forget everything ``slot`` holds (a worker left, or switched to KV events); O(nodes).
        Returns how many blocks it held."""
        if slot < 0 or slot >= MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        cdef Py_ssize_t word = slot >> 6, w, held = 0, node
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        cdef uint64_t* m
        cdef bint empty
        if word >= self._words:
            return 0
        for node in range(self._used):  # a sequential scan: ~10x faster than the LRU list
            m = &self._masks[node * self._words]
            if m[word] & bit:
                held += 1
                m[word] &= ~bit
                empty = True
                for w in range(self._words):
                    if m[w]:
                        empty = False
                        break
                if empty:
                    self._drop(<int32_t>node)
        return held

    def clear(self) -> None:
        self._free_arrays()
        self._cap = self._tsize = self._count = self._used = 0
        self._head = self._tail = self._free = -1

    # -- reads --------------------------------------------------------------------------------
    def holders(self, int64_t h) -> int:
        """The slot bit set of block ``h`` (0 when absent); does not touch the LRU order."""
        cdef int32_t node = self._find(h)
        cdef Py_ssize_t w
        if node < 0:
            return 0
        out = 0
        for w in range(self._words):
            out |= (<object>self._masks[node * self._words + w]) << (64 * w)
        return out

    cdef inline bint _any(self, int32_t node, const uint64_t* rem) noexcept nogil:
        cdef Py_ssize_t w
        cdef const uint64_t* m
        if node < 0:
            return False
        m = &self._masks[node * self._words]
        for w in range(self._words):
            if m[w] & rem[w]:
                return True
        return False

    def match(self, hashes, Py_ssize_t n, bytes query, Py_ssize_t min_depth=1) -> dict:
        """Longest cached prefix, in blocks, of ``hashes[:n]`` for each slot in ``query``
        (from :func:`slot_mask`); slots matching fewer than ``min_depth`` blocks are left
        out. Read-only."""
        cdef const int64_t[:] hv = hashes
        cdef Py_ssize_t words = self._words, w, lo, hi, a, b, mid, d, qlen
        cdef uint64_t rem[64]
        cdef uint64_t deep, low
        cdef const uint64_t* m
        cdef int32_t node
        cdef bint left
        cdef object depth
        cdef dict out = {}
        if n < 0 or n > hv.shape[0]:
            n = hv.shape[0]
        if n == 0 or self._count == 0:
            return out
        node = self._find(hv[0])
        if node < 0:
            return out
        qlen = PyBytes_GET_SIZE(query) // 8
        m = &self._masks[node * words]
        left = False
        for w in range(words):
            rem[w] = 0
            if w < qlen:
                memcpy(&rem[w], PyBytes_AS_STRING(query) + 8 * w, 8)
            rem[w] &= m[w]
            if rem[w]:
                left = True
        if min_depth < 1:
            min_depth = 1
        if min_depth > n:
            return out
        if min_depth > 1 and left:  # one probe drops every slot that cannot reach min_depth
            node = self._find(hv[min_depth - 1])
            left = False
            for w in range(words):
                rem[w] = rem[w] & self._masks[node * words + w] if node >= 0 else 0
                if rem[w]:
                    left = True
        lo = min_depth  # every slot left holds at least `lo` blocks
        hi = n
        if left:  # sized for every slot left at once: no resize while filling it
            a = 0
            for w in range(words):
                a += __builtin_popcountll(rem[w])
            out = _PyDict_NewPresized(a)
        while left and hi >= lo:
            if self._any(self._find(hv[hi - 1]), rem):
                d = hi
            else:
                a = lo
                b = hi - 1
                while a < b:
                    mid = (a + b + 1) >> 1
                    if self._any(self._find(hv[mid - 1]), rem):
                        a = mid
                    else:
                        b = mid - 1
                d = a
            m = &self._masks[self._find(hv[d - 1]) * words]
            left = False
            depth = d  # one int object per depth, the slots' from a table: no allocation
            for w in range(words):
                deep = m[w] & rem[w]
                rem[w] &= ~deep
                if rem[w]:
                    left = True
                while deep:
                    low = deep & (~deep + 1)
                    PyDict_SetItem(out, <object>PyTuple_GET_ITEM(_SLOT_INTS, 64 * w + __builtin_ctzll(low)), depth)
                    deep ^= low
            hi = d - 1
        return out

    def __len__(self) -> int:
        return self._count

    @property
    def node_bytes(self) -> int:
        """Bytes per node at the current slot range (the table's share included)."""
        return 16 + 8 * self._words + 8

    def statistics(self) -> dict:
        """Nodes, the bytes the index allocated (never above the budget), evictions so far."""
        return {
            "nodes": self._count,
            "max_nodes": self.max_nodes,
            "bytes": FIXED_BYTES + _arrays_bytes(self._cap, self._words),
            "budget_bytes": self.budget_bytes,
            "evictions": self.evictions,
            "slot_words": self._words,
        }

    def __repr__(self) -> str:
        return f"PrefixIndex(nodes={self._count}, max_nodes={self.max_nodes})"
