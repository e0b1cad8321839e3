"""The gateway's decisions for the compiled lane: the express lane's steps without awaits.

Why: the compiled lane (:mod:`lmgw.http.lane`, ``server.compiled_lane``) moves the bytes of
plain requests in C, one epoll set for all its connections; what is left in Python per request
is what the gateway decides. These are the same steps as :meth:`OpenAIAPI.generate` on the
express lane (:mod:`lmgw.pipeline.express`): the request id, the body's validation, the model,
admission, the route and the load accounting, then the answer's head and the metrics; written
as plain calls, one when the request is whole and one per answer. A P/D request (the express
lane's dialects: vllm-nixl, vllm-lmcache, vllm-epd without media) is two legs: the prefill
leg's answer gives the hand-off, and the decode leg's answer goes to the client
(:meth:`DisaggRunner.express`'s steps). In a concurrent dialect (SGLang's bootstrap rooms) the
two legs go at once (:meth:`DisaggRunner._concurrent`'s steps): the prefill leg as the relay's
side leg of the decode leg, its answer read for its accounting (:meth:`LaneApp.on_side`); a
failed prefill ends the request (the decode worker would wait for KV that never comes), a
decode leg that fails first cancels it, and the server goes on with a fresh pair.

A policy that learns from usage (cache_aware: the routing audit) reads the client-facing leg's
answer here too (:meth:`Pipeline.audit_tap`), and ``routing.route_header`` is added here.

A streamed request (merged, or a P/D request's decode leg) is relayed by the lane too: the
answer's head (:meth:`LaneApp.on_stream`), its first event (the time to first token), its end
(the per-token time, the request's end), and a break mid-stream (:meth:`LaneApp.on_broken`:
continued on the server from the lane's journal, or ended with an error event), as
:meth:`Pipeline.answer` and :meth:`Pipeline.failed` do on the server.

With API keys, the lane does what :class:`lmgw.api.keys.Guarded` and
:meth:`OpenAIAPI.generate` do: the key, its model allow-list, its rate, concurrency and
tokens-per-minute limits (counted in and out, the answer's usage charged), and its
``x-ratelimit-*`` headers on the answer. A request its key refuses (401, 403, 429) goes to the
server untouched, which answers it and counts the refusal once (the key's buckets are only
spent by a request that passes). A request that asks for a resumable answer
(``streams.resumable``) is the server's. With tracing, the request's span and its legs' are
the lane's (each worker gets its leg's ``traceparent``), as :meth:`Pipeline.dispatch` and
:meth:`DisaggRunner._leg` make them. With ``server.cors_allow_origins``, an allowed Origin's
headers go on the answer as :class:`lmgw.api.cors.CorsHandler` puts them (preflights are
``OPTIONS``: the server's).

Anything else goes the usual way, where the server's trio code serves it: a request the lane
does not take (a stream with hedging or SSE comments, an error to answer, a queue to wait in,
a split prompt...) is handed to the server with its connection before anything happened to
it. A failed exchange or an answer the lane does not relay (an error status, a chunked or very
large body) is handed over too, with a continuation that finishes that request where the
express lane would have: :meth:`Pipeline.failed` and :meth:`Pipeline.attempts` for the retry,
:meth:`Pipeline.answer` for the answer, and for P/D :meth:`DisaggRunner.express_prefilled`
(the prefill leg's retries, then the decode leg) or :meth:`DisaggRunner.after_decode` (the
decode leg's).
"""

from __future__ import annotations

import math
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .._fast.relay_py import (
    ABORTED,
    CANCELLED,
    CONNECT,
    CONNECT_TIMEOUT,
    DEADLINE,
    DROPPED,
    LOCAL,
    PARK,
    PROTOCOL,
    SIDE,
    TIMEOUT,
    pack_sockaddr,
)
from ..admission import Rejected
from ..auth import AuthError, KeyTable, rate_limit_headers
from ..errors import GatewayError, sse_error_event
from ..fairqueue import GRANTED
from ..http.h1parse import parse_request, parse_response
from ..http.server import build_head
from ..http.types import Request, Responder
from ..memtrim import LARGE_ANSWER_BYTES
from ..netio import RawStream
from ..pipeline import migration
from ..pipeline.disagg import _ANSWERABLE, _client_error, _stage_failed
from ..pipeline.express import serve_express
from ..pipeline.native import WholeAnswer
from ..pipeline.request import GatewayRequest
from ..pipeline.runner import _chain
from ..routing.policy import route_header
from ..streams import asks_resumable
from ..transport import pool as upstream
from ..transport.h1client import ResponseReader
from ..transport.openai_http import SSE_HEADERS
from ..transport.sse import KEEPALIVE
from ..transport.sse_stream import SseStream
from .cors import CorsResponder
from .keepalive import committed_answer, run_stream
from .keys import RateLimitHeaders, UsageMeter
from .lane_native import NativeLane
from .openai import _MEDIA_MARK, _Body, decode_view

_now = time.perf_counter
#: the API keys' buckets are stamped on this clock (lmgw.api.keys)
_key_clock = time.monotonic
_JSON = b"application/json"
_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
_BEAT = b"%x\r\n%b\r\n" % (len(KEEPALIVE), KEEPALIVE)  # a keep-alive comment, as one chunk
_ROUTES = {
    b"/v1/chat/completions": ("chat", "/v1/chat/completions"),
    b"/v1/completions": ("completions", "/v1/completions"),
    b"/generate": ("generate", "/generate"),  # SGLang's native API
}
Handler = Callable[[Request, Responder], Awaitable[None]]


class Exchange:
    """One request on the lane, from its plan to its answer (the lane's ``token``).

    ``stage``: the leg in flight, "pd" (a merged worker), "p" or "d"; ``worker`` its worker."""

    __slots__ = (
        "audit", "ctx", "endpoint", "extra", "forward", "granted", "greq", "head_keep", "head_sent",
        "keep_alive", "leg_trace", "meter", "model", "output", "path", "queue_until", "req",
        "rid", "stage", "stream", "t0", "t_first", "t_parked", "t_sent", "trace", "usage_fill",
        "waiter", "worker",
    )  # fmt: skip
    # what only a P/D request has (:class:`PDExchange`)
    dialect: Any = None

    def __init__(self, req: Request, endpoint: str, path: str, model: str, rid: str) -> None:
        self.req = req
        self.endpoint = endpoint
        self.path = path
        self.model = model
        self.rid = rid
        self.keep_alive = req.keep_alive
        self.stage = "pd"
        self.t0 = 0.0
        self.t_sent = 0.0
        self.t_first = 0.0
        #: the routing audit's tap on the client-facing leg's answer (Pipeline.audit_tap)
        self.audit: Callable[[bytes], bytes] | None = None
        #: usage counted by the gateway for a whole answer without it (ModelText.fill_usage)
        self.usage_fill: Callable[[bytes], bytes] | None = None
        #: a streamed answer's relay state (lmgw.transport.sse_stream), None for a whole one
        self.stream: SseStream | None = None
        #: the model's tool-call and reasoning parsing of the answer (tools.relay.OutputRewriter)
        self.output: Any = None
        self.forward: list[tuple[bytes, bytes]] = []
        self.worker: Any = None
        self.ctx: Any = None  # the routing context
        self.greq: Any = None  # (P/D: the legs' request)
        #: headers every answer of the request carries (CORS)
        self.extra: list[tuple[bytes, bytes]] = []
        #: the answer's usage and timing (limits.kv_accounting, or a key's tokens per minute)
        self.meter: UsageMeter | None = None
        #: tracing: the request's span (lmgw.tracing.RequestTrace), the leg in flight's
        self.trace: Any = None
        self.leg_trace: Any = None
        #: a stream's head reached the client (a keep-alive's, or the worker's answer's), and
        #: whether it kept the connection alive
        self.head_sent = False
        self.head_keep = True
        #: parked in the admission queue (Relay PARK): its waiter (None once it ran or ended),
        #: since when, and when the queue's timeout ends the wait
        self.waiter: Any = None
        #: the waiter it was granted its slot as, for the fair share's settlement at its end
        self.granted: Any = None
        self.t_parked = 0.0
        self.queue_until = 0.0


