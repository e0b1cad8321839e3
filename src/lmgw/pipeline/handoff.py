"""Tensors on their way between native legs: what one worker sent, as the next one can read it.

A message's tensors are :class:`~lmgw.protocol.TensorRef` s over its payload frames, or over
shared-memory segments (``TensorRef.shm``) when both ends of a session share a host
(``Session.shm``). The gateway forwards what an encoder or a prefill worker sent to the next
leg's worker without decoding it (:func:`relay_tensors`), and before each send fits the tensors
to that worker (:func:`for_peer`): big frames go into this process's shared memory for a worker
on this host, and a segment the next worker cannot open (another host) is read here and sent
as a frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from ..protocol.messages import ShmHandle as WireShmHandle
from ..protocol.messages import TensorRef

__all__ = ["for_peer", "pin", "relay_tensors", "release_pins", "tensor_bytes"]

log = logging.getLogger("lmgw.pipeline")

_THREAD_BYTES = 1 << 20
"""Copies at least this big run in a worker thread (the event loop keeps serving)."""


def relay_tensors(
    tensors: list[TensorRef],
    payload: list[Any],
    refs: Sequence[TensorRef],
    frames: Sequence[Any],
) -> list[int]:
    """Append ``refs`` (an answer's tensors over its payload ``frames``) to a request's
    ``tensors`` and ``payload``, the frames zero-copy; returns their indexes in ``tensors``.
    A tensor in shared memory moves as its handle (no frame)."""
    first = len(tensors)
    for ref in refs:
        if ref.shm is None:
            tensors.append(TensorRef(len(payload), ref.header))
            payload.append(frames[ref.frame])
        else:
            tensors.append(ref)
    return list(range(first, len(tensors)))


def pin(refs: Sequence[TensorRef], pins: list[Callable[[], None]]) -> None:
    """Map the shared-memory segments of ``refs`` (no pages touched) and keep them mapped
    until :func:`release_pins`: their sender cannot reuse a segment a reader holds, so every
    leg the handle is relayed to, and a retry, reads this tensor. Raises ShmError for a
    segment that is already gone or reused."""
    for ref in refs:
        if ref.shm is not None:
            from ..transport.shm import map_shm

            buffer, close = map_shm(ref.shm, populate=False)
            pins.append(partial(_unpin, buffer, close))  # the buffer keeps the mapping


def _unpin(buffer: memoryview, close: Callable[[], None]) -> None:
    buffer.release()
    close()


def release_pins(pins: list[Callable[[], None]]) -> None:
    for close in pins:
        close()
    pins.clear()


def tensor_bytes(refs: Sequence[TensorRef], frames: Sequence[Any]) -> int:
    """The bytes of ``refs``: their payload frames', or their shared-memory data sizes."""
    return sum(
        memoryview(frames[ref.frame]).nbytes if ref.shm is None else ref.shm.size for ref in refs
    )


async def for_peer(
    refs: Sequence[TensorRef], payload: Sequence[Any], *, shm: bool, threshold: int
) -> tuple[list[TensorRef], list[Any]] | None:
    """``refs`` over ``payload`` as a worker reads them: with ``shm`` (it shares this host),
    frames of at least ``threshold`` bytes (0: none) copied into this process's segments;
    without, segments read here into frames. None when nothing needs to change (the common
    case: no copy, no new lists). Raises ShmError for a segment that is gone or stale."""
    if shm:
        if not threshold or not any(
            ref.shm is None and memoryview(payload[ref.frame]).nbytes >= threshold for ref in refs
        ):
            return None
    elif not any(ref.shm is not None for ref in refs):
        return None
    out: list[TensorRef] = []
    frames: list[Any] = []
    for ref in refs:
        if ref.shm is None:
            frame = payload[ref.frame]
            moved = None
            if shm and memoryview(frame).nbytes >= threshold:
                moved = await _to_segment(ref.header, frame)
            if moved is not None:
                out.append(moved)
            else:
                out.append(TensorRef(len(frames), ref.header))
                frames.append(frame)
        elif shm:
            out.append(ref)  # the worker opens the segment itself
        else:
            frames.append(await _read_segment(ref.shm))
            out.append(TensorRef(len(frames) - 1, ref.shm.header))
    return out, frames


async def _to_segment(header: bytes, frame: Any) -> TensorRef | None:
    """The tensor copied into a segment of this process, or None when ``/dev/shm`` has no
    room for it (it then goes as a frame)."""
    from ..transport.shm import ShmError, default_pool
    from ..transport.tensors import decode

    array = decode(header, frame)
    try:
        handle = await trio.to_thread.run_sync(default_pool().put, array)
    except ShmError as exc:
        log.warning("a tensor of %d bytes sent as a frame: %s", array.nbytes, exc)
        return None
    wire = WireShmHandle(handle.name, handle.size, handle.header, handle.generation)
    return TensorRef(0, handle.header, wire)


async def _read_segment(handle: WireShmHandle) -> bytes:
    from ..transport.shm import map_shm

    buffer, close = map_shm(handle, populate=False)
    try:
        if buffer.nbytes < _THREAD_BYTES:
            return bytes(buffer)
        return await trio.to_thread.run_sync(bytes, buffer)
    finally:
        buffer.release()
        close()
