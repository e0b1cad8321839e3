"""Proactive hot-prefix replication through a real gateway (routing.cache_aware_replicas):
two system prompts in turn over two simulated workers settle one per worker; once hot, each
is prefilled on the other worker in the background (a one-token copy, its own request id),
after which both workers hold both prompts and serve them with cache hits."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value

pytestmark = [
    pytest.mark.parametrize("server", ["native"]),
    pytest.mark.usefixtures("hard_deadline"),
]

PROMPTS = [" ".join(f"rule{i}-{j}" for j in range(300)) for i in range(2)]


def chat(k: int, i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": PROMPTS[k]},
            {"role": "user", "content": f"question {i}"},
        ],
        "max_tokens": 4,
    }


async def _warmed(gw: Any, n: int) -> str:
    with trio.fail_after(5):
        while True:
            text = await gw.metrics()
            if metric_value(text, 'lmgw_prefix_warmups_total{outcome="ok"}') >= n:
                return text
            await trio.sleep(0.02)


async def test_hot_prompts_are_warmed_on_a_second_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="cache_aware", routing_options={"cache_aware_replicas": 2})
    for i in range(16):
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(i % 2, i))
        assert r.status == 200
    await _warmed(gw, 2)
    stats = [await s.stats() for s in gw.sims]
    warm_ids = [rid for st in stats for rid in st["request_ids"] if rid.endswith("-warm")]
    assert len(warm_ids) == 2  # one per prompt, each on the worker that lacked it
    # from now on either worker serves either prompt from its cache
    for i in range(16, 24):
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(i % 2, i))
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0.8 * usage["prompt_tokens"]
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_prefix_warmups_total{outcome="skipped"}') == 0


async def test_without_replicas_no_warmup_runs(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="cache_aware")
    for i in range(16):
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(i % 2, i))
        assert r.status == 200
    stats = [await s.stats() for s in gw.sims]
    assert not [rid for st in stats for rid in st["request_ids"] if rid.endswith("-warm")]
