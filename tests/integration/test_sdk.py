"""The SDK (issue 9): ``lmgw.Gateway`` in-process, ``lmgw.aio.Gateway`` (the asyncio bridge) and
``lmgw.Client`` over HTTP, against simulated workers.

Every behavioural scenario runs twice: under trio (pytest-trio, ``lmgw.Gateway`` and the Client
on trio) and under asyncio (``asyncio.run`` in a plain test, ``lmgw.aio.Gateway`` and the Client
on asyncio). Scenarios are written with anyio primitives so one body serves both. The simulated
workers run on a trio thread of their own, shared by the module: ``fast`` (no delays), ``slow``
(the realistic timing model: ~10 ms per token, so a long stream is still running when a test
cancels it) and ``faulty`` (drops the connection at token 3).

All waits are bounded (``anyio.fail_after``); nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest
import trio
from gateway_support import free_port_url

import lmgw
import lmgw.aio
from lmgw.routing.policy import Policy
from lmgw.sdk.aio import _END, _EventPipe
from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess
from lmgw.simulators.faults import Faults
from lmgw.transport.dialects import DIALECTS
from lmgw.transport.dialects.vllm_nixl import VllmNixl

MODEL = "sim-model"
ROUTE_A, ROUTE_B = "route-model-a", "route-model-b"  # one worker each: who answered shows
HI = [{"role": "user", "content": "Say something about gateways."}]
LONG = {"max_tokens": 4000, "ignore_eos": True}  # outlives any test on the slow worker


# -- simulated workers on their own trio thread ----------------------------------------------------


class SimThread:
    """Simulated workers served by ``trio.run`` on a thread (usable from trio and asyncio tests
    alike); ``urls[name]`` and ``sims[name]`` (the :class:`SimWorker`, for its stats)."""

    def __init__(self, options: dict[str, WorkerOptions]) -> None:
        self.options = options
        self.urls: dict[str, str] = {}
        self.sims: dict[str, SimWorker] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="sims", daemon=True)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for name, opts in self.options.items():
                self.sims[name] = sim = SimWorker(opts)
                self.urls[name] = await nursery.start(serve_worker_inprocess, sim)
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def __enter__(self) -> SimThread:
        self._thread.start()
        assert self._ready.wait(60), "simulated workers did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()

    def aborted(self, name: str) -> set[str]:
        """Request ids the worker saw abandoned by the gateway (an abort reached it)."""
        return {a["request_id"] for a in list(self.sims[name].stats.aborted)}

    def seen(self, name: str) -> set[str]:
        return set(list(self.sims[name].stats.request_ids))


@pytest.fixture(scope="module")
def sims() -> Any:
    with SimThread(
        {
            "fast": WorkerOptions(model=MODEL, speed=math.inf),
            "slow": WorkerOptions(model=MODEL, speed=1.0),
            "faulty": WorkerOptions(model=MODEL, speed=math.inf, faults=Faults(drop_at_token=3)),
            "prefill": WorkerOptions(model=MODEL, speed=math.inf, role="p"),
            "decode": WorkerOptions(model=MODEL, speed=math.inf, role="d"),
            "lora": WorkerOptions(model=MODEL, speed=math.inf, enable_lora=True),
            "route-a": WorkerOptions(model=ROUTE_A, speed=math.inf),
            "route-b": WorkerOptions(model=ROUTE_B, speed=math.inf),
        }
    ) as fleet:
        yield fleet


# -- the two flavors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavor:
    name: str
    Gateway: Any  # lmgw.Gateway or lmgw.aio.Gateway


TRIO = Flavor("trio", lmgw.Gateway)
ASYNCIO = Flavor("asyncio", lmgw.aio.Gateway)

Scenario = Callable[[Flavor, SimThread], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


async def maybe(value: Any) -> Any:
    """``add_worker`` is synchronous on the trio gateway, a coroutine on the asyncio one."""
    return await value if inspect.isawaitable(value) else value


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still waiting for {what} after {timeout:g} s") from None


def bare(result: Any) -> Any:
    """A result or event without what differs between two answers to the same request: the
    id, the time, and the prefix-cache hits (the worker caches the first one's prompt)."""
    if isinstance(result, list):
        return [bare(r) for r in result]
    if isinstance(result, lmgw.UsageEvent):
        return msgspec.structs.replace(result, usage=bare(result.usage))
    if isinstance(result, lmgw.Usage):
        return msgspec.structs.replace(result, prompt_tokens_details=None)
    if isinstance(result, lmgw.ChatResult | lmgw.CompletionResult):
        usage = bare(result.usage) if result.usage is not None else None
        return msgspec.structs.replace(result, id="", created=0, usage=usage)
    return result


def in_flight(gw: Any, worker_id: str) -> int:
    return next(w["in_flight"] for w in gw.workers if w["id"] == worker_id)


async def collect(stream: Any) -> list[Any]:
    async with aclosing(stream) as events:
        return [e async for e in events]


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, lmgw.ContentDelta))


# -- scenarios (each runs under trio and under asyncio) --------------------------------------------


