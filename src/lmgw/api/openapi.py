"""``GET /openapi.json``: the HTTP API as implemented, in OpenAPI 3.1.

Written by hand next to the handlers it describes (api/openai.py, api/text.py, api/ops.py,
api/admin.py), and kept honest by a schemathesis run against a simulated fleet in the test
suite (tests/fuzz/test_openapi.py): every documented operation is called with generated valid
and invalid input, and the answers must match the status codes and schemas written here.

Request schemas describe what the *gateway* checks (the fields it decodes and bounds, see
``limits.*``); everything else passes through to the engine (``additionalProperties``), which
validates it in turn. Response schemas give the fields clients rely on and allow more (engines
add their own). Streams (``text/event-stream``) are described as text.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from .. import __version__

JSON = "application/json"
SSE = "text/event-stream"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


#: the errors any API operation may answer (server-level ones included: 400 for a malformed
#: request, 408 for a slow one, 413/431 for sizes, 429 for rate limits and admission)
_COMMON_ERRORS = {
    "400": _error("Invalid request (the message names the parameter in `param`)."),
    "401": _error("Missing or invalid API key (`code`: `invalid_api_key`)."),
    "404": _error("Unknown model or route."),
    "405": _error("Method not allowed on this path."),
    "408": _error("The request head or body arrived too slowly."),
    "413": _error("Request body larger than `limits.max_body_bytes`."),
    "429": _error(
        "Rate limit of the API key (`code`: `rate_limit_exceeded`, with `Retry-After`), or the"
        " gateway's admission queue is full, its wait timed out, or the waiter yielded its"
        " place in a full queue (with `Retry-After`)."
    ),
    "431": _error("Request head larger than `limits.max_header_bytes`."),
}
_UPSTREAM_ERRORS = {
    "403": _error(
        "The API key may not use this model (`code`: `model_not_allowed`) or ask for that"
        " `priority` (`code`: `priority_not_allowed`)."
    ),
    "502": _error("A worker failed."),
    "503": _error("No healthy worker for the model, or every one is at its capacity."),
    "504": _error("The request passed `limits.request_timeout_s`, or a worker timed out."),
}

_NON_NEG = {"type": "integer", "minimum": 0}


def _answer(obj: str, choice_required: list[str], choice_fields: dict[str, Any]) -> dict:
    """A non-streamed chat or text completion: the shared envelope around its choices."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": choice_required,
                    "properties": {
                        "index": _NON_NEG,
                        **choice_fields,
                        "finish_reason": {"type": ["string", "null"]},
                    },
                },
            },
            "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
        },
    }


