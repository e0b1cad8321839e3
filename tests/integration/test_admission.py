"""Admission control end to end, on both front-door servers (the ``gateway`` fixture): the
gateway-wide cap with its FIFO queue (429 + Retry-After when full or timed out), the per-worker
cap (traffic moves to the other worker; 503 + Retry-After when all are at it), the metrics, and
counters back at zero after clients cancel.

Slow requests are the simulator's own: ``speed=1`` with ``ignore_eos`` and a token count (about
8 ms per token), or ``hang`` faults (never answered until the client goes away). Every wait is
on an observable state (the admission counters, a worker's in-flight count), never a sleep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, GatewayHandle, RawResponse, http_request
from gateway_support import metric_value as support_metric_value

pytestmark = pytest.mark.usefixtures("hard_deadline")

MESSAGES = [{"role": "user", "content": "Tell me about admission control."}]


def chat(tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": tokens, "ignore_eos": True}


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def metric_value(text: str, sample: str) -> float:
    return support_metric_value(text, sample, default=None)


def assert_rejected(r: RawResponse, status: int, reason_words: str) -> None:
    assert r.status == status, (r.status, r.body)
    retry_after = r.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, r.headers
    err = r.json()["error"]
    assert err["code"] == status and reason_words in err["message"], err
    assert err["type"] == ("RateLimitError" if status == 429 else "ServiceUnavailableError")


class Requests:
    """Requests run as tasks in a nursery; each one's response is kept by name."""

    def __init__(self, nursery: trio.Nursery, gw: GatewayHandle) -> None:
        self.nursery, self.gw = nursery, gw
        self.done: dict[str, RawResponse] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    def start(self, name: str, body: dict[str, Any]) -> None:
        scope = self.scopes[name] = trio.CancelScope()

        async def run() -> None:
            with scope:
                self.done[name] = await http_request(
                    self.gw.url, "POST", "/v1/chat/completions", body, timeout=15
                )

        self.nursery.start_soon(run)


async def test_cap_queue_and_429s(gateway: GatewayFactory) -> None:
    """Cap 2, queue 2: two run, two wait, three more get a 429 at once; the four complete."""
    gw = await gateway(
        1,
        speed=1.0,
        limits={"max_concurrent_requests": 2, "queue_size": 2, "queue_timeout_s": 15},
    )
    adm = gw.gateway.app.admission
    async with trio.open_nursery() as nursery:
        reqs = Requests(nursery, gw)
        for name in ("hold0", "hold1"):
            reqs.start(name, chat(150))  # ~1.2 s each at speed 1
        await wait_until(lambda: adm.in_flight == 2)
        for name in ("queued0", "queued1"):
            reqs.start(name, chat(2))
        await wait_until(lambda: adm.queue_depth == 2)
        metrics = await gw.metrics()
        assert metric_value(metrics, "lmgw_requests_in_flight") == 2
        assert metric_value(metrics, "lmgw_admission_queue_depth") == 2
        # the holders are still running (the test would be void otherwise)
        assert not reqs.done and gw.gateway.registry.get("w0").in_flight == 2
        rejected = [
            await http_request(gw.url, "POST", "/v1/chat/completions", chat(2)) for _ in range(3)
        ]
        assert not any(name.startswith("hold") for name in reqs.done), "holders ended too soon"
    for r in rejected:
        assert_rejected(r, 429, "queue")
    assert sorted(reqs.done) == ["hold0", "hold1", "queued0", "queued1"]
    for name, r in reqs.done.items():
        assert r.status == 200, (name, r.body)
        assert r.json()["choices"][0]["message"]["content"]
    assert adm.in_flight == 0 and adm.queue_depth == 0
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_admission_rejected_total{reason="queue_full"}') == 3
    assert metric_value(metrics, 'lmgw_admission_rejected_total{reason="queue_timeout"}') == 0
    assert metric_value(metrics, "lmgw_requests_in_flight") == 0
    assert metric_value(metrics, "lmgw_admission_queue_depth") == 0
    # plain requests take the express lane after their wait too (the general path cost a
    # standing queue's requests more), and the wait is observed once each
    assert metric_value(metrics, "lmgw_express_requests_total") == 4
    assert metric_value(metrics, "lmgw_queue_time_seconds_count") == 4


async def test_queue_timeout_is_a_429(gateway: GatewayFactory) -> None:
    gw = await gateway(
        1,
        faults={"hang": True},
        limits={"max_concurrent_requests": 1, "queue_size": 5, "queue_timeout_s": 0.2},
    )
    adm = gw.gateway.app.admission
    async with trio.open_nursery() as nursery:
        reqs = Requests(nursery, gw)
        reqs.start("hung", chat(2))
        await wait_until(lambda: adm.in_flight == 1)
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(2))
        assert_rejected(r, 429, "no slot freed within 0.2 s")
        assert adm.queue_depth == 0
        reqs.scopes["hung"].cancel()
    await wait_until(lambda: adm.in_flight == 0)
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_admission_rejected_total{reason="queue_timeout"}') == 1


