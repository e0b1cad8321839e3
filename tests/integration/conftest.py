"""Fixtures for the gateway integration tests.

* ``sim_worker``: a factory of in-process simulated vLLM workers (each in its own cancel scope,
  so a test can stop one and leave a URL with nothing listening behind).
* ``gateway``: a factory that starts a :class:`~lmgw.gateway.Gateway` on port 0 in front of N
  in-process workers; parametrized over the two front-door servers, so every test that uses it
  runs on the native trio server and on hypercorn (through the ASGI adapter).
* ``http_request``: a tiny raw HTTP/1.1 client on trio sockets, so tests see the exact bytes.

Everything binds 127.0.0.1, port 0. A test module can add ``test_deadline`` (``usefixtures``) for a
hard per-test bound on top of the ``trio.fail_after`` bounds inside tests and helpers.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import trio
from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess
from lmgw.simulators.faults import Faults

MODEL = "sim-model"
TEST_DEADLINE_S = 20.0
"""No test in this folder may run longer than this (a stuck test fails instead of hanging CI)."""
REQUEST_TIMEOUT_S = 10.0
"""Default bound of one raw HTTP exchange."""


# -- raw HTTP ------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    #: header name (lower case) -> value; ``header_list`` keeps every line in order
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    #: False when the body was cut short (chunked without its last-chunk, short content-length)
    complete: bool = True

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    def events(self) -> list[Any]:
        """SSE events, asserting the exact framing: each is ``data: <payload>\\n\\n``; payloads
        are decoded JSON, or the string ``"[DONE]"``."""
        assert self.headers["content-type"].startswith("text/event-stream"), self.headers
        return parse_sse(self.body)


def parse_sse(body: bytes) -> list[Any]:
    assert body.endswith(b"\n\n"), body[-200:]
    out: list[Any] = []
    for raw in body[:-2].split(b"\n\n"):
        assert raw.startswith(b"data: ") and b"\n" not in raw and b"\r" not in raw, raw
        payload = raw[6:]
        out.append("[DONE]" if payload == b"[DONE]" else msgspec.json.decode(payload))
    return out


def request_bytes(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    close: bool = True,
) -> bytes:
    data = b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
    lines = [f"{method} {path} HTTP/1.1", f"host: {urlsplit(url).netloc}"]
    if close:
        lines.append("connection: close")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded, and whether it ended with the last-chunk."""
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep or not size_line:
            return bytes(out), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out), True
        out += rest[:size]
        if len(rest) < size + 2:
            return bytes(out), False
        data = rest[size + 2 :]


def parse_response(raw: bytes) -> RawResponse:
    head, sep, payload = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    header_list = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    headers = dict(header_list)
    complete = True
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload, complete = dechunk(payload)
    elif "content-length" in headers:
        complete = len(payload) == int(headers["content-length"])
    return RawResponse(status, headers, header_list, payload, complete)


async def open_stream(url: str) -> trio.SocketStream:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


async def http_request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = REQUEST_TIMEOUT_S,
) -> RawResponse:
    """One request on a fresh connection (``connection: close``); reads to EOF."""
    with trio.fail_after(timeout):
        stream = await open_stream(url)
        async with stream:
            await stream.send_all(request_bytes(url, method, path, body, headers))
            raw = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    raw += chunk
            except trio.BrokenResourceError:  # a reset after the response: keep what came
                pass
    return parse_response(bytes(raw))


# -- simulated workers ---------------------------------------------------------------------------


@dataclass
class SimHandle:
    """An in-process simulated worker: its URL, its handler (engine, stats, faults)."""

    url: str
    sim: SimWorker
    _scope: trio.CancelScope
    _stopped: trio.Event

    async def stop(self) -> None:
        """Stop serving: the port closes, open connections are closed."""
        self._scope.cancel()
        with trio.fail_after(5):
            await self._stopped.wait()

    async def stats(self) -> dict[str, Any]:
        """``GET /sim/stats`` over HTTP (what an out-of-process worker would answer)."""
        r = await http_request(self.url, "GET", "/sim/stats")
        assert r.status == 200, r
        return r.json()

    async def set_faults(self, **faults: Any) -> None:
        r = await http_request(self.url, "POST", "/sim/faults", faults)
        assert r.status == 200, r.body


