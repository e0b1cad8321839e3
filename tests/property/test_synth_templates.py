"""The byte templates of :class:`OpenAISynth` (plain events, bursts of them, plain whole
answers) give exactly what encoding vLLM's dicts gives, and what the general builder gives."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.protocol.messages import Delta
from lmgw.transport.openai_synth import OpenAISynth, usage_bytes, usage_dict

_enc = msgspec.json.encode

texts = st.text(max_size=12)  # quotes, backslashes, control characters, non-ASCII
names = st.text(min_size=1, max_size=10)
reasons = st.sampled_from(["stop", "length", "abort"])
stop_reasons = st.one_of(st.none(), st.integers(0, 1 << 20), st.text(max_size=5))
counts = st.integers(0, 1 << 20)


def chunk(kind: str, rid: str, model: str, created: int, index: int, text: str) -> bytes:
    """vLLM's streamed content event, from its dict."""
    if kind == "chat":
        choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None,
                                  "finish_reason": None}  # fmt: skip
        obj, prefix = "chat.completion.chunk", "chatcmpl-"
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None,
                  "stop_reason": None}  # fmt: skip
        obj, prefix = "text_completion", "cmpl-"
    event = {"id": prefix + rid, "object": obj, "created": created, "model": model,
             "choices": [choice]}  # fmt: skip
    return b"data: " + _enc(event) + b"\n\n"


def body(kind: str, rid: str, model: str, created: int, index: int, text: str, echo: str | None,
         reason: str, stop: Any, p: int, c: int, cached: int) -> bytes:  # fmt: skip
    """vLLM's whole answer without logprobs, from its dict."""
    usage = usage_dict(p, c, cached)
    if kind == "chat":
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "tool_calls": [],
                   "reasoning_content": None}  # fmt: skip
        return _enc({
            "id": "chatcmpl-" + rid, "object": "chat.completion", "created": created,
            "model": model,
            "choices": [{"index": index, "message": message, "logprobs": None,
                         "finish_reason": reason, "stop_reason": stop}],
            "service_tier": None, "system_fingerprint": None, "usage": usage,
            "prompt_logprobs": None, "kv_transfer_params": None,
        })  # fmt: skip
    return _enc({
        "id": "cmpl-" + rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": (echo or "") + text, "logprobs": None,
                     "finish_reason": reason, "stop_reason": stop, "prompt_logprobs": None}],
        "service_tier": None, "system_fingerprint": None, "usage": usage,
        "kv_transfer_params": None,
    })  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["chat", "completion"]),
    rid=names,
    model=names,
    created=st.integers(0, 1 << 40),
    index=st.integers(0, 300),
    pieces=st.lists(st.tuples(texts, st.integers(0, 3)), max_size=20),
    cuts=st.lists(st.integers(0, 20), max_size=5),
)
def test_plain_events_and_bursts_are_vllms_bytes(
    kind: str, rid: str, model: str, created: int, index: int,
    pieces: list[tuple[str, int]], cuts: list[int],
) -> None:  # fmt: skip
    deltas = [Delta("r", i, text, list(range(n))) for i, (text, n) in enumerate(pieces)]
    expected = b"".join(chunk(kind, rid, model, created, index, t) for t, _ in pieces)
    one = OpenAISynth(kind, rid, model, created, index=index)
    opening = one.open()
    by_event = b"".join(one.delta(d.text, d.token_ids) for d in deltas)
    assert by_event == expected
    # the same deltas in bursts (split anywhere), on a synth not opened yet
    burst = OpenAISynth(kind, rid, model, created, index=index)
    bounds = sorted({0, len(deltas), *(min(c, len(deltas)) for c in cuts)})
    out = b"".join(burst.deltas(deltas[a:b]) for a, b in pairwise(bounds))
    assert out == (opening + expected if deltas else b"")
    # the general builder (logprobs asked, none sent) gives the same bytes
    general = OpenAISynth(kind, rid, model, created, index=index, logprobs=True)
    general.open()
    assert general.deltas(deltas) == expected
    for s in (one, burst, general):
        assert s.text == "".join(t for t, _ in pieces)
        assert s.tokens == sum(n for _, n in pieces)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["chat", "completion"]),
    rid=names,
    model=names,
    created=st.integers(0, 1 << 40),
    index=st.integers(0, 300),
    text=st.text(max_size=40),
    echo=st.one_of(st.none(), texts),
    reason=reasons,
    stop=stop_reasons,
    usage=st.tuples(counts, counts, counts),
)
def test_plain_whole_answers_are_vllms_bytes(
    kind: str, rid: str, model: str, created: int, index: int, text: str, echo: str | None,
    reason: str, stop: Any, usage: tuple[int, int, int],
) -> None:  # fmt: skip
    s = OpenAISynth(kind, rid, model, created, index=index, echo=echo)
    got = s.response(text, reason, stop, *usage)
    assert got == body(kind, rid, model, created, index, text, echo, reason, stop, *usage)
    assert s.final_usage == usage


@given(counts, counts, st.one_of(st.none(), counts))
def test_usage_bytes_are_the_usage_dict_encoded(p: int, c: int, cached: int | None) -> None:
    assert usage_bytes(p, c, cached) == _enc(usage_dict(p, c, cached))
