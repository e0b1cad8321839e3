"""Data-parallel ranks behind one vLLM API server (``workers[].data_parallel_size``): each rank
is a worker of its own, pinned with ``X-data-parallel-rank``, so cache-aware routing keeps a
conversation on the rank that holds its prefix; the monitor reads each rank's own load from
the server's ``/metrics``; KV events come per rank. Against the simulator's data-parallel
server (``lmgw.simulators.dp``), whose ranks are engines with their own prefix caches."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import MODEL, conversation, http_request, start_tokenized_gateway

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ServerConfig,
    WorkerConfig,
    parse_worker_flag,
)
from lmgw.gateway import Gateway
from lmgw.simulators import WorkerOptions
from lmgw.simulators.dp import DataParallelSim, merge_metrics, serve_dp_inprocess
from lmgw.workers.monitor import apply_engine_metrics
from lmgw.workers.worker import EngineLoad

pytestmark = pytest.mark.usefixtures("hard_deadline")

RANKS = 4


async def start_dp(nursery: trio.Nursery, size: int = RANKS, **options: Any) -> tuple[str, Any]:
    options.setdefault("speed", math.inf)
    sim = DataParallelSim(WorkerOptions(model=MODEL, **options), size)
    url = await nursery.start(serve_dp_inprocess, sim)
    return url, sim


async def start_gateway(
    nursery: trio.Nursery, workers: list[WorkerConfig], policy: str = "cache_aware"
) -> Gateway:
    return await start_tokenized_gateway(nursery, workers, policy=policy, route_header=True)


async def run_conversations(gw: Gateway, users: int = 6, turns: int = 4) -> dict[str, list[str]]:
    """Multi-turn chats, one request at a time; each answer's route header, by user."""
    answers: dict[str, list[str]] = {f"user{u}": [] for u in range(users)}
    routes: dict[str, list[str]] = {u: [] for u in answers}
    for turn in range(1, turns + 1):
        for user, said in answers.items():
            body = {
                "model": MODEL,
                "messages": conversation(user, turn, said, words=60),
                "max_tokens": 8,
            }
            r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
            said.append(r.json()["choices"][0]["message"]["content"])
            routes[user].append(r.headers.get("x-lmgw-route", ""))
    return routes


def hit_rate(sim: DataParallelSim) -> float:
    hits = sum(w.engine.cache.hits for w in sim.ranks)
    queries = sum(w.engine.cache.queries for w in sim.ranks)
    return hits / queries


async def test_each_rank_is_a_worker_pinned_by_the_header(nursery: trio.Nursery) -> None:
    """``--worker pd=URL,dp=4``: four workers of one URL; every request names its rank (the
    server's own balancer places none), each conversation stays on one rank, and the ranks'
    prefix caches hit far more often than when the server balances by itself."""
    url, sim = await start_dp(nursery)
    gw = await start_gateway(nursery, [parse_worker_flag(f"pd={url},dp={RANKS}")])
    ids = sorted(w.id for w in gw.registry)
    assert ids == [f"{url}#dp{r}" for r in range(RANKS)]
    assert {w.dp_rank for w in gw.registry} == set(range(RANKS))
    routes = await run_conversations(gw)
    assert sim.balanced == [0] * RANKS  # every request was pinned (parity probes too)
    assert all(sim.pinned)  # and spread over all the ranks
    for user, seen in routes.items():  # a conversation stays where its prefix is
        workers = {dict(kv.split("=", 1) for kv in h.replace(" ", "").split(";"))["worker"]
                   for h in seen[1:]}  # fmt: skip
        assert len(workers) == 1, (user, seen)
    aware = hit_rate(sim)
    # a client's own rank header does not follow the gateway's (one header, the rank's own)
    body = {"model": MODEL, "prompt": "pin me", "max_tokens": 2}
    r = await http_request(gw.url, "POST", "/v1/completions", body, {"x-data-parallel-rank": "3"})
    assert r.status == 200, r.body
    rank = int(
        dict(kv.split("=", 1) for kv in r.headers["x-lmgw-route"].replace(" ", "").split(";"))[
            "worker"
        ][-1]
    )
    sent = [
        v for k, v in sim.ranks[rank].stats.last_headers if k.lower() == b"x-data-parallel-rank"
    ]
    assert sent == [str(rank).encode()]

    # the same traffic to the server as one worker: vLLM's balancer places each request
    url2, sim2 = await start_dp(nursery)
    gw2 = await start_gateway(nursery, [WorkerConfig(url=url2)])
    await run_conversations(gw2)
    assert sim2.pinned == [0] * RANKS and sum(sim2.balanced) >= 24
    assert aware > hit_rate(sim2) + 0.2, (aware, hit_rate(sim2))


