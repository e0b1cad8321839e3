"""Shared memory for big tensors between processes on one host: one memcpy, then a handle.

Above ~16 MiB a tensor frame over TCP costs more than the copy itself (DESIGN.md §3), so the
sender copies the tensor into a shared segment and sends a small :class:`ShmHandle` (msgspec;
name, size, tensor-frame header, generation) instead of the bytes; the receiver maps the segment
read-only and decodes it with the same bounds-checked tensor-frame header, without a copy.

Why plain ``/dev/shm`` files with ``mmap`` and ``flock`` rather than
``multiprocessing.shared_memory``: the latter registers every segment with a ``resource_tracker``
process, which on Python < 3.13 also tracks segments a process merely *attached* to, so the
receiver's tracker unlinks the sender's segment when the receiver exits and warns about "leaked"
objects. Files give us exclusive creation (``O_EXCL``), a directory to sweep, and ``flock``, which
is the ack below. Linux only (``/dev/shm``), like the gateway.

Why segments are reused, and acked with a lock: a fresh tmpfs page must be allocated and zeroed by
the kernel; measured on the 2-core box, writing a 256 MiB tensor into a new segment ran at ~1 GB/s
against ~6 GB/s for a memcpy into warm memory, so a segment per tensor can never come close to
memcpy. So the *sender* owns a pool of warm segments (:class:`ShmPool`) and reuses one once the
receiver is done with it. The ack needs no message: the receiver holds a shared ``flock`` on the
segment for as long as any view of it is alive, and the kernel drops that lock when the receiver
closes it *or dies*. The sender holds an exclusive lock while it writes; it reuses a segment only
when it can take that lock again and the control block says the receiver took it (or nobody
claimed it within ``claim_timeout_s``). The control block (the file's first page; data starts
page-aligned after it) carries a generation, so a late or replayed handle is refused instead of
reading someone else's tensor.

Crash safety: a dead receiver releases its lock by dying. A dead sender leaves its segments in
``/dev/shm``: segment names carry the owner's pid (and pid namespace), and
:func:`sweep_stale_segments` removes those whose owner is gone; run it at start-up and
periodically. Unlinking never hurts a receiver that still maps a segment.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import mmap
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import msgspec
import numpy as np

from lmgw.transport.shm_host import DEFAULT_DIR, DEFAULT_THRESHOLD, host_id
from lmgw.transport.tensors import TensorFrameError, decode, encode

__all__ = [
    "DATA_OFFSET",
    "DEFAULT_DIR",
    "DEFAULT_PREFIX",
    "DEFAULT_THRESHOLD",
    "SEGMENT_NAME_RE",
    "ShmError",
    "ShmHandle",
    "ShmPool",
    "create_segment",
    "default_pool",
    "from_shm",
    "host_id",
    "map_shm",
    "pid_alive",
    "pid_namespace",
    "segment_base",
    "sweep_stale_segments",
    "to_shm",
    "try_lock",
    "use_shm",
]

DEFAULT_PREFIX = "lmgw"
DATA_OFFSET = mmap.PAGESIZE
"""The control block takes the first page; data starts page-aligned after it."""
GRANULE = 2 << 20
"""Segment capacities are multiples of this, so slightly different sizes share segments."""

_CTRL = struct.Struct("<8sQI4x")  # magic, generation, state
_CTRL_MAGIC = b"LGWSHM\x00\x01"
_SENT = 1  # written by the sender; not yet taken
_TAKEN = 2  # a receiver mapped it (it holds a shared lock while it uses it)
_STATE_AT = 16

_PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,63}")
_NAME_RE = re.compile(
    r"(?P<prefix>[A-Za-z0-9_][A-Za-z0-9_.]{0,63})-(?P<ns>[0-9a-f]+)-(?P<pid>\d+)-\d+"
)

SEGMENT_NAME_RE = _NAME_RE
"""``{prefix}-{pid ns in hex}-{pid}-{n}``: what every segment is named."""

Name = Annotated[str, msgspec.Meta(pattern=rf"\A{_NAME_RE.pattern}\Z", max_length=128)]
Size = Annotated[int, msgspec.Meta(ge=0)]


class ShmError(TensorFrameError):
    """A handle that does not resolve to the tensor it names (gone, reused, malformed)."""


class ShmHandle(msgspec.Struct, frozen=True, array_like=True):
    """What travels instead of the tensor: the segment, the data size, the tensor-frame header,
    and the generation the segment had when written (a stale handle is refused)."""

    name: Name
    size: Size
    header: bytes
    generation: Size = 0


def use_shm(array_or_nbytes: np.ndarray | int, threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Whether a tensor is big enough for shared memory (same host only: the caller knows)."""
    if isinstance(array_or_nbytes, np.ndarray):
        return array_or_nbytes.nbytes >= threshold
    nbytes = int(array_or_nbytes)
    return nbytes >= threshold