@scenario
async def answers_equal_http(flavor: Flavor, sims: SimThread) -> None:
    """chat / complete / both streams in-process equal the same requests over HTTP (served by
    the same gateway), and the non-streamed chat equals the raw JSON the HTTP API returns."""
    async with flavor.Gateway(workers=[sims.urls["fast"]]) as gw:
        port = await gw.serve(port=0)
        assert gw.url == f"http://127.0.0.1:{port}"
        local = await gw.chat(model=MODEL, messages=HI, max_tokens=12)
        assert isinstance(local, lmgw.ChatResult)
        assert local.text and local.usage is not None and local.usage.completion_tokens == 12
        usage_opts = {"stream_options": {"include_usage": True}}
        async with lmgw.Client(gw.url) as client:
            assert bare(await client.chat(model=MODEL, messages=HI, max_tokens=12)) == bare(local)
            local_c = await gw.complete(model=MODEL, prompt="Once upon a time", max_tokens=9)
            remote_c = await client.complete(model=MODEL, prompt="Once upon a time", max_tokens=9)
            assert isinstance(local_c, lmgw.CompletionResult) and local_c.text
            assert bare(remote_c) == bare(local_c)

            events = await collect(
                gw.chat_stream(model=MODEL, messages=HI, max_tokens=12, **usage_opts)
            )
            assert bare(events) == bare(
                await collect(
                    client.chat_stream(model=MODEL, messages=HI, max_tokens=12, **usage_opts)
                )
            )
            assert text_of(events) == local.text
            assert isinstance(events[-2], lmgw.Finish) and events[-2].reason == "length"
            assert isinstance(events[-1], lmgw.UsageEvent)
            assert bare(events[-1].usage) == bare(local.usage)

            c_events = await collect(
                gw.complete_stream(model=MODEL, prompt="Once upon", max_tokens=5)
            )
            assert c_events == await collect(
                client.complete_stream(model=MODEL, prompt="Once upon", max_tokens=5)
            )
            assert sum(isinstance(e, lmgw.ContentDelta) for e in c_events) == 5

            assert await gw.models() == await client.models()
            assert [m.id for m in await gw.models()] == [MODEL]
            tokens = await gw.tokenize(model=MODEL, prompt="hello gateway")
            assert tokens == await client.tokenize(model=MODEL, prompt="hello gateway")
            assert tokens.count == len(tokens.tokens) > 0
            stats = client.statistics()
            assert stats.connects == 1 and stats.reuses == 5, stats  # one kept-alive connection

        body = msgspec.json.encode({"model": MODEL, "messages": HI, "max_tokens": 12})
        raw = await anyio.to_thread.run_sync(_post_json, gw.url + "/v1/chat/completions", body)
        choice = raw["choices"][0]
        assert choice["message"]["content"] == local.text
        assert choice["finish_reason"] == local.choices[0].finish_reason
        assert bare(msgspec.convert(raw["usage"], lmgw.Usage)) == bare(local.usage)


def _post_json(url: str, body: bytes) -> Any:
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return msgspec.json.decode(resp.read())


@scenario
async def errors_are_typed(flavor: Flavor, sims: SimThread) -> None:
    """The HTTP API's errors raise the same typed exceptions in-process and over HTTP."""
    async with flavor.Gateway(workers=[sims.urls["fast"]]) as gw:
        await gw.serve()
        async with lmgw.Client(gw.url) as client:
            for make in (gw, client):
                with pytest.raises(lmgw.NotFound) as info:
                    await make.chat(model="no-such-model", messages=HI)
                assert info.value.status == 404 and info.value.param == "model"
                assert info.value.request_id  # the gateway's X-Request-Id comes back
                with pytest.raises(lmgw.BadRequest) as info:
                    await make.chat(model=MODEL, messages=HI, n=0)
                assert info.value.param == "n"
                with pytest.raises(lmgw.BadRequest) as info:
                    await collect(make.chat_stream(model=MODEL, messages=[]))
                assert info.value.param == "messages"
                with pytest.raises(TypeError):
                    await make.chat(model=MODEL, messages=HI, stream=True)

    # no healthy worker: 503
    async with flavor.Gateway(workers=[free_port_url()]) as gw:
        with pytest.raises(lmgw.ServiceUnavailable):
            await gw.chat(model=MODEL, messages=HI)
        with pytest.raises(lmgw.ServiceUnavailable):
            await collect(gw.chat_stream(model=MODEL, messages=HI))

    # a worker that breaks mid-stream (no migration): the events before it, then BadGateway
    async with flavor.Gateway(workers=[sims.urls["faulty"]], upstream={"migrate_streams": 0}) as gw:
        await gw.serve()
        async with lmgw.Client(gw.url) as client:
            for make in (gw, client):
                got: list[Any] = []
                with pytest.raises(lmgw.BadGateway) as info:
                    async with aclosing(make.chat_stream(model=MODEL, messages=HI, **LONG)) as s:
                        async for event in s:
                            got.append(event)
                assert info.value.status == 502
                assert any(isinstance(e, lmgw.ContentDelta) for e in got), got


