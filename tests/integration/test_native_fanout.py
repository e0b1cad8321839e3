"""``n > 1`` and batched completion prompts on the native (ZeroMQ) path: the gateway fans one
request out to one ``Generate`` per choice and merges the answers (lmgw.pipeline.fanout).

The official `openai` client against a native sim fleet must not tell it from an HTTP worker:
every choice's text, its index, finish reason and the usage equal the HTTP simulator's for the
same request (which samples choice ``i`` of a seeded request with ``seed + i``, vLLM's rule).
A choice that fails after its retries fails the request (a status, or an SSE error event) and
the other choices are aborted on their workers; a client that hangs up aborts every choice.
Workers run in-process (127.0.0.1, port 0); every wait is bounded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import openai
import pytest
import trio
from gateway_support import MODEL
from test_native_e2e import (
    BOUND,
    TEXT_ONLY,
    gateway_config,
    raw_chat,
    run,
    start_gateway,
    start_worker,
)

from lmgw.pipeline.fanout import SAMPLE_INDEX
from lmgw.simulators.engine import SAMPLE_INDEX as SIM_SAMPLE_INDEX
from lmgw.simulators.faults import Faults
from lmgw.workers.worker import WorkerState

PROMPTS = ["Once upon a time, in a gateway far away,", "The quick brown fox"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)


def answer(url: str, kind: str, stream: bool, **kw: Any) -> dict[str, Any]:
    """One request through the official client, reduced to what a client sees: each choice's
    text and finish reason by index, the usage, and (streams) the role events per index and
    the number of usage events."""
    c = client(url)
    create = c.chat.completions.create if kind == "chat" else c.completions.create
    if kind == "chat":
        kw.setdefault("messages", TEXT_ONLY)
    if not stream:
        r = create(model=MODEL, **kw)
        texts = {ch.index: ch.message.content if kind == "chat" else ch.text for ch in r.choices}
        assert [ch.index for ch in r.choices] == sorted(texts)  # in index order
        return {
            "texts": texts,
            "finish": {ch.index: ch.finish_reason for ch in r.choices},
            "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
        }
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    roles: Counter[int] = Counter()
    usages = []
    for chunk in create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usages.append((chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
        for ch in chunk.choices:
            if kind == "chat":
                if ch.delta.role:
                    roles[ch.index] += 1
                piece = ch.delta.content or ""
            else:
                piece = ch.text
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return {"texts": texts, "finish": finish, "usage": usages[-1] if usages else None,
            "roles": roles, "usages": len(usages)}  # fmt: skip


def same(native: dict[str, Any], http: dict[str, Any], choices: int) -> None:
    assert sorted(native["texts"]) == list(range(choices))
    for key in ("texts", "finish", "usage"):
        assert native[key] == http[key], key
    if "roles" in native:
        assert native["usages"] == 1  # one usage event for the whole answer


async def fleet(nursery: trio.Nursery, n: int = 2, **kw: Any) -> tuple[Any, str, list[Any]]:
    started = [await start_worker(nursery, "pd") for _ in range(n)]
    gw, url = await start_gateway(nursery, gateway_config([("pd", u) for _, u in started], **kw))
    return gw, url, [e for e, _ in started]


async def settled(gw: Any, engines: list[Any]) -> None:
    """Load accounting back to zero, and no request left running on any worker."""
    with trio.fail_after(BOUND):
        while any(w.in_flight for w in gw.registry) or any(e.runs for e in engines):
            await trio.sleep(0.01)


async def test_chat_n3_equals_the_http_simulator(nursery: trio.Nursery, sim_worker) -> None:
    gw, url, engines = await fleet(nursery)
    reference = (await sim_worker(role="pd")).url
    for seed in (3, None):
        kw = {"n": 3, "max_tokens": 12, "seed": seed}
        http = await run(answer, reference, "chat", False, **kw)
        assert len(set(http["texts"].values())) == 3  # three different choices
        for stream in (False, True):
            native = await run(answer, url, "chat", stream, **kw)
            same(native, http, 3)
            if stream:
                assert native["roles"] == {0: 1, 1: 1, 2: 1}  # one role event per choice
    # vLLM's seed rule: choice i of a seeded request is the n = 1 answer for seed + i
    one = await run(answer, url, "chat", False, max_tokens=12, seed=4)
    three = await run(answer, url, "chat", False, n=3, max_tokens=12, seed=3)
    assert one["texts"][0] == three["texts"][1]
    # every choice was its own Generate, spread over the fleet, and nothing is left running
    assert all(len(e.recent) > 0 for e in engines)
    await settled(gw, engines)


async def test_completions_batch_of_two_prompts_times_n2(nursery: trio.Nursery, sim_worker) -> None:
    gw, url, engines = await fleet(nursery)
    reference = (await sim_worker(role="pd")).url
    kw = {"prompt": PROMPTS, "n": 2, "max_tokens": 10, "seed": 7}
    http = await run(answer, reference, "completions", False, **kw)
    assert len(http["texts"]) == 4
    each = [
        (await run(answer, reference, "completions", False, prompt=p, max_tokens=1))["usage"][0]
        for p in PROMPTS
    ]
    assert http["usage"][0] == sum(each)  # each prompt once, not once per choice
    for stream in (False, True):
        native = await run(answer, url, "completions", stream, **kw)
        same(native, http, 4)
    # prompt p's choices are indexes 2p and 2p+1: choice 2 is prompt 1's n = 1 answer
    second = await run(answer, url, "completions", False, prompt=PROMPTS[1], max_tokens=10, seed=7)
    assert second["texts"][0] == http["texts"][2]
    # token-id prompts, with echo: the prompt is echoed per choice as vLLM does
    ids = [[1, 2, 3, 4], [5, 6, 7]]
    kw = {"prompt": ids, "n": 2, "max_tokens": 5, "echo": True}
    http = await run(answer, reference, "completions", False, **kw)
    native = await run(answer, url, "completions", False, **kw)
    same(native, http, 4)
    await settled(gw, engines)


async def test_stream_shape(nursery: trio.Nursery) -> None:
    """Raw events: every choice's events carry its index, one usage event (choices: []), a
    single [DONE] at the very end, one id and created for the whole answer."""
    gw, url, engines = await fleet(nursery)
    body = {"model": MODEL, "messages": TEXT_ONLY, "n": 2, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    def raw() -> bytes:
        r = client(url).chat.completions.with_raw_response.create(**body)
        return r.http_response.read()

    data = await run(raw)
    blocks = [b for b in data.split(b"\n\n") if b]
    assert blocks[-1] == b"data: [DONE]" and data.count(b"[DONE]") == 1
    events = [msgspec.json.decode(b[6:]) for b in blocks[:-1]]
    assert len({(e["id"], e["created"]) for e in events}) == 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    assert all(len(e["choices"]) == 1 for e in events[:-1])
    finals = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]
    await settled(gw, engines)


async def test_bounds_and_best_of(nursery: trio.Nursery, sim_worker) -> None:
    """A fan-out over limits.max_n / limits.max_choices is a 400 before any leg is sent;
    best_of > 1 is a 400 (vLLM V1 removed it), as the HTTP simulator says."""
    from lmgw.config import LimitsConfig

    gw, url, engines = await fleet(nursery)
    _, url2 = await start_gateway(
        nursery,
        msgspec.structs.replace(
            gateway_config([("pd", w.url) for w in gw.registry]),
            limits=LimitsConfig(max_n=4, max_choices=6),
        ),
    )
    before = sum(len(e.recent) for e in engines)
    cases = [
        (url2, {"n": 5, "prompt": "x"}, "limits.max_n"),
        (url2, {"n": 4, "prompt": ["x", "y"]}, "limits.max_choices"),
        (url2, {"prompt": ["x"] * 7}, "limits.max_choices"),
        (url, {"n": 100000, "prompt": "x"}, "limits.max_n"),
        (url, {"best_of": 3, "prompt": "x"}, "best_of > 1 is not supported"),
    ]
    for target, kw, words in cases:
        with pytest.raises(openai.BadRequestError, match=words.replace(".", r"\.")):
            await run(lambda t=target, k=kw: client(t).completions.create(model=MODEL, **k))
    assert sum(len(e.recent) for e in engines) == before  # no leg was sent
    reference = (await sim_worker(role="pd")).url  # an HTTP worker says the same
    with pytest.raises(openai.BadRequestError, match="best_of > 1 is not supported"):
        await run(lambda: client(reference).completions.create(model=MODEL, prompt="x", best_of=2))
    ok = await run(answer, url2, "completions", False, prompt=["x", "y", "z"], n=2, max_tokens=2)
    assert len(ok["texts"]) == 6


async def test_a_choice_failing_before_its_first_token_is_retried(
    nursery: trio.Nursery, sim_worker
) -> None:
    """Each choice is a normal stage request: a p/d choice whose decode fails before its
    first token is retried on the other decode worker with the same hand-off, while the
    other choices stream."""
    _, p = await start_worker(nursery, "p")
    bad, d_bad = await start_worker(nursery, "d", faults=Faults(error_rate=1.0))
    _, d_good = await start_worker(nursery, "d")
    gw, url = await start_gateway(
        nursery, gateway_config([("p", p), ("d", d_bad), ("d", d_good)], "p/d")
    )
    http = await run(answer, (await sim_worker(role="pd")).url, "chat", False, n=4, max_tokens=8)
    for stream in (False, True):
        same(await run(answer, url, "chat", stream, n=4, max_tokens=8), http, 4)
    assert bad.counters["errors_injected"] >= 1
    assert gw.metrics.retries.values.get(("d",), 0) >= 1


async def test_a_failing_choice_fails_the_request_and_aborts_the_others(
    nursery: trio.Nursery,
) -> None:
    """One choice fails for good (no retry left): the client gets a 502 (or, streamed, an SSE
    error event after the other choices' first events), the other choices are aborted on
    their worker mid-generation, and the load accounting is back to zero."""
    slow, good = await start_worker(nursery, "pd", speed=1.0)
    fails = Faults(error_rate=1.0)
    for stream, faults in ((False, fails), (True, Faults(crash_at_token=3))):
        bad, broken = await start_worker(nursery, "pd", faults=faults, speed=1.0)
        gw, url = await start_gateway(
            nursery,
            gateway_config([("pd", good), ("pd", broken)], upstream={"max_attempts": 1}),
        )
        seen = len(slow.abort_at)
        kw = {"n": 4, "max_tokens": 400, "extra_body": {"ignore_eos": True}}
        with pytest.raises(openai.APIError) as info:
            await run(answer, url, "chat", stream, **kw)
        if stream:
            assert "worker stream failed" in str(info.value)
        else:
            assert info.value.status_code == 502 and "merged stage failed" in str(info.value)
        await settled(gw, [slow, bad])
        # the choices on the healthy worker were aborted there, cut short of their 400 tokens
        assert len(slow.abort_at) - seen == 2
        for rid in list(slow.abort_at)[seen:]:
            cut = slow.run_of(rid)
            assert cut is not None and cut.state == "cut" and cut.emitted < 400
        assert all(w.state is WorkerState.HEALTHY for w in gw.registry if w.id == "pd0")


async def test_client_disconnect_aborts_every_choice(nursery: trio.Nursery) -> None:
    started = [await start_worker(nursery, "pd", speed=1.0) for _ in range(2)]
    engines = [e for e, _ in started]
    gw, url = await start_gateway(nursery, gateway_config([("pd", u) for _, u in started]))
    rid = "fan-abort"
    children = {f"{rid}:{k}" for k in range(3)}
    with trio.fail_after(BOUND):
        stream = await raw_chat(url, rid, stream=True, n=3)
        got = b""
        while got.count(b'"content"') < 9:  # every choice's role event and a few tokens
            got += await stream.receive_some(65536)
        await stream.aclose()
        while not children <= {r for e in engines for r in e.abort_at}:
            await trio.sleep(0.005)
    for rid_k in children:
        run_ = next(e.run_of(rid_k) for e in engines if e.run_of(rid_k) is not None)
        assert run_.state == "cut" and run_.emitted < run_.total == 2000
    await settled(gw, engines)


def test_the_sample_index_key_is_the_simulators() -> None:
    assert SAMPLE_INDEX == SIM_SAMPLE_INDEX