def pid_namespace() -> int:
    """This process's pid namespace (segment names carry it: a pid means nothing elsewhere)."""
    return _pid_namespace()


def segment_base(prefix: str) -> str:
    """The start of this process's segment names: ``{prefix}-{pid ns}-{pid}-`` (then a counter);
    :func:`sweep_stale_segments` judges a segment by the owner these name."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"bad segment prefix {prefix!r}")
    return f"{prefix}-{_pid_namespace():x}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid namespace is alive (a zombie counts as dead)."""
    return _pid_alive(pid)


def try_lock(fd: int, how: int) -> bool:
    """``flock`` without waiting: False when another holder's lock conflicts."""
    return _try_lock(fd, how)


def create_segment(
    directory: str, base: str, counter: Iterator[int], capacity: int
) -> tuple[str, int, mmap.mmap]:
    """A new segment file ``{base}{n}`` (exclusive creation), exclusively locked, sized for a
    control page plus ``capacity`` data bytes: ``(name, fd, read-write map of the data)``."""
    while True:
        name = f"{base}{next(counter)}"
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # left by an earlier process with our pid: pick another
            continue
        break
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows the name yet: never blocks
        os.ftruncate(fd, DATA_OFFSET + capacity)
        try:  # take the pages now: a full tmpfs (a container's 64 MiB /dev/shm) is an error
            os.posix_fallocate(fd, 0, DATA_OFFSET + capacity)  # here, not a SIGBUS at the copy
        except OSError as exc:
            raise ShmError(f"no room in {directory} for {capacity} bytes: {exc}") from None
        mm = mmap.mmap(fd, capacity, offset=DATA_OFFSET) if capacity else None
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return name, fd, mm  # type: ignore[return-value]


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:  # a killed child nobody has reaped yet is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- the sender's pool ----------------------------------------------------------------------------


class _Segment:
    __slots__ = ("capacity", "fd", "generation", "mm", "name", "sent_at", "state")

    def __init__(self, name: str, fd: int, mm: mmap.mmap | None, capacity: int) -> None:
        self.name = name
        self.fd = fd
        self.mm = mm  # the sender's read-write mapping of the data area
        self.capacity = capacity
        self.generation = 0
        self.state = "free"  # free (we hold the exclusive lock) | writing | sent
        self.sent_at = 0.0


