"""Chat templates: transformers-compatible rendering in a jinja2 sandbox, behind vLLM's request
normalisation.

Two layers, because the gateway has to agree with two references at once:

- :meth:`ChatTemplate.apply` renders a conversation exactly as transformers'
  ``apply_chat_template(..., tokenize=False)`` does (tested differentially against it): an
  ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the loop-controls and
  ``{% generation %}`` extensions, HF's ``tojson`` (no HTML escaping; ``indent``,
  ``separators``, ``sort_keys``), ``raise_exception``, ``strftime_now``, the restricted ``dict`` and
  ``namespace``; the special tokens (``bos_token``...) as variables; None-valued message keys
  dropped; reasoning aliased to ``reasoning_content``/``thinking``; everything the template sees
  rebuilt from plain JSON types; ``continue_final_message`` cut at the final message.
- :meth:`ChatTemplate.render` takes an OpenAI request's ``messages`` the way vLLM's chat
  endpoint does before it calls transformers (:func:`normalize_messages`): string or list-of-parts
  content normalised to the template's content format ("string": text parts joined with
  newlines, media as model placeholders in front; "openai": a list of ``{"type": "text"}``,
  ``{"type": "image"}``... parts; "auto" detects which one the template iterates over), tool-call
  ``arguments`` parsed from JSON strings into objects, tools carrying all of vLLM's declared
  fields (absent ones as None), ``developer`` turned into ``system`` for templates that do not
  know it, and ``chat_template_kwargs`` filtered to the variables the template uses
  (``chat_template`` and ``tokenize`` rejected).

Errors: a problem with the configured template is a :class:`ChatTemplateConfigError` at load
time; anything a request causes (bad message shapes, the template's ``raise_exception``, a
template that fails on this input) is a :class:`ChatTemplateError`, a 400 ``GatewayError``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmgw.errors import GatewayError

from .template_shapes import ShapeRenderer, Unshaped, analyze

__all__ = [
    "CONTINUE_FINAL_MESSAGE_TAG",
    "ChatTemplate",
    "ChatTemplateConfigError",
    "ChatTemplateError",
    "ContentFormat",
    "ContentFormatOption",
    "detect_content_format",
    "make_environment",
    "normalize_messages",
    "normalize_tools",
]

ContentFormat = Literal["string", "openai"]
ContentFormatOption = Literal["auto", "string", "openai"]

CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""Appended to the final message to find where it ends in the output (transformers' method)."""

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_RESERVED_KWARGS = frozenset({"chat_template", "tokenize"})  # vLLM rejects these
_EXPLICIT = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_EXPLICIT_KWARGS = _EXPLICIT | {"continue_final_message"}
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
}
# A part without "type" (or with a uuid) is recognised by its payload key, in vLLM's order.
_UNTYPED_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)


class ChatTemplateConfigError(ValueError):
    """The configured chat template is unusable (missing, unreadable, bad syntax)."""


class ChatTemplateError(GatewayError):
    """A request cannot be rendered with the model's chat template (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(400, message, param=param)


# -- the sandbox ----------------------------------------------------------------------------------


class _GenerationExtension(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; rendering text, it is a no-op, but templates using it must still compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` for templates without exposing the type (no attribute tricks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no path to interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # jinja2's own signature trick: ``self`` is positional-only, so ``namespace(self=1)`` works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _TemplateNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' semantics: json.dumps, no HTML escaping (jinja's own tojson escapes <>&').
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with a faster ``message.role``.

    Jinja's ``obj.name`` tries the attribute first and the item after it. On a message (a plain
    dict), every ``message.role`` or ``message.content`` raised and caught an AttributeError
    first: a quarter of rendering a chat (routing.py's multi-turn chats: 85 -> 63 µs per
    request). A plain dict's attributes are its type's, so a name that is not one of them goes
    straight to the item, as the sandbox would after the failed attribute."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def make_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in, with transformers' globals, filters and extensions."""
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


# -- content-format detection (vLLM's rule) -------------------------------------------------------