@scenario
async def rate_limited_with_retry_after(flavor: Flavor, sims: SimThread) -> None:
    limits = {"max_concurrent_requests": 1, "queue_size": 0}
    async with flavor.Gateway(workers=[sims.urls["slow"]], limits=limits) as gw:
        await gw.serve()
        async with aclosing(gw.chat_stream(model=MODEL, messages=HI, **LONG)) as holder:
            first = await holder.__anext__()  # the one slot is taken while this stream runs
            assert isinstance(first, lmgw.ContentDelta)
            with pytest.raises(lmgw.RateLimited) as info:
                await gw.chat(model=MODEL, messages=HI, max_tokens=1)
            assert info.value.status == 429
            assert info.value.retry_after is not None and info.value.retry_after >= 1
            async with lmgw.Client(gw.url) as client:
                with pytest.raises(lmgw.RateLimited) as info:
                    await client.chat(model=MODEL, messages=HI, max_tokens=1)
            assert info.value.retry_after is not None and info.value.retry_after >= 1


@scenario
async def leaving_a_stream_aborts_it_upstream(flavor: Flavor, sims: SimThread) -> None:
    """The caller leaves a stream after one event: the gateway cancels the request, the slow
    worker sees the abort, and nothing stays in flight."""
    rid = f"leave-{flavor.name}"
    async with flavor.Gateway(workers=[sims.urls["slow"]]) as gw:
        async with aclosing(gw.chat_stream(model=MODEL, messages=HI, request_id=rid, **LONG)) as s:
            async for _event in s:
                break
        await wait_until(lambda: rid in sims.aborted("slow"), "the worker's abort")
        await wait_until(lambda: in_flight(gw, sims.urls["slow"]) == 0, "in_flight back to 0")


@scenario
async def cancelling_a_call_aborts_it_upstream(flavor: Flavor, sims: SimThread) -> None:
    """Cancelling the caller's scope/task during a non-streamed call cancels the gateway's
    request (on the trio thread, for asyncio) and the worker's."""
    rid = f"cancel-{flavor.name}"
    async with flavor.Gateway(workers=[sims.urls["slow"]]) as gw:
        finished = []

        async def call() -> None:
            await gw.chat(model=MODEL, messages=HI, request_id=rid, **LONG)
            finished.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_until(lambda: rid in sims.seen("slow"), "the worker to start")
            tg.cancel_scope.cancel()
        assert not finished
        await wait_until(lambda: rid in sims.aborted("slow"), "the worker's abort")
        await wait_until(lambda: in_flight(gw, sims.urls["slow"]) == 0, "in_flight back to 0")


@scenario
async def gateway_side_failures_raise(flavor: Flavor, sims: SimThread) -> None:
    """The gateway's request deadline ends a running stream with GatewayTimeout (after the
    events it had) and a non-streamed call with GatewayTimeout."""
    async with flavor.Gateway(workers=[sims.urls["slow"]], limits={"request_timeout_s": 0.3}) as gw:
        got: list[Any] = []
        with pytest.raises(lmgw.GatewayTimeout) as info:
            async with aclosing(gw.chat_stream(model=MODEL, messages=HI, **LONG)) as s:
                async for event in s:
                    got.append(event)
        assert "deadline" in info.value.message
        assert got and isinstance(got[0], lmgw.ContentDelta)
        with pytest.raises(lmgw.GatewayTimeout):
            await gw.chat(model=MODEL, messages=HI, **LONG)
        await wait_until(lambda: in_flight(gw, sims.urls["slow"]) == 0, "in_flight back to 0")


@scenario
async def admin_calls(flavor: Flavor, sims: SimThread) -> None:
    token = "s3cret-admin"
    async with flavor.Gateway(workers=[sims.urls["fast"]], admin={"token": token}) as gw:
        fast = sims.urls["fast"]
        assert [w["id"] for w in gw.workers] == [fast]
        assert gw.workers[0]["state"] == "healthy" and gw.workers[0]["source"] == "static"
        added = await maybe(gw.add_worker(sims.urls["slow"], "pd", id="slow", zone="node-b"))
        assert added["id"] == "slow" and added["role"] == "merged" and added["zone"] == "node-b"
        with pytest.raises(lmgw.Conflict):
            await maybe(gw.add_worker(sims.urls["slow"], id="slow"))
        with pytest.raises(lmgw.BadRequest):
            await maybe(gw.add_worker("ftp://nowhere", id="bad"))
        assert (await gw.drain("slow"))["state"] == "draining"
        assert (await gw.undrain("slow"))["state"] == "healthy"
        assert (await gw.drain("slow", grace_s=1.0))["state"] == "draining"
        assert (await gw.remove_worker("slow", grace_s=1.0))["state"] == "gone"
        assert [w["id"] for w in gw.workers] == [fast]
        with pytest.raises(lmgw.NotFound):
            await gw.drain("nobody")
        plan = await maybe(gw.planner())  # the planner's view (on by default)
        assert plan["object"] == "planner" and plan["itl_slo_s"] > 0

        await gw.serve()
        async with lmgw.Client(gw.url, admin_token=token) as admin:
            added = await admin.add_worker(sims.urls["slow"], id="slow2")
            assert added["source"] == "static"
            assert {w["id"] for w in await admin.workers()} == {fast, "slow2"}
            assert {w["id"] for w in gw.workers} == {fast, "slow2"}  # the same registry
            assert (await admin.planner())["object"] == "planner"
            assert (await admin.drain_worker("slow2"))["state"] == "draining"
            assert (await admin.remove_worker("slow2", grace_s=0.5))["state"] == "gone"
            with pytest.raises(lmgw.NotFound):
                await admin.worker("slow2")
            with pytest.raises(lmgw.Conflict):
                await admin.add_worker(fast, id=fast)
        async with lmgw.Client(gw.url, admin_token="wrong") as intruder:
            with pytest.raises(lmgw.AuthenticationError):
                await intruder.workers()


