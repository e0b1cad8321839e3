"""Native (zmq+) workers' plain requests in the compiled lane (lmgw.api.lane_native).

The lane renders and tokenizes the request, sends the Generate on the worker's channel without
a task and writes the answer the channel's reader built. Checked against the same gateway with
``server.compiled_lane = false`` (the trio path): the same answers; the lane counted them
(``lmgw_lane_native_total``); failures before the answer are retried or answered as the trio
path does; a client gone or a deadline passed aborts the request on the worker.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import openai
import pytest
import trio
from gateway_support import MODEL
from test_native_e2e import (
    BOUND,
    PROMPT,
    TEXT_ONLY,
    Recording,
    chat,
    complete,
    gateway_config,
    raw_chat,
    run,
    start_gateway,
    start_worker,
)

from lmgw.config import LimitsConfig, ServerConfig
from lmgw.simulators import WorkerOptions
from lmgw.simulators.faults import Faults
from lmgw.worker import WorkerServer

pytestmark = pytest.mark.usefixtures("hard_deadline")


def config(
    workers: list[tuple[str, str]], *, lane: bool = True, flow: str = "pd", **kw: Any
) -> Any:
    limits = kw.pop("limits", None)
    cfg = gateway_config(workers, flow, **kw)
    cfg = msgspec.structs.replace(cfg, server=ServerConfig(port=0, compiled_lane=lane))
    if limits is not None:
        cfg = msgspec.structs.replace(cfg, limits=LimitsConfig(**limits))
    return cfg


def native_answers(gw: Any) -> int:
    lane = gw.server.lane
    return lane.app.native.answered if lane is not None else 0


def declined(gw: Any, reason: str) -> int:
    return gw.server.lane.app.declined[reason]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)


def shown(answer: tuple) -> tuple:
    """An answer without its cached-token count (the worker's prefix cache warms up)."""
    text, usage = answer[0], answer[1]
    return text, usage.prompt_tokens, usage.completion_tokens, *answer[2:]


async def same_answers(url: str, other: str, streams: tuple[bool, ...] = (False, True)) -> None:
    """A chat and a completion, whole and streamed (``streams``), answer the same at ``url``
    as at ``other``."""
    for stream in streams:
        got = shown(await run(chat, url, TEXT_ONLY, stream))
        assert got == shown(await run(chat, other, TEXT_ONLY, stream)), stream
        got = shown(await run(complete, url, stream))
        assert got == shown(await run(complete, other, stream)), stream


def logprobs_chat(url: str) -> Any:
    r = client(url).chat.completions.create(
        model=MODEL, messages=TEXT_ONLY, max_tokens=6, seed=3, logprobs=True, top_logprobs=2
    )
    return r.choices[0].message.content, r.choices[0].logprobs.model_dump()


async def test_the_lanes_answers_are_the_trio_paths(nursery: trio.Nursery) -> None:
    _, w = await start_worker(nursery, "pd")
    lane_gw, lane = await start_gateway(nursery, config([("pd", w)]))
    _, trio_url = await start_gateway(nursery, config([("pd", w)], lane=False))
    for url in (lane, trio_url):
        await same_answers(url, trio_url, streams=(False,))
        assert await run(logprobs_chat, url) == await run(logprobs_chat, trio_url)
    assert native_answers(lane_gw) == 3
    await same_answers(lane, trio_url, streams=(True, False))
    assert native_answers(lane_gw) == 7
    # what the lane leaves to the server: n > 1, a bad parameter (the server's 400)
    r = await run(lambda: client(lane).chat.completions.create(
        model=MODEL, messages=TEXT_ONLY, max_tokens=4, n=2, seed=3))  # fmt: skip
    assert len(r.choices) == 2
    with pytest.raises(openai.BadRequestError):
        await run(chat, lane, TEXT_ONLY, False, temperature=-1)
    assert native_answers(lane_gw) == 7
    assert declined(lane_gw, "not_plain") == 1
    metrics = (await run(lambda: client(lane)._client.get(lane + "/metrics"))).text
    assert "lmgw_lane_native_total 7" in metrics


async def test_keep_alive_clients_stay_in_the_lane(nursery: trio.Nursery) -> None:
    """One connection, many requests (the official client's pool): every answer the lane's."""
    _, w = await start_worker(nursery, "pd")
    gw, url = await start_gateway(nursery, config([("pd", w)]))
    c = client(url)

    def several() -> list[str]:
        return [
            c.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=4).choices[0].text
            for i in range(6)
        ]

    assert len(await run(several)) == 6
    relay = gw.server.lane.relay
    assert native_answers(gw) == 6 and relay.demoted == 0 and relay.clients == 1


