"""Mid-stream migration, sans-IO: journal parsing, continuation requests, the event splice."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from lmgw.grammar import gbnf
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


# -- constrained answers continue under the constraint of their rest --------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
CHAT_MSGS = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


def _rest(obj: dict, text: str, **kw) -> tuple[dict, str]:
    body, reason = migration.next_leg("chat", obj, migration.Progress(text=text, tokens=3), **kw)
    assert reason is None, reason
    out = msgspec.json.decode(body)
    return out, (out.get("structured_outputs") or {}).get("grammar") or out.get("guided_grammar")


def test_a_json_schema_answer_continues_under_the_grammar_of_its_rest() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    obj = {**CHAT_MSGS, "response_format": rf}
    out, grammar = _rest(obj, '{"name": "Al')
    assert "response_format" not in out and out["ebnf"] == grammar
    rest = gbnf.parse(grammar)
    assert rest.accepts('ice", "count": 3}')
    assert not rest.accepts('{"name": "x", "count": 1}')  # a second document: what a resent
    assert not rest.accepts('ice"}')  # schema would give; and the required key is enforced


def test_the_grammar_goes_under_the_field_family_the_client_used() -> None:
    out, grammar = _rest({**CHAT_MSGS, "guided_regex": r"\d{3}-\d{2}"}, "12")
    assert "guided_regex" not in out and out["guided_grammar"] == grammar
    assert gbnf.parse(grammar).accepts("3-45") and not gbnf.parse(grammar).accepts("3-4")
    out, grammar = _rest({**CHAT_MSGS, "structured_outputs": {"choice": ["yes", "yellow", "no"]}},
                         "ye", aliases=False)  # fmt: skip
    assert "ebnf" not in out and list(out["structured_outputs"]) == ["grammar"]
    assert {s for s in ("s", "llow", "no", "") if gbnf.parse(grammar).accepts(s)} == {"s", "llow"}


def test_constraints_that_cannot_be_replayed_end_the_stream_with_the_reason() -> None:
    cases = [
        ({"structured_outputs": {"regex": r"(a)\1"}}, "a", "cannot be continued"),
        ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " *"}}, "{", "whitespace"),
        ({"guided_regex": r"\d+"}, "ab", "does not match"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
          "tool_choice": "required"}, "{", "forced tool"),
    ]  # fmt: skip
    for extra, text, why in cases:
        body, reason = migration.next_leg(
            "chat", {**CHAT_MSGS, **extra}, migration.Progress(text=text, tokens=1)
        )
        assert body is None and reason is not None and why in reason, (extra, reason)


def test_a_constrained_stream_that_sent_no_text_is_resent_as_asked() -> None:
    obj = {**CHAT_MSGS, "guided_regex": r"\d+"}
    out, grammar = _rest(obj, "")
    assert grammar is None and out["guided_regex"] == r"\d+"
    plain, _ = _rest({**CHAT_MSGS, "response_format": {"type": "text"}}, "Hi")
    assert plain["response_format"] == {"type": "text"} and "ebnf" not in plain


@given(
    events=st.lists(
        st.tuples(st.text(max_size=6), st.booleans(), st.booleans()), min_size=1, max_size=40
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    folds=st.sets(st.integers(0, 20), max_size=8),
    crlf=st.booleans(),
)
def test_a_folded_journal_gives_the_progress_of_the_whole(
    events: list[tuple[str, bool, bool]], cuts: list[int], folds: set[int], crlf: bool
) -> None:
    """However the stream was cut into chunks and wherever the journal was folded, the
    progress is what the unfolded chunks give."""

    def event(text: str, finish: bool, logprobs: bool) -> bytes:
        choice = {
            "index": 0,
            "delta": {"content": text},
            "finish_reason": "stop" if finish else None,
            "logprobs": {"content": []} if logprobs else None,
        }
        ev = {"id": "chatcmpl-7", "created": 107, "choices": [choice]}
        return b"data: " + msgspec.json.encode(ev) + b"\n\n"

    stream = b"".join(event(*e) for e in events) + b'data: {"id": "torn'
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    points = sorted({c % len(stream) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    chunks = [c for c in chunks if c]
    journal = migration.Journal("chat")
    for i, c in enumerate(chunks):
        journal.append(c)
        if i in folds:
            journal.fold()
    assert migration.progress_of(journal, "chat") == migration.progress_of(chunks, "chat")
    assert bool(journal)


def test_the_relay_keeps_a_long_stream_folded(monkeypatch) -> None:
    """Past fold_bytes the relay folds: what the journal holds stays small."""
    import trio

    from lmgw.transport.openai_http import relay_sse

    monkeypatch.setattr(migration.Journal, "fold_bytes", 1000)
    chunks = [chunk(1, role=True)] + [chunk(1, f"w{i} ") for i in range(500)]

    class Resp:
        complete = False

        def __init__(self) -> None:
            self.left = list(chunks)

        async def read_chunk(self) -> bytes:
            return self.left.pop(0) if self.left else b""

        def release(self) -> None:
            pass

    class Client:
        started = False

        def __init__(self) -> None:
            self.out: list[bytes] = []

        async def start(self, status, headers) -> None:
            self.started = True

        async def send(self, data: bytes) -> None:
            self.out.append(data)

        async def end(self, data: bytes = b"") -> None:
            self.out.append(data)

    held: list[int] = []

    class Watched(migration.Journal):
        def append(self, c: bytes) -> None:
            super().append(c)
            held.append(sum(map(len, self)))

    journal = Watched("chat")
    client = Client()
    trio.run(relay_sse, Resp(), client, [], lambda: None, None, journal)
    assert b"".join(client.out) == b"".join(chunks)  # relayed untouched
    assert max(held) < 1000 + 200
    p = migration.progress_of(journal, "chat")
    assert p.text == "".join(f"w{i} " for i in range(500)) and p.tokens == 500


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
_choice = st.fixed_dictionaries(
    {},
    optional={
        "delta": st.fixed_dictionaries(
            {}, optional={"content": _json, "tool_calls": _json, "function_call": _json}
        )
        | _json,
        "text": _json,
        "finish_reason": _json,
        "logprobs": _json,
    },
)
_event = (
    st.fixed_dictionaries(
        {},
        optional={"id": _json, "created": _json, "choices": st.lists(_choice, max_size=2) | _json},
    )
    | _json
)


def _expected(events: list[dict], endpoint: str) -> migration.Progress:
    """What a journal of these (well-typed) events means, read straight from the dicts."""
    p = migration.Progress()
    parts = []
    for ev in events:
        p.id = p.id or ev.get("id")
        p.created = p.created or ev.get("created")
        for choice in ev.get("choices") or ():
            p.finished = p.finished or bool(choice.get("finish_reason"))
            p.replayable = p.replayable and not choice.get("logprobs")
            if endpoint == "chat":
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    p.replayable = False
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                parts.append(text)
                p.tokens += 1
    p.text = "".join(parts)
    return p


def _well_typed(event: object) -> bool:
    try:
        msgspec.convert(event, migration._Event)
    except msgspec.ValidationError:
        return False
    return True


@given(st.lists(_event, max_size=8), st.sampled_from(["chat", "completions"]))
def test_the_journal_reads_its_events_and_skips_odd_ones(events: list, endpoint: str) -> None:
    """One decode reads every event; a worker's odd event (a field of the wrong type) makes it
    read them one by one, and that event alone counts for nothing."""
    data = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events)
    valid = [e for e in events if _well_typed(e)]
    assert migration._parse(data, endpoint) == _expected(valid, endpoint)


@given(st.lists(_event, max_size=6), st.sampled_from(["chat", "completions"]))
def test_the_splice_takes_any_worker_event(events: list, endpoint: str) -> None:
    """A continuation's worker may send anything: the splice passes it on or rewrites it, and
    never raises (a raise would cut the client's stream)."""
    data = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events)
    p = migration.Progress(text="ab", tokens=2, id="chatcmpl-1", created=101)
    out = migration.Splice(endpoint, p)(data)
    assert out.count(b"\n\n") <= len(events)
