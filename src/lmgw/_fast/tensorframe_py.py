"""Pure-Python twin of `tensorframe.pyx`: same header bytes, same arrays, same errors.

A tensor travels as two ZeroMQ frames: a small header (this module's format, carried in
`TensorRef.header`) and the raw memory of the array, sent with ``copy=False``. Neither side copies:
`encode` hands out the array's own memory span and `decode` wraps the received frame in a read-only
ndarray. That makes `decode` a trust boundary (the header comes off the wire and numpy does not
bounds-check strides against a buffer), so every layout is checked against the buffer before numpy
sees it, and anything malformed raises `TensorFrameError` and nothing else.

This twin is the reference the property tests compare the extension against, and the fallback when
the extension is not built. It also owns what both share (the error class, the dtype table, the
constants), so the two can never disagree about them.

Header (integers little-endian)::

    0   4  magic b"LGTF"
    4   1  version (1)
    5   3  dtype code: byte order ('<', '>', '|'), kind ('b', 'i', 'u', 'f', 'c'), itemsize
           (numpy's ``dtype.str``, e.g. '<f4' -> b"<f\\x04")
    8   1  ndim (0..32)
    9   7  reserved, zero
    16  8  offset: byte offset of element [0, ..., 0] in the buffer
    24  8n shape (int64, >= 0)
    .   8n strides in bytes (int64, may be negative or zero)

The buffer is the smallest span of memory covering every element, so views (slices with steps,
transposes, reversed or broadcast axes) travel without a copy as span + strides. Zero-size arrays
travel as an empty buffer with zero strides.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any

import numpy as np

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

MAGIC = b"LGTF"
VERSION = 1
FIXED_SIZE = 24
"""Header bytes before shape and strides; a header is exactly FIXED_SIZE + 16 * ndim bytes."""
MAX_NDIM = 32
"""numpy 1.x's limit (2.x allows 64): a header any supported numpy can decode."""
DEFAULT_MAX_SPAN_RATIO = 2.0
"""`encode` copies a view whose memory span exceeds this many times its data (a[::16] would
otherwise ship 16x its bytes); below it, shipping the span is cheaper than compacting it."""

_SSIZE_MAX = sys.maxsize
_HEAD = struct.Struct("<4sB3sB7sQ")
_ZERO7 = bytes(7)

DTYPES: tuple[str, ...] = (
    "|b1",
    "|i1",
    "|u1",
    *(f"{order}{kind}{size}" for order in "<>" for kind in "iu" for size in (2, 4, 8)),
    *(f"{order}f{size}" for order in "<>" for size in (2, 4, 8)),
    *(f"{order}c{size}" for order in "<>" for size in (8, 16)),
)
"""Every supported numpy ``dtype.str``: bool, int8..64, uint8..64, float16/32/64, complex64/128,
both byte orders (one-byte types have none). No bfloat16, longdouble, datetimes or records."""


def _code(dtype_str: str) -> bytes:
    return bytes([ord(dtype_str[0]), ord(dtype_str[1]), int(dtype_str[2:])])


_STR_TO_CODE: dict[str, bytes] = {s: _code(s) for s in DTYPES}
_CODE_TO_DTYPE: dict[bytes, np.dtype] = {_code(s): np.dtype(s) for s in DTYPES}


class TensorFrameError(ValueError):
    """A tensor frame that cannot be encoded or decoded. The only error decoding raises for bad
    bytes (wrong *types* of argument are a TypeError)."""


# -- encode -----------------------------------------------------------------------------------


class _Span:
    """Exposes [ptr, ptr + size) of `owner`'s memory as bytes while keeping `owner` alive."""

    __slots__ = ("__array_interface__", "_owner")

    def __init__(self, owner: np.ndarray, ptr: int, size: int) -> None:
        self._owner = owner
        self.__array_interface__ = {
            "data": (ptr, True),
            "shape": (size,),
            "typestr": "|u1",
            "version": 3,
        }


def _extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """Lowest and highest byte offset of an element start, relative to element [0, ..., 0]."""
    lo = hi = 0
    for dim, stride in zip(shape, strides, strict=True):
        reach = stride * (dim - 1)
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi


def span_of(array: np.ndarray) -> int:
    """Bytes of memory `array` spans (what `encode` ships unless that exceeds the copy ratio)."""
    if array.size == 0:
        return 0
    lo, hi = _extent(array.shape, array.strides)
    return hi - lo + array.itemsize