async def _serve_sim(
    sim: SimWorker, stopped: trio.Event, *, task_status: trio.TaskStatus[tuple[str, Any]]
) -> None:
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_worker_inprocess, sim)
                task_status.started((url, scope))
    finally:
        stopped.set()


SimFactory = Callable[..., Awaitable[SimHandle]]


@pytest.fixture
def sim_worker(nursery: trio.Nursery) -> SimFactory:
    """``await sim_worker(speed=..., faults=Faults(...), ...)`` -> :class:`SimHandle`.

    Options are :class:`~lmgw.simulators.app.WorkerOptions` fields; ``speed`` defaults to
    infinity (no simulated latency) and ``model`` to ``MODEL``.
    """

    async def start(**options: Any) -> SimHandle:
        options.setdefault("speed", math.inf)
        options.setdefault("model", MODEL)
        if isinstance(options.get("faults"), dict):
            options["faults"] = Faults(**options["faults"])
        sim = SimWorker(WorkerOptions(**options))
        stopped = trio.Event()
        url, scope = await nursery.start(_serve_sim, sim, stopped)
        return SimHandle(url, sim, scope, stopped)

    return start


def free_port_url() -> str:
    """A 127.0.0.1 URL with nothing listening (bound to port 0, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- the gateway ---------------------------------------------------------------------------------


@dataclass
class GatewayHandle:
    gateway: Gateway
    url: str
    server: str
    #: the simulated workers behind the gateway, in config order
    sims: list[SimHandle] = field(default_factory=list)
    #: every worker URL in the config (simulated ones first, then ``extra_urls``)
    workers: list[str] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> RawResponse:
        return await http_request(self.url, method, path, body, headers, **kw)

    async def metrics(self) -> str:
        r = await self.request("GET", "/metrics")
        assert r.status == 200
        return r.body.decode()


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]


@pytest.fixture(params=["native", "hypercorn"])
def server(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def gateway(nursery: trio.Nursery, server: str, sim_worker: SimFactory) -> GatewayFactory:
    """``await gateway(n, **worker_options, limits=..., upstream=..., ...)`` -> GatewayHandle.

    Starts ``n`` simulated workers (``worker_options`` apply to all; ``per_worker`` gives a list
    of option dicts instead), plus ``extra_urls`` registered as workers as they are (e.g. a URL
    with nothing listening), then a gateway on port 0 with the fixture's ``server``. Health
    probes run once at start-up and then rarely (``health_interval_s``), so that probe traffic
    does not interleave with what a test checks in ``/sim/stats``.
    """

    async def start(
        n: int = 1,
        *,
        per_worker: Sequence[dict[str, Any]] | None = None,
        extra_urls: Sequence[str] = (),
        limits: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        routing: str = "round_robin",
        health_interval_s: float = 30.0,
        models: Sequence[str] = (),
        **worker_options: Any,
    ) -> GatewayHandle:
        option_sets = list(per_worker) if per_worker is not None else [worker_options] * n
        sims = [await sim_worker(**dict(opts)) for opts in option_sets]
        urls = [s.url for s in sims] + list(extra_urls)
        cfg = GatewayConfig(
            server=ServerConfig(port=0, server=server, graceful_shutdown_s=1.0),  # type: ignore[arg-type]
            limits=LimitsConfig(**(limits or {})),
            upstream=UpstreamConfig(**{"connect_timeout_s": 2.0, **(upstream or {})}),
            routing=RoutingConfig(policy=routing),
            health=HealthConfig(interval_s=health_interval_s, timeout_s=2.0),
            models=[ModelConfig(name=m) for m in models],
            workers=[WorkerConfig(url=u, role="pd", id=f"w{i}") for i, u in enumerate(urls)],
        )
        gw = Gateway(cfg)
        with trio.fail_after(10):
            await nursery.start(gw.run)
        return GatewayHandle(gw, gw.url, server, sims, urls)

    return start


@pytest.fixture
async def test_deadline(nursery: trio.Nursery) -> None:
    """Fail (instead of hang) any test that runs past ``TEST_DEADLINE_S``."""

    async def watchdog() -> None:
        await trio.sleep(TEST_DEADLINE_S)
        raise TimeoutError(f"test still running after {TEST_DEADLINE_S:g} s")

    nursery.start_soon(watchdog)