_POS = {"type": "integer", "minimum": 1}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_STREAM_OPTIONS = {
    "type": "object",
    "properties": {
        "include_usage": {"type": ["boolean", "null"]},
        "continuous_usage_stats": {"type": ["boolean", "null"]},
    },
}
_COMMON_FIELDS = {
    "model": {"type": "string", "description": "A served model name or alias."},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        **_STREAM_OPTIONS,
        "description": "Only with `stream: true`.",
    },
    "max_tokens": {**_NON_NEG, "description": "At most `limits.max_output_tokens` when set."},
    "n": {**_POS, "description": "At most `limits.max_n`."},
    "temperature": {"type": ["number", "null"]},
    "top_p": {"type": ["number", "null"]},
    "user": {"type": ["string", "null"]},
    "stop": {**_STOP, "description": "At most `limits.max_stop_sequences` strings."},
    "logit_bias": {
        "type": "object",
        "additionalProperties": {"type": "number"},
        "description": "At most `limits.max_logit_bias` entries.",
    },
    "priority": {
        "type": ["integer", "null"],
        "description": "vLLM's request priority, lower first (default 0): orders the gateway's"
        " admission queue (`limits.queue_policy`) and is passed on to the worker as sent. Not"
        " below the API key's `min_priority` (403 `priority_not_allowed`).",
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
    },
    "Message": {
        "type": "object",
        "description": "A chat message; its content is checked by the engine (media by the"
        " gateway when it preprocesses it).",
        "required": ["role"],
        "additionalProperties": True,
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "null"},
                    {"type": "array", "items": {"type": "object"}},
                ]
            },
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": True,
        "properties": {
            **_COMMON_FIELDS,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": _ref("Message"),
                "description": "At most `limits.max_messages` messages and"
                " `limits.max_content_parts` content parts in all.",
            },
            "max_completion_tokens": _NON_NEG,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": True,
        "properties": {
            **_COMMON_FIELDS,
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                ],
                "description": "A batch: at most `limits.max_choices` prompts x `n`.",
            },
            "best_of": {**_POS, "description": "At most `limits.max_best_of`."},
        },
    },
    "GenerateRequest": {
        "type": "object",
        "description": "SGLang's native request: one of `text`, `input_ids` or `input_embeds`.",
        "additionalProperties": True,
        "anyOf": [
            {"required": ["text"]},
            {"required": ["input_ids"]},
            {"required": ["input_embeds"]},
        ],
        "properties": {
            "model": {"type": "string"},
            "stream": {"type": ["boolean", "null"]},
            "text": {"oneOf": [{"type": "string"}, {"type": "array"}]},
            "input_ids": {"type": "array"},
            "input_embeds": {"type": "array"},
            "sampling_params": {
                "oneOf": [
                    _ref("SamplingParams"),
                    {"type": "array", "items": _ref("SamplingParams")},
                ]
            },
        },
    },
    "SamplingParams": {
        "type": "object",
        "additionalProperties": True,
        "properties": {
            "max_new_tokens": _NON_NEG,
            "n": _POS,
            "stop": _STOP,
            "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": _NON_NEG,
            "completion_tokens": {"type": ["integer", "null"]},
            "total_tokens": _NON_NEG,
        },
    },
    "ChatCompletion": _answer(
        "chat.completion",
        ["index", "message"],
        {
            "message": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string"},
                    "content": {"type": ["string", "null"]},
                    "tool_calls": {"type": ["array", "null"]},
                },
            },
        },
    ),
    "Completion": _answer("text_completion", ["index", "text"], {"text": {"type": "string"}}),
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "root": {"type": ["string", "null"]},
            "parent": {"type": ["string", "null"]},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "models", "workers"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["flow", "ready", "routable_workers"],
                    "properties": {
                        "flow": {"type": "string"},
                        "ready": {"type": "boolean"},
                        "routable_workers": {
                            "type": "object",
                            "additionalProperties": _NON_NEG,
                        },
                    },
                },
            },
            "workers": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "TokenizeRequest": {
        "type": "object",
        "description": "vLLM's: `prompt` (completions) or `messages` (chat), and options.",
        "additionalProperties": True,
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": _ref("Message")},
            "add_special_tokens": {"type": "boolean"},
        },
    },
    "TokenizeResponse": {
        "type": "object",
        "required": ["count", "tokens"],
        "properties": {
            "count": _NON_NEG,
            "max_model_len": {"type": ["integer", "null"]},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "token_strs": {"type": ["array", "null"]},
        },
    },
    "DetokenizeRequest": {
        "type": "object",
        "required": ["tokens"],
        "additionalProperties": True,
        "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "DetokenizeResponse": {
        "type": "object",
        "required": ["prompt"],
        "properties": {"prompt": {"type": "string"}},
    },
    "Worker": {
        "type": "object",
        "required": ["id", "url", "role", "state", "in_flight", "source"],
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "role": {"type": "string"},
            "zone": {"type": ["string", "null"]},
            "state": {"enum": ["starting", "healthy", "draining", "ejected", "gone"]},
            "models": {"type": ["array", "null"], "items": {"type": "string"}},
            "in_flight": _NON_NEG,
            "total_requests": _NON_NEG,
            "last_error": {"type": ["string", "null"]},
            "source": {"type": "string"},
        },
    },
    "Planner": {
        "type": "object",
        "required": ["object", "ttft_slo_s", "itl_slo_s", "window_s", "pools"],
        "properties": {
            "object": {"const": "planner"},
            "ttft_slo_s": {"type": "number"},
            "itl_slo_s": {"type": "number"},
            "window_s": {"type": "number"},
            "pools": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "role",
                        "models",
                        "workers",
                        "desired",
                        "load",
                        "capacity_per_worker",
                        "status",
                    ],
                    "properties": {
                        "role": {"type": "string"},
                        "models": {"type": "string"},
                        "workers": _NON_NEG,
                        "desired": _NON_NEG,
                        "load": {"type": "number"},
                        "capacity_per_worker": {"type": ["integer", "null"]},
                        "status": {"enum": ["ok", "learning", "idle", "overloaded", "unreachable"]},
                        "signals": {"type": "object"},
                    },
                },
            },
        },
    },
    "WorkerList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Worker")},
        },
    },
    "LoraLoad": {
        "type": "object",
        "description": "vLLM's LoadLoRAAdapterRequest, plus `model`: only workers serving that"
        " base model get it.",
        "required": ["lora_name", "lora_path"],
        "properties": {
            "lora_name": {"type": "string", "minLength": 1},
            "lora_path": {"type": "string", "minLength": 1},
            "model": {"type": "string"},
            "load_inplace": {"type": "boolean"},
        },
    },
    "LoraUnload": {
        "type": "object",
        "required": ["lora_name"],
        "properties": {"lora_name": {"type": "string", "minLength": 1}},
    },
    "LoraAdapter": {
        "type": "object",
        "required": ["object", "lora_name", "lora_path", "loaded", "failed"],
        "properties": {
            "object": {"const": "lora_adapter"},
            "lora_name": {"type": "string"},
            "lora_path": {"type": "string"},
            "model": {"type": ["string", "null"]},
            "loaded": {"type": "array", "items": {"type": "string"}},
            "failed": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "LoraAdapterList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("LoraAdapter")},
        },
    },
    "LoraUnloaded": {
        "type": "object",
        "required": ["object", "lora_name", "unloaded", "failed"],
        "properties": {
            "object": {"const": "lora_adapter"},
            "lora_name": {"type": "string"},
            "unloaded": {"type": "array", "items": {"type": "string"}},
            "failed": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "RouteTarget": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "weight": {"type": "number", "minimum": 0, "maximum": 1e9},
        },
    },
    "ModelRouteSet": {
        "type": "object",
        "description": "A `[[model_routes]]` table as JSON, without its name (the path's).",
        "required": ["targets"],
        "properties": {
            "targets": {"type": "array", "minItems": 1, "items": _ref("RouteTarget")},
            "fallbacks": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "split": {"enum": ["request", "session"]},
            "mirror": {"type": ["string", "null"]},
            "mirror_share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "model": {"type": "string"},
        },
    },
    "ModelRoute": {
        "type": "object",
        "required": ["model", "targets", "fallbacks", "split", "requests"],
        "properties": {
            "model": {"type": "string"},
            "targets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["model", "weight", "share"],
                    "properties": {
                        "model": {"type": "string"},
                        "weight": {"type": "number"},
                        "share": {"type": "number"},
                    },
                },
            },
            "fallbacks": {"type": "array", "items": {"type": "string"}},
            "split": {"enum": ["request", "session"]},
            "requests": {"type": "object", "additionalProperties": _NON_NEG},
            "mirror": {"type": ["string", "null"]},
            "mirror_share": {"type": "number"},
            "mirrored": _NON_NEG,
        },
    },
    "ModelRouteList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("ModelRoute")},
        },
    },
    "ModelRouteDeleted": {
        "type": "object",
        "required": ["model", "deleted"],
        "properties": {"model": {"type": "string"}, "deleted": {"const": True}},
    },
    "WorkerConfig": {
        "type": "object",
        "description": "A `[[workers]]` table as JSON (docs/configuration.md).",
        "required": ["url"],
        "properties": {
            "url": {"type": "string"},
            "role": {"type": "string"},
            "id": {"type": "string"},
            "models": {"type": "array", "items": {"type": "string"}},
            "bootstrap_port": {"type": "integer"},
            "kv_address": {"type": "string"},
            "zone": {"type": "string"},
        },
    },
}


