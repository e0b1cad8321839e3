"""The compiled lane in a gateway (server.compiled_lane): which connections it keeps.

Every gateway test already runs on the lane as a third front door (conftest's ``server``); these
check what only the lane has: the connections it serves, hands to the trio server and takes
back, counted by its loop (``gw.gateway.server.lane.relay``).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayFactory,
    RawResponse,
    http_request,
    metric_value,
    open_stream,
    parse_response,
    request_bytes,
)
from test_gateway_api import client_for, in_thread, wait_for_abort

from lmgw.config import HedgingConfig

pytestmark = pytest.mark.usefixtures("hard_deadline")


@pytest.fixture
def server() -> str:
    """The ``gateway`` fixture's front door here: the lane only."""
    return "lane"


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
#: streams hedged after a second: the server's (one worker: no hedge is ever sent)
HEDGING = HedgingConfig(enabled=True, delay_s=1.0)


class KeepAlive:
    """One client connection, requests sent on it one after another."""

    def __init__(self, stream: trio.SocketStream, url: str) -> None:
        self.stream = stream
        self.url = url
        self.buf = b""

    async def ask(
        self, body: Any, split: float = 0.0, path: str = "/v1/chat/completions"
    ) -> RawResponse:
        data = request_bytes(self.url, "POST", path, body, close=False)
        with trio.fail_after(10):
            if split:  # the head first, the body a moment later (as some clients write)
                at = data.index(b"\r\n\r\n") + 4
                await self.stream.send_all(data[:at])
                await trio.sleep(split)
                await self.stream.send_all(data[at:])
            else:
                await self.stream.send_all(data)
            return await self.answer()

    async def answer(self) -> RawResponse:
        """The answer to the one request sent, whole or chunked (a stream)."""
        with trio.fail_after(10):
            while True:
                if b"\r\n\r\n" in self.buf:
                    r = parse_response(self.buf)
                    if r.complete and (
                        "content-length" in r.headers or self.buf.endswith(b"0\r\n\r\n")
                    ):
                        self.buf = b""
                        return r
                chunk = await self.stream.receive_some(65536)
                assert chunk, "connection closed"
                self.buf += chunk

    async def next_answer(self) -> RawResponse:
        """The next answer on the connection, for a request already sent."""
        with trio.fail_after(10):
            while True:
                if b"\r\n\r\n" in self.buf:
                    head, _, rest = self.buf.partition(b"\r\n\r\n")
                    length = next(
                        (int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                         if ln.lower().startswith(b"content-length:")),
                        None,
                    )  # fmt: skip
                    if length is not None and len(rest) >= length:
                        whole = head + b"\r\n\r\n" + rest[:length]
                        self.buf = rest[length:]
                        return parse_response(whole)
                chunk = await self.stream.receive_some(65536)
                assert chunk, "connection closed"
                self.buf += chunk


async def _client(gw: Any) -> KeepAlive:
    return KeepAlive(await open_stream(gw.url), gw.url)


async def test_plain_requests_stay_in_the_lane(gateway: GatewayFactory) -> None:
    gw = await gateway(2)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    for _ in range(5):
        r = await c.ask(CHAT)
        assert r.status == 200 and r.headers["x-request-id"]
    assert relay.served == 5 and relay.demoted == 0 and relay.clients == 1


async def test_an_alias_is_renamed_in_the_lane(gateway: GatewayFactory) -> None:
    """A model alias: the worker gets the canonical name (the simulator knows no other), the
    answer names it too, and the request stays in the lane (the whole body re-encoded once,
    with its other fields)."""
    gw = await gateway(1, models=[MODEL], aliases=["short"])
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    direct = await http_request(gw.sims[0].url, "POST", "/v1/chat/completions", CHAT)
    for body in ({**CHAT, "model": "short"}, {**CHAT, "model": "short", "stream": True}):
        r = await c.ask(body)
        assert r.status == 200, r.body
        if body.get("stream"):
            assert _text(r) == direct.json()["choices"][0]["message"]["content"]
        else:
            assert r.json()["model"] == MODEL
            assert r.json()["choices"] == direct.json()["choices"]
    assert relay.served == 1 and relay.streamed == 1 and relay.demoted == 0


async def test_sglangs_generate_is_the_lanes_too(gateway: GatewayFactory) -> None:
    """SGLang's native ``/generate`` (no model named: the one served), whole and streamed,
    in the lane, the same answers as the worker's own."""
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    body = {"text": "Tell me a story", "sampling_params": {"max_new_tokens": 6}}
    direct = await http_request(gw.sims[0].url, "POST", "/generate", body)
    r = await c.ask(body, path="/generate")
    assert r.status == 200, r.body
    assert r.json()["text"] == direct.json()["text"] and r.headers["x-request-id"]
    r = await c.ask({**body, "stream": True}, path="/generate")
    assert r.status == 200 and r.events()[-1] == "[DONE]"
    assert r.events()[-2]["text"] == direct.json()["text"]  # (SGLang's text: cumulative)
    assert relay.served == 1 and relay.streamed == 1 and relay.demoted == 0
    text = await gw.metrics()
    assert metric_value(text, f'lmgw_requests_total{{endpoint="generate",model="{MODEL}",'
                              'flow="pd",status="200"}') == 2  # fmt: skip


async def test_a_request_in_two_writes_is_still_the_lanes(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    assert (await c.ask(CHAT, split=0.05)).status == 200
    assert relay.served == 1 and relay.demoted == 0


async def test_streams_stay_in_the_lane(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    assert (await c.ask(CHAT)).status == 200
    for _ in range(3):
        streamed = await c.ask({**CHAT, "stream": True})
        assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["x-request-id"]
    assert (await c.ask(CHAT)).status == 200
    assert relay.served == 2 and relay.streamed == 3 and relay.demoted == 0
    assert relay.clients == 1 and relay.in_flight == 0


async def test_a_stream_the_lane_does_not_take_hands_the_connection_over(
    gateway: GatewayFactory,
) -> None:
    """With hedging (the server's relay races the workers), a stream it would hedge is the
    server's, and the connection stays there."""
    gw = await gateway(1, hedging=HEDGING)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    assert (await c.ask(CHAT)).status == 200
    streamed = await c.ask({**CHAT, "stream": True})
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    assert (await c.ask(CHAT)).status == 200  # served by the trio server now
    assert relay.served == 1 and relay.demoted == 1 and relay.clients == 0
    assert gw.gateway.server.active_connections == 1


async def test_with_hedging_the_streams_it_would_not_hedge_stay_in_the_lane(
    gateway: GatewayFactory,
) -> None:
    """Hedging only races short streams, once an adaptive delay has its samples: a long
    prompt's stream stays in the lane; with an adaptive delay, the first ``min_samples``
    streams do, and their first tokens are its samples; then the hedger takes them."""
    fixed = HedgingConfig(enabled=True, delay_s=1.0, max_body_bytes=300)
    gw = await gateway(1, hedging=fixed)
    relay = gw.gateway.server.lane.relay
    long = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x " * 200}]}
    c = await _client(gw)
    for _ in range(2):
        r = await c.ask(long)
        assert r.status == 200 and r.body.endswith(b"data: [DONE]\n\n")
    assert relay.streamed == 2 and relay.demoted == 0
    adaptive = HedgingConfig(enabled=True, min_samples=3, max_body_bytes=300)
    gw = await gateway(1, hedging=adaptive)
    relay = gw.gateway.server.lane.relay
    hedger = gw.gateway.pipeline.hedger
    c = await _client(gw)
    for _ in range(3):
        assert (await c.ask({**CHAT, "stream": True})).status == 200
    assert relay.streamed == 3 and relay.demoted == 0
    assert hedger._delays[MODEL].samples == 3  # the lane's first tokens
    assert (await c.ask({**CHAT, "stream": True})).status == 200
    assert relay.streamed == 3 and relay.demoted == 1  # the hedger's now


def _text(r: RawResponse) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in r.events()[:-1] if e["choices"]
    )


async def test_a_stream_broken_in_the_lane_is_continued_on_the_server(
    gateway: GatewayFactory,
) -> None:
    """A worker drops the stream mid-way: the lane hands the client's connection, its head
    already sent, to a continuation on the server, which finishes the stream on the other
    worker with exactly the unbroken text; the connection comes back to the lane after."""
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 4}}, {}], health_interval_s=300.0)
    relay = gw.gateway.server.lane.relay
    body = {**CHAT, "stream": True, "max_tokens": 40, "stream_options": {"include_usage": True}}
    direct = await http_request(gw.sims[1].url, "POST", "/v1/chat/completions", body)
    c = await _client(gw)
    r = await c.ask(body)  # round robin: the dropping worker first
    events = r.events()
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
    assert _text(r) == _text(direct)
    assert len({e["id"] for e in events[:-1]}) == 1
    assert (
        events[-2]["usage"]["completion_tokens"]
        == direct.events()[-2]["usage"]["completion_tokens"]
    )
    assert relay.demoted == 1 and relay.streamed == 0
    await gw.sims[0].set_faults(drop_at_token=None)
    r = await c.ask(body)  # in the lane again, to its end
    assert _text(r) == _text(direct)
    assert relay.streamed == 1 and relay.demoted == 1
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="pd",outcome="continued"}') == 1
    assert all(w.in_flight == 0 for w in gw.gateway.registry)


