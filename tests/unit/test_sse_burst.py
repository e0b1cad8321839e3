"""The SSE relay's burst pacing (transport/pacing.py, used by transport/openai_http.py):
after a read of several events on a busy loop it waits BURST_WAIT_S before
reading again, so that reads and writes carry more events each; never on an idle loop, never
after a read of one or two events, and the first event always goes out at once."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from fakes import RecordingResponder

from lmgw.transport import pacing
from lmgw.transport.openai_http import relay_sse
from lmgw.transport.pacing import BURST_WAIT_S


class FakeResponse:
    """Reads that return the given groups of events, one per call, then the end."""

    def __init__(self, groups: list[int]) -> None:
        self.reads = [b"".join(b'data: {"i":%d}\n\n' % i for i in range(n)) for n in groups]
        self.read_at: list[float] = []
        self.complete = False

    async def read_chunk(self) -> bytes:
        self.read_at.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.reads:
            chunk = self.reads.pop(0)
            self.complete = not self.reads
            return chunk
        return b""

    def release(self) -> None:
        pass


async def _relay(
    groups: list[int], busy: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeResponse, RecordingResponder, int]:
    """Relay ``groups`` with the loop reported busy (other tasks runnable) or idle."""
    stats = SimpleNamespace(tasks_runnable=3 if busy else 0)
    monkeypatch.setattr(pacing, "current_statistics", lambda: stats)
    resp, sink = FakeResponse(groups), RecordingResponder()
    events = await relay_sse(resp, sink, [], lambda: None)  # type: ignore[arg-type]
    return resp, sink, events


def _gaps(resp: FakeResponse) -> list[float]:
    at = resp.read_at
    return [round(b - a, 6) for a, b in itertools.pairwise(at)]


@pytest.mark.parametrize("busy", [True, False])
async def test_a_burst_on_a_busy_loop_waits_before_the_next_read(
    busy: bool, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    resp, sink, events = await _relay([1, 5, 4, 2, 6, 1], busy, monkeypatch)
    assert events == 19 and b"".join(sink.writes).count(b"\n\n") == 19
    wait = BURST_WAIT_S if busy else 0.0
    # after the reads of 5, 4 and 6 events (not after 1 or 2, nor before the last read, which
    # only hands the connection back)
    assert _gaps(resp) == [0.0, wait, wait, 0.0, wait, 0.0]


async def test_the_first_event_is_never_delayed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    resp, sink, _ = await _relay([8, 8], True, monkeypatch)
    assert sink.writes[0].count(b"\n\n") == 8 and resp.read_at[0] == 0.0


def test_the_constants_are_what_the_benchmark_measured() -> None:
    assert pacing.BURST_EVENTS == 3 and BURST_WAIT_S == 0.0005
