"""Hedged streams through a real gateway and simulated workers: a late first token sends the
stream to a second worker too, the first to answer wins and the other is aborted on its
worker; accounting returns to zero whichever way a race ends."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value, parse_sse

from lmgw.config import HedgingConfig

pytestmark = pytest.mark.parametrize("server", ["native"])


def _chat(content: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "stream": stream,
        **extra,
    }


def _text(body: bytes) -> str:
    events = parse_sse(body)
    assert events[-1] == "[DONE]"
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
    )


#: both workers' in-flight gauges: 0 once a race is over, whichever way it ended
IDLE = (
    'lmgw_worker_in_flight{role="pd",worker="w0"}',
    'lmgw_worker_in_flight{role="pd",worker="w1"}',
)


async def _settled(gw: Any, *samples: str) -> str:
    """/metrics once every sample in ``samples`` reads 0 (in-flight gauges after a race)."""
    with trio.fail_after(5):
        while True:
            text = await gw.metrics()
            if all(metric_value(text, s) == 0 for s in samples):
                return text
            await trio.sleep(0.02)


async def test_a_stalled_primary_loses_to_the_hedge_and_a_fast_one_wins(
    gateway: GatewayFactory,
) -> None:
    """Round robin over w0 (first token after 0.3 s) and w1 (after 5 s), hedging after 50 ms:
    the stream sent to w0 keeps w0 (the hedge on w1 is aborted); the one sent to w1 is
    answered by its hedge on w0 (w1's leg is aborted). Both carry the text a worker gives
    without hedging, and neither waits for the 5 s stall."""
    gw = await gateway(
        2,
        per_worker=[
            {"faults": {"stall_rate": 1.0, "stall_s": 0.3}},
            {"faults": {"stall_rate": 1.0, "stall_s": 5.0}},
        ],
        hedging=HedgingConfig(enabled=True, delay_s=0.05, max_ratio=1.0),
    )
    texts = []
    with trio.fail_after(3):
        # round robin: w0 first (the hedge's pick takes w1's turn); a plain request on w0;
        # then w1 first
        for body in (_chat("hedge me"), _chat("not hedged", stream=False), _chat("hedge me")):
            r = await gw.request("POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
            if body["stream"]:
                texts.append(_text(r.body))
    assert texts[0] == texts[1] and texts[0]
    text = await _settled(gw, *IDLE)
    assert metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="primary"}}') == 1
    assert metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="hedge"}}') == 1
    # w1 saw two legs and answered neither: both were aborted by the gateway
    with trio.fail_after(3):
        while (s1 := gw.sims[1].sim.stats).aborted_total < 2:
            await trio.sleep(0.02)
    assert s1.in_flight == 0
    assert gw.sims[0].sim.stats.aborted_total == 0


async def test_hedging_leaves_prompt_answers_and_other_requests_alone(
    gateway: GatewayFactory,
) -> None:
    """A stream whose first token is on time, a non-streamed request and a body over
    max_body_bytes are never hedged (each worker sees exactly one request per call)."""
    gw = await gateway(
        2,
        per_worker=[{}, {"faults": {"stall_rate": 1.0, "stall_s": 0.3}}],
        hedging=HedgingConfig(enabled=True, delay_s=0.05, max_ratio=1.0, max_body_bytes=2000),
    )
    with trio.fail_after(5):
        for body in (
            _chat("quick"),  # w0: on time
            _chat("not a stream", stream=False),  # w1: stalls, but is not a stream
            _chat("long " * 500),  # w0
            _chat("long " * 500),  # w1: stalls, but too long to hedge
        ):
            r = await gw.request("POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
    assert [h.sim.stats.requests_total for h in gw.sims] == [2, 2]
    text = await gw.metrics()
    assert "lmgw_hedges_total{" not in text


async def test_the_budget_caps_the_hedged_share(gateway: GatewayFactory) -> None:
    """max_ratio 0.01: the first late stream may hedge (one token to start with), the next
    ones are counted as skipped for the budget and wait for their own worker."""
    gw = await gateway(
        2,
        per_worker=[{"faults": {"stall_rate": 1.0, "stall_s": 0.15}}] * 2,
        hedging=HedgingConfig(enabled=True, delay_s=0.02, max_ratio=0.01),
    )
    with trio.fail_after(5):
        for _ in range(3):
            r = await gw.request("POST", "/v1/chat/completions", _chat("budget"))
            assert r.status == 200
    text = await gw.metrics()
    hedged = sum(
        metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="{o}"}}')
        for o in ("primary", "hedge", "failed")
    )
    assert hedged == 1
    assert metric_value(text, f'lmgw_hedges_skipped_total{{model="{MODEL}",reason="budget"}}') == 2


async def test_a_lone_worker_is_not_hedged(gateway: GatewayFactory) -> None:
    gw = await gateway(
        1,
        faults={"stall_rate": 1.0, "stall_s": 0.1},
        hedging=HedgingConfig(enabled=True, delay_s=0.02),
    )
    with trio.fail_after(5):
        r = await gw.request("POST", "/v1/chat/completions", _chat("alone"))
    assert r.status == 200
    text = await gw.metrics()
    sample = f'lmgw_hedges_skipped_total{{model="{MODEL}",reason="no_other_worker"}}'
    assert metric_value(text, sample) == 1


async def test_both_legs_failing_ends_the_stream_with_an_error(gateway: GatewayFactory) -> None:
    """The primary stalls and then drops its connection, the hedge drops its own: the
    client gets an error (not a hang, not a truncated 200), and nothing stays in flight."""
    gw = await gateway(
        2,
        per_worker=[
            {"faults": {"stall_rate": 1.0, "stall_s": 0.2, "drop_at_token": 0}},
            {"faults": {"drop_at_token": 0}},
        ],
        hedging=HedgingConfig(enabled=True, delay_s=0.05, max_ratio=1.0),
        upstream={"migrate_streams": 0},
    )
    with trio.fail_after(5):
        r = await gw.request("POST", "/v1/chat/completions", _chat("doomed"))
    if r.status == 200:  # the head went out: the stream must carry the error
        assert b'"error"' in r.body and r.body.rstrip().endswith(b"data: [DONE]")
    else:
        assert r.status in (502, 504), r.body
        assert r.json()["error"]["message"]
    text = await _settled(gw, *IDLE)
    assert metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="failed"}}') == 1


async def test_a_primary_that_fails_at_once_is_retried_not_hedged(
    gateway: GatewayFactory,
) -> None:
    """A 500 before the hedge delay decides the race: the usual retry takes it elsewhere."""
    gw = await gateway(
        2,
        per_worker=[{"faults": {"error_rate": 1.0}}, {}],
        hedging=HedgingConfig(enabled=True, delay_s=0.5, max_ratio=1.0),
    )
    with trio.fail_after(5):
        r = await gw.request("POST", "/v1/chat/completions", _chat("retry"))
    assert r.status == 200, r.body
    text = await gw.metrics()
    assert "lmgw_hedges_total{" not in text
    assert metric_value(text, 'lmgw_retries_total{role="pd"}') == 1


async def test_a_client_leaving_mid_race_aborts_both_legs(gateway: GatewayFactory) -> None:
    gw = await gateway(
        2,
        faults={"stall_rate": 1.0, "stall_s": 5.0},
        hedging=HedgingConfig(enabled=True, delay_s=0.02, max_ratio=1.0),
    )
    with trio.move_on_after(0.3):
        await gw.request("POST", "/v1/chat/completions", _chat("bye"))
    await _settled(gw, *IDLE)
    with trio.fail_after(3):
        while sum(h.sim.stats.aborted_total for h in gw.sims) < 2:
            await trio.sleep(0.02)
    assert [h.sim.stats.in_flight for h in gw.sims] == [0, 0]


async def test_the_adaptive_delay_learns_from_first_tokens(gateway: GatewayFactory) -> None:
    """delay_s 0: no hedge before min_samples first tokens were seen; then the delay is their
    quantile (floored at min_delay_s), exported per model, and a stalled stream is hedged."""
    gw = await gateway(
        2,
        hedging=HedgingConfig(enabled=True, min_samples=4, min_delay_s=0.03, max_ratio=1.0),
    )
    with trio.fail_after(5):
        for i in range(4):
            r = await gw.request("POST", "/v1/chat/completions", _chat(f"warm {i}"))
            assert r.status == 200
    text = await gw.metrics()
    assert metric_value(text, f'lmgw_hedge_delay_seconds{{model="{MODEL}"}}') == pytest.approx(0.03)
    await gw.sims[0].set_faults(stall_rate=1.0, stall_s=5.0)
    await gw.sims[1].set_faults(stall_rate=1.0, stall_s=5.0)
    # both stall now: the hedge fires (and loses nothing: the client leaves after 0.3 s)
    with trio.move_on_after(0.3):
        await gw.request("POST", "/v1/chat/completions", _chat("late"))
    await _settled(gw, *IDLE)
    assert sum(h.sim.stats.requests_total for h in gw.sims) == 6


async def test_hedging_through_the_http_api_keeps_the_request_id(gateway: GatewayFactory) -> None:
    """Both legs carry the client's X-Request-Id (each worker names its own request by it)."""
    gw = await gateway(
        2,
        per_worker=[{"faults": {"stall_rate": 1.0, "stall_s": 5.0}}, {}],
        hedging=HedgingConfig(enabled=True, delay_s=0.02, max_ratio=1.0),
    )
    with trio.fail_after(3):
        r = await http_request(
            gw.url, "POST", "/v1/chat/completions", _chat("id"), {"x-request-id": "hedge-42"}
        )
    assert r.status == 200 and r.headers.get("x-request-id") == "hedge-42"
    assert [list(h.sim.stats.request_ids)[-1:] for h in gw.sims] == [["hedge-42"]] * 2


async def test_a_winning_hedge_that_breaks_is_continued_elsewhere(
    gateway: GatewayFactory,
) -> None:
    """w0 is slow, its hedge on w1 wins and breaks after two tokens: the stream is continued
    on w0 (the leg that lost was not at fault), never on w1 again, and the client gets the
    whole answer, as from a worker that never broke."""
    gw = await gateway(
        2,
        per_worker=[
            {"faults": {"stall_rate": 1.0, "stall_s": 0.3}},
            {"faults": {"drop_at_token": 2}},
        ],
        hedging=HedgingConfig(enabled=True, delay_s=0.02, max_ratio=1.0),
    )
    with trio.fail_after(3):
        r = await gw.request("POST", "/v1/chat/completions", _chat("break"))
        whole = await http_request(gw.sims[0].url, "POST", "/v1/chat/completions", _chat("break"))
    assert r.status == 200 and _text(r.body) == _text(whole.body)
    assert gw.sims[1].sim.stats.requests_total == 1
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="pd",outcome="continued"}') == 1


