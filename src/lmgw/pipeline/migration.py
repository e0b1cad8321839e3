"""Mid-stream migration: continue a client's stream on another worker when its worker dies
after tokens were already streamed (sans-IO: journal in, continuation request and event
rewrite out).

The relay keeps the raw bytes it forwarded (a list append per chunk: nothing is parsed on the
hot path). Only when a stream breaks are they parsed, to rebuild what the client has seen: the
text so far and how many token events carried it. The continuation asks another worker for
the rest of the *same* answer:

* chat: the messages plus an assistant message holding the partial text, with
  ``continue_final_message=true`` and ``add_generation_prompt=false`` (vLLM's chat-template
  flags), so the engine continues that message instead of starting a new one;
* completions: the prompt with the partial text appended (string prompts only);
* ``max_tokens``/``max_completion_tokens`` and ``min_tokens`` reduced by the tokens already
  streamed.

The new worker's events are rewritten so that the client sees one stream: the opening
role-only event is dropped, every event keeps the original ``id`` and ``created``, and the usage
of the final event counts the whole answer. Requests whose replay would change what the client
asked for are not migrated (they get an SSE error event and ``[DONE]``): ``n > 1`` or ``best_of``
(several sequences), a ``seed`` with sampling (the same seed on a new prompt draws other
tokens), beam search, ``echo``, token-list prompts, and streams that already carried tool-call
or logprob deltas (which cannot be continued as text).

A constrained answer (``response_format``, ``structured_outputs``, ``guided_*``) continues under
the constraint *of its rest*: the partial text replayed through the constraint's grammar
(:mod:`lmgw.grammar.resume`), sent as a GBNF grammar in place of the original constraint, so
the new worker cannot start a second JSON document after half of the first. A constraint the
gateway cannot replay ends the stream with an error event instead.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import DECODE_ERRORS
from ..structured import FIELDS as CONSTRAINT_FIELDS
from ..structured import StructuredOutputError, forced_tool, structured_output
from ..transport.sse import split_complete

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class Progress(msgspec.Struct):
    """What the client has received of a broken stream."""

    text: str = ""
    tokens: int = 0  #: content events (one token per event, as vLLM and SGLang stream)
    id: str | None = None
    created: int | None = None
    finished: bool = False  #: a finish_reason was already sent: nothing to continue
    replayable: bool = True  #: no tool-call / logprob deltas seen


#: a journal holding this many bytes of events is folded into its progress (``Journal.fold``)
FOLD_BYTES = 1 << 20


class Journal(list):
    """The chunks relayed so far of a stream that may be continued on another worker.

    The relay appends each chunk as it comes (a list append: nothing is parsed on the hot
    path). A long stream's events would then stay in memory whole, ~200 bytes of JSON per
    token: 1.6 MB for an 8k-token answer, gigabytes over a thousand long streams. So past
    :data:`FOLD_BYTES` the relay folds them into the :class:`Progress` they add up to (the
    text and counts a continuation needs) and keeps only a torn last event."""

    __slots__ = ("endpoint", "folded")
    #: the relay folds the journal each time this many more bytes were kept
    fold_bytes = FOLD_BYTES

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        #: the progress of the chunks already folded (None: nothing folded yet)
        self.folded: Progress | None = None

    def __bool__(self) -> bool:  # whether anything was relayed, folded or not
        return len(self) > 0 or self.folded is not None

    def fold(self) -> None:
        """Parse the complete events held into :attr:`folded`; keep the torn rest."""
        data = b"".join(self)
        cut = split_complete(data)
        if not cut:
            return
        self[:] = [data[cut:]] if cut < len(data) else []
        done = _parse(data[:cut], self.endpoint)
        self.folded = done if self.folded is None else _join(self.folded, done)


def _join(before: Progress, after: Progress) -> Progress:
    """Two parts of one leg's stream as one."""
    return Progress(
        before.text + after.text,
        before.tokens + after.tokens,
        before.id or after.id,
        before.created or after.created,
        before.finished or after.finished,
        before.replayable and after.replayable,
    )


def progress_of(journal: list[bytes], endpoint: str) -> Progress:
    """Parse the bytes relayed so far (complete events only; a torn last event is ignored)."""
    data = b"".join(journal)
    p = _parse(data[: split_complete(data)], endpoint)
    folded = getattr(journal, "folded", None)
    return p if folded is None else _join(folded, p)


class _Delta(msgspec.Struct):
    content: Any = None
    tool_calls: Any = None
    function_call: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: Any = None
    finish_reason: Any = None
    logprobs: Any = None