class PDExchange(Exchange):
    """A P/D request: the legs' dialect and body, the pair, the stage context, the legs and
    the hand-off."""

    __slots__ = (
        "body", "decode", "dialect", "handoff", "leg", "p_sent", "pctx", "pre", "prefill",
        "side_error", "side_trace",
    )  # fmt: skip

    def __init__(self, req: Request, endpoint: str, path: str, model: str, rid: str) -> None:
        super().__init__(req, endpoint, path, model, rid)
        self.dialect: Any = None
        #: a concurrent dialect's prefill leg (the relay's side leg): when it left, its span,
        #: and the failure that ended the request (on_side)
        self.p_sent = 0.0
        self.side_trace: Any = None
        self.side_error: Any = None
        self.body: Any = None
        self.prefill: Any = None
        self.decode: Any = None
        self.pctx: Any = None
        self.pre: Any = None
        self.leg: Any = None
        self.handoff: Any = None


class NativeExchange(Exchange):
    """A native model's request (:mod:`.lane_native`): the trio path's job and answer
    builder, the channel and its route while the Generate is in flight (``leg``: None once
    it is over)."""

    __slots__ = ("answer", "chan", "failure", "handoff", "job", "leg", "legno", "synth")

    def __init__(self, req: Request, endpoint: str, path: str, model: str, rid: str) -> None:
        super().__init__(req, endpoint, path, model, rid)
        self.answer = WholeAnswer()
        #: the worker's failure that broke the stream (lmgw.api.lane_native.NativeLane.broken)
        self.failure: Any = None
        #: a P/D request's prefill answer (lmgw.pipeline.native._HandOff), once it came
        self.handoff: Any = None
        #: the legs sent so far: a leg's callbacks act only while it is the last one
        self.legno = 0
        self.chan: Any = None
        self.job: Any = None
        self.leg: Any = None
        self.synth: Any = None


class Continuation:
    """The rest of a lane request, run by the server on the connection the lane handed back:
    :attr:`run` is a handler for :attr:`request` (the server's deadline and disconnect watch
    apply to it as to any request)."""

    __slots__ = ("midstream", "request", "run", "t0", "unsent")

    def __init__(self, request: Request, run: Handler, t0: float) -> None:
        self.request = request
        self.run = run
        self.t0 = t0
        #: the lane's stream broke: its head and ``unsent`` reached or are due to the client
        #: (the server writes ``unsent`` first; the handler's responder has started)
        self.midstream = False
        self.unsent = b""


