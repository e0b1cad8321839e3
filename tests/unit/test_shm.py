"""Shared-memory tensors: zero-copy round trips, segment reuse gated by the receiver's lock, stale
handles refused, and cleanup after crashes on either side (real processes, killed with SIGKILL).

Every test uses its own segment prefix in the real /dev/shm and checks that nothing is left.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest

from lmgw.transport import shm
from lmgw.transport.tensors import TensorFrameError

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.DEFAULT_DIR), reason="needs /dev/shm")


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"lmgwtest_{uuid.uuid4().hex[:12]}"
    yield name
    left = [f for f in os.listdir(shm.DEFAULT_DIR) if f.startswith(name + "-")]
    for f in left:
        os.unlink(os.path.join(shm.DEFAULT_DIR, f))
    assert not left, f"segments left behind: {left}"


@pytest.fixture
def pool(prefix: str) -> Iterator[shm.ShmPool]:
    with shm.ShmPool(prefix) as p:
        yield p


def segments(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir(shm.DEFAULT_DIR) if f.startswith(prefix + "-"))


def spawn(code: str, *args: str) -> subprocess.Popen:
    """A Python child with warnings as errors; it reads lines from stdin and prints to stdout."""
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wire(handle: shm.ShmHandle) -> shm.ShmHandle:
    """The handle as the receiver gets it: through msgpack, validated."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(handle), type=shm.ShmHandle)


ARRAYS = {
    "c": np.arange(3 * 1024, dtype=np.float32).reshape(3, 1024),
    "fortran-big-endian": np.asfortranarray(np.arange(600, dtype=">c16").reshape(20, 30)),
    "reversed-view": np.arange(1000, dtype=np.int64)[::-1],
    "broadcast": np.broadcast_to(np.arange(5, dtype=np.uint16), (1000, 5)),
    "0-d": np.array(-2.5, np.float16),
    "0-size": np.zeros((4, 0), bool),
}


@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_round_trip_maps_read_only_without_a_copy(pool: shm.ShmPool, array: np.ndarray) -> None:
    handle = wire(pool.put(array))
    out, close = shm.from_shm(handle, prefix=pool.prefix)
    assert out.dtype.str == array.dtype.str
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()
    assert not out.flags.writeable
    if array.size:
        assert out.strides == array.strides  # the span travelled as is, not compacted
        base = out
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview)  # a view of the mapping (which holds the lock)
        assert isinstance(base.obj, mmap.mmap)
    del out
    close()


def test_segment_is_reused_once_the_receiver_lets_go(pool: shm.ShmPool) -> None:
    first = pool.put(np.ones(1000))
    out, close = shm.from_shm(first)
    second = pool.put(np.ones(1000))  # `out` still maps the first segment: a new one
    assert second.name != first.name
    close()  # views alive: nothing is released yet
    assert pool.reclaim() == 0
    del out
    gc.collect()
    assert pool.reclaim() == 1
    third = pool.put(np.full(1000, 3.0))
    assert (third.name, third.generation) == (first.name, first.generation + 1)
    with pytest.raises(shm.ShmError, match="stale handle"):
        shm.from_shm(first)  # the old handle must not read the new tensor
    out, close = shm.from_shm(third)
    assert np.all(out == 3.0)
    close()  # ... and an explicit close releases at once when no view is left
    del out
    assert pool.statistics()["created"] == 2
    assert pool.statistics()["reused"] == 1


def test_a_handle_reads_its_tensor_until_the_segment_is_reused(pool: shm.ShmPool) -> None:
    """Several receivers may map one handle (a gateway relays a hand-off to several legs and
    pins it meanwhile); once the sender reused the segment, the old handle is refused."""
    handle = pool.put(np.arange(10))
    out, close = shm.from_shm(handle)
    again, close_again = shm.from_shm(handle)  # a second reader while the first holds it
    np.testing.assert_array_equal(again, np.arange(10))
    del out, again
    close()
    close_again()
    late, close_late = shm.from_shm(handle)  # taken, not yet reused: still this tensor
    np.testing.assert_array_equal(late, np.arange(10))
    del late
    close_late()
    reused = pool.put(np.arange(10) + 1)
    assert reused.name == handle.name
    with pytest.raises(shm.ShmError, match="stale handle"):
        shm.from_shm(handle)


