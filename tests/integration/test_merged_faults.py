"""Merged workers under mixed faults, many requests at once, every recovery feature on: one
worker fails a third of its requests, one drops every connection after 3 tokens, one stalls
half of its requests before the first token (hedged streams), one is healthy. Every request
must end in time with the merged worker's exact text (retries, migration and hedging hide
the faults) or, where a request met failing workers on every attempt, an OpenAI error; the
load accounting returns to zero. Both servers, the express lane on and off."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value

from lmgw.config import HedgingConfig

pytestmark = pytest.mark.usefixtures("hard_deadline")

REQUESTS = 32
CONCURRENCY = 8


def _body(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"question {i}: " + "go on " * (i % 7)}],
        "max_tokens": 12,
        "temperature": 0.0,  # greedy: a broken stream can be continued elsewhere
        "stream": stream,
    }


@pytest.mark.parametrize("express", [True, False])
async def test_merged_requests_under_mixed_faults_end_cleanly(
    gateway: GatewayFactory, sim_worker: Any, express: bool
) -> None:
    reference = await sim_worker()
    gw = await gateway(
        per_worker=[
            {},
            {"faults": {"error_rate": 0.3}, "fault_seed": 3},
            {"faults": {"drop_at_token": 3}},
            {"faults": {"stall_rate": 0.5, "stall_s": 0.3}, "fault_seed": 5},
        ],
        upstream={"express_lane": express},
        hedging=HedgingConfig(enabled=True, delay_s=0.05),
    )
    expected = {}
    for i in range(REQUESTS):
        r = await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        expected[i] = r.json()["choices"][0]["message"]["content"]
    statuses: dict[int, int] = {}
    limiter = trio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        stream = i % 2 == 1
        async with limiter:
            with trio.fail_after(10):
                r = await gw.request("POST", "/v1/chat/completions", _body(i, stream))
        statuses[i] = r.status
        if r.status != 200:  # failing workers on both attempts
            assert r.status == 502, (i, r.status, r.body)
            assert r.json()["error"]["message"], r.body
            return
        if stream:
            events = r.events()
            assert events[-1] == "[DONE]"
            assert not [e for e in events[:-1] if "error" in e], events
            text = "".join(
                e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
            )
        else:
            text = r.json()["choices"][0]["message"]["content"]
        assert text == expected[i], (i, stream)

    async with trio.open_nursery() as run:
        for i in range(REQUESTS):
            run.start_soon(one, i)
    assert len(statuses) == REQUESTS
    assert list(statuses.values()).count(200) >= REQUESTS * 3 // 4
    stats = [await sim.stats() for sim in gw.sims]
    # the faults did strike: failures, dropped connections, stalls (hedged or waited out)
    assert stats[1]["errors_injected"] > 0 and stats[2]["dropped_total"] > 0
    text = await gw.metrics()
    for w in range(4):
        sample = f'lmgw_worker_in_flight{{role="pd",worker="w{w}"}}'
        assert metric_value(text, sample) == 0, sample


async def test_a_continuation_refused_by_one_worker_goes_to_another(
    gateway: GatewayFactory, sim_worker: Any
) -> None:
    """A stream broken mid-way is continued elsewhere; when the worker chosen for the
    continuation refuses it before its first byte (a 500), another worker gets it, as a first
    attempt would: the client gets the whole text, not an error event."""
    reference = await sim_worker()
    gw = await gateway(
        per_worker=[
            {"faults": {"drop_at_token": 3}},
            {"faults": {"error_rate": 1.0}},
            {},
        ],
        upstream={"max_attempts": 3},
    )
    for i in range(6):  # round robin: streams start on each worker, continuations move on
        expected = (
            await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        ).json()["choices"][0]["message"]["content"]
        with trio.fail_after(10):
            r = await gw.request("POST", "/v1/chat/completions", _body(i, True))
        assert r.status == 200, r.body
        events = r.events()
        assert events[-1] == "[DONE]" and not [e for e in events[:-1] if "error" in e], events
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
        )
        assert text == expected, i
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="pd",outcome="continued"}') >= 1
