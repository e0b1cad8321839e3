"""`lmgw bench`'s load loop against in-process servers: simulated workers (counts that match the
worker's, multi-turn, open loop, error types) and a server with odd streams. The CLI end to end
is in test_bench_cli.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import MODEL, free_port_url

from lmgw.bench import BenchOptions, BenchSetupError, run_bench
from lmgw.bench.workloads import poisson_gaps, rng_for
from lmgw.config import GatewayConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.http.server import serve_http

pytestmark = pytest.mark.usefixtures("hard_deadline")


def options(url: str, **kw: Any) -> BenchOptions:
    kw.setdefault("model", MODEL)
    kw.setdefault("input_len", 16)
    kw.setdefault("output_len", 8)
    kw.setdefault("ignore_eos", True)
    return BenchOptions(url=url, **kw)


async def test_closed_loop_counts_match_the_worker(sim_worker) -> None:
    sims = [await sim_worker(), await sim_worker()]
    reports = []
    for sim in sims:
        reports.append(await run_bench(options(sim.url, concurrency=4, requests=25)))
    for sim, rep in zip(sims, reports, strict=True):
        s = rep["summary"]
        stats = await sim.stats()
        assert s["requests"] == {"completed": 25, "ok": 25, "errors": 0}
        assert stats["requests_total"] == 25
        assert s["tokens"]["completion"] == stats["generation_tokens_total"] == 25 * 8
        assert s["tokens"]["prompt"] == stats["prompt_tokens_total"]
        assert s["tokens"]["usage_reported"] == 25
        assert all(r["chunks"] == 8 and r["status"] == 200 for r in rep["requests"])
        assert s["latency_ms"]["itl"]["n"] == 25 * 7
        assert rep["generator"]["connections"] <= 4  # kept alive
        assert rep["config"]["mode"] == "closed" and rep["workload"]["name"] == "synthetic"


async def test_multi_turn_sessions_grow_their_prompts(sim_worker) -> None:
    sim = await sim_worker()
    rep = await run_bench(
        options(sim.url, concurrency=2, requests=9, workload="multi-turn", turns=3)
    )
    assert rep["summary"]["requests"]["ok"] == 9
    turns: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in rep["requests"]:
        turns[r["session"]].append((r["turn"], r["prompt_tokens"]))
    # --requests counts requests: a session still going when they run out stops short
    assert sum(len(t) for t in turns.values()) == 9
    assert max(len(t) for t in turns.values()) == 3
    for t in turns.values():
        assert [turn for turn, _ in t] == list(range(len(t)))
        prompts = [p for _, p in t]
        # each turn resends the history: the previous prompt, its 8-token answer, a new message
        assert all(b > a + 8 for a, b in pairwise(prompts))


async def test_open_loop_sends_the_scheduled_arrivals(sim_worker) -> None:
    sim = await sim_worker()
    rep = await run_bench(options(sim.url, rate=150.0, duration=0.4, seed=3))
    due, expected = 0.0, 0
    for gap in islice(poisson_gaps(150.0, rng_for(3, "arrivals")), 1000):
        due += gap
        if due >= 0.4:
            break
        expected += 1
    assert rep["summary"]["requests"]["completed"] == expected
    assert (await sim.stats())["requests_total"] == expected
    assert rep["config"]["mode"] == "open" and "lag_ms" in rep["generator"]


async def test_no_stream_and_completions(sim_worker) -> None:
    sim = await sim_worker()
    rep = await run_bench(
        options(sim.url, concurrency=2, requests=6, no_stream=True, endpoint="completions")
    )
    s = rep["summary"]
    assert s["requests"]["ok"] == 6 and s["tokens"]["completion"] == 48
    assert s["latency_ms"]["tpot"]["n"] == 0 and s["latency_ms"]["ttft"]["n"] == 6


async def test_errors_are_counted_by_type(sim_worker) -> None:
    failing = await sim_worker(faults={"error_rate": 1.0})
    hanging = await sim_worker(faults={"hang": True})
    dropping = await sim_worker(faults={"drop_at_token": 2})
    cases = [
        (failing.url, {}, "http_500"),
        (failing.url, {"model": "nope"}, "http_404"),  # the model check comes first
        (hanging.url, {"timeout": 0.2}, "timeout"),
        (dropping.url, {}, "disconnected"),
        (free_port_url(), {}, "connect"),
    ]
    for url, extra, kind in cases:
        rep = await run_bench(options(url, concurrency=2, requests=4, **extra))
        s = rep["summary"]
        assert s["errors_by_type"] == {kind: 4}, (kind, s["errors_by_type"])
        assert s["requests"]["ok"] == 0 and s["error_examples"][kind]
    rep = await run_bench(options(failing.url, concurrency=1, requests=1, model="nope"))
    assert "`nope` does not exist" in rep["summary"]["error_examples"]["http_404"]


async def odd_server(nursery: trio.Nursery) -> str:
    """A server whose answers break the stream rules in the way the model name says."""
    head = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'

    async def handler(request: Any, responder: Any) -> None:
        body = json.loads(request.body)
        model = body["model"]
        sse = [(b"content-type", b"text/event-stream")]
        if model == "error-event":
            err = b'data: {"error":{"message":"worker died","type":"InternalServerError"}}\n\n'
            await responder.send_full(200, sse, head + err + b"data: [DONE]\n\n")
        elif model == "no-done":
            await responder.send_full(200, sse, head + head)
        elif model == "bad-json":
            await responder.send_full(200, sse, head + b"data: {nope\n\n" + b"data: [DONE]\n\n")
        else:  # CRLF framing, a comment, a multi-line event, usage: all fine
            crlf = head.replace(b"\n", b"\r\n")
            usage = b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":3,'
            usage += b'"completion_tokens":2}}\n\n'
            body = crlf + b": keep-alive\r\n\r\n" + head + usage + b"data: [DONE]\n\n"
            await responder.send_full(200, sse, body)

    port = await nursery.start(serve_http, handler, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}/v1"


async def test_stream_errors_incomplete_streams_and_odd_framing(nursery: trio.Nursery) -> None:
    url = await odd_server(nursery)
    for model, kind in (
        ("error-event", "stream_error"),
        ("no-done", "incomplete"),
        ("bad-json", "protocol"),
    ):
        rep = await run_bench(options(url, model=model, concurrency=1, requests=2))
        assert rep["summary"]["errors_by_type"] == {kind: 2}, model
    rep = await run_bench(options(url, model="fine", concurrency=1, requests=2))
    s = rep["summary"]
    assert s["requests"]["ok"] == 2 and s["tokens"] == {
        "prompt": 6,
        "completion": 4,
        "usage_reported": 2,
    }
    assert [r["chunks"] for r in rep["requests"]] == [2, 2]
    rep = await run_bench(options(url.replace("/v1", ""), model="error-event", concurrency=1,
                                  requests=1))  # fmt: skip
    assert "worker died" in rep["summary"]["error_examples"]["stream_error"]


async def test_model_from_the_target_and_setup_errors(sim_worker) -> None:
    sim = await sim_worker()
    rep = await run_bench(options(sim.url, model=None, concurrency=1, requests=2))
    assert rep["config"]["model"] == MODEL and rep["summary"]["requests"]["ok"] == 2
    with pytest.raises(BenchSetupError, match="cannot find the model") as info:
        await run_bench(options(free_port_url(), model=None, concurrency=1, requests=1))
    assert info.value.code == 1
    for kw, needle in (
        ({"concurrency": 1}, "--duration or --requests"),
        ({"requests": 1}, "exactly one of --concurrency and --rate"),
        ({"concurrency": 1, "requests": 1, "image_size": "big"}, "--image-size"),
        ({"concurrency": 1, "requests": 1, "extra_body": "[1]"}, "JSON object"),
        ({"concurrency": 1, "requests": 1, "header": ["nocolon"]}, "--header"),
    ):
        with pytest.raises(BenchSetupError, match=re.escape(needle)):
            await run_bench(options(sim.url, **kw))


@pytest.mark.parametrize("workload", ["shared-prefix", "multimodal"])
async def test_prefix_and_image_workloads_run(sim_worker, workload: str) -> None:
    sim = await sim_worker()
    rep = await run_bench(
        options(sim.url, concurrency=2, requests=6, workload=workload, image_size="32x32")
    )
    assert rep["summary"]["requests"]["ok"] == 6, rep["summary"]["error_examples"]
    assert rep["workload"]["name"] == workload


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_https_target_with_cacert(sim_worker, nursery: trio.Nursery, tmp_path: Path) -> None:
    sim = await sim_worker()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    cfg = GatewayConfig(
        server=ServerConfig(port=0, server="hypercorn", certfile=str(cert), keyfile=str(key)),
        models=[ModelConfig(name=MODEL)],
        workers=[WorkerConfig(url=sim.url)],
    )
    port = await nursery.start(Gateway(cfg).run)
    url = f"https://127.0.0.1:{port}"
    rep = await run_bench(options(url, model=None, cacert=str(cert), concurrency=2, requests=4))
    assert rep["summary"]["requests"]["ok"] == 4 and rep["config"]["model"] == MODEL
    assert (await sim.stats())["requests_total"] == 4
    with pytest.raises(BenchSetupError, match="--cacert"):
        await run_bench(options(url, cacert=str(tmp_path / "none.pem"), concurrency=1, requests=1))
    rep = await run_bench(options(url, concurrency=1, requests=1))  # not trusted
    assert rep["summary"]["errors_by_type"] == {"connect": 1}
