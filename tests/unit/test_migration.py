"""Mid-stream migration, sans-IO: journal parsing, continuation requests, the event splice."""

from __future__ import annotations

import msgspec

from lmgw.pipeline import migration


def chunk(i: int, content: str | None = None, *, role: bool = False, finish: str | None = None):
    delta = {"role": "assistant", "content": ""} if role else {"content": content}
    ev = {"id": f"chatcmpl-{i}", "created": 100 + i, "choices": [{"index": 0, "delta": delta}]}
    if finish:
        ev["choices"][0]["finish_reason"] = finish
    return b"data: " + msgspec.json.encode(ev) + b"\n\n"


def test_progress_counts_what_the_client_saw_and_ignores_a_torn_event() -> None:
    journal = [chunk(1, role=True) + chunk(1, "Hel"), chunk(1, "lo") + b'data: {"id": "chat']
    p = migration.progress_of(journal, "chat")
    assert (p.text, p.tokens, p.id, p.created, p.finished) == ("Hello", 2, "chatcmpl-1", 101, False)


def test_continuation_reduces_budgets_including_min_tokens() -> None:
    obj = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "min_tokens": 35}
    p = migration.Progress(text="abc", tokens=15)
    body, reason = migration.next_leg("chat", obj, p)
    assert reason is None
    out = msgspec.json.decode(body)
    assert out["max_tokens"] == 25 and out["min_tokens"] == 20
    assert out["messages"][-1] == {"role": "assistant", "content": "abc"}
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    spent = migration.Progress(text="x" * 40, tokens=40)
    assert migration.next_leg("chat", obj, spent) == (None, "the token budget was spent")


def test_requests_whose_replay_changes_semantics_are_not_continued() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"n": 2}, {"seed": 3, "temperature": 0.7}, {"use_beam_search": True}):
        body, reason = migration.next_leg("chat", {**base, **extra}, migration.Progress())
        assert body is None and reason
    greedy = {**base, "seed": 3, "temperature": 0}
    body, reason = migration.next_leg("chat", greedy, migration.Progress())
    assert reason is None  # greedy: the seed changes nothing
    tool = migration.Progress(text="", tokens=1, replayable=False)
    assert migration.next_leg("chat", base, tool)[0] is None


def test_splice_keeps_one_stream() -> None:
    p = migration.Progress(text="Hello", tokens=2, id="chatcmpl-1", created=101)
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    tail = (
        b"data: "
        + msgspec.json.encode({"id": "chatcmpl-9", "created": 999, "choices": [], "usage": usage})
        + b"\n\n"
    )
    out = migration.Splice("chat", p)(chunk(9, role=True) + chunk(9, " world") + tail)
    events = [msgspec.json.decode(e[6:]) for e in out.split(b"\n\n") if e]
    assert [e["id"] for e in events] == ["chatcmpl-1", "chatcmpl-1"]  # role event dropped
    assert events[0]["choices"][0]["delta"] == {"content": " world"}
    assert events[1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