async def test_each_rank_reads_its_own_load(nursery: trio.Nursery) -> None:
    """The monitor scrapes the server's /metrics for each rank and keeps only that rank's
    samples (``engine="<rank>"``): a queue on rank 2 weighs on rank 2 alone."""
    url, sim = await start_dp(nursery)
    gw = await start_gateway(nursery, [parse_worker_flag(f"pd={url},dp={RANKS}")], "least_load")
    sim.ranks[2].engine.waiting = 7
    sim.ranks[1].engine.running = 3
    for w in gw.registry:
        await gw.monitor._scrape(w)
    by_rank = {w.dp_rank: w.engine for w in gw.registry}
    assert [by_rank[r].waiting for r in range(RANKS)] == [0, 0, 7, 0]
    assert [by_rank[r].running for r in range(RANKS)] == [0, 3, 0, 0]
    sim.ranks[2].engine.waiting = 0
    # least_load now avoids the busy rank: it never takes a request while the others are idle
    gw.registry.get(f"{url}#dp2").engine.waiting = 50
    before = list(sim.pinned)
    for i in range(8):
        body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 2}
        r = await http_request(gw.url, "POST", "/v1/completions", body)
        assert r.status == 200, r.body
    assert sim.pinned[2] == before[2] and sum(sim.pinned) == sum(before) + 8


async def test_kv_events_per_rank(nursery: trio.Nursery) -> None:
    """Each rank publishes its own KV events (batches naming the rank); the gateway, given
    the ranks one by one with their endpoints, holds each rank's blocks exactly."""
    url, sim = await start_dp(nursery, 2, kv_events="tcp://127.0.0.1:0", kv_blocks=64)
    entries = [
        WorkerConfig(
            url=url, id=f"r{r}", data_parallel_rank=r, kv_events=sim.ranks[r].kv_events.endpoint
        )
        for r in range(2)
    ]
    gw = await start_gateway(nursery, entries)
    with trio.fail_after(10):
        while not all(w.kv_events.subscriptions for w in sim.ranks):
            await trio.sleep(0.01)
    await run_conversations(gw, users=4, turns=2)
    policy: Any = gw.policies["pd"]

    def view(wid: str) -> set[Any]:
        slot = policy._slots[wid]
        return {e for e, ours in policy._alias.items() if policy._index.holders(ours) >> slot & 1}

    with trio.fail_after(10):
        while any(view(f"r{r}") != set(sim.ranks[r].engine.cache.block_hashes()) for r in (0, 1)):
            await trio.sleep(0.01)
    assert all(view(f"r{r}") for r in (0, 1))  # both ranks served, each seen as it is
    assert all(f["gaps"] == 0 for f in gw.kv_events.statistics().values())


