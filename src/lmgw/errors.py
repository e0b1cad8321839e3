"""OpenAI-shaped errors: one exception type that carries its HTTP status, and its wire body.

Every layer raises :class:`GatewayError` (or lets the server map a protocol error); only the edge
turns it into ``{"error": {"message", "type", "param", "code"}}``. ``code`` repeats the status, as
vLLM does, so clients that switch on either field keep working.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: what decoding untrusted JSON (or msgpack) may raise besides success: malformed or mistyped
#: input (``DecodeError``, ``ValidationError`` being one), bad UTF-8, and nesting past the
#: decoder's limit (about 1,000 levels), which msgspec raises as ``RecursionError``
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class GatewayError(Exception):
    """An error with a status and an OpenAI error body. ``param`` names the offending field."""

    #: the workers of a failed attempt that ``Pipeline.dispatch`` hands back for a retry (a
    #: hedged attempt may have had two): the retry goes to none of them
    workers: tuple[Any, ...] = ()
    #: for such a retry: whether the failed attempt's request reached its worker (it may have
    #: acted on it: a decode that pulled a hand-off's KV); assumed so unless known otherwise
    delivered: bool = True

    def __init__(
        self, status: int, message: str, *, param: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ERROR_TYPES.get(
            status, "InternalServerError" if status >= 500 else "BadRequestError"
        )

    def body(self) -> bytes:
        return error_body(self.status, self.message, param=self.param, type=self.type)

    def payload(self) -> dict:
        return {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }


_encode = msgspec.json.encode


def error_body(
    status: int,
    message: str,
    *,
    param: str | None = None,
    type: str | None = None,
    code: str | int | None = None,
) -> bytes:
    """The JSON body for an error response (also used as an SSE ``data:`` payload). ``code``
    defaults to the status (vLLM's habit); auth errors pass OpenAI's strings
    (``invalid_api_key``, ``rate_limit_exceeded``)."""
    etype = type or ERROR_TYPES.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )
    return _encode(
        {
            "error": {
                "message": message,
                "type": etype,
                "param": param,
                "code": status if code is None else code,
            }
        }
    )


def parse_error_body(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, param) of an engine's error body: vLLM's ``{"error": {...}}``, the older
    flat vLLM object, SGLang's ``{"error": "text"}``, or plain text. The message is never empty
    unless the body is."""
    message, etype, param = "", None, None
    try:
        obj = msgspec.json.decode(body)
    except DECODE_ERRORS:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            etype = err.get("type") if isinstance(err.get("type"), str) else None
            param = err.get("param") if isinstance(err.get("param"), str) else None
        elif isinstance(err, str):
            message = err
    if not message:
        message = body[:500].decode("utf-8", "replace").strip()
    return message, etype, param


def sse_error_event(status: int, message: str, *, type: str | None = None) -> bytes:
    """A mid-stream error as vLLM sends it: an error event, then the usual terminator."""
    return b"data: " + error_body(status, message, type=type) + b"\n\ndata: [DONE]\n\n"
