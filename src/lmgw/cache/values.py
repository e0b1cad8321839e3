"""What the cache pool stores: a typed value and its metadata, and how both become bytes.

A value is ``bytes`` or a numpy array. Arrays travel as tensor frames
(:mod:`lmgw.transport.tensors`): a small header plus the raw memory span, so the shared-memory
tier hands out zero-copy views and the Redis tier stores the raw bytes, never a pickle.

:class:`Meta` goes with every entry in every tier: what the value is (kind, size, tensor header),
who produced it (worker id, role), when (wall clock, so other processes and hosts read it the
same way), until when it lives, and how often this tier answered it (``hits``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "KIND_ARRAY",
    "KIND_BYTES",
    "Entry",
    "Meta",
    "Value",
    "decode_meta",
    "encode_meta",
    "payload_of",
    "value_of",
]

KIND_BYTES = 0
KIND_ARRAY = 1

if TYPE_CHECKING:
    Value = bytes | np.ndarray
else:
    Value = Any  # numpy (~100 ms to import) loads with the first array, not with the gateway


class Meta(msgspec.Struct, array_like=True):
    """Per-entry metadata. ``hits`` is counted by the tier that holds this copy (each tier's
    entry has its own); the rest is fixed when the value is put."""

    kind: int
    size: int
    """Bytes of the value's payload (an array's memory span)."""
    created: float
    """Wall-clock time of the put (``time.time()``)."""
    expires: float = 0.0
    """Wall-clock deadline; 0: no deadline."""
    producer: str = ""
    """The worker (or gateway) that produced the value."""
    role: str = ""
    """Its role (``e``, ``p``, ``d``, ``pd``, ``gateway``...)."""
    header: bytes = b""
    """An array's tensor-frame header (empty for bytes)."""
    hits: int = 0

    def expired(self, now: float) -> bool:
        return 0.0 < self.expires <= now

    def unhit(self) -> Meta:
        """A copy for another tier (which counts its own hits)."""
        return msgspec.structs.replace(self, hits=0)


class Entry(NamedTuple):
    """A value with its metadata and the tier that answered it."""

    value: Value
    meta: Meta
    tier: str


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(Meta)


def encode_meta(meta: Meta) -> bytes:
    return _meta_encoder.encode(meta)


def decode_meta(data: bytes | memoryview) -> Meta:
    """Raises msgspec.ValidationError / DecodeError for bytes that are not a Meta."""
    return _meta_decoder.decode(data)


def payload_of(value: Any) -> tuple[int, bytes, Any]:
    """``(kind, tensor header, buffer)`` of a value; the buffer views an array's memory.

    Raises TypeError for a value that is neither bytes-like nor an array, TensorFrameError for
    an array dtype tensor frames do not carry.
    """
    if isinstance(value, bytes):
        return KIND_BYTES, b"", value
    numpy = sys.modules.get("numpy")  # an array exists only once numpy is loaded
    if numpy is not None and isinstance(value, numpy.ndarray):
        from ..transport.tensors import encode

        header, buffer = encode(value)
        return KIND_ARRAY, header, buffer
    if isinstance(value, bytearray | memoryview):
        return KIND_BYTES, b"", bytes(value)
    raise TypeError(f"the cache stores bytes or numpy arrays, not {type(value).__name__}")


def value_of(meta: Meta, buffer: Any) -> Value:
    """The value of ``meta`` over ``buffer``: bytes (a copy unless already bytes) or a read-only
    array viewing the buffer. Raises TensorFrameError for a header that does not fit it."""
    if meta.kind == KIND_ARRAY:
        from ..transport.tensors import decode

        return decode(meta.header, buffer)
    if isinstance(buffer, bytes):
        return buffer
    return bytes(buffer)
