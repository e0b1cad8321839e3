"""The native relay's write coalescing: events already queued go out in one write, a lone
event at once, and the bytes are exactly the per-event SSE stream."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import trio

from lmgw.metrics import Metrics
from lmgw.pipeline.native import _COALESCE_MAX, NativeRunner
from lmgw.pipeline.request import GatewayRequest
from lmgw.protocol.messages import Delta, Finish, Usage
from lmgw.transport.openai_synth import OpenAISynth


class Answers:
    """An RpcStream stand-in: events arrive in bursts; ``pending`` is what is left of the
    burst being read (what the real stream has already received)."""

    def __init__(self, bursts: list[list[Any]]) -> None:
        self.bursts = [list(b) for b in bursts]
        self.timeout = math.inf

    @property
    def pending(self) -> int:
        return len(self.bursts[0]) if self.bursts else 0

    def __aiter__(self) -> Answers:
        return self

    async def __anext__(self) -> Any:
        while self.bursts and not self.bursts[0]:
            self.bursts.pop(0)
            await trio.sleep(0)  # the next burst arrives later
        if not self.bursts:
            raise StopAsyncIteration
        return self.bursts[0].pop(0)


class Responder:
    def __init__(self) -> None:
        self.started = False
        self.writes: list[bytes] = []

    async def start(self, status: int, headers: list) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        self.writes.append(data)

    async def end(self, data: bytes = b"") -> None:
        self.writes.append(data)


def _runner() -> NativeRunner:
    runner = object.__new__(NativeRunner)
    runner.p = SimpleNamespace(metrics=Metrics())
    runner.stall_s = math.inf
    return runner


def _synth() -> OpenAISynth:
    return OpenAISynth("chat", "r1", "m", 0)


def _events(n: int) -> list[Any]:
    out: list[Any] = [Delta("r1", i, f"t{i} ", [i]) for i in range(n)]
    out.append(Finish("r1", n, "length", usage=Usage(3, n)))
    return out


async def _relay(bursts: list[list[Any]]) -> list[bytes]:
    greq = GatewayRequest("chat", "/v1/chat/completions", "m", True, b"{}", "r1", [], 0.0)
    responder = Responder()
    worker = SimpleNamespace(id="w1")
    await _runner()._relay(greq, responder, Answers(bursts), _synth(), worker, "pd", 0.0, False, 0)
    return responder.writes


async def _expected(events: list[Any]) -> bytes:
    synth = _synth()
    out = []
    for e in events:
        if type(e) is Delta:
            out.append(synth.delta(e.text, e.token_ids, e.logprobs))
        else:
            u = e.usage
            out.append(synth.finish(e.finish_reason, e.stop_reason, u.prompt_tokens,
                                    u.completion_tokens, u.cached_tokens))  # fmt: skip
    return b"".join(out)


async def test_a_burst_is_one_write_and_bytes_are_unchanged() -> None:
    events = _events(10)
    writes = await _relay([events])
    assert len(writes) == 1
    assert writes[0] == await _expected(events)


async def test_lone_events_are_written_one_by_one() -> None:
    events = _events(5)
    writes = await _relay([[e] for e in events])
    assert len(writes) == len(events)
    assert b"".join(writes) == await _expected(events)


async def test_bursts_flush_at_their_end_and_at_the_cap() -> None:
    events = _events(_COALESCE_MAX + 30)
    bursts = [events[:3], events[3:4], events[4:]]
    writes = await _relay(bursts)
    # burst 1: one write; burst 2: one; burst 3 (the rest, Finish included): the cap splits it
    assert len(writes) == 4
    assert b"".join(writes) == await _expected(events)