async def test_cancelled_requests_give_back_slots_and_queue_places(
    gateway: GatewayFactory,
) -> None:
    """Clients that leave while running or queued: every counter returns to zero, and the
    slot really is free afterwards."""
    gw = await gateway(
        1,
        faults={"hang": True},
        limits={"max_concurrent_requests": 1, "queue_size": 5, "queue_timeout_s": 15},
    )
    adm = gw.gateway.app.admission
    worker = gw.gateway.registry.get("w0")
    async with trio.open_nursery() as nursery:
        reqs = Requests(nursery, gw)
        reqs.start("running", chat(2))
        await wait_until(lambda: adm.in_flight == 1)
        for name in ("queued0", "queued1", "queued2"):
            reqs.start(name, chat(2))
            await wait_until(lambda n=name: adm.queue_depth == int(n[-1]) + 1)
        reqs.scopes["queued1"].cancel()  # leaves from the middle of the queue
        await wait_until(lambda: adm.queue_depth == 2)
        reqs.scopes["running"].cancel()  # its slot passes to queued0, which hangs on the worker
        await wait_until(lambda: adm.queue_depth == 1 and worker.in_flight == 1)
        assert adm.in_flight == 1
        reqs.scopes["queued0"].cancel()  # now queued2 runs
        await wait_until(lambda: adm.queue_depth == 0 and adm.in_flight == 1)
        reqs.scopes["queued2"].cancel()
    await wait_until(lambda: adm.in_flight == 0 and worker.in_flight == 0)
    await wait_until(lambda: gw.sims[0].sim.stats.in_flight == 0)
    assert not reqs.done  # nobody got an answer: all left
    metrics = await gw.metrics()
    assert metric_value(metrics, "lmgw_requests_in_flight") == 0
    assert metric_value(metrics, "lmgw_admission_queue_depth") == 0
    assert metric_value(metrics, 'lmgw_admission_rejected_total{reason="queue_full"}') == 0
    await gw.sims[0].set_faults(hang=False)
    r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(2))
    assert r.status == 200, r.body


async def test_per_worker_cap_moves_traffic_then_503(gateway: GatewayFactory) -> None:
    gw = await gateway(
        per_worker=[{"faults": {"hang": True}}, {}],
        limits={"max_in_flight_per_worker": 1},
    )
    w0, w1 = gw.gateway.registry.get("w0"), gw.gateway.registry.get("w1")
    async with trio.open_nursery() as nursery:
        reqs = Requests(nursery, gw)
        # round robin: within two requests one lands on the hanging w0 and stays there
        for i in range(2):
            reqs.start(f"probe{i}", chat(2))
            with trio.move_on_after(2):
                await wait_until(lambda i=i: w0.in_flight == 1 or f"probe{i}" in reqs.done)
            if w0.in_flight == 1:
                break
        assert w0.in_flight == 1
        before = w0.total_requests
        sent_to_w1 = w1.total_requests
        for _ in range(6):  # w0 is at its cap: everything goes to w1
            r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(2))
            assert r.status == 200, r.body
        assert w0.total_requests == before and w1.total_requests == sent_to_w1 + 6
        await gw.sims[1].set_faults(hang=True)
        reqs.start("hold_w1", chat(2))
        await wait_until(lambda: w1.in_flight == 1)
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(2))
        assert_rejected(r, 503, "at its limit of 1 requests in flight")
        nursery.cancel_scope.cancel()
    await wait_until(lambda: w0.in_flight == 0 and w1.in_flight == 0)
    assert gw.gateway.app.admission.in_flight == 0
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_admission_rejected_total{reason="worker_capacity"}') == 1


async def test_limits_off_changes_nothing(gateway: GatewayFactory) -> None:
    """Defaults: no cap, no queue, no Retry-After; requests in flight are still counted."""
    gw = await gateway(1)
    adm = gw.gateway.app.admission
    assert adm.cap == 0 and gw.gateway.pipeline.worker_cap == 0
    results: list[RawResponse] = []

    async def one() -> None:
        results.append(await http_request(gw.url, "POST", "/v1/chat/completions", chat(4)))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert [r.status for r in results] == [200] * 20
    assert all("retry-after" not in r.headers for r in results)
    assert adm.in_flight == 0
    metrics = await gw.metrics()
    assert metric_value(metrics, "lmgw_requests_in_flight") == 0
