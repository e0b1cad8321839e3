"""Tensor frames: the Cython codec against its pure-Python twin, zero-copy, and the trust boundary.

Most checks say "both give the same answer": identical header bytes and buffers from `encode`,
identical arrays or identical errors from `decode`, for arrays of every supported dtype in both byte
orders, 0-d and 0-size shapes, and views (steps, negative steps, transposes, broadcasts, unaligned
starts). The rest pin what callers rely on: no copies (addresses are compared, not values), a
read-only result, and that a mutated header either decodes to a view lying inside its buffer or
raises TensorFrameError, never anything else.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import math
import mmap
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lmgw._fast import tensorframe_py as twin
from lmgw.protocol.messages import Encode, TensorRef, decode_frames, encode_frames
from lmgw.transport import tensors

try:
    from lmgw._fast import tensorframe as fast
except ImportError:  # not built: the comparisons skip, the twin is still checked
    fast = None

needs_fast = pytest.mark.skipif(
    fast is None, reason="extension not built (python setup.py build_ext --inplace)"
)
IMPLS = [pytest.param(twin, id="python")] + ([pytest.param(fast, id="cython")] if fast else [])
BOTH = [twin] + ([fast] if fast else [])
TensorFrameError = twin.TensorFrameError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

DTYPES = (
    hnp.boolean_dtypes()
    | hnp.integer_dtypes(endianness="?")
    | hnp.unsigned_integer_dtypes(endianness="?")
    | hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64))
    | hnp.complex_number_dtypes(endianness="?", sizes=(64, 128))
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]


def data_ptr(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def extent(array: np.ndarray) -> tuple[int, int]:
    """[first byte, one past the last byte] of `array`'s elements, relative to its data pointer."""
    lo = sum(s * (d - 1) for d, s in zip(array.shape, array.strides, strict=True) if s < 0)
    hi = sum(s * (d - 1) for d, s in zip(array.shape, array.strides, strict=True) if s > 0)
    return lo, hi + array.itemsize


@st.composite
def arrays(draw, max_side: int = 5) -> np.ndarray:
    """Arrays and views of them: steps (incl. negative), transposes, broadcasts, unaligned."""
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side))
    a = draw(hnp.arrays(dtype, shape))
    if draw(st.booleans()) and a.size:  # an unaligned copy inside a bigger byte buffer
        raw = np.zeros(a.nbytes + 1, np.uint8)
        b = np.ndarray(a.shape, a.dtype, buffer=raw, offset=1)
        b[...] = a
        a = b
    for op in draw(st.lists(st.sampled_from(["index", "transpose", "broadcast"]), max_size=3)):
        if op == "index":
            a = a[draw(hnp.basic_indices(a.shape, min_dims=0, allow_ellipsis=True))]
        elif op == "transpose":
            a = a.transpose(draw(st.permutations(range(a.ndim))))
        elif a.ndim < 6:
            a = np.broadcast_to(a, (draw(st.integers(0, 3)), *a.shape))
        if not isinstance(a, np.ndarray):  # an integer index of a 0-d array gives a scalar
            a = np.asarray(a)
    return a


def outcome(decode, header, buffer):
    """What `decode` did, comparable across implementations: the view's layout or the error."""
    try:
        out = decode(header, buffer)
    except (TensorFrameError, TypeError) as exc:
        return ("error", type(exc), str(exc))
    base = address(buffer) if memoryview(buffer).nbytes else None
    offset = None if base is None else data_ptr(out) - base
    return ("array", out.dtype.str, out.shape, out.strides, offset, out.flags.writeable)


# --- encode/decode round trip, both implementations --------------------------------------------


