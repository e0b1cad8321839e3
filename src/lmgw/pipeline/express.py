"""The express lane: a plain non-streamed chat or completion on merged or P/D HTTP workers.

Why: the general path (:meth:`Pipeline.run` and :meth:`Pipeline.dispatch`) serves every flow
and feature: streams, hedging, migration, taps, rewrites, dialects, traces. For the request
that needs none of them, walking that machinery costs more than the work itself: each of its
steps is cheap, but together they were a third of the gateway's CPU per request (measured
with floor.py at c=64: express lane / general path 0.72-0.87x, benchmarks/README.md "The
express lane").

Which requests are plain is the API's call (:meth:`lmgw.api.openai.OpenAIAPI.generate`): no
stream, no model route, alias, media, tool loop, output parsing, context check, usage meter
or trace, and :meth:`Pipeline.express_for` the model. Here the same routing, load accounting,
metrics and failure handling as the general path, in one attempt
(:meth:`Pipeline.dispatch_whole`): a whole answer below 400 that came in one read
(:meth:`ConnectionPool.request` ``whole``) goes straight to the client; anything else (an
error status, a split or chunked body, a failed exchange) goes on through the general code
from where the lane stands (:meth:`Pipeline.answer`, :meth:`Pipeline.failed`, then
:meth:`Pipeline.attempts` for the retries). P/D models in a
sequential dialect whose decode retries keep the hand-off take the disaggregated runner's
lane (:meth:`lmgw.pipeline.disagg.DisaggRunner.express`): the same idea for two legs.
"""

from __future__ import annotations

from collections.abc import Callable

from ..http.types import Headers, Responder
from ..routing.policy import RouteContext
from ..workers.worker import Worker
from .request import GatewayRequest
from .runner import Pipeline


async def run_express(
    pipe: Pipeline,
    responder: Responder,
    model: str,
    path: str,
    body: bytes,
    request_id: str,
    forward: Headers,
    make_greq: Callable[[], GatewayRequest],
    route: RouteContext | None = None,
) -> None:
    """Serve one plain request on a merged worker; ``make_greq`` builds the request object
    the general path needs, only when the lane hands over to it; ``route``: the routing keys
    when the policy routes on the prompt or the session."""
    ctx = route or pipe.context(model, request_id)
    dialect = pipe.dialect_of(model)
    if dialect is not None:  # P/D: both legs in the disaggregated runner's lane
        await pipe.disagg.express(make_greq(), responder, dialect, ctx)
        return
    worker = pipe.pick(model, "pd", ctx)
    await serve_express(pipe, responder, worker, ctx, path, body, request_id, forward, make_greq)


async def serve_express(
    pipe: Pipeline,
    responder: Responder,
    worker: Worker,
    ctx: RouteContext,
    path: str,
    body: bytes,
    request_id: str,
    forward: Headers,
    make_greq: Callable[[], GatewayRequest],
) -> None:
    """The lane once ``worker`` is chosen (the compiled lane comes here too, for a worker it
    cannot reach itself)."""
    pipe.express_served += 1
    failure = await pipe.dispatch_whole(
        responder, "pd", worker, ctx, pipe.max_attempts > 1, path, forward, body, request_id,
        make_greq,
    )  # fmt: skip
    if failure is not None:  # retryable: the general path's next attempts
        await pipe.attempts(make_greq(), responder, ctx, worker, failure=failure)
