"""KV-cache accounting per tenant through the HTTP API (limits.kv_accounting) and fair
sharing by it (limits.fair_share_cost = "kv_seconds"): a slow simulated worker (speed 1,
~8 ms per token), two API keys, one whose requests hold long prompts for long outputs."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value

from lmgw.config import ApiKeyConfig, AuthConfig

pytestmark = [
    pytest.mark.parametrize("server", ["native", "lane"]),
    pytest.mark.usefixtures("hard_deadline"),
]

AGENT = "sk-agent-0123456789abcdef"
CHAT = "sk-chat-0123456789abcdef"
KEYS = AuthConfig(keys=[ApiKeyConfig(key=AGENT, name="agent"), ApiKeyConfig(key=CHAT, name="chat")])


def body(words: int, tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": " ".join(["context"] * words)}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def kv(text: str, tenant: str) -> float:
    return metric_value(text, f'lmgw_tenant_kv_token_seconds_total{{tenant="{tenant}"}}')


async def post(gw: Any, key: str, payload: dict[str, Any]) -> None:
    r = await http_request(
        gw.url, "POST", "/v1/chat/completions", payload, {"authorization": f"Bearer {key}"}
    )
    assert r.status == 200, r.body


async def test_each_tenant_is_charged_what_its_answers_held(gateway: GatewayFactory) -> None:
    gw = await gateway(1, speed=1.0, auth=KEYS, limits={"kv_accounting": True})
    await post(gw, CHAT, body(5, 4))
    await post(gw, AGENT, body(400, 24, stream=True))
    text = await gw.metrics()
    chat, agent = kv(text, "chat"), kv(text, "agent")
    assert 0 < chat < agent / 20, (chat, agent)
    # the agent's stream: ~400+ prompt tokens held ~24 x 8 ms at least
    assert agent > 400 * 24 * 0.004, agent
    await post(gw, AGENT, body(400, 24))  # a whole answer is charged too (the lane's, there)
    assert kv(await gw.metrics(), "agent") > agent
    if gw.gateway.server.lane is not None:
        assert gw.gateway.server.lane.relay.served == 2


async def test_without_kv_accounting_nothing_is_measured(gateway: GatewayFactory) -> None:
    gw = await gateway(1, auth=KEYS)
    await post(gw, CHAT, body(5, 4))
    assert kv(await gw.metrics(), "chat") == 0


async def test_fair_share_by_kv_settles_each_grant(gateway: GatewayFactory) -> None:
    """A cap of 1: the queued requests of both tenants are granted, estimated, then settled
    with what they held (the estimate's scale learns from them); all are answered."""
    gw = await gateway(
        1,
        speed=1.0,
        auth=KEYS,
        limits={
            "max_concurrent_requests": 1,
            "queue_size": 32,
            "queue_timeout_s": 15,
            "fair_share_cost": "kv_seconds",
        },
    )
    adm = gw.gateway.app.admission
    assert adm.by_kv
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(post, gw, AGENT, body(200, 16))
            nursery.start_soon(post, gw, CHAT, body(5, 2))
    assert adm.in_flight == 0 and adm.queue_depth == 0
    assert adm._kv_rate != 1.0  # settled at least once
    text = await gw.metrics()
    assert kv(text, "agent") > kv(text, "chat") > 0
