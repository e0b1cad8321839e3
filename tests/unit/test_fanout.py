"""The sans-IO parts of the native fan-out (lmgw.pipeline.fanout) and the synthesizer's
per-choice events: choice indexes, vLLM's seed rule, the merged body and its usage."""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
import trio

from lmgw.errors import GatewayError
from lmgw.pipeline.fanout import SAMPLE_INDEX, Fanout, child_params, child_request
from lmgw.pipeline.request import GatewayRequest
from lmgw.protocol.messages import SamplingParams, Token
from lmgw.simulators.engine import Engine, EngineConfig, SamplingSpec, choice_sampling, sample_index
from lmgw.transport.openai_synth import DONE, OpenAISynth


def events(data: bytes) -> list[Any]:
    return [
        "[DONE]" if b == b"data: [DONE]" else msgspec.json.decode(b[6:])
        for b in data.split(b"\n\n")
        if b
    ]


def test_a_choice_synth_numbers_its_events_and_leaves_the_tail() -> None:
    s = OpenAISynth("chat", "r", "m", 1, include_usage=True, index=2, last=False)
    evs = events(s.delta("a", [1]) + s.finish("stop", None, 5, 1, 0))
    assert [e["choices"][0]["index"] for e in evs] == [2, 2, 2]
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[-1]["choices"][0]["finish_reason"] == "stop"  # no usage event, no [DONE]
    assert s.final_usage == (5, 1, 0)
    tail = events(s.tail(10, 7, 3))
    assert tail[0]["choices"] == [] and tail[0]["usage"]["total_tokens"] == 17
    assert tail[1] == "[DONE]"
    assert OpenAISynth("chat", "r", "m", 1).tail(1, 1, 0) == DONE  # no usage asked for
    c = OpenAISynth("completion", "r", "m", 1, echo="Hi", index=3, last=False)
    evs = events(c.delta(" there", [9]) + c.finish("length", None, 2, 1, 0))
    assert [e["choices"][0]["index"] for e in evs] == [3, 3, 3]
    assert evs[0]["choices"][0]["text"] == "Hi"
    body = msgspec.json.decode(c.response("x", "stop", None, 2, 1, 0))
    assert body["choices"][0]["index"] == 3 and body["choices"][0]["text"] == "Hix"


def test_child_params_follow_vllms_seed_rule() -> None:
    seeded = SamplingParams(seed=10, max_tokens=4, extra={"min_p": 0.1})
    assert child_params(seeded, 0) is seeded
    assert child_params(seeded, 2).seed == 12 and child_params(seeded, 2).extra == {"min_p": 0.1}
    free = SamplingParams(max_tokens=4)
    assert child_params(free, 0) is free
    assert child_params(free, 3).seed is None and child_params(free, 3).extra == {SAMPLE_INDEX: 3}
    assert sample_index(child_params(free, 3).extra) == 3 and sample_index(None) == 0
    # the prompt's logprobs: asked of a prompt's first choice only (the merge copies them)
    asked = SamplingParams(seed=1, logprobs=2, prompt_logprobs=3)
    assert child_params(asked, 0).prompt_logprobs == 3
    assert child_params(asked, 1).prompt_logprobs is None and child_params(asked, 1).logprobs == 2
    assert child_params(SamplingParams(prompt_logprobs=0), 2).prompt_logprobs is None


def test_the_simulators_choices_follow_the_same_rule() -> None:
    """Choice i of a seeded request is the n = 1 answer with seed + i; an unseeded request's
    choices differ (drawn by index); choice 0 is always the n = 1 answer."""
    engine = Engine(EngineConfig())
    ids = [1, 5, 9, 12, 40]
    spec = SamplingSpec(max_tokens=12, seed=3)
    assert engine.generate(ids, *choice_sampling(spec, 2)).text == (
        engine.generate(ids, SamplingSpec(max_tokens=12, seed=5)).text
    )
    assert choice_sampling(spec, 0) == (spec, 0)
    free = SamplingSpec(max_tokens=12)
    texts = {engine.generate(ids, *choice_sampling(free, i)).text for i in range(3)}
    assert len(texts) == 3