@scenario
async def lora_adapters(flavor: Flavor, sims: SimThread) -> None:
    """Adapters through the in-process gateway and through the HTTP client: loaded, routed,
    listed, unloaded (the worker is shared: the scenario leaves it as it found it)."""
    token = "s3cret-admin"
    async with flavor.Gateway(workers=[sims.urls["lora"]], admin={"token": token}) as gw:
        out = await gw.load_lora_adapter("sdk-lora", "/adapters/sdk")
        assert out["loaded"] == [sims.urls["lora"]] and out["failed"] == {}
        answer = await gw.chat(model="sdk-lora", messages=[{"role": "user", "content": "hi"}])
        assert answer.model == "sdk-lora"
        assert [a["lora_name"] for a in gw.lora_adapters] == ["sdk-lora"]
        with pytest.raises(lmgw.NotFound):
            await gw.unload_lora_adapter("nope")
        await gw.serve()
        async with lmgw.Client(gw.url, admin_token=token) as admin:
            assert [a["lora_path"] for a in await admin.lora_adapters()] == ["/adapters/sdk"]
            with pytest.raises(lmgw.Conflict):
                await admin.load_lora_adapter("sdk-lora", "/adapters/elsewhere")
            gone = await admin.unload_lora_adapter("sdk-lora")
            assert gone["unloaded"] == [sims.urls["lora"]]
            assert await admin.lora_adapters() == []
            again = await admin.load_lora_adapter("sdk-lora", "/adapters/sdk", inplace=True)
            assert again["loaded"] == [sims.urls["lora"]]
        assert (await gw.unload_lora_adapter("sdk-lora"))["failed"] == {}


@scenario
async def model_routes(flavor: Flavor, sims: SimThread) -> None:
    """Routes through the in-process gateway and through the HTTP client: set (the next
    request goes to the target), replaced, listed, deleted (the name is unknown again); bad
    definitions and chained routes are BadRequests saying why."""
    token = "s3cret-admin"
    workers = [sims.urls["route-a"], sims.urls["route-b"]]
    async with flavor.Gateway(workers=workers, admin={"token": token}) as gw:
        assert gw.model_routes == []
        route = await gw.set_model_route("chat", {ROUTE_A: 1}, fallbacks=[ROUTE_B])
        assert route["targets"] == [{"model": ROUTE_A, "weight": 1.0, "share": 1.0}]
        assert route["fallbacks"] == [ROUTE_B] and route["split"] == "request"
        assert (await gw.chat(model="chat", messages=HI, max_tokens=2)).model == ROUTE_A
        await gw.set_model_route("chat", [(ROUTE_A, 0), (ROUTE_B, 2)], split="session")
        assert (await gw.chat(model="chat", messages=HI, max_tokens=2)).model == ROUTE_B
        [listed] = gw.model_routes
        assert listed["split"] == "session" and listed["requests"] == {ROUTE_A: 0, ROUTE_B: 1}
        with pytest.raises(lmgw.BadRequest, match="weight must be between 0 and 1e9"):
            await gw.set_model_route("bad", {ROUTE_A: -1})
        with pytest.raises(lmgw.BadRequest, match="split"):
            await gw.set_model_route("bad", {ROUTE_A: 1}, split="sticky")
        with pytest.raises(lmgw.BadRequest, match="`chat` is a model route"):
            await gw.set_model_route("chained", {"chat": 1})
        with pytest.raises(lmgw.NotFound, match="no model route `nope`"):
            await gw.delete_model_route("nope")
        assert [r["model"] for r in gw.model_routes] == ["chat"]  # the failures changed nothing

        await gw.serve()
        async with lmgw.Client(gw.url, admin_token=token) as admin:
            assert [r["model"] for r in await admin.model_routes()] == ["chat"]
            route = await admin.set_model_route("chat", [(ROUTE_A, 3), (ROUTE_B, 1)])
            assert [t["share"] for t in route["targets"]] == [0.75, 0.25]
            served = [(await admin.chat(model="chat", messages=HI, max_tokens=2)).model
                      for _ in range(4)]  # fmt: skip
            assert sorted(served) == [ROUTE_A] * 3 + [ROUTE_B]  # exact shares
            assert (await admin.model_routes())[0]["requests"] == {ROUTE_A: 3, ROUTE_B: 1}
            with pytest.raises(lmgw.BadRequest, match="at least one target needs a weight"):
                await admin.set_model_route("bad", {ROUTE_A: 0})
            assert await admin.delete_model_route("chat") == {"model": "chat", "deleted": True}
            with pytest.raises(lmgw.NotFound):
                await admin.chat(model="chat", messages=HI, max_tokens=2)
            with pytest.raises(lmgw.NotFound):
                await admin.delete_model_route("chat")
        assert gw.model_routes == []
        with pytest.raises(lmgw.NotFound):
            await gw.chat(model="chat", messages=HI, max_tokens=2)


def question(i: int, model: str = MODEL) -> dict[str, Any]:
    """A chat request body whose answer differs with ``i`` (so an order shows)."""
    content = f"Question number {i} about gateways."
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6}