@pytest.mark.parametrize("routing", ["cache_aware", "least_load"])
async def test_policy_accounting_returns_to_zero_after_races(
    gateway: GatewayFactory, routing: str
) -> None:
    """When either leg wins, the policy's queued prefills and in-flight counts come back to
    zero."""
    gw = await gateway(
        2,
        routing=routing,
        per_worker=[
            {"faults": {"stall_rate": 1.0, "stall_s": 0.3}},
            {"faults": {"stall_rate": 1.0, "stall_s": 5.0}},
        ],
        hedging=HedgingConfig(enabled=True, delay_s=0.05, max_ratio=1.0),
    )
    with trio.fail_after(5):
        for i in range(3):
            r = await gw.request("POST", "/v1/chat/completions", _chat(f"account {i}"))
            assert r.status == 200, r.body
    await _settled(gw, *IDLE)
    policy = gw.gateway.policies["pd"]
    if routing == "cache_aware":
        assert policy.queued_requests == 0 and policy.queued_tokens == 0
    text = await gw.metrics()
    won = sum(
        metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="{o}"}}')
        for o in ("primary", "hedge")
    )
    assert won == 3


async def test_each_leg_is_queued_on_its_own_worker(gateway: GatewayFactory) -> None:
    """Each leg has its own routing context: while both legs wait, cache_aware counts a
    queued prefill on each worker (one shared context counted only the last dispatch), and
    both are gone once the client leaves."""
    gw = await gateway(
        2,
        routing="cache_aware",
        faults={"stall_rate": 1.0, "stall_s": 5.0},
        hedging=HedgingConfig(enabled=True, delay_s=0.05, max_ratio=1.0),
    )
    policy = gw.gateway.policies["pd"]
    queued = []

    async def watch() -> None:
        await trio.sleep(0.3)
        queued.append(policy.queued_requests)

    with trio.move_on_after(0.5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await gw.request("POST", "/v1/chat/completions", _chat("both wait"))
    assert queued == [2]
    await _settled(gw, *IDLE)
    assert policy.queued_requests == 0


async def test_a_resumable_stream_is_hedged_too(gateway: GatewayFactory) -> None:
    """The generation of a resumable answer runs the same pipeline: a late first token is
    hedged, and the answer (with its event ids) is the hedge's."""
    from lmgw.config import StreamsConfig

    gw = await gateway(
        2,
        per_worker=[{"faults": {"stall_rate": 1.0, "stall_s": 5.0}}, {}],
        hedging=HedgingConfig(enabled=True, delay_s=0.02, max_ratio=1.0),
        streams=StreamsConfig(resumable=True),
    )
    with trio.fail_after(3):
        r = await gw.request(
            "POST", "/v1/chat/completions", _chat("resume"), {"x-lmgw-resumable": "1"}
        )
    assert r.status == 200 and "x-lmgw-stream-id" in r.headers and b"id: 0\n" in r.body
    text = await _settled(gw, *IDLE)
    assert metric_value(text, f'lmgw_hedges_total{{model="{MODEL}",outcome="hedge"}}') == 1
