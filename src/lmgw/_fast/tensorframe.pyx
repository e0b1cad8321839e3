# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Tensor frame header codec (the compiled half of a twin pair; format in `tensorframe_py.py`).

`decode` is a trust boundary: the header comes off the wire and numpy's ``ndarray(buffer=...)``
does not check strides against a buffer (for an empty buffer it even assumes the buffer is as large
as the array). So the header is parsed and every layout checked against the buffer length in C,
with overflow-safe arithmetic, before numpy sees it; only then is the view built. `encode` reads
the array's layout through the buffer protocol and exports its memory span through a small
read-only buffer object that holds the array's buffer (so the array can neither die nor be
resized while a frame references it). No numpy headers are needed.

The pure-Python twin owns the shared pieces (error class, dtype table, constants) and produces the
same bytes, arrays and error messages; the property tests hold the two together.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_ND,
    PyBUF_SIMPLE,
    PyBUF_STRIDES,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t

import numpy as np

from lmgw._fast.tensorframe_py import (
    _CODE_TO_DTYPE,
    _STR_TO_CODE,
    DEFAULT_MAX_SPAN_RATIO,
    DTYPES,
    FIXED_SIZE,
    MAGIC,
    MAX_NDIM,
    VERSION,
    TensorFrameError,
    span_of,
)

__all__ = [
    "DEFAULT_MAX_SPAN_RATIO",
    "DTYPES",
    "FIXED_SIZE",
    "MAGIC",
    "MAX_NDIM",
    "VERSION",
    "TensorFrameError",
    "decode",
    "encode",
    "span_of",
]

cdef enum:
    C_FIXED = 24  # FIXED_SIZE
    C_MAX_NDIM = 32  # MAX_NDIM
    C_VERSION = 1  # VERSION

cdef extern from *:
    """
    #define LMGW_SSIZE_MAX ((unsigned long long)PY_SSIZE_T_MAX)
    static char lmgw_format_B[] = "B";
    """
    const unsigned long long SSIZE_MAX "LMGW_SSIZE_MAX"
    char FORMAT_B "lmgw_format_B"[]

cdef bytes _EMPTY = b""


# -- little-endian helpers ---------------------------------------------------------------------

cdef inline uint64_t _get64(const uint8_t* p) noexcept nogil:
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


cdef inline void _put64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


# -- encode -----------------------------------------------------------------------------------

@cython.final
cdef class _Span:
    """Read-only bytes [ptr, ptr + size) of an array, holding the array's exported buffer."""

    cdef Py_buffer source
    cdef bint held
    cdef char* ptr
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self):
        self.held = False

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.source)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a tensor frame span is read-only")
        buffer.buf = self.ptr
        buffer.obj = self
        buffer.len = self.shape[0]
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = FORMAT_B if flags & PyBUF_FORMAT else NULL
        buffer.ndim = 1
        buffer.shape = self.shape if flags & PyBUF_ND else NULL
        buffer.strides = self.strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer* buffer):
        pass


cdef bytes _header(bytes code, uint64_t offset, Py_ssize_t ndim,
                   const Py_ssize_t* shape, const Py_ssize_t* strides):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, C_FIXED + 16 * ndim)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    cdef const uint8_t* c = <const uint8_t*>PyBytes_AS_STRING(code)
    cdef Py_ssize_t i
    p[0] = 76  # L
    p[1] = 71  # G
    p[2] = 84  # T
    p[3] = 70  # F
    p[4] = C_VERSION
    p[5] = c[0]
    p[6] = c[1]
    p[7] = c[2]
    p[8] = <uint8_t>ndim
    for i in range(9, 16):
        p[i] = 0
    _put64(p + 16, offset)
    for i in range(ndim):
        _put64(p + C_FIXED + 8 * i, <uint64_t>(0 if shape == NULL else shape[i]))
        _put64(p + C_FIXED + 8 * (ndim + i), <uint64_t>(0 if strides == NULL else strides[i]))
    return out