async def test_a_refused_generate_is_retried_on_another_worker(nursery: trio.Nursery) -> None:
    """A worker that refuses every Generate ``overloaded`` (not started: another may take it)."""
    w_full = "zmq+" + (await nursery.start(full_worker("pd").run)).endpoint
    _, w_good = await start_worker(nursery, "pd")
    gw, url = await start_gateway(nursery, config([("pd", w_full), ("pd", w_good)]))
    _, trio_url = await start_gateway(nursery, config([("pd", w_good)], lane=False))
    expected = shown(await run(chat, trio_url, TEXT_ONLY, False))
    for _ in range(4):  # round robin: the full worker is picked first every other time
        assert shown(await run(chat, url, TEXT_ONLY, False)) == expected
    retried = gw.metrics.retries.values.get(("pd",), 0)
    assert retried >= 1
    assert native_answers(gw) == 4 - retried  # the retries were the server's


async def test_an_engine_error_is_a_502_naming_the_stage(nursery: trio.Nursery) -> None:
    """Started work that failed is not run twice (as on the trio path)."""
    bad, w_bad = await start_worker(nursery, "pd", faults=Faults(error_rate=1.0))
    _, w_good = await start_worker(nursery, "pd")
    gw, url = await start_gateway(nursery, config([("pd", w_bad), ("pd", w_good)]))
    with pytest.raises(openai.APIStatusError) as info:
        await run(chat, url, TEXT_ONLY, False)
    assert info.value.status_code == 502
    assert "merged stage failed: worker pd0: engine_error" in str(info.value)
    assert bad.counters["errors_injected"] == 1
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_no_worker_left_is_a_502_naming_the_stage(nursery: trio.Nursery) -> None:
    _, w = await start_worker(nursery, "pd", faults=Faults(error_rate=1.0))
    _, url = await start_gateway(nursery, config([("pd", w)]))
    with pytest.raises(openai.APIStatusError) as info:
        await run(chat, url, TEXT_ONLY, False)
    assert info.value.status_code == 502
    assert "merged stage failed" in str(info.value)


async def read_answer(stream: trio.SocketStream) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + int(
        got.lower().split(b"content-length: ")[1].split(b"\r\n")[0]
    ):
        more = await stream.receive_some(65536)
        if not more:
            break
        got += more
    return got


