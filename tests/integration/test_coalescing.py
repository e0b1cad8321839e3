"""Coalescing (streams.coalesce): identical deterministic requests in flight share one
generation; the worker sees it once, every client gets the whole answer as if alone."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value, parse_sse

from lmgw.config import StreamsConfig

pytestmark = pytest.mark.parametrize("server", ["native"])

SLOW = {"faults": {"stall_rate": 1.0, "stall_s": 0.3}}  # every answer takes 0.3 s to start


def _chat(stream: bool = True, **sampling: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "the same question"}],
        "max_tokens": 8,
        "stream": stream,
        **sampling,
    }


async def _together(gw: Any, bodies: list[dict], headers: list[dict] | None = None) -> list:
    """Send ``bodies`` at once (each on its own connection); their responses in order."""
    out: list[Any] = [None] * len(bodies)

    async def one(i: int) -> None:
        h = headers[i] if headers else None
        out[i] = await http_request(gw.url, "POST", "/v1/chat/completions", bodies[i], h)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(len(bodies)):
                nursery.start_soon(one, i)
                await trio.sleep(0.02)  # the first one is generating when the others come
    return out


async def _coalesced(gw: Any) -> float:
    return metric_value(
        await gw.metrics(), 'lmgw_coalesced_requests_total{path="/v1/chat/completions"}'
    )


@pytest.mark.parametrize("stream", [True, False])
async def test_identical_greedy_requests_share_one_generation(
    gateway: GatewayFactory, stream: bool
) -> None:
    gw = await gateway(1, streams=StreamsConfig(coalesce=True), **SLOW)
    rs = await _together(
        gw, [_chat(stream, temperature=0)] * 3, [{"x-request-id": f"client-{i}"} for i in range(3)]
    )
    assert [r.status for r in rs] == [200] * 3
    assert len({r.body for r in rs}) == 1  # the same bytes: no id: lines, nothing added
    assert b"id: " not in rs[0].body
    assert [r.headers["x-request-id"] for r in rs] == [f"client-{i}" for i in range(3)]
    assert "x-lmgw-stream-id" not in rs[0].headers
    if stream:
        assert parse_sse(rs[0].body)[-1] == "[DONE]"
    assert gw.sims[0].sim.stats.requests_total == 1
    assert await _coalesced(gw) == 2


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7}, {"temperature": 0, "n": 2}],
    ids=["default-temperature", "sampled", "several-choices"],
)
async def test_requests_meant_to_differ_are_not_coalesced(
    gateway: GatewayFactory, sampling: dict
) -> None:
    gw = await gateway(1, streams=StreamsConfig(coalesce=True), **SLOW)
    rs = await _together(gw, [_chat(False, **sampling)] * 2)
    assert [r.status for r in rs] == [200, 200]
    assert gw.sims[0].sim.stats.requests_total == 2
    assert await _coalesced(gw) == 0


async def test_a_seed_makes_a_request_coalescable(gateway: GatewayFactory) -> None:
    gw = await gateway(1, streams=StreamsConfig(coalesce=True), **SLOW)
    rs = await _together(gw, [_chat(False, temperature=0.9, seed=7)] * 2)
    assert [r.status for r in rs] == [200, 200] and rs[0].body == rs[1].body
    assert gw.sims[0].sim.stats.requests_total == 1


async def test_different_bodies_or_off_generate_apart(gateway: GatewayFactory) -> None:
    gw = await gateway(1, streams=StreamsConfig(coalesce=True), **SLOW)
    other = {**_chat(False, temperature=0), "max_tokens": 9}
    rs = await _together(gw, [_chat(False, temperature=0), other])
    assert [r.status for r in rs] == [200, 200]
    assert gw.sims[0].sim.stats.requests_total == 2
    off = await gateway(1, **SLOW)  # coalescing off (the default)
    rs = await _together(off, [_chat(False, temperature=0)] * 2)
    assert off.sims[0].sim.stats.requests_total == 2


async def test_the_first_client_leaving_does_not_end_the_others_answer(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(1, streams=StreamsConfig(coalesce=True), **SLOW)
    body = _chat(True, temperature=0)
    answers: list[Any] = []

    async def stays() -> None:
        await trio.sleep(0.05)
        answers.append(await http_request(gw.url, "POST", "/v1/chat/completions", body))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stays)
            with trio.move_on_after(0.1):  # leaves before the first token
                await http_request(gw.url, "POST", "/v1/chat/completions", body)
    [r] = answers
    assert r.status == 200 and parse_sse(r.body)[-1] == "[DONE]"
    stats = gw.sims[0].sim.stats
    assert stats.requests_total == 1 and stats.aborted_total == 0


async def test_everyone_leaving_aborts_the_generation(gateway: GatewayFactory) -> None:
    gw = await gateway(
        1, streams=StreamsConfig(coalesce=True), faults={"stall_rate": 1.0, "stall_s": 5}
    )
    with trio.move_on_after(0.3):
        await _together(gw, [_chat(True, temperature=0)] * 2)
    with trio.fail_after(3):
        while gw.sims[0].sim.stats.aborted_total < 1:
            await trio.sleep(0.02)
    assert gw.sims[0].sim.stats.in_flight == 0
    assert gw.gateway.streams.inflight == {}


async def test_resumable_requests_are_not_coalesced_and_plain_ones_are(
    gateway: GatewayFactory,
) -> None:
    """Both options on: a request asking for resumption gets its own resumable answer (an id,
    ``id:`` lines), identical plain greedy requests still share one generation."""
    gw = await gateway(1, streams=StreamsConfig(coalesce=True, resumable=True), **SLOW)
    body = _chat(True, temperature=0)
    resumable = {"x-lmgw-resumable": "1"}
    rs = await _together(gw, [body, body, body], [resumable, {}, {}])
    assert [r.status for r in rs] == [200] * 3
    assert "x-lmgw-stream-id" in rs[0].headers and b"id: 0\n" in rs[0].body
    assert rs[1].body == rs[2].body and b"id: " not in rs[1].body
    assert gw.sims[0].sim.stats.requests_total == 2
    assert await _coalesced(gw) == 1
