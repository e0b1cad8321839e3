"""Burst pacing for stream relays: under saturation, let events pile up between writes.

Why: a relay that reads a stream as soon as it is readable and writes what it read at once
spends a read and a write (two syscalls, two wake-ups) per few events when the worker outpaces
a busy loop. Waiting half a millisecond after such a burst lets more events arrive, so each
read and write carries more of them: in the peer harness's burst setting, -11% CPU per event
and +5-10% events per second (benchmarks/README.md, session 7). It never waits before a
stream's first event (the caller asks only after a write), on an idle loop (no other task is
runnable: a lone stream goes as fast as before), or for paced engines (one event per read or
per write, below ``BURST_EVENTS``).

Not for the native relay (pipeline/native.py): it already takes a burst's queued Deltas in one
write, and waiting there only slowed it (zmq_vs_http.py --quick, SSE at c=16: 448 -> 537 µs of
gateway CPU per request, 2,181 -> 1,852 req/s).
"""

from __future__ import annotations

import trio
from trio.lowlevel import current_statistics

#: events in one read or write that make it a burst
BURST_EVENTS = 3
#: how long a burst on a busy loop waits before the relay reads again
BURST_WAIT_S = 0.0005


async def after_write(events: int) -> None:
    """Call after writing ``events`` events of a stream to its client."""
    if events >= BURST_EVENTS and current_statistics().tasks_runnable:
        await trio.sleep(BURST_WAIT_S)
