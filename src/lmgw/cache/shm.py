"""The same-host tier: entries in shared memory that any process on the host reads as zero-copy
views, cleaned up after processes that crash.

Processes that name the same tier (``cache.shm_name``) share a directory on a tmpfs
(``/dev/shm/{name}/``) holding two kinds of files:

* segments, one per entry, named like :mod:`lmgw.transport.shm`'s (``seg-{pid ns}-{pid}-{n}``,
  created with its :func:`~lmgw.transport.shm.create_segment`): the owner's pid is in the name,
  so :func:`~lmgw.transport.shm.sweep_stale_segments` removes the entries of a process that died;
* index links ``k-{digest of the key}``, symlinks to the segment holding the key; a put replaces
  the link atomically (``rename``), so a reader sees the old entry or the new one.

A segment's first page is its control block: a magic, the key's digest, a state (the owner holds
an exclusive ``flock`` while writing; readers take a shared one and see only ``READY``
segments), the last read time and an approximate hit count (readers bump both), and the entry's
:class:`~lmgw.cache.values.Meta`. Data starts at the next page. A reader maps the data read-only
and returns an array viewing it; its shared lock lives exactly as long as that mapping (the
kernel drops it when the reader exits or dies), and the owner never rewrites a segment a reader
still locks: eviction unlinks it (mappings stay valid), and only segments nobody locks are kept
warm for reuse (writing into fresh tmpfs pages runs at ~1 GB/s against ~6 GB/s into warm ones,
see ``transport/shm.py``).

Each process owns the entries it put and keeps them under *its* byte budget, evicting its least
recently used first; reads by other processes count as uses (the owner checks a candidate's read
time before evicting it: a second chance). Linux only, like the gateway.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import re
import struct
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import DECODE_ERRORS
from ..transport import shm as _shm
from .tier import Evicted, Tier
from .values import KIND_ARRAY, Meta, Value, decode_meta, encode_meta, value_of

__all__ = ["SEGMENT_PREFIX", "ShmTier"]

log = logging.getLogger("lmgw.cache")

SEGMENT_PREFIX = "seg"
PAGE = mmap.PAGESIZE
_CTRL = struct.Struct("<8s16sIIdQ")  # magic, key digest, state, meta length, read time, hits
_MAGIC = b"LGWCACH1"
_WRITING, _READY = 1, 2
_ATIME_AT = 32
_META_AT = 64
MAX_META_BYTES = PAGE - _META_AT
_NAME_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_LINK = "k-"


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class _Seg:
    __slots__ = ("capacity", "charge", "digest", "fd", "mm", "name", "seen")

    def __init__(self, name: str, fd: int, mm: mmap.mmap | None, capacity: int) -> None:
        self.name = name
        self.fd = fd
        self.mm = mm  # the owner's read-write map of the data area (None: capacity 0)
        self.capacity = capacity
        self.charge = PAGE + capacity
        self.digest = b""
        self.seen = 0.0  # the read time last seen in the control block


def _release(fd: int) -> None:
    os.close(fd)


class ShmTier(Tier):
    """Entries in ``{directory}/{name}/``; this process's own under ``budget_bytes``.

    Args:
        budget_bytes: what this process's entries may take (control pages included).
        name: processes with the same name (and directory) share entries.
        directory: a tmpfs (``/dev/shm``).
        idle_bytes: evicted segments kept warm for reuse, at most this much (not in the budget).
    """

    name = "shm"
    shared = True

    def __init__(
        self,
        budget_bytes: int,
        name: str = "lmgw-cache",
        directory: str = _shm.DEFAULT_DIR,
        *,
        idle_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        if not _NAME_OK.fullmatch(name):
            raise ValueError(f"bad shared-memory tier name {name!r}")
        self.budget_bytes = budget_bytes
        self.path = os.path.join(directory, name)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.idle_bytes = budget_bytes // 8 if idle_bytes is None else idle_bytes
        self._base = _shm.segment_base(SEGMENT_PREFIX)
        self._counter = itertools.count()
        self._tmp = itertools.count()
        self._own: OrderedDict[str, _Seg] = OrderedDict()  # key -> segment, LRU first
        self._free: list[_Seg] = []  # warm segments we hold exclusively
        self._used = 0
        self._closed = False
        self.swept = 0
        self.sweep()

    # -- paths ------------------------------------------------------------------------------
    def _link(self, digest: bytes) -> str:
        return os.path.join(self.path, _LINK + digest.hex())

    def usage(self) -> tuple[int, int]:
        return self._used, len(self._own)

    # -- reading (any process) --------------------------------------------------------------
    def _open(self, key: str, now: float, touch: bool = True) -> tuple[int, Meta, bytes] | None:
        """The entry's segment, shared-locked and checked: ``(fd, meta, digest)``, or None.
        ``touch`` records the read (time and hit count) in the control block."""
        digest = _digest(key)
        link = self._link(digest)
        try:
            target = os.readlink(link)
        except OSError:
            return None
        if not _shm.SEGMENT_NAME_RE.fullmatch(target):
            return None
        try:
            fd = os.open(os.path.join(self.path, target), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:  # its owner died and was swept, or evicted it just now
            self._unlink_link(link, target)
            return None
        except OSError:
            return None
        try:
            if not _shm.try_lock(fd, fcntl.LOCK_SH):
                os.close(fd)
                return None  # being written or reused right now
            ctrl = os.pread(fd, PAGE, 0)
            magic, got, state, meta_len, _atime, hits = _CTRL.unpack_from(ctrl)
            if magic != _MAGIC or got != digest or state != _READY or meta_len > MAX_META_BYTES:
                os.close(fd)
                return None
            meta = decode_meta(ctrl[_META_AT : _META_AT + meta_len])
            if meta.expired(now):
                os.close(fd)
                self.stats.expired += 1
                if key in self._own:
                    self._drop(key)
                return None
            if touch:
                os.pwrite(fd, struct.pack("<dQ", now, hits + 1), _ATIME_AT)
                meta.hits = hits + 1
        except (OSError, struct.error, *DECODE_ERRORS):
            os.close(fd)
            return None
        return fd, meta, digest

    async def get(self, key: str, now: float) -> tuple[Meta, Value] | None:
        opened = self._open(key, now)
        if opened is None:
            return None
        fd, meta, _ = opened
        self.stats.read_bytes += meta.size
        own = self._own.get(key)
        if own is not None:  # our own read: no second chance for it at eviction time
            self._own.move_to_end(key)
            own.seen = now
        try:
            if meta.kind != KIND_ARRAY or meta.size == 0:
                data = os.pread(fd, meta.size, _shm.DATA_OFFSET) if meta.size else b""
                os.close(fd)
                if len(data) != meta.size:
                    return None
                return meta, value_of(meta, data)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, meta.size, flags=flags, prot=mmap.PROT_READ, offset=_shm.DATA_OFFSET)
            array = value_of(meta, mm)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        # the shared lock lives on the open file, which the mapping's own dup shares: close our
        # fd together with the mapping, so the lock goes with the last view of the array
        weakref.finalize(mm, _release, fd)
        return meta, array

    async def contains(self, key: str, now: float) -> bool:
        opened = self._open(key, now, touch=False)
        if opened is None:
            return False
        os.close(opened[0])
        return True

    # -- writing (the owner) ----------------------------------------------------------------
    async def put(
        self, key: str, meta: Meta, value: Value, payload: tuple[int, bytes, Any], collect: bool
    ) -> tuple[bool, list[Evicted]]:
        if self._closed:
            return False, []
        if key in self._own:
            self._drop(key)
        meta_bytes = encode_meta(meta.unhit())
        capacity = -(-meta.size // PAGE) * PAGE
        if len(meta_bytes) > MAX_META_BYTES or PAGE + capacity > self.budget_bytes:
            return False, []
        try:
            seg = self._segment(capacity)
        except _shm.ShmError:  # no room left in the tmpfs (its size, not this tier's budget)
            return False, []
        evicted = self._make_room(seg.charge, collect)
        digest = _digest(key)
        try:
            os.pwrite(seg.fd, _CTRL.pack(_MAGIC, digest, _WRITING, 0, 0.0, 0), 0)
            if meta.size:
                buffer = payload[2]
                src = np.frombuffer(buffer, np.uint8, meta.size)
                np.copyto(np.frombuffer(seg.mm, np.uint8, meta.size), src)  # type: ignore[arg-type]
            ctrl = _CTRL.pack(_MAGIC, digest, _READY, len(meta_bytes), 0.0, 0)
            os.pwrite(seg.fd, ctrl + bytes(_META_AT - _CTRL.size) + meta_bytes, 0)
            fcntl.flock(seg.fd, fcntl.LOCK_UN)  # readers may lock it now
            seg.digest, seg.seen = digest, 0.0
            tmp = os.path.join(self.path, f"t-{os.getpid()}-{next(self._tmp)}")
            os.symlink(seg.name, tmp)
            os.replace(tmp, self._link(digest))
        except BaseException:
            self._destroy(seg)
            raise
        self._own[key] = seg
        self._used += seg.charge
        self.stats.written_bytes += meta.size
        return True, evicted

    def _make_room(self, charge: int, collect: bool) -> list[Evicted]:
        evicted: list[Evicted] = []
        chances = len(self._own)
        while self._used + charge > self.budget_bytes and self._own:
            key, seg = next(iter(self._own.items()))
            if chances > 0:  # read by another process since we last looked: a second chance
                chances -= 1
                try:
                    (atime,) = struct.unpack("<d", os.pread(seg.fd, 8, _ATIME_AT))
                except OSError:
                    atime = 0.0
                if atime > seg.seen:
                    seg.seen = atime
                    self._own.move_to_end(key)
                    continue
            if collect:
                item = self._read_own(seg)
                if item is not None:
                    evicted.append(Evicted(key, *item))
            self._drop(key)
            self.stats.evictions += 1
        return evicted

    def _read_own(self, seg: _Seg) -> tuple[Meta, Value] | None:
        """A copy of an own segment's entry (for demotion before it goes)."""
        try:
            ctrl = os.pread(seg.fd, PAGE, 0)
            magic, _, state, meta_len, _atime, _hits = _CTRL.unpack_from(ctrl)
            if magic != _MAGIC or state != _READY:
                return None
            meta = decode_meta(ctrl[_META_AT : _META_AT + meta_len])
            data = bytes(seg.mm[: meta.size]) if seg.mm is not None and meta.size else b""
            return meta, value_of(meta, data)
        except (OSError, struct.error, *DECODE_ERRORS):
            return None

    def _segment(self, capacity: int) -> _Seg:
        fits = [
            s
            for s in self._free
            if capacity <= s.capacity <= 2 * capacity + PAGE and s.charge <= self.budget_bytes
        ]
        if fits:
            seg = min(fits, key=lambda s: s.capacity)
            self._free.remove(seg)
            return seg  # still exclusively locked since it was freed
        name, fd, mm = _shm.create_segment(self.path, self._base, self._counter, capacity)
        return _Seg(name, fd, mm, capacity)

    def _unlink_link(self, link: str, target: str) -> None:
        try:
            if os.readlink(link) == target:
                os.unlink(link)
        except OSError:
            pass

    def _drop(self, key: str) -> None:
        """Forget an own entry: its link goes (if still ours), its segment is kept warm when no
        reader maps it and there is idle room, else unlinked."""
        seg = self._own.pop(key)
        self._used -= seg.charge
        self._unlink_link(self._link(seg.digest), seg.name)
        idle = sum(s.capacity for s in self._free)
        if (
            not self._closed
            and seg.capacity
            and idle + seg.capacity <= self.idle_bytes
            and _shm.try_lock(seg.fd, fcntl.LOCK_EX)
        ):
            try:
                os.pwrite(seg.fd, _CTRL.pack(_MAGIC, bytes(16), _WRITING, 0, 0.0, 0), 0)
            except OSError:
                self._destroy(seg)
                return
            self._free.append(seg)
            return
        self._destroy(seg)

    def _destroy(self, seg: _Seg) -> None:
        try:
            os.unlink(os.path.join(self.path, seg.name))
        except FileNotFoundError:
            pass
        if seg.mm is not None:
            try:
                seg.mm.close()
            except BufferError:  # pragma: no cover - a view of our own map is never handed out
                pass
        os.close(seg.fd)

    async def delete(self, key: str) -> bool:
        if key in self._own:
            self._drop(key)
            return True
        digest = _digest(key)
        link = self._link(digest)
        try:
            target = os.readlink(link)
            os.unlink(link)  # another process's entry: unreachable now; its owner reclaims it
        except OSError:
            return False
        return bool(target)

    # -- upkeep -----------------------------------------------------------------------------
    def sweep(self) -> int:
        """Remove the segments of dead processes and the links left pointing nowhere."""
        removed = len(_shm.sweep_stale_segments(SEGMENT_PREFIX, self.path))
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return removed
        for entry in names:
            if entry.startswith(_LINK):
                link = os.path.join(self.path, entry)
                try:
                    target = os.readlink(link)
                except OSError:
                    continue
                if not os.path.exists(os.path.join(self.path, target)):
                    self._unlink_link(link, target)
                    removed += 1
            elif entry.startswith("t-"):  # a put's temporary link, left by a crash
                pid = entry.split("-")[1]
                if pid.isdigit() and int(pid) != os.getpid() and not _shm.pid_alive(int(pid)):
                    try:
                        os.unlink(os.path.join(self.path, entry))
                    except OSError:
                        pass
        self.swept += removed
        return removed

    async def run(self, interval_s: float = 30.0) -> None:
        import trio

        while True:
            await trio.sleep(interval_s)
            self.sweep()

    def close(self) -> None:
        """Remove this process's entries (their links and segments)."""
        self._closed = True
        for key in list(self._own):
            self._drop(key)
        for seg in self._free:
            self._destroy(seg)
        self._free.clear()

    def statistics(self) -> dict[str, float]:
        out = super().statistics()
        out["idle_bytes"] = sum(s.capacity for s in self._free)
        out["swept"] = self.swept
        return out