async def test_a_client_gone_aborts_the_request_on_the_worker(nursery: trio.Nursery) -> None:
    engine, w = await start_worker(nursery, "pd", speed=1.0)
    gw, url = await start_gateway(nursery, config([("pd", w)]))
    with trio.fail_after(BOUND):
        stream = await raw_chat(url, "gone-1")
        while engine.run_of("gone-1") is None:  # the worker has it
            await trio.sleep(0.005)
        await stream.aclose()
        while "gone-1" not in engine.abort_at:
            await trio.sleep(0.005)
        while gw.server.lane.relay.in_flight:
            await trio.sleep(0.005)
    assert engine.run_of("gone-1").state == "cut"
    assert gw.metrics.disconnects.values.get(("chat",), 0) == 1
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_no_answer_in_time_is_a_504_and_an_abort(nursery: trio.Nursery) -> None:
    engine, w = await start_worker(nursery, "pd", speed=1.0)
    gw, url = await start_gateway(
        nursery, config([("pd", w)], upstream={"response_timeout_s": 0.3})
    )
    with trio.fail_after(BOUND):
        stream = await raw_chat(url, "slow-1")
        answer = await read_answer(stream)
        while "slow-1" not in engine.abort_at:
            await trio.sleep(0.005)
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
    assert b"merged stage failed" in answer and b"timeout" in answer
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_the_request_deadline_is_a_504_and_an_abort(nursery: trio.Nursery) -> None:
    engine, w = await start_worker(nursery, "pd", speed=1.0)
    gw, url = await start_gateway(nursery, config([("pd", w)], limits={"request_timeout_s": 0.3}))
    with trio.fail_after(BOUND):
        stream = await raw_chat(url, "late-1")
        answer = await read_answer(stream)
        while "late-1" not in engine.abort_at:
            await trio.sleep(0.005)
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
    assert b"deadline" in answer  # (the gateway's, or the worker's: it was sent the time left)
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_requests_that_waited_for_a_slot_go_on_in_the_lane(nursery: trio.Nursery) -> None:
    """max_concurrent_requests = 1: the others wait parked in the lane, then their Generate
    leaves and they wait parked again for its answer."""
    _, w = await start_worker(nursery, "pd")
    gw, url = await start_gateway(
        nursery, config([("pd", w)], limits={"max_concurrent_requests": 1})
    )
    _, trio_url = await start_gateway(nursery, config([("pd", w)], lane=False))
    expected = shown(await run(chat, trio_url, TEXT_ONLY, False))
    results: list[Any] = []

    async def one() -> None:
        results.append(shown(await run(chat, url, TEXT_ONLY, False)))

    async with trio.open_nursery() as inner:
        for _ in range(6):
            inner.start_soon(one)
    assert results == [expected] * 6
    assert native_answers(gw) == 6
    assert gw.pipeline.registry.get("pd0").in_flight == 0