def _pack(code: bytes, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> bytes:
    ndim = len(shape)
    return _HEAD.pack(MAGIC, VERSION, code, ndim, _ZERO7, offset) + struct.pack(
        f"<{2 * ndim}q", *shape, *strides
    )


def encode(
    array: Any, *, max_span_ratio: float = DEFAULT_MAX_SPAN_RATIO
) -> tuple[bytes, memoryview]:
    """Header and buffer for `array`, without copying its data.

    The buffer is a read-only memoryview of the array's own memory span (it keeps the array alive);
    do not write to the array until the frame is sent. The one copy: a view whose span exceeds
    `max_span_ratio` times its data is compacted to C order first (pass ``math.inf`` to never copy).
    Non-arrays go through ``np.asarray``. Unsupported dtypes and ndim > 32 raise TensorFrameError.
    """
    a = array if isinstance(array, np.ndarray) else np.asarray(array)
    code = _STR_TO_CODE.get(a.dtype.str)
    if code is None:
        raise TensorFrameError(f"unsupported dtype {a.dtype.str!r}")
    if a.ndim > MAX_NDIM:
        raise TensorFrameError(f"ndim {a.ndim} exceeds {MAX_NDIM}")
    if a.size == 0:
        return _pack(code, 0, a.shape, (0,) * a.ndim), memoryview(b"")
    lo, hi = _extent(a.shape, a.strides)
    span = hi - lo + a.itemsize
    if span > max_span_ratio * a.nbytes:
        a = np.array(a, order="C")  # the copy: shipping the span would cost more than this
        lo, span = 0, a.nbytes
    ptr = a.__array_interface__["data"][0] + lo
    return _pack(code, -lo, a.shape, a.strides), memoryview(np.asarray(_Span(a, ptr, span)))


# -- decode -----------------------------------------------------------------------------------


def _contiguous(obj: Any, what: str) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise TensorFrameError(f"{what} is not a contiguous buffer")
    return view


def decode(header: Any, buffer: Any) -> np.ndarray:
    """The read-only ndarray that `header` describes over `buffer`'s memory (no copy).

    `header` and `buffer` may be any C-contiguous bytes-like objects (bytes, memoryview, zmq Frame,
    mmap). The array keeps `buffer` alive. Raises TensorFrameError for any header or layout that is
    malformed or reaches outside the buffer.
    """
    head = _contiguous(header, "header")
    n = head.nbytes
    if n < FIXED_SIZE:
        raise TensorFrameError(f"truncated header: {n} bytes, need at least {FIXED_SIZE}")
    magic, version, code, ndim, reserved, offset = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise TensorFrameError(f"bad magic {magic!r}: not a tensor frame header")
    if version != VERSION:
        raise TensorFrameError(f"unsupported tensor frame version {version}")
    dtype = _CODE_TO_DTYPE.get(code)
    if dtype is None:
        raise TensorFrameError(f"unknown dtype code {code!r}")
    if ndim > MAX_NDIM:
        raise TensorFrameError(f"ndim {ndim} exceeds {MAX_NDIM}")
    if reserved != _ZERO7:
        raise TensorFrameError("reserved header bytes are not zero")
    expected = FIXED_SIZE + 16 * ndim
    if n != expected:
        raise TensorFrameError(f"header is {n} bytes, expected {expected} for ndim {ndim}")
    dims = struct.unpack_from(f"<{2 * ndim}q", head, FIXED_SIZE)
    shape, strides = dims[:ndim], dims[ndim:]
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise TensorFrameError(f"negative dimension {dim} on axis {axis}")
    if math.prod(d for d in shape if d) * dtype.itemsize > _SSIZE_MAX:
        raise TensorFrameError(f"shape {shape} overflows the array size")
    body = _contiguous(buffer, "buffer")
    size = body.nbytes
    if offset > size:
        raise TensorFrameError(f"offset {offset} is past the end of the {size}-byte buffer")
    if 0 not in shape:
        lo, hi = _extent(shape, strides)
        if offset + lo < 0 or offset + hi + dtype.itemsize > size:
            raise TensorFrameError(
                f"shape {shape} with strides {strides} at offset {offset} reaches outside the "
                f"{size}-byte buffer"
            )
    try:
        # ndarray(buffer=...) keeps a reference to the exporter but not a buffer export (it even
        # unwraps memoryviews), so a bytearray could be resized, or an mmap closed, under the
        # array. frombuffer's array does hold the export, for as long as the result lives.
        raw = np.frombuffer(buffer, np.uint8)
        out = np.ndarray(shape, dtype, buffer=raw, offset=offset, strides=strides)
    except (ValueError, TypeError) as exc:  # not expected after the checks above; never leak
        raise TensorFrameError(f"numpy rejected the layout: {exc}") from None
    out.flags.writeable = False
    return out