def answer_text(record: dict[str, Any]) -> str:
    return record["response"]["body"]["choices"][0]["message"]["content"]


def core_of(gw: Any) -> Any:
    """The core gateway behind either flavor (the asyncio one reads it from its thread)."""
    return gw.core if isinstance(gw, lmgw.Gateway) else gw._gw().core


@scenario
async def batches(flavor: Flavor, sims: SimThread) -> None:
    """OpenAI's Batch API through the in-process gateway and the HTTP client: run_batch's
    records are the same requests' answers one by one, in input order, a request that fails on
    its own its record's 404, and the files it made are deleted; an invalid request fails the
    batch as a BadRequest; the primitives' errors are typed; file_content is the upload."""
    async with flavor.Gateway(workers=[sims.urls["fast"]]) as gw:
        await gw.serve()
        store = core_of(gw).batches.files
        async with lmgw.Client(gw.url) as client:
            for face in (gw, client):
                bodies = [question(i) for i in range(3)]
                expected = [(await face.chat(**body)).text for body in bodies]
                assert len(set(expected)) == 3, expected
                files_before = {f.id for f in store}
                records = await face.run_batch(bodies, poll_s=0.02)
                assert [r["custom_id"] for r in records] == ["0", "1", "2"]
                assert [r["response"]["status_code"] for r in records] == [200] * 3
                assert [answer_text(r) for r in records] == expected
                assert all(r["error"] is None for r in records)
                assert {f.id for f in store} == files_before  # input and output deleted

                mixed = [bodies[0], question(1, model="no-such-model"), bodies[2]]
                records = await face.run_batch(mixed, poll_s=0.02)
                assert [r["response"]["status_code"] for r in records] == [200, 404, 200]
                assert records[1]["response"]["body"]["error"]["param"] == "model"
                assert [answer_text(records[0]), answer_text(records[2])] == expected[::2]
                assert {f.id for f in store} == files_before  # the error file too

                with pytest.raises(lmgw.BadRequest, match="request 1: a batch request cannot"):
                    await face.run_batch([bodies[0], {**bodies[1], "stream": True}], poll_s=0.02)
                assert await face.run_batch([]) == []

                for call, unknown in (
                    (face.cancel_batch, "batch_unknown"),
                    (face.batch, "batch_unknown"),
                    (face.file_content, "file-unknown"),
                ):
                    with pytest.raises(lmgw.NotFound):
                        await call(unknown)

                lines = [
                    {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": question(i)}
                    for i in range(2)
                ]  # fmt: skip
                jsonl = b"".join(msgspec.json.encode(line) + b"\n" for line in lines)
                uploaded = await face.upload_batch_file(jsonl, "mine.jsonl")
                assert (uploaded["filename"], uploaded["bytes"]) == ("mine.jsonl", len(jsonl))
                assert uploaded["purpose"] == "batch"
                assert await face.file_content(uploaded["id"]) == jsonl
                with pytest.raises(lmgw.BadRequest, match="endpoint must be"):
                    await face.create_batch(uploaded["id"], "/v1/moderations")
                with pytest.raises(lmgw.NotFound):
                    await face.create_batch("file-unknown")
                job = await face.create_batch(uploaded["id"], metadata={"face": flavor.name})
                assert job["metadata"] == {"face": flavor.name}
                with anyio.fail_after(10):
                    while job["status"] not in ("completed", "failed"):
                        await anyio.sleep(0.02)
                        job = await face.batch(job["id"])
                assert job["status"] == "completed" and job["error_file_id"] is None
                assert job["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
                out = (await face.file_content(job["output_file_id"])).splitlines()
                got = {r["custom_id"]: answer_text(r) for r in map(msgspec.json.decode, out)}
                assert got == {"q0": expected[0], "q1": expected[1]}
                assert (await face.cancel_batch(job["id"]))["status"] == "completed"


@scenario
async def batch_timeouts_and_cancels(flavor: Flavor, sims: SimThread) -> None:
    """run_batch past its ``timeout_s`` cancels the batch (the worker sees the aborts) and
    raises APITimeoutError; a batch cancelled while run_batch waits gives the answers so far
    and a ``batch_cancelled`` record for each request it never finished."""
    async with flavor.Gateway(workers=[sims.urls["slow"]]) as gw:
        await gw.serve()
        jobs = core_of(gw).batches.jobs
        async with lmgw.Client(gw.url) as client:
            for face in (gw, client):
                await _timeout_then_cancel(face, jobs, sims)
        await wait_until(lambda: in_flight(gw, sims.urls["slow"]) == 0, "in_flight back to 0")


async def _timeout_then_cancel(face: Any, jobs: dict[str, Any], sims: SimThread) -> None:
    long = {"model": MODEL, "messages": HI, **LONG}
    known = set(jobs)
    with pytest.raises(lmgw.APITimeoutError, match="cancelled"):
        await face.run_batch([long, long], poll_s=0.02, timeout_s=0.3)
    [timed_out] = set(jobs) - known
    await wait_until(lambda: jobs[timed_out].status == "cancelled", "the cancel")
    assert jobs[timed_out].completed == 0
    aborted = {f"{timed_out}-1", f"{timed_out}-2"}  # the batch's request ids (line numbers)
    await wait_until(lambda: aborted <= sims.aborted("slow"), "the worker's aborts")

    known = set(jobs)
    short = {"model": MODEL, "messages": HI, "max_tokens": 2}
    got: list[Any] = []

    async def run() -> None:
        got.append(await face.run_batch([short, long], poll_s=0.02))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: bool(set(jobs) - known), "the batch")
        [job_id] = set(jobs) - known
        await wait_until(lambda: jobs[job_id].completed == 1, "the short answer")
        assert (await face.cancel_batch(job_id))["status"] == "cancelling"
    [(done, cancelled)] = got
    assert done["response"]["status_code"] == 200 and done["error"] is None
    assert cancelled["custom_id"] == "1" and cancelled["response"] is None
    assert cancelled["error"]["code"] == "batch_cancelled"

    known = set(jobs)  # the caller cancelled while run_batch waits: the batch is cancelled
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(face.run_batch, [long], poll_s=0.02))
        await wait_until(lambda: bool(set(jobs) - known), "the batch")
        tg.cancel_scope.cancel()
    [left] = set(jobs) - known
    await wait_until(lambda: jobs[left].status == "cancelled", "the cancel")