class ShmPool:
    """The sender's warm segments. Thread-safe: `put` may run in a worker thread (it copies).

    Args:
        prefix: segment names start with ``{prefix}-``; sweeps and receivers match on it.
        directory: a tmpfs directory (``/dev/shm``).
        max_idle_bytes: free segments beyond this total capacity are unlinked, not kept warm.
        claim_timeout_s: a segment sent but never mapped is reused after this long (the message
            was lost, or its receiver died before mapping); the late handle is then refused.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        directory: str = DEFAULT_DIR,
        *,
        max_idle_bytes: int = 1 << 30,
        claim_timeout_s: float = 60.0,
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"bad segment prefix {prefix!r}")
        self.prefix = prefix
        self.directory = directory
        self.max_idle_bytes = max_idle_bytes
        self.claim_timeout_s = claim_timeout_s
        self._base = segment_base(prefix)
        self._counter = itertools.count()
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._created = 0
        self._reused = 0

    # -- sending --

    def put(self, array: Any) -> ShmHandle:
        """Copy `array` into a segment (one memcpy of its span) and return the handle to send."""
        header, buffer = encode(array)
        size = buffer.nbytes
        segment = self._acquire(size)
        try:
            if size:
                dst = np.frombuffer(segment.mm, np.uint8, size)
                np.copyto(dst, np.frombuffer(buffer, np.uint8))
            segment.generation += 1
            os.pwrite(segment.fd, _CTRL.pack(_CTRL_MAGIC, segment.generation, _SENT), 0)
            with self._lock:
                segment.state = "sent"
                segment.sent_at = time.monotonic()
            fcntl.flock(segment.fd, fcntl.LOCK_UN)  # the receiver may lock it now
        except BaseException:
            with self._lock:
                segment.state = "free"  # still ours: we never let go of the exclusive lock
            raise
        return ShmHandle(segment.name, size, header, segment.generation)

    def discard(self, handle: ShmHandle) -> None:
        """The message carrying `handle` was never delivered: reuse its segment now."""
        with self._lock:
            segment = self._segments.get(handle.name)
            if segment and segment.state == "sent" and segment.generation == handle.generation:
                self._reclaim_one(segment, force=True)

    def reclaim(self) -> int:
        """Take back the segments whose receivers are done; returns how many are free."""
        with self._lock:
            self._reclaim_locked()
            self._trim_locked()
            return sum(s.state == "free" for s in self._segments.values())

    def _reclaim_locked(self) -> None:
        now = time.monotonic()
        for segment in list(self._segments.values()):
            if segment.state == "sent":
                self._reclaim_one(segment, force=now - segment.sent_at >= self.claim_timeout_s)

    def _trim_locked(self) -> None:
        idle = sorted(
            (s for s in self._segments.values() if s.state == "free"), key=lambda s: s.sent_at
        )
        excess = sum(s.capacity for s in idle) - self.max_idle_bytes
        for segment in idle:  # oldest first
            if excess <= 0:
                break
            excess -= segment.capacity
            self._drop(segment)

    def _reclaim_one(self, segment: _Segment, *, force: bool) -> None:
        # Not taken yet: leave it without touching the lock. Probing it with an exclusive
        # lock would refuse a receiver that maps it at that instant (map_shm never waits), a
        # request failed for nothing (seen under load: a prefill's KV "lost" at the gateway).
        if not force and _CTRL.unpack(os.pread(segment.fd, _CTRL.size, 0))[2] != _TAKEN:
            return
        if not _try_lock(segment.fd, fcntl.LOCK_EX):
            return  # a receiver still maps it
        state = _CTRL.unpack(os.pread(segment.fd, _CTRL.size, 0))[2]
        if state == _TAKEN or force:
            segment.state = "free"  # keep the exclusive lock until the next send
        else:
            fcntl.flock(segment.fd, fcntl.LOCK_UN)  # sent, not yet taken: leave it to them

    def _acquire(self, size: int) -> _Segment:
        with self._lock:
            if self._closed:
                raise ShmError("the shared-memory pool is closed")
            self._reclaim_locked()
            fits = [s for s in self._segments.values() if s.state == "free" and s.capacity >= size]
            if fits:
                segment = min(fits, key=lambda s: s.capacity)
                self._reused += 1
            else:
                segment = self._create(max(GRANULE, -(-size // GRANULE) * GRANULE))
            segment.state = "writing"
            self._trim_locked()
            return segment

    def _create(self, capacity: int) -> _Segment:
        name, fd, mm = create_segment(self.directory, self._base, self._counter, capacity)
        try:
            os.pwrite(fd, _CTRL.pack(_CTRL_MAGIC, 0, 0), 0)
        except BaseException:
            mm.close()
            os.close(fd)
            os.unlink(os.path.join(self.directory, name))
            raise
        segment = _Segment(name, fd, mm, capacity)
        self._segments[name] = segment
        self._created += 1
        return segment

    def _drop(self, segment: _Segment) -> None:
        del self._segments[segment.name]
        try:
            os.unlink(os.path.join(self.directory, segment.name))
        except FileNotFoundError:
            pass
        if segment.mm is not None:
            try:
                segment.mm.close()
            except BufferError:  # a put() copy in flight in another thread: the GC unmaps it
                pass
        os.close(segment.fd)

    def close(self) -> None:
        """Unlink every segment of this pool. Receivers' live mappings stay valid."""
        with self._lock:
            self._closed = True
            for segment in list(self._segments.values()):
                self._drop(segment)

    def statistics(self) -> dict[str, int]:
        """Segments by state, their capacity, and how many were created vs reused."""
        with self._lock:
            states = [s.state for s in self._segments.values()]
            return {
                "segments": len(states),
                "free": states.count("free"),
                "sent": states.count("sent"),
                "capacity_bytes": sum(s.capacity for s in self._segments.values()),
                "created": self._created,
                "reused": self._reused,
            }

    def __enter__(self) -> ShmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShmPool({self.prefix!r}, {self.statistics()})"


_default: ShmPool | None = None
_default_lock = threading.Lock()