@SETTINGS
@given(a=arrays(), ratio=st.sampled_from([twin.DEFAULT_MAX_SPAN_RATIO, math.inf, 0.5]))
@example(a=np.arange(40, dtype=">i8")[::-3], ratio=math.inf)
@example(a=np.zeros((3, 0, 2), "<c16"), ratio=2.0)
@example(a=np.array(1.5, ">f2"), ratio=2.0)
def test_round_trip_is_zero_copy_and_identical(a: np.ndarray, ratio: float) -> None:
    encoded = [impl.encode(a, max_span_ratio=ratio) for impl in BOTH]
    header, buffer = encoded[0]
    for h, b in encoded[1:]:
        assert h == header
        assert bytes(b) == bytes(buffer)
    copied = a.size and twin.span_of(a) > ratio * a.nbytes
    for h, b in encoded:
        assert isinstance(b, memoryview)
        assert b.readonly
        if a.size == 0:
            assert b.nbytes == 0
        elif not copied:  # the frame is the array's own memory span: same address, no copy
            lo, hi = extent(a)
            assert b.nbytes == hi - lo
            assert address(b) == data_ptr(a) + lo
        else:
            assert b.nbytes == a.nbytes
        for impl in BOTH:
            out = impl.decode(h, b)
            assert out.dtype == a.dtype
            assert out.dtype.str == a.dtype.str  # byte order kept
            assert out.shape == a.shape
            assert out.tobytes() == a.tobytes()  # bitwise: NaN payloads, -0.0 included
            assert not out.flags.writeable
            if a.size:
                assert data_ptr(out) == address(b) + struct.unpack_from("<Q", h, 16)[0]
                if not copied:
                    assert out.strides == a.strides
    # any encoder's frame decodes identically with any decoder
    results = {outcome(impl.decode, h, b) for impl in BOTH for h, b in encoded}
    assert len({(r[0], *r[1:4]) for r in results}) == 1


# --- fuzz: mutated headers and buffers -----------------------------------------------------------

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2, 3, 4, 8, 2**31, 2**32, 2**61, 2**62, 2**63 - 1, -(2**63), -(2**62), -8]
) | st.integers(-(2**63), 2**63 - 1)


