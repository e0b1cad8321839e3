"""The internal request: what the pipeline needs to run one client request through the stages.

Built by ``api/`` from the HTTP request without re-encoding the body: the original bytes are
forwarded, so engine-specific fields the gateway does not know pass through untouched.
"""

from __future__ import annotations

from ..http.types import Headers


class GatewayRequest:
    __slots__ = (
        "body",
        "endpoint",
        "forward_headers",
        "model",
        "path",
        "request_id",
        "stream",
        "t_start",
        "timings",
    )

    def __init__(
        self,
        endpoint: str,
        path: str,
        model: str,
        stream: bool,
        body: bytes,
        request_id: str,
        forward_headers: Headers,
        t_start: float,
    ) -> None:
        #: "chat" or "completions" (metrics label, flow selection)
        self.endpoint = endpoint
        #: upstream path, e.g. "/v1/chat/completions"
        self.path = path
        self.model = model
        self.stream = stream
        self.body = body
        self.request_id = request_id
        #: headers every stage request carries (x-request-id, auth, tracing)
        self.forward_headers = forward_headers
        self.t_start = t_start
        #: (stage, seconds) of the legs run before the client-facing one: multi-stage flows
        #: only; reported in the response's Server-Timing header
        self.timings: list[tuple[str, float]] | None = None

    def server_timing(self) -> bytes:
        """``Server-Timing`` value: one ``stage;dur=<ms>`` entry per leg, in order."""
        return ", ".join(f"{s};dur={1000 * d:.1f}" for s, d in self.timings or ()).encode()

    def __repr__(self) -> str:
        return (
            f"<GatewayRequest {self.request_id} {self.endpoint} model={self.model}"
            f" stream={self.stream}>"
        )
