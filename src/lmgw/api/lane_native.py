"""Native (ZeroMQ) workers' plain requests in the compiled lane.

Why: a native model's requests went through the trio server, the pipeline and a task per
request (:class:`lmgw.pipeline.native.NativeRunner`), about half of the gateway's CPU per
request beside the chat template and the tokenizer (issue 4, ``benchmarks/zmq_vs_http.py``).
Here the lane parses the request and renders and tokenizes it inline, as it does for the
context check (:meth:`ModelText.validate_inline`), and sends the ``Generate`` on the chosen
worker's channel without a task (:meth:`RpcChannel.open_nowait`). The client waits parked in
the relay (``PARK``: its deadlines run there); the channel's reader hands the answer's
messages to this module as they come. A whole answer is built at the Finish
(:class:`WholeAnswer`, as the trio path builds it) and goes out with :meth:`Relay.reply`; a
stream's events are built per received batch and go out with :meth:`Relay.push`. A P/D
request sends its ``Prefill`` first the same way; at its ``PrefillDone`` the decode leg
leaves from here, near the prefill worker, with the hand-off (the client parked again).

Taken here: a chat or completion of one prompt and one choice, without media, of a native
model, without tracing. Everything after a leg that failed goes to the server as a
continuation running the trio path's own steps: a client-facing leg's next attempts
(:meth:`NativeRunner.lane_retry`), a prefill's next attempts and the decode leg, or a decode
leg with KV that came through the gateway (:meth:`NativeRunner.lane_prefill`), a stream that
broke or stalled after its first events (:meth:`NativeRunner.lane_broken`: continued, or its
error event). A channel that cannot take the message at once (no session yet, a full outbox,
the request id in flight already) hands the request to the server's native path whole. The
client gone, the request's deadline or the answer's timeout: the worker gets an ABORT.
Each leg's callbacks are bound to its number (``legno``): a leg's late end never touches the
leg after it.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from .._fast.relay_py import PARK, PROTOCOL
from ..config import FLOW_ROLES, ROLE_NAMES
from ..errors import GatewayError
from ..http.server import build_head
from ..pipeline.native import (
    PREFILLED_ON,
    _Job,
    check_generate,
    choices,
    finish_output,
    sampling_params,
)
from ..pipeline.request import GatewayRequest
from ..protocol.messages import Delta, FailureCode, Finish, Generate, Incoming, Prefill
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
        pipe = self.runner.p
        if "p" in FLOW_ROLES[pipe.flows.get(model, pipe.default_flow)]:
            ex.stage = "d"  # (a prefill leg first: start)
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
        """The request holds its admission slot: its first leg leaves (the prefill of a P/D
        flow, else the Generate), and the client waits parked for the answer (the plan), or
        the server takes the request."""
        if ex.trace is not None:  # spans: the server's native path makes them
            return self.lane._continue(ex, partial(self._serve, ex))
        if ex.stage == "d":
            return self._prefill(ex)
        return self._client_leg(ex, None)

    def _prefill(self, ex: Any) -> tuple | Continuation:
        lane, runner = self.lane, self.runner
        try:
            worker = runner._first(ex.model, "p", ex.ctx)
        except GatewayError as exc:
            return lane.raising(ex, exc)
        job = ex.job
        msg = Prefill(
            ex.rid, ex.model, prompt_token_ids=job.prompt, params=job.params,
            timeout_s=runner._timeout_s(ex.greq),
        )  # fmt: skip
        chan = worker.channel
        n = ex.legno = ex.legno + 1
        route = chan.open_nowait(msg, partial(self._prefilled, ex, n), partial(self._p_end, ex, n))
        if route is None:  # the server's path waits for the channel, or says why not
            return lane._continue(ex, partial(self._serve, ex))
        ex.stage, ex.worker, ex.chan, ex.leg = "p", worker, chan, route
        ex.t_sent = runner.leg_start(worker, "p", ex.ctx)
        return self._parked(ex)

    def _client_leg(self, ex: Any, handoff: Any) -> tuple | Continuation:
        """The client-facing Generate (a decode leg with the prefill's ``handoff``)."""
        lane, runner = self.lane, self.runner
        role = "pd" if handoff is None else "d"
        ctx = ex.ctx
        near = ctx.scratch.get(PREFILLED_ON) if ctx.scratch is not None else None
        worker = runner._pick(ex.model, role, ctx, (), near)
        if worker is None:
            error = GatewayError(
                503, f"no healthy {ROLE_NAMES[role]} worker available for model {ex.model!r}"
            )
            return lane.raising(ex, error)
        chan = worker.channel
        job = ex.job
        stream = ex.stream
        msg = Generate(
            ex.rid, ex.model, prompt_token_ids=job.prompt, params=job.params,
            kv_transfer_params=handoff.params if handoff is not None else None,
            timeout_s=runner._timeout_s(ex.greq), stream=stream is not None,
        )  # fmt: skip
        ex.stage = role
        try:
            check_generate(chan, worker, msg)
        except RpcError as exc:  # a capability it lacks: another worker, as on the server
            return lane._continue(ex, partial(self._retry, ex, worker, exc))
        n = ex.legno = ex.legno + 1
        on_item, on_end = partial(self._item, ex, n), partial(self._end, ex, n)
        if stream is None:
            route = chan.open_nowait(msg, on_item, on_end)
        else:
            route = chan.open_nowait(msg, on_item, on_end, partial(self._events, ex, n))
        if route is None:  # the server's path waits for the channel, or says why not
            if handoff is None:
                return lane._continue(ex, partial(self._serve, ex))
            return lane._continue(ex, partial(self._rest, ex, None, None))
        ex.worker, ex.chan, ex.leg = worker, chan, route
        ex.t_sent = runner.leg_start(worker, role, ctx)
        return self._parked(ex)

    def _parked(self, ex: Any) -> tuple:
        """The plan that parks the client for the leg in flight: the request's deadline, the
        answer's timeout; a stream's keep-alive comments until its first event."""
        lane = self.lane
        timeout = lane.request_timeout_s
        first = self.runner.first_timeout_s
        plan = (
            PARK,
            b"",
            ex,
            ex.t0 + timeout if timeout else 0.0,
            ex.t_sent + first if first and first != math.inf else 0.0,
        )
        if ex.stream is not None:
            return (*plan, ex.stream, lane.api.sse_keepalive_s > 0)
        return plan

    # -- a prefill leg's callbacks ---------------------------------------------------------------
    def _prefilled(self, ex: Any, n: int, item: Any) -> None:
        """The prefill's answer: the decode leg leaves from here (KV that came through the
        gateway: the server's decode leg takes its frames)."""
        if n != ex.legno or ex.leg is None:
            return
        lane, runner = self.lane, self.runner
        msg, payload = (item.msg, item.payload) if type(item) is Incoming else (item, ())
        worker = ex.worker
        try:
            handoff = runner.handed(ex.job, ex.ctx, worker, msg, payload)
        except RpcError as exc:
            self._p_end(ex, n, exc)
            return
        self.settle(ex, True, cancel=False)
        ex.handoff = handoff
        if handoff.refs:
            lane.relay.hand(ex, lane._continue(ex, partial(self._rest, ex, None, None)))
            return
        try:
            plan = self._client_leg(ex, handoff)
        except Exception as exc:  # (a bug: the server's path goes on from the hand-off)
            log.exception("lane: the decode leg of request %s failed to start", ex.rid)
            plan = lane.raising(ex, GatewayError(500, f"the decode leg failed to start: {exc}"))
        if type(plan) is tuple:
            lane.relay.resume(ex, plan, _now())
        else:
            lane.relay.hand(ex, plan)

    def _p_end(self, ex: Any, n: int, error: RpcError | None) -> None:
        """The prefill leg failed (or ended without its answer): its next attempts, then the
        decode leg, are the server's."""
        if n != ex.legno or ex.leg is None:
            return  # answered (the decode leg is on), or ended by the relay
        if error is None:
            error = RpcError(FailureCode.PROTOCOL, "the prefill ended without PrefillDone")
        worker = ex.worker
        self.runner.failed(worker, "p", error)
        self.settle(ex, False)
        lane = self.lane
        lane.relay.hand(ex, lane._continue(ex, partial(self._rest, ex, worker, error)))

    # -- the channel's callbacks (inside its reader's dispatch) ------------------------------
    # -- the client-facing leg's callbacks -------------------------------------------------------
    def _item(self, ex: Any, n: int, item: Any) -> None:
        if n != ex.legno:
            return
        msg = item.msg if type(item) is Incoming else item
        cls = type(msg)
        if cls is Delta:
            if ex.stream is None:
                ex.answer.add(msg)
            else:
                self._events(ex, n, [msg])
            return
        if cls is not Finish:
            error = RpcError(FailureCode.PROTOCOL, f"a {cls.__name__} answered Generate")
            self._end(ex, n, error)
            return
        try:
            if ex.stream is None:
                self._answer(ex, msg)
            else:
                self._last(ex, msg)
        except Exception as exc:  # (a bug: the client still hears of it)
            log.exception("lane: the native answer of request %s failed", ex.rid)
            self._end(ex, n, RpcError(FailureCode.PROTOCOL, f"building the answer failed: {exc}"))

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

    def _events(self, ex: Any, n: int, deltas: list[Delta]) -> None:
        """A stream's Deltas (a batch's together): their events in one write."""
        if n != ex.legno or ex.leg is None:
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
        synth = ex.synth
        data = finish_output(synth, finish) + synth.finish(
            finish.finish_reason, finish.stop_reason, usage.prompt_tokens,
            usage.completion_tokens, usage.cached_tokens,
        )  # fmt: skip
        self.settle(ex, True, cancel=False)
        self._send(ex, data, 1, last=True)

    def _end(self, ex: Any, n: int, error: RpcError | None) -> None:
        """The route ended: after the answer (nothing to do), or failed before it: the
        attempts after this one are the server's; a stream that sent events breaks
        (:meth:`broken`)."""
        if n != ex.legno or ex.leg is None:
            return  # answered, or ended by the relay (its deadline, the client gone)
        if error is None:
            error = RpcError(FailureCode.PROTOCOL, "the request ended without Finish")
        worker = ex.worker
        self.runner.failed(worker, ex.stage, error)
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
        if ex.stage == "p":  # (its time in the answer's Server-Timing)
            self.runner.leg_done(ex.greq, ex.worker, "p", ex.ctx, ex.t_sent, ok)
        else:
            self.runner.leg_end(ex.worker, ex.stage, ex.ctx, ex.t_sent, ok)

    def timed_out(self, ex: Any) -> Continuation:
        """No answer within ``upstream.response_timeout_s`` (the relay's TIMEOUT): judged as
        the trio path's wait judges it, on the server."""
        worker, stage = ex.worker, ex.stage
        error = RpcError(
            FailureCode.TIMEOUT,
            f"no answer from {ex.chan.endpoint} within {self.runner.first_timeout_s:g}s",
        )
        self.runner.failed(worker, stage, error)
        self.settle(ex, False)
        finish = self._rest if stage == "p" else self._retry
        return self.lane._continue(ex, partial(finish, ex, worker, error))

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
            self.runner.failed(worker, ex.stage, error)
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
        await self.runner.lane_retry(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker, error,
                                     ex.stage, ex.handoff)  # fmt: skip

    async def _rest(
        self, ex: Any, worker: Any, error: RpcError | None, req: Request, responder: Responder
    ) -> None:
        """A P/D request after its prefill leg failed on ``worker``, or with its hand-off."""
        await self.runner.lane_prefill(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker,
                                       error, ex.handoff)  # fmt: skip

    async def _continued(
        self, ex: Any, worker: Any, error: RpcError, req: Request, responder: Responder
    ) -> None:
        roles = ("p", "d") if ex.stage == "d" else ("pd",)
        await self.runner.lane_broken(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker, error,
                                      roles)  # fmt: skip
