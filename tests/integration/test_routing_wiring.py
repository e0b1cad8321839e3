"""The pipeline feeds the routing policies their keys: prompt tokens (or bytes), sessions."""

from __future__ import annotations

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value

from lmgw.config import GatewayConfig, HealthConfig, RoutingConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.routing.policies.cache_aware import CacheAware
from lmgw.routing.policy import RouteContext
from lmgw.workers.worker import Worker


async def test_session_affinity_follows_the_session_header(gateway: GatewayFactory) -> None:
    gw = await gateway(3, routing="session_affinity")
    for session in ("alice", "bob", "carol"):
        before = [s.sim.stats.requests_total for s in gw.sims]
        for _ in range(3):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            r = await gw.request(
                "POST", "/v1/chat/completions", body, headers={"x-session-id": session}
            )
            assert r.status == 200
        after = [s.sim.stats.requests_total for s in gw.sims]
        assert sorted(b - a for a, b in zip(before, after, strict=True)) == [0, 0, 3]


async def test_cache_aware_keeps_a_conversation_on_one_worker(gateway: GatewayFactory) -> None:
    """Without a gateway tokenizer the prompt's bytes are the key: each growing conversation
    stays where its prefix is cached, while different conversations spread."""
    gw = await gateway(2, routing="cache_aware")
    homes: dict[str, set[int]] = {}
    for turn in range(4):
        for user in ("u1", "u2", "u3", "u4"):
            history = [
                {"role": "user", "content": f"{user} long shared context " * 40 + f"turn {t}"}
                for t in range(turn + 1)
            ]
            before = [s.sim.stats.requests_total for s in gw.sims]
            r = await gw.request(
                "POST", "/v1/chat/completions", {"model": MODEL, "messages": history}
            )
            assert r.status == 200
            after = [s.sim.stats.requests_total for s in gw.sims]
            homes.setdefault(user, set()).add(
                next(i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a)
            )
            await trio.sleep(0)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) == 2  # not all piled on one worker
    # the audit: what the policy predicted against what the workers reported cached
    text = await gw.metrics()
    predicted = metric_value(text, f'lmgw_routing_predicted_cached_tokens_total{{model="{MODEL}"}}')
    reported = metric_value(text, f'lmgw_routing_reported_cached_tokens_total{{model="{MODEL}"}}')
    assert predicted > 0 and reported > 0
    assert 0 < metric_value(text, f'lmgw_routing_precision{{model="{MODEL}"}}') <= 1


async def test_route_header_explains_the_decision(nursery: trio.Nursery, sim_worker) -> None:
    sims = [await sim_worker() for _ in range(2)]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        routing=RoutingConfig(policy="cache_aware", route_header=True),
        workers=[WorkerConfig(url=s.url, role="pd", id=f"w{i}") for i, s in enumerate(sims)],
    )
    port = await nursery.start(Gateway(cfg).run)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    r = await http_request(f"http://127.0.0.1:{port}", "POST", "/v1/chat/completions", body)
    assert r.status == 200
    route = r.headers["x-lmgw-route"]
    assert "cache_aware" in route and ("w0" in route or "w1" in route)


async def test_policy_statistics_are_exported(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="cache_aware")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 50}]}
    assert (await gw.request("POST", "/v1/chat/completions", body)).status == 200
    text = await gw.metrics()
    assert 'lmgw_routing_policy_stat{role="pd",policy="cache_aware",stat="entries"}' in text


async def test_cache_aware_hears_when_a_streams_prefill_ends(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay tells the policy when a stream's first event arrives (the worker's prefill
    for it is over); a non-streamed answer ends its prefill when it finishes. Either way
    nothing stays queued."""
    seen: list[tuple[str, float]] = []
    original = CacheAware.on_first_token

    def record(self: CacheAware, worker: Worker, ctx: RouteContext) -> None:
        seen.append((worker.id, self.statistics()["queued_requests"]))
        original(self, worker, ctx)

    monkeypatch.setattr(CacheAware, "on_first_token", record)
    gw = await gateway(2, routing="cache_aware")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 50}]}
    stat = 'lmgw_routing_policy_stat{role="pd",policy="cache_aware",stat="queued_requests"}'
    assert (
        await gw.request("POST", "/v1/chat/completions", {**body, "stream": True})
    ).status == 200
    assert len(seen) == 1 and seen[0][1] == 1  # it was queued until then
    assert metric_value(await gw.metrics(), stat) == 0
    assert (await gw.request("POST", "/v1/chat/completions", body)).status == 200
    assert len(seen) == 1
    assert metric_value(await gw.metrics(), stat) == 0
