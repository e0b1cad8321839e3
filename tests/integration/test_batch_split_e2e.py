"""Batches and ``n > 1`` on P/D dialects whose hand-off holds one sequence (vllm-nixl,
vllm-p2pnccl): the gateway runs one P/D pair per prompt and sample and merges the answers into
what a merged worker answers for the same request (the simulators' prefill refuses a batch, as
vLLM's connectors cannot hand off one)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL

from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway

BATCHES = [
    ["Tell me about disaggregated serving.", "hello there", "x"],
    [[11, 12, 13, 14], [15, 16], [17] * 40],
]


async def fleet(
    nursery: trio.Nursery,
    sim_worker,
    dialect: str,
    model: dict[str, Any] | None = None,
    sim: dict[str, Any] | None = None,
    **d_opts: Any,
) -> tuple:
    opts: dict[str, Any] = {"kv_port": 0} if dialect == "vllm-p2pnccl" else {}
    opts.update(sim or {})
    p = await sim_worker(role="p", **opts)
    decoders = [await sim_worker(role="d", **opts, **d_opts), await sim_worker(role="d", **opts)]
    workers = [
        WorkerConfig(url=p.url, role="p", kv_address=p.sim.kv_address),
        *(WorkerConfig(url=d.url, role="d", kv_address=d.sim.kv_address) for d in decoders),
    ]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect=dialect, **(model or {}))],
        workers=workers,
    )
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    return f"http://127.0.0.1:{port}", gw, decoders


def complete(url: str, prompt: Any, stream: bool, **kw: Any) -> tuple[list, Any, set]:
    """(sorted (index, text, finish_reason), usage, ids) of one completions request."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    args: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 6, **kw}
    if not stream:
        r = client.completions.create(**args)
        return sorted((c.index, c.text, c.finish_reason) for c in r.choices), r.usage, {r.id}
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage, ids = None, set()
    for chunk in client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        ids.add(chunk.id)
        if chunk.usage is not None:
            assert usage is None, "one usage event"
            assert not chunk.choices
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return sorted((i, t, finish.get(i)) for i, t in texts.items()), usage, ids


@pytest.mark.parametrize("dialect", ["vllm-nixl", "vllm-p2pnccl"])
async def test_a_batch_gives_the_merged_workers_answer(
    nursery: trio.Nursery, sim_worker, dialect: str
) -> None:
    reference = await sim_worker(role="pd")
    url, gw, decoders = await fleet(nursery, sim_worker, dialect)
    for prompt in BATCHES:
        for n in (1, 2):
            expected, ref_usage, _ = await trio.to_thread.run_sync(
                partial(complete, reference.url, prompt, False, n=n, seed=5)
            )
            assert len(expected) == len(prompt) * n
            for stream in (False, True):
                with trio.fail_after(20):
                    got, usage, ids = await trio.to_thread.run_sync(
                        partial(complete, url, prompt, stream, n=n, seed=5)
                    )
                assert got == expected, (prompt, n, stream)
                assert usage.prompt_tokens == ref_usage.prompt_tokens
                assert usage.completion_tokens == ref_usage.completion_tokens
                assert len(ids) == 1  # one id for the whole answer, as vLLM streams a batch
    # per dialect: 2 batches x (n=1: batch, n=2: both) x (whole, stream); 3 x (1 + 2) pairs
    assert gw.metrics.pd_splits.values == {(MODEL, "batch"): 4.0, (MODEL, "both"): 4.0}
    assert gw.metrics.pd_split_pairs.values == {(MODEL,): 36.0}
    stats = [(await d.stats())["handoff"] for d in decoders]
    if dialect == "vllm-nixl":  # every prompt's decode read its own prompt's blocks
        assert sum(h["kv_blocks_verified"] for h in stats) > 0
    else:  # one pair id per prompt and sample: 2 batches x 3 prompts x 3 x (whole, stream)
        assert sum(h["p2p_received"] for h in stats) == 36


async def test_a_decode_dying_mid_stream_in_one_prompts_pair(
    nursery: trio.Nursery, sim_worker
) -> None:
    """Its pair's stream is continued on the other decode worker (migration: every choice
    finishes, one usage event), or with ``migrate_streams = 0`` the batch's stream ends with
    an error event and ``[DONE]`` and the other prompts' legs are cancelled. (The simulator
    models a continuation's exact text for chat only, so texts are compared up to the break.)"""
    reference = await sim_worker(role="pd")
    prompt = BATCHES[0]
    expected, _, _ = await trio.to_thread.run_sync(
        partial(complete, reference.url, prompt, False, temperature=0)
    )
    url, gw, decoders = await fleet(nursery, sim_worker, "vllm-nixl", faults={"drop_at_token": 3})
    with trio.fail_after(20):
        got, usage, _ = await trio.to_thread.run_sync(
            partial(complete, url, prompt, True, temperature=0)
        )
    assert [(i, f) for i, _, f in got] == [(i, f) for i, _, f in expected]
    for (_, text, _), (_, want, _) in zip(got, expected, strict=True):
        assert text.startswith(" ".join(want.split()[:3]))
    assert usage is not None and usage.prompt_tokens > 0
    assert (await decoders[0].stats())["dropped_total"] >= 1

    gw.pipeline.migrations = 0
    raw = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).with_raw_response
    for _ in range(2):  # round robin: one of the two puts a prompt on the dropping worker
        with trio.fail_after(20):
            resp = await trio.to_thread.run_sync(
                partial(
                    raw.completions.create, model=MODEL, prompt=prompt, max_tokens=6, stream=True
                )
            )
            body = await trio.to_thread.run_sync(lambda r=resp: r.http_response.read())
        events = [e for e in body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]" and body.count(b"[DONE]") == 1
        if b'"error"' in body:
            assert b"worker stream failed" in events[-2]
            break
    else:
        raise AssertionError("no stream of the batch reached the dropping worker")
    with trio.fail_after(5):
        while any(w.in_flight for w in gw.registry):
            await trio.sleep(0.01)