async def test_a_bad_rank_header_is_a_400_and_metrics_merge(nursery: trio.Nursery) -> None:
    """The simulated server refuses a rank it does not have, as vLLM does; its /metrics has
    each family once with every rank's samples."""
    url, sim = await start_dp(nursery, 2)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for bad in ("2", "-1", "x"):
        r = await http_request(url, "POST", "/v1/completions", body, {"x-data-parallel-rank": bad})
        assert r.status == 400 and "X-data-parallel-rank" in r.json()["error"]["message"]
    r = await http_request(url, "POST", "/v1/completions", body, {"x-data-parallel-rank": "1"})
    assert r.status == 200 and sim.pinned == [0, 1]
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert text.count("# TYPE vllm:num_requests_waiting ") == 1
    assert 'engine="0"' in text and 'engine="1"' in text
    load = EngineLoad()
    apply_engine_metrics(load, text.encode(), 1)
    assert load.prefix_queries > 0  # rank 1 served the request
    apply_engine_metrics(load, text.encode(), 0)
    assert load.prefix_queries == 0
    stats = msgspec.json.decode((await http_request(url, "GET", "/sim/stats")).body)
    assert len(stats["ranks"]) == 2 and stats["pinned"] == [0, 1]


async def test_merge_metrics_keeps_families_together() -> None:
    a = '# HELP m h\n# TYPE m gauge\nm{engine="0"} 1.0\n# HELP n h\n# TYPE n counter\nn 2\n'
    b = a.replace('engine="0"', 'engine="1"').replace(" 1.0", " 5.0")
    assert merge_metrics([a, b]) == (
        '# HELP m h\n# TYPE m gauge\nm{engine="0"} 1.0\nm{engine="1"} 5.0\n'
        "# HELP n h\n# TYPE n counter\nn 2\nn 2\n"
    )


async def test_a_ranks_requests_carry_its_header_once() -> None:
    """The rank's header is part of its origin: in every request head, right after Host."""
    from lmgw.transport.h1client import build_request_head
    from lmgw.workers.worker import Worker

    w = Worker("x#dp3", "http://h:8000", "pd", dp_rank=3)
    head = build_request_head("POST", "/v1/completions", w.origin.host_header,
                              [(b"x-request-id", b"r1")], 2, w.origin.fixed)  # fmt: skip
    assert head == (
        b"POST /v1/completions HTTP/1.1\r\nhost: h:8000\r\nx-data-parallel-rank: 3\r\n"
        b"x-request-id: r1\r\ncontent-length: 2\r\n\r\n"
    )
    plain = Worker("x", "http://h:8000", "pd")
    assert plain.origin.fixed == b"" and plain.describe()["data_parallel_rank"] is None


async def test_kv_events_of_another_rank_are_a_gap() -> None:
    """A batch naming another rank (an endpoint configured for the wrong rank) is not taken
    for this rank's cache: it counts as a gap and the view is reset."""
    from lmgw.simulators.kv_events import BlockStored, encode_batch
    from lmgw.workers.kv_events import KvEventFeed
    from lmgw.workers.worker import Worker

    seen: list[Any] = []

    class Policy:
        def on_kv_event(self, worker: Any, event: Any) -> None:
            seen.append(type(event).__name__)

    feed = KvEventFeed(Worker("r1", "http://h:1", "pd", dp_rank=1), "tcp://h:1", Policy())  # type: ignore[arg-type]
    stored = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1] * 16,
                         block_size=16)  # fmt: skip
    feed.feed([b"", (0).to_bytes(8, "big"), encode_batch([stored], rank=1)])
    assert seen == ["BlockStored"] and feed.gaps == 0
    feed.feed([b"", (1).to_bytes(8, "big"), encode_batch([stored], rank=0)])
    assert seen == ["BlockStored", "AllBlocksCleared"] and feed.gaps == 1