def default_pool() -> ShmPool:
    """The process-wide pool `to_shm` uses (prefix ``lmgw``); its segments go at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = ShmPool()
            atexit.register(_default.close)
        return _default


def to_shm(array: Any, pool: ShmPool | None = None) -> ShmHandle:
    """Copy `array` into shared memory (the default pool unless given); returns its handle.

    It copies up to hundreds of MiB: from trio, call it through ``trio.to_thread.run_sync``.
    """
    return (pool or default_pool()).put(array)


# -- the receiver ---------------------------------------------------------------------------------


def _release(fd: int) -> None:
    os.close(fd)  # drops the shared lock: the sender may reuse the segment


def from_shm(
    handle: ShmHandle,
    *,
    directory: str = DEFAULT_DIR,
    prefix: str | None = None,
    populate: bool = True,
) -> tuple[np.ndarray, Callable[[], None]]:
    """Map the tensor of `handle` read-only, without a copy: ``(array, close)``.

    The segment stays locked (the sender cannot reuse it) while the array or any view of it is
    alive. ``close()`` unmaps it now if no view is left, otherwise the last view's collection
    does; either way the lock goes with the mapping, and with the process if it dies. `prefix`,
    when given, restricts which segments a handle may name. `populate` maps every page up front
    (one call instead of a page fault per 4 KiB). Raises ShmError for a handle that is malformed,
    stale or gone, and TensorFrameError for a bad header.
    """
    buffer, close = map_shm(handle, directory=directory, prefix=prefix, populate=populate)
    try:
        array = decode(handle.header, buffer)
    except BaseException:
        buffer.release()
        close()
        raise
    buffer.release()  # the array's own view of the mapping keeps it (and the lock) alive
    return array, close


def map_shm(
    handle: ShmHandle,
    *,
    directory: str = DEFAULT_DIR,
    prefix: str | None = None,
    populate: bool = True,
) -> tuple[memoryview, Callable[[], None]]:
    """The data bytes of `handle` mapped read-only, as a tensor frame's payload would be (decode
    them with ``handle.header``): ``(buffer, close)``. The lock is held while the mapping
    lives (see :func:`from_shm`); release `buffer` and call ``close()`` when done. Raises
    ShmError for a handle that is malformed, stale or gone."""
    name = handle.name
    match = _NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None or (prefix is not None and match["prefix"] != prefix):
        raise ShmError(f"bad segment name {name!r}")
    if not isinstance(handle.size, int) or handle.size < 0:
        raise ShmError(f"bad size {handle.size!r}")
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ShmError(f"segment {name} is gone (its sender exited or it was swept)") from None
    except OSError as exc:
        raise ShmError(f"cannot open segment {name}: {exc}") from None
    try:
        # The sender holds an exclusive lock only on segments it has taken back (or is
        # rewriting), and it sends a handle only after letting go: so a lock held now means
        # this handle is stale. Never wait for it.
        if not _try_lock(fd, fcntl.LOCK_SH):
            raise ShmError(f"stale handle for {name}: the sender has taken the segment back")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < DATA_OFFSET + handle.size:
            raise ShmError(f"segment {name} is smaller than the {handle.size} bytes announced")
        magic, generation, state = _CTRL.unpack(os.pread(fd, _CTRL.size, 0))
        if magic != _CTRL_MAGIC:
            raise ShmError(f"{name} is not an lmgw segment")
        # A taken segment may be mapped again (a gateway that relays a handle to several
        # legs holds it meanwhile): only a new generation means someone else's tensor.
        if generation != handle.generation or state not in (_SENT, _TAKEN):
            raise ShmError(
                f"stale handle for {name}: generation {handle.generation}, segment has "
                f"{generation} ({'taken' if state == _TAKEN else 'not sent'})"
            )
        os.pwrite(fd, struct.pack("<I", _TAKEN), _STATE_AT)
        if handle.size == 0:
            os.close(fd)
            return memoryview(b""), _noop
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mm = mmap.mmap(fd, handle.size, flags=flags, prot=mmap.PROT_READ, offset=DATA_OFFSET)
    except BaseException:
        os.close(fd)
        raise
    # The lock lives on the open file description, which mmap's own dup of `fd` shares: it is
    # held exactly as long as the mapping object. Close our fd together with the mapping.
    finalizer = weakref.finalize(mm, _release, fd)
    mapping = weakref.ref(mm)  # only the buffer and its views keep the mapping alive

    def close() -> None:
        mm = mapping()
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            return  # views are alive: the mapping and the lock go with the last of them
        finalizer()

    return memoryview(mm), close


def _noop() -> None:
    pass


# -- crash cleanup --------------------------------------------------------------------------------


def sweep_stale_segments(prefix: str = DEFAULT_PREFIX, directory: str = DEFAULT_DIR) -> list[str]:
    """Unlink the segments named with `prefix` whose owner process is dead; returns their names.

    Only segments from this pid namespace are judged (a pid from another container means
    nothing here). Safe to run any time, from any process: live owners' segments are kept, and
    unlinking never disturbs a receiver that still maps a segment.
    """
    ns = f"{_pid_namespace():x}"
    removed = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _NAME_RE.fullmatch(entry)
        if match is None or match["prefix"] != prefix or match["ns"] != ns:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed
