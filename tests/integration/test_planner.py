"""The planner end to end (``[planner]``, :mod:`lmgw.planner`), against simulated workers whose
timing model is set for it: what it learns and recommends for a merged worker, for each role
of a P/D fleet, with an admission queue, and the standby loop of ``lmgw simulate
--autoscale``."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request, metric_value

from lmgw import cli
from lmgw.config import (
    AdminConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    ModelConfig,
    PlannerConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

pytestmark = pytest.mark.usefixtures("hard_deadline")

TOKEN = "planner-admin"
POOL = ("pd", MODEL)  # the merged workers serving the one model


async def start_gateway(
    nursery: trio.Nursery, workers: list[WorkerConfig], planner: PlannerConfig, **sections: Any
) -> Gateway:
    """A gateway on port 0 in front of ``workers`` with rare probes and ``planner``."""
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        planner=planner,
        workers=workers,
        **sections,
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw


async def stream(url: str, stop_at: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 10,
            "ignore_eos": True, "stream": True}  # fmt: skip
    while time.monotonic() < stop_at:
        r = await http_request(url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body


async def test_the_planner_learns_a_workers_capacity_and_asks_for_more(
    nursery: trio.Nursery, sim_worker, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merged worker whose time per output token grows with its batch (2 ms + 4 ms per
    running stream), traffic that climbs from 2 to 8 streams, a 25 ms inter-token target: the
    planner learns that one worker holds ~4 streams and recommends 3 for 8, on
    ``/admin/planner``, ``/metrics`` and ``lmgw workers plan``; then 1 once it is idle."""
    sim = await sim_worker(speed=1.0)
    timing = sim.sim.engine.config.timing
    timing.a, timing.c, timing.d = 0.0, 0.002, 0.004  # TPOT = 2 ms + 4 ms x batch
    gw = await start_gateway(
        nursery,
        [WorkerConfig(url=sim.url, role="pd", id="w0")],
        PlannerConfig(itl_slo_s=0.025, window_s=1.5, scale_down_delay_s=0.0),
        admin=AdminConfig(token=TOKEN),
    )
    assert gw.planner is not None
    for clients in (2, 4, 8):  # 1.5 s at each level: 2 and 4 meet 25 ms, 8 does not
        stop_at = time.monotonic() + 1.5
        async with trio.open_nursery() as load:
            for _ in range(clients):
                load.start_soon(stream, gw.url, stop_at)
        if clients == 8:
            break
    plan = gw.planner.evaluate(time.monotonic())[POOL]
    itl = plan.signals["itl"]
    assert itl["status"] == "ok", itl
    assert 3 <= plan.capacity <= 5, itl  # the TTFT side meets 2 s at every level
    assert plan.load > 5
    assert plan.desired == math.ceil(plan.load / (plan.capacity * 0.8)) >= 2
    admin = {"authorization": f"Bearer {TOKEN}"}
    r = await http_request(gw.url, "GET", "/admin/planner", headers=admin)
    assert r.status == 200, r.body
    shown = r.json()
    (pool,) = shown["pools"]
    assert shown["itl_slo_s"] == 0.025 and pool["desired"] == plan.desired
    assert (pool["role"], pool["models"]) == POOL
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    sample = f'lmgw_planner_desired_workers{{role="pd",models="{MODEL}"}}'
    assert metric_value(text, sample, None) == plan.desired
    assert (await http_request(gw.url, "GET", "/admin/planner")).status == 401
    with trio.fail_after(15):  # `lmgw workers plan`
        argv = ["workers", "plan", "--gateway", gw.url, "--token", TOKEN]
        assert await trio.to_thread.run_sync(cli.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ROLE", "MODELS", "WORKERS", "DESIRED", "LOAD", "CAPACITY", "STATUS",
    ]  # fmt: skip
    row = lines[1].split()
    assert row[:2] == ["pd", MODEL] and int(row[3]) >= plan.desired - 1 and row[6] == "ok"
    with trio.fail_after(5):  # no traffic: the window empties, and no delay holds the fall
        while gw.planner.evaluate(time.monotonic())[POOL].desired != 1:
            await trio.sleep(0.5)
    assert gw.planner.plans[POOL].status == "idle"