async def test_ranks_added_at_run_time(nursery: trio.Nursery) -> None:
    """``POST /admin/workers`` (and ``lmgw workers add pd=URL,dp=2``) adds every rank at once
    and answers their list; a rank id that is taken refuses the whole entry."""
    from lmgw.config import AdminConfig

    url, sim = await start_dp(nursery, 2)
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        admin=AdminConfig(token="t" * 32),
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    auth = {"authorization": "Bearer " + "t" * 32}
    entry = {"url": url, "id": "big", "data_parallel_size": 2}
    r = await http_request(gw.url, "POST", "/admin/workers", entry, auth)
    assert r.status == 201, r.body
    added = r.json()
    assert added["object"] == "list"
    ranks = [(w["id"], w["data_parallel_rank"]) for w in added["data"]]
    assert ranks == [("big#dp0", 0), ("big#dp1", 1)]
    r = await http_request(gw.url, "POST", "/admin/workers", {**entry, "id": "big"}, auth)
    assert r.status == 409 and "big#dp0" in r.json()["error"]["message"]
    assert len(gw.registry) == 2
    for i in range(4):
        body = {"model": MODEL, "prompt": f"x{i}", "max_tokens": 2}
        with trio.fail_after(5):
            while not all(w.routable for w in gw.registry):
                await trio.sleep(0.01)
        assert (await http_request(gw.url, "POST", "/v1/completions", body)).status == 200
    assert sim.balanced == [0, 0] and sim.pinned[0] >= 2 and sim.pinned[1] >= 2


async def test_the_simulator_process_serves_ranks(nursery: trio.Nursery) -> None:
    """``python -m lmgw.simulators --data-parallel-size 2 --kv-events tcp://127.0.0.1:0``: one
    API, rank 1's events one port above rank 0's (vLLM's convention, which the gateway's
    ``dp=N`` + ``kv_events`` follows); a refused flag combination is a usage error."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "lmgw.simulators", "--speed", "inf", "--model", MODEL]
    bad = subprocess.run(
        [*argv, "--data-parallel-size", "65"], capture_output=True, timeout=30, check=False
    )
    assert bad.returncode == 2 and b"--data-parallel-size" in bad.stderr
    proc = await trio.lowlevel.open_process(
        [*argv, "--data-parallel-size", "2", "--kv-events", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
    )
    try:
        line = b""
        with trio.fail_after(15):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(256)
        ready = dict(kv.split("=", 1) for kv in line.decode().split()[2:])
        url = line.split()[1].decode()
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        r = await http_request(url, "POST", "/v1/completions", body, {"x-data-parallel-rank": "1"})
        assert r.status == 200, r.body
        stats = msgspec.json.decode((await http_request(url, "GET", "/sim/stats")).body)
        assert stats["pinned"] == [0, 1]
        ends = [s["kv_events"]["endpoint"] for s in stats["ranks"]]
        base = int(ready["kv_events"].rsplit(":", 1)[1])
        assert ends == [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"]
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        proc.kill()


async def test_discovery_adds_and_retires_every_rank() -> None:
    """A discovery backend's entry with ranks (a file's ``data_parallel_size``, a pod's
    ``lmgw.io/data-parallel-size``) adds each rank, and retires each when the entry goes."""
    gw = Gateway(GatewayConfig(server=ServerConfig(port=0)))
    entry = WorkerConfig(url="http://127.0.0.1:9", id="pod", data_parallel_size=3)
    assert gw.sync_workers("file", [entry]) == (3, 0)
    assert sorted(w.id for w in gw.registry) == ["pod#dp0", "pod#dp1", "pod#dp2"]
    assert {gw.source_of(w.id) for w in gw.registry} == {"file"}
    assert gw.sync_workers("file", [entry]) == (0, 0)
    assert gw.sync_workers("file", []) == (0, 3)
    assert len(gw.registry) == 0  # idle: removed at once


async def test_ranks_the_server_lacks_are_not_routed(nursery: trio.Nursery) -> None:
    """``dp=4`` in front of a 2-rank server: its /metrics names engines 0 and 1, so ranks 2
    and 3 fail their probes (with the reason) and no client request meets vLLM's out-of-range
    400."""
    url, sim = await start_dp(nursery, 2)
    gw = await start_gateway(nursery, [parse_worker_flag(f"pd={url},dp=4")], "round_robin")
    with trio.fail_after(5):
        while not all(w.routable for w in gw.registry if w.dp_rank in (0, 1)):
            await trio.sleep(0.01)
    for w in gw.registry:
        if w.dp_rank in (2, 3):
            assert not w.routable and "no data-parallel rank" in w.last_error, w.describe()
    for i in range(6):
        body = {"model": MODEL, "prompt": f"q{i}", "max_tokens": 2}
        r = await http_request(gw.url, "POST", "/v1/completions", body)
        assert r.status == 200, r.body
    assert sim.balanced == [0, 0] and sum(sim.pinned) >= 6


@pytest.mark.parametrize("dialect", ["vllm-nixl", "sglang-bootstrap"])
async def test_prefill_and_decode_servers_with_ranks(nursery: trio.Nursery, dialect: str) -> None:
    """P/D with a 2-rank prefill server and a 2-rank decode server: each leg pinned to the
    rank its role's policy chose, the decode rank's KV fetch reaching the prefill rank that
    holds it; the text is the merged worker's."""
    from lmgw.config import ModelConfig

    p_url, p_sim = await start_dp(nursery, 2, role="p")
    d_url, d_sim = await start_dp(nursery, 2, role="d")
    reference_url, _ = await start_dp(nursery, 1)
    port = int(p_url.rsplit(":", 1)[1])
    workers = [
        WorkerConfig(url=p_url, role="p", data_parallel_size=2, bootstrap_port=port),
        WorkerConfig(url=d_url, role="d", data_parallel_size=2),
    ]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect=dialect)],
        workers=workers,
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    for i in range(4):
        messages = [{"role": "user", "content": f"question {i}: " + "why " * 30}]
        for stream in (False, True):
            body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": stream}
            want = await http_request(reference_url, "POST", "/v1/chat/completions", body)
            got = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert got.status == 200, got.body
            if stream:
                text = "".join(
                    e["choices"][0]["delta"].get("content") or ""
                    for e in got.events()
                    if isinstance(e, dict) and e.get("choices")
                )
                ref = "".join(
                    e["choices"][0]["delta"].get("content") or ""
                    for e in want.events()
                    if isinstance(e, dict) and e.get("choices")
                )
            else:
                text = got.json()["choices"][0]["message"]["content"]
                ref = want.json()["choices"][0]["message"]["content"]
            assert text == ref, (dialect, stream)
    assert p_sim.balanced == [0, 0] and d_sim.balanced == [0, 0]  # every leg pinned
    assert all(p_sim.pinned) and all(d_sim.pinned)  # on both ranks of each server
    verified = [w.stats.kv_blocks_verified for w in d_sim.ranks]
    assert all(verified), verified  # each decode rank fetched real blocks from a prefill rank


