"""Fair sharing of admission slots through the HTTP API, on both front-door servers: two API
keys in front of one slow simulated worker (``speed=1``: ~8 ms per token), a cap of 2. The
"heavy" key floods with 12 clients in a loop; the "light" key sends 8 requests one after the
other. The light key's requests must not wait behind the heavy key's backlog (as they would
in FIFO order): its median latency stays far below the heavy key's, and its mean queue wait
(from the per-tenant metrics) too. Also: a key's ``min_priority`` is a 403; at or above it
the request runs."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request
from gateway_support import metric_value as support_metric_value

from lmgw.config import ApiKeyConfig, AuthConfig

pytestmark = pytest.mark.usefixtures("hard_deadline")

HEAVY = "sk-heavy-0123456789abcdef"
LIGHT = "sk-light-0123456789abcdef"
CAPPED = "sk-capped-0123456789abcdef"


def chat(priority: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about fair queueing."}],
        "max_tokens": 8,
        "ignore_eos": True,
    }
    if priority is not None:
        body["priority"] = priority
    return body


def metric_value(text: str, sample: str) -> float:
    return support_metric_value(text, sample, default=None)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_light_key_is_not_stuck_behind_a_flooding_one(gateway: GatewayFactory) -> None:
    gw = await gateway(
        1,
        speed=1.0,
        limits={"max_concurrent_requests": 2, "queue_size": 64, "queue_timeout_s": 15},
        auth=AuthConfig(
            keys=[
                ApiKeyConfig(key=HEAVY, name="heavy"),
                ApiKeyConfig(key=LIGHT, name="light"),
                ApiKeyConfig(key=CAPPED, name="capped", min_priority=0),
            ]
        ),
    )
    adm = gw.gateway.app.admission
    latencies: dict[str, list[float]] = {"heavy": [], "light": []}
    statuses: list[int] = []
    light_done = trio.Event()

    async def one(name: str, key: str) -> None:
        t0 = trio.current_time()
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(), bearer(key))
        statuses.append(r.status)
        latencies[name].append(trio.current_time() - t0)

    async def heavy_client() -> None:
        while not light_done.is_set():
            await one("heavy", HEAVY)

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(heavy_client)
        with trio.fail_after(10):
            while adm.queue_depth < 8:  # the heavy key's backlog is there
                await trio.sleep(0.01)
        for _ in range(8):
            await one("light", LIGHT)
        light_done.set()
    assert set(statuses) == {200}, statuses
    assert adm.in_flight == 0 and adm.queue_depth == 0
    heavy_p50 = statistics.median(latencies["heavy"])
    light_p50 = statistics.median(latencies["light"])
    assert light_p50 < heavy_p50 / 2, (light_p50, heavy_p50)
    metrics = await gw.metrics()

    def mean_wait(tenant: str) -> float:
        waited = metric_value(
            metrics, f'lmgw_admission_tenant_wait_seconds_total{{tenant="{tenant}"}}'
        )
        n = metric_value(
            metrics, f'lmgw_admission_tenant_requests_total{{tenant="{tenant}",outcome="admitted"}}'
        )
        return waited / n

    assert mean_wait("light") < mean_wait("heavy") / 3, (mean_wait("light"), mean_wait("heavy"))

    # a key's floor on priority: 403 in OpenAI's shape; at or above it the request runs (the
    # body, priority included, goes to the worker as sent: the simulator ignores the field)
    r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(-1), bearer(CAPPED))
    assert r.status == 403, r.body
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("priority_not_allowed", "priority")
    r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(3), bearer(CAPPED))
    assert r.status == 200, r.body
    r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(-5), bearer(LIGHT))
    assert r.status == 200, r.body
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_auth_rejected_total{reason="priority"}') == 1
