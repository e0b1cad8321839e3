"""Every flow x dialect end to end: the official `openai` client -> gateway -> simulated E/P/D
workers moving real KV and embedding bytes. The simulators' text is a deterministic function of
(prompt, media, seed), so every route must give exactly what a merged worker gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL

from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway

IMAGE = {
    "type": "image_url",
    "image_url": {
        "url": "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
    },
}
TEXT_ONLY = [{"role": "user", "content": "Tell me about disaggregated serving, " * 6}]
WITH_IMAGE = [
    {"role": "user", "content": [{"type": "text", "text": "What is in the image?"}, IMAGE]}
]

CASES = [
    ("p/d", "vllm-nixl", {"p": 1, "d": 2}),
    # two decode workers: the pair id names one, and D's leg must reach exactly that one
    ("p/d", "vllm-p2pnccl", {"p": 1, "d": 2}),
    ("p/d", "vllm-lmcache", {"p": 1, "d": 2}),
    ("p/d", "sglang-bootstrap", {"p": 1, "d": 1}),
    ("e+p+d", "vllm-epd", {"e": 2, "p": 1, "d": 1}),
    ("e+pd", "vllm-epd", {"e": 1, "pd": 1}),
]


def run_client(url: str, messages: list[dict], stream: bool) -> tuple[str, Any]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=3)
        return r.choices[0].message.content, r.usage
    parts, usage = [], None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, seed=3, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        parts.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(parts), usage


async def start_gateway(nursery: trio.Nursery, flow: str, dialect: str, workers: list) -> str:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow=flow, dialect=dialect)],
        workers=workers,
    )
    port = await nursery.start(Gateway(cfg).run)
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("flow", "dialect", "counts"), CASES, ids=[f"{f}-{d}" for f, d, _ in CASES]
)
async def test_flow_gives_the_merged_workers_text(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, flow: str, dialect: str, counts: dict
) -> None:
    ec_dir = str(tmp_path / "ec")
    reference = await sim_worker(role="pd", ec_dir=None)
    workers = []
    decoders, prefills = [], []
    for role, n in counts.items():
        for _ in range(n):
            opts: dict[str, Any] = {"role": role}
            if role in ("e", "p", "pd") and "e" in counts:
                opts["ec_dir"] = ec_dir
            if dialect == "vllm-p2pnccl":
                opts["kv_port"] = 0
            elif dialect == "vllm-lmcache":
                opts.update(kv_connector="lmcache", lmcache_dir=str(tmp_path / "lmcache"))
            sim = await sim_worker(**opts)
            (decoders if role == "d" else prefills).append(sim)
            port = int(sim.url.rsplit(":", 1)[1])
            workers.append(
                WorkerConfig(
                    url=sim.url,
                    role=role,
                    bootstrap_port=port if role == "p" else None,
                    kv_address=sim.sim.kv_address,
                )
            )
    url = await start_gateway(nursery, flow, dialect, workers)
    prompts = [TEXT_ONLY, WITH_IMAGE] if "e" in counts else [TEXT_ONLY]
    for messages in prompts:
        # the same request straight to a merged worker; media are embedded there inline
        ref_worker = reference if messages is TEXT_ONLY else await sim_worker(role="pd")
        expected, ref_usage = await trio.to_thread.run_sync(
            run_client, ref_worker.url, messages, False
        )
        for stream in (False, True):
            with trio.fail_after(20):
                text, usage = await trio.to_thread.run_sync(run_client, url, messages, stream)
            assert text == expected, (flow, dialect, stream)
            # the merged worker's counts (the model may stop before max_tokens=12)
            assert usage.completion_tokens == ref_usage.completion_tokens <= 12
            assert usage.prompt_tokens == ref_usage.prompt_tokens
    d_stats = [(await w.stats())["handoff"] for w in decoders]
    p_stats = [(await w.stats())["handoff"] for w in prefills]
    if dialect in ("vllm-nixl", "vllm-p2pnccl", "sglang-bootstrap", "vllm-epd") and "d" in counts:
        # the decode side really fetched and verified KV blocks from the prefill worker
        verified = sum(h["kv_blocks_verified"] for h in d_stats)
        assert verified > 0
        assert sum(h["kv_blocks_served"] for h in p_stats) == verified
    if dialect == "vllm-p2pnccl":
        # every request's KV went through a pair id, to the decode worker the id named
        assert sum(h["p2p_received"] for h in d_stats) == 2
        assert sum(h["p2p_published"] for h in p_stats) == 2
        assert sum(h["p2p_misrouted"] for h in d_stats + p_stats) == 0
    if dialect == "vllm-lmcache":
        # both requests found the whole prompt in LMCache, stored there by the prefill leg
        assert sum(h["lmcache_hits"] for h in d_stats) == 2
        assert sum(h["lmcache_misses"] for h in d_stats) == 0
        assert p_stats[0]["lmcache_chunks_stored"] > 0


@pytest.mark.parametrize(
    ("flow", "dialect"),
    [("p/d", "vllm-nixl"), ("p/d", "sglang-bootstrap"), ("e+pd", "vllm-epd")],
)
async def test_decode_dying_mid_stream_is_continued_with_the_exact_text(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, flow: str, dialect: str
) -> None:
    """Mid-stream migration through a disaggregated flow: a fresh prefill of the prompt plus
    the text so far, decoded by another worker, spliced into the client's stream."""
    ec_dir = str(tmp_path / "ec")
    final_role = "d" if flow == "p/d" else "pd"
    workers = []
    for role, faults in (("p", None), ("e", None), (final_role, {"drop_at_token": 4}),
                         (final_role, None)):  # fmt: skip
        if role not in flow.replace("/", "+").split("+") and role != final_role:
            continue
        opts: dict[str, Any] = {"role": role}
        if faults:
            opts["faults"] = faults
        if "e" in flow and role in ("e", "pd"):
            opts["ec_dir"] = ec_dir
        sim = await sim_worker(**opts)
        if faults:
            dropping = sim
        port = int(sim.url.rsplit(":", 1)[1])
        workers.append(
            WorkerConfig(url=sim.url, role=role, bootstrap_port=port if role == "p" else None)
        )
    url = await start_gateway(nursery, flow, dialect, workers)
    messages = WITH_IMAGE if "e" in flow else TEXT_ONLY
    reference = await sim_worker(role="pd")

    def stream_text(base: str) -> str:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        chunks = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
        )
        return "".join(c.delta.content or "" for ch in chunks for c in ch.choices)

    expected = await trio.to_thread.run_sync(stream_text, reference.url)
    for _ in range(2):  # round robin: one of the two starts on the dropping worker
        with trio.fail_after(20):
            assert await trio.to_thread.run_sync(stream_text, url) == expected
    assert (await dropping.stats())["dropped_total"] >= 1  # the stream really broke


@pytest.mark.parametrize("dialect", ["vllm-nixl", "sglang-bootstrap"])
async def test_a_long_prompt_gives_the_merged_workers_text(
    nursery: trio.Nursery, sim_worker, dialect: str
) -> None:
    """A body past 64 kB: the legs join the client's members as bytes (ClientBody.encode)."""
    reference = await sim_worker(role="pd")
    p = await sim_worker(role="p")
    d = await sim_worker(role="d")
    workers = [
        WorkerConfig(
            url=p.url,
            role="p",
            bootstrap_port=int(p.url.rsplit(":", 1)[1]),
            kv_address=p.sim.kv_address,
        ),
        WorkerConfig(url=d.url, role="d", kv_address=d.sim.kv_address),
    ]
    url = await start_gateway(nursery, "p/d", dialect, workers)
    long_text = 'Ünïcode and "quoted" words in a long document. ' * 1800
    messages = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": long_text}]
    expected, ref_usage = await trio.to_thread.run_sync(run_client, reference.url, messages, False)
    for stream in (False, True):
        with trio.fail_after(20):
            text, usage = await trio.to_thread.run_sync(run_client, url, messages, stream)
        assert text == expected
        assert usage.prompt_tokens == ref_usage.prompt_tokens > 10000
