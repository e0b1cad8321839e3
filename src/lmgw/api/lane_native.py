"""Native (ZeroMQ) workers' plain requests in the compiled lane.

Why: a native model's requests went through the trio server, the pipeline and a task per
request (:class:`lmgw.pipeline.native.NativeRunner`), about half of the gateway's CPU per
request beside the chat template and the tokenizer (issue 4, ``benchmarks/zmq_vs_http.py``).
Here the lane parses the request and renders and tokenizes it inline, as it does for the
context check (:meth:`ModelText.validate_inline`), and sends the ``Generate`` on the chosen
worker's channel without a task (:meth:`RpcChannel.open_nowait`). The client waits parked in
the relay (``PARK``: its deadlines run there); the channel's reader hands the answer's events
to this module as they come (:class:`WholeAnswer` builds the body, as the trio path does) and
the answer goes out with :meth:`Relay.reply`.

Taken here: a non-streamed chat or completion of one prompt, one choice, no media, on a model
whose flow is merged workers, without tracing. A failure before the answer (the worker's, the
channel's, the answer's timeout) goes to the server as a continuation that makes the attempts
after this first one (:meth:`NativeRunner.lane_retry`); a channel that cannot take the message
at once (no session yet, a full outbox, the request id in flight already) hands the request to
the server's native path whole. The client gone or the request's deadline passed: the worker
gets an ABORT.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from .._fast.relay_py import PARK, PROTOCOL
from ..config import FLOW_ROLES
from ..errors import GatewayError
from ..http.server import build_head
from ..pipeline.native import _Job, check_generate, choices, sampling_params
from ..pipeline.request import GatewayRequest
from ..protocol.messages import Delta, FailureCode, Finish, Generate, Incoming
from ..transport.openai_http import SSE_HEADERS
from ..transport.zmq.channel import RpcError

if TYPE_CHECKING:
    from ..http.types import Request, Responder
    from ..text.service import ModelText
    from .lane import Continuation, LaneApp, NativeExchange
    from .openai import _Body

_now = time.perf_counter
log = logging.getLogger("lmgw.lane")
_JSON = b"application/json"
_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
_ROLES = ("pd",)


class NativeLane:
    """The lane's native requests for ``lane`` (a :class:`lmgw.api.lane.LaneApp`)."""

    def __init__(self, lane: LaneApp, exchange_class: type[NativeExchange]) -> None:
        self.lane = lane
        self.runner = lane.pipe.native
        self.exchange_class = exchange_class
        #: answers built and written here (lmgw_lane_native_total)
        self.answered = 0

    def serves(self, model: str) -> bool:
        """Whether ``model`` is a native model whose plain requests the lane takes."""
        runner = self.runner
        if not runner.handles(model):
            return False
        pipe = runner.p
        return FLOW_ROLES[pipe.flows.get(model, pipe.default_flow)] == _ROLES

    def exchange(
        self,
        req: Request,
        endpoint: str,
        path: str,
        model: str,
        rid: str,
        forward: list[tuple[bytes, bytes]],
        obj: dict[str, Any],
        prompt: list[int],
        output: Any,
        t0: float,
        stream: bool,
    ) -> NativeExchange:
        """The request's exchange (``obj``: its decoded body, as the worker runs it; raises
        :class:`GatewayError` for a bad sampling parameter: the server answers it)."""
        params = sampling_params(endpoint, obj)
        ex = self.exchange_class(req, endpoint, path, model, rid)
        greq = ex.greq = GatewayRequest(endpoint, path, model, stream, req.body, rid, forward, t0)
        greq.obj = obj
        greq.prompt_ids = prompt
        greq.output = output
        job = ex.job = _Job(obj, prompt, params)
        ex.synth = self.runner._synth(greq, job, self.lane.gw.text_for(model), obj)
        return ex

    @staticmethod
    def prompt(text: ModelText, endpoint: str, body: _Body) -> list[int] | None:
        """The prompt's token ids, tokenized inline (the context checked and ``max_tokens``
        filled in, as the server's path does with ``models[].validate_context``); None where
        the server's path must: a long prompt (encoded in a worker thread), a batch of
        prompts, media, a chat template of the request's own. Raises the check's 400."""
        obj = body.obj
        if text.validate_context:
            checked = text.validate_inline(endpoint, obj)
            if checked is None:
                return None
            changed, ids = checked
            body.changed |= changed
            return ids
        prompts = text.prompts_inline(endpoint, obj)
        return prompts[0] if prompts is not None and len(prompts) == 1 else None

    @staticmethod
    def plain(obj: dict[str, Any]) -> bool:
        """Whether the request asks for one choice (not a fan-out)."""
        try:
            return choices(obj) == 1
        except GatewayError:
            return False  # (the server answers the 400)

    def start(self, ex: Any) -> tuple | Continuation:
        """The request holds its admission slot: its Generate leaves, and the client waits
        parked for the answer (the plan), or the server takes the request."""
        lane, runner = self.lane, self.runner
        if ex.trace is not None:  # spans: the server's native path makes them
            return lane._continue(ex, partial(self._serve, ex))
        try:
            worker = runner._first(ex.model, "pd", ex.ctx)
        except GatewayError as exc:
            return lane.raising(ex, exc)
        chan = worker.channel
        job = ex.job
        stream = ex.stream
        msg = Generate(
            ex.rid, ex.model, prompt_token_ids=job.prompt, params=job.params,
            timeout_s=runner._timeout_s(ex.greq), stream=stream is not None,
        )  # fmt: skip
        try:
            check_generate(chan, worker, msg)
        except RpcError as exc:  # a capability it lacks: another worker, as on the server
            return lane._continue(ex, partial(self._retry, ex, worker, exc))
        if stream is None:
            route = chan.open_nowait(msg, partial(self._item, ex), partial(self._end, ex))
        else:
            route = chan.open_nowait(
                msg, partial(self._item, ex), partial(self._end, ex), partial(self._events, ex)
            )
        if route is None:  # the server's path waits for the channel, or says why not
            return lane._continue(ex, partial(self._serve, ex))
        ex.worker, ex.chan, ex.leg = worker, chan, route
        ex.t_sent = runner.leg_start(worker, "pd", ex.ctx)
        timeout = lane.request_timeout_s
        first = runner.first_timeout_s
        plan = (
            PARK,
            b"",
            ex,
            ex.t0 + timeout if timeout else 0.0,
            ex.t_sent + first if first and first != math.inf else 0.0,
        )
        if stream is not None:  # keep-alive comments until the first event
            return (*plan, stream, lane.api.sse_keepalive_s > 0)
        return plan

    # -- the channel's callbacks (inside its reader's dispatch) ------------------------------
    def _item(self, ex: Any, item: Any) -> None:
        msg = item.msg if type(item) is Incoming else item
        cls = type(msg)
        if cls is Delta:
            if ex.stream is None:
                ex.answer.add(msg)
            else:
                self._events(ex, [msg])
            return
        if cls is not Finish:
            self._end(ex, RpcError(FailureCode.PROTOCOL, f"a {cls.__name__} answered Generate"))
            return
        try:
            if ex.stream is None:
                self._answer(ex, msg)
            else:
                self._last(ex, msg)
        except Exception as exc:  # (a bug: the client still hears of it)
            log.exception("lane: the native answer of request %s failed", ex.rid)
            self._end(ex, RpcError(FailureCode.PROTOCOL, f"building the answer failed: {exc}"))

    def _answer(self, ex: Any, finish: Finish) -> None:
        """A whole answer, at its Finish."""
        if ex.leg is None:
            return
        lane = self.lane
        body = ex.answer.body(finish, ex.synth, ex.output)
        self.settle(ex, True, cancel=False)  # (the channel forgets the route after this)
        keep = ex.keep_alive and not lane.draining
        headers = lane._answer_headers(ex, [(b"content-type", _JSON)])
        if ex.meter is not None:
            ex.meter.whole(200, body)
        head = build_head(200, headers, b"content-length: %d\r\n\r\n" % len(body), keep)
        if lane.relay.reply(ex, head + body, keep, _now()):
            self.answered += 1
            lane._close(ex, 200)

    def _events(self, ex: Any, deltas: list[Delta]) -> None:
        """A stream's Deltas (a batch's together): their events in one write."""
        if ex.leg is None:
            return
        synth = ex.synth
        if len(deltas) == 1:
            d = deltas[0]
            data = synth.delta(d.text, d.token_ids, d.logprobs)
        else:
            data = synth.deltas(deltas)
        self._send(ex, data, len(deltas))

    def _send(self, ex: Any, data: bytes, n: int, last: bool = False) -> None:
        """Events for the client (``last``: the stream's end): the head before the first,
        chunked; the first event's metrics; the stall deadline of the next."""
        lane, stream = self.lane, ex.stream
        if ex.output is not None:  # may hold text back (a tool call being parsed): b""
            data = ex.output.events(data)
        if ex.meter is not None:
            data = ex.meter.events_of(data)
        out = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        if not stream.started:
            stream.started = True
            if not ex.head_sent:
                keep = lane._commit(ex)
                out = build_head(200, lane._answer_headers(ex, SSE_HEADERS), _CHUNKED, keep) + out
            lane.on_first(ex)
        stream.events += n
        now = _now()
        if last:
            if lane.relay.reply(ex, out + b"0\r\n\r\n", ex.head_keep, now):
                self.answered += 1
                lane.on_stream_end(ex)
            return
        stall = self.runner.stall_s
        lane.relay.push(ex, out, now + stall if stall != math.inf else 0.0, now)

    def _last(self, ex: Any, finish: Finish) -> None:
        """A stream's Finish: its last events, then the end."""
        if ex.leg is None:
            return
        usage = finish.usage
        data = ex.synth.finish(
            finish.finish_reason, finish.stop_reason, usage.prompt_tokens,
            usage.completion_tokens, usage.cached_tokens,
        )  # fmt: skip
        self.settle(ex, True, cancel=False)
        self._send(ex, data, 1, last=True)

    def _end(self, ex: Any, error: RpcError | None) -> None:
        """The route ended: after the answer (nothing to do), or failed before it: the
        attempts after this one are the server's; a stream that sent events breaks
        (:meth:`broken`)."""
        if ex.leg is None:
            return  # answered, or ended by the relay (its deadline, the client gone)
        if error is None:
            error = RpcError(FailureCode.PROTOCOL, "the request ended without Finish")
        worker = ex.worker
        self.runner.failed(worker, "pd", error)
        lane = self.lane
        if ex.stream is not None and ex.stream.started:
            ex.failure = error
            lane.relay.broke(ex, PROTOCOL, _now())
            return
        self.settle(ex, False)
        lane.relay.hand(ex, lane._continue(ex, partial(self._retry, ex, worker, error)))

    # -- the relay's ends ----------------------------------------------------------------------
    def settle(self, ex: Any, ok: bool, *, cancel: bool = True) -> None:
        """The Generate is over (once): its load accounting; a route still open is cancelled
        (the worker gets an ABORT) unless ``cancel`` is False (its answer came)."""
        route = ex.leg
        if route is None:
            return
        ex.leg = None
        if cancel and not route.ended:
            ex.chan.cancel(route, "the request ended")
        self.runner.leg_end(ex.worker, "pd", ex.ctx, ex.t_sent, ok)

    def timed_out(self, ex: Any) -> Continuation:
        """No answer within ``upstream.response_timeout_s`` (the relay's TIMEOUT): judged as
        the trio path's wait judges it, on the server."""
        worker = ex.worker
        error = RpcError(
            FailureCode.TIMEOUT,
            f"no answer from {ex.chan.endpoint} within {self.runner.first_timeout_s:g}s",
        )
        self.runner.failed(worker, "pd", error)
        self.settle(ex, False)
        return self.lane._continue(ex, partial(self._retry, ex, worker, error))

    def broken(self, ex: Any, kind: int, unsent: bytes) -> Continuation:
        """A stream that sent events broke: the worker's failure (:meth:`_end`), or nothing
        for ``upstream.stream_stall_timeout_s`` (the relay's TIMEOUT). Continued on another
        worker, or ended with an error event, on the server (as the trio path's
        ``_answer``), after what the client has not taken yet."""
        worker, error = ex.worker, ex.failure
        if error is None:  # (the stall)
            error = RpcError(
                FailureCode.TIMEOUT,
                f"{ex.chan.endpoint} sent nothing for {self.runner.stall_s:g}s mid-stream",
            )
            self.runner.failed(worker, "pd", error)
        self.settle(ex, False)
        cont = self.lane._continue(ex, partial(self._continued, ex, worker, error))
        cont.midstream = True
        cont.unsent = unsent
        return cont

    # -- on the server -------------------------------------------------------------------------
    async def _serve(self, ex: Any, req: Request, responder: Responder) -> None:
        await self.runner.run(ex.greq, responder)

    async def _retry(
        self, ex: Any, worker: Any, error: RpcError, req: Request, responder: Responder
    ) -> None:
        await self.runner.lane_retry(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker, error)

    async def _continued(
        self, ex: Any, worker: Any, error: RpcError, req: Request, responder: Responder
    ) -> None:
        await self.runner.lane_broken(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker, error)
