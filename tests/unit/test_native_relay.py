"""The native relay's write coalescing: events already queued go out in one write, a lone
event at once, and the bytes are exactly the per-event SSE stream."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import trio
from fakes import RecordingResponder

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

    def deltas(self, limit: int) -> list[Any]:
        burst = self.bursts[0] if self.bursts else []
        out = []
        while burst and len(out) < limit and type(burst[0]) is Delta:
            out.append(burst.pop(0))
        return out

    def __aiter__(self) -> Answers:
        return self

    async def __anext__(self) -> Any:
        while self.bursts and not self.bursts[0]:
            self.bursts.pop(0)
            await trio.sleep(0)  # the next burst arrives later
        if not self.bursts:
            raise StopAsyncIteration
        return self.bursts[0].pop(0)


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
    responder = RecordingResponder()
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


def _tool_events() -> list[Any]:
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    out: list[Any] = [Delta("r1", i, p, [i]) for i, p in enumerate(pieces)]
    out.append(Finish("r1", len(pieces), "stop", usage=Usage(3, len(pieces))))
    return out


def _rewriter() -> Any:
    from lmgw.tools import get_tool_parser
    from lmgw.tools.relay import OutputRewriter

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    return OutputRewriter({"tools": tools}, get_tool_parser("hermes"), None)


async def test_tool_calls_are_parsed_on_the_native_stream() -> None:
    import json

    greq = GatewayRequest("chat", "/v1/chat/completions", "m", True, b"{}", "r1", [], 0.0)
    greq.output = _rewriter()
    responder = RecordingResponder()
    events = _tool_events()
    bursts = [events[:5], *[[e] for e in events[5:]]]  # coalesced and lone events both
    worker = SimpleNamespace(id="w1")
    await _runner()._relay(greq, responder, Answers(bursts), _synth(), worker, "pd", 0.0, False, 0)
    chunks = [
        json.loads(line[6:])
        for line in b"".join(responder.writes).decode().splitlines()
        if line.startswith("data: {")
    ]
    calls = [
        c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", []) if ch["choices"]
    ]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    args = "".join(c["function"].get("arguments", "") for c in calls)
    assert json.loads(args) == {"city": "Paris"}
    content = "".join(
        ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]
    )
    assert "<tool_call>" not in content and content.startswith("Sure.")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_calls_are_parsed_on_the_native_whole_answer() -> None:
    import json

    greq = GatewayRequest("chat", "/v1/chat/completions", "m", False, b"{}", "r1", [], 0.0)
    greq.output = _rewriter()
    sent: dict[str, Any] = {}

    class Whole(RecordingResponder):
        async def send_full(self, status: int, headers: list, body: bytes) -> None:
            sent["body"] = body

    await _runner()._whole(greq, Whole(), Answers([_tool_events()]), _synth())
    msg = json.loads(sent["body"])["choices"][0]
    assert msg["finish_reason"] == "tool_calls"
    call = msg["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
