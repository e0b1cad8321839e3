"""SSE keep-alives while a streamed request waits for its first event (``limits.
sse_keepalive_s``; ANCHORS.md §5.13).

Why: a streamed request can wait long before its first token: in the admission queue, in an
engine's queue, or in the prefill of a long context (minutes at 100k+ tokens). Load balancers
and proxies cut connections idle for 60-100 s, and the client sees a reset instead of its
answer. With keep-alives on, a stream with nothing to say after ``sse_keepalive_s`` commits to
its ``200`` and event-stream head and sends an SSE comment (``: keep-alive``, which clients
ignore) every ``sse_keepalive_s`` until its first event.

The first *event*, not the worker's head: vLLM's server (uvicorn) writes a stream's head as
soon as the request is accepted, before it queues and prefills, so a beat that stopped at the
head would stop before the wait it is for. A successful event-stream head from the pipeline
goes to the client (unless a comment sent one already) and the comments go on until the first
event.

How: :class:`KeepAliveResponder` wraps the client's responder for the request. To the
pipeline it looks unstarted until the pipeline itself writes content (so retries on another
worker and error answers work as without it); a whole answer (``send_full``) arriving after
the head went out becomes its body as an SSE error event (an error: a streamed request's
success is a stream) and the end of the stream. The beat runs in the request's own nursery;
the first real write waits for a comment in flight (one lock, taken once), so the two never
interleave on the wire. The compiled lane (``lmgw._fast.relay``) beats the same way, with the
same bytes (:func:`committed_answer` for a whole answer after the head).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

from ..errors import parse_error_body, sse_error_event
from ..http.types import Headers, Request, Responder
from ..transport.openai_http import SSE_HEADERS
from ..transport.sse import KEEPALIVE


def committed_answer(status: int, body: bytes) -> bytes:
    """The SSE error event that stands for a whole answer (``status``, ``body``) to a stream
    whose 200 head went out with a keep-alive."""
    message, etype, _ = parse_error_body(body)
    return sse_error_event(status, message or f"error {status}", type=etype)


def _event_stream(status: int, headers: Headers) -> bool:
    """Whether a head is a successful stream's (a 2xx ``text/event-stream``)."""
    if not 200 <= status < 300:
        return False
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.lower().startswith(b"text/event-stream")
    return False


class KeepAliveResponder:
    """The client's responder, with keep-alive comments until the pipeline's first write."""

    __slots__ = ("_counted", "_head_sent", "_inner", "_lock", "_request_id", "content")

    def __init__(
        self,
        inner: Responder,
        request_id: str,
        *,
        head_sent: bool = False,
        counted: Callable[[], None] | None = None,
    ) -> None:
        """``head_sent``: the 200 and event-stream head reached the client already (the
        compiled lane's keep-alives, for a request it hands over); ``counted()`` after each
        comment (``lmgw_sse_keepalives_total``)."""
        self._inner = inner
        self._request_id = request_id
        self._counted = counted
        self._lock = trio.Lock()
        self._head_sent = head_sent  # the status is 200 now, whatever comes
        #: the pipeline wrote (the beat has stopped)
        self.content = False

    @property
    def started(self) -> bool:
        """Whether the *answer* began (keep-alives are not an answer)."""
        return self.content

    async def beat(self, interval_s: float) -> None:
        """Until the first real write: after each ``interval_s`` of silence, a comment."""
        while True:
            await trio.sleep(interval_s)
            async with self._lock:
                if self.content:
                    return
                with trio.CancelScope(shield=True):  # never cut a comment in half
                    if not self._head_sent:
                        self._head_sent = True
                        head = [*SSE_HEADERS, (b"x-request-id", self._request_id.encode())]
                        await self._inner.start(200, head)
                    await self._inner.send(KEEPALIVE)
                if self._counted is not None:
                    self._counted()

    async def _begin(self) -> None:
        if not self.content:
            async with self._lock:  # a comment in flight finishes first
                self.content = True

    async def start(self, status: int, headers: Headers) -> None:
        if not self.content and _event_stream(status, headers):
            async with self._lock:  # the head, not content: comments until the first event
                if not self.content:
                    if not self._head_sent:
                        self._head_sent = True
                        await self._inner.start(status, headers)
                    return
        await self._begin()
        if not self._head_sent:  # else the head went out with the first keep-alive
            await self._inner.start(status, headers)

    async def send(self, data: bytes) -> None:
        if not self.content:
            await self._begin()
        await self._inner.send(data)

    async def end(self, data: bytes = b"") -> None:
        if not self.content:
            await self._begin()
        await self._inner.end(data)

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        await self._begin()
        if not self._head_sent:
            await self._inner.send_full(status, headers, body)
            return
        # The head (200, event stream) went out with a keep-alive: a whole answer now is an
        # error answer (a streamed request's success is a stream): its message as an event.
        await self._inner.send(committed_answer(status, body))
        await self._inner.end()


async def with_keepalive(
    responder: KeepAliveResponder,
    interval_s: float,
    run: Callable[[], Awaitable[None]],
) -> None:
    """Await ``run()`` (which answers through ``responder``) with keep-alive comments until its
    first write. Its exception comes out as raised, not inside an exception group."""
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.beat, interval_s)
        try:
            await run()
        except BaseException as exc:  # re-raised below, outside the nursery
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def run_stream(
    req: Request,
    responder: Responder,
    serve: Callable[[Responder], Awaitable[None]],
    interval_s: float,
    *,
    head_sent: bool = False,
    counted: Callable[[], None] | None = None,
) -> bool:
    """``serve(responder)`` for a streamed answer, inside ``req.stream_scope`` (a deadline
    after the stream began ends only this, and the server ends the stream), with keep-alive
    comments every ``interval_s`` until its first event (0: none). True when the deadline
    ended it."""
    with trio.CancelScope() as req.stream_scope:
        if interval_s:
            beating = KeepAliveResponder(responder, req.request_id or "", head_sent=head_sent,
                                         counted=counted)  # fmt: skip
            await with_keepalive(beating, interval_s, partial(serve, beating))
        else:
            await serve(responder)
    return req.stream_scope.cancelled_caught