class LastWorker(Policy):
    """A custom policy object: always the last candidate; counts its calls."""

    name = "last_worker"

    def __init__(self) -> None:
        self.chosen: list[str] = []

    def choose(self, candidates: Any, ctx: Any) -> Any:
        self.chosen.append(candidates[-1].id)
        return candidates[-1]


@scenario
async def extension_points(flavor: Flavor, sims: SimThread) -> None:
    """Policy objects, middleware (in-process and over HTTP), lifecycle hooks."""
    calls: list[str] = []
    changes: list[tuple[str, str]] = []
    seen_paths: list[str] = []
    policy = LastWorker()

    async def tag_requests(request: Any, responder: Any, call_next: Any) -> None:
        seen_paths.append(request.path)
        request.headers.append((b"x-request-id", b"mw-" + str(len(seen_paths)).encode()))
        await call_next(request, responder)

    async def started(gw: Any) -> None:
        calls.append("startup")

    async def stopping(gw: Any) -> None:
        calls.append("shutdown")

    async with flavor.Gateway(
        workers=[{"url": sims.urls["slow"], "id": "a"}, {"url": sims.urls["fast"], "id": "b"}],
        policies=policy,
        middleware=[tag_requests],
        on_startup=[started],
        on_shutdown=[stopping],
        on_worker_change=[lambda w: changes.append((w["id"], w["state"]))],
    ) as gw:
        assert calls == ["startup"]
        result = await gw.chat(model=MODEL, messages=HI, max_tokens=2)
        assert policy.chosen == ["b"]
        assert "mw-1" in sims.seen("fast") and result.text  # the middleware's request id
        await gw.serve()
        async with lmgw.Client(gw.url) as client:
            await collect(client.chat_stream(model=MODEL, messages=HI, max_tokens=2))
        assert seen_paths == ["/v1/chat/completions"] * 2 and "mw-2" in sims.seen("fast")
        await maybe(gw.add_worker(sims.urls["fast"], id="c"))
        await wait_until(lambda: ("c", "healthy") in changes, "the worker-change hook")
        assert ("c", "starting") in changes
    assert calls == ["startup", "shutdown"]


@scenario
async def pass_through_routes(flavor: Flavor, sims: SimThread) -> None:
    """Embeddings and the Responses API in-process equal the HTTP Client's answers (the
    affinity itself: tests/integration/test_passthru_api.py)."""
    async with flavor.Gateway(workers=[sims.urls["fast"]]) as gw:
        await gw.serve(port=0)
        local = await gw.embeddings(model=MODEL, input=["a", "b"])
        assert isinstance(local, lmgw.EmbeddingResult) and len(local.vectors) == 2
        first = await gw.create_response(model=MODEL, input="hello")
        async with lmgw.Client(gw.url) as client:
            remote = await client.embeddings(model=MODEL, input=["a", "b"])
            assert remote.vectors == local.vectors
            follow = await client.create_response(
                model=MODEL, input="more", previous_response_id=first["id"]
            )
            assert follow["previous_response_id"] == first["id"]
            assert (await client.retrieve_response(first["id"]))["id"] == first["id"]
            with pytest.raises(lmgw.NotFound):
                await client.cancel_response("resp_unknown")
        assert (await gw.retrieve_response(follow["id"]))["status"] == "completed"
        with pytest.raises(lmgw.BadRequest):  # a finished response cannot be cancelled
            await gw.cancel_response(follow["id"])


# -- running the scenarios under both -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_under_trio(name: str, sims: SimThread) -> None:
    with trio.fail_after(30):
        await SCENARIOS[name](TRIO, sims)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_under_asyncio(name: str, sims: SimThread) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await SCENARIOS[name](ASYNCIO, sims)

    asyncio.run(bounded())


# -- asyncio bridge specifics ----------------------------------------------------------------------


