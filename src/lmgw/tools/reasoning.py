"""``<think>...</think>`` reasoning split from the answer: ``reasoning_content`` and ``content``.

Two variants, as vLLM's reasoning parsers have them:

- ``opened=False`` (Qwen3 with thinking optional): reasoning only when the output starts (leading
  whitespace aside) with ``<think>``; otherwise everything is content. The text is held back only
  while it may still be the start of ``<think>``.
- ``opened=True`` (DeepSeek-R1's newer template, Qwen3 thinking templates, QwQ): the chat template
  already wrote ``<think>`` into the prompt, so the output *is* reasoning up to ``</think>``; a
  ``<think>`` the model writes anyway at the very start is dropped.

After ``</think>`` everything is content, as written (vLLM keeps the newlines that follow). An
output that ends inside the reasoning is all reasoning, streamed or not. The deltas use the key
``reasoning_content`` by default (vLLM's name until 0.10; newer vLLM says ``reasoning``).
Tool calls are parsed from the content only: feed the ``content`` deltas to a tool stream
(:class:`~lmgw.tools.OutputStream` does).
"""

from __future__ import annotations

from .parsers.base import Delta, held_prefix, skip_ws

__all__ = ["ReasoningParser", "ReasoningStream"]

_START, _REASONING, _CONTENT = range(3)


class ReasoningStream:
    """One choice's streaming split: :meth:`feed` text, get ``reasoning_content`` / ``content``
    deltas; :meth:`finish` at the end."""

    __slots__ = ("_buf", "_end", "_field", "_finished", "_mode", "_opened", "_start")

    def __init__(self, start: str, end: str, opened: bool, field: str) -> None:
        self._start = start
        self._end = end
        self._opened = opened
        self._field = field
        self._mode = _START
        self._buf = ""
        self._finished = False

    def feed(self, text: str) -> list[Delta]:
        """The deltas ``text`` makes certain."""
        if self._mode == _CONTENT:
            return [{"content": text}] if text else []
        self._buf += text
        return self._run(False)

    def finish(self) -> list[Delta]:
        """End of the output: held text goes where it was. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        return self._run(True)

    @property
    def in_reasoning(self) -> bool:
        return self._mode == _REASONING or (self._mode == _START and self._opened)

    def _run(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        buf = self._buf
        if self._mode == _START:
            j = skip_ws(buf)
            start = self._start
            if buf.startswith(start, j):
                buf = buf[j + len(start) :]
                self._mode = _REASONING
            elif not final and start.startswith(buf[j:]):
                return out  # still maybe "<think>"
            elif self._opened:
                self._mode = _REASONING
            else:
                self._mode = _CONTENT
        if self._mode == _REASONING:
            end = self._end
            at = buf.find(end)
            if at < 0:
                cut = len(buf) - (0 if final else held_prefix(buf, end))
                if cut:
                    out.append({self._field: buf[:cut]})
                self._buf = buf[cut:]
                return out
            if at:
                out.append({self._field: buf[:at]})
            buf = buf[at + len(end) :]
            self._mode = _CONTENT
        if buf:
            out.append({"content": buf})
        self._buf = ""
        return out


class ReasoningParser:
    """A model's reasoning markers. Configuration only: share one per model.

    Args:
        start, end: the markers (``<think>``, ``</think>``).
        opened: the chat template opens the reasoning itself (see the module docstring).
        field: the delta / message key for reasoning text.
    """

    def __init__(
        self,
        start: str = "<think>",
        end: str = "</think>",
        *,
        opened: bool = False,
        field: str = "reasoning_content",
    ) -> None:
        if not start or not end:
            raise ValueError("reasoning markers must be non-empty")
        self.start = start
        self.end = end
        self.opened = opened
        self.field = field

    def __repr__(self) -> str:
        return f"ReasoningParser({self.start!r}, {self.end!r}, opened={self.opened})"

    def stream(self) -> ReasoningStream:
        """A fresh streaming split for one choice of one request."""
        return ReasoningStream(self.start, self.end, self.opened, self.field)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part. Equal to what the
        stream's deltas add up to."""
        stream = self.stream()
        parts = {self.field: "", "content": ""}
        for d in stream.feed(text) + stream.finish():
            for k, v in d.items():
                parts[k] += v
        return parts[self.field] or None, parts["content"] or None