async def test_a_stream_broken_in_the_lane_without_migration_ends_with_an_error(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(1, faults={"drop_at_token": 3}, upstream={"migrate_streams": 0})
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    r = await c.ask({**CHAT, "stream": True, "max_tokens": 20})
    events = r.events()
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 502
    assert "worker stream failed" in events[-2]["error"]["message"]
    assert all("error" not in e for e in events[:-2]) and len(events) > 2
    assert relay.demoted == 0 and relay.clients == 1  # the connection stays in the lane
    await gw.sims[0].set_faults(drop_at_token=None)
    assert (await c.ask(CHAT)).status == 200 and relay.served == 1


async def test_the_openai_client_streams_through_the_lane(gateway: GatewayFactory) -> None:
    gw = await gateway(2)
    relay = gw.gateway.server.lane.relay

    def run() -> list[str]:
        client = client_for(gw)
        out = []
        for _ in range(3):
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = list(stream)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
            out.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        return out

    texts = await in_thread(run)
    assert len(set(texts)) == 1 and texts[0]
    assert relay.streamed == 3 and relay.demoted == 0
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_time_to_first_token_seconds_count{model="sim-model"}') == 3
    assert metric_value(text, 'lmgw_time_per_output_token_seconds_count{model="sim-model"}') == 3
    ok = 'lmgw_requests_total{endpoint="chat",model="sim-model",flow="pd",status="200"}'
    assert metric_value(text, ok) == 3


async def test_a_client_gone_mid_stream_in_the_lane_aborts_the_worker(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(1, speed=1.0)
    sim = gw.sims[0].sim
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    stream = await open_stream(gw.url)
    await stream.send_all(
        request_bytes(gw.url, "POST", "/v1/completions", body, {"x-request-id": "lane-gone"})
    )
    got = b""
    with trio.fail_after(5):
        while got.count(b"data:") < 3:
            got += await stream.receive_some(65536)
    await stream.aclose()
    await wait_for_abort(sim, "lane-gone")
    relay = gw.gateway.server.lane.relay
    with trio.fail_after(5):
        while relay.in_flight or gw.gateway.registry.get("w0").in_flight:
            await trio.sleep(0.01)
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_client_disconnects_total{endpoint="completions"}') == 1


async def test_cache_aware_in_the_lane_audits_and_names_its_route(
    gateway: GatewayFactory,
) -> None:
    """cache_aware (text keys) on the lane: whole answers and streams carry ``x-lmgw-route``,
    and the workers' usage reaches the routing audit, as on the server."""
    gw = await gateway(2, routing="cache_aware", routing_options={"route_header": True})
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    long = {**CHAT, "messages": [{"role": "user", "content": "shared words " * 200}]}
    streamed = {**long, "stream": True, "stream_options": {"include_usage": True}}
    reported = 'lmgw_routing_reported_cached_tokens_total{model="sim-model"}'
    seen = []
    for body in (long, long, streamed, streamed):
        r = await c.ask(body)
        assert r.status == 200
        assert "policy=cache_aware" in r.headers["x-lmgw-route"].replace(" ", "")
        seen.append(metric_value(await gw.metrics(), reported))
    assert relay.served == 2 and relay.streamed == 2
    assert relay.demoted == len(seen)  # the scrapes' connections (a GET: the server's)
    # the second answer found the prompt cached, and so did each stream (its usage event)
    assert 0 < seen[1] < seen[2] < seen[3], seen


async def test_cache_aware_on_token_ids_in_the_lane(nursery: trio.Nursery, sim_worker: Any) -> None:
    """A model with the gateway's tokenizer: the lane checks the context (tokenizing inline,
    the segment cache's hits) and routes on the chat-templated token ids; the later requests
    go where the prompt is cached, whole answers and streams alike."""
    from gateway_support import start_tokenized_gateway

    from lmgw.config import WorkerConfig

    sims = [await sim_worker() for _ in range(2)]
    workers = [WorkerConfig(url=s.url, role="pd", id=f"w{i}") for i, s in enumerate(sims)]
    gw = await start_tokenized_gateway(nursery, workers, route_header=True)
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    system = {"role": "system", "content": "You summarise the shared report. " * 40}
    chosen, cached = [], []
    for i in range(4):
        body = {"model": MODEL, "max_tokens": 4,
                "messages": [system, {"role": "user", "content": f"question {i}"}]}  # fmt: skip
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        r = await c.ask(body)
        assert r.status == 200, r.body
        usage = r.events()[-2]["usage"] if i % 2 else r.json()["usage"]
        cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        chosen.append(r.headers["x-lmgw-route"].split("worker=")[1].split(";")[0].strip())
    assert len(set(chosen)) == 1, chosen  # the prompt's holder, every time
    assert all(n > 0 for n in cached[1:]), cached
    assert relay.served == 2 and relay.streamed == 2 and relay.demoted == 0
    # the segment cache: the system turn and the short stretches around the turns (the
    # template's newlines, "assistant\n") hit from the second request on
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    hits = metric_value(text, f'lmgw_tokenizer_segment_cache_hits_total{{model="{MODEL}"}}', None)
    misses = metric_value(
        text, f'lmgw_tokenizer_segment_cache_misses_total{{model="{MODEL}"}}', None
    )
    stats = gw.texts[MODEL].tokenizer.prefix_cache_statistics()
    assert stats is not None and (hits, misses) == (stats.hits, stats.misses)
    assert hits >= 3 * 2 and misses >= 4  # (each new user turn is a miss)
    hit_tokens = f'lmgw_tokenizer_segment_cache_hit_tokens_total{{model="{MODEL}"}}'
    assert metric_value(text, hit_tokens) >= 3 * 40 * 5
    chars = metric_value(text, f'lmgw_tokenizer_segment_cache_chars{{model="{MODEL}"}}')
    assert chars == stats.chars > len(system["content"])
    # every prompt rendered by its shape (system, user), never checked wrong
    renders = 'lmgw_chat_template_renders_total{model="%s",path="%s"}'
    assert metric_value(text, renders % (MODEL, "shape")) >= 4
    assert metric_value(text, renders % (MODEL, "mismatch"), None) == 0
    # the new user turns (plain ASCII) encoded pre-token by pre-token
    words = 'lmgw_tokenizer_word_ids_total{model="%s",path="%s"}'
    assert metric_value(text, words % (MODEL, "words")) >= 4
    assert metric_value(text, words % (MODEL, "mismatch"), None) == 0


async def test_after_a_failover_the_connection_comes_back(gateway: GatewayFactory) -> None:
    """A worker that fails every request: the lane's request is finished by the server
    (retried on the other worker), and the connection returns to the lane for the next one."""
    gw = await gateway(per_worker=[{"faults": {"error_rate": 1.0}}, {}], health_interval_s=300.0)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    r = await c.ask(CHAT)  # round robin: the failing worker first
    assert r.status == 200 and relay.demoted == 1 and relay.served == 0
    await gw.sims[0].set_faults(error_rate=0.0)
    for _ in range(2):
        assert (await c.ask(CHAT)).status == 200
    assert relay.served == 2 and relay.demoted == 1 and relay.clients == 1  # back in the lane


async def test_an_error_answer_is_relayed_by_the_server(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    r = await c.ask({**CHAT, "max_tokens": -1})  # the gateway's own 400: never leaves Python
    assert r.status == 400 and r.headers["content-type"] == "application/json"
    assert relay.demoted == 1
    for _ in range(2):  # one bad request: the connection comes back to the lane after it
        assert (await c.ask(CHAT)).status == 200
    assert relay.served == 2 and relay.demoted == 1 and relay.clients == 1


async def test_a_get_between_chats_leaves_the_connection_in_the_lane(
    gateway: GatewayFactory,
) -> None:
    """A client that lists the models first (the openai client's ``models.list()``), or that
    a probe shares: the GET is the server's, the chats after it the lane's."""
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    for round_ in range(2):
        await c.stream.send_all(request_bytes(gw.url, "GET", "/v1/models", close=False))
        r = await c.next_answer()
        assert r.status == 200 and r.json()["data"][0]["id"] == MODEL
        for _ in range(2):
            assert (await c.ask(CHAT)).status == 200
        assert relay.served == 2 * (round_ + 1) and relay.demoted == round_ + 1
    assert relay.clients == 1
    text = await gw.metrics()  # (its own GET: the server's, the connection given back after)
    assert metric_value(text, "lmgw_lane_returns_total") == 2
    assert metric_value(text, 'lmgw_lane_declined_total{reason="other_route"}') == 3


async def test_the_openai_client_lists_the_models_then_chats_in_the_lane(
    gateway: GatewayFactory,
) -> None:
    """``models.list()`` and then chats on the openai client's pooled connection: the list is
    the server's, the chats after it the lane's."""
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay

    def run() -> list[str]:
        client = client_for(gw)
        ids = [m.id for m in client.models.list()]
        for _ in range(3):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        return ids

    assert await in_thread(run) == [MODEL]
    assert relay.demoted == 1 and relay.served == 3 and relay.clients == 1


async def test_a_client_of_another_post_route_stays_on_the_server(
    gateway: GatewayFactory,
) -> None:
    """A POST the lane does not take is what that client sends every time: the connection
    stays with the server instead of crossing over and back on each request."""
    gw = await gateway(1)
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    body = {"model": MODEL, "prompt": "hi"}
    for _ in range(3):
        assert (await c.ask(body, path="/tokenize")).status == 200
    assert (await c.ask(CHAT)).status == 200  # (the server's too)
    assert relay.demoted == 1 and relay.served == 0 and relay.clients == 0


def _capped(delay: float = 0.2, **limits: Any) -> dict[str, Any]:
    """A gateway that runs one request at a time, on a worker with a ``delay`` per request."""
    return {
        "per_worker": [{"timing": (("a", delay),), "speed": 1.0}],
        "limits": {"max_concurrent_requests": 1, **limits},
    }


async def _in_order(gw: Any, conns: list[KeepAlive], body: Any = CHAT) -> None:
    """Send ``body`` on each of ``conns``: the first runs, the others wait in this order."""
    admission = gw.gateway.app.admission
    data = request_bytes(gw.url, "POST", "/v1/chat/completions", body, close=False)
    with trio.fail_after(5):
        for i, c in enumerate(conns):
            await c.stream.send_all(data)
            while (admission.in_flight, admission.waiting) != (1, i):
                await trio.sleep(0.005)


async def test_requests_wait_for_a_slot_in_the_lane(gateway: GatewayFactory) -> None:
    """One request at a time (limits.max_concurrent_requests): the requests that meet a full
    gateway wait in the admission queue without leaving the lane (no hand-over), and run in
    their turn; the queue's metrics count them as the server's path would."""
    gw = await gateway(**_capped())
    relay = gw.gateway.server.lane.relay
    admission = gw.gateway.app.admission
    conns = [await _client(gw) for _ in range(4)]
    await _in_order(gw, conns)
    assert relay.in_flight == 4  # one upstream, three parked
    for c in conns:
        assert (await c.next_answer()).status == 200
    assert relay.served == 4 and relay.demoted == 0 and relay.in_flight == 0
    assert (admission.in_flight, admission.waiting) == (0, 0)
    for c in conns:  # and on
        assert (await c.ask(CHAT)).status == 200
    assert relay.served == 8 and relay.demoted == 0
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_lane_declined_total{reason="queue"}') == 0
    assert metric_value(text, "lmgw_queue_time_seconds_count") == 8
    assert (
        metric_value(text, 'lmgw_admission_tenant_requests_total{tenant="-",outcome="admitted"}')
        == 3
    )
    ok = 'lmgw_requests_total{endpoint="chat",model="sim-model",flow="pd",status="200"}'
    assert metric_value(text, ok) == 8


async def test_a_wait_longer_than_the_queue_timeout_is_a_429_in_the_lane(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(**_capped(1.0, queue_timeout_s=0.05))
    relay = gw.gateway.server.lane.relay
    first, second = await _client(gw), await _client(gw)
    await _in_order(gw, [first, second])
    r = await second.next_answer()
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1
    assert "no slot freed within 0.05 s" in r.json()["error"]["message"]
    assert (await first.next_answer()).status == 200
    assert (await second.ask(CHAT)).status == 200  # the connection goes on, in the lane
    assert relay.demoted == 0 and relay.served == 2
    admission = gw.gateway.app.admission
    assert (admission.in_flight, admission.waiting) == (0, 0)
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_admission_rejected_total{reason="queue_timeout"}') == 1
    assert (
        metric_value(
            text, 'lmgw_requests_total{endpoint="chat",model="sim-model",flow="pd",status="429"}'
        )
        == 1
    )


async def test_the_requests_deadline_ends_a_wait_with_its_504(gateway: GatewayFactory) -> None:
    """The request's deadline before the queue's timeout: the parked request's 504 (and the
    running one's), the slot and the queue left as they were."""
    gw = await gateway(**_capped(2.0, request_timeout_s=0.3, queue_timeout_s=30))
    first, second = await _client(gw), await _client(gw)
    await _in_order(gw, [first, second])
    r = await second.next_answer()
    assert r.status == 504 and "deadline" in r.json()["error"]["message"]
    assert (await first.next_answer()).status == 504
    admission = gw.gateway.app.admission
    with trio.fail_after(5):
        while admission.in_flight:
            await trio.sleep(0.01)
    assert admission.waiting == 0 and gw.gateway.server.lane.relay.in_flight == 0
    text = await gw.metrics()
    cancelled = 'lmgw_admission_tenant_requests_total{tenant="-",outcome="cancelled"}'
    assert metric_value(text, cancelled) == 1


async def test_a_client_gone_from_the_queue_gives_its_place_back(gateway: GatewayFactory) -> None:
    gw = await gateway(**_capped())
    relay = gw.gateway.server.lane.relay
    admission = gw.gateway.app.admission
    first, gone, third = [await _client(gw) for _ in range(3)]
    await _in_order(gw, [first, gone, third])
    await gone.stream.aclose()
    with trio.fail_after(5):
        while admission.waiting != 1:
            await trio.sleep(0.005)
    assert (await first.next_answer()).status == 200
    assert (await third.next_answer()).status == 200  # it moved up
    assert (admission.in_flight, admission.waiting) == (0, 0) and relay.in_flight == 0
    text = await gw.metrics()
    assert (
        metric_value(text, 'lmgw_admission_tenant_requests_total{tenant="-",outcome="cancelled"}')
        == 1
    )
    assert metric_value(text, 'lmgw_client_disconnects_total{endpoint="chat"}') == 1


async def test_a_waiter_evicted_for_a_higher_priority_gets_its_429(
    gateway: GatewayFactory,
) -> None:
    """A full queue (one place) and a request of higher priority: the fair order gives it the
    place of the one waiting, which gets its 429 in the lane; the newcomer runs next."""
    gw = await gateway(**_capped(queue_size=1))
    first, low, high = [await _client(gw) for _ in range(3)]
    await _in_order(gw, [first, low])
    data = request_bytes(gw.url, "POST", "/v1/chat/completions", {**CHAT, "priority": -5},
                         close=False)  # fmt: skip
    await high.stream.send_all(data)
    r = await low.next_answer()
    assert r.status == 429 and "yielded its place" in r.json()["error"]["message"]
    assert (await first.next_answer()).status == 200
    assert (await high.next_answer()).status == 200
    relay = gw.gateway.server.lane.relay
    assert relay.demoted == 0 and relay.in_flight == 0
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_admission_rejected_total{reason="evicted"}') == 1


async def test_a_stream_waits_in_the_lane_with_keep_alive_comments(
    gateway: GatewayFactory,
) -> None:
    """A stream that meets a full gateway waits in the lane too; while it waits its client
    gets the 200 head and keep-alive comments (limits.sse_keepalive_s), then its events."""
    gw = await gateway(**_capped(0.5, sse_keepalive_s=0.05))
    relay = gw.gateway.server.lane.relay
    first, streamer = await _client(gw), await _client(gw)
    await _in_order(gw, [first])
    streamed = await streamer.ask({**CHAT, "stream": True})  # (waits behind the first)
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    assert streamed.body.count(b": keep-alive") >= 3
    assert (await first.next_answer()).status == 200
    assert (await streamer.ask(CHAT)).status == 200
    assert relay.demoted == 0 and relay.streamed == 1 and relay.served == 2
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_lane_declined_total{reason="queue"}') == 0
    assert metric_value(text, "lmgw_sse_keepalives_total") >= 3


async def test_a_stream_whose_wait_times_out_after_its_head_ends_with_the_429_event(
    gateway: GatewayFactory,
) -> None:
    """Its keep-alive head went out while it waited: the queue's timeout is the stream's
    last event (a 429 error and [DONE]), the connection kept as the head said."""
    gw = await gateway(**_capped(1.0, sse_keepalive_s=0.05, queue_timeout_s=0.3))
    first, streamer = await _client(gw), await _client(gw)
    await _in_order(gw, [first])
    streamed = await streamer.ask({**CHAT, "stream": True})
    assert streamed.status == 200 and b": keep-alive" in streamed.body
    events = [e for e in streamed.body.split(b"\n\n") if e.startswith(b"data:")]
    assert b'"code":429' in events[-2] and events[-1] == b"data: [DONE]"
    assert (await first.next_answer()).status == 200
    assert (await streamer.ask(CHAT)).status == 200  # (the same connection)
    admission = gw.gateway.app.admission
    assert (admission.in_flight, admission.waiting) == (0, 0)


KEY, LIMITED, NARROW, SINGLE, METERED, ONCE = (f"sk-lane-{n}-0123456789abcdef" for n in range(6))


def _keys() -> Any:
    from lmgw.config import ApiKeyConfig, AuthConfig

    return AuthConfig(
        keys=[
            ApiKeyConfig(key=KEY, name="plain"),
            ApiKeyConfig(key=LIMITED, name="limited", requests_per_s=100.0),
            ApiKeyConfig(key=NARROW, name="narrow", models=["other-model"]),
            ApiKeyConfig(key=SINGLE, name="single", max_concurrent=1),
            ApiKeyConfig(key=METERED, name="metered", tokens_per_min=100_000),
            ApiKeyConfig(key=ONCE, name="once", requests_per_s=0.01, burst=1),
        ]
    )


def _chat_bytes(url: str, headers: dict[str, str], body: Any = CHAT) -> bytes:
    """A keep-alive chat request with ``headers`` too."""
    data = request_bytes(url, "POST", "/v1/chat/completions", body, close=False)
    at = data.index(b"\r\n") + 2
    return data[:at] + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + data[at:]


async def _ask_with(c: KeepAlive, body: Any, key: str | None, header: str = "authorization") -> Any:
    headers = {} if key is None else {header: f"Bearer {key}" if header == "authorization" else key}
    await c.stream.send_all(_chat_bytes(c.url, headers, body))
    return await c.next_answer()


async def test_api_keys_are_checked_in_the_lane(gateway: GatewayFactory) -> None:
    """Keyed requests stay in the lane (counted in and out); a missing or wrong key and a
    model the key may not use are the server's, with the same answers as without the lane."""

    gw = await gateway(1, auth=_keys())
    keys = gw.gateway.keys
    relay = gw.gateway.server.lane.relay
    plain = {e.name: e for e in keys.table}["plain"]
    c = await _client(gw)
    for _ in range(3):
        r = await _ask_with(c, CHAT, KEY)
        assert r.status == 200, r.body
    r = await _ask_with(c, CHAT, KEY, header="x-api-key")
    assert r.status == 200 and "x-ratelimit-limit-requests" not in r.headers
    assert relay.served == 4 and relay.demoted == 0
    assert plain.requests == 4 and plain.in_flight == 0
    for key, status, code in (
        (None, 401, "invalid_api_key"),
        ("sk-wrong", 401, "invalid_api_key"),
        (NARROW, 403, "model_not_allowed"),
    ):
        c = await _client(gw)
        r = await _ask_with(c, CHAT, key)
        assert r.status == status and r.json()["error"]["code"] == code, (key, r.body)
    assert relay.served == 4 and relay.demoted == 3
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_auth_rejected_total{reason="missing_key"}') == 1
    assert metric_value(text, 'lmgw_auth_rejected_total{reason="invalid_key"}') == 1
    assert metric_value(text, 'lmgw_auth_rejected_total{reason="model"}') == 1
    assert metric_value(text, 'lmgw_lane_declined_total{reason="key"}') == 2
    assert metric_value(text, 'lmgw_lane_declined_total{reason="error"}') == 1  # the 403
    assert all(e.in_flight == 0 for e in keys.table)


async def test_a_keys_rate_and_token_limits_hold_in_the_lane(gateway: GatewayFactory) -> None:
    """A key with a rate limit: served in the lane with its x-ratelimit-* headers, the next
    request over the limit refused by the server (counted once). A key with a tokens-per-minute
    limit: each answer's usage is charged, and its headers say what is left."""

    gw = await gateway(1, auth=_keys())
    relay = gw.gateway.server.lane.relay
    by_name = {e.name: e for e in gw.gateway.keys.table}
    c = await _client(gw)
    r = await _ask_with(c, CHAT, LIMITED)
    assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "100"
    assert int(r.headers["x-ratelimit-remaining-requests"]) >= 98
    r = await _ask_with(c, CHAT, ONCE)
    assert r.status == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert relay.served == 2 and relay.demoted == 0
    r = await _ask_with(c, CHAT, ONCE)
    assert r.status == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert relay.demoted == 1 and by_name["once"].requests == 1
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_auth_rejected_total{reason="rate"}') == 1
    metered = by_name["metered"]
    c = await _client(gw)
    spent = []
    for _ in range(2):
        r = await _ask_with(c, CHAT, METERED)
        assert r.status == 200, r.body
        spent.append(r.json()["usage"]["total_tokens"])
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert relay.served == 4 and metered.tokens == sum(spent)
    left = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 100_000 - sum(spent) <= left <= 100_000 - spent[0]  # (read as the answer starts)
    assert all(e.in_flight == 0 for e in gw.gateway.keys.table)


async def test_a_metered_keys_streams_are_charged_in_the_lane(gateway: GatewayFactory) -> None:
    """A key with a tokens-per-minute limit streams in the lane: the usage event's tokens are
    charged (a stream without usage: one token per event plus the prompt's estimate)."""
    gw = await gateway(1, auth=_keys())
    relay = gw.gateway.server.lane.relay
    metered = {e.name: e for e in gw.gateway.keys.table}["metered"]
    c = await _client(gw)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {METERED}"}
    await c.stream.send_all(_chat_bytes(c.url, headers, body))
    r = await c.answer()
    assert r.status == 200 and r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert metered.tokens == r.events()[-2]["usage"]["total_tokens"]
    before = metered.tokens
    await c.stream.send_all(_chat_bytes(c.url, headers, {**CHAT, "stream": True}))
    r = await c.answer()  # no usage event
    assert r.status == 200 and metered.tokens > before
    assert relay.streamed == 2 and relay.demoted == 0
    assert all(e.in_flight == 0 for e in gw.gateway.keys.table)


async def test_a_rate_limited_keys_failover_answer_keeps_its_headers(
    gateway: GatewayFactory,
) -> None:
    """A keyed request the server finishes for the lane (a failing worker, then the other)
    still gets its key's headers and its CORS headers, and its usage charged."""
    ui = "https://ui.example.com"
    gw = await gateway(
        per_worker=[{"faults": {"error_rate": 1.0}}, {}], health_interval_s=300.0, auth=_keys(),
        server_options={"cors_allow_origins": [ui]},
    )  # fmt: skip
    relay = gw.gateway.server.lane.relay
    metered = {e.name: e for e in gw.gateway.keys.table}["metered"]
    c = await _client(gw)
    headers = {"origin": ui, "authorization": f"Bearer {METERED}"}
    await c.stream.send_all(_chat_bytes(gw.url, headers))
    r = await c.next_answer()
    assert r.status == 200 and relay.demoted == 1 and relay.served == 0
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert r.headers["access-control-allow-origin"] == ui
    assert metered.tokens == r.json()["usage"]["total_tokens"] and metered.in_flight == 0


async def test_cors_headers_on_the_lanes_answers(gateway: GatewayFactory) -> None:
    """``server.cors_allow_origins``: an allowed Origin's answer is the lane's and carries the
    headers, with a key's limits too; another origin's carries none; a preflight (OPTIONS)
    is the server's."""
    ui = "https://ui.example.com"
    gw = await gateway(1, server_options={"cors_allow_origins": [ui]}, auth=_keys())
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    for origin, key in ((ui, KEY), (ui, LIMITED), ("https://other.example.com", KEY)):
        await c.stream.send_all(
            _chat_bytes(gw.url, {"origin": origin, "authorization": f"Bearer {key}"})
        )
        r = await c.next_answer()
        assert r.status == 200, r.body
        if origin == ui:
            assert r.headers["access-control-allow-origin"] == ui and r.headers["vary"] == "origin"
            assert "x-request-id" in r.headers["access-control-expose-headers"]
        else:
            assert "access-control-allow-origin" not in r.headers
        assert ("x-ratelimit-limit-requests" in r.headers) == (key == LIMITED)
    assert relay.served == 3 and relay.demoted == 0
    r = await gw.request(
        "OPTIONS", "/v1/chat/completions",
        headers={"origin": ui, "access-control-request-method": "POST"},
    )  # fmt: skip
    assert r.status == 204 and r.headers["access-control-allow-origin"] == ui


async def test_connections_per_client_address_in_the_lane(gateway: GatewayFactory) -> None:
    """``limits.max_connections_per_client``: the lane serves the connections within the
    limit; one over it gets the server's 429; a connection counts until it closes, in the lane
    or on the server after a hand-over."""
    gw = await gateway(1, limits={"max_connections_per_client": 2}, hedging=HEDGING)
    server = gw.gateway.server
    relay = server.lane.relay

    async def counted(n: int) -> None:
        with trio.fail_after(5):
            while sum(server._per_client.values()) != n:
                await trio.sleep(0.01)

    a, b = await _client(gw), await _client(gw)
    for c in (a, b):
        assert (await c.ask(CHAT)).status == 200
    assert relay.served == 2 and relay.clients == 2 and server._per_client == {"127.0.0.1": 2}
    extra = await _client(gw)
    await extra.stream.send_all(request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT))
    r = await extra.next_answer()
    assert r.status == 429 and b"too many connections" in r.body
    await a.stream.aclose()  # closed in the lane
    await counted(1)
    c = await _client(gw)
    assert (await c.ask(CHAT)).status == 200 and relay.served == 3
    streamed = await c.ask({**CHAT, "stream": True})  # the server's (hedged): counted
    assert streamed.status == 200 and relay.clients == 1
    await counted(2)
    await c.stream.aclose()  # closed on the server
    await counted(1)
    await b.stream.aclose()
    await counted(0)


async def test_a_connection_back_in_the_lane_is_counted_once(gateway: GatewayFactory) -> None:
    """Handed to the server mid-request (a failover) and back to the lane: one count, given
    back once when it closes."""
    gw = await gateway(
        per_worker=[{"faults": {"error_rate": 1.0}}, {}], health_interval_s=300.0,
        limits={"max_connections_per_client": 1},
    )  # fmt: skip
    server = gw.gateway.server
    relay = server.lane.relay
    c = await _client(gw)
    assert (await c.ask(CHAT)).status == 200 and relay.demoted == 1
    await gw.sims[0].set_faults(error_rate=0.0)
    assert (await c.ask(CHAT)).status == 200 and relay.served == 1 and relay.clients == 1
    assert server._per_client == {"127.0.0.1": 1}
    await c.stream.aclose()
    with trio.fail_after(5):
        while server._per_client:
            await trio.sleep(0.01)
    c = await _client(gw)  # the one allowed connection is free again
    assert (await c.ask(CHAT)).status == 200 and server._per_client == {"127.0.0.1": 1}


async def test_resumable_answers_leave_the_rest_in_the_lane(gateway: GatewayFactory) -> None:
    """``streams.resumable``: a request that asks for a resumable answer is the server's (it
    gets its stream id); the others stay in the lane. Coalescing, which may take any
    deterministic request, keeps the lane off."""
    from lmgw.config import StreamsConfig

    gw = await gateway(1, streams=StreamsConfig(resumable=True))
    relay = gw.gateway.server.lane.relay
    c = await _client(gw)
    assert (await c.ask(CHAT)).status == 200 and relay.served == 1
    await c.stream.send_all(_chat_bytes(gw.url, {"x-lmgw-resumable": "1"}))
    r = await c.next_answer()
    assert r.status == 200 and r.headers["x-lmgw-stream-id"] and relay.demoted == 1
    off = await gateway(1, streams=StreamsConfig(resumable=True, coalesce=True))
    assert off.gateway.server.lane is None


async def test_a_keys_concurrency_cap_holds_in_the_lane(gateway: GatewayFactory) -> None:
    """``max_concurrent = 1``: a second request while the first is in the lane is refused
    (429, by the server); the key counts one in flight until the first answer."""
    gw = await gateway(per_worker=[{"timing": (("a", 0.3),), "speed": 1.0}], auth=_keys())
    single = {e.name: e for e in gw.gateway.keys.table}["single"]
    first, second = await _client(gw), await _client(gw)
    await first.stream.send_all(_chat_bytes(gw.url, {"authorization": f"Bearer {SINGLE}"}))
    with trio.fail_after(5):
        while single.in_flight == 0:
            await trio.sleep(0.01)
    r = await _ask_with(second, CHAT, SINGLE)
    assert r.status == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.body
    assert (await first.next_answer()).status == 200
    assert single.in_flight == 0
    assert (await _ask_with(second, CHAT, SINGLE)).status == 200  # (back in the lane)
    relay = gw.gateway.server.lane.relay
    assert relay.served == 2 and relay.demoted == 1 and single.requests == 2


async def _pd_gateway(
    nursery: trio.Nursery, sim_worker: Any, prefills: int = 2, tracer_provider: Any = None,
    decodes: int = 1, limits: dict[str, Any] | None = None, dialect: str = "vllm-nixl",
    bootstrap: bool = True, **prefill_opts: Any,
) -> Any:  # fmt: skip
    """A P/D gateway on the lane (vllm-nixl unless ``dialect``): ``prefills`` prefill workers
    (the first with ``prefill_opts``) and ``decodes`` decode workers; the simulators as
    ``gw.sims`` (decode last). SGLang: a simulated prefill worker's bootstrap server is its
    HTTP port (configured unless not ``bootstrap``: then the gateway asks the worker)."""
    from gateway_support import server_config

    from lmgw.config import (
        GatewayConfig,
        HealthConfig,
        LimitsConfig,
        ModelConfig,
        WorkerConfig,
    )
    from lmgw.gateway import Gateway

    ps = [await sim_worker(role="p", **(prefill_opts if i == 0 else {})) for i in range(prefills)]
    ds = [await sim_worker(role="d") for _ in range(decodes)]
    cfg = GatewayConfig(
        server=server_config("lane", port=0, graceful_shutdown_s=1.0),
        health=HealthConfig(interval_s=300.0),
        limits=LimitsConfig(**(limits or {})),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect=dialect)],
        workers=[
            *(
                WorkerConfig(
                    url=p.url,
                    role="p",
                    id=f"p{i}",
                    bootstrap_port=_port(p.url) if bootstrap else None,
                )
                for i, p in enumerate(ps)
            ),
            *(WorkerConfig(url=d.url, role="d", id=f"d{i}") for i, d in enumerate(ds)),
        ],
    )
    gw = Gateway(cfg, tracer_provider=tracer_provider)
    gw.sims = [*ps, *ds]  # type: ignore[attr-defined]
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("dialect", ["vllm-nixl", "sglang-bootstrap"])
async def test_p_d_requests_wait_for_a_slot_in_the_lane(
    nursery: trio.Nursery, sim_worker: Any, dialect: str
) -> None:
    """One request at a time: a P/D request (legs one after the other, or SGLang's pair at
    once) that meets a full gateway is parked in the lane, then runs both its legs there."""
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=1, limits={"max_concurrent_requests": 1}, dialect=dialect,
        timing=(("a", 0.3),), speed=1.0,
    )  # fmt: skip
    relay = gw.server.lane.relay
    conns = [KeepAlive(await open_stream(gw.url), gw.url) for _ in range(3)]
    data = request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT, close=False)
    admission = gw.app.admission
    with trio.fail_after(5):
        for i, c in enumerate(conns):
            await c.stream.send_all(data)
            while (admission.in_flight, admission.waiting) != (1, i):
                await trio.sleep(0.005)
    texts = set()
    for c in conns:
        r = await c.next_answer()
        assert r.status == 200, r.body
        texts.add(r.json()["choices"][0]["message"]["content"])
    assert len(texts) == 1 and relay.demoted == 0 and relay.in_flight == 0
    assert (admission.in_flight, admission.waiting) == (0, 0)
    assert gw.registry.get("d0").in_flight == 0 and not gw.pipeline.placement.queued


