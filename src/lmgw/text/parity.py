"""Tokenization parity: does the gateway tokenize a model's prompts exactly as its worker does?

Token-level routing (prefix-cache affinity on token blocks, prompt-length limits, forwarding
token ids) is only right when the gateway's template + tokenizer produce the worker's ids to the
token. Routers that hash raw text while the engine caches templated tokens silently get zero
overlap (ANCHORS.md complaint 6); here the gateway checks instead of assuming. When a worker
registers, the gateway renders and tokenizes each :func:`build_probes` probe itself, asks the
worker's ``/tokenize`` for the same probe (:meth:`Probe.tokenize_body`, vLLM's request shape),
and compares with :func:`compare_tokens`; :func:`summarize` turns the verdicts into one decision.

Everything here is pure (no I/O): the caller does the HTTP call and records the metric.

The probes are built to catch the usual causes of drift: special tokens written by the template
and typed by users, unicode (accents, combining marks, CJK, right-to-left, emoji with skin tones
and zero-width joiners), whitespace (leading/trailing spaces, tabs, blank lines, CRLF), several
turns, and the BOS a plain completion gets from the post-processor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ..errors import DECODE_ERRORS
from .chat_template import ChatTemplate
from .tokenizer import ModelTokenizer

__all__ = [
    "ParityReport",
    "ParityVerdict",
    "Probe",
    "build_probes",
    "compare_tokens",
    "parse_tokenize_response",
    "skipped",
    "summarize",
]

Status = Literal["match", "mismatch", "skipped"]

_SYSTEM = "You are a terse assistant.  Keep\tanswers short.\n"
_UNICODE = (
    "Héllo, wörld! naïve café, crème brûlée; e\u0301 (combining). "
    "日本語のテキスト、中文文本, Привет мир, مرحبا بالعالم, שלום. "
    "Emoji: 😀 👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️."
)
_WHITESPACE = "  leading and trailing spaces  \n\n\ntwo blank lines above\r\nCRLF\tand a tab\n"
_CODE = "Numbers 0 7 42 1234567890 3.14159 -1e-5.\n```python\ndef f(x):\n\treturn x ** 2\n```\n"


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe: a chat (``messages``) or a plain prompt (``prompt``), rendered and tokenized
    the same way on both sides."""

    name: str
    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    def tokenize_body(self, model: str) -> dict[str, Any]:
        """The worker's ``POST /tokenize`` body (vLLM's TokenizeChatRequest or
        TokenizeCompletionRequest)."""
        if self.messages is not None:
            return {
                "model": model,
                "messages": [dict(m) for m in self.messages],
                "add_generation_prompt": self.add_generation_prompt,
                "add_special_tokens": self.add_special_tokens,
            }
        return {
            "model": model,
            "prompt": self.prompt,
            "add_special_tokens": self.add_special_tokens,
        }

    def gateway_tokens(self, tokenizer: ModelTokenizer, template: ChatTemplate | None) -> list[int]:
        """The ids the gateway makes of this probe (inline: probes are a few hundred tokens).

        Raises:
            ChatTemplateError: the template rejects the probe (report it with :func:`skipped`).
            ValueError: a chat probe and no template.
        """
        if self.messages is None:
            return tokenizer.encode(self.prompt or "", add_special_tokens=self.add_special_tokens)
        if template is None:
            raise ValueError(f"probe {self.name!r} needs a chat template")
        text = template.render(
            [dict(m) for m in self.messages], add_generation_prompt=self.add_generation_prompt
        )
        return tokenizer.encode(text, add_special_tokens=self.add_special_tokens)


def build_probes(tokenizer: ModelTokenizer | None = None) -> tuple[Probe, ...]:
    """The probes, in order: a multi-turn chat with a system turn, the same chat without it (for
    templates that refuse system turns), and a plain prompt with the tokenizer's special tokens.

    With a tokenizer, its special tokens (bos, eos, pad...) are typed into the user text, where
    both sides must turn them into the special ids (neither sanitises user text by default).
    """
    specials = " ".join(dict.fromkeys(tokenizer.special_tokens_map.values())) if tokenizer else ""
    typed = f"Special tokens typed as text: {specials} <|im_start|> [INST] </s>."
    turns: tuple[Mapping[str, Any], ...] = (
        {"role": "user", "content": _UNICODE},
        {"role": "assistant", "content": _WHITESPACE},
        {"role": "user", "content": f"{typed}\n{_CODE}"},
    )
    return (
        Probe("chat", messages=({"role": "system", "content": _SYSTEM}, *turns)),
        Probe("chat-no-system", messages=turns),
        Probe(
            "text",
            prompt=f"{_SYSTEM}{_UNICODE}{_WHITESPACE}{typed}{_CODE}",
            add_generation_prompt=False,
            add_special_tokens=True,
        ),
    )


@dataclass(frozen=True, slots=True)
class ParityVerdict:
    """The outcome of one probe, with enough detail to debug a mismatch from a log line."""

    probe: str
    status: Status
    reason: str
    position: int | None = None
    """The first differing token index (for a mismatch)."""
    gateway_window: tuple[int, ...] = ()
    worker_window: tuple[int, ...] = ()
    window_start: int = 0
    gateway_count: int = 0
    worker_count: int = 0

    @property
    def ok(self) -> bool:
        """True unless the probe showed a difference."""
        return self.status != "mismatch"