async def test_a_prompt_the_worker_refuses_fails_the_batch_and_frees_the_others(
    nursery: trio.Nursery, sim_worker
) -> None:
    url, gw, _ = await fleet(nursery, sim_worker, "vllm-nixl")
    bad = [[11, 12], [99999999], [13, 14, 15]]
    for stream in (False, True):
        with trio.fail_after(20):
            try:
                await trio.to_thread.run_sync(partial(complete, url, bad, stream))
            except openai.BadRequestError as exc:  # before any event: the worker's 400
                assert "out of vocabulary" in str(exc)
            except openai.APIError as exc:  # an event had gone out: the stream's error event
                assert stream and "out of vocabulary" in str(exc)
            else:
                raise AssertionError("a batch with a refused prompt succeeded")
    with trio.fail_after(5):
        while any(w.in_flight for w in gw.registry):
            await trio.sleep(0.01)


def chat(url: str, stream: bool, **kw: Any) -> tuple[list, Any]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    args: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8, **kw,
    }  # fmt: skip
    if not stream:
        r = client.chat.completions.create(**args)
        return sorted((c.index, c.message.content, c.finish_reason) for c in r.choices), r.usage
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return sorted((i, t, finish.get(i)) for i, t in texts.items()), usage


@pytest.mark.parametrize("dialect", ["vllm-nixl", "vllm-p2pnccl"])
async def test_n_choices_run_as_n_pairs_with_the_merged_workers_answer(
    nursery: trio.Nursery, sim_worker, dialect: str
) -> None:
    """A chat with n=3 and a seed: three P/D pairs, sample j seeded seed + j (vLLM's parallel
    sampling rule), each prefill asked for one sequence; the prompt counted once."""
    reference = await sim_worker(role="pd")
    url, gw, _ = await fleet(nursery, sim_worker, dialect)
    expected, ref_usage = await trio.to_thread.run_sync(
        partial(chat, reference.url, False, n=3, seed=7)
    )
    assert len({t for _, t, _ in expected}) == 3  # three different samples
    for stream in (False, True):
        with trio.fail_after(20):
            got, usage = await trio.to_thread.run_sync(partial(chat, url, stream, n=3, seed=7))
        assert got == expected, stream
        assert usage.prompt_tokens == ref_usage.prompt_tokens
        assert usage.completion_tokens == ref_usage.completion_tokens
    prefills = [w for w in gw.registry if w.role == "p"]
    assert sum(w.total_requests for w in prefills) == 6  # one per sample, both times
    assert gw.metrics.pd_splits.values == {(MODEL, "n"): 2.0}
    assert gw.metrics.pd_split_pairs.values == {(MODEL,): 6.0}


async def test_each_sample_parses_its_own_tool_calls(nursery: trio.Nursery, sim_worker) -> None:
    """With a tool parser, n=3 streamed: each sample's answer is parsed on its own (one parse
    state per child, none shared at index 0), so every choice has its whole call."""
    url, _gw, _ = await fleet(
        nursery, sim_worker, "vllm-nixl", model={"tool_parser": "hermes"},
        sim={"tool_format": "hermes"},
    )  # fmt: skip
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]

    def calls(stream: bool) -> dict[int, list]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        args: dict[str, Any] = {
            "model": MODEL, "n": 3, "seed": 11, "tools": tools, "tool_choice": "required",
            "messages": [{"role": "user", "content": "The weather? use get_weather"}],
        }  # fmt: skip
        if not stream:
            r = client.chat.completions.create(**args)
            return {
                c.index: [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
                for c in r.choices
            }
        out: dict[int, dict[int, list[str]]] = {}
        for chunk in client.chat.completions.create(**args, stream=True):
            for c in chunk.choices:
                for t in c.delta.tool_calls or []:
                    name_args = out.setdefault(c.index, {}).setdefault(t.index, ["", ""])
                    name_args[0] += t.function.name or ""
                    name_args[1] += t.function.arguments or ""
        return {i: [tuple(v) for _, v in sorted(d.items())] for i, d in out.items()}

    with trio.fail_after(20):
        whole = await trio.to_thread.run_sync(calls, False)
        streamed = await trio.to_thread.run_sync(calls, True)
    assert sorted(whole) == [0, 1, 2]
    for index, made in whole.items():
        ((name, arguments),) = made
        assert name == "get_weather" and json.loads(arguments)["days"] >= 1, index
    assert streamed == whole
