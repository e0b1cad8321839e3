"""The internal request: what the pipeline needs to run one client request through the stages.

Built by ``api/`` from the HTTP request without re-encoding the body: the original bytes are
forwarded, so engine-specific fields the gateway does not know pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from ..errors import GatewayError
from ..http.types import Headers


class MidStream(GatewayError):
    """The worker's stream broke after its head reached the client (``Pipeline.dispatch``
    with a journal): the caller continues it elsewhere or ends it."""


class Rewrite(NamedTuple):
    """Edits of the client-facing answer that a dialect needs (SGLang's logprob merge):
    ``body`` for a whole JSON answer, ``events`` for each group of complete SSE events."""

    body: Callable[[bytes], bytes]
    events: Callable[[bytes], bytes]


#: awaited before the client-facing answer is relayed; says how to rewrite it (None: as is)
Gate = Callable[[], Awaitable[Rewrite | None]]


class GatewayRequest:
    #: pass-through endpoints (:class:`PassThroughRequest`): merged workers only, whatever the
    #: model's flow. Class-level defaults, so a generation request pays nothing to set them.
    merged_only: bool = False
    #: given the chosen worker once its answer begins, the read-only taps to run on that answer
    #: (the Responses API's id -> worker record); None: nothing taps it
    tap: Callable[[Any], Rewrite | None] | None = None

    __slots__ = (
        "body",
        "endpoint",
        "forward_headers",
        "media",
        "model",
        "obj",
        "output",
        "path",
        "prompt_ids",
        "request_id",
        "route",
        "stream",
        "t_start",
        "timings",
        "trace",
        "usage_fill",
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
        #: "chat", "completions", "generate" or a pass-through endpoint (metrics label)
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
        #: the checked and hashed media items (lmgw.multimodal.MediaItem), when the gateway
        #: preprocessed them (media.preprocess); the body then pins each by ``uuid``
        self.media: list | None = None
        #: the routing keys (prompt tokens or bytes, session) when a policy uses them; else the
        #: pipeline builds a bare RouteContext
        self.route: Any = None
        #: the tool-call/reasoning parsing of the answer (tools.relay.OutputRewriter) or None
        self.output: Any = None
        #: adds ``usage`` to a non-streamed answer that lacks it (text.service.fill_usage)
        self.usage_fill: Callable[[bytes], bytes] | None = None
        #: the body as the API decoded it (same content as ``body``), or None when it relayed
        #: the bytes undecoded; lets a stage that needs the object skip a second decode
        self.obj: dict[str, Any] | None = None
        #: the prompt's token ids when the API tokenized it (context check): the native
        #: pipeline reuses them instead of rendering and tokenizing again
        self.prompt_ids: list[int] | None = None
        #: the request's span (lmgw.tracing.RequestTrace) when tracing is on, else None
        self.trace: Any = None

    def server_timing(self) -> bytes:
        """``Server-Timing`` value: one ``stage;dur=<ms>`` entry per leg, in order."""
        return ", ".join(f"{s};dur={1000 * d:.1f}" for s, d in self.timings or ()).encode()

    def __repr__(self) -> str:
        return (
            f"<GatewayRequest {self.request_id} {self.endpoint} model={self.model}"
            f" stream={self.stream}>"
        )


class PassThroughRequest(GatewayRequest):
    """A pass-through endpoint's request (embeddings, the Responses API, ...: api/passthru.py):
    it runs on merged workers only (a disaggregated flow's legs serve generation), and may tap
    the answer."""

    __slots__ = ("merged_only", "tap")

    def __init__(self, *args: Any, tap: Callable[[Any], Rewrite | None] | None = None) -> None:
        super().__init__(*args)
        self.merged_only = True
        self.tap = tap
