"""Disaggregated flows: E -> P -> D (or E -> PD, P -> D) legs run in order, hand-offs carried.

The dialect (``transport/dialects``) says what each leg sends and what its answer means; this
module owns the I/O around it: choosing a worker per role, counting load, sending the legs,
relaying the last one to the client, retrying a decode that failed before its first byte, and
turning failures into errors that name the stage. It knows roles and stages, not wire formats.

Ordering rules (DESIGN.md §2, PROTOCOLS.md §2-3):

* encoder legs (one per media item) run concurrently and all must succeed before P;
* vLLM dialects read P's whole answer, then build D from it; SGLang sends both at once and
  drains P beside D (never leaving it unread, which the engine would take for an abort);
* the client going away cancels the request's scope: legs not yet sent are never sent, legs in
  flight have their connections closed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..config import FLOW_ROLES
from ..errors import GatewayError, parse_error_body, sse_error_event
from ..http.types import Responder
from ..routing.policy import RouteContext
from ..transport.dialects import (
    BodyError,
    ClientBody,
    Dialect,
    HandOff,
    HandOffError,
    Peer,
    PeerError,
    StageContext,
    StageError,
    StageRequest,
)
from ..transport.pool import UpstreamError
from ..workers.worker import Worker
from . import migration
from .batch_split import run_batch, split_of
from .migration import Splice
from .request import Gate, GatewayRequest, MidStream, Rewrite

if TYPE_CHECKING:
    from .runner import Pipeline

log = logging.getLogger("lmgw.pipeline")

STAGE_NAMES = {"e": "encode", "p": "prefill", "d": "decode", "pd": "merged"}


def peer_of(worker: Worker) -> Peer:
    """How a dialect names ``worker`` on the wire."""
    return Peer(
        worker.origin.host,
        worker.origin.port,
        kv_address=worker.kv_address,
        bootstrap_port=worker.bootstrap_port,
    )


def _stage_context(greq: GatewayRequest, prefill: Worker | None, decode: Worker) -> StageContext:
    """What the dialect needs to build the legs of ``greq`` between these workers."""
    return StageContext(
        request_id=greq.request_id,
        path=greq.path,
        headers=greq.forward_headers,
        prefill=_peer(prefill),
        decode=_peer(decode),
    )


def _peer(worker: Worker | None) -> Peer | None:
    return None if worker is None else peer_of(worker)


class EncodedItems:
    """Media items an encoder answered for, per model, for ``ttl_s``: vLLM's shared encoder
    cache (ECSharedStorageConnector) holds their embeddings, so a request repeating one skips
    its encoder leg. Bounded: the oldest entries go first. A ttl of 0 remembers nothing."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def holds(self, model: str, key: str | None, now: float) -> bool:
        if key is None or not self.ttl_s:
            return False
        until = self._until.get((model, key))
        if until is None:
            return False
        if until <= now:
            del self._until[(model, key)]
            return False
        return True

    def add(self, model: str, key: str | None, now: float) -> None:
        if key is None or not self.ttl_s or not self.max_entries:
            return
        entries = self._until
        entries[(model, key)] = now + self.ttl_s
        entries.move_to_end((model, key))
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._until)

    # the interface the runners use (shared with lmgw.cache.encoder.PooledEncodedItems)
    async def holding(self, model: str, keys: Iterable[str | None]) -> set[str]:
        """The keys among ``keys`` seen encoded within the ttl."""
        now = trio.current_time()
        return {k for k in keys if k is not None and self.holds(model, k, now)}

    async def remember(self, model: str, key: str | None, producer: str) -> None:
        self.add(model, key, trio.current_time())

    keeps_outputs = False
    """Whether :meth:`keep` holds encoder outputs (here: no, it remembers names only)."""

    async def keep(self, model: str, key: str | None, output: Any, producer: str) -> None:
        """An output a native encoder sent back: not held here, so a repeat is encoded again."""

    async def outputs(self, model: str, keys: Iterable[str]) -> dict[str, Any]:
        return {}


