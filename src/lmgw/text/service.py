"""A served model's text side in the gateway: prompt tokens, ``/tokenize``, ``/detokenize``, and
the context-length check, in vLLM's request and response shapes.

One :class:`ModelText` per model that has ``models[].tokenizer``; built at start-up (blocking
file I/O) by :func:`load_model_texts`. Prompts are rendered exactly as vLLM renders them (chat:
the template with the request's ``add_generation_prompt``/``continue_final_message``/``tools``/
``documents``/``chat_template_kwargs``, then encoded without special tokens; completions: the
prompt encoded with them), so the counts match what the engine will see.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ..errors import DECODE_ERRORS, GatewayError
from .chat_template import ChatTemplate, ChatTemplateConfigError
from .tokenizer import ModelTokenizer, TokenizerLoadError

log = logging.getLogger("lmgw.text")


class ModelText:
    """The tokenizer and chat template of one model, with vLLM's request semantics."""

    def __init__(
        self,
        name: str,
        tokenizer: ModelTokenizer,
        template: ChatTemplate | None,
        max_model_len: int | None,
        validate_context: bool = True,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.template = template
        self.max_model_len = max_model_len
        self.validate_context = validate_context and max_model_len is not None

    # -- prompts ----------------------------------------------------------------------------
    async def chat_ids(self, obj: Mapping[str, Any]) -> list[int]:
        """A chat request's prompt ids, as vLLM computes them."""
        text, special = self._chat_text(obj)
        ids = await self.tokenizer.encode_async(text, add_special_tokens=special)
        return self._truncated(ids, obj)

    def _chat_text(self, obj: Mapping[str, Any]) -> tuple[str, bool]:
        """A chat request's rendered prompt, and whether it gets the tokenizer's special
        tokens."""
        if self.template is None:
            raise GatewayError(400, f"model {self.name!r} has no chat template", param="messages")
        if obj.get("chat_template") is not None:  # rendering it here would need trust in it
            raise GatewayError(
                400,
                "a request's own chat_template is not rendered by this gateway (the model's"
                " template is: models[].chat_template)",
                param="chat_template",
            )
        kwargs = obj.get("chat_template_kwargs")
        text = self.template.render(
            obj.get("messages"),
            add_generation_prompt=bool(obj.get("add_generation_prompt", True)),
            continue_final_message=bool(obj.get("continue_final_message", False)),
            tools=obj.get("tools"),  # rendered even with tool_choice "none", as vLLM does
            documents=obj.get("documents"),
            chat_template_kwargs=kwargs if isinstance(kwargs, Mapping) else None,
        )
        return text, bool(obj.get("add_special_tokens", False))

    async def completion_ids(self, obj: Mapping[str, Any]) -> list[list[int]]:
        """Each prompt's ids (a completions ``prompt`` may be a batch)."""
        if obj.get("truncate_prompt_tokens") is not None:
            return [self._truncated(ids, obj) for ids in await self._completion_ids(obj)]
        return await self._completion_ids(obj)

    async def _completion_ids(self, obj: Mapping[str, Any]) -> list[list[int]]:
        special = bool(obj.get("add_special_tokens", True))
        encode = self.tokenizer.encode_async
        return [
            await encode(p, add_special_tokens=special) if isinstance(p, str) else p
            for p in self._completion_items(obj)
        ]

    def _completion_items(self, obj: Mapping[str, Any]) -> list[str | list[int]]:
        """A completions ``prompt`` as its prompts: texts to encode, or token-id lists
        (checked)."""
        prompt = obj.get("prompt")
        tok = self.tokenizer
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(type(x) is int for x in prompt):
            tok.check_ids(prompt, param="prompt")
            return [list(prompt)]
        if isinstance(prompt, list) and prompt:
            out: list[str | list[int]] = []
            for p in prompt:
                if isinstance(p, str):
                    out.append(p)
                elif isinstance(p, list) and all(type(x) is int for x in p):
                    tok.check_ids(p, param="prompt")
                    out.append(list(p))
                else:
                    raise GatewayError(400, "prompt items must be strings or token-id lists",
                                       param="prompt")  # fmt: skip
            return out
        raise GatewayError(400, "prompt must be a string, a list of strings or token ids",
                           param="prompt")  # fmt: skip

    def prompts_inline(self, endpoint: str, obj: Mapping[str, Any]) -> list[list[int]] | None:
        """:meth:`chat_ids` (``endpoint`` "chat") or :meth:`completion_ids` without awaiting,
        for the compiled lane; None when a prompt would be encoded in a worker thread (too
        much of it is not in the segment cache)."""
        inline = self.tokenizer.encode_inline
        if endpoint == "chat":
            text, special = self._chat_text(obj)
            ids = inline(text, add_special_tokens=special)
            return None if ids is None else [self._truncated(ids, obj)]
        special = bool(obj.get("add_special_tokens", True))
        out = []
        for p in self._completion_items(obj):
            ids = inline(p, add_special_tokens=special) if isinstance(p, str) else p
            if ids is None:
                return None
            out.append(self._truncated(ids, obj))
        return out

    def _truncated(self, ids: list[int], obj: Mapping[str, Any]) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: keep the prompt's last k tokens (-1: the context
        length), before the context check, as vLLM's OpenAI layer does. A native worker gets
        token ids, so only the gateway can apply it; over HTTP the count matches the worker's."""
        k = obj.get("truncate_prompt_tokens")
        if k is None:
            return ids
        limit = self.max_model_len
        if type(k) is not int or k == 0 or k < -1:
            raise GatewayError(400, "truncate_prompt_tokens must be -1 or a positive integer",
                               param="truncate_prompt_tokens")  # fmt: skip
        if k == -1:
            if limit is None:
                return ids
            k = limit
        if limit is not None and k > limit:
            raise GatewayError(
                400,
                f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({limit})."
                " Please, select a smaller truncation size.",
                param="truncate_prompt_tokens",
            )
        return ids[-k:] if len(ids) > k else ids

    # -- the context-length check -------------------------------------------------------------
    def check_context(self, prompt_len: int, max_tokens: int | None, what: str) -> None:
        """vLLM's 400 when the prompt plus the requested completion does not fit."""
        limit = self.max_model_len
        if limit is None:
            return
        if prompt_len >= limit or (max_tokens is not None and prompt_len + max_tokens > limit):
            asked = prompt_len + (max_tokens or 0)
            raise GatewayError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested"
                f" {asked} tokens ({prompt_len} in the {what}, {max_tokens or 0} in the"
                f" completion). Please reduce the length of the {what} or completion.",
                param="max_tokens" if max_tokens and prompt_len < limit else what,
            )

    def fill_usage(self, prompt_tokens: int | None, body: bytes) -> bytes:
        """A non-streamed answer without ``usage`` (some engines and proxies leave it out) gets
        one counted here: the prompt as the context check counted it, the completion by
        encoding each choice's text. Answers that carry usage pass untouched (a bytes check)."""
        if prompt_tokens is None or (b'"usage"' in body and b'"usage":null' not in body):
            return body
        try:
            obj = msgspec.json.decode(body)
        except DECODE_ERRORS:
            return body
        if not isinstance(obj, dict) or obj.get("usage") is not None:
            return body
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return body  # not an answer this can count
        completion = 0
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str) and text:
                completion += len(self.tokenizer.encode(text, add_special_tokens=False))
        obj["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        return msgspec.json.encode(obj)

    async def validate(self, endpoint: str, obj: dict[str, Any]) -> tuple[bool, list[int] | None]:
        """Check a chat/completions request (its decoded body) against the context length;
        fill ``max_tokens`` in, in place, when absent the way vLLM defaults it (what fits,
        capped by generation_config). Returns whether ``obj`` was changed and the prompt's
        token ids (None when not computed: media chats, batches) for usage and routing."""
        checked = self._checked(endpoint, obj)
        if checked is None:
            return False, None
        if endpoint == "chat":
            prompts = [await self.chat_ids(obj)]
        else:
            prompts = await self.completion_ids(obj)
        return self._fit(obj, prompts, *checked)

    def validate_inline(
        self, endpoint: str, obj: dict[str, Any]
    ) -> tuple[bool, list[int] | None] | None:
        """:meth:`validate` without awaiting (the compiled lane); None when a prompt would be
        encoded in a worker thread: the server's path validates that request."""
        checked = self._checked(endpoint, obj)
        if checked is None:
            return False, None
        prompts = self.prompts_inline(endpoint, obj)
        if prompts is None:
            return None
        return self._fit(obj, prompts, *checked)

    def _checked(self, endpoint: str, obj: Mapping[str, Any]) -> tuple[int | None, str] | None:
        """The completion length asked and what holds the prompt, or None for a request
        whose context is not checked here."""
        key = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else None
        max_tokens = obj.get(key or "max_tokens")
        if not (max_tokens is None or type(max_tokens) is int):
            return None  # the worker answers a badly typed value itself
        if endpoint != "chat":
            return max_tokens, "prompt"
        if _has_media(obj):  # the engine expands each item to its own placeholder count
            return None
        if obj.get("chat_template") is not None:  # the worker renders its own: not ours
            return None
        return max_tokens, "messages"

    def _fit(
        self, obj: dict[str, Any], prompts: list[list[int]], max_tokens: int | None, what: str
    ) -> tuple[bool, list[int] | None]:
        """:meth:`validate`'s check of computed ``prompts``, and its ``max_tokens`` default."""
        for ids in prompts:
            self.check_context(len(ids), max_tokens, what)
        single = prompts[0] if len(prompts) == 1 else None
        if max_tokens is not None or self.max_model_len is None:
            return False, single
        room = self.max_model_len - max(len(ids) for ids in prompts)
        cap = self.tokenizer.generation_max_tokens
        obj["max_tokens"] = min(room, cap) if cap else room
        return True, single

    # -- /tokenize and /detokenize ------------------------------------------------------------
    async def tokenize(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """vLLM's ``POST /tokenize`` answer for a chat (``messages``) or completion body."""
        if "messages" in obj:
            ids = await self.chat_ids(obj)
        else:
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise GatewayError(400, "prompt must be a string", param="prompt")
            ids = await self.tokenizer.encode_async(
                prompt, add_special_tokens=bool(obj.get("add_special_tokens", True))
            )
        strs = self.tokenizer.convert_ids_to_tokens(ids) if obj.get("return_token_strs") else None
        return {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    async def detokenize(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        tokens = obj.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise GatewayError(400, "tokens must be a list of token ids", param="tokens")
        self.tokenizer.check_ids(tokens, param="tokens")
        return {"prompt": await self.tokenizer.decode_async(tokens)}


def _has_media(obj: Mapping[str, Any]) -> bool:
    for msg in obj.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") not in (None, "text") for p in content
        ):
            return True
    return False


def load_model_texts(models: Sequence[Any]) -> dict[str, ModelText]:
    """:class:`ModelText` for every ``models[]`` entry with a tokenizer (blocking: start-up).

    Raises:
        ValueError: a tokenizer or template that cannot be loaded, naming the model.
    """
    out: dict[str, ModelText] = {}
    for m in models:
        if m.tokenizer is None:
            continue
        try:
            tok = ModelTokenizer.load(
                m.tokenizer,
                max_model_len=m.max_model_len,
                prefix_cache_chars=m.tokenizer_cache_chars,
            )
            try:
                template: ChatTemplate | None = ChatTemplate.load(
                    m.tokenizer,
                    override=m.chat_template,
                    special_tokens=tok.special_tokens_map,
                    content_format=m.chat_template_content_format,
                    default_kwargs=dict(m.chat_template_kwargs),
                    media_placeholders=dict(m.media_placeholders),
                    shapes=m.chat_template_shapes,
                )
            except ChatTemplateConfigError:
                if m.chat_template is not None:
                    raise
                template = None  # a base model: completions only
        except (TokenizerLoadError, ChatTemplateConfigError) as exc:
            raise ValueError(f"model {m.name!r}: {exc}") from None
        out[m.name] = ModelText(m.name, tok, template, tok.max_model_len, m.validate_context)
        log.info(
            "model %s: chat template by shape %s; segment cache %s; pre-token ids %s",
            m.name,
            "n/a" if template is None else _on_off(template.unshaped),
            _on_off(tok.prefix_cache_off_reason),
            _on_off(tok.word_ids_off_reason),
        )
    return out


def _on_off(reason: str | None) -> str:
    return "on" if reason is None else f"off ({reason})"
