"""Give the heap that a burst of large request bodies leaves behind back to the OS.

Why: after 40 concurrent 30 MB uploads the gateway's resident memory stayed at ~390 MB while
Python held ~7 MB, so an operator sees a gateway that grew and never shrinks (the complaint
users file against LiteLLM: restarts on a schedule). glibc keeps those pages: freeing a large
mmapped chunk raises its mmap threshold, so the next large bodies come from the heap, and the
small objects still alive above them stop the heap from shrinking at its top. ``malloc_trim(0)``
hands the free pages inside the heap back (``madvise``): 388 -> 51 MB on that burst.

The server reports the request bodies it released and the large whole answers it sent
(:meth:`HeapTrimmer.released`); past
``limits.trim_heap_after_bytes`` of them, one trim runs after a pause that lets the burst end,
on a worker thread (it walks the heap; ctypes drops the GIL for the call). Where libc has no
``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Callable

import trio

__all__ = ["LARGE_ANSWER_BYTES", "HeapTrimmer", "malloc_trim", "rss_bytes"]

#: whole answers larger than this are reported when sent (smaller ones come and go in the heap
#: with the request's other objects)
LARGE_ANSWER_BYTES = 256 << 10

log = logging.getLogger("lmgw.memtrim")


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the libc this process runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


#: glibc's ``malloc_trim``, or None where libc has none
malloc_trim = _libc_malloc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Trims the heap once ``after_bytes`` of request bodies were released since the last trim
    (0: never), at most once per ``pause_s``: the pause lets the rest of a burst finish, so a
    burst costs one trim. ``on_trim(returned_bytes)`` reports each (for the metrics).

    Also when the resident memory grew by ``growth_bytes`` (0: never) since the last trim (or
    the start), checked every ``check_s``: steady traffic of small requests frees as much heap
    as a burst does, spread out (the churn of caches that evict, of tokenizer buffers), and no
    body crosses the first mark. Each trim resets the mark to what is left, so memory that is
    really held costs one trim per ``growth_bytes`` of it, not one per check."""

    def __init__(
        self,
        after_bytes: int,
        *,
        growth_bytes: int = 0,
        check_s: float = 30.0,
        pause_s: float = 1.0,
        trim: Callable[[int], int] | None = malloc_trim,
        on_trim: Callable[[int], None] | None = None,
        rss: Callable[[], int] = rss_bytes,
    ) -> None:
        self.after_bytes = after_bytes
        self.growth_bytes = growth_bytes
        self.check_s = check_s
        self.pause_s = pause_s
        self._trim = trim
        self.on_trim = on_trim
        self._rss = rss
        #: body bytes released since the last trim
        self.pending = 0
        self.trims = 0
        self._due = trio.Event()
        #: resident memory after the last trim (or at the start): growth is counted from it
        self.mark = 0

    @property
    def enabled(self) -> bool:
        return (self.after_bytes > 0 or self.growth_bytes > 0) and self._trim is not None

    def released(self, nbytes: int) -> None:
        """A request let go of a body of ``nbytes`` (its reservation)."""
        self.pending += nbytes
        if self.pending >= self.after_bytes > 0:
            self._due.set()

    async def run(self) -> None:
        """Trim when due, until cancelled (a task of the server's nursery)."""
        if not self.enabled:
            return
        self.mark = self._rss()
        while True:
            with trio.move_on_after(self.check_s if self.growth_bytes else math.inf):
                await self._due.wait()
            if not self._due.is_set():  # a check: trim only past the growth mark
                if self._rss() - self.mark < self.growth_bytes:
                    continue
            else:
                await trio.sleep(self.pause_s)
            self._due = trio.Event()
            self.pending = 0
            before = self._rss()
            await trio.to_thread.run_sync(self._trim, 0)  # type: ignore[arg-type]
            self.mark = after = self._rss()
            returned = max(0, before - after)
            self.trims += 1
            log.debug("heap trimmed: %.1f MB returned to the OS", returned / 1e6)
            if self.on_trim is not None:
                self.on_trim(returned)