def encode(array, *, max_span_ratio=DEFAULT_MAX_SPAN_RATIO):
    """Header and buffer for `array`, without copying its data.

    The buffer is a read-only memoryview of the array's own memory span (it keeps the array alive);
    do not write to the array until the frame is sent. The one copy: a view whose span exceeds
    `max_span_ratio` times its data is compacted to C order first (pass ``math.inf`` to never copy).
    Non-arrays go through ``np.asarray``. Unsupported dtypes and ndim > 32 raise TensorFrameError.
    """
    a = array if isinstance(array, np.ndarray) else np.asarray(array)
    cdef str dstr = a.dtype.str
    cdef bytes code = _STR_TO_CODE.get(dstr)
    if code is None:
        raise TensorFrameError(f"unsupported dtype {dstr!r}")
    cdef Py_ssize_t ndim = a.ndim
    if ndim > C_MAX_NDIM:
        raise TensorFrameError(f"ndim {ndim} exceeds {MAX_NDIM}")
    cdef Py_ssize_t i, itemsize = (<const uint8_t*>PyBytes_AS_STRING(code))[2]
    cdef Py_ssize_t lo, hi, reach, span, nbytes
    cdef double ratio = max_span_ratio
    cdef _Span out
    cdef Py_ssize_t dims[C_MAX_NDIM]
    cdef Py_ssize_t steps[C_MAX_NDIM]
    cdef bint compacted = False
    for i, dim in enumerate(a.shape):
        dims[i] = dim
    if a.size == 0:  # nothing to ship: an empty buffer, zero strides
        return _header(code, 0, ndim, dims, NULL), memoryview(_EMPTY)
    while True:  # a second pass only after compacting a too-sparse view
        # The array's own strides, not the buffer export's: numpy "cleans" the strides of
        # length-1 axes when it exports a buffer, and the header keeps the array's layout.
        lo = hi = 0
        for i, step in enumerate(a.strides):
            steps[i] = step
            reach = steps[i] * (dims[i] - 1)
            if reach < 0:
                lo += reach
            else:
                hi += reach
        span = hi - lo + itemsize
        nbytes = a.nbytes
        if compacted or not <double>span > ratio * <double>nbytes:
            break
        a = np.array(a, order="C")  # the copy: shipping the span would cost more than this
        compacted = True
    out = _Span.__new__(_Span)
    PyObject_GetBuffer(a, &out.source, PyBUF_STRIDES)  # pins the memory; buf is element [0...0]
    out.held = True
    out.ptr = <char*>out.source.buf + lo
    out.shape[0] = span
    out.strides[0] = 1
    header = _header(code, <uint64_t>(-lo), ndim, dims, steps)
    return header, memoryview(out)


# -- decode -----------------------------------------------------------------------------------

cdef int _contiguous(object obj, Py_buffer* view, str what) except -1:
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except BufferError:
        raise TensorFrameError(f"{what} is not a contiguous buffer") from None
    return 0


cdef tuple _ints(const uint8_t* p, Py_ssize_t n):
    return tuple([<int64_t>_get64(p + 8 * i) for i in range(n)])


cdef bint _inside(const uint8_t* dims, Py_ssize_t ndim, Py_ssize_t itemsize, uint64_t offset,
                  uint64_t size) noexcept nogil:
    """Whether every element of a non-empty array lies in [0, size); needs offset <= size.

    Element starts span [offset - down, offset + up]. Each term and each running sum is compared
    with `size` before it can grow past 2 * size, so nothing overflows (size <= PY_SSIZE_T_MAX).
    """
    cdef uint64_t up = 0, down = 0, dim, mag, reach
    cdef int64_t stride
    cdef Py_ssize_t i
    for i in range(ndim):
        dim = _get64(dims + 8 * i)
        if dim == 1:
            continue
        stride = <int64_t>_get64(dims + 8 * (ndim + i))
        mag = <uint64_t>stride if stride >= 0 else (<uint64_t>0) - <uint64_t>stride
        if mag > size // (dim - 1):
            return False
        reach = mag * (dim - 1)
        if stride >= 0:
            up += reach
            if up > size:
                return False
        else:
            down += reach
            if down > size:
                return False
    return down <= offset and up + <uint64_t>itemsize <= size - offset


