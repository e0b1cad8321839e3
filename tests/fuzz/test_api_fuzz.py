"""Request fuzzing at the JSON level against a live simulated fleet (API keys on): valid-ish
bodies (a valid request with one to three fields replaced by arbitrary JSON, dropped, or added)
and invalid ones (arbitrary JSON, broken JSON, wrong top-level types, deep nesting, invalid
UTF-8), for every route that takes a body, streamed or not. Every answer must be a well-formed
response below 500 (an error in OpenAI's shape), and the gateway must stay healthy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_support import MODEL, LiveGateway, examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=examples(80), deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
    },
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 4},
    "/generate": {"text": "hello", "sampling_params": {"max_new_tokens": 4}},
    "/tokenize": {"model": MODEL, "prompt": "hello"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2, 3]},
    # relayed to the worker as sent (api/passthru.py): the simulator checks these
    "/v1/embeddings": {"model": MODEL, "input": ["hello", "world"], "dimensions": 8},
    "/v2/embed": {"model": MODEL, "texts": ["hello"], "embedding_types": ["float"]},
    "/classify": {"model": MODEL, "input": "hello"},
    "/score": {"model": MODEL, "text_1": "hello", "text_2": ["hello", "world"]},
    "/rerank": {"model": MODEL, "query": "hello", "documents": ["a", "b"], "top_n": 1},
    "/v1/messages": {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/chat/completions/batch": {
        "model": MODEL,
        "messages": [[{"role": "user", "content": "hi"}]],
    },
    "/v1/responses": {"model": MODEL, "input": "hello", "max_output_tokens": 4},
}
#: fields the gateway or the engine read: the ones most worth breaking
FIELDS = [
    "model", "messages", "prompt", "stream", "stream_options", "max_tokens",
    "max_completion_tokens", "n", "best_of", "temperature", "top_p", "stop", "logit_bias",
    "user", "tools", "tool_choice", "response_format", "seed", "logprobs", "top_logprobs",
    "echo", "chat_template_kwargs", "add_special_tokens", "tokens", "text", "input_ids",
    "sampling_params", "skip_special_tokens", "continue_final_message",
    "input", "dimensions", "encoding_format", "texts", "embedding_types", "text_1", "text_2",
    "query", "documents", "top_n", "system", "stop_sequences", "previous_response_id",
    "instructions", "background", "store", "max_output_tokens",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, "", "sim-model", "sim-alias", MODEL + "x"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3])},
        optional={
            "content": st.one_of(
                st.text(max_size=40),
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url", "input_audio", "x"])},
                        optional={"text": json_values, "image_url": json_values},
                    ),
                    max_size=3,
                ),
            ),
            "name": json_values,
            "tool_calls": json_values,
        },
    ),
    max_size=4,
)


@st.composite
def valid_ish(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[path])
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS) | st.text(max_size=8))
        action = draw(st.sampled_from(["set", "set", "drop"]))
        if action == "drop":
            body.pop(field, None)
        elif field == "messages":
            body[field] = draw(messages)
        else:
            body[field] = draw(json_values)
    if draw(st.booleans()) and path not in ("/tokenize", "/v1/chat/completions/batch"):
        body["stream"] = True
    return path, json.dumps(body).encode()


ODD_BODIES = [
    b"", b"null", b"[]", b"{", b'{"model": NaN}', b'{"a": 1e999999}', b"\xef\xbb\xbf{}",
    b'{"model": "\xff\xfe"}', b'{"messages": [{"role": "user", "content": "\xc3"}]}',
]  # fmt: skip
broken = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda n: b'{"model": "x", "messages": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 3000).map(lambda n: b"{" * n),
    st.sampled_from(ODD_BODIES),
)


@pytest.fixture(
    scope="module",
    params=[None, "vllm-nixl", "sglang-bootstrap"],
    ids=["merged", "vllm-nixl", "sglang-bootstrap"],
)
def live(request: pytest.FixtureRequest) -> Iterator[LiveGateway]:
    """A merged worker, and P/D pairs (the disaggregated paths: legs built from the body,
    batches and n split into pairs or given a room each)."""
    with LiveGateway(dialect=request.param) as gw:
        yield gw


def check(live: LiveGateway, path: str, body: bytes) -> None:
    status, headers, answer = live.request("POST", path, body)
    assert status < 500, (path, body[:300], status, answer[:500])
    if status >= 400:
        err = json.loads(answer)["error"]
        assert isinstance(err["message"], str) and err["message"], err
    elif headers.get("content-type", "").startswith("text/event-stream"):
        assert answer.endswith(b"\n\n"), answer[-200:]
        assert b'"code": 5' not in answer and b'"code":5' not in answer, answer[-500:]


@SETTINGS
@given(valid_ish())
def test_valid_ish_requests(live: LiveGateway, case: tuple[str, bytes]) -> None:
    check(live, *case)


@SETTINGS
@given(st.sampled_from(sorted(BASES)), broken)
def test_invalid_requests(live: LiveGateway, path: str, body: bytes) -> None:
    check(live, path, body)


def test_still_healthy_after_the_fuzzing(live: LiveGateway) -> None:
    live.assert_healthy()