def test_a_receiver_mapping_while_the_sender_sends_again_is_not_refused(
    pool: shm.ShmPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender looks over its sent segments at every put: a receiver that maps a handle
    at that very moment must get it (it once found the segment exclusively locked by that
    look, and a prefill's KV was reported lost under load)."""
    handle = pool.put(np.arange(10))
    seen: list[str] = []
    try_lock = shm._try_lock

    def receiver_arrives(fd: int, how: int) -> bool:
        got = try_lock(fd, how)
        if how == shm.fcntl.LOCK_EX:  # the sender holds the look's lock now, if any
            try:
                out, close = shm.from_shm(handle)
            except shm.ShmError as exc:
                seen.append(str(exc))
            else:
                seen.append("mapped")
                del out
                close()
        return got

    monkeypatch.setattr(shm, "_try_lock", receiver_arrives)
    pool.put(np.arange(20))  # the look at the first segment happens here
    assert all(s == "mapped" for s in seen), seen
    out, close = shm.from_shm(handle)
    np.testing.assert_array_equal(out, np.arange(10))
    del out
    close()


def test_unclaimed_segment_is_reclaimed_after_the_timeout(prefix: str) -> None:
    with shm.ShmPool(prefix, claim_timeout_s=0.0) as pool:
        lost = pool.put(np.arange(10))  # never mapped: its message was lost
        again = pool.put(np.arange(20))
        assert again.name == lost.name
        with pytest.raises(shm.ShmError, match="stale handle"):
            shm.from_shm(lost)
        out, close = shm.from_shm(again)
        np.testing.assert_array_equal(out, np.arange(20))
        del out
        close()


def test_discard_frees_an_undelivered_handle(pool: shm.ShmPool) -> None:
    handle = pool.put(np.arange(10))
    assert pool.reclaim() == 0  # sent, within the claim timeout
    pool.discard(handle)
    assert pool.reclaim() == 1
    with pytest.raises(shm.ShmError, match=r"stale handle|taken back"):
        shm.from_shm(handle)


def test_idle_segments_beyond_the_cap_are_unlinked(prefix: str) -> None:
    with shm.ShmPool(prefix, max_idle_bytes=0) as pool:
        out, close = shm.from_shm(pool.put(np.arange(10)))
        assert len(segments(prefix)) == 1
        del out
        close()
        pool.reclaim()
        assert segments(prefix) == []
        assert pool.statistics()["segments"] == 0


def test_close_unlinks_but_live_mappings_stay_readable(prefix: str) -> None:
    pool = shm.ShmPool(prefix)
    out, close = shm.from_shm(pool.put(np.arange(100.0)))
    pool.close()
    assert segments(prefix) == []
    assert out.sum() == 4950.0
    del out
    close()
    with pytest.raises(shm.ShmError, match="closed"):
        pool.put(np.arange(3))


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b-0-1-2", ".x-0-1-2", "x-0-1", "x-0-1-2\n"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(shm.ShmError, match="bad segment name"):
        shm.from_shm(shm.ShmHandle(name, 4, b""))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode([name, 4, b"", 0]), type=shm.ShmHandle)


def test_receivers_may_insist_on_a_prefix(pool: shm.ShmPool) -> None:
    handle = pool.put(np.arange(4))
    with pytest.raises(shm.ShmError, match="bad segment name"):
        shm.from_shm(handle, prefix="other")
    pool.discard(handle)


def test_missing_short_or_garbled_segments_are_refused(pool: shm.ShmPool) -> None:
    handle = pool.put(np.arange(16, dtype=np.uint8))
    with pytest.raises(shm.ShmError, match="is gone"):
        shm.from_shm(shm.ShmHandle(handle.name + "9", 16, handle.header, 1))
    with pytest.raises(shm.ShmError, match="smaller than"):
        shm.from_shm(shm.ShmHandle(handle.name, 1 << 30, handle.header, handle.generation))
    bad = shm.ShmHandle(handle.name, 16, b"LGTF" + handle.header[4:-1], handle.generation)
    with pytest.raises(TensorFrameError, match="header is 39 bytes"):
        shm.from_shm(bad)
    assert pool.reclaim() == 1  # the receiver let go of it when decoding failed


def test_use_shm_threshold() -> None:
    assert shm.DEFAULT_THRESHOLD == 16 << 20
    assert shm.use_shm(16 << 20)
    assert not shm.use_shm((16 << 20) - 1)
    assert shm.use_shm(np.empty(1 << 20, np.float32), threshold=4 << 20)
    assert not shm.use_shm(np.empty(1 << 20, np.float32))


# --- across processes ----------------------------------------------------------------------------

SENDER = """
    import sys, msgspec, numpy as np
    from lmgw.transport import shm
    pool = shm.ShmPool(sys.argv[1])
    handle = pool.put(np.arange(1 << 16, dtype=np.float64).reshape(256, 256).T)
    print(msgspec.msgpack.encode(handle).hex(), flush=True)
    sys.stdin.readline()  # wait until told to go (or to be killed)
    import multiprocessing.resource_tracker as rt
    assert rt._resource_tracker._fd is None, "a resource tracker was started"
    pool.close()
    print("ok", flush=True)
"""

RECEIVER = """
    import gc, sys, msgspec, numpy as np
    from lmgw.transport import shm
    handle = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=shm.ShmHandle)
    out, close = shm.from_shm(handle)
    want = np.arange(1 << 16, dtype=np.float64).reshape(256, 256).T
    assert np.array_equal(out, want) and not out.flags.writeable
    print("mapped", flush=True)
    if sys.stdin.readline().strip() == "close":
        del out
        close()
    import multiprocessing.resource_tracker as rt
    assert rt._resource_tracker._fd is None, "a resource tracker was started"
    print("ok", flush=True)
"""


def test_across_processes_without_resource_tracker_warnings(prefix: str) -> None:
    sender = spawn(SENDER, prefix)
    try:
        handle = sender.stdout.readline().strip()
        assert handle, sender.stderr.read()
        receiver = spawn(RECEIVER, handle)
        assert receiver.stdout.readline().strip() == "mapped", receiver.stderr.read()
        out, err = receiver.communicate("close\n", timeout=30)
        assert (receiver.returncode, out.strip(), err) == (0, "ok", "")
        out, err = sender.communicate("\n", timeout=30)
        assert (sender.returncode, out.strip(), err) == (0, "ok", "")
    finally:
        sender.kill()
        sender.wait()
    assert segments(prefix) == []  # the sender closed its pool; nothing for a tracker to do


def test_a_killed_receiver_releases_its_segment(pool: shm.ShmPool) -> None:
    handle = pool.put(np.arange(1 << 16, dtype=np.float64).reshape(256, 256).T)
    receiver = spawn(RECEIVER, msgspec.msgpack.encode(handle).hex())
    try:
        assert receiver.stdout.readline().strip() == "mapped", receiver.stderr.read()
        assert pool.reclaim() == 0  # mapped and locked by the receiver
        receiver.send_signal(signal.SIGKILL)
        receiver.wait(timeout=30)
    finally:
        receiver.kill()
        receiver.wait()
    assert pool.reclaim() == 1  # the kernel dropped the dead receiver's lock
    assert pool.put(np.arange(3)).name == handle.name


def test_sweep_removes_the_segments_of_a_killed_sender(prefix: str, pool: shm.ShmPool) -> None:
    sender = spawn(SENDER, prefix)
    try:
        handle = msgspec.msgpack.decode(
            bytes.fromhex(sender.stdout.readline().strip()), type=shm.ShmHandle
        )
        mine = pool.put(np.arange(4))
        assert shm.sweep_stale_segments(prefix) == []  # both owners alive
        sender.send_signal(signal.SIGKILL)
        sender.wait(timeout=30)
    finally:
        sender.kill()
        sender.wait()
    assert handle.name in segments(prefix)  # a crashed sender cleans up nothing itself
    _, ns, pid, _ = handle.name.rsplit("-", 3)
    foreign = os.path.join(shm.DEFAULT_DIR, f"{prefix}-{int(ns, 16) + 1:x}-{pid}-0")
    open(foreign, "wb").close()  # same dead pid, other pid namespace: not ours to judge
    try:
        assert shm.sweep_stale_segments(prefix) == [handle.name]
        assert segments(prefix) == sorted([mine.name, os.path.basename(foreign)])
        assert shm.sweep_stale_segments(prefix + "x") == []
    finally:
        os.unlink(foreign)
    with pytest.raises(shm.ShmError, match="is gone"):
        shm.from_shm(handle)
