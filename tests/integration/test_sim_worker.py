"""The simulated vLLM worker over real HTTP: in-process workers served by ``serve_http`` (fast) and
a process fleet (``@pytest.mark.slow``). Raw HTTP over trio sockets keeps the bytes visible; one
test drives the official ``openai`` client in a thread to prove the shapes parse."""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import trio
from gateway_support import RawResponse, http_request, request_bytes

from lmgw.simulators import (
    Fleet,
    FleetError,
    SimWorker,
    WorkerOptions,
    run_fleet,
    serve_worker_inprocess,
)
from lmgw.simulators.faults import Faults

MODEL = "sim-model"
SIM_MAX_MODEL_LEN = 32768  # the sim-model folder's config.json
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}


# the raw HTTP/1.1 client shared with the gateway tests


async def http(
    url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> RawResponse:
    return await http_request(url, method, path, body, headers)


async def start_worker(nursery: trio.Nursery, **options: Any) -> tuple[SimWorker, str]:
    options.setdefault("speed", math.inf)
    worker = SimWorker(WorkerOptions(**options))
    url = await nursery.start(serve_worker_inprocess, worker)
    return worker, url


@pytest.fixture
async def sim(nursery: trio.Nursery) -> tuple[SimWorker, str]:
    return await start_worker(nursery)


# -- generation -----------------------------------------------------------------------------------


async def test_chat_non_stream_shape_and_determinism(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    r = await http(url, "POST", "/v1/chat/completions", CHAT, {"x-request-id": "req-123"})
    assert r.status == 200 and r.headers["x-request-id"] == "req-123"
    body = r.json()
    assert body["id"] == "chatcmpl-req-123"
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert choice["message"]["content"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    again = (await http(url, "POST", "/v1/chat/completions", {**CHAT, "temperature": 1.5})).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert again["id"] != body["id"]  # a fresh request id when none is sent
    seeded = (await http(url, "POST", "/v1/chat/completions", {**CHAT, "seed": 42})).json()
    assert seeded["choices"][0]["message"]["content"] != choice["message"]["content"]


async def test_repeated_prompt_reports_cached_tokens(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    req = {"model": MODEL, "prompt": "lorem " * 100, "max_tokens": 4}
    first = (await http(url, "POST", "/v1/completions", req)).json()["usage"]
    second = (await http(url, "POST", "/v1/completions", req)).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert (
        second["prompt_tokens_details"]["cached_tokens"] == (first["prompt_tokens"] - 1) // 16 * 16
    )
    metrics = (await http(url, "GET", "/metrics")).body.decode()
    hits = next(ln for ln in metrics.splitlines() if ln.startswith("vllm:prefix_cache_hits_total"))
    assert float(hits.rsplit(" ", 1)[1]) == second["prompt_tokens_details"]["cached_tokens"]


async def test_chat_stream_with_usage(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    full = (await http(url, "POST", "/v1/chat/completions", CHAT)).json()
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = await http(url, "POST", "/v1/chat/completions", req)
    assert r.status == 200
    events = r.events()
    assert events[-1] == "[DONE]"
    first, *tokens, final, usage = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "finish_reason" not in first["choices"][0]  # exclude_none
    text = "".join(e["choices"][0]["delta"]["content"] for e in tokens)
    assert text == full["choices"][0]["message"]["content"]
    assert len(tokens) == full["usage"]["completion_tokens"]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(tokens)
    assert len({e["id"] for e in events[:-1]}) == 1


async def test_stream_continuous_usage_and_n(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    req = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "n": 2,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True, "include_usage": False},
    }
    events = (await http(url, "POST", "/v1/completions", req)).events()
    assert events[-1] == "[DONE]"
    per_choice: dict[int, str] = {0: "", 1: ""}
    for e in events[:-1]:
        assert e["object"] == "text_completion" and "usage" in e
        (c,) = e["choices"]
        per_choice[c["index"]] += c["text"]
    assert per_choice[0] != per_choice[1]
    non_stream = (await http(url, "POST", "/v1/completions", {**req, "stream": False})).json()
    del non_stream  # stream_options without stream is a 400, checked elsewhere
    plain = {k: v for k, v in req.items() if k not in ("stream", "stream_options")}
    body = (await http(url, "POST", "/v1/completions", plain)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [per_choice[0], per_choice[1]]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 10


async def test_completion_prompt_forms(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    tok = (await http(url, "POST", "/tokenize", {"model": MODEL, "prompt": "Hello there"})).json()
    assert tok["count"] == len(tok["tokens"]) > 1 and tok["max_model_len"] == SIM_MAX_MODEL_LEN
    detok = (await http(url, "POST", "/detokenize", {"tokens": tok["tokens"]})).json()
    assert detok == {"prompt": "<|startoftext|>Hello there"}  # the BOS a completion gets
    by_text = (await http(url, "POST", "/v1/completions", {"prompt": "Hello there"})).json()
    by_ids = (await http(url, "POST", "/v1/completions", {"prompt": tok["tokens"]})).json()
    assert by_text["object"] == "text_completion" and by_text["id"].startswith("cmpl-")
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    batch = {"prompt": ["Hello there", "General Kenobi"], "max_tokens": 3, "echo": True}
    body = (await http(url, "POST", "/v1/completions", batch)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"].startswith("Hello there")
    assert body["choices"][1]["text"].startswith("General Kenobi")
    stop = {"prompt": "Hello there", "stop": [by_text["choices"][0]["text"].split()[2]]}
    stopped = (await http(url, "POST", "/v1/completions", stop)).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop["stop"][0]
    assert by_text["choices"][0]["text"].startswith(stopped["text"])


# -- errors and other routes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        (
            "/v1/chat/completions",
            {**CHAT, "model": "nope"},
            404,
            "The model `nope` does not exist.",
        ),
        ("/v1/chat/completions", b"{not json", 400, ""),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens must be at least 1"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {}}, 400, "stream=True"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n must be at least 1"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": 1}]}, 400, "role"),
        ("/v1/completions", {"prompt": [7] * 40000}, 400, "maximum context length is 32768"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 32768}, 400, "'max_tokens'"),
        ("/v1/completions", {"prompt": [99999999]}, 400, "out of vocabulary"),
        ("/v1/completions", {"prompt": ""}, 400, "must be provided and non-empty"),
        ("/v1/completions", {"prompt": [[]]}, 400, "cannot be empty"),
        ("/v1/chat/completions", {**CHAT, "continue_final_message": True}, 400, "Cannot set both"),
        ("/detokenize", {"tokens": [1, 99999999]}, 400, "out of vocabulary"),
        ("/tokenize", {"model": MODEL}, 400, "prompt or messages"),
    ],
)
async def test_validation_errors_are_vllm_shaped(
    sim: tuple[SimWorker, str], path: str, body: Any, status: int, needle: str
) -> None:
    _, url = sim
    r = await http(url, "POST", path, body, {"x-request-id": "bad-1"})
    assert r.status == status and r.headers["x-request-id"] == "bad-1"
    err = r.json()["error"]
    assert err["code"] == status and needle in err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    if status == 404:
        assert err["param"] == "model"


async def test_models_health_metrics_and_unknown_routes(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    await http(url, "POST", "/v1/chat/completions", CHAT)
    models = (await http(url, "GET", "/v1/models")).json()
    assert models["object"] == "list"
    (m,) = models["data"]
    assert m["id"] == MODEL and m["object"] == "model" and m["owned_by"] == "vllm"
    assert m["root"] == MODEL and m["parent"] is None
    assert m["max_model_len"] == SIM_MAX_MODEL_LEN
    health = await http(url, "GET", "/health")
    assert health.status == 200 and health.body == b""
    metrics = await http(url, "GET", "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_sum",
    ):
        assert f'{name}{{model_name="{MODEL}"' in text
    assert 'finished_reason="stop"} 1.0' in text
    assert (await http(url, "GET", "/nope")).status == 404
    assert (await http(url, "GET", "/v1/chat/completions")).status == 405


async def test_api_key(nursery: trio.Nursery) -> None:
    _, url = await start_worker(nursery, api_key="sekrit")
    assert (await http(url, "POST", "/v1/chat/completions", CHAT)).status == 401
    bad = await http(url, "GET", "/v1/models", headers={"authorization": "Bearer nope"})
    assert bad.status == 401
    ok = await http(url, "GET", "/v1/models", headers={"authorization": "Bearer sekrit"})
    assert ok.status == 200
    assert (await http(url, "GET", "/health")).status == 200  # only /v1 is guarded


async def test_sim_stats_records_ids_and_headers(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    hdrs = {"x-request-id": "trace-me", "traceparent": "00-abc-def-01"}
    await http(url, "POST", "/v1/chat/completions", CHAT, hdrs)
    stats = (await http(url, "GET", "/sim/stats")).json()
    assert stats["requests_total"] == 1 and stats["in_flight"] == 0
    assert stats["request_ids"] == ["trace-me"]
    assert stats["last_headers"]["traceparent"] == "00-abc-def-01"
    assert (await http(url, "POST", "/sim/reset")).status == 200
    assert (await http(url, "GET", "/sim/stats")).json()["requests_total"] == 0


# -- cancellation, queueing, faults ---------------------------------------------------------------


async def _open_stream(url: str, body: Any, *, close: bool) -> trio.SocketStream:
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    request = request_bytes(
        url, "POST", "/v1/chat/completions", body, {"x-request-id": "gone"}, close=close
    )
    await stream.send_all(request)
    return stream


async def _receive_until(stream: trio.SocketStream, needle: bytes) -> bytes:
    seen = bytearray()
    while needle not in seen:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        seen += chunk
    return bytes(seen)


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
async def test_client_disconnect_mid_stream_is_recorded(nursery: trio.Nursery, close: bool) -> None:
    # Whether the server notices EOF (and cancels the handler) or the next write fails, the
    # worker must record the abort and release everything the request held.
    worker, url = await start_worker(nursery, speed=10.0)  # ~1 ms per token
    body = {**CHAT, "stream": True, "ignore_eos": True, "max_tokens": 5000}
    with trio.fail_after(5):
        stream = await _open_stream(url, body, close=close)
        seen = await _receive_until(stream, b'"content":" ')
        assert b'"role":"assistant"' in seen
        await stream.aclose()
        while worker.stats.aborted_total == 0:
            await trio.sleep(0.005)
    stats = (await http(url, "GET", "/sim/stats")).json()
    (abort,) = stats["aborted"]
    assert abort["request_id"] == "gone" and 0 < abort["tokens_sent"] < 5000
    assert abort["at_monotonic"] <= time.monotonic()
    assert stats["in_flight"] == 0 and stats["running"] == 0
    assert worker.engine.kv_blocks_in_use == 0


async def test_max_num_seqs_queues_extra_requests(nursery: trio.Nursery) -> None:
    worker, url = await start_worker(nursery, speed=1.0, max_num_seqs=1)
    body = {**CHAT, "ignore_eos": True, "max_tokens": 1000}
    with trio.fail_after(5):
        async with trio.open_nursery() as clients:
            clients.start_soon(http, url, "POST", "/v1/chat/completions", body)
            clients.start_soon(http, url, "POST", "/v1/chat/completions", body)
            while worker.engine.waiting < 1 or worker.engine.running < 1:
                await trio.sleep(0.005)
            text = (await http(url, "GET", "/metrics")).body.decode()
            assert f'vllm:num_requests_waiting{{model_name="{MODEL}",engine="0"}} 1.0' in text
            assert f'vllm:num_requests_running{{model_name="{MODEL}",engine="0"}} 1.0' in text
            assert worker.engine.kv_cache_usage > 0
            clients.cancel_scope.cancel()
        while worker.stats.in_flight:
            await trio.sleep(0.005)
    assert (worker.engine.waiting, worker.engine.running, worker.engine.decoding) == (0, 0, 0)


async def test_timing_model_paces_the_stream(nursery: trio.Nursery) -> None:
    _, url = await start_worker(nursery, speed=20.0)  # 0.4 ms+ per token
    t0 = trio.current_time()
    r = await http(
        url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 40, "ignore_eos": True}
    )
    assert r.json()["usage"]["completion_tokens"] == 40
    assert trio.current_time() - t0 >= 39 * 0.0081 / 20


async def test_faults_at_run_time(nursery: trio.Nursery) -> None:
    worker, url = await start_worker(nursery)
    r = await http(url, "POST", "/sim/faults", {"error_rate": 1.0})
    assert r.status == 200 and r.json()["error_rate"] == 1.0
    err = await http(url, "POST", "/v1/chat/completions", CHAT)
    assert err.status == 500 and err.json()["error"]["type"] == "InternalServerError"
    assert (await http(url, "POST", "/sim/faults", {"bogus": 1})).status == 400
    await http(url, "POST", "/sim/faults", {"error_rate": 0.0, "refuse": True})
    assert (await http(url, "POST", "/v1/chat/completions", CHAT)).status == 503
    assert (await http(url, "GET", "/health")).status == 503
    await http(url, "POST", "/sim/faults", {"refuse": False, "flap_health": True})
    assert [(await http(url, "GET", "/health")).status for _ in range(4)] == [200, 503, 200, 503]
    await http(url, "POST", "/sim/faults", {"flap_health": False, "drop_at_token": 3})
    dropped = await http(url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    assert not dropped.complete and b"[DONE]" not in dropped.body
    assert dropped.body.count(b"data: ") == 4  # the role chunk + 3 tokens
    truncated = await http(url, "POST", "/v1/chat/completions", CHAT)
    assert truncated.status == 200 and not truncated.complete
    with pytest.raises(msgspec.DecodeError):
        truncated.json()
    await http(url, "POST", "/sim/faults", {"drop_at_token": None, "hang": True})
    with trio.move_on_after(0.2) as hung:
        await http(url, "POST", "/v1/chat/completions", CHAT, {"x-request-id": "hung"})
    assert hung.cancelled_caught
    with trio.fail_after(5):
        while worker.stats.aborted_total == 0:
            await trio.sleep(0.005)
    assert worker.stats.aborted[-1]["request_id"] == "hung"
    await http(url, "POST", "/sim/reset")
    assert worker.faults.faults == Faults()
    assert (await http(url, "POST", "/v1/chat/completions", CHAT)).status == 200


async def test_official_openai_client_parses_the_responses(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    openai = pytest.importorskip("openai")

    def run() -> tuple[str, str, Any]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        msgs = CHAT["messages"]
        full = client.chat.completions.create(model=MODEL, messages=msgs)
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return full.choices[0].message.content, streamed, chunks[-1].usage

    full, streamed, usage = await trio.to_thread.run_sync(run)
    assert full == streamed and usage.completion_tokens > 0


# -- processes ------------------------------------------------------------------------------------


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_process_fleet_serves_and_leaves_no_child() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"pd": 2}, model=MODEL, speed=math.inf, task_status=task_status
                )
            )
            endpoints = list(fleet)
            assert [role for role, _ in endpoints] == ["pd", "pd"]
            assert len({url for _, url in endpoints}) == 2
            texts = set()
            for _, url in endpoints:
                r = await http(url, "POST", "/v1/chat/completions", CHAT)
                assert r.status == 200
                texts.add(r.json()["choices"][0]["message"]["content"])
            assert len(texts) == 1  # same seed: same text on every worker
            members = list(fleet.members)
            nursery.cancel_scope.cancel()
    assert all(m.process.returncode == 0 for m in members)  # clean SIGTERM exit
    assert not any(_pid_exists(m.pid) for m in members)


@pytest.mark.slow
async def test_a_fleet_draws_faults_independently_per_worker() -> None:
    """Same answers, but each worker its own fault seed: with error_rate 0.5 the two workers'
    sequences of failures differ (equal by chance once in 65536)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"pd": 2},
                    model=MODEL,
                    speed=math.inf,
                    extra_args=["--error-rate", "0.5"],
                    task_status=task_status,
                )
            )
            draws = []
            for _, url in fleet:
                statuses = [
                    (await http(url, "POST", "/v1/chat/completions", CHAT)).status
                    for _ in range(16)
                ]
                assert set(statuses) <= {200, 500}
                draws.append(statuses)
            assert draws[0] != draws[1]
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_process_crash_fault_and_failed_start() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"pd": 1},
                    model=MODEL,
                    speed=math.inf,
                    extra_args=["--crash-at-token", "2"],
                    task_status=task_status,
                )
            )
            (member,) = fleet.members
            r = await http(member.url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
            assert not r.complete and r.body.count(b"data: ") == 3  # role + 2 tokens
            assert await member.process.wait() == 1
            nursery.cancel_scope.cancel()
        with pytest.raises(FleetError, match="unrecognized arguments: --bogus"):
            await run_fleet({"pd": 1}, model=MODEL, speed=1.0, extra_args=["--bogus"])
    with pytest.raises(ValueError, match="unknown worker role"):
        await run_fleet({"x": 1}, model=MODEL, speed=1.0)


@pytest.mark.slow
async def test_worker_process_exits_zero_on_sigint() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"pd": 1}, model=MODEL, speed=1.0, task_status=task_status
                )
            )
            (member,) = fleet.members
            member.process.send_signal(signal.SIGINT)
            assert await member.process.wait() == 0
            nursery.cancel_scope.cancel()