def skipped(probe: str, reason: str) -> ParityVerdict:
    """A probe the gateway could not render (e.g. the template refuses system turns)."""
    return ParityVerdict(probe, "skipped", f"probe {probe!r} skipped: {reason}")


def _show(ids: Sequence[int], strs: Sequence[str | None] | None) -> str:
    if strs is None:
        return "[" + ", ".join(str(i) for i in ids) + "]"
    shown = (f"{i} {s!r}" if s is not None else f"{i} ?" for i, s in zip(ids, strs, strict=True))
    return "[" + ", ".join(shown) + "]"


def compare_tokens(
    probe: str,
    gateway: Sequence[int],
    worker: Sequence[int],
    *,
    context: int = 4,
    token_strs: Callable[[Sequence[int]], Sequence[str | None]] | None = None,
) -> ParityVerdict:
    """Compare the gateway's and the worker's ids for one probe.

    Args:
        probe: the probe's name.
        gateway: the gateway's ids.
        worker: the worker's ids.
        context: how many tokens to show on each side of the first difference.
        token_strs: ids -> vocabulary strings (``ModelTokenizer.convert_ids_to_tokens``) to make
            the reason readable.

    Returns:
        A match, or a mismatch whose reason names the first differing position, both token
        windows around it, both lengths, and a hint when the pattern is a known one.
    """
    gateway, worker = list(gateway), list(worker)
    n_gw, n_wk = len(gateway), len(worker)
    if gateway == worker:
        reason = f"probe {probe!r}: {n_gw} tokens identical"
        return ParityVerdict(probe, "match", reason, gateway_count=n_gw, worker_count=n_wk)
    pos = next(
        (i for i, (a, b) in enumerate(zip(gateway, worker, strict=False)) if a != b),
        min(n_gw, n_wk),
    )
    start = max(0, pos - context)
    gw_win = tuple(gateway[start : pos + context + 1])
    wk_win = tuple(worker[start : pos + context + 1])
    gw_strs = token_strs(gw_win) if token_strs else None
    wk_strs = token_strs(wk_win) if token_strs else None
    reason = (
        f"probe {probe!r}: first difference at token {pos} (gateway {n_gw} tokens, worker "
        f"{n_wk}); from token {start}: gateway {_show(gw_win, gw_strs)} vs worker "
        f"{_show(wk_win, wk_strs)}"
    )
    hint = _hint(gateway, worker, pos)
    if hint:
        reason += f" ({hint})"
    return ParityVerdict(probe, "mismatch", reason, pos, gw_win, wk_win, start, n_gw, n_wk)


def _hint(gateway: list[int], worker: list[int], pos: int) -> str:
    if pos == 0 and worker[1:] == gateway:
        return "the worker adds a leading token: BOS handling or add_special_tokens differ"
    if pos == 0 and gateway[1:] == worker:
        return "the gateway adds a leading token: BOS handling or add_special_tokens differ"
    if pos == min(len(gateway), len(worker)):
        longer = "worker" if len(worker) > len(gateway) else "gateway"
        return f"the {longer} has extra trailing tokens: generation prompt or EOS differ"
    return ""


@dataclass(frozen=True, slots=True)
class ParityReport:
    """All probes of one worker: ``safe`` decides whether token-level routing may be used."""

    safe: bool
    reason: str
    verdicts: tuple[ParityVerdict, ...] = field(default_factory=tuple)


def summarize(verdicts: Sequence[ParityVerdict]) -> ParityReport:
    """Safe when no probe differs and at least one probe matched (all skipped proves nothing)."""
    mismatches = [v for v in verdicts if v.status == "mismatch"]
    matches = [v for v in verdicts if v.status == "match"]
    if mismatches:
        return ParityReport(False, "; ".join(v.reason for v in mismatches), tuple(verdicts))
    if not matches:
        why = "; ".join(v.reason for v in verdicts) or "no probes ran"
        return ParityReport(False, f"parity unverified: {why}", tuple(verdicts))
    names = ", ".join(v.probe for v in matches)
    return ParityReport(True, f"tokenization matches the worker ({names})", tuple(verdicts))


class _TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int | None = None


_decode_response = msgspec.json.Decoder(_TokenizeResponse).decode
_convert_response = msgspec.convert


def parse_tokenize_response(body: bytes | Mapping[str, Any]) -> list[int]:
    """The ``tokens`` of a vLLM ``/tokenize`` answer (``{"count", "max_model_len", "tokens",
    "token_strs"}``), as raw bytes or an already decoded object.

    Raises:
        ValueError: not that shape, or ``count`` disagrees with the number of tokens.
    """
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            resp = _decode_response(body)
        else:
            resp = _convert_response(body, _TokenizeResponse)
    except DECODE_ERRORS as exc:
        raise ValueError(f"not a /tokenize response: {exc}") from exc
    if resp.count is not None and resp.count != len(resp.tokens):
        raise ValueError(f"/tokenize says count={resp.count} but sent {len(resp.tokens)} tokens")
    return resp.tokens
