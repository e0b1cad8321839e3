"""Per-request bounds on what a JSON body may ask for (``limits.*``): nesting depth, messages,
content parts, ``max_tokens``, ``n``, ``best_of``, choices (prompt batch x ``n``), stop sequences
and ``logit_bias`` entries.

Each check costs next to nothing on ordinary requests: the depth and content-part checks first
count brackets with ``bytes.count`` (C speed, ~0.1 µs per KiB), and only a body with more
brackets than the limit is looked at closely. The numeric fields come from the view struct the
API decodes anyway. Every refusal is a 400 naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import DECODE_ERRORS, GatewayError

#: ``bytes.translate`` tables: delete everything but brackets (and quotes)
_ONLY_BRACKETS = bytes(i for i in range(256) if i not in b"[]{}")
_ONLY_STRUCTURE = bytes(i for i in range(256) if i not in b'"[]{}')


def json_depth(body: bytes, stop_above: int = 1 << 30) -> int:
    """The deepest nesting of arrays and objects in ``body``; brackets inside strings do not
    count. Counting stops a level above ``stop_above``. Undefined but bounded for text that is
    not JSON (the decoder refuses that).

    Linear, and at C speed for ordinary bodies: escapes are dropped (``\\\\``, then ``\\"``, so
    every quote left delimits a string); ``translate`` keeps only quotes and brackets; ``""``
    pairs go (an empty string, or a string's end and the next one's start with no bracket
    between: either way no bracket changes side); what is left between quotes (strings that
    hold brackets, rare) is dropped. On the brackets left, each round replaces the innermost
    ``[]``/``{}`` pairs: the rounds needed are the depth. A huge bracket string (an attack)
    goes to numpy's running sum instead, so the cost stays linear."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = body.translate(None, _ONLY_STRUCTURE).replace(b'""', b"")
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    if len(s) > 65536:
        import numpy as np

        step = np.frombuffer(s, np.uint8)
        step = ((step == 0x5B) | (step == 0x7B)).astype(np.int32) - (
            (step == 0x5D) | (step == 0x7D)
        ).astype(np.int32)
        return int(np.cumsum(step).max())
    depth = 0
    while s and depth <= stop_above:
        leaves = s.replace(b"[]", b"x").replace(b"{}", b"x")
        if len(leaves) == len(s):
            break  # no innermost pair: not balanced JSON
        s = leaves.replace(b"x", b"")
        depth += 1
    return depth


def check_json_depth(body: bytes, limit: int) -> bytes | None:
    """A 400 when ``body`` nests deeper than ``limit`` (limits.max_json_depth; 0: not checked).
    Returns the body's brackets (for the content-part count), or None when not checked."""
    if not limit:
        return None
    brackets = body.translate(None, _ONLY_BRACKETS)
    # cannot nest deeper than it has brackets: the usual case ends here
    if len(brackets) > limit and json_depth(body, limit) > limit:
        raise GatewayError(
            400, f"request body nests JSON deeper than {limit} levels (limits.max_json_depth)"
        )
    return brackets


class _Message(msgspec.Struct):
    content: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class _Messages(msgspec.Struct):
    messages: list[_Message] = []


_decode_messages = msgspec.json.Decoder(_Messages).decode
_decode_parts = msgspec.json.Decoder(list[msgspec.Raw]).decode


def count_content_parts(body: bytes) -> int:
    """Content parts over all chat messages (a string content counts as none)."""
    try:
        messages = _decode_messages(body).messages
    except DECODE_ERRORS:
        return 0  # the view decoder already said what is wrong, or the worker will
    total = 0
    for m in messages:
        raw = m.content
        if memoryview(raw)[:1] == b"[":
            try:
                total += len(_decode_parts(raw))
            except DECODE_ERRORS:
                continue
    return total


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The bounds of ``limits.*`` that apply to a request body (0: no cap where allowed)."""

    max_json_depth: int = 64
    max_messages: int = 4096
    max_content_parts: int = 8192
    max_output_tokens: int = 0
    max_n: int = 128
    max_best_of: int = 20
    max_choices: int = 2048
    max_stop_sequences: int = 16
    max_logit_bias: int = 300

    @classmethod
    def from_config(cls, limits: Any) -> RequestLimits:
        return cls(**{name: getattr(limits, name) for name in cls.__dataclass_fields__})

    def check_body(self, body: bytes) -> bytes | None:
        """The checks on raw bytes: depth (every JSON route). Returns the body's brackets."""
        return check_json_depth(body, self.max_json_depth)

    def check_chat(self, body: bytes, n_messages: int, brackets: bytes | None = None) -> None:
        if n_messages > self.max_messages:
            raise GatewayError(
                400,
                f"{n_messages} messages; at most {self.max_messages} (limits.max_messages)",
                param="messages",
            )
        # each part is an object: a body with fewer '{' than the cap cannot exceed it
        braces = (brackets if brackets is not None else body).count(b"{")
        if braces > self.max_content_parts:
            parts = count_content_parts(body)
            if parts > self.max_content_parts:
                raise GatewayError(
                    400,
                    f"{parts} content parts; at most {self.max_content_parts}"
                    " (limits.max_content_parts)",
                    param="messages",
                )

    def check_choices(self, prompts: int, n: int | None) -> None:
        """``prompts`` (a completions batch's length) times ``n`` choices at most
        ``max_choices``: native workers get one Generate per choice."""
        choices = prompts * (n or 1)
        if choices > self.max_choices:
            raise GatewayError(
                400,
                f"{prompts} prompts x n={n or 1} is {choices} choices; at most"
                f" {self.max_choices} (limits.max_choices)",
                param="prompt" if prompts > 1 else "n",
            )

    def check_sampling(
        self,
        *,
        max_tokens: int | None = None,
        max_tokens_param: str = "max_tokens",
        n: int | None = None,
        best_of: int | None = None,
        stop: str | list | None = None,
        logit_bias: dict | None = None,
    ) -> None:
        cap = self.max_output_tokens
        if cap and max_tokens is not None and max_tokens > cap:
            raise GatewayError(
                400,
                f"{max_tokens_param} is {max_tokens}; at most {cap} (limits.max_output_tokens)",
                param=max_tokens_param,
            )
        if n is not None and n > self.max_n:
            raise GatewayError(400, f"n is {n}; at most {self.max_n} (limits.max_n)", param="n")
        if best_of is not None and best_of > self.max_best_of:
            raise GatewayError(
                400,
                f"best_of is {best_of}; at most {self.max_best_of} (limits.max_best_of)",
                param="best_of",
            )
        stops = 0 if stop is None else 1 if isinstance(stop, str) else len(stop)
        if stops > self.max_stop_sequences:
            raise GatewayError(
                400,
                f"{stops} stop sequences; at most {self.max_stop_sequences}"
                " (limits.max_stop_sequences)",
                param="stop",
            )
        if logit_bias is not None and len(logit_bias) > self.max_logit_bias:
            raise GatewayError(
                400,
                f"{len(logit_bias)} logit_bias entries; at most {self.max_logit_bias}"
                " (limits.max_logit_bias)",
                param="logit_bias",
            )