@st.composite
def mutated(draw) -> tuple[bytes, object]:
    a = draw(arrays(max_side=4))
    header, buffer = twin.encode(a, max_span_ratio=math.inf)
    h = bytearray(header)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "field", "ndim", "truncate", "extend", "dtype"]))
        if kind == "byte" and h:
            h[draw(st.integers(0, len(h) - 1))] = draw(st.integers(0, 255))
        elif kind == "field" and len(h) >= 24:
            slot = draw(st.integers(2, max(2, len(h) // 8 - 1)))  # offset, shape, strides
            if 8 * slot + 8 <= len(h):
                h[8 * slot : 8 * slot + 8] = struct.pack("<q", draw(EDGE_INTS))
        elif kind == "ndim" and len(h) > 8:
            h[8] = draw(st.sampled_from([0, 1, 4, 32, 33, 64, 255]))
        elif kind == "truncate":
            del h[draw(st.integers(0, len(h))) :]
        elif kind == "extend":
            h += draw(st.binary(min_size=1, max_size=24))
        elif kind == "dtype" and len(h) >= 8:
            h[5:8] = draw(st.sampled_from([b"<f\x04", b">c\x10", b"|b\x01", b"<f\x10", b"<b\x01"]))
    body = bytes(buffer)
    how = draw(st.sampled_from(["same", "truncate", "extend", "empty", "bytearray", "strided"]))
    if how == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "extend":
        body += bytes(draw(st.integers(1, 64)))
    elif how == "empty":
        body = b""
    elif how == "bytearray":
        body = bytearray(body)
    elif how == "strided":
        body = memoryview(np.frombuffer(body + body, np.uint8)[::2])
    return bytes(h), body


@needs_fast
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=mutated())
def test_mutated_frames_agree_and_stay_in_bounds(case: tuple[bytes, object]) -> None:
    check_agree_in_bounds(*case)


SMALL_INTS = st.integers(-24, 24)


@st.composite
def layouts(draw) -> tuple[bytes, bytes]:
    """Headers with valid framing and arbitrary layouts: the bounds checks' own input space."""
    ndim = draw(st.integers(0, 4))
    shape = draw(
        st.lists(
            st.integers(0, 4) | EDGE_INTS.filter(lambda v: v < 2**62), min_size=ndim, max_size=ndim
        )
    )
    strides = draw(st.lists(SMALL_INTS | EDGE_INTS, min_size=ndim, max_size=ndim))
    offset = draw(st.integers(0, 72) | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
    code = draw(st.sampled_from([b"|u\x01", b"<i\x02", b">f\x04", b"<c\x10"]))
    return make_header(tuple(shape), tuple(strides), offset, code), bytes(draw(st.integers(0, 72)))


def check_agree_in_bounds(header: bytes, buffer) -> None:
    got = outcome(fast.decode, header, buffer)
    assert got == outcome(twin.decode, header, buffer)
    if got[0] == "error":
        assert got[1] is TensorFrameError or "bytes-like" in got[2]
        assert not got[2].startswith("numpy rejected")  # our checks come first, always
        return
    out = fast.decode(header, buffer)
    if out.size:
        lo, hi = extent(out)
        start = data_ptr(out) - address(buffer)
        assert start + lo >= 0 and start + hi <= memoryview(buffer).nbytes
        if out.nbytes <= 1 << 16:
            out.tobytes()  # every element is readable


@needs_fast
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=layouts())
def test_random_layouts_agree_and_stay_in_bounds(case: tuple[bytes, bytes]) -> None:
    check_agree_in_bounds(*case)


@needs_fast
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    header=st.binary(max_size=120).map(lambda b: twin.MAGIC + b"\x01" + b) | st.binary(max_size=60),
    size=st.integers(0, 300),
)
def test_garbage_headers_agree(header: bytes, size: int) -> None:
    buffer = bytes(size)
    assert outcome(fast.decode, header, buffer) == outcome(twin.decode, header, buffer)


# --- malformed input, case by case ---------------------------------------------------------------


def make_header(
    shape=(4,),
    strides=None,
    offset=0,
    code=b"<f\x04",
    ndim=None,
    magic=twin.MAGIC,
    version=1,
    reserved=bytes(7),
) -> bytes:
    if strides is None:
        strides = (4,) * len(shape)
    n = len(shape) if ndim is None else ndim
    fixed = struct.pack("<4sB3sB7sQ", magic, version, code, n, reserved, offset)
    return fixed + struct.pack(f"<{2 * len(shape)}q", *shape, *strides)


BAD = [
    (b"", bytes(16), "truncated header: 0 bytes, need at least 24"),
    (make_header()[:23], bytes(16), "truncated header: 23 bytes"),
    (make_header(magic=b"LGW\x01"), bytes(16), "bad magic"),
    (make_header(version=2), bytes(16), "unsupported tensor frame version 2"),
    (make_header(code=b"<f\x10"), bytes(64), "unknown dtype code"),  # longdouble
    (make_header(code=b"|f\x04"), bytes(16), "unknown dtype code"),  # no byte order
    (make_header(code=b"<b\x01"), bytes(16), "unknown dtype code"),  # bool has none
    (make_header(code=b"<V\x04"), bytes(16), "unknown dtype code"),
    (make_header(shape=(1,) * 33), bytes(16), "ndim 33 exceeds 32"),
    (make_header(reserved=b"\x00" * 6 + b"\x01"), bytes(16), "reserved header bytes"),
    (make_header() + b"\x00", bytes(16), "header is 41 bytes, expected 40 for ndim 1"),
    (make_header(ndim=2), bytes(16), "header is 40 bytes, expected 56 for ndim 2"),
    (make_header(shape=(2, -1), strides=(4, 4)), bytes(16), "negative dimension -1 on axis 1"),
    (make_header(shape=(2**62, 2**62), strides=(0, 0)), bytes(4), "overflows the array size"),
    (make_header(shape=(2**61,), strides=(0,)), bytes(4), "overflows the array size"),
    (make_header(shape=(0, 2**62), strides=(0, 0)), b"", "overflows the array size"),
    (make_header(offset=17), bytes(16), "offset 17 is past the end of the 16-byte buffer"),
    (make_header(offset=2**64 - 1), bytes(16), "offset 18446744073709551615 is past the end"),
    (make_header(), bytes(15), "reaches outside the 15-byte buffer"),
    (make_header(), b"", "reaches outside the 0-byte buffer"),  # numpy would assume it fits
    (make_header(offset=4), bytes(16), "reaches outside"),
    (make_header(strides=(-4,)), bytes(16), "reaches outside"),  # [0] at 0, [3] at -12
    (make_header(strides=(-(2**63),)), bytes(2**10), "reaches outside"),
    (make_header(strides=(2**62,)), bytes(16), "reaches outside"),
    (make_header(shape=(2, 2**31), strides=(2**33, 4)), bytes(2**12), "reaches outside"),
    (make_header(shape=(3,) * 32, strides=(2**58,) * 32), bytes(64), "reaches outside"),
    (make_header(shape=(3,) * 32, strides=(-(2**58),) * 32), bytes(64), "reaches outside"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("header", "buffer", "message"), BAD)
def test_malformed_frames_raise_tensor_frame_error(impl, header, buffer, message) -> None:
    with pytest.raises(TensorFrameError, match=re.escape(message)) as info:
        impl.decode(header, buffer)
    assert isinstance(info.value, ValueError)


GOOD = [
    (make_header(offset=12, strides=(-4,)), bytes(16), (4,), (-4,)),  # a reversed view
    (make_header(shape=(2**61 - 1,), strides=(0,)), bytes(4), (2**61 - 1,), (0,)),  # broadcast
    (make_header(shape=(0, 5), strides=(2**62, -(2**63)), offset=16), bytes(16), (0, 5), None),
    (make_header(shape=(3, 0), offset=0), b"", (3, 0), None),
    (make_header(shape=(), strides=()), bytes(4), (), ()),
    (make_header(shape=(2,), strides=(1,), code=b">i\x08"), bytes(9), (2,), (1,)),  # overlapping
    (make_header(shape=(4,), strides=(4,), offset=1), bytes(17), (4,), (4,)),  # unaligned
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("header", "buffer", "shape", "strides"), GOOD)
def test_edge_layouts_decode(impl, header, buffer, shape, strides) -> None:
    out = impl.decode(header, buffer)
    assert out.shape == shape
    if strides is not None:
        assert out.strides == strides
    assert not out.flags.writeable


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_argument_types(impl) -> None:
    header, buffer = impl.encode(np.arange(4, dtype=np.float32))
    with pytest.raises(TypeError, match="header must be a bytes-like object, not str"):
        impl.decode("LGTF", buffer)
    with pytest.raises(TypeError, match="buffer must be a bytes-like object, not int"):
        impl.decode(header, 5)
    strided = memoryview(np.zeros(8, np.float32))[::2]
    with pytest.raises(TensorFrameError, match="buffer is not a contiguous buffer"):
        impl.decode(header, strided)
    with pytest.raises(TensorFrameError, match="header is not a contiguous buffer"):
        impl.decode(memoryview(header + header)[::2], buffer)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "array",
    [
        np.array([object()]),
        np.array(["ab"]),
        np.zeros(2, "M8[s]"),
        np.zeros(2, "i4,f4"),
        np.zeros(2, np.longdouble),
        np.zeros(2, "V4"),
        np.zeros((1,) * 33, np.uint8),
    ],
    ids=["object", "str", "datetime", "record", "longdouble", "void", "33d"],
)
def test_unsupported_arrays_are_refused(impl, array) -> None:
    with pytest.raises(TensorFrameError, match=r"unsupported dtype|ndim 33"):
        impl.encode(array)


# --- zero-copy, lifetime, read-only --------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_views_ship_their_span_not_a_copy(impl) -> None:
    base = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    for view in [base, base.T, base[::-1], base[:, ::2], base[1:5, 2:7], base[::-2, ::-1]]:
        header, buffer = impl.encode(view)
        lo, hi = extent(view)
        assert address(buffer) == data_ptr(view) + lo, view.strides
        assert buffer.nbytes == hi - lo <= base.nbytes
        np.testing.assert_array_equal(impl.decode(header, buffer), view)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_views_are_compacted_unless_told_not_to(impl) -> None:
    base = np.arange(1024, dtype=np.float64)
    sparse = base[::16]
    header, buffer = impl.encode(sparse)
    assert buffer.nbytes == sparse.nbytes  # compacted: 64 elements, not a 1009-element span
    assert not (data_ptr(base) <= address(buffer) < data_ptr(base) + base.nbytes)
    np.testing.assert_array_equal(impl.decode(header, buffer), sparse)
    header, buffer = impl.encode(sparse, max_span_ratio=math.inf)
    assert address(buffer) == data_ptr(base)
    assert buffer.nbytes == 1009 * 8
    np.testing.assert_array_equal(impl.decode(header, buffer), sparse)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_views_the_buffer_read_only(impl) -> None:
    header, _ = impl.encode(np.zeros((2, 3), np.int16))
    buffer = bytearray(12)
    out = impl.decode(header, buffer)
    buffer[0] = 7  # the array sees writes to the buffer: it is a view, not a copy
    assert out[0, 0] == 7
    with pytest.raises(ValueError, match="read-only"):
        out[0, 0] = 1


@pytest.mark.parametrize("impl", IMPLS)
def test_decoded_array_pins_its_buffer(impl) -> None:
    """numpy's ndarray(buffer=...) alone keeps no buffer export: without one, a bytearray could
    be reallocated, or an mmap unmapped, under the array (a use-after-free, not an exception)."""
    header, _ = impl.encode(np.zeros(4, np.float32))
    growable = bytearray(16)
    out = impl.decode(header, growable)
    with pytest.raises(BufferError):
        growable.extend(bytes(1 << 20))
    mapping = mmap.mmap(-1, mmap.PAGESIZE)
    out = impl.decode(header, memoryview(mapping))
    with pytest.raises(BufferError):
        mapping.close()
    del out
    gc.collect()
    mapping.close()  # once the array is gone


@pytest.mark.parametrize("impl", IMPLS)
def test_frame_keeps_the_array_alive(impl) -> None:
    header, buffer = impl.encode(np.full((64, 64), 3.0)[:, ::-1])
    gc.collect()
    assert np.all(impl.decode(header, buffer) == 3.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_frame_buffer_is_read_only(impl) -> None:
    _, buffer = impl.encode(np.zeros(4))
    assert buffer.readonly
    assert memoryview(buffer.obj).readonly
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * 8).from_buffer(buffer.obj)  # asks the exporter for a writable buffer


# --- over ZeroMQ, through the protocol's TensorRef -------------------------------------------


def test_tensors_travel_as_zero_copy_zmq_frames() -> None:
    arrays = [
        np.arange(100_000, dtype=">f4").reshape(100, 1000)[:, ::2],
        np.zeros((0, 3), np.int8),
        np.array(7, np.uint64),
        np.ones((300, 400), np.complex64).T,
    ]
    refs, frames = tensors.pack_tensors(arrays)
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://tensors")
        b.connect("inproc://tensors")
        a.send_multipart(encode_frames(Encode("r1", "m", tensors=refs), frames), copy=False)
        incoming = decode_frames(b.recv_multipart(copy=False))
        got = tensors.unpack_tensors(incoming.msg.tensors, incoming.payload)
        for want, out in zip(arrays, got, strict=True):
            assert out.dtype.str == want.dtype.str
            np.testing.assert_array_equal(out, want)
            assert not out.flags.writeable
        big = incoming.payload[refs[0].frame]  # above pyzmq's copy threshold: a real Frame
        assert data_ptr(got[0]) == address(big)
        a.close(linger=0)
        b.close(linger=0)
    finally:
        ctx.term()
    with pytest.raises(TensorFrameError, match="tensor frame 4 missing"):
        tensors.unpack_tensors([TensorRef(4, refs[0].header)], [])


# --- facade --------------------------------------------------------------------------------------


def test_facade_uses_extension_when_built() -> None:
    if importlib.util.find_spec("lmgw._fast.tensorframe") is None:
        pytest.skip("extension not built")
    assert tensors.IMPLEMENTATION == "cython"
    assert tensors.encode is fast.encode
    assert tensors.decode is fast.decode
    assert fast.TensorFrameError is twin.TensorFrameError is tensors.TensorFrameError


def test_facade_falls_back_to_twin(monkeypatch, caplog) -> None:
    """Load a private copy of the facade with the extension hidden; the real one is untouched."""
    monkeypatch.setitem(sys.modules, "lmgw._fast.tensorframe", None)  # makes the import fail
    spec = importlib.util.spec_from_file_location("_tensors_fallback", Path(tensors.__file__))
    module = importlib.util.module_from_spec(spec)
    with caplog.at_level(logging.WARNING):
        spec.loader.exec_module(module)
    assert module.IMPLEMENTATION == "python"
    assert module.encode is twin.encode
    assert "not built" in caplog.text