def _is_name(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_key_of(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == key and _is_name(node.node, name)
    if isinstance(node, jinja2.nodes.Getitem):
        arg = node.arg
        return (
            isinstance(arg, jinja2.nodes.Const) and arg.value == key and _is_name(node.node, name)
        )
    return False


def _refers_to(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """``name`` (or ``name.key``), possibly under filters, tests or a slice."""
    while (isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None) or (
        isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
    ):
        node = node.node
    return _is_key_of(node, name, key) if key is not None else _is_name(node, name)


def _loop_targets(
    loops: Sequence[jinja2.nodes.For], names: Sequence[str], key: str | None
) -> Iterator[str]:
    for loop in loops:
        if any(_refers_to(loop.iter, n, key) for n in names) and isinstance(
            loop.target, jinja2.nodes.Name
        ):
            yield loop.target.name


def detect_content_format(env: jinja2.Environment, source: str) -> ContentFormat:
    """ "openai" when the template loops over a message's content, else "string" (vLLM's rule:
    aliases of ``messages`` made with ``set``, loops over them, then loops over
    ``<message>.content`` or over a variable called ``content``)."""
    ast = env.parse(source)
    assigns = list(ast.find_all(jinja2.nodes.Assign))
    messages = ["messages"]
    pending = ["messages"]
    while pending:
        current = pending.pop()
        for assign in assigns:
            target = assign.target
            if (
                isinstance(target, jinja2.nodes.Name)
                and target.name not in messages
                and _refers_to(assign.node, current)
            ):
                messages.append(target.name)
                pending.append(target.name)
    loops = list(ast.find_all(jinja2.nodes.For))
    items = list(_loop_targets(loops, messages, None))
    if next(_loop_targets(loops, items, "content"), None) is not None:
        return "openai"
    if any(_is_name(loop.iter, "content") for loop in loops):
        return "openai"
    return "string"


# -- plain data -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A fresh copy built from JSON types only (transformers does the same before rendering):
    objects with methods never reach the sandbox, and edits never touch the caller's data."""
    kind = type(value)
    if kind is str or value is None or kind is int or kind is float or kind is bool:
        return value
    if kind is dict:  # (JSON's own types first: the ABC checks below cost more than the copy)
        return {_plain(k): _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):  # subclasses (enums...) may carry methods: keep the base value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{kind.__name__}>"


def _is_list_of_dicts(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, dict) for v in value)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# -- vLLM's request normalisation -----------------------------------------------------------------


def _part_kind(part: Mapping[str, Any], where: str) -> tuple[str, Any]:
    ptype = part.get("type")
    if isinstance(ptype, str) and part.get("uuid") is None:
        if ptype in _TEXT_PARTS:
            return ptype, part.get(_TEXT_PARTS[ptype])
        if ptype in _MEDIA_PARTS or ptype == "tool_reference":
            return ptype, part.get("name") if ptype == "tool_reference" else None
        if ptype == "prompt_embeds":
            raise ChatTemplateError(f"{where}: prompt_embeds parts are not supported")
        supported = ", ".join(sorted({*_TEXT_PARTS, *_MEDIA_PARTS, "tool_reference"}))
        raise ChatTemplateError(
            f"{where}: unsupported content part type {ptype!r}; supported: {supported}"
        )
    if ptype is None or part.get("uuid") is not None:
        for key in _UNTYPED_KEYS:
            if key in part and (key != "input_audio" or part[key] is not None):
                return key, part.get("name") if key == "tool_reference" else None
        raise ChatTemplateError(f"{where}: missing 'type' field in content part")
    raise ChatTemplateError(f"{where}: invalid 'type' field in content part")


def _content(
    content: Any,
    fmt: ContentFormat,
    placeholders: Mapping[str, str],
    where: str,
) -> str | list[dict[str, Any]]:
    if type(content) is str:  # (the common message: its text as it is, or one text part)
        return content if fmt == "string" else [{"type": "text", "text": content}]
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise ChatTemplateError(f"{where}.content must be a string, a list of parts or null")
    texts: list[str] = []
    wrapped: list[dict[str, Any]] = []
    media: list[str] = []
    for j, part in enumerate(parts):
        pwhere = f"{where}.content[{j}]"
        if isinstance(part, str):
            kind, value = "text", part
        elif isinstance(part, dict):
            kind, value = _part_kind(part, pwhere)
        else:
            raise ChatTemplateError(f"{pwhere} must be a string or an object")
        if kind in _TEXT_PARTS:
            if value is None:
                continue  # vLLM skips text parts without text
            if not isinstance(value, str):
                raise ChatTemplateError(f"{pwhere}: the text must be a string")
            texts.append(value)
            wrapped.append({"type": "text", "text": value})
        elif kind == "tool_reference":
            texts.append(str(value))
            wrapped.append({"type": "tool_reference", "name": value})
        else:
            modality = _MEDIA_PARTS[kind]
            wrapped.append({"type": modality})
            if fmt == "string":
                placeholder = placeholders.get(modality)
                if placeholder is None:
                    raise ChatTemplateError(
                        f"{pwhere}: this model does not accept {modality} input"
                    )
                media.append(placeholder)
    if fmt == "openai":
        return wrapped
    text = "\n".join(texts)
    if not media:
        return text
    # vLLM: placeholders the user did not write into the text go in front, one per line.
    missing: list[str] = []
    for placeholder, count in Counter(media).items():
        left = count - text.count(placeholder)
        if left < 0:
            raise ChatTemplateError(
                f"{where}: more {placeholder!r} placeholders in the text than media items"
            )
        missing += [placeholder] * left
    return "\n".join([*missing, text] if text else missing)


def _tool_calls(calls: Any, where: str) -> list[Any]:
    out: list[Any] = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ChatTemplateError(f"{where}.tool_calls[{k}] must be an object with a function")
        fn = dict(call["function"])
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args)
            except json.JSONDecodeError:
                fn["arguments"] = {}  # vLLM's fallback for empty or malformed arguments
        elif not isinstance(args, dict | list):
            fn["arguments"] = {}
        out.append({**call, "function": fn})
    return out


TOOL_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
"""The fields of vLLM's ``FunctionDefinition``; older vLLM versions lack ``strict``."""


def normalize_tools(
    tools: Any, *, function_fields: Sequence[str] = TOOL_FUNCTION_FIELDS
) -> list[dict[str, Any]] | None:
    """Tools as vLLM hands them to the template: its pydantic models dumped back to dicts, so a
    function tool always has every declared field (missing ones as None, which ``tojson``
    writes as ``null``), declared fields first, then any extra keys. Other tool types pass
    through.

    Raises:
        ChatTemplateError: not a list of objects, or a function tool without a name.
    """
    if tools is None:
        return None
    if not isinstance(tools, list | tuple):
        raise ChatTemplateError("tools must be a list", param="tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"tools[{i}] must be an object", param="tools")
        if tool.get("type", "function") != "function":
            out.append(tool)
            continue
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatTemplateError(f"tools[{i}].function.name must be a string", param="tools")
        function = {k: fn.get(k) for k in function_fields}
        function.update((k, v) for k, v in fn.items() if k not in function)
        dumped = {"type": "function", "function": function}
        dumped.update((k, v) for k, v in tool.items() if k not in dumped)
        out.append(dumped)
    return out


def normalize_messages(
    messages: Any,
    content_format: ContentFormat,
    *,
    media_placeholders: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the conversation vLLM hands to transformers.

    Each message keeps only ``role``, ``content`` (normalised to ``content_format``), and by role:
    ``tool_calls`` and ``reasoning`` (+ ``reasoning_content``) for assistants, ``tool_call_id``
    for tools (whose all-text list content becomes one string), ``tools`` for developers, and
    ``name`` / ``task`` when they are strings. Tool-call ``arguments`` become objects.

    Args:
        messages: the request's ``messages``.
        content_format: "string" or "openai" (resolve "auto" with :meth:`ChatTemplate.get`).
        media_placeholders: modality ("image", "audio", "video") -> the model's placeholder
            text, needed for media parts in the "string" format.

    Raises:
        ChatTemplateError: a message or part has the wrong shape.
    """
    if not isinstance(messages, list | tuple):
        raise ChatTemplateError("messages must be a list")
    placeholders = media_placeholders or {}
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ChatTemplateError(f"{where} must be an object")
        role = msg.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"{where}.role must be a string")
        conv: dict[str, Any] = {
            "role": role,
            "content": _content(msg.get("content"), content_format, placeholders, where),
        }
        if role == "assistant":
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                if calls:
                    conv["tool_calls"] = _tool_calls(calls, where)
            elif calls is not None:
                conv["tool_calls"] = calls
            reasoning = msg.get("reasoning")
            if reasoning is not None:
                conv["reasoning"] = reasoning
                conv["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in msg:
                conv["tool_call_id"] = msg["tool_call_id"]
            content = conv["content"]
            if isinstance(content, list) and all(p.get("type") == "text" for p in content):
                conv["content"] = "\n".join(p["text"] for p in content)
        if isinstance(msg.get("name"), str):
            conv["name"] = msg["name"]
        if isinstance(msg.get("task"), str):
            conv["task"] = msg["task"]
        if role == "developer":
            conv["tools"] = msg.get("tools")
        out.append(conv)
    return out


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM, for templates that never mention "developer": developer turns become system turns,
    and system turns anywhere but first are merged into one first turn."""
    converted = []
    for msg in conversation:
        if msg["role"] == "developer":
            msg = {k: v for k, v in msg.items() if k != "tools"}
            msg["role"] = "system"
        converted.append(msg)
    systems: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for i, msg in enumerate(converted):
        if msg["role"] != "system":
            others.append(msg)
            continue
        if i > 0 or systems:
            merge = True
        content = msg.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p
                for p in content
                if (isinstance(p, dict) and "text" in p) or isinstance(p, str)
            )
        if content:
            systems.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(systems)}, *others]


