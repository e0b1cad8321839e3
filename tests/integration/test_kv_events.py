"""Engine KV events end to end: the simulated worker publishes its prefix cache's changes in
vLLM's wire format, the gateway subscribes (``workers[].kv_events``) and cache_aware's exact
mode holds exactly what each worker holds, through evictions, gaps and removals."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import zmq
from gateway_support import (
    MODEL,
    SimHandle,
    conversation,
    free_port_url,
    http_request,
    metric_value,
    start_tokenized_gateway,
)

from lmgw.config import (
    ConfigError,
    GatewayConfig,
    HealthConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_vllm_batch
from lmgw.simulators import kv_events as sim_events
from lmgw.transport.zmq import ZmqSocket

SETTLE_S = 10.0
"""Bound on waiting for events to reach the gateway (they normally take a millisecond)."""


async def wait_until(check: Callable[[], bool], what: str, timeout: float = SETTLE_S) -> None:
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.01)
    assert check(), f"timed out waiting for {what}"


# -- the simulator's publisher -------------------------------------------------------------------


async def test_simulated_worker_publishes_its_cache_as_vllm_events(sim_worker) -> None:
    """Replaying the events gives exactly the blocks the worker holds, evictions included;
    sequence numbers count batches from 0; a reset publishes AllBlocksCleared."""
    sim: SimHandle = await sim_worker(kv_events="tcp://127.0.0.1:0", kv_blocks=12, speed=math.inf)
    publisher = sim.sim.kv_events
    assert publisher is not None and publisher.endpoint
    stats = await sim.stats()
    assert stats["kv_events"]["endpoint"] == publisher.endpoint
    held: set[int] = set()
    seqs: list[int] = []
    kinds: set[str] = set()
    with ZmqSocket.open(None, zmq.SUB, options={zmq.SUBSCRIBE: b""}) as sub:
        sub.connect(publisher.endpoint)
        await wait_until(lambda: publisher.subscriptions > 0, "the subscription")

        def apply(frames: list[bytes]) -> None:
            topic, seq, payload = frames
            assert topic == b"" and len(seq) == 8
            seqs.append(int.from_bytes(seq, "big"))
            _, events, _ = decode_vllm_batch(payload)
            for e in events:
                kinds.add(type(e).__name__)
                if isinstance(e, BlockStored):
                    assert e.block_size == 16 and len(e.token_ids) == 16 * len(e.block_hashes)
                    assert e.parent_block_hash is None or e.parent_block_hash in held
                    held.update(e.block_hashes)
                elif isinstance(e, BlockRemoved):
                    assert set(e.block_hashes) <= held
                    held.difference_update(e.block_hashes)
                elif isinstance(e, AllBlocksCleared):
                    held.clear()

        answers: list[str] = []
        for turn in range(1, 5):
            body = {"model": MODEL, "messages": conversation("ann", turn, answers), "max_tokens": 8}
            r = await http_request(sim.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200
            answers.append(r.json()["choices"][0]["message"]["content"])
        with trio.fail_after(SETTLE_S):
            while len(seqs) < publisher.seq:
                apply(await sub.recv_multipart())
        cache = (await http_request(sim.url, "GET", "/sim/prefix_cache")).json()
        assert held == set(cache["blocks"]) and len(held) == 12  # full: it evicted
        assert kinds == {"BlockStored", "BlockRemoved"} and seqs == list(range(len(seqs)))
        assert (await http_request(sim.url, "POST", "/sim/reset")).status == 200
        with trio.fail_after(SETTLE_S):
            apply(await sub.recv_multipart())
        assert held == set() and "AllBlocksCleared" in kinds
    st = (await sim.stats())["kv_events"]
    assert st["batches"] == len(seqs) and st["dropped_events"] == 0


def test_kv_events_endpoint_is_checked() -> None:
    wc = WorkerConfig(url="http://127.0.0.1:8000", kv_events=" tcp://10.0.0.5:5557 ")
    assert wc.kv_events == "tcp://10.0.0.5:5557"
    for bad in ("10.0.0.5:5557", "tcp://10.0.0.5", "tcp://10.0.0.5:0", "udp://x:1"):
        with pytest.raises(ConfigError, match="kv_events"):
            WorkerConfig(url="http://127.0.0.1:8000", kv_events=bad)


# -- the gateway's subscriber and cache_aware's exact mode ---------------------------------------


def policy_view(gw: Gateway, worker_id: str) -> set[Any]:
    """The engine block hashes cache_aware believes ``worker_id`` holds (its exact-mode index,
    read through the engine-hash aliases)."""
    policy: Any = gw.policies["pd"]
    slot = policy._slots.get(worker_id)
    if slot is None:
        return set()
    holders = policy._index.holders
    return {e for e, ours in policy._alias.items() if holders(ours) >> slot & 1}


async def test_exact_mode_holds_what_the_workers_hold(nursery: trio.Nursery, sim_worker) -> None:
    """Through a gateway with 3 workers whose caches overflow: after every request the policy's
    index equals each worker's prefix cache, and what it predicts cached is what the worker
    then reports cached (above the cache threshold: shallower matches count as none)."""
    sims = [await sim_worker(kv_events="tcp://127.0.0.1:0", kv_blocks=16) for _ in range(3)]
    workers = [
        WorkerConfig(url=s.url, id=f"w{i}", kv_events=s.sim.kv_events.endpoint)
        for i, s in enumerate(sims)
    ]
    gw = await start_tokenized_gateway(nursery, workers, route_header=True)
    await wait_until(
        lambda: all(s.sim.kv_events.subscriptions > 0 for s in sims), "the subscriptions"
    )

    def in_sync() -> bool:
        return all(
            policy_view(gw, f"w{i}") == set(s.sim.engine.cache.block_hashes())
            for i, s in enumerate(sims)
        )

    answers: dict[str, list[str]] = {u: [] for u in ("ann", "bob", "cid", "dan", "eve")}
    predicted_total = 0
    for turn in range(1, 5):
        for user, said in answers.items():
            body = {"model": MODEL, "messages": conversation(user, turn, said), "max_tokens": 8}
            r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
            said.append(r.json()["choices"][0]["message"]["content"])
            route = dict(
                kv.split("=", 1) for kv in r.headers["x-lmgw-route"].replace(" ", "").split(";")
            )
            predicted, usage = int(route.get("predicted", 0)), r.json()["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            # exact: predicted what the worker had (matches under cache_threshold count as 0)
            assert predicted == (cached if cached >= 0.3 * usage["prompt_tokens"] else 0)
            predicted_total += predicted
            await wait_until(in_sync, "the gateway's view to match the workers' caches")
    assert predicted_total > 0  # later turns hit
    assert all(s.sim.engine.cache.evictions > 0 for s in sims)  # and the view followed those
    st = gw.policies["pd"].statistics()
    assert st["exact_workers"] == 3 and st["kv_blocks_unresolved"] == 0
    assert all(f["gaps"] == 0 and f["batches"] > 0 for f in gw.kv_events.statistics().values())


async def test_a_sequence_gap_resets_the_view_and_is_counted(nursery: trio.Nursery) -> None:
    """A publisher in the test: batch 0 and 1 arrive, 2 is lost, 3 arrives: the worker's view
    is only what batch 3 stored, and the gap is counted; an unreadable batch is a gap too; a
    removed worker's feed stops."""
    ctx = zmq.Context.instance()
    with ZmqSocket.open(ctx, zmq.XPUB, options={zmq.XPUB_VERBOSE: 1}) as pub:
        endpoint = pub.bind("tcp://127.0.0.1:0")
        gw = await start_tokenized_gateway(
            nursery, [WorkerConfig(url=free_port_url(), id="w0", kv_events=endpoint)]
        )
        with trio.fail_after(SETTLE_S):
            assert (await pub.recv_multipart())[0][:1] == b"\x01"  # the gateway subscribed
        feed = gw.kv_events.feeds["w0"]
        tokens = list(range(100, 100 + 16 * 6))

        def stored(first: int, n: int, parent: int | None) -> sim_events.BlockStored:
            ids = tokens[16 * first : 16 * (first + n)]
            return sim_events.BlockStored(list(range(first, first + n)), parent, ids, 16)

        async def send(seq: int, payload: bytes) -> None:
            before = feed.last_seq, feed.gaps
            await pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            await wait_until(lambda: (feed.last_seq, feed.gaps) != before, f"batch {seq}")

        await send(0, sim_events.encode_batch([stored(0, 2, None)]))
        await send(1, sim_events.encode_batch([stored(2, 2, 1)]))
        assert policy_view(gw, "w0") == {0, 1, 2, 3} and feed.gaps == 0
        await send(3, sim_events.encode_batch([stored(0, 1, None)]))
        assert policy_view(gw, "w0") == {0} and feed.gaps == 1
        await send(4, b"\x93not a batch")
        assert policy_view(gw, "w0") == set() and feed.gaps == 2
        text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
        assert metric_value(text, 'lmgw_kv_event_gaps_total{worker="w0"}') == 2

        gw.remove_worker("w0")
        assert "w0" not in gw.kv_events.feeds and feed.closed
        events = gw.policies["pd"].statistics()["kv_events"]
        await pub.send_multipart([b"", (5).to_bytes(8, "big"), sim_events.encode_batch([])])
        await trio.sleep(0.1)  # nothing may arrive: there is no event to wait for
        assert gw.policies["pd"].statistics()["kv_events"] == events
        assert policy_view(gw, "w0") == set()


