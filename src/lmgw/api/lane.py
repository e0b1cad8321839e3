"""The gateway's decisions for the compiled lane: the express lane's steps without awaits.

Why: the compiled lane (:mod:`lmgw.http.lane`, ``server.compiled_lane``) moves the bytes of
plain requests in C, one epoll set for all its connections; what is left in Python per request
is what the gateway decides. These are the same steps as :meth:`OpenAIAPI.generate` on the
express lane (:mod:`lmgw.pipeline.express`): the request id, the body's validation, the model,
admission, the route and the load accounting, then the answer's head and the metrics; written
as plain calls, one when the request is whole and one when its answer is.

Anything else goes the usual way, where the server's trio code serves it: a request the lane
does not take (a stream, an error to answer, a request that came in pieces, a queue to wait
in, a P/D model...) is handed to the server with its connection before anything happened to
it. A failed exchange or an answer the lane does not relay (an error status, a chunked or very
large body) is handed over too, with a continuation that finishes that request where the
express lane would have: :meth:`Pipeline.failed` and :meth:`Pipeline.attempts` for the retry,
:meth:`Pipeline.answer` for the answer.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .._fast.relay_py import (
    ABORTED,
    CONNECT,
    CONNECT_TIMEOUT,
    DROPPED,
    LOCAL,
    TIMEOUT,
    pack_sockaddr,
)
from ..errors import GatewayError
from ..http.h1parse import parse_request, parse_response
from ..http.server import build_head
from ..http.types import Request, Responder
from ..memtrim import LARGE_ANSWER_BYTES
from ..netio import RawStream
from ..pipeline.express import serve_express
from ..pipeline.request import GatewayRequest
from ..transport import pool as upstream
from ..transport.h1client import ResponseReader
from .openai import decode_view

_now = time.perf_counter
_JSON = b"application/json"
_ROUTES = {
    b"/v1/chat/completions": ("chat", "/v1/chat/completions"),
    b"/v1/completions": ("completions", "/v1/completions"),
}


class Exchange:
    """One request on the lane, from its plan to its answer (the lane's ``token``)."""

    __slots__ = (
        "ctx", "endpoint", "forward", "keep_alive", "model", "path", "req", "rid", "t0", "t_sent",
        "view", "worker",
    )  # fmt: skip

    def __init__(self, req: Request, endpoint: str, path: str, model: str, rid: str) -> None:
        self.req = req
        self.endpoint = endpoint
        self.path = path
        self.model = model
        self.rid = rid
        self.keep_alive = req.keep_alive
        self.t0 = 0.0
        self.t_sent = 0.0
        self.forward: list[tuple[bytes, bytes]] = []
        self.view: Any = None
        self.worker: Any = None
        self.ctx: Any = None


class Continuation:
    """The rest of a lane request, run by the server on the connection the lane handed back:
    :attr:`run` is a handler for :attr:`request` (the server's deadline and disconnect watch
    apply to it as to any request)."""

    __slots__ = ("request", "run", "t0")

    def __init__(self, request: Request, run: Callable[[Request, Responder], Awaitable[None]],
                 t0: float) -> None:  # fmt: skip
        self.request = request
        self.run = run
        self.t0 = t0


class LaneApp:
    """The lane's callbacks (see :mod:`lmgw._fast.relay_py`) over one gateway's API."""

    def __init__(self, api: Any, max_head: int, max_body: int, request_timeout_s: float) -> None:
        self.api = api
        self.gw = api.gw
        self.pipe = api.gw.pipeline
        self.pool = api.gw.pool
        self.max_head = max_head
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self.draining = False
        self.relay: Any = None
        #: the server's heap trimmer (lmgw.memtrim), told of the bodies let go, as the server's
        #: own path tells it
        self.trimmer: Any = None
        self._slots = 0

    def bind(self, relay: Any) -> None:
        """Start serving with ``relay``; its upstream connections follow the pool's aborts."""
        self.relay = relay
        self.pool.relay = relay

    def unbind(self) -> None:
        if self.pool.relay is self.relay:
            self.pool.relay = None

    # -- a request ---------------------------------------------------------------------------
    def on_request(self, client: str, data: bytes) -> tuple | None:
        """The plan for a whole request: (slot, bytes to send, exchange, deadline, response
        deadline); None to leave the request to the server (nothing done to it yet)."""
        parts = parse_request(data, self.max_head, self.max_body)
        if parts is None:
            return None
        method, target, headers, body, keep_alive, _ = parts
        route = _ROUTES.get(target)
        if route is None or method != "POST" or self.draining:
            return None
        endpoint, path = route
        api = self.api
        t0 = _now()
        req = Request(method, path, "", headers, body, keep_alive, client, False)
        try:
            view = decode_view(endpoint, body, api.request_limits)
            routes = self.gw.model_routes.by_name
            if routes and view.model in routes:
                return None
            model = api._resolve_model(view.model)
        except GatewayError:
            return None  # the server answers it, the same way
        pipe = self.pipe
        if (
            view.stream
            or api.kv_accounting
            or not api._express(model, view.model, body, endpoint)
            or pipe.dialect_of(model) is not None  # (P/D: asked of express models only)
        ):
            return None
        rid, forward = api._identify(req)
        req.request_id = rid
        ctx = (
            api._route_keys(req, model, rid, endpoint, body, view, None)
            if pipe.route_keys
            else pipe.context(model, rid)
        )
        admission = api.admission
        if not admission.enter():
            return None  # a queue to wait in: the server's
        if admission.cap:
            api.metrics.queue_time.observe((), 0.0)
        ex = Exchange(req, endpoint, path, model, rid)
        ex.t0 = t0
        ex.forward = forward
        ex.view = view
        ex.ctx = ctx
        try:
            worker = ex.worker = pipe.pick(model, "pd", ctx)
        except GatewayError as exc:  # answered as generate() would, on the server
            return Continuation(req, partial(self._finishing, ex, _raising(exc)), t0)
        origin = worker.origin
        slot = origin.slot
        if slot < 0:
            slot = self._slot(origin)
            if slot < 0:  # TLS, or a host name: the express lane on the server takes it
                return Continuation(
                    req, partial(self._finishing, ex, partial(self._express, ex)), t0
                )
        head, body = upstream.request_message(origin, "POST", path, forward, body)
        pipe.express_served += 1
        pipe.registry.acquire(worker)
        pipe.policies["pd"].on_dispatch(worker, ctx)
        now = ex.t_sent = _now()
        rt = pipe.response_timeout_s
        return (
            slot,
            head + body if body else head,
            ex,
            t0 + self.request_timeout_s if self.request_timeout_s else 0.0,
            now + rt if rt != math.inf else 0.0,
        )

    def _slot(self, origin: Any) -> int:
        """The lane's slot for ``origin`` (-2, for good: TLS or a host name)."""
        if origin.scheme != "http":
            origin.slot = -2
            return -2
        host = "127.0.0.1" if origin.host == "localhost" else origin.host
        sockaddr = pack_sockaddr(host, origin.port)
        if sockaddr is None:
            origin.slot = -2
            return -2
        slot = self._slots
        self._slots += 1
        self.relay.set_origin(slot, sockaddr)
        origin.slot = slot
        return slot

    def _settle(self, ex: Exchange, ok: bool) -> None:
        """The end of the exchange with the worker: what :meth:`Pipeline.dispatch_whole` does
        in its ``finally``."""
        pipe, worker = self.pipe, ex.worker
        pipe.metrics.stage.observe(("pd", worker.id), _now() - ex.t_sent)
        pipe.policies["pd"].on_finish(worker, ex.ctx, ok)
        pipe.registry.release(worker)
        if ok:
            pipe.registry.record_success(worker)

    def _close(self, ex: Exchange, status: int) -> None:
        """The end of the request: what :meth:`OpenAIAPI.generate` does in its ``finally``."""
        api = self.api
        api.admission.leave(ex.t0)
        api.account(ex.req, ex.endpoint, ex.model, status, ex.t0, None, None)
        if self.trimmer is not None:
            self.trimmer.released(len(ex.req.body))

    # -- its answer --------------------------------------------------------------------------
    def on_answer(self, ex: Exchange, data: bytes) -> tuple[bytes, bool] | Continuation:
        """A whole 2xx/3xx answer with a Content-Length: the bytes for the client."""
        got = parse_response(data)
        if got is None:  # a head the one-call parser leaves to httptools
            reader = ResponseReader()
            reader.feed(data)
            got = (reader.status, reader.headers, reader.content_type, True, reader.take_body())
        status, _, ctype, _, body = got
        self._settle(ex, True)
        if self.trimmer is not None and len(body) > LARGE_ANSWER_BYTES:
            self.trimmer.released(len(body))
        keep = ex.keep_alive and not self.draining
        head = build_head(
            status,
            [(b"content-type", ctype or _JSON), (b"x-request-id", ex.rid.encode())],
            b"content-length: %d\r\n\r\n" % len(body),
            keep,
        )
        self._close(ex, status)
        return head + body, keep

    def on_timeout(self, ex: Exchange) -> bytes:
        """The request's deadline passed: the 504 (the connection closes after it)."""
        self._settle(ex, False)
        api = self.api
        msg = f"request {ex.rid} exceeded the gateway deadline of {self.request_timeout_s:g} s"
        api.recent_errors.add(504, msg, ex.rid, ex.model, ex.endpoint)
        body = GatewayError(504, msg).body()
        head = build_head(
            504,
            [(b"content-type", _JSON), (b"x-request-id", ex.rid.encode())],
            b"content-length: %d\r\n\r\n" % len(body),
            False,
        )
        self._close(ex, 504)
        return head + body

    def on_abandon(self, ex: Exchange) -> None:
        """The client left (or the lane closed) with the request in flight."""
        self._settle(ex, False)
        self.api.metrics.disconnects.inc((ex.endpoint,))
        self._close(ex, 499)

    def on_failure(
        self, ex: Exchange, kind: int, sent: bool, reused: bool, got: bool
    ) -> Continuation:
        """No answer came: the same judgement as the pool's and the express lane's (retry on
        another worker, or the error), run on the handed-back connection."""
        exc = _upstream_error(ex, kind, sent, self.pipe.response_timeout_s)
        pipe = self.pipe
        self._settle(ex, False)

        async def finish(req: Request, responder: Responder) -> None:
            # a pooled connection dead at once: the pool's test, is the worker gone? (then
            # another worker may take the request, as the pool's request() decides)
            gone = kind == DROPPED and sent and reused and not got
            if gone and not await self.pool._reachable(ex.worker.origin):
                exc.retryable = True
                exc.message += " (and no longer accepts connections)"
            may_retry = pipe.max_attempts > 1
            failure = pipe.failed(exc, responder, "pd", ex.worker, (ex.worker,), may_retry)
            if failure is not None:
                await pipe.attempts(self._greq(ex), responder, ex.ctx, ex.worker, failure=failure)

        return Continuation(ex.req, partial(self._finishing, ex, finish), ex.t0)

    def on_handoff(self, ex: Exchange, fd: int, data: bytes) -> Continuation:
        """An answer the lane does not relay: read and answered by :meth:`Pipeline.answer`
        on the pool's terms (its connection joins the pool when the answer is whole)."""
        pool = self.pool
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = upstream._Conn(RawStream(sock))
        conn.requests = 1
        origin = ex.worker.origin
        pool._origins.add(origin)
        pipe = self.pipe
        may_retry = pipe.max_attempts > 1

        async def finish(req: Request, responder: Responder) -> None:
            ok = False
            try:
                try:
                    conn.reader.reset()
                    conn.reader.feed(data)
                except Exception as exc:  # (httptools' errors)
                    conn.close()
                    raise GatewayError(502, f"worker {ex.worker.id}: bad answer: {exc}") from None
                while not conn.reader.headers_complete:  # (the lane hands over whole heads)
                    more = await conn.stream.receive_some(65536)
                    if not more:
                        conn.close()
                        raise GatewayError(502, f"worker {ex.worker.id} closed mid-answer")
                    conn.reader.feed(more)
                resp = upstream.Response(pool, origin, conn)
                failure = await pipe.answer(
                    self._greq(ex), responder, resp, "pd", ex.worker, ex.ctx, (ex.worker,),
                    may_retry, ex.t_sent,
                )  # fmt: skip
                ok = failure is None
            except upstream.UpstreamError as exc:  # (as Pipeline.dispatch_whole)
                failure = pipe.failed(exc, responder, "pd", ex.worker, (ex.worker,), may_retry)
            finally:
                self._settle(ex, ok)
            if failure is not None:
                await pipe.attempts(self._greq(ex), responder, ex.ctx, ex.worker, failure=failure)

        return Continuation(ex.req, partial(self._finishing, ex, finish), ex.t0)

    async def _finishing(
        self,
        ex: Exchange,
        finish: Callable[[Request, Responder], Awaitable[None]],
        req: Request,
        responder: Responder,
    ) -> None:
        """A continuation's handler: ``finish``, with :meth:`OpenAIAPI.generate`'s error
        answer and accounting around it."""
        api = self.api
        status = 200
        try:
            await finish(req, responder)
        except GatewayError as exc:
            status = await api.answer_error(exc, responder, ex.rid, ex.model, ex.endpoint)
        except (trio.Cancelled, trio.BrokenResourceError, trio.ClosedResourceError):
            status = api.abandoned(req, ex.rid, ex.model, ex.endpoint)
            raise
        finally:
            self._close(ex, status)

    async def _express(self, ex: Exchange, req: Request, responder: Responder) -> None:
        await serve_express(
            self.pipe, responder, ex.worker, ex.ctx, ex.path, req.body, ex.rid, ex.forward,
            partial(self._greq, ex),
        )  # fmt: skip

    def _greq(self, ex: Exchange) -> GatewayRequest:
        return GatewayRequest(
            ex.endpoint, ex.path, ex.model, False, ex.req.body, ex.rid, ex.forward, ex.t0
        )


def _raising(exc: GatewayError) -> Callable[[Request, Responder], Awaitable[None]]:
    async def finish(req: Request, responder: Responder) -> None:
        raise exc

    return finish


def _upstream_error(
    ex: Exchange, kind: int, sent: bool, timeout_s: float
) -> upstream.UpstreamError:
    """The pool's :class:`UpstreamError` for a failure of the lane's exchange."""
    origin = ex.worker.origin
    where = f"{origin.host}:{origin.port}"
    UpstreamError = upstream.UpstreamError
    if kind == CONNECT:
        return UpstreamError(f"cannot connect to {where}", retryable=True, sent=False)
    if kind == CONNECT_TIMEOUT:
        return UpstreamError(
            f"connect to {where} timed out", retryable=True, status=504, sent=False
        )
    if kind == LOCAL:
        return UpstreamError(
            f"the gateway cannot open a connection to {where} (a limit of the gateway's"
            " host, not the worker)",
            status=503,
            sent=False,
            local=True,
        )
    if kind == ABORTED:
        return UpstreamError(
            f"worker {where} was taken out of rotation while the request waited for its answer",
            retryable=True,
            sent=sent,
        )
    if kind == TIMEOUT:
        return UpstreamError(f"worker {where} sent no response within {timeout_s:g} s", status=504)
    if kind == DROPPED:
        # unsent (a reused connection the worker had closed): it never saw the request
        return UpstreamError(
            f"worker {where} dropped the connection",
            retryable=not sent,
            sent=sent,
        )
    return UpstreamError(f"worker {where}: the answer could not be read")