# -- templates ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """One named template, compiled once, with what render needs to know about it."""

    name: str
    source: str
    template: jinja2.Template
    content_format: ContentFormat
    variables: frozenset[str]
    """Undeclared variables: the only ``chat_template_kwargs`` that can change the output."""
    knows_developer: bool


def _read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateConfigError(f"cannot read chat template {path}: {exc}") from exc


def _load_override(override: str | os.PathLike[str]) -> str:
    """vLLM's rule for ``--chat-template``: a path, or a literal template when the string has
    ``{``, ``}`` or a newline; a path-like string that does not exist is an error."""
    if isinstance(override, str) and any(c in override for c in "{}\n"):
        return override
    path = Path(override).expanduser()
    if not path.is_file():
        raise ChatTemplateConfigError(
            f"chat template override {os.fspath(override)!r} looks like a path, but there is "
            "no such file (a literal template must contain '{', '}' or a newline)"
        )
    return _read_template_file(path)


def _templates_in_folder(folder: Path) -> str | dict[str, str] | None:
    """transformers 5's order: ``chat_template.jinja`` (+ ``chat_templates/*.jinja``), then
    ``tokenizer_config.json``'s ``chat_template`` (a string or ``[{name, template}]``); then, as
    vLLM falls back to the processor's, ``chat_template.json``."""
    found: dict[str, str] = {}
    main = folder / "chat_template.jinja"
    if main.is_file():
        found["default"] = _read_template_file(main)
    extra = folder / "chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            found[path.name.removesuffix(".jinja")] = _read_template_file(path)
    if found:
        return found["default"] if list(found) == ["default"] else found
    for file_name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ChatTemplateConfigError(f"cannot read {path}: {exc}") from exc
        value = config.get("chat_template") if isinstance(config, dict) else None
        if value is None:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
            for t in value
        ):
            return {t["name"]: t["template"] for t in value}
        raise ChatTemplateConfigError(
            f"{path}: chat_template must be a string or a list of {{name, template}}"
        )
    return None


