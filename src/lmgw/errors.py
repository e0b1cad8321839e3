"""OpenAI-shaped errors: one exception type that carries its HTTP status, and its wire body.

Every layer raises :class:`GatewayError` (or lets the server map a protocol error); only the edge
turns it into ``{"error": {"message", "type", "param", "code"}}``. ``code`` repeats the status, as
vLLM does, so clients that switch on either field keep working.
"""

from __future__ import annotations

import msgspec

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
    status: int, message: str, *, param: str | None = None, type: str | None = None
) -> bytes:
    """The JSON body for an error response (also used as an SSE ``data:`` payload)."""
    etype = type or ERROR_TYPES.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )
    return _encode({"error": {"message": message, "type": etype, "param": param, "code": status}})


def sse_error_event(status: int, message: str, *, type: str | None = None) -> bytes:
    """A mid-stream error as vLLM sends it: an error event, then the usual terminator."""
    return b"data: " + error_body(status, message, type=type) + b"\n\ndata: [DONE]\n\n"
