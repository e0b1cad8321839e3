"""Conditional disaggregation (``models[].local_prefill_tokens``): a P/D request with few
prompt tokens left to prefill skips the prefill leg and runs whole on its decode worker (a vLLM
decode instance is a whole engine); longer ones are disaggregated as before. Under load
(``models[].local_prefill_busy``) a request also runs there when its prefill worker is busy.
Against the
simulators (decode workers started with ``local_prefill``; without it they refuse a request
with no hand-off, so a test would see a skipped prefill that should not have been)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request, metric_value

from lmgw.config import (
    ConfigError,
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators.model_files import default_model_dir

pytestmark = pytest.mark.usefixtures("hard_deadline")


async def pd_gateway(
    nursery: trio.Nursery,
    sim_worker: Any,
    *,
    limit: int,
    busy: int = 0,
    decodes: int = 1,
    tokenizer: bool = False,
    routing: dict[str, Any] | None = None,
    prefill_options: dict[str, Any] | None = None,
    **decode_options: Any,
) -> tuple[Gateway, Any, list[Any]]:
    p = await sim_worker(role="p", **(prefill_options or {}))
    ds = [await sim_worker(role="d", local_prefill=True, **decode_options) for _ in range(decodes)]
    model = ModelConfig(
        name=MODEL,
        flow="p/d",
        dialect="vllm-nixl",
        local_prefill_tokens=limit,
        local_prefill_busy=busy,
        tokenizer=str(default_model_dir()) if tokenizer else None,
    )
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        routing=RoutingConfig(**(routing or {})),
        models=[model],
        workers=[WorkerConfig(url=p.url, role="p", id="p0")]
        + [WorkerConfig(url=d.url, role="d", id=f"d{i}") for i, d in enumerate(ds)],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw, p, ds


def long_question(i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A chat request whose prompt (~100 words) is over any length limit of these tests."""
    question = "summarise the quarterly report for the board " * 12
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{i}: {question}"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def text_of(r: Any, stream: bool) -> str:
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in r.events()
        if isinstance(e, dict) and e.get("choices")
    )


async def test_short_prompts_skip_the_prefill_leg(nursery: trio.Nursery, sim_worker) -> None:
    """Below the limit (no tokenizer: body bytes / 4) the decode worker serves the request
    whole, streamed or not, with the merged worker's text; above it the legs run as ever."""
    gw, p, (d,) = await pd_gateway(nursery, sim_worker, limit=64)
    reference = await sim_worker(role="pd")
    short = [{"role": "user", "content": "hi there"}]
    long = [{"role": "user", "content": "a long question " * 40}]
    for messages, local in ((short, True), (long, False)):
        for stream in (False, True):
            body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": stream}
            want = await http_request(reference.url, "POST", "/v1/chat/completions", body)
            before_p = (await p.stats())["requests_total"]
            before_local = (await d.stats())["handoff"]["local_prefills"]
            r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
            assert text_of(r, stream) == text_of(want, stream), (local, stream)
            p_sent = (await p.stats())["requests_total"] - before_p
            d_local = (await d.stats())["handoff"]["local_prefills"] - before_local
            assert (p_sent, d_local) == ((0, 1) if local else (1, 0)), (local, stream)
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    assert metric_value(text, f'lmgw_pd_local_prefill_total{{model="{MODEL}",reason="short"}}') == 2


@pytest.mark.parametrize("tokenizer", [False, True])
async def test_the_gateways_own_token_count_decides_when_it_has_one(
    nursery: trio.Nursery, sim_worker, tokenizer: bool
) -> None:
    """A short prompt in a long body (a large field that is not the prompt): without a
    tokenizer the body's size (/ 4) says it is long; with one, the context check's count of
    the prompt's tokens says it is short, and it runs on the decode worker."""
    gw, p, (d,) = await pd_gateway(nursery, sim_worker, limit=64, tokenizer=tokenizer)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "metadata": {"note": "x" * 800},  # relayed, never part of the prompt
    }
    r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    local = (await d.stats())["handoff"]["local_prefills"]
    assert ((await p.stats())["requests_total"], local) == ((0, 1) if tokenizer else (1, 0))


