"""What a worker writes is not trusted: every rewriter of a worker's answer (tool-call and
reasoning parsing, SGLang's logprob merge, a continuation's splice, the P/D batch merge) and
the reader of its /metrics take events, bodies and text of any shape without raising, since a
raise would cut the client's stream, turn a served answer into a 500 or end the monitor. The
shapes here are plausible ones (the right keys, wrong types) that byte-level fuzzing rarely
reaches."""

from __future__ import annotations

import random

import msgspec
import pytest
from fuzz_support import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.errors import GatewayError, parse_error_body
from lmgw.pipeline import migration
from lmgw.pipeline.batch_split import BatchMerge
from lmgw.routing.kv_events import KVEventError, decode_vllm_batch
from lmgw.routing.policies.cache_aware import CacheAware
from lmgw.routing.responses import IdReader
from lmgw.text.service import ModelText
from lmgw.tools.loop import RoundStream
from lmgw.tools.parsers import get_tool_parser
from lmgw.tools.reasoning import ReasoningParser
from lmgw.tools.relay import OutputRewriter
from lmgw.transport.dialects import ClientBody, Peer, StageContext, get_dialect
from lmgw.workers.monitor import apply_engine_metrics
from lmgw.workers.registry import Registry
from lmgw.workers.worker import EngineLoad, Worker

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


metric_lines = st.lists(
    st.tuples(
        st.sampled_from([b"vllm:num_requests_running", b"vllm:num_requests_waiting",
                         b"vllm:kv_cache_usage_perc", b"vllm:prefix_cache_hits_total",
                         b"vllm:lora_requests_info", b"vllm:other", b"# HELP x", b"\xff"]),
        st.sampled_from([b"", b'{engine="0"}', b'{running_lora_adapters="a,\xff",max_lora="x"}',
                         b'{max_lora="2",running_lora_adapters="a,b"}', b"{", b'{a="']),
        st.sampled_from([b" 1", b" NaN", b" +Inf", b" -Inf", b" -3", b" 1e999", b" x", b"",
                         b" 0.5", b" 2 1700000000"]),
    ),
    max_size=8,
).map(lambda ls: b"\n".join(a + b + c for a, b, c in ls))  # fmt: skip


@SETTINGS
@given(metric_lines | st.binary(max_size=200))
def test_a_workers_metrics_never_raise_and_never_give_a_load_routing_cannot_order(
    text: bytes,
) -> None:
    """A worker's /metrics is read on every probe: a raise there would end the monitor; a NaN
    or negative queue would make its load compare wrongly with every other worker's."""
    load = EngineLoad()
    apply_engine_metrics(load, text)
    for value in (load.running, load.waiting, load.kv_usage):
        assert 0.0 <= value < float("inf")


hashes = st.lists(st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8) | anything, max_size=4)
kv_event = st.one_of(
    st.tuples(
        st.just("BlockStored"), hashes, st.none() | st.integers(0, 9) | anything,
        st.lists(st.integers(0, 50), max_size=40) | anything,
        st.sampled_from([16, 0, -1]) | anything,
        st.none() | anything, st.sampled_from(["GPU", "CPU", None]) | anything,
    ).map(list),
    st.tuples(st.just("BlockRemoved"), hashes, st.sampled_from(["GPU", None]) | anything).map(list),
    st.just(["AllBlocksCleared"]),
    st.dictionaries(st.sampled_from(["type", "block_hashes", "token_ids", "block_size"]), anything),
    anything,
)  # fmt: skip


@SETTINGS
@given(
    st.tuples(st.floats(allow_nan=False) | anything, st.lists(kv_event, max_size=4))
    | st.fixed_dictionaries({"events": st.lists(kv_event, max_size=4)}, optional={"ts": anything})
    | anything
)
def test_a_workers_kv_events_are_applied_or_refused_never_raised(batch: object) -> None:
    """A KV event batch is decoded (every field's type checked) or refused as a whole with
    KVEventError; what is decoded, cache_aware's index takes without raising."""
    try:
        payload = msgspec.msgpack.encode(batch)
    except (TypeError, OverflowError):
        return
    try:
        _, events, _ = decode_vllm_batch(payload)
    except KVEventError:
        return
    policy = CacheAware()
    registry = Registry()
    worker = registry.add(Worker("w0", "http://127.0.0.1:9000", "pd", frozenset({"m"})))
    for event in events:
        policy.on_kv_event(worker, event)


