"""Fixtures for the gateway integration tests.

* ``sim_worker``: a factory of in-process simulated vLLM workers (each in its own cancel scope,
  so a test can stop one and leave a URL with nothing listening behind).
* ``gateway``: a factory that starts a :class:`~lmgw.gateway.Gateway` on port 0 in front of N
  in-process workers; parametrized over the two front-door servers, so every test that uses it
  runs on the native trio server and on hypercorn (through the ASGI adapter).
* ``hard_deadline``: add it with ``usefixtures`` for a hard per-test bound on top of the
  ``trio.fail_after`` bounds inside tests and helpers.

The raw HTTP client and the handles live in ``gateway_support.py``. Everything binds 127.0.0.1,
port 0.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayFactory,
    GatewayHandle,
    SimHandle,
    serve_sim,
    server_config,
)

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    ModelConfig,
    RoutingConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, WorkerOptions
from lmgw.simulators.faults import Faults

TEST_DEADLINE_S = 20.0
"""No test using ``hard_deadline`` may run longer than this (it fails instead of hanging CI)."""


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
        url, scope = await nursery.start(serve_sim, sim, stopped)
        return SimHandle(url, sim, scope, stopped)

    return start


@pytest.fixture(params=["native", "lane", "hypercorn"])
def server(request: pytest.FixtureRequest) -> str:
    """The front door: the native server on its trio path, the native server with the
    compiled lane (``server.compiled_lane``), or hypercorn."""
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
        health: dict[str, Any] | None = None,
        models: Sequence[str] = (),
        aliases: Sequence[str] = (),
        server_options: dict[str, Any] | None = None,
        auth: Any = None,
        hedging: Any = None,
        admin: Any = None,
        streams: Any = None,
        routing_options: dict[str, Any] | None = None,
        model_routes: Sequence[Any] = (),
        **worker_options: Any,
    ) -> GatewayHandle:
        option_sets = list(per_worker) if per_worker is not None else [worker_options] * n
        sims = [await sim_worker(**dict(opts)) for opts in option_sets]
        urls = [s.url for s in sims] + list(extra_urls)
        cfg = GatewayConfig(
            server=server_config(server, port=0, graceful_shutdown_s=1.0, **(server_options or {})),
            limits=LimitsConfig(**(limits or {})),
            upstream=UpstreamConfig(**{"connect_timeout_s": 2.0, **(upstream or {})}),
            routing=RoutingConfig(policy=routing, **(routing_options or {})),
            health=HealthConfig(interval_s=health_interval_s, timeout_s=2.0, **(health or {})),
            models=[ModelConfig(name=m, aliases=list(aliases)) for m in models],
            workers=[WorkerConfig(url=u, role="pd", id=f"w{i}") for i, u in enumerate(urls)],
        )
        if auth is not None:
            cfg = msgspec.structs.replace(cfg, auth=auth)
        if hedging is not None:
            cfg = msgspec.structs.replace(cfg, hedging=hedging)
        if admin is not None:
            cfg = msgspec.structs.replace(cfg, admin=admin)
        if streams is not None:
            cfg = msgspec.structs.replace(cfg, streams=streams)
        if model_routes:
            cfg = msgspec.structs.replace(cfg, model_routes=list(model_routes))
        gw = Gateway(cfg)
        with trio.fail_after(10):
            await nursery.start(gw.run)
        return GatewayHandle(gw, gw.url, server, sims, urls)

    return start


@pytest.fixture
async def hard_deadline(nursery: trio.Nursery) -> None:
    """Fail (instead of hang) any test that runs past ``TEST_DEADLINE_S``."""

    async def watchdog() -> None:
        await trio.sleep(TEST_DEADLINE_S)
        raise TimeoutError(f"test still running after {TEST_DEADLINE_S:g} s")

    nursery.start_soon(watchdog)
