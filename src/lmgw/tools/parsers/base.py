"""What every tool-call parser shares: the stream's delta bookkeeping, marker holdback, the
envelope-driven call life cycle, and the non-streamed answer derived from the stream.

A parser (:class:`ToolParser`) is configuration only and may be shared by every request of a
model; each request gets its own :class:`ToolStream` (:meth:`ToolParser.stream`), so no state
can leak from one request into another (sglang's pooled parsers did exactly that).

Deltas are plain dicts in the shape of an OpenAI ``choices[].delta``:

- ``{"content": "..."}``
- ``{"tool_calls": [{"index": 0, "id": "call_...", "type": "function",
  "function": {"name": "get_weather", "arguments": ""}}]}``: the first delta of a call
- ``{"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\": "}}]}``: after it

Adjacent deltas of the same kind are merged, so one :meth:`ToolStream.feed` returns at most a
few. The non-streamed answer (:meth:`ToolParser.extract`) is the stream fed the whole text, so
the two agree by construction, with one exception vLLM shares: a call that went wrong after its
first delta was sent (truncated, or malformed arguments) cannot be taken back from a stream
(``ToolStream.broken``), while ``extract`` then answers the whole text as content.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .._json import Envelope, JsonError, JsonValue
from ..ids import tool_call_id

__all__ = [
    "MAX_NAME",
    "Delta",
    "ToolCall",
    "ToolParser",
    "ToolStream",
    "assemble",
    "held_prefix",
    "read_until",
    "skip_ws",
    "tools_of",
]

Delta = dict[str, Any]
"""One OpenAI ``delta`` object (``content`` and/or ``tool_calls``)."""
ToolCall = dict[str, Any]
"""One OpenAI ``message.tool_calls[]`` entry: ``{"id", "type": "function", "function":
{"name", "arguments"}}``."""

_WS = re.compile(r"\s*")

MAX_NAME = 256
"""Longest function (or parameter) name a parser waits for before deciding the text is not a
call: what bounds the holdback of formats that name the function before a delimiter."""
HOLD = -1
FAIL = -2


def read_until(buf: str, delim: str, allowed: re.Pattern[str], final: bool) -> int:
    """Where ``delim`` ends a name at the start of ``buf``: its index, :data:`HOLD` (more text
    needed) or :data:`FAIL` (no name of ``allowed`` characters, 1..MAX_NAME long, can end
    there). Decided from the text alone: failing early on a visible bad character or length
    is what the whole text would have decided too."""
    at = buf.find(delim)
    if at >= 0:
        return at if 0 < at <= MAX_NAME and allowed.fullmatch(buf, 0, at) else FAIL
    if final:
        return FAIL
    visible = len(buf) - held_prefix(buf, delim)
    if visible > MAX_NAME or allowed.fullmatch(buf, 0, visible) is None:
        return FAIL
    return HOLD


def held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``: the text
    that must be held back because the next chunk may complete the marker."""
    lead = marker[0]
    j = buf.find(lead, max(0, len(buf) - len(marker) + 1))
    while j >= 0:
        if marker.startswith(buf[j:]):
            return len(buf) - j
        j = buf.find(lead, j + 1)
    return 0


def tools_of(request: Mapping[str, Any] | None) -> list[Any]:
    """The request's ``tools`` list ([] when absent or not a list)."""
    tools = request.get("tools") if request is not None else None
    return tools if isinstance(tools, list) else []


def assemble(deltas: Sequence[Delta]) -> tuple[str | None, list[ToolCall]]:
    """The message a sequence of deltas adds up to: (content, tool_calls).

    Content is None when calls were made and nothing else was said (vLLM's shape); without
    calls it is the text, possibly empty."""
    parts: list[str] = []
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        c = d.get("content")
        if c:
            parts.append(c)
        for tc in d.get("tool_calls") or ():
            fn = tc.get("function") or {}
            cur = calls.get(tc["index"])
            if cur is None:
                cur = calls[tc["index"]] = {
                    "id": tc.get("id"),
                    "type": "function",
                    "function": {"name": fn.get("name") or "", "arguments": ""},
                }
            cur["function"]["arguments"] += fn.get("arguments") or ""
    content = "".join(parts)
    ordered = [calls[k] for k in sorted(calls)]
    return (content or None) if ordered else content, ordered