async def test_a_server_with_ranks_seen_as_one_worker_is_pointed_out(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A data-parallel server configured as one worker: its engine count shows in the
    worker's description and the log says once how to route to its ranks."""
    import logging

    caplog.set_level(logging.WARNING, logger="lmgw")
    url, _ = await start_dp(nursery, 3)
    gw = await start_gateway(nursery, [WorkerConfig(url=url, id="one")], "round_robin")
    (worker,) = list(gw.registry)
    await gw.monitor.probe(worker)
    assert worker.describe()["engine"]["engines"] == 3
    hints = [r for r in caplog.records if "data-parallel ranks" in r.getMessage()]
    assert len(hints) == 1
    assert "data_parallel_size = 3" in hints[0].getMessage() and "dp=auto" in hints[0].getMessage()
    plain_url, _ = await start_dp(nursery, 1)
    gw2 = await start_gateway(nursery, [WorkerConfig(url=plain_url)], "round_robin")
    assert next(iter(gw2.registry)).engine.engines == 1


async def test_auto_counts_the_ranks_and_follows_the_server(nursery: trio.Nursery) -> None:
    """``dp=auto``: the server is one worker until the first probe counts its engines; then
    each rank is a worker (pinned by header, so both ranks serve and the server's own
    balancer places nothing) and the whole-server worker leaves. Restarted with three ranks
    on the same port, the fleet follows at the next probe; with one (no ranks), back to one
    worker of the entry's id."""
    async with trio.open_nursery() as servers:
        url, sim = await start_dp(servers, 2)
        port = int(url.rsplit(":", 1)[1])
        flag = parse_worker_flag(f"pd={url},dp=auto,id=srv")
        gw = await start_gateway(nursery, [flag], "round_robin")
        assert sorted(w.id for w in gw.registry) == ["srv#dp0", "srv#dp1"]  # the start probed
        assert {w.dp_rank for w in gw.registry} == {0, 1}
        pinned, balanced = list(sim.pinned), list(sim.balanced)
        for i in range(4):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]}
            r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
            assert r.status == 200, r.body
        # round robin by header (parity probes of the new ranks are pinned too)
        assert all(a - b >= 2 for a, b in zip(sim.pinned, pinned, strict=True))
        assert sim.balanced == balanced  # the server's balancer placed none
        servers.cancel_scope.cancel()
    async with trio.open_nursery() as servers:
        await start_dp(servers, 3, port=port)
        for w in list(gw.registry):
            await gw.monitor.probe(w)
        assert sorted(w.id for w in gw.registry) == ["srv#dp0", "srv#dp1", "srv#dp2"]
        servers.cancel_scope.cancel()
    async with trio.open_nursery() as servers:
        await start_dp(servers, 1, port=port)
        for w in list(gw.registry):
            await gw.monitor.probe(w)
        srv = gw.registry.get("srv")
        assert srv is not None
        await gw.monitor.probe(srv)  # (a probe removes the drained ranks once idle)
        assert [w.id for w in gw.registry] == ["srv"] and srv.state.value == "healthy"
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        servers.cancel_scope.cancel()