def _generation(summary: str, request: str, answer: str) -> dict:
    return {
        "summary": summary,
        "security": [{"apiKey": []}, {}],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": "The answer; a stream of `data:` events with `stream: true`.",
                "content": {JSON: {"schema": _ref(answer)}, SSE: {"schema": {"type": "string"}}},
            },
            **_COMMON_ERRORS,
            **_UPSTREAM_ERRORS,
        },
    }


def _json_op(summary: str, answer: str, *, request: str | None = None, **extra: Any) -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"apiKey": []}, {}],
        "responses": {
            "200": {"description": "OK", "content": {JSON: {"schema": _ref(answer)}}},
            **_COMMON_ERRORS,
            **extra,
        },
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(request)}}}
    return op


def _admin_op(summary: str, answer: str | None, **extra: Any) -> dict:
    responses: dict[str, Any] = {
        "401": _error("Missing or wrong admin token."),
        "403": _error("The admin API is disabled (no `admin.token`)."),
        "404": _error("No such worker."),
        "405": _error("Method not allowed on this path."),
        "400": _error("Invalid request."),
        "413": _error("Request body too large."),
        "431": _error("Request head too large."),
        **extra,
    }
    if answer is not None:
        responses.setdefault(
            "200", {"description": "OK", "content": {JSON: {"schema": _ref(answer)}}}
        )
    return {"summary": summary, "security": [{"adminToken": []}], "responses": responses}


