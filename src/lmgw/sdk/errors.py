"""The gateway's HTTP errors as typed exceptions, shared by :class:`~lmgw.sdk.client.Client` and
the in-process :class:`~lmgw.sdk.inprocess.Gateway`.

Both see the same OpenAI-shaped error body (``{"error": {"message", "type", "param", "code"}}``,
:mod:`lmgw.errors`) with the same status, so both raise the same exception class: code written
against one works against the other. Catch :class:`APIError` for any answer with an error
status, a subclass for one status, :class:`APIConnectionError` for a gateway that could not be
reached or broke the exchange. No trio or anyio import here: ``import lmgw`` stays cheap.
"""

from __future__ import annotations

import msgspec

from ..errors import parse_error_body

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "Conflict",
    "GatewayClosed",
    "GatewayTimeout",
    "InternalServerError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RequestTooLarge",
    "ServiceUnavailable",
    "UnprocessableEntity",
    "error_from_response",
]


class APIError(Exception):
    """An error answer from the gateway (or any OpenAI-compatible server).

    Attributes:
        status: the HTTP status (also for an error event in the middle of a stream, where the
            HTTP status was already 200: then it is the event's ``code``).
        message, type, param, code: the fields of the OpenAI error body.
        request_id: the ``X-Request-Id`` of the answer, when it had one.
    """

    status: int = 0

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: int | str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code if code is not None else status
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        return f"{self.status} {self.type or 'error'}: {self.message}{where}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"


class BadRequest(APIError):
    """400: the request is invalid (``param`` names the field when known)."""


class AuthenticationError(APIError):
    """401: missing or wrong credentials (API key, admin token)."""


class PermissionDenied(APIError):
    """403: not allowed (e.g. the admin API without a configured token)."""


class NotFound(APIError):
    """404: unknown model, worker or route."""


class Conflict(APIError):
    """409: e.g. adding a worker whose id exists."""


class RequestTooLarge(APIError):
    """413: the body is over ``limits.max_body_bytes``."""


class UnprocessableEntity(APIError):
    """422."""


class RateLimited(APIError):
    """429: the gateway's admission queue is full or timed out; retry after ``retry_after`` s."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class InternalServerError(APIError):
    """500: a gateway bug (the gateway logged it)."""


class BadGateway(APIError):
    """502: a worker failed (and retries, if any, did not help)."""


class ServiceUnavailable(APIError):
    """503: no healthy worker, or every worker at its cap (``retry_after`` when given)."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class GatewayTimeout(APIError):
    """504: the request deadline (``limits.request_timeout_s``) or a worker timeout passed."""


class APIConnectionError(Exception):
    """The server could not be reached, or the connection broke before a complete answer."""


class APITimeoutError(APIConnectionError):
    """The client's own ``timeout`` passed (as opposed to a 504 from the gateway)."""


class GatewayClosed(RuntimeError):
    """The in-process gateway stopped (or was never started) while a request needed it."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: RequestTooLarge,
    422: UnprocessableEntity,
    429: RateLimited,
    500: InternalServerError,
    502: BadGateway,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}


class _ErrorFields(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: int | str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorFields


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


def _retry_after(headers: list[tuple[bytes, bytes]] | None) -> float | None:
    for k, v in headers or ():
        if k.lower() == b"retry-after":
            try:
                return float(v)
            except ValueError:
                return None  # an HTTP date: rare from a gateway; not worth parsing
    return None


def _request_id(headers: list[tuple[bytes, bytes]] | None) -> str | None:
    for k, v in headers or ():
        if k.lower() == b"x-request-id":
            return v.decode("latin-1")
    return None


def error_from_payload(
    status: int, fields: _ErrorFields, headers: list[tuple[bytes, bytes]] | None = None
) -> APIError:
    """The exception for a decoded error object (an answer's body or a stream's error event)."""
    cls = _BY_STATUS.get(status, APIError)
    kwargs: dict = {}
    if cls is RateLimited or cls is ServiceUnavailable:
        kwargs["retry_after"] = _retry_after(headers)
    return cls(
        status,
        fields.message or f"HTTP {status}",
        type=fields.type,
        param=fields.param,
        code=fields.code,
        request_id=_request_id(headers),
        **kwargs,
    )


def error_from_response(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> APIError:
    """The exception for an error answer: the OpenAI body when it is one (the gateway's always
    is), else whatever text the server sent (:func:`lmgw.errors.parse_error_body`)."""
    try:
        fields = _decode_error(body).error
    except (
        msgspec.DecodeError,
        UnicodeDecodeError,
    ):  # not the OpenAI shape: SGLang's {"error": "..."}, plain text
        message, etype, param = parse_error_body(body)
        fields = _ErrorFields(message, etype, param)
    return error_from_payload(status, fields, headers)
