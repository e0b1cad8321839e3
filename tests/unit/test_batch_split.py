"""The sans-IO merge of a completions batch split into one P/D request per prompt."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.pipeline.batch_split import BatchMerge, batch_prompts, split_of
from lmgw.transport.dialects import ClientBody

enc = msgspec.json.encode
dec = msgspec.json.decode


def event(obj: object) -> bytes:
    return b"data: " + enc(obj) + b"\n\n"


def events_of(data: bytes) -> list:
    out = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append(payload if payload == b"[DONE]" else dec(payload))
    return out


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("one", None),
        ([1, 2, 3], None),  # one prompt as token ids
        (["only"], None),  # a batch of one: sent as it is
        ([[1, 2]], None),
        (["a", "b c"], [b'"a"', b'"b c"']),
        ([[1, 2], [3]], [b"[1,2]", b"[3]"]),
        ([], None),
    ],
)
def test_batch_prompts_splits_only_batches_of_several(prompt: object, expected: object) -> None:
    got = batch_prompts(ClientBody(enc({"model": "m", "prompt": prompt})))
    assert (None if got is None else [bytes(r) for r in got]) == expected


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"prompt": null}', b'{"model": "m"}'])
def test_batch_prompts_leaves_odd_bodies_to_the_worker(body: bytes) -> None:
    assert batch_prompts(ClientBody(body)) is None


def test_whole_answers_merge_with_choices_renumbered_and_each_prompt_counted_once() -> None:
    """Two prompts x n=2: four children, one choice each; each prompt's tokens once."""

    def answer(k: int, text: str, prompt: int, cached: int) -> bytes:
        return enc({
            "id": f"cmpl-req-1:{k}", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        })  # fmt: skip

    merge = BatchMerge(4, 2, "req-1", include_usage=False)
    bodies = [
        answer(0, "a", 5, 0),
        answer(1, "b", 5, 5),
        answer(2, "c", 7, 4),
        answer(3, "d", 7, 7),
    ]
    out = dec(merge.whole(bodies))
    assert out["id"] == "cmpl-req-1"  # the first child's id, named for the parent
    assert [(c["index"], c["text"]) for c in out["choices"]] == [
        (0, "a"), (1, "b"), (2, "c"), (3, "d")
    ]  # fmt: skip
    assert out["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 4},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "split"),
    [
        ({"prompt": "a"}, None),
        ({"prompt": "a", "n": 1}, None),
        ({"prompt": "a", "n": 3}, (None, 3)),
        ({"prompt": ["a", "b"]}, ([b'"a"', b'"b"'], 1)),
        ({"prompt": ["a", "b"], "n": 2}, ([b'"a"', b'"b"'], 2)),
        ({"prompt": ["a", "b"], "n": "2"}, ([b'"a"', b'"b"'], 1)),  # the worker's 400
    ],
)
def test_split_of_completions(body: dict, split: object) -> None:
    got = split_of("completions", ClientBody(enc({"model": "m", **body})))
    if got is not None:
        got = (None if got[0] is None else [bytes(r) for r in got[0]], got[1])
    assert got == split


def test_split_of_chat_is_by_n_only() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": ["a", "b"]}
    assert split_of("chat", ClientBody(enc(chat))) is None
    assert split_of("chat", ClientBody(enc({**chat, "n": 4}))) == (None, 4)