async def test_a_prefix_cached_on_the_decode_worker_is_prefilled_there(
    nursery: trio.Nursery, sim_worker
) -> None:
    """With the gateway's tokenizer and cache_aware on the decode role: the first turn of a
    long conversation is disaggregated; the next turn, whose history the decode worker holds
    (predicted from the first), leaves few tokens to prefill and runs there."""
    gw, p, ds = await pd_gateway(
        nursery, sim_worker, limit=96, decodes=2, tokenizer=True,
        routing={"policies": {"d": "cache_aware"}},
    )  # fmt: skip
    messages = [{"role": "user", "content": "tell me about the report " * 30}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8}
    r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert (await p.stats())["requests_total"] == 1  # long: prefilled on P
    messages += [
        {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "and then?"},
    ]
    r = await http_request(gw.url, "POST", "/v1/chat/completions", {**body, "messages": messages})
    assert r.status == 200, r.body
    assert (await p.stats())["requests_total"] == 1  # no second prefill leg
    locals_ = [(await d.stats())["handoff"]["local_prefills"] for d in ds]
    assert sorted(locals_) == [0, 1]
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0  # the decode worker really had the history


async def test_a_busy_prefill_worker_sends_requests_to_idle_decoders(
    nursery: trio.Nursery, sim_worker
) -> None:
    """``local_prefill_busy = 2`` and no length limit: long prompts go to the prefill worker
    (slow, one prefill at a time) until it holds two; the next ones, streamed or not, are
    prefilled on the decode worker, with the merged worker's text. A decode engine that
    reports its KV cache nearly full takes none: that request waits for the prefill worker."""
    gw, p, (d,) = await pd_gateway(
        nursery, sim_worker, limit=0, busy=2,
        prefill_options={"speed": 1.0, "serial_prefill": True, "faults": {"slow": 40.0}},
    )  # fmt: skip
    reference = await sim_worker(role="pd")

    async def ask(i: int, results: list[tuple[int, bool]]) -> None:
        body = long_question(i, max_tokens=6, stream=i % 2 == 1)
        want = await http_request(reference.url, "POST", "/v1/chat/completions", body)
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        results.append((i, text_of(r, body["stream"]) == text_of(want, body["stream"])))

    results: list[tuple[int, bool]] = []
    async with trio.open_nursery() as clients:
        for i in range(5):
            clients.start_soon(ask, i, results)
            await trio.sleep(0.06)  # each request's legs are under way before the next
        # the decode engine's last scrape says its KV cache is nearly full: no deflection
        decode = gw.registry.get("d0")
        assert decode is not None
        decode.engine.kv_usage = 0.95
        clients.start_soon(ask, 5, results)
    assert sorted(results) == [(i, True) for i in range(6)]
    # requests 0 and 1 (and 5, with the decoder full) took the prefill leg; 2, 3 and 4 did not
    assert (await p.stats())["requests_total"] == 3
    assert (await d.stats())["handoff"]["local_prefills"] == 3
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    sample = f'lmgw_pd_local_prefill_total{{model="{MODEL}",reason="busy"}}'
    assert metric_value(text, sample) == 3


async def test_deflection_shares_the_prefills_between_the_two_queues(
    nursery: trio.Nursery, sim_worker
) -> None:
    """A decode worker that prefills one at a time too (``serial_prefill``): a request goes
    to whichever queue of prefills is shorter, the prefill worker's or the decode worker's
    local one, so six requests arriving together split three and three instead of moving
    the whole queue to the decode worker."""
    slow = {"speed": 1.0, "serial_prefill": True, "faults": {"slow": 40.0}}
    gw, p, (d,) = await pd_gateway(
        nursery, sim_worker, limit=0, busy=1, prefill_options=slow, **slow
    )  # fmt: skip

    async def ask(i: int) -> None:
        body = long_question(i, max_tokens=2, stream=i % 2 == 0)
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body

    async with trio.open_nursery() as clients:
        for i in range(6):
            clients.start_soon(ask, i)
            await trio.sleep(0.05)  # all six sent before the first prefill (~0.5 s) ends
    assert (await p.stats())["requests_total"] == 3
    assert (await d.stats())["handoff"]["local_prefills"] == 3
    assert gw.pipeline.local_queues is not None
    assert gw.pipeline.local_queues.queued("d0") == 0  # every local leg counted out


