"""OpenAI answers synthesized from a native worker's deltas, in vLLM's exact shapes (sans-IO).

Native workers stream ``Delta`` (new text and token ids) then ``Finish`` (reasons, usage); an
HTTP client expects what vLLM's OpenAI server writes. :class:`OpenAISynth` turns one into the
other with no I/O, so the shapes are unit-tested byte for byte and the pipeline only moves bytes:

* streams: ``chat.completion.chunk`` / ``text_completion`` events, the chat role event first,
  one event per delta, a final event with ``finish_reason`` and ``stop_reason``, the usage event
  (``choices: []``) when ``stream_options.include_usage``, then ``data: [DONE]``;
* whole answers: ``chat.completion`` / ``text_completion`` bodies as vLLM (and the simulator)
  write them, usage with ``prompt_tokens_details.cached_tokens``.

Ids are ``chatcmpl-<request id>`` and ``cmpl-<request id>`` (vLLM names answers after the
``X-Request-Id`` it was given). Constant parts of every event are encoded once per request; a
plain content event (no logprobs, no continuous usage) is the request's prefix, the delta's
JSON-encoded text and the request's suffix; a burst of them (:meth:`OpenAISynth.deltas`) is one
``join``; a plain whole answer is a byte template with the text, reasons and usage spliced in.
The general builders stay for logprobs and usage on every event, and give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

__all__ = [
    "DONE",
    "OpenAISynth",
    "chat_logprobs",
    "completion_logprobs",
    "prompt_logprobs",
    "usage_bytes",
    "usage_dict",
]

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode
#: a plain chat answer's message after its content (the keys vLLM writes, all empty)
_CHAT_MESSAGE_END = (
    b',"refusal":null,"annotations":null,"audio":null,"function_call":null,"tool_calls":[],'
    b'"reasoning_content":null}'
)


def usage_bytes(prompt: int, completion: int, cached: int | None = None) -> bytes:
    """:func:`usage_dict` encoded (the same bytes, without building the dict)."""
    head = b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d' % (
        prompt, prompt + completion, completion)  # fmt: skip
    if cached is None:
        return head + b"}"
    return head + b',"prompt_tokens_details":{"cached_tokens":%d}}' % cached


def usage_dict(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """vLLM's usage object (key order as vLLM writes it)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


