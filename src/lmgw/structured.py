"""Structured outputs: the request fields that constrain a model's output, read into one
:class:`~lmgw.protocol.StructuredOutput`, as vLLM's OpenAI layer reads them (sans-IO).

Why the gateway reads them: a native (ZeroMQ) worker gets token ids and sampling settings, not
the OpenAI body, so what vLLM's server would turn into ``StructuredOutputsParams`` the gateway
must turn into :class:`StructuredOutput` itself; left in ``extra``, vLLM would ignore it and
answer free text where the client asked for JSON. The simulators read the same fields through
this module, so they constrain what a real worker constrains.

Sources, one constraint per request (vLLM's rule), else a 400:

- ``response_format``: ``text`` (none), ``json_object``, ``json_schema`` (its ``schema``),
  ``structural_tag`` (the object itself, as JSON text);
- ``structured_outputs``: vLLM's object (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, ``structural_tag`` and the options of :data:`STRUCTURED_OPTIONS`);
- the older vLLM fields ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  and ``guided_whitespace_pattern``;
- a chat request's forced tool choice (:func:`forced_tool_schema`): ``tool_choice: "required"``
  or a named function. Its schema replaces a ``json``/``json_object`` constraint, as vLLM's
  does, and the answer's text becomes ``tool_calls`` (``lmgw.tools.parsers.forced``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import DECODE_ERRORS
from .protocol.messages import STRUCTURED_KINDS, STRUCTURED_OPTIONS, StructuredOutput

__all__ = [
    "StructuredOutputError",
    "forced_tool",
    "forced_tool_schema",
    "structured_output",
]

_LEGACY = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
#: body keys this module reads (not passed on as engine-specific extras)
FIELDS = frozenset(
    {"response_format", "structured_outputs", "guided_whitespace_pattern",
     "guided_decoding_backend", *_LEGACY}
)  # fmt: skip


class StructuredOutputError(ValueError):
    """A constraint the request states wrongly: its message and the field (``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def forced_tool(obj: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """A chat request's forced tool choice: ``("required", None)``, ``("named", name)``, or
    None (``auto``, ``none``, or no tools). Raises StructuredOutputError when ``tool_choice``
    forces a call without ``tools``, names a function that is not among them, or has a shape
    OpenAI does not define (vLLM's checks and messages)."""
    choice = obj.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return None
    tools = obj.get("tools")
    if choice == "required":
        named: str | None = None
    elif isinstance(choice, dict):
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(named, str) or not named:
            raise StructuredOutputError(
                "tool_choice.function.name must be a non-empty string", "tool_choice"
            )
    else:
        raise StructuredOutputError(
            "tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice"
        )
    if not isinstance(tools, list) or not tools:
        raise StructuredOutputError("When using `tool_choice`, `tools` must be set.", "tools")
    if named is None:
        return ("required", None)
    if not any(_function(t).get("name") == named for t in tools):
        raise StructuredOutputError(
            f"Tool '{named}' has not been passed in `tools`.", "tool_choice"
        )
    return ("named", named)


def forced_tool_schema(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a forced tool choice constrains the output to, as vLLM builds it: a
    named function's ``parameters``; for ``required``, an array (at least one item, at most
    one when ``parallel_tool_calls`` is false) of ``{"name", "parameters"}`` objects, one
    alternative per tool, with the tools' ``$defs`` merged at the top. None when no tool
    choice is forced."""
    forced = forced_tool(obj)
    if forced is None:
        return None
    tools = [_function(t) for t in obj["tools"]]
    if forced[0] == "named":
        fn = next(f for f in tools if f.get("name") == forced[1])
        return _parameters(fn)
    defs: dict[str, Any] = {}
    alternatives = []
    for fn in tools:
        params = _parameters(fn)
        if isinstance(params.get("$defs"), dict):
            params = dict(params)
            defs.update(params.pop("$defs"))
        alternatives.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [fn.get("name")]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": alternatives},
    }
    if obj.get("parallel_tool_calls") is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def structured_output(
    endpoint: str, obj: Mapping[str, Any], *, tools: bool = True
) -> StructuredOutput | None:
    """The one constraint a chat (``endpoint="chat"``) or completions body states, or None.
    ``tools=False`` leaves a forced tool choice out (a worker that writes calls as text).

    Raises:
        StructuredOutputError: a malformed source, or more than one kind of constraint.
    """
    found: dict[str, Any] = {}  # kind -> spec
    options: dict[str, Any] = {}
    rf = obj.get("response_format")
    if rf is not None:
        _from_response_format(rf, found)
    so = obj.get("structured_outputs")
    if so is not None:
        _from_vllm(so, found, options)
    for key, kind in _LEGACY.items():
        value = obj.get(key)
        if value is not None:
            _add(found, kind, _spec(kind, value, key), key)
    ws = obj.get("guided_whitespace_pattern")
    if ws is not None:
        if not isinstance(ws, str):
            raise StructuredOutputError(
                "guided_whitespace_pattern must be a string", "guided_whitespace_pattern"
            )
        options["whitespace_pattern"] = ws
    if endpoint == "chat" and tools:
        tool_schema = forced_tool_schema(obj)
        if tool_schema is not None:  # vLLM: the tools' schema replaces a json constraint
            found.pop("json", None)
            found.pop("json_object", None)
            found["json"] = tool_schema
    if not found:
        return None
    if len(found) > 1:
        raise StructuredOutputError(
            "You can only use one kind of structured outputs constraint but multiple are"
            f" specified: {', '.join(sorted(found))}",
            "structured_outputs",
        )
    ((kind, spec),) = found.items()
    return StructuredOutput(kind, spec, options or None)


# -- sources ------------------------------------------------------------------------------------


def _from_response_format(rf: Any, found: dict[str, Any]) -> None:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        _add(found, "json_object", None, "response_format")
    elif kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise StructuredOutputError(
                "response_format.json_schema.schema must be a JSON schema object",
                "response_format",
            )
        _add(found, "json", schema, "response_format")
    elif kind == "structural_tag":
        _add(found, "structural_tag", msgspec.json.encode(rf).decode(), "response_format")
    else:
        raise StructuredOutputError(
            "response_format.type must be 'text', 'json_object', 'json_schema' or 'structural_tag'",
            "response_format",
        )


def _from_vllm(so: Any, found: dict[str, Any], options: dict[str, Any]) -> None:
    if not isinstance(so, dict):
        raise StructuredOutputError("structured_outputs must be an object", "structured_outputs")
    for key, value in so.items():
        if value is None:
            continue
        if key in STRUCTURED_OPTIONS:
            options[key] = value
        elif key == "json_object":
            if value is True:
                _add(found, "json_object", None, "structured_outputs")
            elif value is not False:
                raise StructuredOutputError(
                    "structured_outputs.json_object must be a boolean", "structured_outputs"
                )
        elif key in STRUCTURED_KINDS:
            _add(found, key, _spec(key, value, "structured_outputs"), "structured_outputs")
        elif key not in ("backend", "backend_was_auto", "_backend", "_backend_was_auto"):
            raise StructuredOutputError(
                f"structured_outputs has no field {key!r}", "structured_outputs"
            )
    ws = options.get("whitespace_pattern")
    if ws is not None and not isinstance(ws, str):
        raise StructuredOutputError(
            "structured_outputs.whitespace_pattern must be a string", "structured_outputs"
        )


def _spec(kind: str, value: Any, param: str) -> Any:
    """A source's value as the spec of ``kind`` (a schema given as JSON text is parsed)."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = msgspec.json.decode(value)
            except DECODE_ERRORS:
                raise StructuredOutputError(f"{param}: the JSON schema is not valid JSON",
                                            param) from None  # fmt: skip
        if not isinstance(value, dict):
            raise StructuredOutputError(f"{param}: the JSON schema must be an object", param)
        return value
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise StructuredOutputError(f"{param}: choice must be a non-empty list of strings",
                                        param)  # fmt: skip
        return value
    if kind == "structural_tag" and isinstance(value, dict):
        return msgspec.json.encode(value).decode()
    if not (isinstance(value, str) and value):
        raise StructuredOutputError(f"{param}: {kind} must be a non-empty string", param)
    return value


def _add(found: dict[str, Any], kind: str, spec: Any, param: str) -> None:
    if kind in found and found[kind] != spec:
        raise StructuredOutputError(f"{param}: a second, different {kind} constraint", param)
    found[kind] = spec


def _function(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return fn if isinstance(fn, dict) else {}


def _parameters(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}