class LaneApp:
    """The lane's callbacks (see :mod:`lmgw._fast.relay_py`) over one gateway's API."""

    def __init__(self, app: Any, max_head: int, max_body: int, request_timeout_s: float) -> None:
        """``app``: the :class:`lmgw.api.app.App` whose generation routes the lane serves
        while they are still its own (an SDK extension or middleware that replaces one takes
        its requests off the lane)."""
        api = app.openai
        self.routes = app.routes
        #: the handlers the lane stands for, as registered now
        self.handlers = {target: app.routes[path]["POST"] for target, (_, path) in _ROUTES.items()}
        self.api = api
        self.gw = api.gw
        self.pipe = api.gw.pipeline
        self.disagg = api.gw.pipeline.disagg
        self.pool = api.gw.pool
        self.max_head = max_head
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self.draining = False
        self.relay: Any = None
        #: the server's heap trimmer (lmgw.memtrim), told of the bodies let go, as the server's
        #: own path tells it
        self.trimmer: Any = None
        #: ``resolve(origin)``: look a worker's host name up for the lane (lmgw.http.lane)
        self.resolve: Callable[[Any], None] | None = None
        self._slots = 0
        #: the API keys (lmgw.api.keys.ApiKeys), None when the API is open
        self.keys = api.gw.keys
        #: the CORS rules (lmgw.api.cors.Cors), None without server.cors_allow_origins
        self.cors = api.gw.cors
        #: streams.resumable: requests that ask for a resumable answer go to the server
        self.resumable = api.gw.config.streams.resumable
        #: lmgw.tracing.Tracing, None when tracing is off
        self.tracing = api.tracing
        #: requests left to the server, by reason (lmgw_lane_declined_total)
        self.declined: Counter[str] = Counter()
        #: the request just declined is a passing one: when this says so after it, its
        #: connection comes back to the lane (:meth:`take_back`)
        self._back: Callable[[], bool] | None = None
        #: ``resume_soon(ex)``: a parked request's grant or eviction, for :meth:`resume` from
        #: a task of the lane's (not from inside the relay's pass); None: nothing is parked
        self.resume_soon: Callable[[Exchange], None] | None = None
        native = self.pipe.native
        #: native workers' requests (lmgw.api.lane_native), None without native models
        self.native = NativeLane(self, NativeExchange) if native.models or native.default else None

    def bind(self, relay: Any) -> None:
        """Start serving with ``relay``; its upstream connections follow the pool's aborts."""
        self.relay = relay
        self.pool.relay = relay

    def unbind(self) -> None:
        if self.pool.relay is self.relay:
            self.pool.relay = None

    # -- a request ---------------------------------------------------------------------------
    def on_request(self, client: str, data: bytes) -> tuple | Continuation | None:
        """The plan for a whole request: (slot, bytes to send, exchange, deadline, response
        deadline); a continuation for the server to finish it; None to leave the request to
        the server (nothing done to it yet)."""
        parts = parse_request(data, self.max_head, self.max_body)
        if parts is None:
            return self._decline("unparsed")  # (what the one-call parser leaves to httptools)
        method, target, headers, body, keep_alive, _ = parts
        route = _ROUTES.get(target)
        if route is None or method != "POST":
            # (a GET between a client's chat requests, /v1/models or a probe, is passing; a
            # client of another POST route would cross over and back each time)
            return self._decline("other_route", _always if method != "POST" else None)
        if self.draining:
            return self._decline("draining")
        endpoint, path = route
        if self.routes[path].get("POST") is not self.handlers[target]:
            return self._decline("replaced_route")  # someone else's handler: the server's
        api = self.api
        t0 = _now()
        req = Request(method, path, "", headers, body, keep_alive, client, False)
        if self.resumable and asks_resumable(headers):
            return self._decline("resumable")
        keys = self.keys
        entry = None
        if keys is not None and path not in keys.open_paths:
            entry = self._key(req)
            if entry is None:
                return self._decline("key")
        try:
            view = decode_view(endpoint, body, api.request_limits)
            routes = self.gw.model_routes.by_name
            if routes and view.model in routes:
                return self._decline("model_route")
            model = api._resolve_model(view.model)
            if entry is not None:
                KeyTable.check_model(entry, model, view.model)
        except GatewayError:
            return self._decline("error", _always)  # the server answers it, the same way
        pipe = self.pipe
        stream = bool(view.stream)
        # (a native model, any flow: a request without media skips an encoder stage)
        native = (
            self.native if self.native is not None and self.native.runner.handles(model) else None
        )
        if native is not None:
            if endpoint == "generate" or api.tool_loop is not None or _MEDIA_MARK.search(body):
                return self._decline("not_plain")  # (the server's 400, tools, media)
        elif not api._express(model, view.model, body, endpoint, lane=True):
            return self._decline("not_plain")
        if entry is not None and view.priority is not None and entry.min_priority is not None:
            return self._decline("priority")  # the server checks it
        text = self.gw.text_for(model)
        prompt_ids = None
        edited: _Body | None = None  # (as _serve_model's: decoded once, encoded once)
        if view.model is not None and model != view.model:  # an alias: workers know the
            edited = _Body(body)  # canonical name
            edited.obj["model"] = model
            edited.changed = True
        if native is not None:  # (the worker takes token ids: always tokenized here)
            if text is None:
                return self._decline("error", _always)  # the server's 500
            edited = edited or _Body(body)
            if not native.plain(edited.obj):
                return self._decline("not_plain")  # n > 1: the server's fan-out
            try:
                prompt_ids = native.prompt(text, endpoint, edited)
            except GatewayError:
                return self._decline("error", _always)  # the server answers it, the same way
            if prompt_ids is None:  # a long prompt, a batch, a template of the request's own
                return self._decline("tokenize", _always)
        elif text is not None and text.validate_context and endpoint != "generate":
            edited = edited or _Body(body)
            try:  # (as _serve_model: the context check, max_tokens filled in)
                checked = text.validate_inline(endpoint, edited.obj)
            except GatewayError:
                return self._decline("error", _always)  # the server answers it, the same way
            if checked is None:
                # a long prompt: the server's worker thread
                return self._decline("tokenize", _always)
            edited.changed, prompt_ids = checked
        output = None
        parsers = self.gw.output_parsers.get(model) if endpoint == "chat" else None
        # tool calls (only for requests that offer tools) and reasoning: parsed here
        if (
            native is not None
            and endpoint == "chat"
            and (parsers is not None or b'"tool_choice"' in body)
        ):  # (as _serve_model: a forced tool's output is read back too)
            try:
                output = api._output_parsing(edited, model)  # type: ignore[arg-type]
            except GatewayError:  # (a tool choice naming no tool offered)
                return self._decline("error", _always)  # the server answers it, the same way
        elif parsers is not None and (parsers[1] is not None or b'"tools"' in body):
            edited = edited or _Body(body)
            output = api._output_parsing(edited, model)
        if edited is not None and edited.changed:
            body = req.body = edited.final()
        dialect = pipe.dialect_of(model) if native is None else None  # (P/D: express models)
        hedger = pipe.hedger
        if hedger is not None and dialect is None and hedger.would_hedge(model, stream, len(body)):
            return self._decline("stream")  # a stream to hedge: the server's race
        rid, forward = api._identify(req)
        req.request_id = rid
        if native is not None:
            try:
                ex = native.exchange(req, endpoint, path, model, rid, forward,
                                     edited.obj, prompt_ids, output, t0, stream)  # type: ignore[union-attr,arg-type]  # fmt: skip
            except GatewayError:  # a bad sampling parameter
                return self._decline("error", _always)  # the server answers it, the same way
        elif dialect is None:
            ex = Exchange(req, endpoint, path, model, rid)
        else:
            ex = pd = PDExchange(req, endpoint, path, model, rid)
            pd.greq = GatewayRequest(endpoint, path, model, stream, body, rid, forward, t0)
            pd.greq.prompt_ids = prompt_ids
            pd.greq.output = output
            pd.body = self.disagg.plain_body(pd.greq, dialect)
            if pd.body is None:
                return self._decline("not_plain")
            if dialect.concurrent_prefill_decode and dialect.needs_prefill_response(pd.body):
                return self._decline("not_plain")  # (a decode answer merged with the prefill's)
            pd.dialect = dialect
        ex.t0 = t0
        ex.forward = forward
        ex.output = output
        if prompt_ids is not None and not stream:  # (as _serve_model: usage an answer lacks)
            ex.usage_fill = partial(text.fill_usage, len(prompt_ids))  # type: ignore[union-attr]
            if ex.greq is not None:
                ex.greq.usage_fill = ex.usage_fill
        if api.kv_accounting or (entry is not None and entry.tpm):  # (as generate's)
            ex.meter = UsageMeter(None)
        if self.cors is not None:
            allowed = self.cors.allow(req)
            if allowed is not None:
                ex.extra = self.cors.headers(allowed)
        ex.ctx = (
            api._route_keys(req, model, rid, endpoint, body, view, prompt_ids)
            if pipe.route_keys
            else pipe.context(model, rid)
        )
        if native is not None:  # (the worker takes these very ids: as NativeRunner._route)
            ex.ctx.tokens, ex.ctx.text_key = prompt_ids, None
            ex.greq.route = ex.ctx
        admission = api.admission
        if entry is not None:
            try:  # (a refusal spends nothing: the server's own admit refuses it the same way)
                keys.table.admit(entry, _key_clock())
            except AuthError:
                # the server answers the 429, counts it
                return self._decline("key_limit", _always)
        if stream:  # (as Pipeline.run: the journal when the stream may be continued)
            # (a native stream is continued from its synthesizer's record: no journal)
            journal = migration.Journal(endpoint) if pipe.migrations and not native else None
            ex.stream = SseStream(pipe.stall_s or 0.0, journal)
        if not admission.enter():
            if self.resume_soon is not None:
                parked = self._park(ex, view)
                if parked is not None:
                    return parked
            if entry is not None:
                KeyTable.refund(entry)  # the server admits it again
            # (back once nothing waits: under a standing queue, crossing over and back for
            # every request that waited costs more than the lane saves; floor.py lmgw-capped)
            return self._decline("queue", self._no_queue)  # a queue to wait in: the server's
        if admission.cap:
            api.metrics.queue_time.observe((), 0.0)
        return self._admitted(ex)

    def _admitted(self, ex: Exchange) -> tuple | Continuation:
        """The rest of :meth:`on_request` once the request holds an admission slot: its
        span, its worker and the plan (or the continuation the server runs)."""
        req, endpoint, rid, model, path = ex.req, ex.endpoint, ex.rid, ex.model, ex.path
        pipe, ctx, forward, body = self.pipe, ex.ctx, ex.forward, req.body
        stream = ex.stream is not None
        if self.tracing is not None:
            ex.trace = self.tracing.request(req, endpoint, rid)
            if ex.greq is not None:  # (P/D: the server's legs, if it goes on there)
                ex.greq.trace = ex.trace
        if isinstance(ex, PDExchange):
            return self._prefill(ex)
        if type(ex) is NativeExchange:
            return self.native.start(ex)  # type: ignore[union-attr]
        try:
            worker = ex.worker = pipe.pick(model, "pd", ctx)
        except GatewayError as exc:  # answered as generate() would, on the server
            return self._continue(ex, _raising(exc))
        slot = self._slot(worker.origin)
        if slot < 0:  # TLS, or a host name: the express lane on the server takes it
            if ex.trace is not None or stream or pipe.audits or pipe.route_header:
                # (no spans, streams, audits or route header there: the general path)
                return self._continue(ex, partial(self._attempts, ex))
            return self._continue(ex, partial(self._express, ex))
        headers = forward
        if ex.trace is not None:
            ex.leg_trace = ex.trace.leg("pd", worker)
            headers = ex.leg_trace.headers(forward)
        head, payload = upstream.request_message(worker.origin, "POST", path, headers, body)
        if not stream:
            pipe.express_served += 1
        pipe.registry.acquire(worker)
        pipe.policies["pd"].on_dispatch(worker, ctx)
        self._tap(ex)
        return self._plan(ex, slot, head + payload if payload else head)

    # -- the admission queue, in the lane ------------------------------------------------------
    def _park(self, ex: Exchange, view: Any) -> tuple | None:
        """Wait for an admission slot in the lane: the parked plan, or None when the queue
        is full (the server answers the 429). A stream gets its keep-alive comments while it
        waits (``limits.sse_keepalive_s``), as on the server."""
        admission = self.api.admission
        w = admission.park(ex.req, view, partial(self.resume_soon, ex))  # type: ignore[arg-type]
        if w is None:
            return None
        ex.waiter = w
        now = ex.t_parked = _now()
        wait = admission.queue_timeout_s
        ex.queue_until = now + wait if wait != math.inf else 0.0
        deadline = ex.t0 + self.request_timeout_s if self.request_timeout_s else 0.0
        if ex.queue_until and (not deadline or ex.queue_until < deadline):
            deadline = ex.queue_until
        else:
            ex.queue_until = 0.0  # (the request's deadline comes first)
        if ex.stream is not None:
            return (PARK, b"", ex, deadline, 0.0, ex.stream, self.api.sse_keepalive_s > 0)
        return (PARK, b"", ex, deadline, 0.0)

    def resume(self, ex: Exchange) -> None:
        """A parked request's wait is over (``resume_soon``): granted a slot, it goes on
        (:meth:`_admitted`); evicted, its 429. Nothing when it ended meanwhile."""
        w = ex.waiter
        if w is None:
            return  # (its deadline or its client ended it first: Admission.unpark)
        ex.waiter = None
        api, relay, now = self.api, self.relay, _now()
        if w.state == GRANTED:
            api.admission.granted(w)
            ex.granted = w
            api.metrics.queue_time.observe((), now - ex.t_parked)
            result = self._admitted(ex)
            if type(result) is tuple:
                relay.resume(ex, result, now)
            else:
                relay.hand(ex, result)
            return
        relay.reply(ex, *self._refused(ex, api.admission.evicted(w)), now)

    def _refused(self, ex: Exchange, exc: Rejected) -> tuple[bytes, bool]:
        """A parked request's 429 (evicted, or the queue's timeout): the answer the server
        gives (``Rejected.send``; a stream whose keep-alive head went out: its error event,
        as ``answer_error``), accounted as the request's end; and whether the connection
        stays open."""
        self.api.recent_errors.add(exc.status, exc.message, ex.rid, ex.model, ex.endpoint)
        if ex.head_sent:
            self._close(ex, exc.status, admitted=False)
            return _sse_end(sse_error_event(exc.status, exc.message)), ex.head_keep
        body = exc.body()
        headers = [(b"content-type", _JSON), (b"retry-after", str(exc.retry_after).encode()),
                   (b"x-request-id", ex.rid.encode()), *ex.extra, *_limits(ex)]  # fmt: skip
        head = build_head(
            exc.status, headers, b"content-length: %d\r\n\r\n" % len(body), ex.keep_alive
        )
        self._close(ex, exc.status, admitted=False)
        return head + body, ex.keep_alive

    def _unpark(self, ex: Exchange, status: int) -> bytes | tuple[bytes, bool]:
        """A parked request ended by the relay: its deadline (the queue's timeout: its 429;
        the request's: the 504) or its client gone (``status`` 499: nothing to answer)."""
        w, ex.waiter = ex.waiter, None
        queue_timeout = status == 504 and bool(ex.queue_until)
        exc = self.api.admission.unpark(w, queue_timeout)
        if exc is not None:
            return self._refused(ex, exc)
        if status == 499:
            self.api.metrics.disconnects.inc((ex.endpoint,))
            self._close(ex, 499, admitted=False)
            return b""
        msg = self._deadline(ex)
        if ex.head_sent:  # a keep-alive committed the stream: the error as its last event
            return self._deadline_end(ex, msg, admitted=False)
        return self._gateway_timeout(ex, msg, admitted=False)

    def _tap(self, ex: Exchange) -> None:
        """The routing audit's tap on the client-facing leg just dispatched (as
        :meth:`Pipeline.answer` sets it): on a whole answer's body, or on each group of a
        stream's events; and a stream's usage meter (as UsageMeter wraps the responder)."""
        pipe = self.pipe
        if pipe.audits:
            policy = pipe.policies[ex.stage]
            ex.audit = pipe.audit_tap(policy, ex.worker, ex.ctx, ex.model)
        stream = ex.stream
        if stream is not None:  # (as Pipeline.answer: the audit reads the worker's events,
            # the output parsing rewrites them, the meter reads what the client gets)
            output = ex.output.events if ex.output is not None else None
            meter = ex.meter.events_of if ex.meter is not None else None
            stream.tap = _chain(_chain(ex.audit, output), meter)

    def _answer_headers(
        self, ex: Exchange, first: list[tuple[bytes, bytes]], *, early: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """The client-facing answer's headers after ``first`` (its content type): the request
        id, P/D's Server-Timing, ``x-lmgw-route``, CORS's and the key's ``x-ratelimit-*``
        (``early``: a keep-alive's head, before the answer: no timing and no route yet)."""
        headers = [*first, (b"x-request-id", ex.rid.encode())]
        if ex.greq is not None and ex.greq.timings and not early:  # P/D: the prefill leg's time
            headers.append((b"server-timing", ex.greq.server_timing()))
        pipe = self.pipe
        if pipe.route_header and not early:
            policy = pipe.policies[ex.stage]
            headers.append((b"x-lmgw-route", route_header(policy, ex.worker, ex.ctx)))
        headers += ex.extra
        headers += _limits(ex)
        return headers

    def _decline(self, reason: str, back: Callable[[], bool] | None = None) -> None:
        """Leave a request to the server, counted by ``reason`` (lmgw_lane_declined_total).

        ``back``: a passing reason (an error, a queue, a rate limit, a long prompt, a GET), not
        one every request of this client will have (a stream to hedge, a model the lane does
        not serve): the connection returns to the lane once this request is answered, if
        ``back()`` says so then. Else a keep-alive client that met one burst (a queue) or sent
        one bad request would stay on the slower trio path for as long as it is connected."""
        self.declined[reason] += 1
        self._back = back

    def take_back(self) -> Callable[[], bool] | None:
        """For the connection the relay is handing over now (``on_demote``, called right after
        the ``on_request`` that declined): whether it comes back to the lane after its
        request, asked then (None: it stays with the server)."""
        back, self._back = self._back, None
        return back

    def _no_queue(self) -> bool:
        return not self.api.admission.waiting

    def _key(self, req: Request) -> Any:
        """The request's API key (:class:`lmgw.auth.KeyEntry`, now ``req.principal``), or None
        when there is none that the table knows (the server answers the 401). Counts nothing."""
        authorization = req.header(b"authorization")
        if authorization is None:  # (as Guarded: Anthropic's clients send X-Api-Key)
            key = req.header(b"x-api-key")
            if key is not None:
                authorization = b"Bearer " + key
        try:
            entry = self.keys.table.authenticate(authorization)
        except AuthError:
            return None
        req.principal = entry
        return entry

    def _plan(self, ex: Exchange, slot: int, payload: bytes, side: tuple | None = None) -> tuple:
        """The relay's plan for the leg in flight (``ex.stage``); a stream's client-facing
        leg carries the stream's state; ``side``: the side leg that goes with it."""
        stream = ex.stream if ex.stage != "p" else None
        now = ex.t_sent = _now()
        rt = self.pipe.response_timeout_s
        plan = (
            slot,
            payload,
            ex,
            ex.t0 + self.request_timeout_s if self.request_timeout_s else 0.0,
            now + rt if rt != math.inf else 0.0,
        )
        if ex.stream is not None:
            # a streamed request: SSE keep-alive comments on every leg until the first event
            plan = (*plan, stream, self.api.sse_keepalive_s > 0)
        elif side is not None:
            plan = (*plan, None, False)
        return plan if side is None else (*plan, side)

    def _slot(self, origin: Any) -> int:
        """The lane's slot for ``origin``: -2 for good (TLS, or a name that did not resolve),
        -3 while its host name is being resolved (:attr:`resolve`): the express lane on the
        server takes those requests."""
        slot = origin.slot
        if slot != -1:
            return slot
        sockaddr = pack_sockaddr(origin.host, origin.port) if origin.scheme == "http" else None
        if sockaddr is not None:
            return self.assign(origin, sockaddr)
        if origin.scheme != "http" or self.resolve is None:
            origin.slot = -2
            return -2
        origin.slot = -3
        self.resolve(origin)
        return -3

    def assign(self, origin: Any, sockaddr: bytes) -> int:
        """Give ``origin`` a slot of the lane at ``sockaddr`` (or move its slot there)."""
        slot = origin.slot
        if slot < 0:
            slot = self._slots
            self._slots += 1
            origin.slot = slot
        self.relay.set_origin(slot, sockaddr)
        return slot

    def _prefill(self, ex: PDExchange) -> tuple | Continuation:
        """A P/D request: its pair, then its prefill leg (:meth:`DisaggRunner.express`)."""
        pipe, disagg, greq = self.pipe, self.disagg, ex.greq
        try:
            ex.prefill, ex.decode = pipe.place(ex.model, ex.ctx, len(greq.body))
        except GatewayError as exc:
            return self._continue(ex, _raising(exc))
        if ex.stream is None:  # (lmgw_express_requests_total: not streams)
            pipe.express_served += 1
        ex.pctx = disagg.context(greq, ex.prefill, ex.decode)
        concurrent = ex.dialect.concurrent_prefill_decode
        if self._slot(ex.prefill.origin) < 0 or self._slot(ex.decode.origin) < 0:
            rest = self._pair if concurrent else self._prefilled
            return self._continue(ex, partial(rest, ex, None))
        if concurrent:
            return self._concurrent(ex)
        try:
            ex.pre = pre = ex.dialect.prefill_request(ex.body, ex.pctx)
        except _ANSWERABLE as exc:
            return self._continue(ex, _raising(_client_error(greq, exc)))
        headers = pre.headers
        if ex.trace is not None:
            ex.leg_trace = ex.trace.leg("p", ex.prefill)
            headers = ex.leg_trace.headers(headers)
        head, payload = upstream.request_message(
            ex.prefill.origin, "POST", pre.path, headers, pre.body
        )
        ex.stage = "p"
        ex.worker = ex.prefill
        disagg.leg_begin("p", ex.prefill, ex.ctx)
        return self._plan(ex, ex.prefill.origin.slot, head + payload if payload else head)

    def _decode(self, ex: PDExchange, status: int, answer: bytes) -> tuple | Continuation:
        """The prefill leg answered: the hand-off, then the decode leg."""
        greq, dialect = ex.greq, ex.dialect
        try:
            ex.handoff = dialect.read_prefill(ex.pre, status, answer)
            ex.leg = leg = dialect.decode_request(ex.body, ex.handoff, ex.pctx)
        except _ANSWERABLE as exc:
            return self._continue(ex, _raising(_client_error(greq, exc)))
        if dialect.rewrites_decode(ex.handoff):  # the general leg, on the server
            return self._continue(ex, partial(self._after_decode, ex, None))
        return self._send_decode(ex, leg)

    def _send_decode(self, ex: PDExchange, leg: Any, side: tuple | None = None) -> tuple:
        """The plan of the decode leg ``leg`` (with ``side``, the relay's side leg)."""
        decode = ex.worker = ex.decode
        headers = leg.headers
        if ex.trace is not None:
            ex.leg_trace = ex.trace.leg("d", decode)
            headers = ex.leg_trace.headers(headers)
        head, payload = upstream.request_message(decode.origin, "POST", leg.path, headers, leg.body)
        ex.stage = "d"
        self.pipe.registry.acquire(decode)
        self.pipe.policies["d"].on_dispatch(decode, ex.ctx)
        self._tap(ex)
        return self._plan(ex, decode.origin.slot, head + payload if payload else head, side)

    def _concurrent(self, ex: PDExchange) -> tuple | Continuation:
        """A concurrent dialect's pair (:meth:`DisaggRunner._concurrent`): both legs at once,
        the prefill leg as the decode leg's side leg."""
        greq, dialect, prefill = ex.greq, ex.dialect, ex.prefill
        try:
            ex.pre = pre = dialect.prefill_request(ex.body, ex.pctx)
            ex.handoff = pre.handoff
            ex.leg = leg = dialect.decode_request(ex.body, pre.handoff, ex.pctx)
        except _ANSWERABLE as exc:
            return self._continue(ex, _raising(_client_error(greq, exc)))
        headers = pre.headers
        if ex.trace is not None:
            ex.side_trace = ex.trace.leg("p", prefill)
            headers = ex.side_trace.headers(headers)
        head, payload = upstream.request_message(
            prefill.origin, "POST", pre.path, headers, pre.body
        )
        ex.p_sent = self.disagg.leg_begin("p", prefill, ex.ctx)
        # its answer within the response timeout, and not past the request's deadline, even
        # when it goes on after the request's answer (as the server's request scope holds it)
        rt = self.pipe.response_timeout_s
        ends = [
            t for t in (
                _now() + rt if rt != math.inf else 0.0,
                ex.t0 + self.request_timeout_s if self.request_timeout_s else 0.0,
            ) if t
        ]  # fmt: skip
        side = (prefill.origin.slot, head + payload if payload else head, min(ends, default=0.0))
        return self._send_decode(ex, leg, side)

    def on_side(self, ex: PDExchange, kind: int, data: bytes) -> bool:
        """A concurrent pair's prefill leg is over (``kind`` 0: ``data`` is its answer): its
        accounting (:meth:`DisaggRunner._leg`'s); True when it failed, which ends the request
        if it is still in flight (``on_failure`` or ``on_broken`` with SIDE)."""
        disagg, worker = self.disagg, ex.prefill
        ok = False
        error: Any = None
        if kind == 0:
            got = parse_response(data)
            if got is None:  # chunked, or a head the one-call parser leaves to httptools
                reader = ResponseReader()
                reader.feed(data)
                got = (reader.status, None, None, True, reader.take_body())
            status, body = got[0], got[4]
            ok = disagg.leg_answered(worker, status)
            try:
                ex.dialect.read_prefill(ex.pre, status, body)
            except _ANSWERABLE as exc:
                error = exc
        elif kind != CANCELLED:  # (cancelled: the request ended first; no fault of the worker)
            sent = kind not in (CONNECT, LOCAL, CONNECT_TIMEOUT)
            exc = _upstream_error(worker, kind, sent, self.pipe.response_timeout_s)
            error = disagg.leg_failed("p", worker, exc)
        if ex.side_trace is not None:
            ex.side_trace.end(None if ok else "failed")
            ex.side_trace = None
        disagg.leg_end(ex.greq, "p", worker, ex.ctx, ex.p_sent, ok)
        if error is None:
            return False
        ex.side_error = error
        return True

    # -- the end of a leg --------------------------------------------------------------------
    def _settle(self, ex: Exchange, ok: bool) -> None:
        """The leg in flight is over: what :meth:`Pipeline.dispatch_whole` (a merged or decode
        leg) or :meth:`DisaggRunner._leg` (a prefill leg) does in its ``finally``."""
        if type(ex) is NativeExchange:
            self.native.settle(ex, ok)  # type: ignore[union-attr]
            return
        pipe, worker = self.pipe, ex.worker
        if ex.leg_trace is not None:  # (as Pipeline.dispatch and DisaggRunner._leg)
            ex.leg_trace.end(None if ok else "failed")
            ex.leg_trace = None
        if ex.stage == "p":
            self.disagg.leg_end(ex.greq, "p", worker, ex.ctx, ex.t_sent, ok)
            return
        role = ex.stage
        pipe.metrics.stage.observe((role, worker.id), _now() - ex.t_sent)
        pipe.policies[role].on_finish(worker, ex.ctx, ok)
        pipe.registry.release(worker)
        if ok:
            pipe.registry.record_success(worker)

    def _close(self, ex: Exchange, status: int, admitted: bool = True) -> None:
        """The end of the request: what :meth:`OpenAIAPI.generate` does in its ``finally``
        (its metrics; with ``ex.meter``, the usage charge and the KV-cache occupancy), and
        :class:`lmgw.api.keys.Guarded`'s release of the key (``admitted``: it held an
        admission slot; a parked request that never ran did not)."""
        api = self.api
        placement = self.pipe.placement
        if placement is not None and ex.dialect is not None:  # (idempotent)
            placement.release(ex.ctx)
        if admitted:
            admission = api.admission
            admission.leave(ex.t0)
            if ex.granted is not None and ex.meter is not None and admission.by_kv:
                admission.settle(ex.granted, ex.meter.kv_token_seconds(len(ex.req.body)))
        if ex.req.principal is not None:
            KeyTable.release(ex.req.principal)
        api.account(ex.req, ex.endpoint, ex.model, status, ex.t0, ex.trace, ex.meter)
        if self.trimmer is not None:
            self.trimmer.released(len(ex.req.body))

    # -- answers -----------------------------------------------------------------------------
    def on_answer(self, ex: Exchange, data: bytes) -> tuple | Continuation:
        """A whole 2xx/3xx answer with a Content-Length: the bytes for the client, or (a
        prefill leg's) the plan of the decode leg."""
        got = parse_response(data)
        if got is None:  # a head the one-call parser leaves to httptools
            reader = ResponseReader()
            reader.feed(data)
            got = (reader.status, reader.headers, reader.content_type, True, reader.take_body())
        status, _, ctype, _, body = got
        if ex.stage == "p":
            self._settle(ex, self.disagg.leg_answered(ex.worker, status))
            return self._decode(ex, status, body)
        if ex.head_sent:  # a keep-alive committed the stream: the answer as an error event
            self._settle(ex, True)
            self._close(ex, status)
            return _sse_end(committed_answer(status, body)), ex.head_keep
        if ex.audit is not None:  # the routing audit reads the usage (as Pipeline.answer)
            ex.audit(body)
        if ex.usage_fill is not None:
            body = ex.usage_fill(body)
        if ex.output is not None:  # tool calls and reasoning, parsed out of the text
            body = ex.output.body(body)
        self._settle(ex, True)
        if self.trimmer is not None and len(body) > LARGE_ANSWER_BYTES:
            self.trimmer.released(len(body))
        keep = ex.keep_alive and not self.draining
        headers = self._answer_headers(ex, [(b"content-type", ctype or _JSON)])
        if ex.meter is not None:
            ex.meter.whole(status, body)
        head = build_head(status, headers, b"content-length: %d\r\n\r\n" % len(body), keep)
        self._close(ex, status)
        return head + body, keep

    # -- streamed answers ---------------------------------------------------------------------
    def on_stream(self, ex: Exchange, head: bytes) -> tuple[bytes, bool] | None:
        """A streamed request's answer began (2xx, chunked): the client's head, or None when
        it is not an event stream (the server relays it, as :meth:`Pipeline.answer`)."""
        if not _is_event_stream(head):
            return None
        if ex.head_sent:  # with a keep-alive comment
            return b"", ex.head_keep
        keep = self._commit(ex)
        return build_head(200, self._answer_headers(ex, SSE_HEADERS), _CHUNKED, keep), keep

    def _commit(self, ex: Exchange) -> bool:
        """The stream's 200 head goes out now: whether it keeps the connection alive."""
        if ex.meter is not None:
            ex.meter.status = 200
        ex.head_sent = True
        keep = ex.head_keep = ex.keep_alive and not self.draining
        return keep

    def on_beat(self, ex: Exchange) -> bytes | None:
        """A stream with no event yet after ``limits.sse_keepalive_s``: a keep-alive comment,
        after the client's 200 and event-stream head the first time if the worker's has not
        come (as :class:`~lmgw.api.keepalive.KeepAliveResponder` on the server)."""
        stream = ex.stream
        if stream is None or stream.started:
            return None
        self.api.metrics.keepalives.inc()
        if ex.head_sent:
            return _BEAT
        keep = self._commit(ex)
        headers = self._answer_headers(ex, SSE_HEADERS, early=True)
        return build_head(200, headers, _CHUNKED, keep) + _BEAT

    def on_first(self, ex: Exchange) -> None:
        """The stream's first event: the time to first token, and the policy's hook
        (:meth:`Pipeline.answer`'s ``first_byte``)."""
        pipe, worker = self.pipe, ex.worker
        now = ex.t_first = _now()
        metrics = pipe.metrics
        metrics.ttft.observe((ex.model,), now - ex.t0)
        metrics.stage_ttft.observe((ex.stage, worker.id), now - ex.t_sent)
        if ex.stage in pipe.first_token_roles:  # this leg's prefill is over
            pipe.policies[ex.stage].on_first_token(worker, ex.ctx)
        if pipe.hedger is not None and ex.stage == "pd":  # the adaptive hedging delay's sample
            pipe.hedger.observe(ex.model, now - ex.t_sent)

    def on_stream_end(self, ex: Exchange) -> None:
        """The stream's last chunk came (and went to the client): its per-token time, then
        the request's end."""
        events = ex.stream.events  # type: ignore[union-attr]
        if events > 1:
            tpot = (_now() - ex.t_first) / (events - 1)
            metrics = self.pipe.metrics
            metrics.stage_tpot.observe((ex.stage, ex.worker.id), tpot)
            metrics.tpot.observe((ex.model,), tpot)
        if ex.meter is not None:
            ex.meter.t_end = _now()
        self._settle(ex, True)
        self._close(ex, 200)

    def on_broken(
        self, ex: Exchange, kind: int, unsent: bytes
    ) -> tuple[bytes, bool] | Continuation:
        """The stream broke after its head: as :meth:`Pipeline.failed` judges it, continued on
        another worker (a continuation on the server, with ``unsent`` to write first) when it
        may be, else ended with an SSE error event and ``[DONE]``."""
        pipe, worker = self.pipe, ex.worker
        self._settle(ex, False)
        if ex.meter is not None:
            ex.meter.t_end = _now()
        if kind == DEADLINE:  # the request ends; its stream's end leaves the connection clean
            return self._deadline_end(ex, self._deadline(ex))
        if type(ex) is NativeExchange:
            return self.native.broken(ex, kind, unsent)  # type: ignore[union-attr]
        if kind == SIDE:  # the prefill leg that went with it failed: the stream's last event
            self._close(ex, 200)
            message = f"prefill stage failed: {ex.side_error.message}"  # type: ignore[union-attr]
            return _sse_end(sse_error_event(502, message)), ex.keep_alive and not self.draining
        exc = _stream_error(worker, kind, pipe.stall_s or 0.0)
        pipe.metrics.upstream_errors.inc((ex.stage, worker.id, exc.kind))
        pipe.registry.record_failure(worker, exc.message, eject=False)
        journal = ex.stream.journal  # type: ignore[union-attr]
        if journal is None:  # (upstream.migrate_streams = 0)
            self._close(ex, 200)  # (as relay_sse without a journal: the stream carries it)
            event = sse_error_event(exc.status, f"worker stream failed: {exc.message}")
            return _sse_end(event), ex.keep_alive and not self.draining
        cont = self._continue(ex, partial(self._migrate, ex, journal))
        cont.midstream = True
        cont.unsent = unsent
        return cont

    async def _migrate(
        self, ex: Exchange, journal: list[bytes], req: Request, responder: Responder
    ) -> None:
        if ex.dialect is not None:  # a P/D decode leg: the flow's legs again, for the rest
            await self.disagg.continue_broken(ex.greq, responder, ex.dialect, ex.ctx, ex.worker,
                                              journal)  # fmt: skip
            return
        await self.pipe.continue_stream(self._greq(ex), responder, ex.stage, ex.ctx,
                                        (ex.worker,), journal)  # fmt: skip

    def on_timeout(self, ex: Exchange) -> bytes | tuple[bytes, bool]:
        """The request's deadline passed: the 504 (the connection closes after it); or, when a
        keep-alive sent the stream's head, the stream's last event (the connection goes on as
        that head said: the client could not be told otherwise). A parked request: the
        queue's 429 or the 504 (:meth:`_unpark`)."""
        if ex.waiter is not None:
            return self._unpark(ex, 504)
        self._settle(ex, False)
        msg = self._deadline(ex)
        if ex.head_sent:  # a keep-alive committed the stream: the error as its last event
            return self._deadline_end(ex, msg)
        return self._gateway_timeout(ex, msg)

    def _gateway_timeout(self, ex: Exchange, msg: str, admitted: bool = True) -> bytes:
        """The deadline's 504, the request's end (the connection closes after it)."""
        body = GatewayError(504, msg).body()
        headers = [(b"content-type", _JSON), (b"x-request-id", ex.rid.encode()), *ex.extra]
        headers += _limits(ex)
        head = build_head(504, headers, b"content-length: %d\r\n\r\n" % len(body), False)
        self._close(ex, 504, admitted)
        return head + body

    def _deadline(self, ex: Exchange) -> str:
        """The deadline's message, recorded among the recent errors."""
        msg = f"request {ex.rid} exceeded the gateway deadline of {self.request_timeout_s:g} s"
        self.api.recent_errors.add(504, msg, ex.rid, ex.model, ex.endpoint)
        return msg

    def _deadline_end(self, ex: Exchange, msg: str, admitted: bool = True) -> tuple[bytes, bool]:
        """A stream's end at the deadline (its 504 event): the request's end, the connection
        kept as the stream's head said."""
        self._close(ex, 504, admitted)
        return _sse_end(sse_error_event(504, msg)), ex.head_keep

    def on_abandon(self, ex: Exchange) -> None:
        """The client left (or the lane closed) with the request in flight."""
        if ex.waiter is not None:
            self._unpark(ex, 499)
            return
        self._settle(ex, False)
        self.api.metrics.disconnects.inc((ex.endpoint,))
        self._close(ex, 499)

    def on_failure(
        self, ex: Exchange, kind: int, sent: bool, reused: bool, got: bool
    ) -> Continuation:
        """No answer came: the same judgement as the pool's and the express lane's (retry on
        another worker, or the error), run on the handed-back connection. SIDE: the prefill
        leg that went with it failed (:meth:`on_side`), which the client hears."""
        if type(ex) is NativeExchange:  # (parked for its answer: only its time runs out)
            return self.native.timed_out(ex)  # type: ignore[union-attr]
        if kind == SIDE:
            self._settle(ex, False)  # (cancelled: no fault of the decode worker)
            error = _client_error(ex.greq, ex.side_error)  # type: ignore[union-attr]
            return self._continue(ex, _raising(error))
        exc = _upstream_error(ex.worker, kind, sent, self.pipe.response_timeout_s)
        self._settle(ex, False)
        gone = kind == DROPPED and sent and reused and not got
        return self._continue(ex, partial(self._failed, ex, exc, gone))

    async def _failed(
        self, ex: Exchange, exc: upstream.UpstreamError, gone: bool, req: Request,
        responder: Responder,
    ) -> None:  # fmt: skip
        # a pooled connection dead at once: the pool's test, is the worker gone? (then
        # another worker may take the request, as the pool's request() decides)
        if gone and not await self.pool._reachable(ex.worker.origin):
            exc.retryable = True
            exc.message += " (and no longer accepts connections)"
        if ex.stage == "p":
            first = self.disagg.leg_failed("p", ex.worker, exc)
            await self._prefilled(ex, first, req, responder)
            return
        await self._retry(ex, self._judge(ex, exc, responder), req, responder)

    def _may_retry(self, ex: Exchange) -> bool:
        """Whether a merged or decode leg that failed may go to another worker (a decode
        leg's retry keeps the hand-off: always, as :meth:`DisaggRunner.express` asks)."""
        return ex.stage == "d" or self.pipe.max_attempts > 1

    def _judge(
        self, ex: Exchange, exc: upstream.UpstreamError, responder: Responder
    ) -> GatewayError | None:
        """:meth:`Pipeline.failed` on a merged or decode leg's failure: the failure to retry,
        or None; the client's error raised (a decode leg's naming the stage)."""
        try:
            return self.pipe.failed(
                exc, responder, ex.stage, ex.worker, (ex.worker,), self._may_retry(ex)
            )
        except GatewayError as err:
            raise (_stage_failed("d", err) if ex.stage == "d" else err) from None

    async def _retry(
        self, ex: Exchange, failure: GatewayError | None, req: Request, responder: Responder
    ) -> None:
        """A merged or decode leg's next attempts after ``failure`` (None: it was answered)."""
        if failure is None:
            return
        if ex.stage == "d":
            await self._after_decode(ex, failure, req, responder)  # type: ignore[arg-type]
        else:
            await self.pipe.attempts(
                self._greq(ex), responder, ex.ctx, ex.worker, _journal(ex), failure=failure
            )

    def on_handoff(self, ex: Exchange, fd: int, data: bytes) -> Continuation:
        """An answer the lane does not relay: read on the pool's terms (its connection joins
        the pool when the answer is whole) by the code the express lane hands it to."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = upstream._Conn(RawStream(sock))
        conn.requests = 1
        self.pool._origins.add(ex.worker.origin)
        return self._continue(ex, partial(self._handed, ex, conn, data))

    async def _handed(
        self, ex: Exchange, conn: Any, data: bytes, req: Request, responder: Responder
    ) -> None:
        pipe, stage, worker = self.pipe, ex.stage, ex.worker
        ok = False
        failure: Any = None
        first: Any = None
        try:
            resp = await self._response(ex, conn, data)
            if stage == "p":
                try:
                    answer = await resp.read_all()
                finally:
                    resp.release()
                ok = self.disagg.leg_answered(worker, resp.status)
                first = (resp.status, answer)
            else:  # (a stream handed over: no journal, a break ends it with an error event)
                failure = await pipe.answer(
                    ex.greq or self._greq(ex), responder, resp, stage, worker, ex.ctx,
                    (worker,), self._may_retry(ex), ex.t_sent,
                )  # fmt: skip
                ok = failure is None
        except upstream.UpstreamError as exc:  # (as Pipeline.dispatch_whole, DisaggRunner._leg)
            if stage == "p":
                first = self.disagg.leg_failed("p", worker, exc)
            else:
                failure = exc  # judged below, outside this handler
        except GatewayError as exc:  # (p.answer's and p.failed's: the client's to hear)
            raise (_stage_failed("d", exc) if stage == "d" else exc) from None
        finally:
            self._settle(ex, ok)
        if stage == "p":
            await self._prefilled(ex, first, req, responder)
            return
        if isinstance(failure, upstream.UpstreamError):
            failure = self._judge(ex, failure, responder)
        await self._retry(ex, failure, req, responder)

    async def _response(self, ex: Exchange, conn: Any, data: bytes) -> upstream.Response:
        """A :class:`~lmgw.transport.pool.Response` on the connection the lane read ``data``
        from (a whole head: the lane hands over no less)."""
        try:
            conn.reader.reset()
            conn.reader.feed(data)
        except Exception as exc:  # (httptools' errors)
            conn.close()
            raise upstream.UpstreamError(f"bad answer: {exc}") from None
        while not conn.reader.headers_complete:
            more = await conn.stream.receive_some(65536)
            if not more:
                conn.close()
                raise upstream.UpstreamError("worker closed the connection mid-answer")
            conn.reader.feed(more)
        return upstream.Response(self.pool, ex.worker.origin, conn)

    # -- continuations -----------------------------------------------------------------------
    def raising(self, ex: Exchange, exc: GatewayError) -> Continuation:
        """The continuation that answers ``exc`` on the server."""
        return self._continue(ex, _raising(exc))

    def _continue(self, ex: Exchange, finish: Handler) -> Continuation:
        cont = Continuation(ex.req, partial(self._finishing, ex, finish), ex.t0)
        cont.midstream = ex.head_sent  # (a keep-alive's head: the server sends no other)
        return cont

    async def _finishing(
        self, ex: Exchange, finish: Handler, req: Request, responder: Responder
    ) -> None:
        """A continuation's handler: ``finish``, with :meth:`OpenAIAPI.generate`'s error
        answer and accounting around it."""
        api = self.api
        status = 200
        if ex.extra:  # (as CorsHandler wraps it)
            responder = CorsResponder(responder, ex.extra)  # type: ignore[assignment]
        key = ex.req.principal
        if key is not None and (key.rate or key.tpm):  # (as Guarded wraps it)
            responder = RateLimitHeaders(responder, key)
        if ex.meter is not None:  # (as generate wraps it), timed from the request's arrival
            meter = UsageMeter(responder)
            meter.t_start = ex.meter.t_start
            meter.carry(ex.meter)  # (a stream the lane began: what it relayed counts too)
            responder = ex.meter = meter
        stream = ex.stream
        try:
            if stream is None:
                await finish(req, responder)
            elif await run_stream(  # (as generate's: comments until the first event, after
                req, responder, partial(finish, req),  # the lane's head if it sent one)
                api.sse_keepalive_s if not stream.started else 0.0,
                head_sent=ex.head_sent, counted=api.metrics.keepalives.inc,
            ):  # fmt: skip
                status = api.abandoned(req, ex.rid, ex.model, ex.endpoint)  # (the deadline's)
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

    async def _prefilled(
        self, ex: PDExchange, first: Any, req: Request, responder: Responder
    ) -> None:
        await self.disagg.express_prefilled(
            ex.greq, responder, ex.body, ex.pctx, ex.dialect, ex.prefill, ex.decode, ex.ctx,
            first, _journal(ex),
        )  # fmt: skip

    async def _after_decode(
        self, ex: PDExchange, failure: Any, req: Request, responder: Responder
    ) -> None:
        await self.disagg.after_decode(
            ex.greq, responder, ex.body, ex.pctx, ex.dialect, ex.prefill, ex.decode, ex.ctx,
            ex.leg, ex.handoff, failure, _journal(ex),
        )  # fmt: skip

    async def _pair(self, ex: PDExchange, failure: Any, req: Request, responder: Responder) -> None:
        await self.disagg.pair_after(
            ex.greq, responder, ex.body, ex.pctx, ex.dialect, ex.prefill, ex.decode, ex.ctx,
            failure, _journal(ex),
        )  # fmt: skip

    async def _attempts(self, ex: Exchange, req: Request, responder: Responder) -> None:
        await self.pipe.attempts(self._greq(ex), responder, ex.ctx, ex.worker, _journal(ex))

    def _greq(self, ex: Exchange) -> GatewayRequest:
        greq = GatewayRequest(
            ex.endpoint, ex.path, ex.model, ex.stream is not None, ex.req.body, ex.rid,
            ex.forward, ex.t0,
        )  # fmt: skip
        greq.trace = ex.trace  # a retry's legs under the request's span
        greq.usage_fill = ex.usage_fill
        greq.output = ex.output  # (one parse state: a continuation goes on with it)
        return greq


def _always() -> bool:
    return True


def _journal(ex: Exchange) -> list[bytes] | None:
    """A fresh migration journal for a stream the server relays from here (None: none)."""
    stream = ex.stream
    return None if stream is None or stream.journal is None else migration.Journal(ex.endpoint)


def _is_event_stream(head: bytes) -> bool:
    """Whether a response head's Content-Type is ``text/event-stream``."""
    at = head.lower().find(b"\r\ncontent-type:")
    if at < 0:
        return False
    end = head.find(b"\r\n", at + 2)
    return head[at + 15 : end].strip(b" \t").lower().startswith(b"text/event-stream")


def _sse_end(event: bytes) -> bytes:
    """A stream's last bytes: ``event`` (an SSE error event and ``[DONE]``), then the end."""
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event)