class _Event(msgspec.Struct):
    id: Any = None
    created: Any = None
    choices: list[_Choice] | None = None


#: the fields of a batch of events that a continuation needs, in one decode (2x the generic
#: parse: a long stream's journal is folded while it streams)
_decode_events = msgspec.json.Decoder(list[_Event]).decode
_decode_event = msgspec.json.Decoder(_Event).decode


def _parse(data: bytes, endpoint: str) -> Progress:
    """The progress that the complete events in ``data`` add up to."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    payloads = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: {") and b"\n" not in block:  # nearly every event
            payloads.append(block[6:])
            continue
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    payloads.append(payload)
    try:
        events = _decode_events(b"[" + b",".join(payloads) + b"]")
    except DECODE_ERRORS:  # an odd event among them: each on its own, the odd ones skipped
        events = []
        for payload in payloads:
            try:
                events.append(_decode_event(payload))
            except DECODE_ERRORS:
                pass
    p = Progress()
    parts: list[str] = []
    chat = endpoint == "chat"
    for ev in events:
        p.id = p.id or ev.id
        p.created = p.created or ev.created
        for choice in ev.choices or ():
            if choice.finish_reason:
                p.finished = True
            if choice.logprobs:
                p.replayable = False
            if chat:
                delta = choice.delta
                if delta is None:
                    continue
                if delta.tool_calls or delta.function_call:
                    p.replayable = False
                text = delta.content
            else:
                text = choice.text
            if isinstance(text, str) and text:
                parts.append(text)
                p.tokens += 1
    p.text = "".join(parts)
    return p


def extend(before: Progress, after: Progress) -> Progress:
    """Progress over two legs: what the client saw of the first, then of the continuation."""
    return Progress(
        before.text + after.text,
        before.tokens + after.tokens,
        before.id,
        before.created,
        after.finished,
        before.replayable and after.replayable,
    )


def eligible(endpoint: str, obj: Any) -> str | None:
    """Why the request cannot be continued elsewhere (None: it can)."""
    if endpoint not in ("chat", "completions") or not isinstance(obj, dict):
        return "only chat and completions streams can be continued"
    n = obj.get("n")
    if (isinstance(n, int) and n > 1) or obj.get("best_of") not in (None, 1):
        return "several sequences (n > 1) cannot be continued"
    temperature = obj.get("temperature")
    if obj.get("seed") is not None and temperature != 0:
        return "a seeded sampled answer would change on another worker"
    if obj.get("use_beam_search"):
        return "beam search cannot be continued"
    if endpoint == "completions":
        if obj.get("echo"):
            return "echo cannot be continued"
        if not isinstance(obj.get("prompt"), str):
            return "only a single string prompt can be continued"
    elif not isinstance(obj.get("messages"), list):
        return "no messages"
    return None


def continuation_body(
    endpoint: str,
    obj: dict[str, Any],
    progress: Progress,
    grammar: str | None = None,
    *,
    aliases: bool = True,
) -> bytes | None:
    """The request that asks another worker for the rest of the answer; None when there is
    nothing left to generate (the token budget was spent). ``grammar``: the rest's constraint
    (GBNF), which replaces the request's own: under vLLM's ``guided_grammar`` when the client
    used the ``guided_*`` fields, else ``structured_outputs.grammar``, and (``aliases``, for
    HTTP workers) SGLang's ``ebnf`` too; each engine ignores the other's field."""
    out = dict(obj)
    if grammar is not None:
        legacy = any(k.startswith("guided_") and out.get(k) is not None for k in out)
        for key in CONSTRAINT_FIELDS:
            out.pop(key, None)
        if legacy:
            out["guided_grammar"] = grammar
        else:
            out["structured_outputs"] = {"grammar": grammar}
        if aliases:
            out["ebnf"] = grammar
    for key in ("max_tokens", "max_completion_tokens"):
        budget = out.get(key)
        if isinstance(budget, int):
            if budget - progress.tokens <= 0:
                return None
            out[key] = budget - progress.tokens
    floor = out.get("min_tokens")
    if isinstance(floor, int):  # the tokens already streamed count toward it
        out["min_tokens"] = max(0, floor - progress.tokens)
    if endpoint == "chat":
        out["messages"] = [*obj["messages"], {"role": "assistant", "content": progress.text}]
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    else:
        out["prompt"] = obj["prompt"] + progress.text
    return _encode(out)


#: partial answers of constrained streams longer than this are replayed off the event loop
#: (``Pipeline.next_leg``): ~0.2 ms per KiB of JSON, so up to ~1 ms inline
INLINE_REPLAY_CHARS = 4096


def next_leg(
    endpoint: str,
    obj: Any,
    progress: Progress,
    *,
    aliases: bool = True,
    rest: tuple[str | None, str | None] | None = None,
) -> tuple[bytes | None, str | None]:
    """The continuation request for a broken stream, or why there is none: (body, None) or
    (None, reason). ``aliases``: see :func:`continuation_body`; ``rest``: what
    :func:`rest_constraint` gave, when the caller ran it already (off the event loop)."""
    reason = eligible(endpoint, obj)
    if reason is None and not progress.replayable:
        reason = "the stream carried tool-call or logprob deltas"
    if reason is None and progress.finished:
        reason = "the answer was complete"
    if reason is not None:
        return None, reason
    grammar, reason = rest if rest is not None else rest_constraint(endpoint, obj, progress.text)
    if reason is not None:
        return None, reason
    body = continuation_body(endpoint, obj, progress, grammar, aliases=aliases)
    return (body, None) if body is not None else (None, "the token budget was spent")


def replays(obj: Any, text: str) -> bool:
    """Whether :func:`rest_constraint` has a partial answer to replay (a constrained request
    that streamed text), and so may take time."""
    return (
        bool(text)
        and isinstance(obj, dict)
        and any(obj.get(k) is not None for k in CONSTRAINT_FIELDS)
    )


def rest_constraint(endpoint: str, obj: Any, text: str) -> tuple[str | None, str | None]:
    """The GBNF constraint of what may follow ``text`` when the request is constrained: (grammar
    or None when unconstrained or nothing was streamed yet, None) or (None, why it cannot be
    continued). Costs one dictionary look-up per constraint field for a free-text request."""
    if not text:
        return None, None
    try:
        if endpoint == "chat" and obj.get("tool_choice") is not None and forced_tool(obj):
            return None, "a forced tool call cannot be continued as text"
        if not any(obj.get(k) is not None for k in CONSTRAINT_FIELDS):
            return None, None
        c = structured_output(endpoint, obj, tools=False)
    except StructuredOutputError as exc:
        return None, f"the structured output cannot be continued ({exc})"
    if c is None:  # response_format {"type": "text"}
        return None, None
    from ..grammar.resume import Unsupported, resume_grammar  # cold path: loaded on a break

    try:
        return resume_grammar(c, text), None
    except Unsupported as exc:
        return None, f"the structured output cannot be continued ({exc})"
    except (RecursionError, MemoryError, ValueError) as exc:  # a pathological constraint
        return None, f"the structured output cannot be continued ({type(exc).__name__})"


class Splice:
    """Rewrites the continuation's events so the client sees one stream (see module doc)."""

    def __init__(self, endpoint: str, progress: Progress) -> None:
        self.endpoint = endpoint
        self.progress = progress
        self._opened = False

    def __call__(self, events: bytes) -> bytes:
        out = []
        for block in events.split(b"\n\n"):
            if not block.strip():
                continue
            fixed = self._event(block)
            if fixed is not None:
                out.append(fixed)
        return b"".join(x + b"\n\n" for x in out)

    def _event(self, block: bytes) -> bytes | None:
        if not block.startswith(b"data:"):
            return block
        payload = block[5:].strip()
        if payload == b"[DONE]":
            return block
        try:
            ev = _decode(payload)
        except DECODE_ERRORS:
            return block
        if not isinstance(ev, dict):
            return block
        p = self.progress
        if p.id is not None and "id" in ev:
            ev["id"] = p.id
        if p.created is not None and "created" in ev:
            ev["created"] = p.created
        choices = ev.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if not self._opened and self.endpoint == "chat" and isinstance(first, dict):
            delta = first.get("delta")
            if (
                isinstance(delta, dict)
                and delta.get("role")
                and not delta.get("content")
                and not first.get("finish_reason")
            ):
                self._opened = True
                return None  # the client had its opening role event already
        self._opened = True
        usage = ev.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage["completion_tokens"] += p.tokens
            if isinstance(usage.get("prompt_tokens"), int):
                usage["prompt_tokens"] = max(0, usage["prompt_tokens"] - p.tokens)
            if isinstance(usage.get("total_tokens"), int) and isinstance(
                usage.get("prompt_tokens"), int
            ):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return b"data: " + _encode(ev)
