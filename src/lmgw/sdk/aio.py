"""``lmgw.aio.Gateway``: the in-process gateway for asyncio programs.

The gateway is trio code; running it under asyncio through trio-asyncio costs ~56 µs per call
(DESIGN.md §3). Instead, ``async with lmgw.aio.Gateway(...) as gw:`` starts ``trio.run`` on one
dedicated thread (the one deliberate thread of the SDK) with a
:class:`lmgw.Gateway <lmgw.sdk.inprocess.Gateway>` inside, and hands work across:

* asyncio -> trio: ``TrioToken.run_sync_soon`` starts each request as a task in the bridge's
  nursery, under its own cancel scope.
* trio -> asyncio: a result (or exception) resolves an asyncio future through
  ``loop.call_soon_threadsafe``. Stream events go through a :class:`_EventPipe`: a bounded deque
  of event batches (one batch per group of SSE events the relay wrote at once) under a lock; the
  asyncio side is woken with ``call_soon_threadsafe`` only when it is waiting, and a full pipe
  makes the trio side wait (backpressure up to the worker's socket) until the reader takes a
  batch.

Cancellation goes both ways: cancelling the asyncio task (or leaving a stream's loop) cancels
the request's trio scope, which aborts it on the worker as a client disconnect does; a failure
or cancellation on the trio side (an error answer, the gateway stopping) raises in asyncio.

Resource handling: leaving ``async with`` runs the ``on_shutdown`` hooks (in asyncio), stops
the trio gateway (requests in flight end with :class:`~lmgw.sdk.errors.GatewayClosed`) and
joins the thread. If the event loop closes without that (a forgotten ``aclose()``), a watcher
task in the trio thread notices within half a second and stops the gateway; the thread is a
daemon, so it never holds the interpreter open.

Hooks and middleware: ``on_startup``/``on_shutdown`` are asyncio coroutines run on the caller's
loop; ``on_worker_change`` is called on the caller's loop too (``call_soon_threadsafe``).
Middleware and policies run inside the gateway, on the trio thread (they are trio code).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import trio

from ..api.app import Middleware
from ..config import GatewayConfig
from ..routing.policy import Policy
from .errors import GatewayClosed
from .inprocess import Gateway as TrioGateway
from .inprocess import _headers, build_config
from .types import (
    ChatResult,
    CompletionResult,
    EmbeddingResult,
    ModelInfo,
    StreamEvent,
    TokenizeResult,
    encode_request,
)

__all__ = ["Gateway"]

log = logging.getLogger("lmgw.sdk")
_END = object()
#: how often the trio thread checks that the asyncio loop is still open
_LOOP_WATCH_S = 0.5

AsyncHook = Callable[["Gateway"], Awaitable[None]]


def _resolve(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    """Runs on the asyncio loop: settle ``fut`` unless its awaiter was cancelled meanwhile."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _EventPipe:
    """Event batches from the trio thread to one asyncio reader; bounded (``max_batches``).

    The trio side is an :class:`~lmgw.sdk.inprocess.EventSink` (``send``, ``close``,
    ``finished``); the asyncio side calls :meth:`get` and, when it leaves, :meth:`abandon`.
    One lock guards the hand-off, so a waiter is never missed: each side checks the state and
    registers itself as waiting in one critical section.
    """

    __slots__ = (
        "_abandoned",
        "_closed",
        "_getter",
        "_items",
        "_lock",
        "_loop",
        "_max",
        "_putter",
        "_token",
        "finished",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, max_batches: int
    ) -> None:
        self._loop = loop
        self._token = token
        self._max = max_batches
        self._lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._getter: asyncio.Future | None = None  # the asyncio reader, waiting
        self._putter: trio.Event | None = None  # the trio writer, waiting for room
        self._closed = False
        self._abandoned = False
        self.finished = False

    # -- trio side ------------------------------------------------------------------------
    async def send(self, item: list[StreamEvent] | BaseException) -> None:
        while True:
            with self._lock:
                if self._abandoned:
                    raise trio.BrokenResourceError("the asyncio reader left")
                if len(self._items) < self._max:
                    self._items.append(item)
                    getter, self._getter = self._getter, None
                    break
                self._putter = room = trio.Event()
            await room.wait()
        if getter is not None:
            self._call_asyncio(_wake, getter)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            getter, self._getter = self._getter, None
        if getter is not None:
            self._call_asyncio(_wake, getter)

    def _call_asyncio(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody will read; stop writing
            with self._lock:
                self._abandoned = True

    # -- asyncio side ---------------------------------------------------------------------
    async def get(self) -> Any:
        """The next batch or exception, or ``_END`` once the trio side closed the pipe."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    putter, self._putter = self._putter, None
                    break
                if self._closed:
                    return _END
                self._getter = waiter = self._loop.create_future()
            await waiter
        if putter is not None:
            self._call_trio(putter.set)
        return item

    def abandon(self) -> None:
        """The reader left: the writer's next ``send`` raises (the handler sees a disconnect)."""
        with self._lock:
            self._abandoned = True
            self._items.clear()
            putter, self._putter = self._putter, None
        if putter is not None:
            self._call_trio(putter.set)

    def _call_trio(self, fn: Callable[[], Any]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass  # the gateway stopped: nothing waits any more


class _Call:
    """One request handed to the trio thread: its future, and its cancel scope once running."""

    __slots__ = ("cancelled", "future", "scope")

    def __init__(self, future: asyncio.Future | None) -> None:
        self.future = future
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel_in_trio(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Gateway:
    """:class:`lmgw.Gateway <lmgw.sdk.inprocess.Gateway>` for asyncio: the same constructor
    arguments and methods, as coroutines (``workers`` stays a property).

    ``stream_queue`` bounds each stream's pipe, in event batches. Configuration errors raise
    here, in the constructor.
    """

    def __init__(
        self,
        config: GatewayConfig | Mapping[str, Any] | None = None,
        *,
        policies: Policy | Mapping[str, Policy] | None = None,
        middleware: Sequence[Middleware] = (),
        on_startup: Sequence[AsyncHook] = (),
        on_shutdown: Sequence[AsyncHook] = (),
        on_worker_change: Sequence[Callable[[dict[str, Any]], None]] = (),
        tools: Sequence[Callable[..., Any]] | Mapping[str, Any] = (),
        serve: bool = False,
        stream_queue: int = 16,
        **sections: Any,
    ) -> None:
        if isinstance(tools, Mapping):  # the [tools] section, not tools
            sections["tools"], tools = tools, ()
        self.config = build_config(config, sections)
        # tools run on the gateway's trio thread: async ones must not need asyncio (anyio is
        # fine); sync ones run in its worker threads
        self._options = {
            "policies": policies,
            "middleware": middleware,
            "serve": serve,
            "tools": tools,
        }
        self.on_startup = list(on_startup)
        self.on_shutdown = list(on_shutdown)
        self.on_worker_change = list(on_worker_change)
        self._stream_queue = stream_queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._gateway: TrioGateway | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._stopped: asyncio.Future | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the trio thread and the gateway in it; returns once requests can be made."""
        if self._thread is not None:
            raise RuntimeError("a Gateway runs once; make a new one")
        loop = self._loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(loop, ready), name="lmgw-trio", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.shield(ready)
        except asyncio.CancelledError:
            await self._stop_thread()
            raise
        except BaseException:
            await self._stop_thread()
            raise
        for hook in self.on_startup:
            await hook(self)

    async def aclose(self) -> None:
        """Run the shutdown hooks, stop the gateway, join its thread. Idempotent."""
        if self._thread is None or self._stopped is None or self._stopped.done():
            return
        try:
            for hook in self.on_shutdown:
                await hook(self)
        finally:
            await self._stop_thread()

    async def _stop_thread(self) -> None:
        assert self._thread is not None and self._stopped is not None
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            self._thread.join(self.config.server.graceful_shutdown_s + 5)  # bounded
            raise
        self._thread.join()

    def _thread_main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._trio_main, loop, ready)
        except BaseException as exc:  # handed to asyncio below; the thread ends cleanly
            error = exc
            log.error("the in-process gateway stopped with an error", exc_info=exc)
        try:
            loop.call_soon_threadsafe(
                _resolve, ready, None, error or GatewayClosed("the gateway stopped at start-up")
            )
            loop.call_soon_threadsafe(_resolve, self._stopped, None, None)
        except RuntimeError:
            pass  # the loop is closed: nobody waits

    async def _trio_main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        hooks = [partial(self._forward_worker_change, loop)] if self.on_worker_change else []
        gateway = TrioGateway(self.config, on_worker_change=hooks, **self._options)
        async with gateway, trio.open_nursery() as nursery:
            self._gateway, self._nursery = gateway, nursery
            nursery.start_soon(self._watch_loop, loop)
            loop.call_soon_threadsafe(_resolve, ready, None, None)
            await self._stop.wait()
            self._nursery = None
            nursery.cancel_scope.cancel()

    async def _watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while not loop.is_closed():
            await trio.sleep(_LOOP_WATCH_S)
        assert self._stop is not None
        self._stop.set()

    def _forward_worker_change(self, loop: asyncio.AbstractEventLoop, worker: dict) -> None:
        for hook in self.on_worker_change:
            try:
                loop.call_soon_threadsafe(hook, worker)
            except RuntimeError:
                return

    # -- hand-off -------------------------------------------------------------------------
    def _submit(self, call: _Call, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        token = self._token
        if token is None or self._stopped is None or self._stopped.done():
            raise GatewayClosed("the gateway is not running: use `async with lmgw.aio.Gateway`")
        try:
            token.run_sync_soon(self._spawn, call, fn, args)
        except trio.RunFinishedError:
            raise GatewayClosed("the gateway stopped") from None

    def _spawn(self, call: _Call, fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        """On the trio thread: start the request as a task of the bridge's nursery."""
        nursery = self._nursery
        if nursery is None:
            self._settle(call, None, GatewayClosed("the gateway is stopping"))
            return
        nursery.start_soon(self._run, call, fn, args)

    async def _run(self, call: _Call, fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        with trio.CancelScope() as scope:
            call.scope = scope
            if call.cancelled:
                scope.cancel()
            try:
                result = await fn(*args)
            except trio.Cancelled:
                if not call.cancelled:  # the gateway is stopping, not the caller leaving
                    self._settle(call, None, GatewayClosed("the gateway stopped"))
                raise
            except Exception as exc:
                self._settle(call, None, exc)
            else:
                self._settle(call, result, None)

    def _settle(self, call: _Call, value: Any, error: BaseException | None) -> None:
        if call.future is None:
            return
        try:
            self._loop.call_soon_threadsafe(_resolve, call.future, value, error)  # type: ignore[union-attr]
        except RuntimeError:
            pass  # the loop is closed

    def _cancel(self, call: _Call) -> None:
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(call.cancel_in_trio)
            except trio.RunFinishedError:
                pass

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await fn(*args)`` on the trio thread; cancelling the caller cancels it."""
        assert self._loop is not None
        call = _Call(self._loop.create_future())
        self._submit(call, fn, *args)
        try:
            return await call.future  # type: ignore[misc]
        except asyncio.CancelledError:
            self._cancel(call)
            raise

    async def _stream(
        self, endpoint: str, body: bytes, headers: list
    ) -> AsyncIterator[StreamEvent]:
        assert self._loop is not None and self._token is not None and self._gateway is not None
        pipe = _EventPipe(self._loop, self._token, self._stream_queue)
        call = _Call(None)
        self._submit(call, self._gateway.run_stream, endpoint, body, headers, pipe)
        try:
            while True:
                item = await pipe.get()
                if item is _END:
                    break
                if type(item) is list:
                    for event in item:
                        yield event
                else:
                    raise item
            if not pipe.finished:
                raise GatewayClosed("the gateway stopped during the stream")
        finally:
            pipe.abandon()
            self._cancel(call)

    # -- the API (see lmgw.Gateway for the parameters) --------------------------------------
    def _gw(self) -> TrioGateway:
        if self._gateway is None:
            raise GatewayClosed("the gateway is not running: use `async with lmgw.aio.Gateway`")
        return self._gateway

    async def chat(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> ChatResult:
        body = encode_request(model, params, messages=messages)
        return await self._call(self._gw()._call, "chat", body, _headers(request_id, headers))

    def chat_stream(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        body = encode_request(model, params, messages=messages, stream=True)
        return self._stream("chat", body, _headers(request_id, headers))

    async def complete(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> CompletionResult:
        body = encode_request(model, params, prompt=prompt)
        return await self._call(
            self._gw()._call, "completions", body, _headers(request_id, headers)
        )

    def complete_stream(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        body = encode_request(model, params, prompt=prompt, stream=True)
        return self._stream("completions", body, _headers(request_id, headers))

    async def models(self) -> list[ModelInfo]:
        return await self._call(self._gw().models)

    async def tokenize(self, *, model: str | None = None, **params: Any) -> TokenizeResult:
        return await self._call(partial(self._gw().tokenize, model=model, **params))

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return await self._call(partial(self._gw().detokenize, tokens, model=model))

    async def embeddings(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> EmbeddingResult:
        return await self._call(partial(self._gw().embeddings, input=input, model=model, **params))

    async def create_response(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        gw = self._gw()
        return await self._call(partial(gw.create_response, input=input, model=model, **params))

    async def retrieve_response(self, response_id: str) -> dict[str, Any]:
        return await self._call(partial(self._gw().retrieve_response, response_id))

    async def cancel_response(self, response_id: str) -> dict[str, Any]:
        return await self._call(partial(self._gw().cancel_response, response_id))

    async def upload_batch_file(self, data: bytes, filename: str = "batch.jsonl") -> dict[str, Any]:
        return await self._call(partial(self._gw().upload_batch_file, data, filename))

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/chat/completions",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        gw = self._gw()
        return await self._call(partial(gw.create_batch, input_file_id, endpoint,
                                        metadata=metadata))  # fmt: skip

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return await self._call(partial(self._gw().batch, batch_id))

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._call(partial(self._gw().cancel_batch, batch_id))

    async def file_content(self, file_id: str) -> bytes:
        return await self._call(partial(self._gw().file_content, file_id))

    async def run_batch(
        self,
        requests: Sequence[Mapping[str, Any]],
        endpoint: str = "/v1/chat/completions",
        *,
        poll_s: float = 0.2,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """The whole batch runs on the trio thread (polling with trio's sleep there);
        cancelling the caller cancels the batch."""
        gw = self._gw()
        return await self._call(partial(gw.run_batch, list(requests), endpoint, poll_s=poll_s,
                                        timeout_s=timeout_s))  # fmt: skip

    @property
    def workers(self) -> list[dict[str, Any]]:
        """Every worker's description: a read of the registry from this thread (plain Python
        objects under the GIL; the trio side replaces, never edits, what is read here)."""
        return self._gw().workers

    async def worker(self, worker_id: str) -> dict[str, Any]:
        return await self._call(_sync(self._gw().worker), worker_id)

    async def planner(self) -> dict[str, Any]:
        """The recommended worker count of each role (``Gateway.planner``)."""
        return await self._call(_sync(self._gw().planner))

    async def add_worker(
        self, url: str, role: str = "pd", *, id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Add a worker (runs on the trio thread: the registry's writer lives there)."""
        return await self._call(_sync(partial(self._gw().add_worker, url, role, id=id, **fields)))

    async def drain(self, worker_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return await self._call(self._gw().drain, worker_id, grace_s)

    async def undrain(self, worker_id: str) -> dict[str, Any]:
        return await self._call(self._gw().undrain, worker_id)

    async def remove_worker(self, worker_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return await self._call(self._gw().remove_worker, worker_id, grace_s)

    @property
    def lora_adapters(self) -> list[dict[str, Any]]:
        return self._gw().lora_adapters

    async def load_lora_adapter(
        self, name: str, path: str, *, model: str | None = None, inplace: bool = False
    ) -> dict[str, Any]:
        gw = self._gw()
        return await self._call(partial(gw.load_lora_adapter, name, path, model=model,
                                        inplace=inplace))  # fmt: skip

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        return await self._call(self._gw().unload_lora_adapter, name)

    @property
    def model_routes(self) -> list[dict[str, Any]]:
        return self._gw().model_routes

    async def set_model_route(
        self,
        name: str,
        targets: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        fallbacks: Sequence[str] = (),
        split: str = "request",
        mirror: str | None = None,
        mirror_share: float = 1.0,
    ) -> dict[str, Any]:
        """Add or replace a route (on the trio thread: requests read the routes there)."""
        gw = self._gw()
        return await self._call(partial(gw.set_model_route, name, targets, fallbacks=fallbacks,
                                        split=split, mirror=mirror,
                                        mirror_share=mirror_share))  # fmt: skip

    async def delete_model_route(self, name: str) -> dict[str, Any]:
        return await self._call(self._gw().delete_model_route, name)

    async def serve(self, port: int = 0, host: str | None = None) -> int:
        """Also serve HTTP (from the trio thread); returns the bound port."""
        return await self._call(self._gw().serve, port, host)

    @property
    def url(self) -> str | None:
        return self._gw().url

    @property
    def port(self) -> int | None:
        return self._gw().port


def _sync(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """A synchronous gateway method as a coroutine function (to run it on the trio thread)."""

    async def run(*args: Any) -> Any:
        return fn(*args)

    return run
