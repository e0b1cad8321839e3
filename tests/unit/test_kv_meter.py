"""What a generation held in the engines' KV cache, as the usage meter estimates it from the
answer's usage and timing (``UsageMeter.kv_token_seconds``; limits.kv_accounting)."""

from __future__ import annotations

import pytest

from lmgw.api import keys
from lmgw.api.keys import UsageMeter
from lmgw.mirrors import DiscardResponder


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(keys, "_now", c)
    return c


USAGE = b'{"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200}}'


async def test_a_stream_holds_its_prompt_from_the_first_event_and_half_its_output(
    clock: Clock,
) -> None:
    meter = UsageMeter(DiscardResponder())
    await meter.start(200, [])
    clock.t += 0.5  # prefill: the prompt fills in
    await meter.send(b'data: {"choices":[]}\n\n')
    clock.t += 4.0  # decode: the prompt held, the output growing
    await meter.send(b"data: " + USAGE + b"\n\n")
    await meter.end(b"data: [DONE]\n\n")
    assert meter.kv_token_seconds(4000) == pytest.approx(1000 / 2 * 0.5 + (1000 + 100) * 4.0)
    assert meter.tokens(4000) == 1200


async def test_without_usage_the_prompt_is_estimated_and_each_event_is_a_token(
    clock: Clock,
) -> None:
    meter = UsageMeter(DiscardResponder())
    await meter.start(200, [])
    clock.t += 1.0
    for _ in range(10):
        await meter.send(b'data: {"choices":[]}\n\n')
    clock.t += 2.0
    await meter.end(b"data: [DONE]\n\n")
    # 400 body bytes: 100 prompt tokens; 11 events less [DONE]: 10 output tokens
    assert meter.kv_token_seconds(400) == pytest.approx(100 / 2 * 1.0 + (100 + 5) * 2.0)


async def test_a_whole_answer_counts_prompt_and_output_half_from_the_start(clock: Clock) -> None:
    meter = UsageMeter(DiscardResponder())
    clock.t += 3.0
    await meter.send_full(200, [], USAGE)
    assert meter.kv_token_seconds(10) == pytest.approx((1000 + 200) / 2 * 3.0)


async def test_errors_and_unfinished_answers_hold_nothing(clock: Clock) -> None:
    failed = UsageMeter(DiscardResponder())
    clock.t += 1.0
    await failed.send_full(503, [], b'{"error":{}}')
    assert failed.kv_token_seconds(100) == 0.0
    cut = UsageMeter(DiscardResponder())
    await cut.start(200, [])
    await cut.send(b'data: {"choices":[]}\n\n')
    assert cut.kv_token_seconds(100) == 0.0  # no end: the client left, the metric says so
