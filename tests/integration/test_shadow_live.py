"""Shadow policies on live traffic: a gateway with a tokenizer routes round_robin with a
cache_aware shadow; every request is answered as usual and counted for both policies."""

from __future__ import annotations

from typing import Any

import trio
from gateway_support import MODEL, http_request

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import model_files


async def test_shadows_on_live_traffic_through_the_gateway(nursery: Any, sim_worker: Any) -> None:
    """A gateway with a tokenizer, round_robin routing and a cache_aware shadow: every request
    is answered as usual and counted for both policies, with the same prompt tokens."""
    sims = [await sim_worker() for _ in range(2)]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        routing=RoutingConfig(policy="round_robin", shadow_policies=["cache_aware"]),
        models=[ModelConfig(name=MODEL, tokenizer=str(model_files.default_model_dir()))],
        workers=[WorkerConfig(url=s.url, role="pd", id=f"w{i}") for i, s in enumerate(sims)],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse. " * 20}]
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: what is a gateway?"})
        body = {"model": MODEL, "messages": messages, "max_tokens": 4}
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        messages.append(
            {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
        )
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    decided = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('lmgw_shadow_decisions_total{role="pd",policy="cache_aware"')
    )
    assert decided == 4
    prompts = [
        line for line in text.splitlines() if line.startswith("lmgw_shadow_prompt_tokens_total")
    ]
    assert len(prompts) == 2 and len({p.rsplit(" ", 1)[1] for p in prompts}) == 1