async def test_a_failed_local_leg_is_retried_on_another_decode(
    nursery: trio.Nursery, sim_worker
) -> None:
    """A local leg carries no hand-off to use up, so a decode worker that fails it after
    receiving it is not the end: another decode worker serves it."""
    gw, p, ds = await pd_gateway(nursery, sim_worker, limit=64, decodes=2)
    await ds[0].set_faults(error_rate=1.0)  # answers every request with an error
    ok = 0
    for i in range(4):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4}
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        ok += r.status == 200
    assert ok == 4 and (await p.stats())["requests_total"] == 0
    assert (await ds[0].stats())["requests_total"] >= 1  # it was tried, and failed


async def test_a_local_stream_that_breaks_is_continued(nursery: trio.Nursery, sim_worker) -> None:
    """A locally prefilled stream whose decode worker drops it mid-answer is continued (a
    fresh prefill leg and another decode worker, as any broken P/D stream) with the exact
    text the client would have got."""
    gw, p, ds = await pd_gateway(nursery, sim_worker, limit=64, decodes=2)
    await ds[0].set_faults(drop_at_token=4)
    reference = await sim_worker(role="pd")
    messages = [{"role": "user", "content": "tell me"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "stream": True}
    want = text_of(await http_request(reference.url, "POST", "/v1/chat/completions", body), True)
    for _ in range(2):  # round robin: one of the two starts on the dropping worker
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200 and text_of(r, True) == want
    assert (await ds[0].stats())["dropped_total"] >= 1  # the stream really broke
    assert (await p.stats())["requests_total"] >= 1  # and went on through a prefill leg


async def test_epd_requests_without_media_are_local(
    nursery: trio.Nursery, sim_worker, tmp_path
) -> None:
    """e+p+d (vllm-epd): a short text-only request runs on its decode worker alone; one with
    an image still goes through the encoder and the prefill worker (which loads the encoder
    outputs), with the merged worker's text either way."""
    ec_dir = str(tmp_path / "ec")
    e = await sim_worker(role="e", ec_dir=ec_dir)
    p = await sim_worker(role="p", ec_dir=ec_dir)
    d = await sim_worker(role="d", local_prefill=True)
    reference = await sim_worker(role="pd")
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        models=[ModelConfig(name=MODEL, flow="e+p+d", dialect="vllm-epd", local_prefill_tokens=96)],
        workers=[
            WorkerConfig(url=e.url, role="e"),
            WorkerConfig(url=p.url, role="p"),
            WorkerConfig(url=d.url, role="d"),
        ],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    image = {
        "type": "image_url",
        "image_url": {
            "url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4"
            "nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
        },
    }
    text_only = [{"role": "user", "content": "hi there"}]
    with_image = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]
    for messages, local in ((text_only, True), (with_image, False)):
        for stream in (False, True):
            body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": stream}
            want = await http_request(reference.url, "POST", "/v1/chat/completions", body)
            before = ((await p.stats())["requests_total"], (await e.stats())["requests_total"])
            r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
            assert text_of(r, stream) == text_of(want, stream), (local, stream)
            after = ((await p.stats())["requests_total"], (await e.stats())["requests_total"])
            p_sent = after[0] - before[0]
            assert p_sent == (0 if local else 1), (local, stream)
    assert (await d.stats())["handoff"]["local_prefills"] == 2  # the two text-only requests
    assert (await e.stats())["requests_total"] >= 1  # the image went through E


@pytest.mark.parametrize("dialect", ["sglang-bootstrap", "vllm-p2pnccl"])
async def test_dialects_whose_decoders_cannot_prefill_refuse_it(dialect: str) -> None:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect=dialect, local_prefill_tokens=64)],
    )
    with pytest.raises(ConfigError, match="local_prefill_tokens"):
        Gateway(cfg)
    busy = cfg.models[0].__class__(name=MODEL, flow="p/d", dialect=dialect, local_prefill_busy=4)
    with pytest.raises(ConfigError, match="local_prefill_busy"):
        Gateway(GatewayConfig(server=ServerConfig(port=0), models=[busy]))