async def test_p_d_requests_run_both_legs_in_the_lane(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    gw = await _pd_gateway(nursery, sim_worker)
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    texts = set()
    for _ in range(4):
        r = await c.ask(CHAT)
        assert r.status == 200, r.body
        assert r.headers["server-timing"].startswith("prefill;dur=")
        texts.add(r.json()["choices"][0]["message"]["content"])
    assert len(texts) == 1  # the simulator's text: a function of the prompt, whatever the legs
    assert relay.served == 8 and relay.demoted == 0  # two whole answers per request
    assert gw.registry.get("d0").in_flight == 0 and gw.app.admission.in_flight == 0
    assert not gw.pipeline.placement.queued  # joint placement's holds released


async def test_p_d_streams_run_in_the_lane(nursery: trio.Nursery, sim_worker: Any) -> None:
    """A P/D stream: the prefill leg's whole answer, then the decode leg streamed by the
    lane; the same text as the non-streamed answer."""
    gw = await _pd_gateway(nursery, sim_worker)
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    whole = (await c.ask(CHAT)).json()["choices"][0]["message"]["content"]
    for _ in range(3):
        r = await c.ask({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status == 200 and r.headers["server-timing"].startswith("prefill;dur=")
        assert r.events()[-1] == "[DONE]" and _text(r) == whole
        assert r.events()[-2]["usage"]["completion_tokens"] == 4
    assert relay.streamed == 3 and relay.served == 2 + 3 and relay.demoted == 0
    assert gw.registry.get("d0").in_flight == 0 and gw.app.admission.in_flight == 0
    assert not gw.pipeline.placement.queued
    text = await http_request(gw.url, "GET", "/metrics")
    ttft = 'lmgw_stage_time_to_first_token_seconds_count{role="d",worker="d0"}'
    assert metric_value(text.body.decode(), ttft) == 3


async def test_p_d_a_decode_stream_broken_in_the_lane_is_continued(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """The decode worker drops the stream: the lane's continuation runs the flow's legs again
    for the rest (a prefill, then the decode) and the client gets the whole text once."""
    gw = await _pd_gateway(nursery, sim_worker, prefills=1, decodes=2)
    relay = gw.server.lane.relay
    body = {**CHAT, "stream": True, "max_tokens": 30}
    c = KeepAlive(await open_stream(gw.url), gw.url)
    expected = _text(await c.ask(body))
    await gw.sims[-1].set_faults(drop_at_token=4)
    texts = [_text(await c.ask(body)) for _ in range(2)]  # one of the two on the dropping d0
    assert texts == [expected, expected]
    assert relay.demoted >= 1
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="d",outcome="continued"}') >= 1


def _comments_then_events(r: RawResponse) -> tuple[int, list[bytes]]:
    """A stream's keep-alive comments (how many, all before its first event) and its events."""
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert b"HTTP/1.1" not in r.body  # one head
    blocks = [b for b in r.body.split(b"\n\n") if b]
    n = next(i for i, b in enumerate(blocks) if not b.startswith(b":"))
    assert all(b == b": keep-alive" for b in blocks[:n])
    events = blocks[n:]
    assert all(b.startswith(b"data: ") for b in events), events
    return n, events


def _events_text(events: list[bytes]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in (msgspec.json.decode(b[6:]) for b in events if b.startswith(b"data: {"))
        if e.get("choices")
    )


async def test_p_d_keep_alives_in_the_lane_through_a_slow_prefill(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """limits.sse_keepalive_s: the client's head and comments while the prefill leg runs
    (in the lane), then the decode leg's events, the same text as without them."""
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=1, limits={"sse_keepalive_s": 0.02},
        faults={"stall_rate": 1.0, "stall_s": 0.15},
    )  # fmt: skip
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    whole = (await c.ask(CHAT)).json()["choices"][0]["message"]["content"]
    r = await c.ask({**CHAT, "stream": True})
    comments, events = _comments_then_events(r)
    assert comments >= 2 and _events_text(events) == whole
    assert r.headers["x-request-id"]
    assert relay.streamed == 1 and relay.demoted == 0
    assert (await c.ask(CHAT)).status == 200  # the connection goes on in the lane
    assert relay.demoted == 0 and gw.app.admission.in_flight == 0


async def test_p_d_keep_alives_then_a_failed_decode_goes_on_on_the_server(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """The head went out with a keep-alive, then the decode worker answers 500: the server
    takes the request with the head sent (no second head), retries the decode leg on the
    other worker, comments go on until its first event; with no other worker, the error is
    the stream's last event."""
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=1, decodes=2, limits={"sse_keepalive_s": 0.02},
        faults={"stall_rate": 1.0, "stall_s": 0.15},
    )  # fmt: skip
    relay = gw.server.lane.relay
    body = {**CHAT, "stream": True}
    c = KeepAlive(await open_stream(gw.url), gw.url)
    expected = _events_text(_comments_then_events(await c.ask(body))[1])
    await gw.sims[1].set_faults(error_rate=1.0)  # d0
    for _ in range(2):  # (round robin: one of the two goes to d0 first)
        r = await c.ask(body)
        comments, events = _comments_then_events(r)
        assert comments >= 2 and _events_text(events) == expected
    assert relay.demoted >= 1
    await gw.sims[2].set_faults(error_rate=1.0)  # d1 too: nothing can answer
    c = KeepAlive(await open_stream(gw.url), gw.url)
    r = await c.ask(body)
    comments, events = _comments_then_events(r)
    assert comments >= 2 and events[-1] == b"data: [DONE]" and b'"error"' in events[-2]
    assert all(w.in_flight == 0 for w in gw.registry) and gw.app.admission.in_flight == 0


async def test_p_d_a_failing_prefill_is_retried_on_the_other(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    gw = await _pd_gateway(nursery, sim_worker, faults={"error_rate": 1.0})
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    for _ in range(4):  # round robin over the prefill workers: p0 answers 500 every time
        r = await c.ask(CHAT)
        assert r.status == 200, r.body
    assert relay.demoted >= 1  # those went on on the server
    assert all(w.in_flight == 0 for w in gw.registry)


async def _settled(gw: Any) -> None:
    """Every leg over: a concurrent pair's prefill leg may end after its request's answer."""
    relay = gw.server.lane.relay
    with trio.fail_after(5):  # (a continuation's end follows its answer's last byte)
        while (
            relay.sides or relay.in_flight or gw.app.admission.in_flight
            or any(w.in_flight for w in gw.registry)
        ):  # fmt: skip
            await trio.sleep(0.005)
    assert not gw.pipeline.placement.queued


async def test_sglang_pairs_run_in_the_lane(nursery: trio.Nursery, sim_worker: Any) -> None:
    """SGLang: both legs at once, in one room, the prefill leg as the relay's side leg; whole
    answers and streams, the same text, nothing handed to the server."""
    gw = await _pd_gateway(nursery, sim_worker, prefills=2, dialect="sglang-bootstrap")
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    whole = set()
    for _ in range(4):
        r = await c.ask(CHAT)
        assert r.status == 200, r.body
        whole.add(r.json()["choices"][0]["message"]["content"])
    assert len(whole) == 1
    for _ in range(3):
        r = await c.ask({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status == 200 and r.events()[-1] == "[DONE]"
        assert _text(r) == next(iter(whole))
    # SGLang's native API too
    generate = {"text": "Tell me a story", "sampling_params": {"max_new_tokens": 4}}
    r = await c.ask(generate, path="/generate")
    assert r.status == 200 and r.json()["text"], r.body
    await _settled(gw)
    assert relay.served == 5 and relay.streamed == 3 and relay.demoted == 0
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    legs = [f'lmgw_stage_duration_seconds_count{{role="p",worker="p{i}"}}' for i in (0, 1)]
    assert sum(metric_value(text, leg) for leg in legs) == 8  # each prefill leg accounted
    ok = f'lmgw_requests_total{{endpoint="chat",model="{MODEL}",flow="p/d",status="200"}}'
    assert metric_value(text, ok) == 7


async def test_sglang_bootstrap_ports_are_asked_of_the_prefill_workers(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """No ``bootstrap_port`` configured: the gateway reads each prefill worker's from its
    ``/get_server_info`` (SGLang's ``disaggregation_bootstrap_port``) at its first probe, and
    the legs name it (the simulated decode worker refuses a null one)."""
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=2, dialect="sglang-bootstrap", bootstrap=False
    )
    for i in (0, 1):
        assert gw.registry.get(f"p{i}").bootstrap_port == _port(gw.sims[i].url)
    assert gw.registry.get("d0").bootstrap_port is None  # (decode workers are not asked)
    c = KeepAlive(await open_stream(gw.url), gw.url)
    for _ in range(2):
        r = await c.ask(CHAT)
        assert r.status == 200, r.body
    await _settled(gw)


async def test_sglang_a_failing_prefill_ends_the_request_in_the_lane(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """The prefill leg answers 500: its decode leg, waiting for KV that never comes, is
    cancelled at once; a whole answer (or a stream) is the 502; a stream whose head went out
    with keep-alive comments ends with the error as its last event. The connection goes on."""
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=1, dialect="sglang-bootstrap", faults={"error_rate": 1.0},
        limits={"sse_keepalive_s": 0.02},
    )  # fmt: skip
    p = gw.sims[0]
    c = KeepAlive(await open_stream(gw.url), gw.url)
    message = "prefill stage failed: Simulated engine failure (fault: error_rate)."
    with trio.fail_after(3):  # (the decode worker would wait 30 s for the room)
        for body in (CHAT, {**CHAT, "stream": True}):
            r = await c.ask(body)
            assert r.status == 502 and r.json()["error"]["message"] == message, r.body
        await p.set_faults(error_rate=0.0, stall_rate=1.0, stall_s=0.15, drop_at_token=0)
        r = await c.ask({**CHAT, "stream": True})
    comments, events = _comments_then_events(r)
    assert comments >= 2 and events[-1] == b"data: [DONE]"
    error = msgspec.json.decode(events[-2][6:])["error"]
    assert error["message"].startswith("prefill stage failed: worker p0") and error["code"] == 502
    await _settled(gw)
    assert not p.sim._kv_waiters  # the decode worker's wait for the room ended with its leg
    assert (await c.ask(CHAT)).status == 502  # the connection goes on


async def test_sglang_a_decode_failing_first_restarts_the_pair(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """A decode leg that fails before its first byte cancels its prefill leg; the server goes
    on with a fresh pair (a new room) on the other decode worker."""
    gw = await _pd_gateway(nursery, sim_worker, prefills=1, decodes=2, dialect="sglang-bootstrap")
    await gw.sims[1].set_faults(error_rate=1.0)  # d0
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    for body in (CHAT, CHAT, {**CHAT, "stream": True}, {**CHAT, "stream": True}):
        r = await c.ask(body)
        assert r.status == 200, r.body
    await _settled(gw)
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    retries = metric_value(text, 'lmgw_retries_total{role="d"}')
    assert retries >= 2 and relay.demoted >= retries


async def test_sglang_a_client_gone_cancels_both_legs(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    gw = await _pd_gateway(
        nursery, sim_worker, prefills=1, dialect="sglang-bootstrap",
        faults={"stall_rate": 1.0, "stall_s": 5.0},
    )  # fmt: skip
    p = gw.sims[0]
    stream = await open_stream(gw.url)
    await stream.send_all(
        request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT, {"x-request-id": "sgl-gone"})
    )
    with trio.fail_after(5):  # the prefill leg stalled, the decode leg parked on its room
        while not (p.sim.stats.in_flight and p.sim._kv_waiters):
            await trio.sleep(0.005)
    await stream.aclose()
    await wait_for_abort(p.sim, "sgl-gone")
    with trio.fail_after(5):  # the decode worker stopped waiting: its leg was cancelled
        while p.sim._kv_waiters:
            await trio.sleep(0.005)
    await _settled(gw)
    text = (await http_request(gw.url, "GET", "/metrics")).body.decode()
    assert metric_value(text, 'lmgw_client_disconnects_total{endpoint="chat"}') == 1


async def test_its_metrics(gateway: GatewayFactory) -> None:

    gw = await gateway(1)
    c = await _client(gw)
    for _ in range(3):
        await c.ask(CHAT)
    await c.ask({**CHAT, "stream": True})
    text = await gw.metrics()
    assert metric_value(text, "lmgw_lane_answers_total") == 3
    assert metric_value(text, "lmgw_lane_streams_total") == 1
    assert metric_value(text, "lmgw_lane_handovers_total") == 1  # this GET
    assert metric_value(text, 'lmgw_lane_declined_total{reason="other_route"}') == 1
    assert metric_value(text, 'lmgw_upstream_pool_events_total{event="connect"}') >= 1
    assert metric_value(text, 'lmgw_upstream_pool_events_total{event="reuse"}') >= 3
    assert metric_value(text, 'lmgw_lane_connections{side="upstream"}') >= 1


async def test_a_replaced_route_is_off_the_lane(gateway: GatewayFactory) -> None:
    """An SDK extension (or middleware) that takes over a generation route after start-up:
    its handler runs, not the lane."""
    gw = await gateway(1)

    async def mine(req: Any, responder: Any) -> None:
        await responder.send_full(200, [(b"content-type", b"application/json")], b'{"mine":1}')

    gw.gateway.app.route("/v1/chat/completions", {"POST": mine})
    r = await (await _client(gw)).ask(CHAT)
    assert r.status == 200 and r.json() == {"mine": 1}
    assert gw.gateway.server.lane.relay.served == 0


async def test_a_worker_named_by_host_name_is_looked_up(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """Its first requests take the express lane on trio; once the name is looked up, the
    lane reaches it."""
    from gateway_support import server_config

    from lmgw.config import GatewayConfig, HealthConfig, WorkerConfig
    from lmgw.gateway import Gateway

    sim = await sim_worker()
    port = sim.url.rsplit(":", 1)[1]
    cfg = GatewayConfig(
        server=server_config("lane", port=0, graceful_shutdown_s=1.0),
        health=HealthConfig(interval_s=300.0),
        workers=[WorkerConfig(url=f"http://localhost:{port}", role="pd", id="w0")],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    assert (await c.ask(CHAT)).status == 200  # on trio, the name being looked up
    origin = gw.registry.get("w0").origin
    with trio.fail_after(5):
        while origin.slot < 0:
            await trio.sleep(0.01)
    c = KeepAlive(await open_stream(gw.url), gw.url)
    assert (await c.ask(CHAT)).status == 200
    assert relay.served == 1


async def test_mixed_traffic_leaves_nothing_behind(gateway: GatewayFactory) -> None:
    """Keep-alive clients mixing what the lane takes and what it hands over (plain requests,
    streams, bad bodies, requests in two writes, pipelined pairs, clients leaving mid-request),
    on two workers of different speeds: every answer is whole and right, and afterwards no
    request, slot or connection is left counted anywhere."""
    import random

    gw = await gateway(2, per_worker=[{"speed": 50.0}, {}])
    relay = gw.gateway.server.lane.relay
    rng = random.Random(7)

    async def client(i: int) -> None:
        c = await _client(gw)
        for _ in range(25):
            kind = rng.choice(["plain", "plain", "plain", "split", "stream", "bad", "pipe", "gone"])
            if kind == "plain":
                r = await c.ask(CHAT)
                assert r.status == 200 and r.json()["choices"], r.body
            elif kind == "split":
                assert (await c.ask(CHAT, split=0.01)).status == 200
            elif kind == "stream":
                r = await c.ask({**CHAT, "stream": True})
                assert r.status == 200 and r.body.endswith(b"data: [DONE]\n\n")
            elif kind == "bad":
                r = await c.ask({**CHAT, "messages": "nope"})
                assert r.status == 400 and r.json()["error"]["message"]
            elif kind == "pipe":
                two = request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT, close=False)
                await c.stream.send_all(two + two)
                for _ in range(2):
                    r = await c.next_answer()
                    assert r.status == 200
            else:  # a request, then gone before its answer
                data = request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT, close=False)
                await c.stream.send_all(data)
                await c.stream.aclose()
                c = await _client(gw)
        await c.stream.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(client, i)
    with trio.fail_after(10):
        while relay.in_flight or relay.clients or gw.gateway.app.admission.in_flight:
            await trio.sleep(0.02)
        while any(w.in_flight for w in gw.gateway.registry):
            await trio.sleep(0.02)
    text = await gw.metrics()
    assert metric_value(text, "lmgw_requests_in_flight") == 0
    assert relay.served > 50 and relay.demoted > 10  # both ways, many times


async def test_spans_of_a_merged_request_in_the_lane(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """Tracing: the lane serves a merged request with its span and its leg's, the worker gets
    the leg's traceparent; a failed leg ends in error and the server's retry is a leg of the
    same span."""
    pytest.importorskip("opentelemetry.sdk")
    from gateway_support import server_config
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from lmgw.config import GatewayConfig, HealthConfig, WorkerConfig
    from lmgw.gateway import Gateway

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sims = [await sim_worker(faults={"error_rate": 1.0}), await sim_worker()]
    cfg = GatewayConfig(
        server=server_config("lane", port=0, graceful_shutdown_s=1.0),
        health=HealthConfig(interval_s=300.0),
        workers=[WorkerConfig(url=s.url, role="pd", id=f"w{i}") for i, s in enumerate(sims)],
    )
    gw = Gateway(cfg, tracer_provider=provider)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    relay = gw.server.lane.relay
    c = KeepAlive(await open_stream(gw.url), gw.url)
    assert (await c.ask(CHAT)).status == 200  # round robin: w0 fails, w1 answers
    assert relay.demoted == 1
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["lmgw chat", "lmgw generate w0", "lmgw generate w1"]
    by = {s.name: s for s in spans}
    root = by["lmgw chat"]
    assert root.kind is SpanKind.SERVER and root.attributes["http.response.status_code"] == 200
    for name in ("lmgw generate w0", "lmgw generate w1"):
        assert by[name].kind is SpanKind.CLIENT
        assert by[name].parent.span_id == root.context.span_id
    assert by["lmgw generate w0"].status.status_code is StatusCode.ERROR
    exporter.clear()
    await sims[0].set_faults(error_rate=0.0)
    assert (await c.ask(CHAT)).status == 200 and relay.served == 1  # back in the lane
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"lmgw chat", "lmgw generate w0"}, list(spans)
    leg = spans["lmgw generate w0"]
    ctx = leg.get_span_context()
    headers = (await sims[0].stats())["last_headers"]
    assert headers["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    assert spans["lmgw chat"].attributes["lmgw.flow"] == "pd"
    provider.shutdown()


async def test_spans_of_a_p_d_request_in_the_lane(nursery: trio.Nursery, sim_worker: Any) -> None:
    """Tracing, P/D: both legs in the lane, each a span under the request's, each worker with
    its own leg's traceparent (as the server's DisaggRunner makes them)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await _pd_gateway(nursery, sim_worker, prefills=1, tracer_provider=provider)
    p, d = gw.sims
    c = KeepAlive(await open_stream(gw.url), gw.url)
    assert (await c.ask(CHAT)).status == 200
    assert gw.server.lane.relay.served == 2 and gw.server.lane.relay.demoted == 0
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"lmgw chat", "lmgw prefill p0", "lmgw decode d0"}, list(spans)
    root = spans["lmgw chat"]
    assert root.attributes["lmgw.flow"] == "p/d"
    for name, sim in (("lmgw prefill p0", p), ("lmgw decode d0", d)):
        leg = spans[name]
        assert leg.parent.span_id == root.context.span_id
        ctx = leg.get_span_context()
        sent = (await sim.stats())["last_headers"]["traceparent"]
        assert sent.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    provider.shutdown()
