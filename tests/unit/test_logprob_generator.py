"""The simulators' logprobs (``lmgw.simulators.logprobs``): valid values, determinism, and the
vLLM / SGLang shapes built from them."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.simulators.engine import Engine, EngineConfig, SamplingSpec
from lmgw.simulators.logprobs import (
    MAX_TOP_LOGPROBS,
    LogprobSource,
    TokenLogprob,
    chat_entry,
    completion_logprobs,
    completion_top,
    draw,
    prompt_logprobs,
    sglang_tokens,
    sglang_top,
)

POOL = tuple(range(1000, 1100))


def check(e: TokenLogprob) -> None:
    values = [lp for _, lp in e.top]
    ids = [t for t, _ in e.top]
    assert len(e.top) == MAX_TOP_LOGPROBS and len(set(ids)) == MAX_TOP_LOGPROBS
    assert all(a > b for a, b in itertools.pairwise(values))  # strictly best first
    assert values[0] < 0 and e.logprob < 0
    assert e.rank >= 1
    if e.rank <= MAX_TOP_LOGPROBS:
        assert e.top[e.rank - 1] == (e.token_id, e.logprob)
    else:
        assert e.token_id not in ids and e.logprob < values[-1]
    # a distribution: what is listed (and the token, when it is not) sums to less than 1
    mass = sum(map(math.exp, values)) + (0 if e.rank <= MAX_TOP_LOGPROBS else math.exp(e.logprob))
    assert mass < 1


@settings(max_examples=300, deadline=None)
@given(material=st.integers(min_value=0, max_value=2**100), token=st.integers(0, 2000))
def test_every_position_is_a_valid_distribution(material: int, token: int) -> None:
    e = draw(material, token, POOL)
    check(e)
    assert draw(material, token, POOL) == e  # a pure function


def test_ranks_spread_and_the_token_sometimes_falls_outside() -> None:
    ranks = [draw(m, 5, POOL).rank for m in range(2000)]
    assert 0.6 < ranks.count(1) / len(ranks) < 0.8
    assert any(r > MAX_TOP_LOGPROBS for r in ranks) and any(1 < r <= 3 for r in ranks)


def test_output_and_prompt_logprobs_are_deterministic_and_local() -> None:
    engine, other = Engine(EngineConfig(seed=0)), Engine(EngineConfig(seed=0))
    ids = engine.tokenizer.encode("Tell me about the Roman empire, please.")
    c = engine.generate(ids, SamplingSpec(max_tokens=12, seed=4))
    src = engine.logprobs
    out = src.output(c.key, c.token_ids)
    assert [e.token_id for e in out] == list(c.token_ids)
    assert out == other.logprobs.output(c.key, c.token_ids)  # another worker, same values
    for e in out:
        check(e)
    # a position's values depend on (key, position): a later start keeps the rest as they were
    assert src.output(c.key, c.token_ids[3:], offset=3) == out[3:]
    # another choice index or request seed: another completion, other values
    c2 = engine.generate(ids, SamplingSpec(max_tokens=12, seed=4), index=1)
    assert c2.key != c.key and src.output(c2.key, c2.token_ids) != out
    prompt = src.prompt(ids)
    assert prompt[0] is None and [e.token_id for e in prompt[1:]] == list(ids[1:])
    assert src.prompt(ids, 3) == prompt[3:]
    # prompt position p depends on the tokens at p-1 and p: a changed tail leaves the head
    longer = [*ids, *ids[1:4]]
    assert src.prompt(longer)[: len(ids)] == prompt
    # the worker seed changes prompt positions (and completions: another key)
    assert Engine(EngineConfig(seed=1)).logprobs.prompt(ids)[1:] != prompt[1:]


def test_pool_needs_enough_candidates() -> None:
    with pytest.raises(ValueError):
        LogprobSource(range(MAX_TOP_LOGPROBS), 0, str)


def test_shapes() -> None:
    e = draw(42, 1000, POOL)
    text = {t: f"<{t}>" for t in range(2001)}.__getitem__
    entry = chat_entry(e, 3, text)
    assert entry["token"] == "<1000>" and entry["logprob"] == e.logprob
    assert entry["bytes"] == list(b"<1000>")
    assert [t["token"] for t in entry["top_logprobs"]] == [text(t) for t, _ in e.top[:3]]
    assert chat_entry(e, 0, text)["top_logprobs"] == []
    # completions: the best k and the chosen token (k + 1 at most)
    outside = next(draw(m, 1000, POOL) for m in range(10**4) if draw(m, 1000, POOL).rank > 2)
    top = completion_top(outside, 2, text)
    assert len(top) == 3 and top["<1000>"] == outside.logprob
    assert list(top.values())[:2] == [lp for _, lp in outside.top[:2]]
    first = next(draw(m, 1000, POOL) for m in range(10**4) if draw(m, 1000, POOL).rank == 1)
    assert completion_top(first, 2, text) == {text(t): lp for t, lp in first.top[:2]}
    assert completion_top(first, 0, text) == {"<1000>": first.logprob}
    lists = completion_logprobs([first, outside], 1, text, text_offset=5)
    assert lists["text_offset"] == [5, 11] and lists["tokens"] == ["<1000>", "<1000>"]
    # vLLM's prompt_logprobs: ids as keys, the prompt's token first, with its rank
    plp = prompt_logprobs([None, outside], 2, text)
    assert plp[0] is None and list(plp[1]) == ["1000", *(str(t) for t, _ in outside.top[:2])]
    assert plp[1]["1000"] == {
        "logprob": outside.logprob,
        "rank": outside.rank,
        "decoded_token": "<1000>",
    }
    # SGLang: [logprob, id, text] triples, text only when asked; null where a position has none
    assert sglang_tokens([None, first], [7, 1000], None) == [
        [None, 7, None],
        [first.logprob, 1000, None],
    ]
    assert sglang_tokens([first], [1000], text)[0][2] == "<1000>"
    tops = sglang_top([None, first], 2, None)
    assert tops[0] is None and tops[1] == [[lp, t, None] for t, lp in first.top[:2]]


def test_a_completion_carries_its_key() -> None:
    engine = Engine(EngineConfig())
    ids = engine.tokenizer.encode("hello")
    c = engine.generate(ids, SamplingSpec(max_tokens=5))
    assert c.key and c.offset == 0
    assert dataclasses.replace(c, offset=2).offset == 2
