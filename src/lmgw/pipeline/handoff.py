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
import os
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..protocol.messages import ShmHandle as WireShmHandle
from ..protocol.messages import TensorRef
from ..transport.shm_host import DEFAULT_DIR

__all__ = ["Pins", "bytes_by_path", "for_peer", "relay_tensors"]

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


class Pins:
    """The shared-memory hand-offs one request relays, held mapped until it ends.

    Their sender cannot reuse a segment a reader holds, so every leg a handle goes to (an
    encoder output to P and D, each choice of ``n > 1``, a retried decode) reads this tensor.
    And a segment whose file is gone by the time a leg is sent (its worker exited and
    unlinked it) can still be read from the mapping held here and sent as a frame."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, memoryview, Callable[[], None]]] = {}

    def add(self, refs: Sequence[TensorRef]) -> None:
        """Map the segments of ``refs`` (no pages touched). Raises ShmError for a segment
        that is already gone or reused."""
        for ref in refs:
            handle = ref.shm
            if handle is None or self.buffer(handle) is not None:
                continue
            from ..transport.shm import map_shm

            buffer, close = map_shm(handle, populate=False)
            self._held[handle.name] = (handle.generation, buffer, close)

    def buffer(self, handle: WireShmHandle) -> memoryview | None:
        """The held bytes of ``handle``'s tensor, or None."""
        held = self._held.get(handle.name)
        return held[1] if held is not None and held[0] == handle.generation else None

    def release(self) -> None:
        for _, buffer, close in self._held.values():
            buffer.release()
            close()
        self._held.clear()


def bytes_by_path(refs: Sequence[TensorRef], frames: Sequence[Any]) -> dict[str, int]:
    """The bytes of ``refs`` by how they came: ``frames`` (their payload frames) and ``shm``
    (their segments' data sizes)."""
    out = {"frames": 0, "shm": 0}
    for ref in refs:
        if ref.shm is None:
            out["frames"] += memoryview(frames[ref.frame]).nbytes
        else:
            out["shm"] += ref.shm.size
    return out


async def for_peer(
    refs: Sequence[TensorRef],
    payload: Sequence[Any],
    *,
    shm: bool,
    threshold: int,
    pins: Pins | None = None,
) -> tuple[list[TensorRef], list[Any]] | None:
    """``refs`` over ``payload`` as a worker reads them: with ``shm`` (it shares this host),
    frames of at least ``threshold`` bytes (0: none) copied into this process's segments, and
    handles relayed; without, segments read here into frames. A segment whose file is gone
    goes as a frame from ``pins`` when held there. None when nothing needs to change (the
    common case: no copy, no new lists). Raises ShmError for a segment that is gone and not
    held, or stale."""
    if shm:
        if not any(
            (ref.shm is None and threshold and memoryview(payload[ref.frame]).nbytes >= threshold)
            or (ref.shm is not None and not _exists(ref.shm))
            for ref in refs
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
            if shm and threshold and memoryview(frame).nbytes >= threshold:
                moved = await _to_segment(ref.header, frame)
            if moved is not None:
                out.append(moved)
            else:
                out.append(TensorRef(len(frames), ref.header))
                frames.append(frame)
        elif shm and _exists(ref.shm):
            out.append(ref)  # the worker opens the segment itself
        else:
            held = pins.buffer(ref.shm) if pins is not None else None
            frames.append(await (_copy(held) if held is not None else _read_segment(ref.shm)))
            out.append(TensorRef(len(frames) - 1, ref.shm.header))
    return out, frames


def _exists(handle: WireShmHandle) -> bool:
    return os.path.exists(os.path.join(DEFAULT_DIR, handle.name))


async def _copy(buffer: memoryview) -> bytes:
    if buffer.nbytes < _THREAD_BYTES:
        return bytes(buffer)
    return await trio.to_thread.run_sync(bytes, buffer)


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
        return await _copy(buffer)
    finally:
        buffer.release()
        close()