class DisaggRunner:
    """Runs one request through a multi-stage flow on behalf of :class:`Pipeline`."""

    def __init__(self, pipeline: Pipeline, encoded: Any = None) -> None:
        self.p = pipeline
        #: media items whose encoder output is cached: a repeat skips the E stage (an
        #: EncodedItems, or lmgw.cache.encoder.PooledEncodedItems on the cache pool)
        self.encoded = encoded if encoded is not None else EncodedItems(0.0, 0)

    async def run(
        self, greq: GatewayRequest, responder: Responder, flow: str, dialect: Dialect
    ) -> None:
        roles = FLOW_ROLES[flow]
        if greq.endpoint == "generate" and not dialect.serves_generate:
            raise _no_generate(greq, flow, dialect)
        body = ClientBody(greq.body)
        if dialect.one_prompt and "p" in roles:
            split = split_of(greq.endpoint, body)
            if split is not None:  # one P/D pair per prompt and sample, merged
                prompts, n = split
                kind = "n" if prompts is None else "batch" if n == 1 else "both"
                metrics = self.p.metrics
                metrics.pd_splits.inc((greq.model, kind))
                metrics.pd_split_pairs.inc((greq.model,), float(len(prompts or (1,)) * n))
                run = partial(self.run, flow=flow, dialect=dialect)
                await run_batch(greq, responder, body, split, run)
                return
        route = greq.route or self.p.route_of(greq)
        p = self.p
        if "p" in roles:
            prefill, decode = p.place(greq.model, route, len(greq.body))
        else:
            prefill, decode = None, p.pick(greq.model, "pd", route)
        ctx = _stage_context(greq, prefill, decode)
        journal = migration.Journal(greq.endpoint) if greq.stream and p.migrations else None
        # conditional disaggregation: a prompt with few tokens left runs whole on the decoder
        local = self._local(greq, route, prefill, decode) if prefill is not None else None
        try:
            await self._run(greq, responder, roles, dialect, body, ctx, prefill, decode, route,
                            journal, local)  # fmt: skip
        finally:
            if p.placement is not None:
                p.placement.release(route)

    def _local(self, greq: GatewayRequest, route: RouteContext, prefill: Worker,
               decode: Worker) -> str | None:  # fmt: skip
        """Why ``decode`` should prefill this P/D request itself, or None
        (:class:`~lmgw.pipeline.local_prefill.LocalPrefill`): its prompt tokens are the
        gateway's (from routing or the context check), else body bytes / 4; what is cached is
        the decode policy's prediction; the loads are the picked workers'."""
        p = self.p
        rule = p.local_prefill.get(greq.model)
        if rule is None:
            return None
        ids = route.tokens if route.tokens is not None else greq.prompt_ids
        engine = decode.engine
        queues = p.local_queues
        return rule.reason(
            len(ids) if ids is not None else len(greq.body) // 4,
            lambda: p.policies["d"].predicted_cached_tokens(decode, route) or 0,
            prefill.load,
            queues.queued(decode.id) if queues is not None else 0,
            engine.waiting,
            engine.kv_usage,
        )

    async def _run(
        self,
        greq: GatewayRequest,
        responder: Responder,
        roles: tuple[str, ...],
        dialect: Dialect,
        body: ClientBody,
        ctx: StageContext,
        prefill: Worker | None,
        decode: Worker,
        route: RouteContext,
        journal: list[bytes] | None,
        local: str | None = None,
    ) -> None:
        try:
            try:
                if "e" in roles and await self._encode(greq, body, ctx, dialect, route):
                    local = None  # media: the prefill worker loads the encoder outputs
                await self._generate(
                    greq, responder, body, ctx, dialect, prefill, decode, route, journal,
                    local=local,
                )  # fmt: skip
            except BaseExceptionGroup as group:
                broken = _only(group, _BrokenStream)
                if broken is None:
                    raise
                await self._continue(greq, responder, roles, dialect, route, broken, journal)
            except _BrokenStream as broken:
                await self._continue(greq, responder, roles, dialect, route, broken, journal)
        except BaseExceptionGroup as group:
            # a failure inside a nursery (encoder fan-out, SGLang's concurrent legs): the first
            # one is the client's answer; cancellations and the rest are dropped with the group
            match, _rest = group.split(_ANSWERABLE)
            if match is None:
                raise
            raise _client_error(greq, _first_leaf(match)) from None
        except _ANSWERABLE as exc:
            raise _client_error(greq, exc) from None

    async def _generate(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker | None,
        decode: Worker,
        route: RouteContext,
        journal: list[bytes] | None,
        splice: Splice | None = None,
        *,
        local: str | None = None,
    ) -> None:
        """The legs after E: one merged leg (``e+pd``), prefill and decode, or (``local``:
        conditional disaggregation, :meth:`_local`, which says why) the decode worker alone,
        prefilling."""
        if local is not None:  # no hand-off: retried like a merged leg (nothing to use up)
            self.p.metrics.pd_local_prefill.inc((greq.model, local))
            leg = dialect.local_request(body, ctx)
            await self._final(
                greq, responder, leg, decode, "d", dialect, None, route,
                journal=journal, splice=splice,
            )  # fmt: skip
        elif prefill is None:  # e+pd: one merged leg with the original content
            leg = dialect.decode_request(body, None, ctx)
            await self._final(
                greq, responder, leg, decode, "pd", dialect, None, route,
                journal=journal, splice=splice,
            )  # fmt: skip
        else:
            await self._prefill_decode(
                greq, responder, body, ctx, dialect, prefill, decode, route, journal, splice
            )

    async def _continue(
        self,
        greq: GatewayRequest,
        responder: Responder,
        roles: tuple[str, ...],
        dialect: Dialect,
        route: RouteContext,
        broken: _BrokenStream,
        journal: list[bytes] | None,
    ) -> None:
        """The client-facing leg broke mid-stream: run the flow's legs again for the rest of
        the answer on another decode (or merged) worker (:mod:`.migration`; E is not re-run:
        the items are pinned and in the encoder cache), or end the stream with an error."""
        p = self.p
        endpoint = greq.endpoint
        role = "d" if "d" in roles else "pd"
        progress = migration.progress_of(journal or [], endpoint)
        tried: tuple[Worker, ...] = (broken.worker,)
        try:
            obj = ClientBody(greq.body).obj
        except BodyError:
            obj = None
        reason: str | None = None
        for _ in range(p.migrations):
            body, reason = await p.next_leg(endpoint, obj, progress)
            others = [w for w in p.registry.candidates(greq.model, role) if w not in tried]
            if reason is None and not others:
                reason = "no other worker"
            if reason is not None:
                break
            decode = p.policies[role].choose(others, route)
            tried += (decode,)
            prefill = p.pick(greq.model, "p", route, near=decode) if "p" in roles else None
            ctx = _stage_context(greq, prefill, decode)
            log.warning(
                "request %s: stream broke after %d tokens; continuing on %s",
                greq.request_id, progress.tokens, decode.id,
                extra={"request_id": greq.request_id, "worker": decode.id},
            )  # fmt: skip
            more = migration.Journal(endpoint)
            try:
                await self._generate(
                    greq, responder, ClientBody(body), ctx, dialect, prefill, decode, route,
                    more, migration.Splice(endpoint, progress),
                )  # fmt: skip
            except BaseExceptionGroup as group:
                if _only(group, _BrokenStream) is None:
                    raise
            except _BrokenStream:
                pass
            else:
                p.metrics.migrations.inc((role, "continued"))
                return
            progress = migration.extend(progress, migration.progress_of(more, endpoint))
        else:
            reason = f"the stream broke {p.migrations + 1} times"
        await p.end_broken_stream(responder, role, reason or "not continued")

    async def _prefill_decode(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        decode: Worker,
        route: RouteContext,
        journal: list[bytes] | None = None,
        splice: Splice | None = None,
        restart: bool = True,
        tried: tuple[Worker, ...] = (),
    ) -> None:
        """P then D (or both at once). A decode that fails before its first byte is retried:
        by :meth:`_final` with the same hand-off when any decode worker can use it; else (the
        hand-off names its decode: a P2P NCCL pair id, an SGLang room; or the failed decode
        may have used it up: NIXL) the pair restarts once, a fresh prefill for another decode
        worker. ``restart``: False when this is that restart already; ``tried``: the decode
        workers that failed this request already (no retry goes to them)."""
        for restartable in (True, False) if restart else (False,):
            try:
                if dialect.concurrent_prefill_decode:
                    await self._concurrent(
                        greq, responder, body, ctx, dialect, prefill, decode, route, restartable,
                        journal, splice,
                    )  # fmt: skip
                else:
                    pre, status, answer, ctx = await self._prefill(
                        greq, body, ctx, dialect, prefill, route
                    )
                    handoff = dialect.read_prefill(pre, status, answer)
                    leg = dialect.decode_request(body, handoff, ctx)
                    await self._final(
                        greq, responder, leg, decode, "d", dialect, handoff, route,
                        restartable=restartable, journal=journal, splice=splice, avoid=tried,
                    )  # fmt: skip
                return
            except BaseExceptionGroup as group:
                match, rest = group.split(_RestartPair)
                if match is None or rest is not None:
                    raise
                failure = _first_leaf(match).failure  # type: ignore[attr-defined]
            except _RestartPair as again:
                failure = again.failure
            tried += (decode,)
            decode = self._restart_with(greq, route, failure, tried)
            ctx = msgspec.structs.replace(ctx, decode=_peer(decode))

    def _restart_with(
        self, greq: GatewayRequest, route: RouteContext, failure: GatewayError, tried: tuple
    ) -> Worker:
        """The decode worker of a restarted pair (none of ``tried``), or the failure as the
        client's error when none is left."""
        p = self.p
        others = [w for w in p.registry.candidates(greq.model, "d") if w not in tried]
        if not others:
            raise GatewayError(failure.status, f"decode stage failed: {failure.message}")
        decode = p.policies["d"].choose(others, route)
        p.metrics.retries.inc(("d",))
        log.info(
            "request %s: decode failed (%s); pair restarted with decode %s",
            greq.request_id, failure, decode.id,
            extra={"request_id": greq.request_id, "worker": decode.id},
        )  # fmt: skip
        return decode

    async def express(
        self, greq: GatewayRequest, responder: Responder, dialect: Dialect, route: RouteContext
    ) -> None:
        """A plain non-streamed P/D request (the express lane, :mod:`.express`; the dialect
        sequential, its decode retries keeping the hand-off): what :meth:`run` does for it,
        without the layers that streams, encoders, migrations and concurrent dialects need.
        The prefill leg is :meth:`_prefill`'s (retries included); a decode answer below 400
        that came whole in one read goes straight to the client; any other answer or failure
        of the decode leg continues in :meth:`_final` from its first attempt's outcome."""
        p = self.p
        if greq.endpoint == "generate" and not dialect.serves_generate:
            raise _no_generate(greq, p.flows.get(greq.model, p.default_flow), dialect)
        body = ClientBody(greq.body)
        if dialect.one_prompt and split_of(greq.endpoint, body) is not None:
            await self.run(greq, responder, p.flows.get(greq.model, p.default_flow), dialect)
            return
        prefill, decode = p.place(greq.model, route, len(greq.body))
        p.express_served += 1
        ctx = _stage_context(greq, prefill, decode)
        try:
            local = self._local(greq, route, prefill, decode)
            if local is not None:  # the decode worker prefills it
                await self._generate(
                    greq, responder, body, ctx, dialect, prefill, decode, route, None, local=local
                )
                return
            pre, status, answer, ctx = await self._prefill(greq, body, ctx, dialect, prefill, route)
            handoff = dialect.read_prefill(pre, status, answer)
            leg = dialect.decode_request(body, handoff, ctx)
            failure = None
            if not dialect.rewrites_decode(handoff):
                timing = greq.server_timing() if greq.timings else None
                try:
                    failure = await p.dispatch_whole(
                        responder, "d", decode, route, True, leg.path, leg.headers, leg.body,
                        greq.request_id, lambda: greq, timing,
                    )  # fmt: skip
                except GatewayError as exc:
                    raise _stage_failed("d", exc) from None
                if failure is None:
                    return
            await self.after_decode(
                greq, responder, body, ctx, dialect, prefill, decode, route, leg, handoff, failure
            )
        except _ANSWERABLE as exc:
            raise _client_error(greq, exc) from None
        finally:
            if p.placement is not None:
                p.placement.release(route)

    def plain_body(self, greq: GatewayRequest, dialect: Dialect) -> ClientBody | None:
        """The body of a request :meth:`express` takes as two plain legs, for the compiled
        lane (:mod:`lmgw.api.lane`), which runs them itself (and releases joint placement's
        hold when the request ends); None when it needs more (a split prompt, local prefill,
        an unserved ``/generate``): the server serves it."""
        p = self.p
        if p.local_prefill.get(greq.model) is not None:
            return None
        if greq.endpoint == "generate" and not dialect.serves_generate:
            return None
        body = ClientBody(greq.body)
        if dialect.one_prompt and split_of(greq.endpoint, body) is not None:
            return None
        return body

    @staticmethod
    def context(greq: GatewayRequest, prefill: Worker, decode: Worker) -> StageContext:
        return _stage_context(greq, prefill, decode)

    async def express_prefilled(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        decode: Worker,
        route: RouteContext,
        first: tuple[int, bytes] | StageError,
        journal: list[bytes] | None = None,
    ) -> None:
        """:meth:`express` from its prefill leg's first attempt on (``first``: its answer, or
        how it failed), for the compiled lane, which ran that attempt itself. ``journal``: a
        stream's (it is continued elsewhere if it breaks)."""
        try:
            pre, status, answer, ctx = await self._prefill(
                greq, body, ctx, dialect, prefill, route, first
            )
            handoff = dialect.read_prefill(pre, status, answer)
            leg = dialect.decode_request(body, handoff, ctx)
            await self.after_decode(
                greq, responder, body, ctx, dialect, prefill, decode, route, leg, handoff, None,
                journal,
            )  # fmt: skip
        except _ANSWERABLE as exc:
            raise _client_error(greq, exc) from None

    async def after_decode(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        decode: Worker,
        route: RouteContext,
        leg: StageRequest,
        handoff: HandOff,
        failure: GatewayError | None,
        journal: list[bytes] | None = None,
    ) -> None:
        """The decode leg of :meth:`express` (or the compiled lane's) after its first attempt
        failed so (``failure``), or, None, from the start: another decode worker with the same
        hand-off, a fresh pair when the hand-off names the failed decode (P2P NCCL, SGLang) or
        the failed attempt consumed it (NIXL), or (a rewritten decode) the general leg. With a
        stream's ``journal``, a decode that breaks mid-stream is continued (:meth:`_continue`)."""
        if failure is not None and (
            not dialect.decode_retry_keeps_handoff
            or (failure.delivered and dialect.decode_consumes_handoff)
        ):
            await self.pair_after(  # a fresh pair
                greq, responder, body, ctx, dialect, prefill, decode, route, failure, journal
            )
            return
        await self._answering(
            greq, responder, dialect, route, journal,
            partial(
                self._final, greq, responder, leg, decode, "d", dialect, handoff, route,
                failure=failure, journal=journal,
            ),
        )  # fmt: skip

    async def pair_after(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        decode: Worker,
        route: RouteContext,
        failure: GatewayError | None,
        journal: list[bytes] | None = None,
    ) -> None:
        """The pair's legs from the start (``failure`` None), or a fresh pair without
        ``decode``, whose leg failed so before any byte with its hand-off used up (or, in a
        concurrent dialect, its prefill leg cancelled): :meth:`after_decode`'s restart, and
        the compiled lane's for a concurrent pair it did not finish."""

        async def legs() -> None:
            tried: tuple[Worker, ...] = ()
            nonlocal decode, ctx
            if failure is not None:
                tried = (decode,)
                decode = self._restart_with(greq, route, failure, tried)
                ctx = msgspec.structs.replace(ctx, decode=_peer(decode))
            await self._prefill_decode(
                greq, responder, body, ctx, dialect, prefill, decode, route, journal,
                restart=failure is None, tried=tried,
            )  # fmt: skip

        await self._answering(greq, responder, dialect, route, journal, legs)

    async def _answering(
        self,
        greq: GatewayRequest,
        responder: Responder,
        dialect: Dialect,
        route: RouteContext,
        journal: list[bytes] | None,
        legs: Callable[[], Awaitable[None]],
    ) -> None:
        """``legs`` of a request taken up after its first legs: a client-facing stream that
        breaks is continued (:meth:`continue_broken`), a leg's failure is the client's error."""
        try:
            await legs()
        except _BrokenStream as broken:  # (continue_broken answers its own failures)
            await self.continue_broken(greq, responder, dialect, route, broken.worker, journal)
        except _ANSWERABLE as exc:
            raise _client_error(greq, exc) from None

    async def continue_broken(
        self,
        greq: GatewayRequest,
        responder: Responder,
        dialect: Dialect,
        route: RouteContext,
        worker: Worker,
        journal: list[bytes] | None,
    ) -> None:
        """A stream whose decode leg on ``worker`` broke mid-way (the compiled lane's, or
        :meth:`after_decode`'s): continued as :meth:`run` continues it."""
        p = self.p
        roles = FLOW_ROLES[p.flows.get(greq.model, p.default_flow)]
        try:
            await self._continue(
                greq, responder, roles, dialect, route, _BrokenStream(worker), journal
            )
        except _ANSWERABLE as exc:
            raise _client_error(greq, exc) from None

    # -- legs -------------------------------------------------------------------------------
    def _other(
        self,
        greq: GatewayRequest,
        role: str,
        route: RouteContext,
        tried: list[Worker],
        exc: StageError,
    ) -> Worker:
        """Another worker of ``role`` for a leg that never reached its worker (connection
        refused, the worker gone): re-raises ``exc`` when the failure is not of that kind,
        ``upstream.max_attempts`` are spent, or no other worker is left."""  # fmt: skip
        worker = self._another(greq, role, route, tried, exc.message) if exc.retryable else None
        if worker is None:
            raise exc
        return worker

    def _another(
        self, greq: GatewayRequest, role: str, route: RouteContext, tried: list[Worker], why: str
    ) -> Worker | None:
        """Another worker of ``role`` for an intermediate leg that failed ``why`` (added to
        ``tried``); None when ``upstream.max_attempts`` are spent or no other worker is left."""
        if len(tried) >= self.p.max_attempts:
            return None
        others = [w for w in self.p.registry.candidates(greq.model, role) if w not in tried]
        if not others:
            return None
        worker = self.p.policies[role].choose(others, route)
        self.p.metrics.retries.inc((role,))
        log.info(
            "request %s: %s leg failed (%s); retried on %s",
            greq.request_id, STAGE_NAMES[role], why, worker.id,
            extra={"request_id": greq.request_id, "worker": worker.id},
        )  # fmt: skip
        tried.append(worker)
        return worker

    def _answered_error(
        self,
        greq: GatewayRequest,
        role: str,
        route: RouteContext,
        tried: list[Worker],
        status: int,
        answer: bytes,
    ) -> Worker | None:
        """Another worker for an intermediate leg whose worker answered ``status`` >= 500
        (nothing of it reached the client, and a failed prefill or encode leaves nothing to
        hand off: as safe to send elsewhere as the merged leg's 5xx); None: the answer stands."""
        return self._another(
            greq, role, route, tried, f"answered {status}: {parse_error_body(answer)[0][:200]}"
        )

    async def _prefill(
        self,
        greq: GatewayRequest,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        route: RouteContext,
        first: tuple[int, bytes] | StageError | None = None,
    ) -> tuple[StageRequest, int, bytes, StageContext]:
        """The prefill leg of a sequential P then D, retried on another prefill worker when it
        could not be delivered or its worker answered 5xx (the leg is rebuilt: it may name its
        prefill peer). Returns the leg, the answer and the context naming the prefill worker
        that answered. ``first``: the first attempt's outcome, when it ran already."""
        tried = [prefill]
        while True:
            pre = dialect.prefill_request(body, ctx)
            try:
                if first is None:
                    status, answer = await self._leg(greq, pre, prefill, "p", route)
                elif isinstance(first, StageError):
                    raise first
                else:
                    status, answer = first
            except StageError as exc:
                first = None
                prefill = self._other(greq, "p", route, tried, exc)
            else:
                first = None
                if status < 500:
                    return pre, status, answer, ctx
                retry = self._answered_error(greq, "p", route, tried, status, answer)
                if retry is None:
                    return pre, status, answer, ctx
                prefill = retry
            ctx = msgspec.structs.replace(ctx, prefill=_peer(prefill))
            await self.p.backoff(len(tried) - 2)

    async def _leg(
        self,
        greq: GatewayRequest,
        leg: StageRequest,
        worker: Worker,
        role: str,
        route: RouteContext,
    ) -> tuple[int, bytes]:
        """Send one intermediate leg and read its whole answer (status, body)."""
        p = self.p
        span = None if greq.trace is None else greq.trace.leg(role, worker)
        headers = leg.headers if span is None else span.headers(leg.headers)
        t0 = self.leg_begin(role, worker, route)
        ok = False
        try:
            resp = await p.pool.request(
                worker.origin, "POST", leg.path, headers, leg.body,
                response_timeout_s=p.response_timeout_s, whole=True,
            )  # fmt: skip
            if isinstance(resp, tuple):  # the usual small answer, whole in one read
                status, answer = resp[0], resp[4]
            else:
                try:
                    answer = await resp.read_all()
                finally:
                    resp.release()
                status = resp.status
            ok = self.leg_answered(worker, status)
            return status, answer
        except UpstreamError as exc:
            raise self.leg_failed(role, worker, exc) from None
        finally:
            self.leg_end(greq, role, worker, route, t0, ok)
            if span is not None:
                span.end(None if ok else "failed")

    def leg_begin(self, role: str, worker: Worker, route: RouteContext) -> float:
        """An intermediate leg leaves for ``worker``: counted in flight; its start time."""
        p = self.p
        p.registry.acquire(worker)
        p.policies[role].on_dispatch(worker, route)
        return time.perf_counter()

    def leg_answered(self, worker: Worker, status: int) -> bool:
        """An intermediate leg's answer ``status``: whether it counts as a success (a 5xx
        counts toward outlier ejection, as a merged worker's does)."""
        if status < 500:
            self.p.registry.record_success(worker)
            return True
        self.p.registry.record_failure(worker, f"answered {status}", eject=False)
        return False

    def leg_failed(self, role: str, worker: Worker, exc: UpstreamError) -> StageError:
        """The stage error of an intermediate leg whose exchange failed so."""
        p = self.p
        p.metrics.upstream_errors.inc((role, worker.id, exc.kind))
        if not exc.local:  # the gateway's own limit is no fault of the worker's
            p.registry.record_failure(worker, exc.message, eject=exc.retryable)
        return StageError(
            STAGE_NAMES[role], exc.status, f"worker {worker.id}: {exc.message}",
            retryable=exc.retryable,
        )  # fmt: skip

    def leg_end(
        self, greq: GatewayRequest, role: str, worker: Worker, route: RouteContext, t0: float,
        ok: bool,
    ) -> None:  # fmt: skip
        """An intermediate leg is over: its stage time (metrics, Server-Timing), the load
        accounting, placement's prefill estimate."""
        p = self.p
        elapsed = time.perf_counter() - t0
        p.metrics.stage.observe((role, worker.id), elapsed)
        if greq.timings is None:
            greq.timings = []
        greq.timings.append((STAGE_NAMES[role], elapsed))
        p.policies[role].on_finish(worker, route, ok)
        if role == "p" and p.placement is not None:
            p.placement.prefill_done(route, greq.model, elapsed, ok)
        p.registry.release(worker)

    async def _encode(
        self,
        greq: GatewayRequest,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        route: RouteContext,
    ) -> int:
        """The E stage: each media item not in the encoder cache encoded, concurrently.
        Returns how many media items the request has (0: no E stage)."""
        legs = dialect.encode_requests(body, ctx)
        if not legs:
            return 0  # no media: the E stage is skipped
        cache = self.encoded
        held = await cache.holding(greq.model, [leg.key for leg in legs])
        todo = [leg for leg in legs if leg.key not in held] if held else legs
        self.p.metrics.encoder_cache_lookups.inc((greq.model,), len(legs))
        if len(todo) < len(legs):
            self.p.metrics.encoder_cache_hits.inc((greq.model,), len(legs) - len(todo))
        if not todo:
            return len(legs)  # every item is in the encoder cache already

        async def one(leg: StageRequest) -> None:
            # the item's key routes it: the encoder that has it (consistent_hash by default)
            item_route = RouteContext(greq.model, greq.request_id, session_key=leg.key)
            worker = self.p.pick(greq.model, "e", item_route)
            tried = [worker]
            while True:
                try:
                    status, answer = await self._leg(greq, leg, worker, "e", item_route)
                except StageError as exc:  # not delivered: another encoder, same leg
                    worker = self._other(greq, "e", item_route, tried, exc)
                else:
                    if status < 500:
                        break
                    retry = self._answered_error(greq, "e", item_route, tried, status, answer)
                    if retry is None:
                        break
                    worker = retry
                await self.p.backoff(len(tried) - 2)
            dialect.read_encode(leg, status, answer)
            await cache.remember(greq.model, leg.key, worker.id)

        async with trio.open_nursery() as nursery:
            for leg in todo:
                nursery.start_soon(one, leg)
        return len(legs)

    async def _final(
        self,
        greq: GatewayRequest,
        responder: Responder,
        leg: StageRequest,
        worker: Worker,
        role: str,
        dialect: Dialect,
        handoff: HandOff | None,
        route: RouteContext,
        gate: Gate | None = None,
        *,
        restartable: bool = False,
        journal: list[bytes] | None = None,
        splice: Splice | None = None,
        failure: GatewayError | None = None,
        avoid: tuple[Worker, ...] = (),
    ) -> None:
        """The leg whose answer the client gets. A decode that fails before its first byte is
        retried once on another worker of the role when the hand-off allows it; when it does
        not and ``restartable``, :class:`_RestartPair` asks the caller for a fresh pair.
        ``failure``: the first attempt already ran on ``worker`` (:meth:`express`) and
        failed so; ``avoid``: workers of the role that failed this request already."""
        if gate is None and handoff is not None and dialect.rewrites_decode(handoff):
            fixed = _rewrite(dialect, handoff)

            async def gate() -> Rewrite:
                return fixed

        p = self.p
        keeps = role == "pd" or dialect.decode_retry_keeps_handoff
        attempts = 2 if keeps else 1
        tried = avoid
        # a decode leg without a hand-off prefills: counted in its worker's local queue
        queues = p.local_queues if role == "d" and handoff is None else None
        for attempt in range(attempts):
            if attempt or failure is None:
                if queues is not None:
                    queues.sent(worker.id, route)
                answered = False
                try:
                    failure = await p.dispatch(
                        greq, responder, role, worker, route,
                        attempt + 1 < attempts or (restartable and not keeps),
                        leg.path, leg.headers, leg.body, gate, journal, splice,
                    )  # fmt: skip
                    answered = failure is None
                except GatewayError as exc:
                    raise _stage_failed(role, exc) from None
                finally:
                    if queues is not None:
                        queues.ended(route, answered)
                if failure is None:
                    return
            if isinstance(failure, MidStream):
                raise _BrokenStream(worker)
            if not keeps:
                raise _RestartPair(failure)
            if (
                role == "d"
                and failure.delivered
                and dialect.decode_consumes_handoff
                and handoff is not None  # (a local prefill has none to use up)
            ):
                if restartable:  # the hand-off may be used up: only a fresh pair can retry
                    raise _RestartPair(failure)
                raise GatewayError(failure.status, f"decode stage failed: {failure.message}")
            tried += (worker,)
            others = [w for w in p.registry.candidates(greq.model, role) if w not in tried]
            if not others:
                raise GatewayError(
                    failure.status, f"{STAGE_NAMES[role]} stage failed: {failure.message}"
                )
            worker = p.policies[role].choose(others, route)
            p.metrics.retries.inc((role,))
            log.info(
                "request %s: decode retried on %s after %s", greq.request_id, worker.id, failure,
                extra={"request_id": greq.request_id, "worker": worker.id},
            )  # fmt: skip
            await p.backoff(attempt)

    async def _concurrent(
        self,
        greq: GatewayRequest,
        responder: Responder,
        body: ClientBody,
        ctx: StageContext,
        dialect: Dialect,
        prefill: Worker,
        decode: Worker,
        route: RouteContext,
        restartable: bool = False,
        journal: list[bytes] | None = None,
        splice: Splice | None = None,
    ) -> None:
        """SGLang: P and D at once with the room fixed up front; D relayed, P drained.

        A failed prefill cancels the decode at once (it would otherwise wait on a bootstrap
        room that never fills) and the client hears about the prefill. When D's output must
        be merged with P's (``return_logprob``), D's answer is held at the gate until P's has
        been read."""
        pre = dialect.prefill_request(body, ctx)
        leg = dialect.decode_request(body, pre.handoff, ctx)
        failed: list[StageError] = []
        prefill_read = trio.Event()
        merged: list[HandOff] = []
        gate: Gate | None = None
        if dialect.needs_prefill_response(body):

            async def gate() -> Rewrite | None:
                await prefill_read.wait()  # a failed P cancels the decode scope instead
                handoff = merged[0]
                return _rewrite(dialect, handoff) if dialect.rewrites_decode(handoff) else None

        async def drain_prefill(cancel_decode: trio.CancelScope) -> None:
            try:
                status, answer = await self._leg(greq, pre, prefill, "p", route)
                merged.append(dialect.read_prefill(pre, status, answer))
                prefill_read.set()
            except StageError as exc:
                failed.append(exc)
                cancel_decode.cancel()

        async with trio.open_nursery() as nursery:
            decode_scope = trio.CancelScope()
            nursery.start_soon(drain_prefill, decode_scope)
            with decode_scope:
                await self._final(
                    greq, responder, leg, decode, "d", dialect, pre.handoff, route, gate,
                    restartable=restartable, journal=journal, splice=splice,
                )  # fmt: skip
            if not failed and not decode_scope.cancelled_caught:
                # the client's answer is whole, so the KV came over: a prefill answer still
                # due is not waited for (it would hold the connection's next request, and the
                # request's deadline); its connection closes (the compiled lane lets it run)
                nursery.cancel_scope.cancel()
        if failed:
            exc = failed[0]
            if not responder.started:
                raise exc
            if not getattr(responder, "broken", False) and not getattr(
                responder, "finished", False
            ):
                await responder.send(sse_error_event(502, f"prefill stage failed: {exc.message}"))
                await responder.end()