_LORA_ERRORS = {
    "404": _error("No such adapter (managed by the gateway)."),
    "409": _error("The adapter is loaded from another path (use load_inplace)."),
    "502": _error("No worker loaded the adapter (each worker's reason in the message)."),
    "503": _error("No healthy worker that can take it."),
}


def _lora_paths() -> dict[str, Any]:
    """The LoRA adapter routes (api/lora.py): the admin API's, and vLLM's own two."""

    def body(schema: str) -> dict[str, Any]:
        return {"required": True, "content": {JSON: {"schema": _ref(schema)}}}

    load = {
        **_admin_op("Load a LoRA adapter on every worker of its base model.", "LoraAdapter",
                    **_LORA_ERRORS),
        "requestBody": body("LoraLoad"),
    }  # fmt: skip
    unload = {
        **_admin_op("Unload a LoRA adapter everywhere.", "LoraUnloaded", **_LORA_ERRORS),
        "requestBody": body("LoraUnload"),
    }
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
        "description": "The adapter's name, percent-encoded.",
    }
    return {
        "/admin/lora_adapters": {
            "get": _admin_op("The LoRA adapters loaded through the gateway.", "LoraAdapterList"),
            "post": load,
        },
        "/admin/lora_adapters/{name}": {
            "parameters": [name],
            "get": _admin_op("One adapter.", "LoraAdapter", **_LORA_ERRORS),
            "delete": _admin_op("Unload it everywhere.", "LoraUnloaded", **_LORA_ERRORS),
        },
        "/v1/load_lora_adapter": {"post": load},
        "/v1/unload_lora_adapter": {"post": unload},
    }


