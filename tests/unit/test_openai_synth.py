"""OpenAI answers from native deltas (lmgw.transport.openai_synth): vLLM's exact event and body
shapes, byte for byte where the order of keys is vLLM's, and the same text as the HTTP
simulator's answer for the same completion."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.protocol.messages import Token
from lmgw.simulators import logprobs as sim_lp
from lmgw.simulators.app import SimWorker, WorkerOptions, _Plan, _StreamWriter
from lmgw.simulators.engine import Engine, EngineConfig, SamplingSpec
from lmgw.transport.openai_synth import (
    DONE,
    OpenAISynth,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    usage_dict,
)
from lmgw.worker.sim import wire_token


def events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    out = []
    for block in data[:-2].split(b"\n\n"):
        assert block.startswith(b"data: ") and b"\n" not in block, block
        payload = block[6:]
        out.append("[DONE]" if payload == b"[DONE]" else msgspec.json.decode(payload))
    return out


def test_chat_stream_bytes_are_vllms() -> None:
    s = OpenAISynth("chat", "r1", "m", 7, include_usage=True)
    data = s.delta("Hel", [1]) + s.delta("lo", [2]) + s.finish("stop", None, 5, 2, 3)
    head = b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":7,"model":"m",'
    assert data == (
        head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,'
        b'"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"delta":{"content":"lo"},"logprobs":null,'
        b'"finish_reason":null}]}\n\n'
        + head + b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,'
        b'"finish_reason":"stop","stop_reason":null}]}\n\n'
        + head + b'"choices":[],"usage":{"prompt_tokens":5,"total_tokens":7,'
        b'"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}\n\n'
        + DONE
    )  # fmt: skip
    assert s.text == "Hello" and s.tokens == 2


def test_completion_stream_with_echo_and_continuous_usage() -> None:
    s = OpenAISynth("completion", "r2", "m", 1, continuous_usage=True, prompt_tokens=4, echo="Hi")
    evs = events(s.delta(" there", [9]) + s.finish("length", 13, 4, 1, 0))
    assert [e["object"] for e in evs[:-1]] == ["text_completion"] * 3 and evs[-1] == "[DONE]"
    assert [e["id"] for e in evs[:-1]] == ["cmpl-r2"] * 3
    echo, tok, fin = (e["choices"][0] for e in evs[:-1])
    assert echo == {"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None,
                    "stop_reason": None}  # fmt: skip
    assert tok["text"] == " there" and fin["finish_reason"] == "length"
    assert fin["stop_reason"] == 13
    assert [e["usage"]["completion_tokens"] for e in evs[:-1]] == [0, 1, 1]
    assert all(e["usage"]["prompt_tokens"] == 4 for e in evs[:-1])


def test_open_is_sent_once_even_across_a_continuation() -> None:
    s = OpenAISynth("chat", "r", "m", 1)
    first = events(s.delta("a", [1]))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    again = events(s.delta("b", [2]) + s.finish("length", None, 1, 2, 0))
    assert all("role" not in e["choices"][0]["delta"] for e in again[:-1])
    assert s.open() == b""


def test_finish_without_deltas_still_opens_the_stream() -> None:
    evs = events(OpenAISynth("chat", "r", "m", 1).finish("stop", None, 3, 0, 0))
    assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert evs[1]["choices"][0]["finish_reason"] == "stop" and evs[2] == "[DONE]"
    assert len(evs) == 3  # no usage event unless asked


def test_whole_answers_have_the_simulators_shape() -> None:
    """Same keys, in the same order, as the HTTP simulator's (vLLM's) non-streamed bodies."""
    engine = Engine(EngineConfig())
    ids = list(engine.tokenizer.encode("hello world"))
    completion = engine.generate(ids, SamplingSpec(max_tokens=6))
    sim = SimWorker(WorkerOptions(model="m"))
    for kind in ("chat", "completion"):
        plan = _Plan(kind, "r", "m", [ids], [completion], False, False, False)
        theirs = msgspec.json.decode(sim._body(plan))
        ours = msgspec.json.decode(
            OpenAISynth(kind, "r", "m", theirs["created"]).response(
                completion.text,
                completion.finish_reason,
                completion.stop_reason,
                len(ids),
                completion.num_tokens,
                0,
            )
        )
        assert list(ours) == list(theirs)
        assert ours == theirs, kind


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_the_simulators(kind: str) -> None:
    """Deltas of one token each, as a native worker sends them, give the HTTP simulator's
    text event by event (same pieces, same JSON escaping)."""
    engine = Engine(EngineConfig())
    ids = list(engine.tokenizer.encode('a "quoted" prompt\n with \u00e9'))
    completion = engine.generate(ids, SamplingSpec(max_tokens=20))
    plan = _Plan(kind, "r", "m", [ids], [completion], True, False, False)
    writer = _StreamWriter(plan, 1)
    theirs = events(b"".join(writer.step(i) for i in range(completion.num_tokens))
                    + writer.finish())  # fmt: skip
    s = OpenAISynth(kind, "r", "m", 1)
    ours = events(
        b"".join(s.delta(p, [t]) for p, t in zip(completion.pieces, completion.token_ids,
                                                   strict=True))
        + s.finish(completion.finish_reason, completion.stop_reason, len(ids),
                   completion.num_tokens, 0)
    )  # fmt: skip
    key = "delta" if kind == "chat" else None

    def texts(evs: list[Any]) -> list[str]:
        out = []
        for e in evs[:-1]:
            for c in e["choices"]:
                out.append(c[key].get("content", "") if key else c["text"])
        return out

    assert texts(ours) == texts(theirs)
    assert "".join(texts(ours)) == completion.text
    assert ours[-2]["choices"][0]["finish_reason"] == completion.finish_reason


def test_logprobs_when_asked() -> None:
    s = OpenAISynth("chat", "r", "m", 1, logprobs=True, token_text=lambda t: f"<{t}>")
    ev = events(s.delta("x", [5], [Token(5, -0.25)]))[1]
    assert ev["choices"][0]["logprobs"] == {
        "content": [{"token": "<5>", "logprob": -0.25, "bytes": list(b"<5>"), "top_logprobs": []}]
    }
    c = OpenAISynth("completion", "r", "m", 1, logprobs=True, token_text=lambda t: "ab")
    body = msgspec.json.decode(
        c.response("abab", "length", None, 1, 2, 0, [1, 2], [Token(1, -1.0), Token(2, -2.0)])
    )
    assert body["choices"][0]["logprobs"] == {
        "text_offset": [0, 2],
        "token_logprobs": [-1.0, -2.0],
        "tokens": ["ab", "ab"],
        "top_logprobs": [{"ab": -1.0}, {"ab": -2.0}],  # the sampled token, as vLLM's logprobs=0
    }
    quiet = OpenAISynth("chat", "r", "m", 1)  # not asked: null, whatever the worker sent
    assert events(quiet.delta("x", [5], [Token(5, -0.25)]))[1]["choices"][0]["logprobs"] is None


def _name(t: int) -> str:
    return f"<{t % 7}>"  # a few shared names: duplicates within one top list happen


def _source() -> sim_lp.LogprobSource:
    return sim_lp.LogprobSource(range(100, 160), 7, _name)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**40),
    st.lists(st.integers(100, 159), min_size=1, max_size=6),
    st.integers(0, sim_lp.MAX_TOP_LOGPROBS),
    st.integers(0, 50),
)
def test_rendering_equals_the_http_simulators(key: int, ids: list[int], k: int, at: int) -> None:
    """The wire entries of the simulator's logprobs render to the HTTP simulator's shapes, for
    any k: chat ``content`` (alternatives best first), completions' lists (the k best and the
    sampled token; offsets from ``at``), and ``prompt_logprobs`` (the prompt token first)."""
    src = _source()
    entries = src.output(key, ids)
    wire = [wire_token(e, k) for e in entries]
    assert chat_logprobs(wire, _name) == sim_lp.chat_logprobs(entries, k, _name)
    obj, end = completion_logprobs(wire, _name, at)
    assert obj == sim_lp.completion_logprobs(entries, k, _name, at)
    assert end == at + sum(len(_name(t)) for t in ids)
    prompt = src.prompt(ids)
    wired = [None if e is None else wire_token(e, k) for e in prompt]
    assert prompt_logprobs(wired, _name) == sim_lp.prompt_logprobs(prompt, k, _name)
    # byte for byte too (the same key order)
    assert msgspec.json.encode(prompt_logprobs(wired, _name)) == msgspec.json.encode(
        sim_lp.prompt_logprobs(prompt, k, _name)
    )


def test_alternatives_in_streams_and_bodies() -> None:
    """Chat chunks carry their token's alternatives; completions' offsets run on across
    chunks (after an echo); prompt logprobs go in the body where vLLM puts them; -inf is
    clamped; a sampled token outside the best k comes last in a completion's object."""
    names = {1: "a", 2: "bb", 3: "c", 4: "dd"}.__getitem__
    t1 = Token(1, -0.5, 1, [1, 3], [-0.5, -1.0])
    t2 = Token(2, float("-inf"), 40, [4, 3], [-0.1, -0.2])
    chat = OpenAISynth("chat", "r", "m", 1, logprobs=True, token_text=names)
    ev = events(chat.delta("a", [1], [t1]))[1]["choices"][0]["logprobs"]
    assert ev == {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]},
        {"token": "c", "logprob": -1.0, "bytes": [99]}]}]}  # fmt: skip
    ev = events(chat.delta("bb", [2], [t2]))[0]["choices"][0]["logprobs"]["content"][0]
    assert ev["logprob"] == -9999.0 and [t["token"] for t in ev["top_logprobs"]] == ["dd", "c"]
    comp = OpenAISynth("completion", "r", "m", 1, logprobs=True, token_text=names, echo="xyz")
    first = events(comp.delta("a", [1], [t1]))
    assert first[0]["choices"][0]["text"] == "xyz"
    lp = first[1]["choices"][0]["logprobs"]
    assert lp == {"text_offset": [3], "token_logprobs": [-0.5], "tokens": ["a"],
                  "top_logprobs": [{"a": -0.5, "c": -1.0}]}  # fmt: skip
    lp = events(comp.delta("bb", [2], [t2]))[0]["choices"][0]["logprobs"]
    assert lp["text_offset"] == [4] and lp["token_logprobs"] == [-9999.0]
    assert list(lp["top_logprobs"][0].items()) == [("dd", -0.1), ("c", -0.2), ("bb", -9999.0)]
    # whole answers: prompt_logprobs at the chat's top level, in a completion's choice
    plps = [None, Token(3, -2.0, 3, [4, 1], [-0.3, -0.9]), Token(4, -0.1, 1, [4, 1], [-0.1, -2.5])]
    want = [
        None,
        {"3": {"logprob": -2.0, "rank": 3, "decoded_token": "c"},
         "4": {"logprob": -0.3, "rank": 1, "decoded_token": "dd"},
         "1": {"logprob": -0.9, "rank": 2, "decoded_token": "a"}},
        {"4": {"logprob": -0.1, "rank": 1, "decoded_token": "dd"},
         "1": {"logprob": -2.5, "rank": 2, "decoded_token": "a"}},
    ]  # fmt: skip
    chat = OpenAISynth("chat", "r", "m", 1, logprobs=False, token_text=names)
    body = msgspec.json.decode(chat.response("a", "stop", None, 3, 1, 0, [1], None, plps))
    assert body["prompt_logprobs"] == want and body["choices"][0]["logprobs"] is None
    comp = OpenAISynth("completion", "r", "m", 1, logprobs=True, token_text=names)
    body = msgspec.json.decode(comp.response("a", "stop", None, 3, 1, 0, [1], [t1], plps))
    assert body["choices"][0]["prompt_logprobs"] == want
    assert "prompt_logprobs" not in body
    plain = msgspec.json.decode(comp.response("a", "stop", None, 3, 1, 0, [1], [t1]))
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_usage_dict_and_bad_kind() -> None:
    assert usage_dict(3, 4) == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    with pytest.raises(ValueError):
        OpenAISynth("embedding", "r", "m", 1)
