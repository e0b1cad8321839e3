"""What a worker writes is not trusted: every rewriter of a worker's answer (tool-call and
reasoning parsing, SGLang's logprob merge, a continuation's splice, the P/D batch merge) takes
events and bodies of any JSON shape without raising, since a raise would cut the client's
stream or turn a served answer into a 500. The shapes here are plausible ones (the right keys,
wrong types) that byte-level fuzzing rarely reaches."""

from __future__ import annotations

import random

import msgspec
from fuzz_support import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.errors import GatewayError
from lmgw.pipeline import migration
from lmgw.pipeline.batch_split import BatchMerge
from lmgw.tools.parsers import get_tool_parser
from lmgw.tools.reasoning import ReasoningParser
from lmgw.tools.relay import OutputRewriter
from lmgw.transport.dialects import ClientBody, Peer, StageContext, get_dialect

SETTINGS = settings(
    max_examples=examples(200),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
enc = msgspec.json.encode

KEYS = ["index", "text", "content", "delta", "role", "finish_reason", "tool_calls", "logprobs",
        "reasoning_content", "usage", "meta_info", "input_token_logprobs", "id", "choices",
        "message", "function", "arguments", "name"]  # fmt: skip
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.text(max_size=8)
    | st.sampled_from(
        [
            "<tool_call>",
            "</tool_call>",
            '{"name": "f", "arguments": {}}',
            "<think>",
            "</think>",
            "stop",
            "assistant",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=10,
)
choice = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(0, 2) | anything,
        "delta": st.dictionaries(st.sampled_from(KEYS), anything, max_size=4) | anything,
        "message": st.dictionaries(st.sampled_from(KEYS), anything, max_size=4) | anything,
        "text": anything,
        "finish_reason": anything,
        "logprobs": anything,
    },
)
event = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": anything,
            "choices": st.lists(choice, max_size=2) | anything,
            "usage": st.dictionaries(st.sampled_from([*KEYS, "prompt_tokens"]), anything)
            | anything,
            "meta_info": st.dictionaries(st.sampled_from(KEYS), anything) | anything,
            "text": anything,
            "index": anything,
        },
    )
    | anything
)
stream = st.lists(event, max_size=6).map(
    lambda evs: b"".join(b"data: " + enc(e) + b"\n\n" for e in evs) + b"data: [DONE]\n\n"
)

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def rewriter() -> OutputRewriter:
    return OutputRewriter({"tools": TOOLS}, get_tool_parser("hermes"), ReasoningParser())


@SETTINGS
@given(st.lists(stream, max_size=3), st.lists(event, max_size=2))
def test_tool_and_reasoning_parsing_takes_any_worker_output(chunks: list, bodies: list) -> None:
    out = rewriter()
    for chunk in chunks:
        assert isinstance(out.events(chunk), bytes)
    for body in bodies:
        assert isinstance(rewriter().body(enc(body)), bytes)


@SETTINGS
@given(event, stream, event)
def test_sglang_logprob_merge_takes_any_decode_output(prefill: object, events: bytes, body) -> None:
    d = get_dialect("sglang-bootstrap")
    client = ClientBody(enc({"text": "hi", "return_logprob": True, "stream": True}))
    peer = Peer("127.0.0.1", 1, bootstrap_port=2)
    ctx = StageContext("r", "/generate", [], peer, peer, random.Random(1))
    sent = d.prefill_request(client, ctx)
    good = {"meta_info": {"input_token_logprobs": [[-0.1, 1]]}}
    for answer in (prefill, good):
        try:
            handoff = d.read_prefill(sent, 200, enc(answer))
        except Exception as exc:  # a prefill answer it refuses: a stage error, named
            assert type(exc).__name__ == "StageError", exc
            continue
        if d.rewrites_decode(handoff):
            assert isinstance(d.merge_decode_events(handoff, events), bytes)
            assert isinstance(d.merge_decode_body(handoff, enc(body)), bytes)


@SETTINGS
@given(stream, st.sampled_from(["chat", "completions"]))
def test_the_journal_and_the_splice_take_any_worker_output(events: bytes, endpoint: str) -> None:
    progress = migration.progress_of([events], endpoint)
    assert isinstance(migration.Splice(endpoint, progress)(events), bytes)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 3), stream), max_size=4), st.lists(event, min_size=1))
def test_the_batch_merge_takes_any_worker_output(chunks: list, bodies: list) -> None:
    merge = BatchMerge(4, 2, "r", include_usage=True)
    out = b"".join(merge.events(k, data) for k, data in chunks) + merge.tail()
    assert out.count(b"[DONE]") == 1
    try:
        BatchMerge(len(bodies), 1, "r", include_usage=False).whole([enc(b) for b in bodies])
    except GatewayError:
        pass  # a body that is no JSON object: the answer is a 502, named
