"""Resumable answers (lmgw.streams): a generation outlives its client's connection, and the
client picks the answer up at GET /v1/streams/{id} with Last-Event-ID.

Checked end to end against the simulator (real timing, so the answer is still being generated
when the client drops): the resumed events continue exactly where the client stopped, and the
text read in two pieces equals an uninterrupted answer's; a whole (non-streamed) answer is
fetched after the fact; a generation nobody follows is aborted on the worker after grace_s;
DELETE ends one at once; only the key that started an answer can read it; requests without the
header, or past max_streams, are served as before; the event bookkeeping (ids, comments,
dropping the oldest past max_bytes) in isolation.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from gateway_support import MODEL, open_stream, parse_response, request_bytes

from lmgw.config import StreamsConfig
from lmgw.streams import StreamEntry, split_events

BOUND = 20.0
RESUMABLE = {"x-lmgw-resumable": "1"}


def body(stream: bool = True, max_tokens: int = 40) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about routers."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "seed": 7,
        "stream": stream,
    }


def events(payload: bytes) -> list[tuple[int | None, Any]]:
    """(id, decoded data) of each SSE event ("[DONE]" as is)."""
    out: list[tuple[int | None, Any]] = []
    for block in payload.split(b"\n\n"):
        if not block.strip():
            continue
        eid, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                eid = int(line[4:])
            elif line.startswith(b"data: "):
                raw = line[6:]
                data = "[DONE]" if raw == b"[DONE]" else msgspec.json.decode(raw)
        if data is not None:
            out.append((eid, data))
    return out


def text_of(evs: list[tuple[int | None, Any]]) -> str:
    return "".join(
        (d["choices"][0]["delta"].get("content") or "")
        for _, d in evs
        if isinstance(d, dict) and d.get("choices")
    )


async def partial_read(
    url: str, n_events: int, payload: dict[str, Any] | None = None, **headers: str
) -> tuple[Any, bytes]:
    """Start a resumable stream, read until ``n_events`` data events came, then drop the
    connection: (the response head, the body read so far)."""
    stream = await open_stream(url)
    raw = bytearray()
    payload = body() if payload is None else payload
    with trio.fail_after(BOUND):
        await stream.send_all(
            request_bytes(url, "POST", "/v1/chat/completions", payload, {**RESUMABLE, **headers})
        )
        while True:
            raw += await stream.receive_some(65536)
            if b"\r\n\r\n" in raw:
                resp = parse_response(bytes(raw))
                if len(events(resp.body)) >= n_events:
                    break
    await stream.aclose()
    return resp, resp.body


async def get(url: str, path: str, method: str = "GET", **headers: str) -> Any:
    stream = await open_stream(url)
    raw = bytearray()
    with trio.fail_after(BOUND):
        async with stream:
            await stream.send_all(request_bytes(url, method, path, None, headers))
            while chunk := await stream.receive_some(65536):
                raw += chunk
    return parse_response(bytes(raw))


async def resumable_gateway(
    nursery: trio.Nursery, sim_worker: Any, server: str = "native", **streams: Any
) -> Any:
    from lmgw.config import (
        GatewayConfig,
        HealthConfig,
        ServerConfig,
        WorkerConfig,
    )
    from lmgw.gateway import Gateway

    sim = await sim_worker(speed=1.0)
    cfg = GatewayConfig(
        server=ServerConfig(port=0, server=server),  # type: ignore[arg-type]
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        streams=StreamsConfig(resumable=True, **streams),
        workers=[WorkerConfig(url=sim.url, role="pd", id="w0")],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw, sim


@pytest.mark.parametrize("server", ["native", "hypercorn"])
async def test_a_dropped_stream_resumes_where_it_stopped(
    nursery: trio.Nursery, sim_worker: Any, server: str
) -> None:
    gw, sim = await resumable_gateway(nursery, sim_worker, server)
    first_resp, first = await partial_read(gw.url, 5)
    token = first_resp.headers["x-lmgw-stream-id"]
    got = events(first)
    assert [i for i, _ in got] == list(range(len(got)))  # ids from 0, in order
    last = got[-1][0]
    assert last is not None
    rest = await get(gw.url, f"/v1/streams/{token}", **{"last-event-id": str(last)})
    assert rest.status == 200 and rest.headers["x-lmgw-stream-id"] == token
    assert rest.headers["content-type"].startswith("text/event-stream")
    more = events(rest.body)
    assert more[0][0] == last + 1 and more[-1] == (more[-1][0], "[DONE]")
    # the two pieces are the uninterrupted answer
    stream = await open_stream(gw.url)
    async with stream:
        await stream.send_all(request_bytes(gw.url, "POST", "/v1/chat/completions", body()))
        raw = bytearray()
        with trio.fail_after(BOUND):
            while chunk := await stream.receive_some(65536):
                raw += chunk
    plain = parse_response(bytes(raw))
    assert "x-lmgw-stream-id" not in plain.headers  # no header, no resumption
    assert text_of(got) + text_of(more) == text_of(events(plain.body))
    # a second reader from the start gets everything again (kept for retain_s)
    again = await get(gw.url, f"/v1/streams/{token}")
    assert text_of(events(again.body)) == text_of(events(plain.body))
    assert (await sim.stats())["aborted_total"] == 0


async def test_a_whole_answer_is_fetched_after_the_client_left(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    gw, _ = await resumable_gateway(nursery, sim_worker)
    stream = await open_stream(gw.url)
    await stream.send_all(
        request_bytes(gw.url, "POST", "/v1/chat/completions", body(stream=False), RESUMABLE)
    )
    with trio.fail_after(BOUND):  # the gateway has the request (a loaded box may take a while)
        while not gw.streams.entries:
            await trio.sleep(0.01)
    await stream.aclose()  # gone before the answer: no head came, so no id either
    (token,) = gw.streams.entries
    r = await get(gw.url, f"/v1/streams/{token}")
    assert r.status == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 40


async def test_nobody_following_aborts_after_grace_and_delete_ends_at_once(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    gw, sim = await resumable_gateway(nursery, sim_worker, grace_s=0.2)
    resp, _ = await partial_read(gw.url, 2)
    with trio.fail_after(BOUND):
        while (await sim.stats())["aborted_total"] < 1:  # the worker saw the abort
            await trio.sleep(0.05)
    token = resp.headers["x-lmgw-stream-id"]
    r = await get(gw.url, f"/v1/streams/{token}")  # what was made before is still there
    assert r.status == 200 and events(r.body)[-1][1] != "[DONE]"
    # DELETE: ends a running one without waiting for the grace
    resp, _ = await partial_read(gw.url, 1)
    token = resp.headers["x-lmgw-stream-id"]
    r = await get(gw.url, f"/v1/streams/{token}", "DELETE")
    assert r.status == 200 and r.json()["cancelled"] is True
    with trio.fail_after(BOUND):
        while (await sim.stats())["aborted_total"] < 2:
            await trio.sleep(0.02)
    assert (await get(gw.url, "/v1/streams/nope")).status == 404
    bad = await get(gw.url, f"/v1/streams/{token}", **{"last-event-id": "x"})
    assert bad.status == 400


async def test_only_the_starting_key_reads_it_and_limits_hold(
    nursery: trio.Nursery, sim_worker: Any, tmp_path: Any
) -> None:
    from lmgw.config import AuthConfig, GatewayConfig, HealthConfig, ServerConfig, WorkerConfig
    from lmgw.gateway import Gateway

    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "a"\nkey = "sk-aaaaaaaaaaaaaaaaaaaa"\n\n'
        '[[keys]]\nname = "b"\nkey = "sk-bbbbbbbbbbbbbbbbbbbb"\n'
    )
    sim = await sim_worker(speed=1.0)
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        streams=StreamsConfig(resumable=True, max_streams=1),
        auth=AuthConfig(keys_file=str(keys)),
        workers=[WorkerConfig(url=sim.url, role="pd", id="w0")],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    resp, _ = await partial_read(gw.url, 1, authorization="Bearer sk-aaaaaaaaaaaaaaaaaaaa")
    token = resp.headers["x-lmgw-stream-id"]
    assert (
        await get(gw.url, f"/v1/streams/{token}", authorization="Bearer sk-bbbbbbbbbbbbbbbbbbbb")
    ).status == 404
    r = await get(gw.url, f"/v1/streams/{token}", authorization="Bearer sk-aaaaaaaaaaaaaaaaaaaa")
    assert r.status == 200 and events(r.body)[-1][1] == "[DONE]"
    # max_streams = 1 and that one is retained: the next is served, without resumption
    resp, _ = await partial_read(gw.url, 1, authorization="Bearer sk-aaaaaaaaaaaaaaaaaaaa")
    assert "x-lmgw-stream-id" not in resp.headers
    metrics = (
        await get(gw.url, "/metrics", authorization="Bearer sk-aaaaaaaaaaaaaaaaaaaa")
    ).body.decode()
    assert 'lmgw_resumable_streams{state="finished"} 1' in metrics
    assert 'lmgw_stream_resumes_total{outcome="resumed"} 1' in metrics


def test_event_bookkeeping() -> None:
    assert split_events(b"", b"data: a\n\nda") == ([b"data: a\n\n"], b"da")
    assert split_events(b"da", b"ta: b\n\n: ka\n\n") == ([b"data: b\n\n", b": ka\n\n"], b"")
    e = StreamEntry("t", None)
    e.add(b"data: 0\n\n: keep\n\ndata: 1\n\ndata: 2\n\n", 1 << 20)
    assert e.blocks(0) == b"id: 0\ndata: 0\n\n: keep\n\nid: 1\ndata: 1\n\nid: 2\ndata: 2\n\n"
    assert e.position_after(-1) == 0 and e.position_after(0) == 1  # the comment after 0
    assert e.blocks(e.position_after(1)) == b"id: 2\ndata: 2\n\n"
    assert e.blocks(e.position_after(2)) == b""
    e.add(b"data: " + b"x" * 40 + b"\n\n", 60)  # past max_bytes: the oldest go
    assert e.first_seq == 3 and e.position_after(1) is None and e.blocks(0) is None
    assert e.blocks(e.position_after(2)).startswith(b"id: 3\n")


async def cutting_proxy(nursery: trio.Nursery, target: str, cut_after: int) -> str:
    """A TCP forwarder to ``target`` whose first connection is cut after ``cut_after`` bytes
    of answer (mid-event, mid-chunk): a flaky network between a client and the gateway."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    cuts = [cut_after]

    async def handle(client: trio.SocketStream) -> None:
        cut = cuts.pop() if cuts else None
        try:
            upstream = await open_stream(target)
            async with client, upstream, trio.open_nursery() as nursery:

                async def forward() -> None:
                    while data := await client.receive_some(65536):
                        await upstream.send_all(data)

                nursery.start_soon(forward)
                sent = 0
                while data := await upstream.receive_some(65536):
                    if cut is not None and sent + len(data) >= cut:
                        await client.send_all(data[: cut - sent])
                        break
                    await client.send_all(data)
                    sent += len(data)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"http://127.0.0.1:{port}"


