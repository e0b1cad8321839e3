"""Tensor frames: numpy arrays as ZeroMQ payload frames, zero-copy on both ends.

Prefers the Cython extension (`lmgw._fast.tensorframe`); when it is not built the pure-Python twin
gives the same bytes, arrays and errors, only with more per-call overhead, and a warning says so.
The header format is described in `lmgw._fast.tensorframe_py`.

A message carries ``tensors: list[TensorRef(frame, header)]``; `pack_tensors` builds those refs
and the payload frames to send with ``copy=False``, and `unpack_tensors` turns the received
payload back into read-only arrays that view the frames' memory. Above ~16 MiB on one host,
`lmgw.transport.shm` is faster (DESIGN.md §3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lmgw._fast.tensorframe_py import (
    DEFAULT_MAX_SPAN_RATIO,
    DTYPES,
    MAX_NDIM,
    TensorFrameError,
    span_of,
)
from lmgw.protocol.messages import TensorRef

try:
    from lmgw._fast.tensorframe import decode, encode

    IMPLEMENTATION = "cython"
except ImportError:
    logging.getLogger(__name__).warning(
        "lmgw._fast.tensorframe is not built; using the pure-Python tensor frames (slower calls)"
    )
    from lmgw._fast.tensorframe_py import decode, encode

    IMPLEMENTATION = "python"

__all__ = [
    "DEFAULT_MAX_SPAN_RATIO",
    "DTYPES",
    "IMPLEMENTATION",
    "MAX_NDIM",
    "TensorFrameError",
    "decode",
    "encode",
    "pack_tensors",
    "span_of",
    "unpack_tensors",
]


def pack_tensors(arrays: Iterable[Any], first_frame: int = 0) -> tuple[list[TensorRef], list[Any]]:
    """Refs for a message's ``tensors`` and the payload frames they point to, in order.

    ``first_frame`` is the index of the first of these frames after the header (when the message
    has other payload frames before them). The frames view the arrays' memory: send them with
    ``copy=False`` and leave the arrays alone until ZeroMQ is done with them.
    """
    refs: list[TensorRef] = []
    frames: list[Any] = []
    for i, array in enumerate(arrays):
        header, buffer = encode(array)
        refs.append(TensorRef(first_frame + i, header))
        frames.append(buffer)
    return refs, frames


def unpack_tensors(refs: Sequence[TensorRef], payload: Sequence[Any]) -> list[np.ndarray]:
    """The arrays of ``refs`` over ``payload`` (frames after the header, zmq Frames or bytes).

    Read-only views, no copies. Raises TensorFrameError for a missing frame or a bad header.
    """
    out = []
    for ref in refs:
        if ref.frame >= len(payload):
            raise TensorFrameError(f"tensor frame {ref.frame} missing ({len(payload)} frames)")
        out.append(decode(ref.header, payload[ref.frame]))
    return out