def stream_chat(url: str, max_tokens: int = 30) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of a streamed chat, the official client's way."""
    parts: list[str] = []
    finish = usage = None
    for chunk in client(url).chat.completions.create(
        model=MODEL, messages=TEXT_ONLY, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish, usage


@pytest.mark.parametrize("migrate", [1, 0])
async def test_a_stream_that_breaks_is_continued_or_ends_with_an_error_event(
    nursery: trio.Nursery, migrate: int
) -> None:
    """A worker failing after 4 tokens: the stream goes on on the other worker (one stream,
    to the token budget), or ends with an error event after what the client got."""
    _, w_bad = await start_worker(nursery, "pd", faults=Faults(crash_at_token=4))
    _, w_good = await start_worker(nursery, "pd")
    gw, url = await start_gateway(
        nursery, config([("pd", w_bad), ("pd", w_good)], upstream={"migrate_streams": migrate})
    )
    _, trio_url = await start_gateway(nursery, config([("pd", w_good)], lane=False))
    full, _, _ = await run(stream_chat, trio_url)
    if migrate:
        for _ in range(2):  # round robin: one of them starts on the failing worker
            text, finish, usage = await run(stream_chat, url)
            assert finish == "length" and usage.completion_tokens == 30
            assert text.startswith(full[:8])
        assert gw.metrics.migrations.values.get(("pd", "continued")) == 1
    else:
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(await run(stream_chat, url))
            except openai.APIError as exc:
                outcomes.append(exc)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert len(errors) == 1 and "not continued" in str(errors[0]), outcomes
    assert native_answers(gw) == 1  # the healthy worker's stream; the other, the server's
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_a_stream_that_stalls_is_continued_elsewhere(nursery: trio.Nursery) -> None:
    """upstream.stream_stall_timeout_s: nothing for that long mid-stream breaks the stream (the
    stalled worker gets an ABORT) and it goes on on the other worker."""
    slow, w_slow = await start_worker(nursery, "pd", speed=0.05)  # ~160 ms per token
    _, w_good = await start_worker(nursery, "pd")
    gw, url = await start_gateway(
        nursery,
        config([("pd", w_slow), ("pd", w_good)],
               upstream={"stream_stall_timeout_s": 0.05, "response_timeout_s": 5.0}),
    )  # fmt: skip
    for _ in range(2):  # round robin: one starts on the slow worker
        _, finish, usage = await run(stream_chat, url, 12)
        assert finish == "length" and usage.completion_tokens == 12
    assert gw.metrics.migrations.values.get(("pd", "continued")) == 1
    with trio.fail_after(BOUND):
        while not slow.abort_at:
            await trio.sleep(0.005)


async def test_a_stream_client_gone_aborts_on_the_worker(nursery: trio.Nursery) -> None:
    engine, w = await start_worker(nursery, "pd", speed=1.0)
    gw, url = await start_gateway(nursery, config([("pd", w)]))
    with trio.fail_after(BOUND):
        stream = await raw_chat(url, "sgone", stream=True)
        got = b""
        while got.count(b'"content"') < 4:
            got += await stream.receive_some(65536)
        assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
        await stream.aclose()
        while "sgone" not in engine.abort_at:
            await trio.sleep(0.005)
        while gw.server.lane.relay.in_flight:
            await trio.sleep(0.005)
    run_ = engine.run_of("sgone")
    assert run_ is not None and run_.state == "cut"
    assert gw.metrics.disconnects.values.get(("chat",), 0) == 1
    assert gw.pipeline.registry.get("pd0").in_flight == 0


async def test_streams_wait_for_a_slot_with_keep_alives(nursery: trio.Nursery) -> None:
    """max_concurrent_requests = 1 and SSE keep-alives: parked streams get comments, then their
    events, each stream whole."""
    _, w = await start_worker(nursery, "pd", speed=2.0)
    gw, url = await start_gateway(
        nursery,
        config([("pd", w)], limits={"max_concurrent_requests": 1, "sse_keepalive_s": 0.02}),
    )
    results: list[Any] = []

    async def one() -> None:
        results.append(await run(stream_chat, url, 10))

    async with trio.open_nursery() as inner:
        for _ in range(4):
            inner.start_soon(one)
    assert [(finish, usage.completion_tokens) for _, finish, usage in results] == [
        ("length", 10)
    ] * 4
    assert len({text for text, _, _ in results}) == 1
    assert native_answers(gw) == 4
    assert gw.metrics.keepalives.values.get((), 0) > 0


@pytest.mark.parametrize("lane", [True, False])
async def test_a_session_stays_on_its_worker(nursery: trio.Nursery, lane: bool) -> None:
    """consistent_hash on ``X-Session-Id`` (and ``user``): a native model's requests carry
    the session key to the policy, on the lane and on the trio path alike."""
    engines = [await start_worker(nursery, "pd") for _ in range(3)]
    cfg = config([("pd", w) for _, w in engines], lane=lane)
    cfg = msgspec.structs.replace(
        cfg, routing=msgspec.structs.replace(cfg.routing, policy="consistent_hash")
    )
    gw, url = await start_gateway(nursery, cfg)

    def served_by(session: str) -> set[int]:
        seen = set()
        for i in range(4):
            before = [len(e.stage_tensors) for e, _ in engines]  # (one per Generate)
            client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"turn {i}"}], max_tokens=2,
                extra_headers={"x-session-id": session},
            )  # fmt: skip
            after = [len(e.stage_tensors) for e, _ in engines]
            seen |= {k for k in range(3) if after[k] != before[k]}
        return seen

    for session in ("alice", "bob", "carol", "dave"):
        assert len(await run(served_by, session)) == 1, session
    assert native_answers(gw) == (16 if lane else 0)


def full_worker(role: str) -> WorkerServer:
    """A worker that refuses every request ``overloaded`` (not started: another may take it)."""
    server = WorkerServer(
        Recording(WorkerOptions(role=role, model=MODEL, speed=math.inf)),
        bind="tcp://127.0.0.1:0", control_bind=None,
    )  # fmt: skip
    server.max_inflight = 0
    return server