class ToolStream:
    """One request's streaming state machine: text in (:meth:`feed`), deltas out.

    Subclasses implement :meth:`_run`, which consumes ``self._buf`` as far as the text decides
    and leaves the undecided rest there. In plain-text mode (``self._text``) a chunk without the
    first character of any marker (``self._lead``) goes straight out as content: the hot path.

    Attributes:
        calls: tool calls begun so far (their first delta was sent).
        broken: a call went wrong after its first delta was sent.
    """

    __slots__ = ("_buf", "_env", "_finished", "_lead", "_new_id", "_out", "_raw", "_text",
                 "broken", "calls")  # fmt: skip

    def __init__(self, new_id: Callable[[], str], lead: str | None) -> None:
        self._buf = ""
        self._out: list[Delta] = []
        self._new_id = new_id
        self._lead = lead
        self._text = True
        self._finished = False
        self._env: Envelope | None = None
        self._raw: list[str] | None = None
        self.calls = 0
        self.broken = False

    def feed(self, text: str) -> list[Delta]:
        """The deltas ``text`` (the next piece of the model's output) makes certain."""
        if self._text and not self._buf:
            lead = self._lead
            if lead is None or lead not in text:
                return [{"content": text}] if text else []
        self._buf += text
        self._run(False)
        out = self._out
        self._out = []
        return out

    def finish(self) -> list[Delta]:
        """End of the output: whatever was held back, decided. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        self._run(True)
        out = self._out
        self._out = []
        return out

    @property
    def holding(self) -> int:
        """Characters received but not yet decided (held back)."""
        return len(self._buf)

    def _run(self, final: bool) -> None:
        """Consume ``self._buf`` as far as the text decides (``final``: no more will come)."""
        raise NotImplementedError

    # -- deltas ------------------------------------------------------------------------------

    def _until_marker(self, buf: str, marker: str, final: bool) -> tuple[bool, str]:
        """Plain text up to ``marker`` goes out as content, holding back a tail that may be
        the marker's start (unless ``final``). Returns (found, rest): the text after the
        marker when found, else what is held for the next feed."""
        at = buf.find(marker)
        if at < 0:
            cut = len(buf) - (0 if final else held_prefix(buf, marker))
            self._content(buf[:cut])
            return False, buf[cut:]
        self._content(buf[:at])
        return True, buf[at + len(marker) :]

    def _content(self, text: str) -> None:
        if not text:
            return
        out = self._out
        if out and "content" in out[-1]:
            out[-1]["content"] += text
        else:
            out.append({"content": text})

    def _begin(self, name: str, call_id: str | None = None) -> None:
        index = self.calls
        self.calls += 1
        self._out.append(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call_id or self._new_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )

    def _args(self, fragment: str) -> None:
        if not fragment:
            return
        out = self._out
        index = self.calls - 1
        if out:
            calls = out[-1].get("tool_calls")
            if calls and calls[-1]["index"] == index:
                calls[-1]["function"]["arguments"] += fragment
                return
        out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    # -- the life of a call whose body is a JSON envelope ------------------------------------

    def _start_call(self, raw: str) -> None:
        """A call's text begins (``raw``: what introduced it, released as content if the call
        turns out not to be one)."""
        self._text = False
        if self._raw is None:
            self._raw = [raw]
        else:
            self._raw.append(raw)

    def _record(self, raw: str) -> None:
        if self._raw is not None and raw:
            self._raw.append(raw)

    def _committed(self) -> None:
        """The current call sent its first delta: its text can no longer become content."""
        self._raw = None

    def _uncommitted_failure(self, rest: str) -> str:
        """The text since :meth:`_start_call` was not a call: release it as content and resume
        plain text at ``rest``."""
        raw = self._raw
        self._raw = None
        if raw:
            self._content("".join(raw))
        self._text = True
        return rest

    def _feed_envelope(self, buf: str, final: bool) -> tuple[str, bool]:
        """Drive ``self._env`` over ``buf``: (what is left, whether the envelope is done).

        On failure the stream goes back to plain text (``self._text``) at the offending
        character: before the call committed, its text becomes content; after, the call is
        ``broken``."""
        env = self._env
        assert env is not None
        try:
            i = env.feed(buf, 0, final)
        except JsonError as exc:
            self._pump(env)
            self._env = None
            if self._raw is None:  # it had begun: too late to take back
                self.broken = True
                self._text = True
                return buf[exc.pos :], False
            self._record(buf[: exc.pos])
            return self._uncommitted_failure(buf[exc.pos :]), False
        was_committed = self._raw is None
        self._pump(env)
        if not was_committed and self._raw is not None:
            self._record(buf[:i])
        if env.done:
            self._env = None
            return buf[i:], True
        if final:  # the output ended inside the call
            self._env = None
            if self._raw is None:
                self.broken = True
                self._text = True
                return buf[i:], False
            self._record(buf[:i])
            return self._uncommitted_failure(buf[i:]), False
        return buf[i:], False

    def _feed_value(self, value: JsonValue, buf: str, final: bool) -> tuple[str, bool]:
        """Drive a committed call's arguments ``value`` over ``buf``: (what is left, done). A
        failure breaks the call and resumes plain text at the offending character."""
        try:
            i = value.feed(buf, 0, final)
        except JsonError as exc:
            self._args(value.take())
            self.broken = True
            self._text = True
            return buf[exc.pos :], False
        self._args(value.take())
        if value.done:
            return buf[i:], True
        if final:
            self.broken = True
            self._text = True
        return buf[i:], False

    def _fail(self, buf: str, j: int, *, in_call: bool = False) -> str:
        """``buf[j]`` is not what the format needs next. Before the marker's first call
        committed, everything since the marker is content; inside a call that began, the call is
        broken; between calls, plain text simply resumes. Returns what is left to read."""
        if self._raw is not None:
            self._record(buf[:j])
            return self._uncommitted_failure(buf[j:])
        if in_call:
            self.broken = True
        self._text = True
        return buf[j:]

    def _pump(self, env: Envelope) -> None:
        if self._raw is not None:
            if not env.committed:
                return
            assert env.name is not None
            self._committed()
            self._begin(env.name)
        self._args(env.take_args())


class ToolParser(ABC):
    """A model family's tool-call format. Configuration only: share one per model.

    Args:
        new_id: makes each call's id (default :func:`~lmgw.tools.ids.tool_call_id`); tests pass
            a deterministic one.
    """

    name: ClassVar[str]
    default_new_id: ClassVar[Callable[[], str]] = staticmethod(tool_call_id)
    #: whether an answer with calls finishes with ``"tool_calls"`` (see tools.finish_reason)
    finish_tool_calls: ClassVar[bool] = True

    def __init__(self, *, new_id: Callable[[], str] | None = None) -> None:
        self.new_id: Callable[[], str] = new_id or type(self).default_new_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abstractmethod
    def stream(self, request: Mapping[str, Any] | None = None) -> ToolStream:
        """A fresh streaming state machine for one choice of one request (``request``: the
        decoded chat request; parsers that type arguments read its ``tools``)."""

    def extract(
        self, text: str, request: Mapping[str, Any] | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """The non-streamed answer for a whole output: (content, tool_calls).

        Equal to what the stream's deltas add up to (:func:`assemble`), except when a call went
        wrong after it began: then, as vLLM does, the whole text is content and there are no
        calls."""
        stream = self.stream(request)
        deltas = stream.feed(text)
        deltas += stream.finish()
        if stream.broken:
            return text, []
        return assemble(deltas)

    @staticmethod
    @abstractmethod
    def render(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        """The text a model of this family writes to make ``calls`` ((name, arguments) pairs):
        what the simulator emits and the tests round-trip."""


def skip_ws(buf: str, i: int = 0) -> int:
    """Index of the first non-whitespace character of ``buf`` at or after ``i``."""
    return _WS.match(buf, i).end()  # type: ignore[union-attr]