class _BrokenStream(Exception):
    """The client-facing leg broke after part of its stream reached the client."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.id)
        self.worker = worker


def _only(group: BaseExceptionGroup, cls: type[BaseException]) -> Any:
    """The one ``cls`` exception when it is all the group holds (besides cancellations)."""
    match, rest = group.split(cls)
    if match is None:
        return None
    if rest is not None and rest.split(trio.Cancelled)[1] is not None:
        return None
    return _first_leaf(match)


class _RestartPair(Exception):
    """A decode failed before its first byte and its hand-off names that decode worker."""

    def __init__(self, failure: GatewayError) -> None:
        super().__init__(failure.message)
        self.failure = failure


_ANSWERABLE = (GatewayError, StageError, BodyError, HandOffError, PeerError)


def _no_generate(greq: GatewayRequest, flow: str, dialect: Dialect) -> GatewayError:
    return GatewayError(
        400,
        f"/generate is SGLang's native API, and model '{greq.model}' runs a '{flow}' flow in the"
        f" {dialect.name} dialect, whose workers do not serve it: use /v1/completions",
    )


def _client_error(greq: GatewayRequest, exc: BaseException) -> GatewayError:
    """The OpenAI-shaped error the client gets for a failure of one of the legs."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StageError):
        return GatewayError(exc.client_status, f"{exc.stage} stage failed: {exc.message}")
    if isinstance(exc, BodyError):
        return GatewayError(400, str(exc))
    if isinstance(exc, PeerError):
        return GatewayError(503, str(exc))
    log.error("request %s: %s", greq.request_id, exc,  # a hand-off bug: still answered
              extra={"request_id": greq.request_id})  # fmt: skip
    return GatewayError(500, f"internal hand-off error: {exc}")


def _stage_failed(role: str, exc: GatewayError) -> GatewayError:
    """A client-facing leg's error as the client gets it: the worker's 4xx as it is (the
    request's fault), anything else naming the stage."""
    if exc.status < 500:
        return exc
    return GatewayError(exc.status, f"{STAGE_NAMES[role]} stage failed: {exc.message}")


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _rewrite(dialect: Dialect, handoff: HandOff) -> Rewrite:
    return Rewrite(
        partial(dialect.merge_decode_body, handoff), partial(dialect.merge_decode_events, handoff)
    )