def test_aio_close_while_streaming_raises_gateway_closed(sims: SimThread) -> None:
    async def main() -> None:
        gw = lmgw.aio.Gateway(workers=[sims.urls["slow"]])
        async with gw:
            stream = gw.chat_stream(model=MODEL, messages=HI, request_id="closing", **LONG)
            async with aclosing(stream) as s:
                await s.__anext__()
                await gw.aclose()  # the gateway stops under the running stream
                with pytest.raises(lmgw.GatewayClosed):
                    async for _ in s:
                        pass
            with pytest.raises(lmgw.GatewayClosed):
                await gw.chat(model=MODEL, messages=HI)
        assert not gw._thread.is_alive()

    asyncio.run(asyncio.wait_for(main(), 30))
    # the worker notices the closed connection on its own loop: wait for it (bounded)
    asyncio.run(wait_until(lambda: "closing" in sims.aborted("slow"), "the worker's abort"))


def test_aio_loop_closed_without_aclose_stops_the_thread(sims: SimThread) -> None:
    gw = lmgw.aio.Gateway(workers=[sims.urls["fast"]])

    async def main() -> None:
        await gw.start()
        assert (await gw.chat(model=MODEL, messages=HI, max_tokens=2)).text

    asyncio.run(main())  # forgets aclose(); the loop closes
    gw._thread.join(10)
    assert not gw._thread.is_alive()


def test_aio_start_error_raises_in_asyncio(tmp_path: Any) -> None:
    """A failure while the trio thread builds or starts the gateway raises in ``start()``."""

    async def main() -> None:
        missing = str(tmp_path / "no-tokenizer-here")
        gw = lmgw.aio.Gateway(models=[{"name": MODEL, "tokenizer": missing}])
        with pytest.raises(Exception, match="no-tokenizer-here"):
            await gw.start()
        assert not gw._thread.is_alive()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_config_errors_raise_in_the_constructor() -> None:
    with pytest.raises(lmgw.ConfigError):
        lmgw.aio.Gateway(workers=["not a url"])
    with pytest.raises(lmgw.ConfigError):
        lmgw.Gateway(routing={"nonsense": 1})


def test_event_pipe_is_bounded_and_ordered() -> None:
    """A trio producer fills the pipe up to its bound and then waits for the asyncio reader;
    everything arrives in order, and a reader leaving makes the producer's send fail."""
    box: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = threading.Event()

        async def produce() -> None:
            pipe = box["pipe"] = _EventPipe(loop, trio.lowlevel.current_trio_token(), 2)
            started.set()
            for i in range(6):
                await pipe.send([i])
            pipe.close()

        thread = threading.Thread(target=trio.run, args=(produce,))
        thread.start()
        await asyncio.to_thread(started.wait, 10)
        pipe = box["pipe"]
        async with asyncio.timeout(10):
            while pipe._putter is None:  # the producer is blocked on a full pipe
                await asyncio.sleep(0.01)
        assert len(pipe._items) == 2
        got = []
        while (item := await pipe.get()) is not _END:
            got.append(item)
        assert got == [[i] for i in range(6)]
        await asyncio.to_thread(thread.join, 10)

        async def produce_to_nobody() -> None:
            pipe = box["pipe2"] = _EventPipe(loop, trio.lowlevel.current_trio_token(), 1)
            pipe.abandon()
            with pytest.raises(trio.BrokenResourceError):
                await pipe.send([1])
            box["raised"] = True

        await asyncio.to_thread(trio.run, produce_to_nobody)
        assert box["raised"]

    asyncio.run(main())


class CountingNixl(VllmNixl):
    """A custom dialect: vLLM NIXL's legs, counted."""

    name = "test-counting-nixl"
    prefills = 0

    def prefill_request(self, body: Any, ctx: Any) -> Any:
        type(self).prefills += 1
        return super().prefill_request(body, ctx)


async def test_custom_dialect_by_name(sims: SimThread) -> None:
    lmgw.register_dialect(CountingNixl)
    try:
        with pytest.raises(ValueError, match="already registered"):
            lmgw.register_dialect(type("Other", (VllmNixl,), {"name": CountingNixl.name}))
        async with lmgw.Gateway(
            models=[{"name": MODEL, "flow": "p/d", "dialect": CountingNixl.name}],
            workers=[
                {"url": sims.urls["prefill"], "role": "p"},
                {"url": sims.urls["decode"], "role": "d"},
            ],
        ) as gw:
            result = await gw.chat(model=MODEL, messages=HI, max_tokens=4)
            assert result.usage is not None and result.usage.completion_tokens == 4
            events = await collect(gw.chat_stream(model=MODEL, messages=HI, max_tokens=4))
            assert text_of(events) == result.text
        assert CountingNixl.prefills == 2
        assert sims.sims["decode"].stats.kv_blocks_verified > 0  # the hand-off really happened
    finally:
        DIALECTS.pop(CountingNixl.name, None)


# -- the client alone, and the package surface -----------------------------------------------------


async def test_client_against_a_worker_directly(sims: SimThread) -> None:
    """Any OpenAI-compatible server will do: the client talks to a worker without a gateway."""
    async with lmgw.Client(sims.urls["fast"] + "/v1", timeout=10) as client:
        result = await client.chat(model=MODEL, messages=HI, max_tokens=3)
        assert result.usage is not None and result.usage.completion_tokens == 3
        events = await collect(client.chat_stream(model=MODEL, messages=HI, max_tokens=3))
        assert text_of(events) == result.text
        with pytest.raises(lmgw.APIError) as info:
            await client.chat(model="other", messages=HI)
        assert info.value.status == 404
        assert "connects=1" in repr(client)