class OpenAISynth:
    """One request's OpenAI answer built from deltas.

    Args:
        kind: ``"chat"`` or ``"completion"``.
        request_id: the gateway's request id (the answer's id is derived from it).
        model: the model name the client asked for.
        created: the answer's ``created`` (seconds since the epoch), fixed per request.
        include_usage: ``stream_options.include_usage``: a usage event before ``[DONE]``.
        continuous_usage: ``stream_options.continuous_usage_stats``: usage on every event.
        prompt_tokens: the prompt's length, for continuous usage (final usage comes from the
            worker).
        echo: completions with ``echo``: the prompt text, sent before the completion.
        logprobs: render the deltas' logprobs (the client asked for them).
        token_text: a token id's text, for logprobs entries.
        index: the choice's ``index`` in every event and body (a request fanned out to one
            Generate per choice: ``prompt_index * n + sample_index``, as vLLM numbers them).
        last: end the stream with ``[DONE]`` (and the usage event) after the final event; a
            fanned-out choice leaves both to :meth:`tail`, written once all choices ended.
    """

    __slots__ = (
        "_end",
        "_fast",
        "_head",
        "_index",
        "_logprobs",
        "_mid",
        "_offset",
        "_parts",
        "_post",
        "_pre",
        "chat",
        "continuous_usage",
        "created",
        "echo",
        "final_usage",
        "id",
        "include_usage",
        "last",
        "model",
        "opened",
        "prompt_token_text",
        "prompt_tokens",
        "token_text",
        "tokens",
    )

    def __init__(
        self,
        kind: str,
        request_id: str,
        model: str,
        created: int,
        *,
        include_usage: bool = False,
        continuous_usage: bool = False,
        prompt_tokens: int = 0,
        echo: str | None = None,
        logprobs: bool = False,
        token_text: Callable[[int], str] | None = None,
        prompt_token_text: Callable[[int], str] | None = None,
        index: int = 0,
        last: bool = True,
    ) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', not {kind!r}")
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.prompt_tokens = prompt_tokens
        self.echo = echo
        self.token_text = token_text or str
        #: prompt logprobs' ``decoded_token`` (vLLM names them by text whatever
        #: ``return_tokens_as_token_ids`` says)
        self.prompt_token_text = prompt_token_text or self.token_text
        self._logprobs = logprobs
        self.last = last
        #: (prompt, completion, cached) tokens of the answer, once it finished
        self.final_usage: tuple[int, int, int] | None = None
        self._index = index
        #: the stream events' fixed parts (:meth:`_templates`, once a stream opens)
        self._head = self._pre = self._mid = self._post = self._end = b""
        #: plain events take the template path (set once the stream is open)
        self._fast = False
        self._parts: list[str] = []
        self._offset = len(echo) if echo else 0  # completions logprobs' text_offset
        self.tokens = 0
        self.opened = False

    # -- streams ------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The completion text streamed so far (without an echoed prompt)."""
        return "".join(self._parts)

    def open(self) -> bytes:
        """The events that open a stream (chat: the role event; completions: the echoed prompt,
        if any). Empty after the first call, so a continued stream never repeats them."""
        if self.opened:
            return b""
        self.opened = True
        self._templates()
        self._fast = not self._logprobs and not self.continuous_usage
        if self.chat:
            return (
                self._head + b'{"index":%d,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}' % self._index + self._tail(0)
            )
        if self.echo:
            return self._pre + _encode(self.echo) + b',"logprobs":null' + self._post + self._tail(0)
        return b""

    def _templates(self) -> None:
        """Build the stream events' fixed parts: only a stream needs them, so a whole answer
        does not pay for them."""
        idx = b'{"index":%d,' % self._index
        obj = b"chat.completion.chunk" if self.chat else b"text_completion"
        self._head = (
            b'data: {"id":' + _encode(self.id) + b',"object":"' + obj + b'","created":'
            + str(self.created).encode() + b',"model":' + _encode(self.model) + b',"choices":['
        )  # fmt: skip
        self._pre = self._head + idx + (b'"delta":{"content":' if self.chat else b'"text":')
        self._mid = b"}" if self.chat else b""  # closes the chat delta object
        self._post = b',"finish_reason":null' + (b"}" if self.chat else b',"stop_reason":null}')
        #: what follows a plain event's text (no logprobs, no continuous usage)
        self._end = self._mid + b',"logprobs":null' + self._post + b"]}\n\n"

    def delta(
        self, text: str, token_ids: Sequence[int] = (), logprobs: Sequence[Any] | None = None
    ) -> bytes:
        """One content event (the stream's opening events first, when not sent yet)."""
        if self._fast:  # plain: the template (as the general builder's bytes below)
            self._parts.append(text)
            self.tokens += len(token_ids)
            return self._pre + _encode(text) + self._end
        head = b"" if self.opened else self.open()
        self._parts.append(text)
        self.tokens += len(token_ids)
        lp = self._render_logprobs(text, token_ids, logprobs)
        return (
            head + self._pre + _encode(text) + self._mid + b',"logprobs":' + lp
            + self._post + self._tail(self.tokens)
        )  # fmt: skip

    def deltas(self, events: Iterable[Any]) -> bytes:
        """Several content events at once (``Delta``-likes: ``text``, ``token_ids``,
        ``logprobs``): the bytes of :meth:`delta` for each, joined. Plain events are one join of
        their encoded texts (a burst costs about one string encode per event)."""
        head = b"" if self.opened else self.open()
        if not self._fast:
            return head + b"".join([self.delta(e.text, e.token_ids, e.logprobs) for e in events])
        texts = []
        tokens = 0
        for e in events:
            texts.append(e.text)
            tokens += len(e.token_ids)
        self._parts += texts
        self.tokens += tokens
        pre, end = self._pre, self._end
        return head + pre + (end + pre).join(map(_encode, texts)) + end

    def finish(
        self,
        finish_reason: str,
        stop_reason: str | int | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> bytes:
        """The final event, the usage event when asked for, and ``[DONE]`` (only the final
        event when not ``last``)."""
        self.final_usage = (prompt_tokens, completion_tokens, cached_tokens)
        head = b"" if self.opened else self.open()
        choice = b'{"index":%d,' % self._index
        choice += b'"delta":{"content":""}' if self.chat else b'"text":""'
        choice += b',"logprobs":null,"finish_reason":' + _encode(finish_reason)
        choice += b',"stop_reason":' + _encode(stop_reason) + b"}"
        out = head + self._head + choice + self._tail(completion_tokens, prompt_tokens)
        if not self.last:
            return out
        return out + self.tail(prompt_tokens, completion_tokens, cached_tokens)

    def tail(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        """What ends a stream: the usage event when asked for (the whole answer's usage: every
        choice's when fanned out), then ``[DONE]``."""
        if not self.include_usage:
            return DONE
        if not self._head:  # (a fan-out's usage event, from a builder whose stream never opened)
            self._templates()
        usage = usage_dict(prompt_tokens, completion_tokens, cached_tokens)
        return self._head + b'],"usage":' + _encode(usage) + b"}\n\n" + DONE

    def _tail(self, completion: int, prompt: int | None = None) -> bytes:
        if not self.continuous_usage:
            return b"]}\n\n"
        p = self.prompt_tokens if prompt is None else prompt
        return b'],"usage":' + _encode(usage_dict(p, completion)) + b"}\n\n"

    # -- whole answers ------------------------------------------------------------------------
    def response(
        self,
        text: str,
        finish_reason: str,
        stop_reason: str | int | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        token_ids: Sequence[int] = (),
        logprobs: Sequence[Any] | None = None,
        prompt_lps: Sequence[Any] | None = None,
    ) -> bytes:
        """A non-streamed ``chat.completion`` or ``text_completion`` body; ``prompt_lps``: the
        worker's ``Finish.prompt_logprobs`` (rendered as vLLM's ``prompt_logprobs``)."""
        self.final_usage = (prompt_tokens, completion_tokens, cached_tokens)
        if (not self._logprobs or logprobs is None) and prompt_lps is None:  # plain: template
            return self._plain_response(
                text, finish_reason, stop_reason, prompt_tokens, completion_tokens, cached_tokens
            )
        usage = usage_dict(prompt_tokens, completion_tokens, cached_tokens)
        lp = self._logprobs_obj(text, token_ids, logprobs)
        plp = None if prompt_lps is None else prompt_logprobs(prompt_lps, self.prompt_token_text)
        if self.chat:
            return _encode(
                {
                    "id": self.id,
                    "object": "chat.completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [
                        {
                            "index": self._index,
                            "message": {
                                "role": "assistant",
                                "content": text,
                                "refusal": None,
                                "annotations": None,
                                "audio": None,
                                "function_call": None,
                                "tool_calls": [],
                                "reasoning_content": None,
                            },
                            "logprobs": lp,
                            "finish_reason": finish_reason,
                            "stop_reason": stop_reason,
                        }
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": usage,
                    "prompt_logprobs": plp,
                    "kv_transfer_params": None,
                }
            )
        return _encode(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": self._index,
                        "text": (self.echo or "") + text,
                        "logprobs": lp,
                        "finish_reason": finish_reason,
                        "stop_reason": stop_reason,
                        "prompt_logprobs": plp,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        )

    def _plain_response(
        self,
        text: str,
        finish_reason: str,
        stop_reason: str | int | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> bytes:
        """:meth:`response` without logprobs, spliced into bytes: exactly what encoding its
        dict gives (``tests/property/test_synth_templates.py``)."""
        head = b'{"id":' + _encode(self.id)
        if self.chat:
            head += b',"object":"chat.completion"'
        else:
            head += b',"object":"text_completion"'
            text = (self.echo or "") + text
        head += b',"created":%d,"model":' % self.created + _encode(self.model)
        reasons = b',"logprobs":null,"finish_reason":' + _encode(finish_reason)
        reasons += b',"stop_reason":' + _encode(stop_reason)
        usage = usage_bytes(prompt_tokens, completion_tokens, cached_tokens)
        if self.chat:
            return (
                head + b',"choices":[{"index":%d,"message":{"role":"assistant","content":'
                % self._index + _encode(text) + _CHAT_MESSAGE_END + reasons
                + b'}],"service_tier":null,"system_fingerprint":null,"usage":' + usage
                + b',"prompt_logprobs":null,"kv_transfer_params":null}'
            )  # fmt: skip
        return (
            head + b',"choices":[{"index":%d,"text":' % self._index + _encode(text) + reasons
            + b',"prompt_logprobs":null}],"service_tier":null,"system_fingerprint":null,'
            b'"usage":' + usage + b',"kv_transfer_params":null}'
        )  # fmt: skip

    # -- logprobs -----------------------------------------------------------------------------
    def _render_logprobs(
        self, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None
    ) -> bytes:
        if not self._logprobs or logprobs is None:
            if not self.chat:
                self._offset += len(text)
            return b"null"
        return _encode(self._logprobs_obj(text, token_ids, logprobs))

    def _logprobs_obj(
        self, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None
    ) -> dict[str, Any] | None:
        """vLLM's logprobs object for the sampled tokens (:func:`chat_logprobs`,
        :func:`completion_logprobs`); completions' ``text_offset`` goes on from the text
        before: within one event by the tokens' names, from one event to the next by the text
        (vLLM's ``previous_text_lens``; the two differ with ``return_tokens_as_token_ids``)."""
        if not self._logprobs or logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(logprobs, self.token_text)
        obj, _ = completion_logprobs(logprobs, self.token_text, self._offset)
        self._offset += len(text)
        return obj


# -- logprobs rendering (sans-IO): the protocol's Token entries -> vLLM's shapes ----------------
#
# A Token carries the k best alternatives the client asked for, best first, so ``k`` is theirs.
# Names are the token ids decoded alone (``token_text``), as vLLM's ``decoded_token``.
# Where vLLM's own order differs (a chat's ``top_logprobs`` list: vLLM puts the sampled token
# first, then the best, and so drops the k-th best when the sampled token is not among them),
# the lists here are the k best, best first: the HTTP simulator's answer, byte for byte.

_MIN_LOGPROB = -9999.0  # vLLM's clamp (-inf is not JSON)


def token_id_name(token_id: int) -> str:
    """vLLM's name of a token with ``return_tokens_as_token_ids``: ``token_id:N`` (ids even
    for tokens that do not decode to text on their own)."""
    return f"token_id:{token_id}"


def chat_logprobs(tokens: Sequence[Any], token_text: Callable[[int], str]) -> dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs``: ``{"content": [...]}``, one entry per token
    with ``token``, ``logprob``, ``bytes`` and ``top_logprobs`` (each ``token``, ``logprob``,
    ``bytes``)."""
    content = []
    for t in tokens:
        name = token_text(t.token_id)
        content.append(
            {
                "token": name,
                "logprob": max(t.logprob, _MIN_LOGPROB),
                "bytes": list(name.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (alt := token_text(tid)),
                        "logprob": max(lp, _MIN_LOGPROB),
                        "bytes": list(alt.encode("utf-8")),
                    }
                    for tid, lp in zip(t.top_ids, t.top_logprobs, strict=True)
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokens: Sequence[Any], token_text: Callable[[int], str], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """A completion choice's (or chunk's) ``logprobs`` (``text_offset``, ``token_logprobs``,
    ``tokens``, ``top_logprobs``) and the offset after it. Each ``top_logprobs`` object holds
    the k best and the sampled token (OpenAI's ``logprobs: k``: k + 1 entries at most, the
    sampled one last when it is not among the best); offsets count each token's text from
    ``offset``, as vLLM's ``_create_completion_logprobs``."""
    offsets, names, values, tops = [], [], [], []
    for t in tokens:
        name = token_text(t.token_id)
        value = max(t.logprob, _MIN_LOGPROB)
        offsets.append(offset)
        offset += len(name)
        names.append(name)
        values.append(value)
        top = {
            token_text(tid): max(lp, _MIN_LOGPROB)
            for tid, lp in zip(t.top_ids, t.top_logprobs, strict=True)
        }
        top.setdefault(name, value)
        tops.append(top)
    obj = {"text_offset": offsets, "token_logprobs": values, "tokens": names, "top_logprobs": tops}
    return obj, offset


def prompt_logprobs(
    entries: Sequence[Any], token_text: Callable[[int], str]
) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` (chat: top level; completions: per choice): per prompt
    position None (the first) or ``{token id: {logprob, rank, decoded_token}}`` for the
    prompt's token (first, with its rank) and the k best (ranks 1..k)."""
    out: list[dict[str, Any] | None] = []
    for t in entries:
        if t is None:
            out.append(None)
            continue
        d = {str(t.token_id): _vllm_logprob(t.logprob, t.rank, token_text(t.token_id))}
        for rank, (tid, lp) in enumerate(zip(t.top_ids, t.top_logprobs, strict=True), 1):
            key = str(tid)
            if key not in d:
                d[key] = _vllm_logprob(lp, rank, token_text(tid))
        out.append(d)
    return out


def _vllm_logprob(logprob: float, rank: int | None, decoded: str) -> dict[str, Any]:
    return {"logprob": max(logprob, _MIN_LOGPROB), "rank": rank, "decoded_token": decoded}