def decode(header, buffer):
    """The read-only ndarray that `header` describes over `buffer`'s memory (no copy).

    `header` and `buffer` may be any C-contiguous bytes-like objects (bytes, memoryview, zmq Frame,
    mmap). The array keeps `buffer` alive. Raises TensorFrameError for any header or layout that is
    malformed or reaches outside the buffer.
    """
    cdef Py_buffer hv
    cdef Py_buffer bv
    cdef const uint8_t* p
    cdef Py_ssize_t n, ndim, i, expected, itemsize
    cdef uint64_t offset, size, total, dim
    cdef int64_t sdim
    cdef bint empty = False
    _contiguous(header, &hv, "header")
    try:
        n = hv.len
        p = <const uint8_t*>hv.buf
        if n < C_FIXED:
            raise TensorFrameError(f"truncated header: {n} bytes, need at least {FIXED_SIZE}")
        if p[0] != 76 or p[1] != 71 or p[2] != 84 or p[3] != 70:
            raise TensorFrameError(
                f"bad magic {bytes(p[:4])!r}: not a tensor frame header"
            )
        if p[4] != C_VERSION:
            raise TensorFrameError(f"unsupported tensor frame version {p[4]}")
        code = bytes(p[5:8])
        dtype = _CODE_TO_DTYPE.get(code)
        if dtype is None:
            raise TensorFrameError(f"unknown dtype code {code!r}")
        itemsize = p[7]
        ndim = p[8]
        if ndim > C_MAX_NDIM:
            raise TensorFrameError(f"ndim {ndim} exceeds {MAX_NDIM}")
        for i in range(9, 16):
            if p[i]:
                raise TensorFrameError("reserved header bytes are not zero")
        expected = C_FIXED + 16 * ndim
        if n != expected:
            raise TensorFrameError(f"header is {n} bytes, expected {expected} for ndim {ndim}")
        offset = _get64(p + 16)
        for i in range(ndim):
            sdim = <int64_t>_get64(p + C_FIXED + 8 * i)
            if sdim < 0:
                raise TensorFrameError(f"negative dimension {sdim} on axis {i}")
        # itemsize * the product of the non-zero dims must fit a Py_ssize_t; checked before each
        # multiply, so neither this nor numpy's own size arithmetic can overflow.
        total = <uint64_t>itemsize
        for i in range(ndim):
            dim = _get64(p + C_FIXED + 8 * i)
            if dim == 0:
                empty = True
            elif total > SSIZE_MAX // dim:
                raise TensorFrameError(
                    f"shape {_ints(p + C_FIXED, ndim)} overflows the array size"
                )
            else:
                total *= dim
        _contiguous(buffer, &bv, "buffer")
        size = <uint64_t>bv.len
        PyBuffer_Release(&bv)
        if offset > size:
            raise TensorFrameError(f"offset {offset} is past the end of the {size}-byte buffer")
        if not empty and not _inside(p + C_FIXED, ndim, itemsize, offset, size):
            raise TensorFrameError(
                f"shape {_ints(p + C_FIXED, ndim)} with strides "
                f"{_ints(p + C_FIXED + 8 * ndim, ndim)} at offset {offset} reaches outside "
                f"the {size}-byte buffer"
            )
        shape = _ints(p + C_FIXED, ndim)
        strides = _ints(p + C_FIXED + 8 * ndim, ndim)
    finally:
        PyBuffer_Release(&hv)
    # ndarray(buffer=...) keeps a reference to the exporter but not a buffer export (it even
    # unwraps memoryviews), so a bytearray could be resized, or an mmap closed, under the array.
    # frombuffer's array does hold the export, for as long as the result lives.
    raw = np.frombuffer(buffer, np.uint8)
    if raw.shape[0] != <Py_ssize_t>size:  # only an exporter that changed size meanwhile
        raise TensorFrameError("buffer changed size while decoding")
    try:
        out = np.ndarray(shape, dtype, buffer=raw, offset=offset, strides=strides)
    except (ValueError, TypeError) as exc:  # not expected after the checks above; never leak
        raise TensorFrameError(f"numpy rejected the layout: {exc}") from None
    out.flags.writeable = False
    return out