class ChatTemplate:
    """A model's chat template(s), compiled once at startup; rendering is pure and synchronous.

    Rendering runs on the event loop: it is string building (tens of microseconds for a normal
    conversation) and holds the GIL anyway, so a thread would not help.

    Args:
        templates: one template, or named templates (``"default"``, ``"tool_use"``...).
        special_tokens: the tokenizer's named special tokens (its ``special_tokens_map``), visible
            to templates as variables, as transformers passes them.
        content_format: "auto" (detect per template), "string" or "openai".
        default_kwargs: per-model ``chat_template_kwargs`` defaults; the request's win.
        media_placeholders: modality -> placeholder text for the "string" content format.
        origin: where the template came from, for messages.

    Raises:
        ChatTemplateConfigError: a template does not compile, or there are several and none is
            named "default".
    """

    def __init__(
        self,
        templates: str | Mapping[str, str],
        *,
        special_tokens: Mapping[str, str] | None = None,
        content_format: ContentFormatOption = "auto",
        default_kwargs: Mapping[str, Any] | None = None,
        media_placeholders: Mapping[str, str] | None = None,
        origin: str = "",
        shapes: bool = True,
    ) -> None:
        if content_format not in ("auto", "string", "openai"):
            raise ChatTemplateConfigError(f"unknown content format {content_format!r}")
        named = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not named:
            raise ChatTemplateConfigError(f"{origin or 'chat template'}: no templates given")
        if "default" not in named and len(named) > 1:
            raise ChatTemplateConfigError(
                f"{origin or 'chat template'}: several templates ({', '.join(sorted(named))}) "
                "and none named 'default'; configure an override"
            )
        self.origin = origin
        self._env = make_environment()
        self._templates = {
            name: self._compile(name, source, content_format) for name, source in named.items()
        }
        self._single = next(iter(self._templates.values())) if len(named) == 1 else None
        self.special_tokens: Mapping[str, str] = MappingProxyType(dict(special_tokens or {}))
        self.default_kwargs: Mapping[str, Any] = MappingProxyType(dict(default_kwargs or {}))
        self.media_placeholders: Mapping[str, str] = MappingProxyType(
            dict(media_placeholders or {})
        )
        self.shapes: ShapeRenderer | None = None
        """Plain conversations rendered by shape (:mod:`lmgw.text.template_shapes`)."""
        self.unshaped: str | None = None
        """Why the template renders every request in full (None: it has shapes)."""
        self._shaped_tools = False  # (requests with tools use the shapes' template too)
        if shapes:
            self._learn_shapes()
        else:
            self.unshaped = "turned off (models[].chat_template_shapes)"

    def _learn_shapes(self) -> None:
        if _EXPLICIT_KWARGS & self.default_kwargs.keys():
            self.unshaped = "chat_template_kwargs set tools, documents or the prompt flags"
            return
        compiled = self.get(None)
        try:
            use = analyze(self._env.parse(compiled.source), compiled.content_format)
        except Unshaped as exc:
            self.unshaped = str(exc)
            return
        except Exception as exc:  # (a template shape the analysis did not foresee: full renders)
            self.unshaped = f"the analysis failed: {type(exc).__name__}: {exc}"
            return

        def full(messages: list[dict[str, str]], add_generation_prompt: bool, tools: Any) -> str:
            return self._render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

        self.shapes = ShapeRenderer(use, full, self.origin or "inline")
        # (with a "tool_use" template of its own, a request with tools is that template's)
        self._shaped_tools = self.get(None, tools=[]) is compiled

    def _compile(self, name: str, source: str, fmt: ContentFormatOption) -> CompiledTemplate:
        if not isinstance(source, str):
            raise ChatTemplateConfigError(f"{self.origin}: template {name!r} is not a string")
        try:
            template = self._env.from_string(source)
            ast = self._env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateConfigError(
                f"{self.origin or 'chat template'} ({name}): syntax error on line {exc.lineno}: "
                f"{exc.message}"
            ) from exc
        return CompiledTemplate(
            name=name,
            source=source,
            template=template,
            content_format=detect_content_format(self._env, source) if fmt == "auto" else fmt,
            variables=frozenset(jinja2.meta.find_undeclared_variables(ast)),
            knows_developer='"developer"' in source or "'developer'" in source,
        )

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str] | None,
        *,
        override: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> ChatTemplate:
        """The template of a local model folder, or the override (a path or a literal template,
        as vLLM's ``--chat-template``). Blocking file I/O: call at startup.

        Raises:
            ChatTemplateConfigError: nothing found, an unreadable file, or bad syntax.
        """
        if override is not None:
            origin = "the chat template override"
            templates: str | dict[str, str] | None = _load_override(override)
        elif model_dir is not None:
            folder = Path(model_dir)
            origin = f"the chat template of {folder}"
            if not folder.is_dir():
                raise ChatTemplateConfigError(f"model folder {os.fspath(model_dir)!r} not found")
            templates = _templates_in_folder(folder)
            if templates is None:
                raise ChatTemplateConfigError(
                    f"{folder} has no chat template (tokenizer_config.json chat_template or "
                    "chat_template.jinja); configure an override"
                )
        else:
            raise ChatTemplateConfigError("no model folder and no chat template override")
        return cls(templates, origin=origin, **options)

    @property
    def names(self) -> tuple[str, ...]:
        """The template names (a single template is called "default")."""
        return tuple(self._templates)

    def get(
        self, name: str | None = None, *, tools: Sequence[Any] | None = None
    ) -> CompiledTemplate:
        """The template a request uses: ``name`` if given; else, with several templates,
        "tool_use" when ``tools`` is not None and one exists, then "default" (transformers)."""
        if name is not None:
            found = self._templates.get(name)
            if found is None:
                raise ChatTemplateError(
                    f"unknown chat template {name!r}; known: {', '.join(self._templates)}",
                    param="chat_template",
                )
            return found
        if self._single is not None:
            return self._single
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        return self._templates["default"]

    # -- rendering -------------------------------------------------------------------------------

    def render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        template_name: str | None = None,
    ) -> str:
        """An OpenAI chat request's prompt text, as vLLM renders it (see the module doc).

        ``chat_template_kwargs`` (over the per-model defaults) may also carry
        ``add_generation_prompt``, ``continue_final_message``, ``documents`` and ``tools``; the
        explicit arguments win, as vLLM merges the request's own fields last (``tools`` and
        ``documents`` only when not None). Other entries reach the template only when it uses
        them; ``chat_template`` and ``tokenize`` are rejected, as in vLLM.

        Raises:
            ChatTemplateError: bad messages or kwargs, or the template refused the input.
        """
        shapes = self.shapes
        if shapes is not None:
            if (
                (tools is None or self._shaped_tools)
                and documents is None
                and not chat_template_kwargs
                and template_name is None
                and not continue_final_message
            ):
                text = shapes.render(messages, add_generation_prompt, tools)
                if text is not None:
                    return text
            shapes.stats.full += 1
        return self._render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            chat_template_kwargs=chat_template_kwargs,
            template_name=template_name,
        )

    def _render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        template_name: str | None = None,
    ) -> str:
        kwargs = {**self.default_kwargs, **(chat_template_kwargs or {})}
        reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
        if reserved:
            raise ChatTemplateError(
                f"unexpected chat_template_kwargs: {', '.join(reserved)}",
                param="chat_template_kwargs",
            )
        if "messages" in kwargs:
            raise ChatTemplateError(
                "chat_template_kwargs cannot set messages", param="chat_template_kwargs"
            )
        kwargs["add_generation_prompt"] = add_generation_prompt
        kwargs["continue_final_message"] = continue_final_message
        if tools is not None:
            kwargs["tools"] = tools
        if documents is not None:
            kwargs["documents"] = documents
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        add_generation_prompt = bool(kwargs.pop("add_generation_prompt"))
        continue_final_message = bool(kwargs.pop("continue_final_message"))
        tools = normalize_tools(tools)
        compiled = self.get(template_name, tools=tools)
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                param="continue_final_message",
            )
        conversation = normalize_messages(
            messages, compiled.content_format, media_placeholders=self.media_placeholders
        )
        if not compiled.knows_developer and any(m["role"] == "developer" for m in conversation):
            conversation = _developer_to_system(conversation)
        extra = {k: v for k, v in kwargs.items() if k in compiled.variables}
        return self._apply(
            compiled,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            kwargs=extra,
        )

    def apply(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """transformers' ``apply_chat_template(conversation, tokenize=False, ...)`` for one
        conversation of plain dicts; ``kwargs`` become template variables.

        Raises:
            ChatTemplateError: what transformers raises as ValueError/TypeError or the template
                raises while rendering.
        """
        compiled = self.get(template_name, tools=tools)
        return self._apply(
            compiled,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            kwargs=kwargs,
        )

    def _apply(
        self,
        compiled: CompiledTemplate,
        conversation: Any,
        *,
        tools: Sequence[Any] | None,
        documents: Sequence[Any] | None,
        add_generation_prompt: bool,
        continue_final_message: bool | str,
        kwargs: Mapping[str, Any],
    ) -> str:
        if not isinstance(conversation, list | tuple) or not conversation:
            raise ChatTemplateError("Cannot apply chat template to an empty conversation.")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt are not compatible.",
                param="continue_final_message",
            )
        for name in _EXPLICIT & kwargs.keys():
            raise ChatTemplateError(f"{name} cannot be passed as a template variable")
        if tools is not None and not _is_list_of_dicts(tools):
            raise ChatTemplateError("tools must be a list of JSON schemas", param="tools")
        if documents is not None and not _is_list_of_dicts(documents):
            raise ChatTemplateError(
                "documents must be a list of objects with 'title' and 'text'",
                param="documents",
            )
        chat: list[dict[str, Any]] = []
        for i, message in enumerate(conversation):
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"messages[{i}] must be an object")
            plain = {_plain(k): _plain(v) for k, v in message.items() if v is not None}
            chat.append(_alias_reasoning(plain))
        final_text: str | None = None
        if continue_final_message:
            final_text = self._tag_final_message(compiled, chat, continue_final_message)
        variables = {**self.special_tokens, **_plain(dict(kwargs))}
        try:
            rendered = compiled.template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc.message or exc}") from exc
        except Exception as exc:  # a template failing on this input is the request's problem
            raise ChatTemplateError(
                f"chat template failed on this input: {type(exc).__name__}: {exc}"
            ) from exc
        if final_text is not None:
            rendered = self._cut_at_tag(rendered, final_text)
        return rendered

    @staticmethod
    def _tag_final_message(
        compiled: CompiledTemplate, chat: list[dict[str, Any]], field: bool | str
    ) -> str:
        """Append the tag to the final message's text; returns that text (untagged)."""
        key = field if isinstance(field, str) else "content"
        last = chat[-1]
        final = last.get(key)
        if final is None:
            raise ChatTemplateError(
                f'continue_final_message is set but the final message has no "{key}" to continue'
            )
        fields = [key]
        if key in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
        if not any(f in compiled.source for f in fields):
            raise ChatTemplateError(
                f'continue_final_message is set to "{key}" but the chat template never uses it'
            )
        if isinstance(final, list | tuple):
            for block in reversed(final):
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    text = block["text"]
                    block["text"] = text + CONTINUE_FINAL_MESSAGE_TAG
                    return text
            raise ChatTemplateError(
                "continue_final_message is set but the final message has no text to continue"
            )
        if not isinstance(final, str):
            raise ChatTemplateError("continue_final_message needs a text final message")
        for f in fields:
            last[f] = last[f] + CONTINUE_FINAL_MESSAGE_TAG
        return final

    @staticmethod
    def _cut_at_tag(rendered: str, final_text: str) -> str:
        tag = CONTINUE_FINAL_MESSAGE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                "continue_final_message is set but the chat template dropped part of the final "
                "message"
            )
        at = rendered.rindex(tag)
        if rendered[at : at + len(CONTINUE_FINAL_MESSAGE_TAG)] == CONTINUE_FINAL_MESSAGE_TAG:
            return rendered[:at]
        return rendered[:at].rstrip()  # the template trimmed the message's trailing space

    def __repr__(self) -> str:
        formats = ", ".join(f"{n}: {t.content_format}" for n, t in self._templates.items())
        return f"ChatTemplate({self.origin or 'inline'}; {formats})"