async def test_policies_without_events_do_not_subscribe(nursery: trio.Nursery, sim_worker) -> None:
    sim = await sim_worker(kv_events="tcp://127.0.0.1:0")
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        routing=RoutingConfig(policy="least_load"),
        workers=[WorkerConfig(url=sim.url, id="w0", kv_events=sim.sim.kv_events.endpoint)],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    assert gw.kv_events.feeds == {}


# -- lmgw simulate --kv-events (worker processes) ----------------------------------------------


@pytest.mark.slow
def test_simulate_with_kv_events_routes_in_exact_mode() -> None:
    """`lmgw simulate --kv-events`: each worker reports its publisher on READY, the gateway
    subscribes to every one, and cache_aware takes its workers' blocks from their events."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmgw.cli", "simulate", "--workers", "2pd", "--kv-events",
         "--policy", "cache_aware", "--port", "0", "--speed", "inf", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url, endpoints = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                break
            endpoints += re.findall(r"kv_events=(tcp://127\.0\.0\.1:\d+)", line)
            if m := re.search(r"on (http://\S+)", line):
                url = m.group(1)
        assert url and len(endpoints) == 2, proc.stderr.read() if proc.stderr else ""

        def post(messages: list[dict[str, str]]) -> dict[str, Any]:
            body = msgspec.json.encode({"model": "sim-llama-8b", "messages": messages})
            headers = {"content-type": "application/json"}
            req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return msgspec.json.decode(resp.read())

        def metrics() -> str:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
                return resp.read().decode()

        stat = 'lmgw_routing_policy_stat{role="pd",policy="cache_aware",stat="%s"}'
        deadline = time.monotonic() + 20
        for i in range(40):  # until both workers were chosen and their events arrived
            post(conversation(f"user{i}", 1, []))
            if metric_value(metrics(), stat % "exact_workers") == 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = metrics()
        assert metric_value(text, stat % "exact_workers") == 2
        assert metric_value(text, stat % "kv_events") > 0
        assert "lmgw_kv_event_gaps_total" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- simulator fidelity: what routing quality depends on ------------------------------------------


def test_prefix_cache_evicts_leaves_before_their_prefix() -> None:
    """A prompt's root block is the most recent of its blocks, so under pressure the cache
    drops the tail and keeps the prefix reachable (evicting the root first would strand the
    rest: no lookup can reach them, yet they take capacity)."""
    from lmgw.simulators.engine import PrefixCache

    events: list[Any] = []
    cache = PrefixCache(capacity_blocks=4, block_size=4, listener=events.append)
    a = list(range(13))  # 3 full blocks
    cache.insert(a)
    cache.insert([50] * 9)  # 2 more: one must go
    assert cache.lookup(a) == 8  # a's first two blocks survived, its third was evicted
    stored, other, removed = events
    assert isinstance(removed, sim_events.BlockRemoved)
    assert removed.block_hashes == [stored.block_hashes[2]]
    assert other.parent_block_hash is None and stored.token_ids == a[:12]


async def test_serial_prefill_queues_a_busy_worker(sim_worker) -> None:
    """With serial_prefill a second request waits (counted as waiting, as vLLM reports it)
    while the first one's prefill computes."""
    sim: SimHandle = await sim_worker(serial_prefill=True, speed=0.05)  # ~60 ms per prefill
    engine = sim.sim.engine

    async def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"request {i} " * 20, "max_tokens": 1}
        assert (await http_request(sim.url, "POST", "/v1/completions", body)).status == 200

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0)
        nursery.start_soon(one, 1)
        with trio.fail_after(SETTLE_S):
            while (engine.running, engine.waiting) != (1, 1):
                await trio.sleep(0.005)
    assert (engine.running, engine.waiting) == (0, 0)