async def test_auto_ranks_added_at_run_time(nursery: trio.Nursery) -> None:
    """The admin API takes ``data_parallel_size = "auto"`` too: one worker at once, its ranks
    after a probe."""
    url, _ = await start_dp(nursery, 2)
    gw = await start_gateway(nursery, [])
    (worker,) = gw.add_entry(WorkerConfig(url=url, id="late", data_parallel_size="auto"))
    assert worker.id == "late" and worker.dp_rank is None
    await gw.monitor.probe(worker)
    ranks = {w.id for w in gw.registry}
    assert {"late#dp0", "late#dp1"} <= ranks
    for w in list(gw.registry):
        if w.id != "late":
            await gw.monitor.probe(w)
    assert {w.id for w in gw.registry} == {"late#dp0", "late#dp1"}


async def test_native_generate_is_pinned_in_its_body(nursery: trio.Nursery) -> None:
    """SGLang's ``/generate`` reads no rank header: a rank's ``/generate`` request carries its
    rank in the body too (``routed_dp_rank``, and ``data_parallel_rank`` for older releases),
    after any the client sent; the simulator reads it there, as SGLang does."""
    url, sim = await start_dp(nursery, 2)
    gw = await start_gateway(nursery, [parse_worker_flag(f"pd={url},dp=2")], "round_robin")
    served = [w.stats for w in sim.ranks]
    for i in range(4):
        body: dict[str, Any] = {"text": f"hello {i}", "sampling_params": {"max_new_tokens": 2}}
        if i % 2:
            body["routed_dp_rank"] = 0  # a client's own: the gateway's rank comes last, and wins
        r = await http_request(gw.url, "POST", "/generate", body)
        assert r.status == 200, r.body
    assert sim.balanced == [0, 0]  # every /generate named its rank in the body
    assert [s.requests_total for s in served] == [2, 2]  # round robin over the two ranks


async def test_pin_to_rank_bodies() -> None:
    import json

    from lmgw.transport.pool import pin_to_rank

    assert json.loads(pin_to_rank(b'{"text": "x"}', 3)) == {
        "text": "x", "routed_dp_rank": 3, "data_parallel_rank": 3,
    }  # fmt: skip
    assert json.loads(pin_to_rank(b" { } \n", 0)) == {"routed_dp_rank": 0, "data_parallel_rank": 0}
    assert json.loads(pin_to_rank(b'{"routed_dp_rank": 5}', 1))["routed_dp_rank"] == 1  # last wins
    for odd in (b"[1, 2]", b"not json", b'"s"', b"{"):
        assert pin_to_rank(odd, 1) == odd