def _stream_error(worker: Any, kind: int, stall_s: float) -> upstream.UpstreamError:
    """The pool's :class:`UpstreamError` for a stream that broke mid-answer."""
    origin = worker.origin
    where = f"{origin.host}:{origin.port}"
    if kind == TIMEOUT:
        return upstream.UpstreamError(
            f"worker {where} sent nothing for {stall_s:g} s mid-stream", status=504
        )
    if kind == PROTOCOL:
        return upstream.UpstreamError(f"worker {where}: the stream could not be read")
    if kind == ABORTED:
        return upstream.UpstreamError(f"worker {where} was taken out of rotation mid-stream")
    return upstream.UpstreamError(f"worker {where} closed the connection mid-response")


def _limits(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` headers of the request's key, if it has limits (what
    :class:`lmgw.api.keys.RateLimitHeaders` adds on the server)."""
    key = ex.req.principal
    if key is None or not (key.rate or key.tpm):
        return []
    return rate_limit_headers(key, _key_clock())


def _raising(exc: GatewayError) -> Handler:
    async def finish(req: Request, responder: Responder) -> None:
        raise exc

    return finish


def _upstream_error(worker: Any, kind: int, sent: bool, timeout_s: float) -> upstream.UpstreamError:
    """The pool's :class:`UpstreamError` (and message) for a failure of the lane's exchange."""
    origin = worker.origin
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
            f"worker {where} dropped the connection", retryable=not sent, sent=sent
        )
    return UpstreamError(f"worker {where}: the answer could not be read")
