"""Joint P/D placement end to end: a simulated P/D fleet spread over two KV-transfer zones
(`lmgw simulate --zones 2`), the gateway in front. With joint placement every pair shares a
zone, which the decode workers' own transfer counters confirm; with independent placement
(each stage's policy alone) pairs cross zones."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import http_request, metric_value

from lmgw.config import RoutingConfig
from lmgw.fleetspec import FleetSpec
from lmgw.gateway import Gateway
from lmgw.simulate import fleet_config
from lmgw.simulators import Fleet, run_fleet

pytestmark = pytest.mark.usefixtures("hard_deadline")

MODEL = "sim-model"
N = 12


async def _serve(nursery: trio.Nursery, placement: str) -> tuple[Fleet, str, Gateway]:
    fleet: Fleet = await nursery.start(
        lambda task_status: run_fleet(
            {"p": 2, "d": 2}, model=MODEL, speed=math.inf, zones=2, task_status=task_status
        )
    )
    assert sorted((m.role, m.zone) for m in fleet.members) == [
        ("d", "z0"), ("d", "z1"), ("p", "z0"), ("p", "z1"),
    ]  # fmt: skip
    args = argparse.Namespace(host="127.0.0.1", port=0, model=MODEL, zones=2,
                              kv_bytes_per_token=65536)  # fmt: skip
    cfg = fleet_config(fleet, FleetSpec(p=1, d=1), args)
    routing = RoutingConfig(
        policy="random", placement=placement, kv_bytes_per_token=65536, route_header=True
    )
    cfg = msgspec.structs.replace(cfg, routing=routing)
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    return fleet, f"http://127.0.0.1:{port}", gw


async def _transfers(fleet: Fleet) -> dict[str, float]:
    out = {"same": 0.0, "cross": 0.0}
    for m in fleet.members:
        if m.role == "d":
            stats = (await http_request(m.url, "GET", "/sim/stats")).json()["handoff"]
            out["same"] += stats["kv_transfers_same_zone"]
            out["cross"] += stats["kv_transfers_cross_zone"]
    return out


async def _traffic(url: str) -> list[str]:
    """N chats; their ``x-lmgw-route`` headers."""
    routes = []
    for i in range(N):
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {i}: " + "context " * 40}],
            "max_tokens": 4,
        }
        r = await http_request(url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        routes.append(r.headers["x-lmgw-route"])
    return routes


async def test_joint_placement_keeps_every_pair_in_one_zone(nursery: trio.Nursery) -> None:
    fleet, url, _ = await _serve(nursery, "joint")
    routes = await _traffic(url)
    for route in routes:  # e.g. policy=joint; worker=d1; reason=prefill p0 (z0) est 0.1 ms,
        m = re.fullmatch(  # kv 0.1 ms to z0; predicted=0; prompt=61
            r"policy=joint; worker=\S+; reason=prefill \S+ \((z\d)\) est [\d.]+ ms,"
            r" kv [\d.]+ ms to (z\d); predicted=\d+; prompt=\d+",
            route,
        )
        assert m is not None and m.group(1) == m.group(2), route
    assert await _transfers(fleet) == {"same": N, "cross": 0}
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    sample = f'lmgw_placement_pairs_total{{model="{MODEL}",zones="same_zone"}}'
    assert metric_value(text, sample) == N
    assert "lmgw_placement_queued_tokens{worker=" not in text  # every prefill is done
    workers = (await http_request(url, "GET", "/admin/workers")).json()["data"]
    assert {w["zone"] for w in workers} == {"z0", "z1"}
    nursery.cancel_scope.cancel()


async def test_independent_placement_pairs_across_zones(nursery: trio.Nursery) -> None:
    fleet, url, _ = await _serve(nursery, "independent")
    await _traffic(url)
    moved = await _transfers(fleet)
    assert moved["same"] + moved["cross"] == N and moved["cross"] > 0  # P(0 of 12) = 2**-12
    nursery.cancel_scope.cancel()