async def test_client_connection_errors() -> None:
    async with lmgw.Client(free_port_url(), timeout=5) as client:
        with pytest.raises(lmgw.APIConnectionError):
            await client.models()
        with pytest.raises(lmgw.APIConnectionError):
            await collect(client.chat_stream(model=MODEL, messages=HI))


async def test_client_drops_a_connection_the_server_closed(sims: SimThread) -> None:
    """An idle connection the server closed is noticed before reuse (never sent on)."""
    async with lmgw.Gateway(
        workers=[sims.urls["fast"]], limits={"keepalive_timeout_s": 0.05}
    ) as gw:
        await gw.serve()
        async with lmgw.Client(gw.url) as client:
            await client.chat(model=MODEL, messages=HI, max_tokens=1)
            idle = client._idle[0]
            await wait_until(idle.peer_closed, "the gateway to close the idle connection")
            assert (await client.chat(model=MODEL, messages=HI, max_tokens=1)).text
            stats = client.statistics()
            assert (stats.connects, stats.reuses, stats.closed) == (2, 0, 1), stats


SSE = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b": a comment\n\n"
    b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"id":"c1",'
    b'"function":{"name":"f","arguments":"{\\"a\\""}}]}}]}\n\n'
    b'event: x\ndata: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}'
    b"\n\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    lmgw.ReasoningDelta(text="hm"),
    lmgw.ContentDelta(text="Hel"),
    lmgw.ToolCallDelta(index=1, call_index=0, id="c1", name="f", arguments='{"a"'),
    lmgw.ContentDelta(text="lo"),
    lmgw.Finish(reason="stop"),
    lmgw.UsageEvent(usage=lmgw.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
]


@pytest.mark.parametrize("step", [len(SSE), 1, 7, 64])
@pytest.mark.parametrize("crlf", [False, True])
def test_sse_decoder_any_cut(step: int, crlf: bool) -> None:
    """Whole, byte at a time, or in odd pieces, LF or CRLF: the same events, then [DONE]."""
    from lmgw.sdk.types import SSEDecoder

    data = SSE.replace(b"\n", b"\r\n") if crlf else SSE
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(data), step):
        events += decoder.feed(data[i : i + step])
    events += decoder.feed_eof()
    assert events == EXPECTED and decoder.done and decoder.error is None


def test_sse_decoder_error_event() -> None:
    from lmgw.sdk.types import SSEDecoder

    decoder = SSEDecoder()
    events = decoder.feed(
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"error":{"message":"worker died","type":"BadGatewayError","code":502}}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"never"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert events == [lmgw.ContentDelta(text="a")]
    assert isinstance(decoder.error, lmgw.BadGateway) and decoder.error.message == "worker died"
    assert decoder.done
    decoder = SSEDecoder()
    decoder.feed(b'data: {"error":"plain text from SGLang"}\n\n')
    assert isinstance(decoder.error, lmgw.InternalServerError)
    assert decoder.error.message == "plain text from SGLang"


def test_error_bodies_to_exceptions() -> None:
    from lmgw.sdk.errors import error_from_response

    exc = error_from_response(
        429,
        b'{"error":{"message":"busy","type":"RateLimitError","param":null,"code":429}}',
        [(b"retry-after", b"3"), (b"x-request-id", b"r1")],
    )
    assert isinstance(exc, lmgw.RateLimited) and exc.retry_after == 3.0 and exc.request_id == "r1"
    exc = error_from_response(502, b"<html>proxy error</html>")
    assert isinstance(exc, lmgw.BadGateway) and "proxy error" in exc.message
    exc = error_from_response(418, b'{"error":{"message":"teapot"}}')
    assert type(exc) is lmgw.APIError and exc.status == 418 and str(exc).startswith("418")


def test_import_lmgw_is_cheap() -> None:
    code = (
        "import sys, lmgw\n"
        "heavy = ('trio', 'httptools', 'numpy', 'anyio', 'msgspec')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "lmgw.APIError, lmgw.ChatResult\n"
        "assert 'trio' not in sys.modules and 'httptools' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_names() -> None:
    assert lmgw.__all__ == sorted(lmgw.__all__)
    for name in lmgw.__all__:
        assert getattr(lmgw, name) is not None, name
    assert lmgw.aio.Gateway is lmgw.sdk.aio.Gateway
    assert {"Client", "Gateway", "aio", "APIError", "ChatResult", "ContentDelta"} <= set(
        lmgw.__all__
    )
    with pytest.raises(AttributeError):
        lmgw.NoSuchThing  # noqa: B018


async def test_served_http_keeps_the_key_check_and_cors() -> None:
    """``gw.serve()`` runs what ``lmgw serve`` runs: the App behind the API-key check and
    CORS, not the bare App."""
    from gateway_support import http_request

    key = "sk-sdk-serve-test-0001"
    async with lmgw.Gateway(
        workers=[free_port_url()],
        auth={"keys": [{"key": key}]},
        server={"cors_allow_origins": ["*"]},
    ) as gw:
        await gw.serve(port=0)
        body = {"model": MODEL, "messages": HI, "max_tokens": 2}
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body, {"origin": "x"})
        assert r.status == 401 and r.headers["access-control-allow-origin"] == "*"
        r = await http_request(
            gw.url, "GET", "/v1/models", None, {"authorization": f"Bearer {key}"}
        )
        assert r.status == 200