async def test_the_planner_can_be_off(nursery: trio.Nursery, sim_worker) -> None:
    sim = await sim_worker()
    gw = await start_gateway(
        nursery,
        [WorkerConfig(url=sim.url, role="pd")],
        PlannerConfig(enabled=False),
        admin=AdminConfig(token=TOKEN),
    )
    assert gw.planner is None
    r = await http_request(
        gw.url, "GET", "/admin/planner", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert r.status == 404 and "planner" in r.json()["error"]["message"]
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    assert "lmgw_planner_desired_workers{" not in text


async def test_each_role_of_a_pd_fleet_gets_its_own_count(
    nursery: trio.Nursery, sim_worker
) -> None:
    """P/D: a prefill worker that computes one prompt at a time (~90 ms each) under 6
    concurrent clients, two decode workers with room to spare. Prefill legs queue far past a
    150 ms TTFT target, so the planner asks for more prefill workers; the decode role, whose
    streams stay fast, keeps its two (a fall waits for the delay). Its load is sampled every
    0.5 s while a decode leg holds a worker ~50 ms of each ~90 ms prefill, so a window's few
    samples can all miss one: "idle" then says as much as "ok" (no more decode workers)."""
    p = await sim_worker(role="p", speed=1.0, serial_prefill=True, timing=(("a", 0.09),))
    ds = [await sim_worker(role="d", speed=1.0, timing=(("c", 0.005),)) for _ in range(2)]
    gw = await start_gateway(
        nursery,
        [WorkerConfig(url=p.url, role="p", id="p0")]
        + [WorkerConfig(url=d.url, role="d", id=f"d{i}") for i, d in enumerate(ds)],
        PlannerConfig(ttft_slo_s=0.15, itl_slo_s=0.05, window_s=2.0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-nixl")],
    )
    assert gw.planner is not None
    stop_at = time.monotonic() + 3.0
    async with trio.open_nursery() as load:
        for _ in range(6):
            load.start_soon(stream, gw.url, stop_at)
    plans = gw.planner.evaluate(time.monotonic())
    prefill, decode = plans[("p", MODEL)], plans[("d", MODEL)]
    assert prefill.workers == 1 and prefill.status in ("overloaded", "ok"), prefill
    assert prefill.desired >= 3, prefill  # ~6 queued prefills, each over the target alone at 2+
    assert decode.workers == 2 and decode.status in ("ok", "idle"), decode
    assert decode.desired == 2, decode  # neither more nor, before the delay, fewer


async def test_requests_queued_for_admission_are_load(nursery: trio.Nursery, sim_worker) -> None:
    """With ``limits.max_concurrent_requests = 2`` the worker never holds more than 2, while 6
    clients wait their turn: the planner's load is the 6 (2 running, 4 queued), not the 2 the
    cap lets through, since the waiting clients are the demand more workers would serve."""
    sim = await sim_worker(speed=1.0, timing=(("c", 0.02),))  # 20 ms a token: slow streams
    gw = await start_gateway(
        nursery,
        [WorkerConfig(url=sim.url, role="pd", id="w0", models=[MODEL])],
        PlannerConfig(window_s=1.0),
        limits=LimitsConfig(max_concurrent_requests=2, queue_size=16),
    )
    assert gw.planner is not None
    stop_at = time.monotonic() + 2.0
    async with trio.open_nursery() as load:
        for _ in range(6):
            load.start_soon(stream, gw.url, stop_at)
        await trio.sleep(1.6)  # a window of samples with the queue full
        plan = gw.planner.evaluate(time.monotonic())[POOL]
        assert gw.registry.get("w0").in_flight <= 2
    assert plan.load > 4.5, plan  # ~6: the queue counts


async def test_standby_workers_follow_the_recommendation(nursery: trio.Nursery, sim_worker) -> None:
    """``lmgw simulate --autoscale``'s loop in process: one merged worker routed to, two on
    standby. Under 12 streams the planner asks for more and both standby workers join (and
    serve); once the load is gone (no scale-down delay here) they are drained, removed and
    back on standby."""
    from lmgw.planner.standby import StandbyScaler

    sims = [await sim_worker(speed=1.0, timing=(("c", 0.002), ("d", 0.004))) for _ in range(3)]
    workers = [
        WorkerConfig(url=s.url, role="pd", id=f"w{i}", models=[MODEL]) for i, s in enumerate(sims)
    ]
    gw = await start_gateway(
        nursery,
        workers[:1],
        PlannerConfig(itl_slo_s=0.025, window_s=1.5, scale_down_delay_s=0.0),
    )
    assert gw.planner is not None
    scaler = StandbyScaler(gw, workers[1:])
    stop_at = time.monotonic() + 3.0
    async with trio.open_nursery() as load:
        for _ in range(12):
            load.start_soon(stream, gw.url, stop_at)
        await trio.sleep(2.0)
        assert gw.planner.evaluate(time.monotonic())[POOL].desired >= 3
        scaler.step()
        assert sorted(w.id for w in gw.registry) == ["w0", "w1", "w2"]
    assert all(w.total_requests > 0 for w in gw.registry)  # the new ones served too
    with trio.fail_after(5):
        while gw.planner.evaluate(time.monotonic())[POOL].desired != 1:
            await trio.sleep(0.5)
    scaler.step()  # drained
    assert {w.id: w.state.value for w in gw.registry} == {
        "w0": "healthy", "w1": "draining", "w2": "draining",
    }  # fmt: skip
    scaler.step()  # idle: removed, back on standby
    assert [w.id for w in gw.registry] == ["w0"]
    assert [wc.worker_id for wc in scaler.standby["pd"]] == ["w1", "w2"]