def test_child_requests_have_their_own_ids() -> None:
    greq = GatewayRequest("chat", "/v1/chat/completions", "m", True, b"{}", "r", [], 0.0)
    a, b = child_request(greq, 0), child_request(greq, 1)
    assert (a.request_id, b.request_id, greq.request_id) == ("r:0", "r:1", "r")
    assert a.timings is b.timings is greq.timings  # Server-Timing sees every child's legs
    assert a.stream and a.model == "m"


class _Responder:
    def __init__(self) -> None:
        self.started = False
        self.out: list[bytes] = []
        self.ended = False

    async def start(self, status: int, headers: Any) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        self.out.append(data)

    async def end(self, data: bytes = b"") -> None:
        self.out.append(data)
        self.ended = True


def _synths(count: int, **kw: Any) -> list[OpenAISynth]:
    return [OpenAISynth("completion", "r", "m", 1, index=k, last=False, **kw)
            for k in range(count)]  # fmt: skip


def test_merged_bodies_and_usage() -> None:
    """Two prompts x n=2: choices in index order, completion tokens summed, each prompt's
    tokens once."""
    synths = _synths(4)
    fan = Fanout(_Responder(), synths, 2)  # type: ignore[arg-type]
    for k, s in enumerate(synths):
        prompt = 5 if k < 2 else 7
        fan.bodies[k] = s.response(f"t{k}", "stop", None, prompt, k + 1, 1)
    assert fan.usage() == (12, 10, 2)
    body = msgspec.json.decode(fan.merged())
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["t0", "t1", "t2", "t3"]
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["total_tokens"] == 22
    assert [c["prompt_logprobs"] for c in body["choices"]] == [None] * 4


def test_merged_completions_copy_each_prompts_prompt_logprobs() -> None:
    """Only a prompt's first choice computed its prompt logprobs: every choice of that prompt
    carries them (as vLLM's answer); a chat keeps them at the top level, from choice 0."""
    synths = _synths(4, token_text=str)
    fan = Fanout(_Responder(), synths, 2)  # type: ignore[arg-type]
    for k, s in enumerate(synths):
        plps = [None, Token(10 + k, -1.0, 1)] if k % 2 == 0 else None
        fan.bodies[k] = s.response(f"t{k}", "stop", None, 2, 1, 0, prompt_lps=plps)
    got = [c["prompt_logprobs"] for c in msgspec.json.decode(fan.merged())["choices"]]
    one = {"logprob": -1.0, "rank": 1}
    assert (
        got
        == [[None, {"10": {**one, "decoded_token": "10"}}]] * 2
        + [[None, {"12": {**one, "decoded_token": "12"}}]] * 2
    )
    chats = [OpenAISynth("chat", "r", "m", 1, index=k, last=False, token_text=str)
             for k in range(2)]  # fmt: skip
    fan = Fanout(_Responder(), chats, 2)  # type: ignore[arg-type]
    for k, s in enumerate(chats):
        plps = [None, Token(7, -1.0, 1)] if k == 0 else None
        fan.bodies[k] = s.response("x", "stop", None, 2, 1, 0, prompt_lps=plps)
    body = msgspec.json.decode(fan.merged())
    assert body["prompt_logprobs"] == [None, {"7": {**one, "decoded_token": "7"}}]
    assert all("prompt_logprobs" not in c for c in body["choices"])


async def test_pump_writes_once_ends_once_and_stops_on_failure() -> None:
    for failed in (False, True):
        responder = _Responder()
        synths = _synths(2, include_usage=True)
        fan = Fanout(responder, synths, 2)  # type: ignore[arg-type]
        firsts: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fan.pump, list, partial(firsts.append, 1))
            await fan.sink(0).send(synths[0].delta("a", [1]))
            await fan.sink(1).end(synths[1].finish("stop", None, 3, 0, 0))
            if failed:
                fan.fail(GatewayError(502, "x"))
            else:
                await fan.put(synths[0].tail(3, 1, 0))
            fan.close()
        data = b"".join(responder.out)
        assert firsts == [1] and responder.started
        assert responder.ended is not failed  # a failure is answered by the caller
        assert data.count(b"[DONE]") == (0 if failed else 1)