def _batch_paths() -> dict[str, Any]:
    """OpenAI's Files and Batch APIs (api/batches.py)."""
    file_obj = {
        "type": "object",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "file"},
            "bytes": _NON_NEG,
            "created_at": _NON_NEG,
            "expires_at": _NON_NEG,
            "filename": {"type": "string"},
            "purpose": {"enum": ["batch", "batch_output"]},
            "status": {"type": "string"},
        },
    }
    batch_obj = {
        "type": "object",
        "required": ["id", "object", "endpoint", "status", "input_file_id", "request_counts"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "batch"},
            "endpoint": {"type": "string"},
            "status": {
                "enum": [
                    "validating",
                    "in_progress",
                    "finalizing",
                    "completed",
                    "failed",
                    "expired",
                    "cancelling",
                    "cancelled",
                ],
            },
            "input_file_id": {"type": "string"},
            "output_file_id": {"type": ["string", "null"]},
            "error_file_id": {"type": ["string", "null"]},
            "request_counts": {"type": "object"},
        },
    }

    def listing(item: dict) -> dict:
        return {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item}},
        }

    def op(summary: str, answer: dict, *, body: dict | None = None, **extra: Any) -> dict:
        o: dict[str, Any] = {
            "summary": summary,
            "security": [{"apiKey": []}, {}],
            "responses": {
                "200": {"description": "OK", "content": {JSON: {"schema": answer}}},
                **_COMMON_ERRORS,
                **extra,
            },
        }
        if body is not None:
            o["requestBody"] = {"required": True, "content": body}
        return o

    def path_id(name: str) -> dict:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

    upload = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"const": "batch"},
                },
            }
        }
    }
    create = {
        JSON: {
            "schema": {
                "type": "object",
                "required": ["input_file_id", "endpoint"],
                "properties": {
                    "input_file_id": {"type": "string"},
                    "endpoint": {
                        "enum": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
                    },
                    "completion_window": {"const": "24h"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        }
    }
    content = op("A file's bytes.", {"type": "string"})
    content["responses"]["200"]["content"] = {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    deleted = {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "file"},
            "deleted": {"const": True},
        },
    }
    full = {"507": _error("The gateway's file store is full (batches.max_total_bytes).")}
    return {
        "/v1/files": {
            "get": op("The key's files.", listing(file_obj)),
            "post": op("Upload a batch input file (JSONL).", file_obj, body=upload, **full),
        },
        "/v1/files/{file_id}": {
            "parameters": [path_id("file_id")],
            "get": op("A file.", file_obj),
            "delete": op("Delete a file.", deleted),
        },
        "/v1/files/{file_id}/content": {"parameters": [path_id("file_id")], "get": content},
        "/v1/batches": {
            "get": op("The key's batches, newest first.", listing(batch_obj)),
            "post": op(
                "Run a file of requests on the fleet.",
                batch_obj,
                body=create,
                **{"503": _error("The batch service is not running.")},
            ),
        },
        "/v1/batches/{batch_id}": {
            "parameters": [path_id("batch_id")],
            "get": op("A batch.", batch_obj),
        },
        "/v1/batches/{batch_id}/cancel": {
            "parameters": [path_id("batch_id")],
            "post": op("Cancel a batch (its answers so far are kept).", batch_obj),
        },
    }


def _model_route_paths() -> dict[str, Any]:
    """The model routes' admin API (api/model_routes.py)."""
    missing = {"404": _error("No such model route.")}
    put = {
        **_admin_op(
            "Add or replace a model route (at once: the next request follows it).",
            "ModelRoute",
            **{
                "201": {"description": "Created", "content": {JSON: {"schema": _ref("ModelRoute")}}}
            },
        ),
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("ModelRouteSet")}}},
    }
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
        "description": "The name clients send, percent-encoded.",
    }
    return {
        "/admin/model_routes": {
            "get": _admin_op("The model routes: targets, shares, fallbacks.", "ModelRouteList"),
        },
        "/admin/model_routes/{name}": {
            "parameters": [name],
            "get": _admin_op("One model route.", "ModelRoute", **missing),
            "put": put,
            "delete": _admin_op("Remove it.", "ModelRouteDeleted", **missing),
        },
    }


_WORKER_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "description": "The worker's id, percent-encoded.",
}


def _dashboard_op(summary: str, content: dict, **extra: Any) -> dict:
    return {
        "summary": summary,
        "security": [{"adminToken": []}, {}],
        "responses": {
            "200": {"description": "OK", "content": content},
            "401": _error("`admin.token` is set and was not presented."),
            "405": _error("Method not allowed on this path."),
            **extra,
        },
    }


def _dashboard_paths() -> dict[str, Any]:
    """``/dashboard...`` (lmgw/dashboard: served when ``dashboard.enabled``; guarded by
    ``admin.token`` when one is set, never by an API key)."""
    from ..dashboard import PREFIX, load_assets

    html = {"text/html": {"schema": {"type": "string"}}}
    page = _dashboard_op(
        "The live dashboard page.",
        html,
        **{"303": {"description": "`?token=` accepted: a cookie is set, back to the bare URL."}},
    )
    page["parameters"] = [
        {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
    ]
    paths: dict[str, Any] = {
        PREFIX: {"get": page},
        PREFIX + "/": {"get": page},
        PREFIX + "/snapshot": {
            "get": _dashboard_op(
                "One snapshot of the dashboard's data.", {JSON: {"schema": {"type": "object"}}}
            )
        },
        PREFIX + "/ws": {
            "get": _dashboard_op(
                "The dashboard's WebSocket feed (hypercorn); plain HTTP gets an explanation.",
                {JSON: {"schema": {"type": "object"}}},
                **{"426": _error("A WebSocket upgrade is required.")},
            )
        },
    }
    for name in sorted(load_assets()):
        paths[f"{PREFIX}/static/{name}"] = {
            "get": _dashboard_op(
                f"A file of the page ({name}).", {"*/*": {"schema": {"type": "string"}}}
            )
        }
    return paths


_PASS_REQUEST = {
    "type": "object",
    "description": "Relayed to a merged worker as sent (the engine checks the rest); the"
    " gateway reads `model` (a served name or alias) and `stream`.",
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string"},
        "stream": {"type": ["boolean", "null"]},
        "user": {"type": ["string", "null"]},
    },
}
_ANY_JSON = {"type": "object"}
_STORED_ERRORS = {
    "404": _error("Unknown response id, or its worker left the fleet (the response is gone)."),
    "409": _error("The response's worker is draining: it takes no new turn."),
    "503": _error("The response's worker is out of rotation for now (ejected); retry later."),
}