async def test_pd_requests_in_the_lane_answer_as_the_trio_path(nursery: trio.Nursery) -> None:
    """p/d: the prefill leg, then the decode leg near it with the hand-off, both sent by the
    lane; the answer carries the prefill's Server-Timing, as on the trio path."""
    pe, p = await start_worker(nursery, "p")
    _, d1 = await start_worker(nursery, "d")
    _, d2 = await start_worker(nursery, "d")
    workers = [("p", p), ("d", d1), ("d", d2)]
    gw, url = await start_gateway(nursery, config(workers, flow="p/d"))
    _, trio_url = await start_gateway(nursery, config(workers, flow="p/d", lane=False))
    await same_answers(url, trio_url)
    assert native_answers(gw) == 4
    assert len(pe.stage_tensors) == 8  # one prefill per request, on each gateway
    r = await run(lambda: client(url).chat.completions.with_raw_response.create(
        model=MODEL, messages=TEXT_ONLY, max_tokens=4))  # fmt: skip
    assert "prefill" in r.headers.get("server-timing", "")
    assert gw.pipeline.registry.get("p0").in_flight == 0


async def test_a_refused_prefill_or_decode_goes_on_elsewhere(nursery: trio.Nursery) -> None:
    """The lane's prefill leg refused: the server's next attempt on the other prefill worker,
    then the decode. Its decode leg refused: the next decode worker with the same hand-off
    (refused: not started, so the KV is still there), no second prefill."""
    full_p, full_d = full_worker("p"), full_worker("d")
    p_bad = "zmq+" + (await nursery.start(full_p.run)).endpoint
    d_bad = "zmq+" + (await nursery.start(full_d.run)).endpoint
    pe, p_good = await start_worker(nursery, "p")
    _, d_good = await start_worker(nursery, "d")
    workers = [("p", p_bad), ("p", p_good), ("d", d_bad), ("d", d_good)]
    gw, url = await start_gateway(nursery, config(workers, flow="p/d"))
    _, trio_url = await start_gateway(nursery, config([("p", p_good), ("d", d_good)],
                                                      flow="p/d", lane=False))  # fmt: skip
    expected = shown(await run(chat, trio_url, TEXT_ONLY, False))
    pe.stage_tensors.clear()
    for stream in (False, False, True, True):  # round robin: each bad worker is met
        assert shown(await run(chat, url, TEXT_ONLY, stream))[0] == expected[0]
    retries = gw.metrics.retries.values
    assert retries.get(("p",), 0) >= 1 and retries.get(("d",), 0) >= 1
    assert len(pe.stage_tensors) == 4  # no prefill twice
    for wid in ("p0", "p1", "d2", "d3"):
        assert gw.pipeline.registry.get(wid).in_flight == 0


async def test_kv_through_the_gateway_is_decoded_on_the_server(nursery: trio.Nursery) -> None:
    """A prefill whose KV comes back as tensor frames: the lane hands the request, with the
    hand-off, to the server's decode leg (which relays the frames); same answer."""
    _, p = await start_worker(nursery, "p", handoff="gateway")
    de, d = await start_worker(nursery, "d", handoff="gateway")
    gw, url = await start_gateway(nursery, config([("p", p), ("d", d)], flow="p/d"))
    _, trio_url = await start_gateway(nursery, config([("p", p), ("d", d)], flow="p/d",
                                                      lane=False))  # fmt: skip
    for stream in (False, True):
        assert shown(await run(chat, url, TEXT_ONLY, stream)) == shown(
            await run(chat, trio_url, TEXT_ONLY, stream)
        )
    assert native_answers(gw) == 0  # (the decode legs were the server's)
    assert gw.metrics.handoff_bytes.values[("kv", "frames")] > 0
    assert de.counters["kv_blocks_verified"] > 0