def test_stream_events_interleave_under_one_id_with_one_usage_event_and_one_done() -> None:
    merge = BatchMerge(2, 1, "r", include_usage=True)

    def chunk(i: int, text: str) -> bytes:
        return event(
            {"id": f"cmpl-r:{i}", "created": 100 + i, "choices": [{"index": 0, "text": text}]}
        )

    def closing(i: int, prompt: int) -> bytes:
        usage = {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}
        return event({"id": f"cmpl-r:{i}", "choices": [], "usage": usage}) + b"data: [DONE]\n\n"

    out = merge.events(1, chunk(1, "x")) + merge.events(0, chunk(0, "y") + closing(0, 3))
    out += merge.events(1, closing(1, 4)) + merge.tail()
    got = events_of(out)
    assert got[-1] == b"[DONE]" and got.count(b"[DONE]") == 1
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in got[:2]] == [
        (1, "x"), (0, "y")
    ]  # fmt: skip
    assert {e["id"] for e in got[:-1]} == {"cmpl-r"}
    assert {e["created"] for e in got[:2]} == {101}  # the first event's, for the whole stream
    assert got[2]["choices"] == []
    assert got[2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert len(got) == 4


def test_continuous_usage_is_the_batch_so_far_and_no_usage_event_unless_asked() -> None:
    merge = BatchMerge(2, 1, "r", include_usage=False)
    u0 = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    u1 = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    merge.events(0, event({"id": "a", "choices": [{"index": 0, "text": "p"}], "usage": u0}))
    out = merge.events(1, event({"id": "b", "choices": [{"index": 0, "text": "q"}], "usage": u1}))
    (got,) = events_of(out)
    assert got["usage"] == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
    assert got["id"] == "a"  # the first id seen, whatever the worker called it
    assert merge.tail() == b"data: [DONE]\n\n"


def test_error_events_and_comments_pass_and_the_end_is_only_done() -> None:
    merge = BatchMerge(3, 1, "r", include_usage=True)
    assert merge.events(2, b": keep-alive\n\n") == b": keep-alive\n\n"
    err = event({"error": {"message": "boom", "code": 502}})
    assert merge.events(1, err + b"data: [DONE]\n\n") == err
    assert merge.error_sent
    assert merge.tail() == b"data: [DONE]\n\n"


@given(
    n=st.integers(1, 4),
    arrivals=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), max_size=40),
)
def test_every_choice_keeps_its_place_whatever_the_arrival_order(
    n: int, arrivals: list[tuple[int, int]]
) -> None:
    """Sample j of prompt i (child i*n + j, answering its one choice as index 0) is the
    client's choice i*n + j, in any interleaving."""
    merge = BatchMerge(5 * n, n, "r", include_usage=False)
    for i, j in arrivals:
        j %= n
        k = i * n + j
        out = merge.events(k, event({"id": "x", "choices": [{"index": 0, "text": f"{i}.{j}"}]}))
        (got,) = events_of(out)
        (choice,) = got["choices"]
        assert choice["index"] == i * n + j
        assert choice["text"] == f"{i}.{j}"


def test_streamed_usage_counts_each_prompt_once_over_its_samples() -> None:
    merge = BatchMerge(4, 2, "r", include_usage=True)
    for k, prompt in enumerate((3, 3, 5, 5)):
        usage = {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}
        merge.events(k, event({"id": "x", "choices": [], "usage": usage}))
    usage_event, done = events_of(merge.tail())
    assert done == b"[DONE]"
    assert usage_event["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["index", "text", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
_usage = st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "prompt_tokens_details"]), _json
)
_event = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": _json,
            "created": _json,
            "choices": st.lists(_json, max_size=2) | _json,
            "usage": _usage | _json,
        },
    )
    | _json
)


@given(st.lists(st.tuples(st.integers(0, 3), _event), max_size=8), st.booleans())
def test_any_worker_event_is_merged_or_passed_never_raised(events: list, usage: bool) -> None:
    """A child's worker may send anything: the merge never raises on it (a raise would cut
    the client's stream), and the stream still ends with one [DONE]."""
    merge = BatchMerge(4, 2, "r", include_usage=usage)
    out = b"".join(merge.events(k, event(e)) for k, e in events) + merge.tail()
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1


@given(st.lists(st.dictionaries(st.sampled_from(["id", "choices", "usage"]), _json), min_size=1))
def test_whole_answers_of_any_shape_merge_or_fail_as_a_gateway_error(bodies: list) -> None:
    merge = BatchMerge(len(bodies), 1, "r", include_usage=False)
    out = dec(merge.whole([enc(b) for b in bodies]))
    assert isinstance(out, dict)