def _pass_op(
    summary: str, answer: dict, *, streams: bool = False, form: bool = False, stored: bool = False
) -> dict:
    """A pass-through operation (api/passthru.py): merged workers only."""
    content: dict[str, Any] = {JSON: {"schema": answer}}
    if streams:
        content[SSE] = {"schema": {"type": "string"}}
    if form:
        body = {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string"},
                        "stream": {"type": "string", "enum": ["true", "false"]},
                    },
                }
            }
        }
    else:
        body = {JSON: {"schema": _PASS_REQUEST}}
    return {
        "summary": summary,
        "description": "Relayed to a merged (`pd`) worker of the model; a model whose flow"
        " is disaggregated and has no merged worker answers 400.",
        "security": [{"apiKey": []}, {}],
        "requestBody": {"required": True, "content": body},
        "responses": {
            "200": {"description": "The engine's answer.", "content": content},
            **_COMMON_ERRORS,
            **_UPSTREAM_ERRORS,
            **(_STORED_ERRORS if stored else {}),
        },
    }


def _response_id_op(summary: str, streams: bool) -> dict:
    op = _pass_op(summary, _ANY_JSON, streams=streams, stored=True)
    del op["requestBody"]
    op["description"] = "Sent to the worker that stored the response (response affinity)."
    op["parameters"] = [
        {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    if streams:
        op["parameters"] += [
            {"name": "stream", "in": "query", "required": False, "schema": {"type": "boolean"}},
            {
                "name": "starting_after",
                "in": "query",
                "required": False,
                "schema": {"type": "integer"},
            },
        ]
    return op


def _passthru_paths() -> dict[str, Any]:
    """vLLM's non-generation routes, relayed (api/passthru.py)."""
    listing = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
    }
    pooling = _pass_op("Pooling (vLLM's /pooling).", listing)
    score = _pass_op("Scores of text pairs (vLLM).", listing)
    rerank = _pass_op("Documents ranked by relevance (Jina/Cohere style).", _ANY_JSON)
    messages = _pass_op(
        "Anthropic Messages (`event:` streams relayed as sent).", _ANY_JSON, streams=True
    )
    audio = _pass_op("Speech to text (multipart form; routed by its `model`).", _ANY_JSON)
    audio["responses"]["200"]["content"]["text/plain"] = {"schema": {"type": "string"}}
    audio["responses"]["200"]["content"][SSE] = {"schema": {"type": "string"}}
    return {
        "/v1/embeddings": {"post": _pass_op("Embeddings.", listing)},
        "/v2/embed": {"post": _pass_op("Embeddings, Cohere's shape.", _ANY_JSON)},
        "/pooling": {"post": pooling},
        "/classify": {"post": _pass_op("Classification (vLLM).", listing)},
        "/score": {"post": score},
        "/v1/score": {"post": score},
        "/rerank": {"post": rerank},
        "/v1/rerank": {"post": rerank},
        "/v2/rerank": {"post": rerank},
        "/v1/messages": {"post": messages},
        "/v1/messages/count_tokens": {"post": _pass_op("Anthropic token count.", _ANY_JSON)},
        "/v1/chat/completions/batch": {
            "post": _pass_op("Several chats in one request (vLLM; no streaming).", _ANY_JSON)
        },
        "/v1/audio/transcriptions": {"post": audio},
        "/v1/audio/translations": {"post": audio},
        "/v1/responses": {
            "post": _pass_op(
                "Responses API; previous_response_id goes to the worker that stored it.",
                _ANY_JSON,
                streams=True,
                stored=True,
            )
        },
        "/v1/responses/{response_id}": {"get": _response_id_op("A stored response.", True)},
        "/v1/responses/{response_id}/cancel": {
            "post": _response_id_op("Cancel a background response.", False)
        },
        "/version": {
            "get": {
                "summary": "The gateway's version and each HTTP worker's (null: no answer).",
                "security": [{"apiKey": []}, {}],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["version", "server", "workers"],
                                    "properties": {
                                        "version": {"type": "string"},
                                        "server": {"const": "lmgw"},
                                        "workers": {
                                            "type": "object",
                                            "additionalProperties": {"type": ["string", "null"]},
                                        },
                                    },
                                }
                            }
                        },
                    },
                    **_COMMON_ERRORS,
                },
            }
        },
    }