class _Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


@SETTINGS
@given(event, stream)
def test_usage_filling_and_response_id_taps_take_any_worker_output(body, events: bytes) -> None:
    """An answer without usage gets one counted (or passes as it came), and the Responses
    API's id taps read any answer."""
    text = ModelText("m", _Tokenizer(), None, 100)  # type: ignore[arg-type]
    out = text.fill_usage(3, enc(body))
    assert isinstance(out, bytes)
    found: list[str] = []
    tap = IdReader(found.append)
    assert tap.body(enc(body)) == enc(body)
    assert tap.events(events) == events


DEEP = b"[" * 5000 + b"]" * 5000  # past msgspec's nesting limit: it raises RecursionError


def _deep_consumers() -> list:
    nixl = get_dialect("vllm-nixl")
    peer = Peer("127.0.0.1", 1)
    ctx = StageContext("r", "/v1/completions", [], peer, peer)
    sent = nixl.prefill_request(ClientBody(b'{"prompt": "x"}'), ctx)
    rounds = RoundStream(frozenset({"f"}), None, True)
    return [
        ("error body", lambda: parse_error_body(DEEP)),
        ("tool parsing (stream)", lambda: rewriter().events(b"data: " + DEEP + b"\n\n")),
        ("tool parsing (body)", lambda: rewriter().body(DEEP)),
        ("tool loop round", lambda: rounds.feed(b"data: " + DEEP + b"\n\n")),
        ("journal", lambda: migration.progress_of([b"data: " + DEEP + b"\n\n"], "chat")),
        ("splice", lambda: migration.Splice("chat", migration.Progress())(b"data: " + DEEP)),
        ("batch merge", lambda: BatchMerge(1, 1, "r", False).events(0, b"data: " + DEEP)),
        ("usage fill", lambda: ModelText("m", _Tokenizer(), None, 9).fill_usage(1, DEEP)),
        ("response id", lambda: IdReader(lambda _: None).body(DEEP)),
        ("nixl prefill answer", lambda: nixl.read_prefill(sent, 200, b'{"x": ' + DEEP + b"}")),
        ("kv events", lambda: decode_vllm_batch(b"\x91" * 3000)),
    ]


@pytest.mark.parametrize("case", range(len(_deep_consumers())))
def test_nesting_past_the_decoders_limit_is_refused_not_raised(case: int) -> None:
    """A worker's JSON nested deeper than msgspec decodes raises RecursionError, which no
    reader of worker output may let out (a raise cuts the stream or ends the monitor)."""
    name, call = _deep_consumers()[case]
    try:
        call()
    except (GatewayError, KVEventError) as exc:  # refused, named
        assert exc.args, name
    except Exception as exc:
        assert type(exc).__name__ == "StageError", (name, exc)


tool_delta = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(0, 2) | anything,
        "id": anything,
        "function": st.fixed_dictionaries(
            {}, optional={"name": st.sampled_from(["f", "g"]) | anything, "arguments": anything}
        )
        | anything,
    },
)
round_event = st.fixed_dictionaries(
    {},
    optional={
        "id": anything,
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "tool_calls": st.lists(tool_delta, max_size=2) | anything,
                            "content": anything,
                            "role": anything,
                        },
                    )
                    | anything,
                    "finish_reason": anything,
                },
            ),
            max_size=1,
        )
        | anything,
        "usage": anything,
    },
)


@SETTINGS
@given(st.lists(round_event, max_size=6), st.booleans())
def test_a_tool_loop_round_takes_any_worker_stream(events: list, last: bool) -> None:
    """The gateway's tool loop reads each round's stream for its own tools' calls."""
    rounds = RoundStream(None if last else frozenset({"f"}), None, True)
    for e in events:
        assert isinstance(rounds.feed(b"data: " + enc(e) + b"\n\n"), bytes)
    assert isinstance(rounds.flush(), bytes)
    assert isinstance(rounds.calls, list)