async def sdk_text(url: str, resumable: bool = False) -> list[str]:
    """The content deltas of the test's chat through the SDK's stream."""
    from lmgw.sdk import Client
    from lmgw.sdk.types import ContentDelta

    params = {k: v for k, v in body().items() if k not in ("messages", "stream", "model")}
    async with Client(url) as client:
        return [
            e.text
            async for e in client.chat_stream(
                model=MODEL, messages=body()["messages"], resumable=resumable, **params
            )
            if isinstance(e, ContentDelta)
        ]


async def test_the_sdk_resumes_a_broken_stream_by_itself(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    from lmgw.sdk.errors import APIConnectionError

    gw, _ = await resumable_gateway(nursery, sim_worker)
    whole = await sdk_text(gw.url)
    flaky = await cutting_proxy(nursery, gw.url, cut_after=1500)
    assert await sdk_text(flaky, resumable=True) == whole  # no gap, no repeat
    metrics = (await get(gw.url, "/metrics")).body.decode()
    assert 'lmgw_stream_resumes_total{outcome="resumed"} 1' in metrics  # the one resume
    # without resumable, the same cut is the caller's error
    flaky = await cutting_proxy(nursery, gw.url, cut_after=1500)
    with pytest.raises(APIConnectionError):
        await sdk_text(flaky)


async def test_a_retry_with_the_same_idempotency_key_follows_the_first_answer(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """A client that retries a request (the same Idempotency-Key, path and body) gets the
    answer already generating, from its Last-Event-ID: the worker generates once."""
    gw, sim = await resumable_gateway(nursery, sim_worker)
    key = {"idempotency-key": "retry-1"}
    _, first = await partial_read(gw.url, 3, **key)
    got = events(first)
    last = got[-1][0]
    stream = await open_stream(gw.url)
    raw = bytearray()
    with trio.fail_after(BOUND):
        async with stream:
            await stream.send_all(
                request_bytes(
                    gw.url, "POST", "/v1/chat/completions", body(),
                    {**RESUMABLE, **key, "last-event-id": str(last)},
                )
            )  # fmt: skip
            while chunk := await stream.receive_some(65536):
                raw += chunk
    rest = events(parse_response(bytes(raw)).body)
    assert rest[0][0] == last + 1 and rest[-1][1] == "[DONE]"
    stats = await sim.stats()
    assert stats["requests_total"] == 1, stats  # generated once
    # the same key for another request is refused
    stream = await open_stream(gw.url)
    other = body(max_tokens=5)
    raw = bytearray()
    with trio.fail_after(BOUND):
        async with stream:
            await stream.send_all(
                request_bytes(gw.url, "POST", "/v1/chat/completions", other, {**RESUMABLE, **key})
            )
            while chunk := await stream.receive_some(65536):
                raw += chunk
    r = parse_response(bytes(raw))
    assert r.status == 422 and r.json()["error"]["param"] == "idempotency-key"
    metrics = (await get(gw.url, "/metrics")).body.decode()
    assert 'lmgw_stream_resumes_total{outcome="idempotent"} 1' in metrics


async def test_the_sdk_sends_a_request_again_when_it_broke_before_the_answer(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """The connection breaks before any byte of the answer (no stream id known yet): the SDK
    sends the request again with the same Idempotency-Key and follows the one generation."""
    gw, sim = await resumable_gateway(nursery, sim_worker)
    flaky = await cutting_proxy(nursery, gw.url, cut_after=0)
    got = await sdk_text(flaky, resumable=True)
    whole = await sdk_text(gw.url)
    assert got == whole
    assert (await sim.stats())["requests_total"] == 2  # one for the flaky client, one direct


async def test_a_worker_dropping_mid_stream_is_continued_and_resumable(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """A resumable stream whose worker drops the connection mid-answer: the pipeline continues
    it on the other worker (migration) into the same buffer, and a client that left and comes
    back reads the whole answer, equal to an uninterrupted one."""
    from lmgw.config import GatewayConfig, HealthConfig, ServerConfig, UpstreamConfig, WorkerConfig
    from lmgw.gateway import Gateway

    broken = await sim_worker(speed=1.0, faults={"drop_at_token": 10})
    good = await sim_worker(speed=1.0)
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        upstream=UpstreamConfig(migrate_streams=1),
        streams=StreamsConfig(resumable=True),
        workers=[
            WorkerConfig(url=broken.url, role="pd", id="w0"),
            WorkerConfig(url=good.url, role="pd", id="w1"),
        ],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    greedy = {**body(), "temperature": 0.0}  # replayable on another worker: no seed drawn
    del greedy["seed"]
    # round robin: w0 first, which drops at token 10
    resp, _ = await partial_read(gw.url, 2, greedy)
    token = resp.headers["x-lmgw-stream-id"]
    r = await get(gw.url, f"/v1/streams/{token}")
    assert r.status == 200
    evs = events(r.body)
    assert evs[-1][1] == "[DONE]" and [i for i, _ in evs[:-1]] == list(range(len(evs) - 1))
    assert not any(isinstance(d, dict) and "error" in d for _, d in evs), evs[-3:]
    stream = await open_stream(good.url)  # the uninterrupted answer, straight from a worker
    raw = bytearray()
    with trio.fail_after(BOUND):
        async with stream:
            await stream.send_all(request_bytes(good.url, "POST", "/v1/chat/completions", greedy))
            while chunk := await stream.receive_some(65536):
                raw += chunk
    assert text_of(evs) == text_of(events(parse_response(bytes(raw)).body))
    metrics = (await get(gw.url, "/metrics")).body.decode()
    assert 'lmgw_stream_migrations_total{role="pd",outcome="continued"} 1' in metrics