def build_spec() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict)."""
    admin_delete = _admin_op("Remove a worker (drained first with `grace_s`).", "Worker")
    admin_delete["parameters"] = [
        {
            "name": "grace_s",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "minimum": 0},
        }
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lmgw",
            "version": __version__,
            "description": "OpenAI-compatible gateway for disaggregated LLM serving. Errors are"
            ' `{"error": {"message", "type", "param", "code"}}`.',
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A client API key (`auth.*`); not needed when none is"
                    " configured.",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin API's own token (`admin.token`).",
                },
            },
        },
        "paths": {
            "/v1/chat/completions": {
                "post": _generation("Chat completion.", "ChatCompletionRequest", "ChatCompletion")
            },
            "/v1/completions": {
                "post": _generation("Text completion.", "CompletionRequest", "Completion")
            },
            "/generate": {
                "post": {
                    **_generation(
                        "SGLang's native generation, relayed.", "GenerateRequest", "Error"
                    ),
                    "responses": {
                        "200": {
                            "description": "The engine's answer (SGLang's shape), or a stream.",
                            "content": {JSON: {"schema": {}}, SSE: {"schema": {"type": "string"}}},
                        },
                        **_COMMON_ERRORS,
                        **_UPSTREAM_ERRORS,
                    },
                }
            },
            "/v1/models": {"get": _json_op("The models served.", "ModelList")},
            "/v1/models/{model}": {
                "get": {
                    **_json_op("One model.", "Model"),
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                }
            },
            "/tokenize": {
                "post": _json_op(
                    "Tokenize a prompt or chat (vLLM's shape).",
                    "TokenizeResponse",
                    request="TokenizeRequest",
                    **_UPSTREAM_ERRORS,
                )
            },
            "/detokenize": {
                "post": _json_op(
                    "Token ids back to text (vLLM's shape).",
                    "DetokenizeResponse",
                    request="DetokenizeRequest",
                    **_UPSTREAM_ERRORS,
                )
            },
            "/health": {
                "get": {
                    "summary": "Routable workers per model and role (no key needed).",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Every model can be served.",
                            "content": {JSON: {"schema": _ref("Health")}},
                        },
                        "503": {
                            "description": "Some model cannot be served.",
                            "content": {JSON: {"schema": _ref("Health")}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (no key needed).",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Text exposition format 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document (no key needed).",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            **_passthru_paths(),
            **_dashboard_paths(),
            "/admin/workers": {
                "get": _admin_op("List the workers.", "WorkerList"),
                "post": {
                    **_admin_op(
                        "Add a worker.",
                        None,
                        **{
                            "201": {
                                "description": "Added.",
                                "content": {JSON: {"schema": _ref("Worker")}},
                            },
                            "409": _error("A worker with this id exists."),
                        },
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {JSON: {"schema": _ref("WorkerConfig")}},
                    },
                },
            },
            "/admin/workers/{id}": {
                "parameters": [_WORKER_ID],
                "get": _admin_op("One worker.", "Worker"),
                "delete": admin_delete,
            },
            "/admin/workers/{id}/drain": {
                "parameters": [_WORKER_ID],
                "post": _admin_op("Stop sending it new requests.", "Worker"),
            },
            "/admin/workers/{id}/undrain": {
                "parameters": [_WORKER_ID],
                "post": _admin_op("Route to it again (after one probe).", "Worker"),
            },
            "/admin/planner": {
                "get": _admin_op(
                    "The recommended worker count of each role, learned from the observed"
                    " latencies and loads (404 when planner.enabled is false).",
                    "Planner",
                    **{"404": _error("The planner is off.")},
                ),
            },
            **_lora_paths(),
            **_model_route_paths(),
            **_batch_paths(),
        },
    }


@cache
def spec_bytes() -> bytes:
    """The document as JSON, encoded once."""
    return msgspec.json.encode(build_spec())


async def openapi_json(req: Any, responder: Any) -> None:
    """``GET /openapi.json``."""
    await responder.send_full(200, [(b"content-type", JSON.encode())], spec_bytes())