async def test_exact_mode_keeps_an_adapters_blocks_apart(nursery: trio.Nursery, sim_worker) -> None:
    """A worker started with a LoRA adapter (listed with a parent in /v1/models): the same
    prompt for the base model and for the adapter are different cache entries in the engine
    (its events carry lora_name) and in the gateway's view, so every prediction equals what
    the worker then reports cached, whichever model asks: the adapter's first ask predicts
    nothing although the base model's blocks are there."""
    sims = [
        await sim_worker(kv_events="tcp://127.0.0.1:0", lora_modules=(("law", "/adapters/law"),))
    ]
    workers = [
        WorkerConfig(url=s.url, id=f"w{i}", kv_events=s.sim.kv_events.endpoint)
        for i, s in enumerate(sims)
    ]
    gw = await start_tokenized_gateway(nursery, workers, route_header=True)
    assert gw.is_lora("law")
    await wait_until(
        lambda: all(s.sim.kv_events.subscriptions > 0 for s in sims), "the subscriptions"
    )
    messages = conversation("ann", 1, [])
    hits = []
    for model in (MODEL, "law", "law", MODEL):
        body = {"model": model, "messages": messages, "max_tokens": 4}
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        route = dict(
            kv.split("=", 1) for kv in r.headers["x-lmgw-route"].replace(" ", "").split(";")
        )
        predicted, usage = int(route.get("predicted", 0)), r.json()["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert predicted == (cached if cached >= 0.3 * usage["prompt_tokens"] else 0), model
        hits.append(cached > 0)
        await wait_until(
            lambda: all(
                policy_view(gw, f"w{i}") == set(s.sim.engine.cache.block_hashes())
                for i, s in enumerate(sims)
            ),
            "the gateway's view to match the workers' caches",
        )
    assert hits == [False, False, True, True]
    assert gw.policies["pd"].statistics()["kv_blocks_unresolved"] == 0
