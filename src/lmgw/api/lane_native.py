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

from .._fast.relay_py import PARK
from ..config import FLOW_ROLES
from ..errors import GatewayError
from ..http.server import build_head
from ..pipeline.native import _Job, check_generate, choices, sampling_params
from ..pipeline.request import GatewayRequest
from ..protocol.messages import Delta, FailureCode, Finish, Generate, Incoming
from ..routing.policy import RouteContext
from ..transport.zmq.channel import RpcError

if TYPE_CHECKING:
    from ..http.types import Request, Responder
    from ..text.service import ModelText
    from .lane import Continuation, LaneApp, NativeExchange
    from .openai import _Body

_now = time.perf_counter
log = logging.getLogger("lmgw.lane")
_JSON = b"application/json"
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
    ) -> NativeExchange:
        """The request's exchange (``obj``: its decoded body, as the worker runs it; raises
        :class:`GatewayError` for a bad sampling parameter: the server answers it)."""
        params = sampling_params(endpoint, obj)
        ex = self.exchange_class(req, endpoint, path, model, rid)
        greq = ex.greq = GatewayRequest(endpoint, path, model, False, req.body, rid, forward, t0)
        greq.obj = obj
        greq.prompt_ids = prompt
        greq.output = output
        job = ex.job = _Job(obj, prompt, params)
        ex.synth = self.runner._synth(greq, job, self.lane.gw.text_for(model), obj)
        ctx = ex.ctx = RouteContext(model, rid)
        ctx.tokens = prompt
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
        msg = Generate(
            ex.rid, ex.model, prompt_token_ids=job.prompt, params=job.params,
            timeout_s=runner._timeout_s(ex.greq), stream=False,
        )  # fmt: skip
        try:
            check_generate(chan, worker, msg)
        except RpcError as exc:  # a capability it lacks: another worker, as on the server
            return lane._continue(ex, partial(self._retry, ex, worker, exc))
        route = chan.open_nowait(msg, partial(self._item, ex), partial(self._end, ex))
        if route is None:  # the server's path waits for the channel, or says why not
            return lane._continue(ex, partial(self._serve, ex))
        ex.worker, ex.chan, ex.leg = worker, chan, route
        ex.t_sent = runner.leg_start(worker, "pd", ex.ctx)
        timeout = lane.request_timeout_s
        first = runner.first_timeout_s
        return (
            PARK,
            b"",
            ex,
            ex.t0 + timeout if timeout else 0.0,
            ex.t_sent + first if first and first != math.inf else 0.0,
        )

    # -- the channel's callbacks (inside its reader's dispatch) ------------------------------
    def _item(self, ex: Any, item: Any) -> None:
        msg = item.msg if type(item) is Incoming else item
        cls = type(msg)
        if cls is Delta:
            ex.answer.add(msg)
            return
        if cls is not Finish:
            self._end(ex, RpcError(FailureCode.PROTOCOL, f"a {cls.__name__} answered Generate"))
            return
        try:
            self._answer(ex, msg)
        except Exception as exc:  # (a bug: the client still hears of it)
            log.exception("lane: the native answer of request %s failed", ex.rid)
            self._end(ex, RpcError(FailureCode.PROTOCOL, f"building the answer failed: {exc}"))

    def _answer(self, ex: Any, finish: Finish) -> None:
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

    def _end(self, ex: Any, error: RpcError | None) -> None:
        """The route ended: after the answer (nothing to do), or failed before it: the
        attempts after this one are the server's."""
        if ex.leg is None:
            return  # answered, or ended by the relay (its deadline, the client gone)
        if error is None:
            error = RpcError(FailureCode.PROTOCOL, "the request ended without Finish")
        worker = ex.worker
        self.runner.failed(worker, "pd", error)
        self.settle(ex, False)
        lane = self.lane
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

    # -- on the server -------------------------------------------------------------------------
    async def _serve(self, ex: Any, req: Request, responder: Responder) -> None:
        await self.runner.run(ex.greq, responder)

    async def _retry(
        self, ex: Any, worker: Any, error: RpcError, req: Request, responder: Responder
    ) -> None:
        await self.runner.lane_retry(ex.greq, responder, ex.job, ex.ctx, ex.synth, worker, error)
