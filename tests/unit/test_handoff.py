"""``lmgw.pipeline.handoff``: tensors between native legs, as frames or shared memory."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from lmgw.pipeline.handoff import Pins, bytes_by_path, for_peer, relay_tensors
from lmgw.protocol.messages import ShmHandle as WireShmHandle
from lmgw.protocol.messages import TensorRef
from lmgw.transport import shm
from lmgw.transport.tensors import decode, pack_tensors


@pytest.fixture
def pool():
    with shm.ShmPool(f"hof{id(object()) % 10**6}") as p:
        yield p


def in_shm(pool: shm.ShmPool, array: np.ndarray) -> TensorRef:
    h = pool.put(array)
    return TensorRef(0, h.header, WireShmHandle(h.name, h.size, h.header, h.generation))


def test_relay_appends_frames_zero_copy_and_handles_as_they_are(pool: shm.ShmPool) -> None:
    refs, frames = pack_tensors([np.arange(4), np.ones((2, 2))])
    handle = in_shm(pool, np.arange(3))
    tensors, payload = [TensorRef(0, b"media")], [b"pixels"]
    got = relay_tensors(tensors, payload, [refs[1], handle, refs[0]], frames)
    assert got == [1, 2, 3]
    assert payload[1] is frames[1] and payload[2] is frames[0]
    assert [t.frame for t in tensors] == [0, 1, 0, 2] and tensors[2] is handle
    np.testing.assert_array_equal(decode(tensors[3].header, payload[2]), np.arange(4))
    assert bytes_by_path(tensors[1:], payload) == {"frames": 32 + 32, "shm": 24}


async def test_for_peer_changes_nothing_it_need_not() -> None:
    refs, frames = pack_tensors([np.zeros(10)])
    assert await for_peer(refs, frames, shm=False, threshold=1) is None  # frames for anyone
    assert await for_peer(refs, frames, shm=True, threshold=0) is None  # shm off
    assert await for_peer(refs, frames, shm=True, threshold=81) is None  # below it


async def test_for_peer_fits_tensors_to_the_peers_host(pool: shm.ShmPool) -> None:
    small, big = np.arange(3, dtype=np.int8), np.arange(64.0).reshape(8, 8)[:, ::2]
    refs, frames = pack_tensors([small, big])
    fitted = await for_peer(refs, frames, shm=True, threshold=64)  # same host: big one by shm
    assert fitted is not None
    out, payload = fitted
    assert out[0].shm is None and out[1].shm is not None and len(payload) == 1
    got, close = shm.from_shm(out[1].shm)
    np.testing.assert_array_equal(got, big)
    del got
    close()
    # another host: a handle (the prefill worker's) is read here and sent as bytes
    handle = in_shm(pool, big)
    back = await for_peer([refs[0], handle], frames, shm=False, threshold=64)
    assert back is not None
    out, payload = back
    assert [r.shm for r in out] == [None, None] and [r.frame for r in out] == [0, 1]
    np.testing.assert_array_equal(decode(out[1].header, payload[1]), big)


def test_a_pinned_segment_is_not_reused_until_released(pool: shm.ShmPool) -> None:
    ref = in_shm(pool, np.arange(100))
    pins = Pins()
    pins.add([ref])
    pins.add([ref])  # once per segment
    gc.collect()
    assert pool.put(np.arange(100)).name != ref.shm.name  # a reader holds it
    pins.release()
    assert pins.buffer(ref.shm) is None
    gc.collect()
    assert pool.put(np.arange(100)).name == ref.shm.name
    with pytest.raises(shm.ShmError, match="stale"):
        Pins().add([ref])


async def test_a_held_segment_whose_file_is_gone_goes_as_a_frame(pool: shm.ShmPool) -> None:
    """The prefill worker exited (its pool unlinked the file) between its answer and the
    decode leg: the next worker could not open the handle, so the gateway sends the bytes
    it still maps. Not held: the same is an error."""
    kv = np.arange(64.0)
    ref = in_shm(pool, kv)
    pins = Pins()
    pins.add([ref])
    assert await for_peer([ref], [], shm=True, threshold=1, pins=pins) is None  # relayed as is
    import os

    os.unlink(os.path.join(shm.DEFAULT_DIR, ref.shm.name))
    fitted = await for_peer([ref], [], shm=True, threshold=1, pins=pins)
    assert fitted is not None
    out, payload = fitted
    assert out[0].shm is None
    np.testing.assert_array_equal(decode(out[0].header, payload[0]), kv)
    with pytest.raises(shm.ShmError, match="gone"):
        await for_peer([ref], [], shm=True, threshold=1)
    pins.release()


async def test_a_full_dev_shm_sends_frames_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs pages are taken when a segment is made (``posix_fallocate``): a full ``/dev/shm``
    (a container's 64 MiB) is an error there, not a SIGBUS in the middle of the copy, and the
    tensor goes as a frame."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    with pytest.raises(shm.ShmError, match="no room"):
        shm.ShmPool("hofull").put(np.zeros(1 << 20))
    refs, frames = pack_tensors([np.ones(1 << 21)])  # bigger than any warm segment
    fitted = await for_peer(refs, frames, shm=True, threshold=1)
    assert fitted is not None
    out, payload = fitted
    assert out[0].shm is None and len(payload) == 1
    np.testing.assert_array_equal(decode(out[0].header, payload[0]), np.ones(1 << 21))


def test_a_hand_off_lost_before_the_gateway_pins_it_is_a_502() -> None:
    from lmgw.errors import GatewayError
    from lmgw.pipeline.native import _pin

    gone = TensorRef(0, b"h", WireShmHandle("lmgw-1-999999-0", 16, b"h", 1))
    with pytest.raises(GatewayError) as info:
        _pin([gone], Pins(), "the prefill's KV")
    assert info.value.status == 502 and "the prefill's KV in shared memory was lost" in str(
        info.value
    )
    _pin([TensorRef(0, b"h")], Pins(), "frames only: nothing to pin")
