"""The gateway's OpenAI API end to end: the official ``openai`` client and raw HTTP against a
gateway in front of in-process simulated vLLM workers, on both front-door servers (the native
trio server and hypercorn through the ASGI adapter; see ``conftest.py``).

The simulator is deterministic (output is a function of the prompt), so "the same text as the
worker gives directly" is an exact comparison.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayFactory,
    GatewayHandle,
    RawResponse,
    free_port_url,
    http_request,
    metric_value,
    open_stream,
    parse_sse,
    request_bytes,
)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("hard_deadline")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": MODEL, "messages": MESSAGES}
ERROR_KEYS = ["message", "type", "param", "code"]


async def in_thread(fn, *args: Any, timeout: float = 10.0) -> Any:
    """Run a blocking (openai client) call in a worker thread, bounded."""
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def client_for(gw: GatewayHandle) -> Any:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="test-key", max_retries=0, timeout=8.0)


def assert_error_body(r: RawResponse, status: int) -> dict[str, Any]:
    """The body is exactly ``{"error": {"message", "type", "param", "code"}}``."""
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert sorted(err) == sorted(ERROR_KEYS), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] == status
    return err


async def wait_until(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def wait_for_abort(sim: Any, request_id: str, timeout: float = 2.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            for entry in sim.stats.aborted:
                if entry["request_id"] == request_id:
                    return entry
            await trio.sleep(0.002)


async def assert_nothing_in_flight(gw: GatewayHandle) -> None:
    await wait_until(
        lambda: (
            all(w.in_flight == 0 for w in gw.gateway.registry)
            and all(s.sim.stats.in_flight == 0 for s in gw.sims)
        )
    )
    stats = [await s.stats() for s in gw.sims]
    assert [s["in_flight"] for s in stats] == [0] * len(gw.sims)
    metrics = await gw.metrics()
    for w in gw.gateway.registry:
        assert metric_value(metrics, f'lmgw_worker_in_flight{{role="pd",worker="{w.id}"}}') == 0


# == 1. the official openai client ================================================================


async def test_openai_chat_matches_worker_output(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    direct = await http_request(gw.sims[0].url, "POST", "/v1/chat/completions", CHAT)
    expected = direct.json()["choices"][0]["message"]["content"]
    assert expected

    def run() -> tuple[Any, list[Any], list[Any]]:
        client = client_for(gw)
        full = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        with_usage = list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        return full, chunks, with_usage

    full, chunks, with_usage = await in_thread(run)
    assert full.object == "chat.completion" and full.model == MODEL
    assert full.choices[0].message.content == expected
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens == direct.json()["usage"]["completion_tokens"]

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"

    *body, last = with_usage
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected


async def test_openai_completions(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    req = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12}
    direct = (await http_request(gw.sims[0].url, "POST", "/v1/completions", req)).json()
    expected = direct["choices"][0]["text"]

    def run() -> tuple[Any, list[Any]]:
        client = client_for(gw)
        full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12)
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt="Once upon a time",
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return full, chunks

    full, chunks = await in_thread(run)
    assert full.object == "text_completion"
    assert full.choices[0].text == expected
    assert full.choices[0].finish_reason == direct["choices"][0]["finish_reason"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        [c for c in chunks if c.choices and c.choices[0].text]
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[
        0
    ].finish_reason


async def test_openai_cached_tokens_on_repeated_prompt(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    prompt = "The quick brown fox jumps over the lazy dog. " * 20

    def run() -> tuple[Any, Any]:
        client = client_for(gw)
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        return first.usage, second.usage

    first, second = await in_thread(run)
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens > 0
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens


async def test_openai_models_list(gateway: GatewayFactory) -> None:
    gw = await gateway(2)

    def run() -> tuple[list[str], Any]:
        client = client_for(gw)
        return [m.id for m in client.models.list()], client.models.retrieve(MODEL)

    ids, model = await in_thread(run)
    assert ids == [MODEL]
    assert model.id == MODEL and model.object == "model"


def _status_error(fn) -> Any:
    try:
        fn()
    except openai.APIStatusError as exc:
        return exc
    raise AssertionError("expected an APIStatusError")


async def test_openai_client_errors(gateway: GatewayFactory) -> None:
    gw = await gateway(1)

    def run() -> dict[str, Any]:
        client = client_for(gw)
        chat = client.chat.completions
        json_headers = {"headers": {"Content-Type": "application/json"}}
        return {
            "bad_json": _status_error(
                lambda: client.post(
                    "/chat/completions", cast_to=object, content=b'{"model": ', options=json_headers
                )
            ),
            "missing_messages": _status_error(
                lambda: client.post("/chat/completions", cast_to=object, body={"model": MODEL})
            ),
            "empty_messages": _status_error(lambda: chat.create(model=MODEL, messages=[])),
            "wrong_type": _status_error(
                lambda: chat.create(model=MODEL, messages=MESSAGES, extra_body={"n": "two"})
            ),
            "negative": _status_error(
                lambda: chat.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
            ),
            "stream_options_without_stream": _status_error(
                lambda: chat.create(
                    model=MODEL, messages=MESSAGES, stream_options={"include_usage": True}
                )
            ),
            "unknown_model": _status_error(lambda: chat.create(model="nope", messages=MESSAGES)),
            "unknown_route": _status_error(lambda: client.get("/images/edits", cast_to=object)),
            "wrong_method": _status_error(lambda: client.get("/chat/completions", cast_to=object)),
            "worker_4xx": _status_error(
                lambda: chat.create(model=MODEL, messages=MESSAGES, top_p=5.0)
            ),
        }

    errs = await in_thread(run)
    for name in (
        "bad_json",
        "missing_messages",
        "empty_messages",
        "wrong_type",
        "negative",
        "stream_options_without_stream",
        "worker_4xx",
    ):
        assert isinstance(errs[name], openai.BadRequestError), (name, errs[name])
    assert "JSON" in errs["bad_json"].message
    assert errs["missing_messages"].body["param"] == "messages"
    assert errs["empty_messages"].body["param"] == "messages"
    assert errs["wrong_type"].body["param"] == "n"
    assert errs["negative"].body["param"] == "max_tokens"
    assert errs["stream_options_without_stream"].body["param"] == "stream_options"
    # a worker's 4xx comes through with its status, message and param
    assert errs["worker_4xx"].body["param"] == "top_p"
    assert "top_p must be in (0, 1]" in errs["worker_4xx"].body["message"]
    for name in ("unknown_model", "unknown_route"):
        assert isinstance(errs[name], openai.NotFoundError), (name, errs[name])
    assert errs["unknown_model"].body["param"] == "model"
    wrong = errs["wrong_method"]
    assert wrong.status_code == 405 and wrong.response.headers["allow"] == "POST"
    assert wrong.body["code"] == 405


async def test_openai_413_body_too_large(gateway: GatewayFactory) -> None:
    gw = await gateway(1, limits={"max_body_bytes": 2048})

    def run() -> Any:
        client = client_for(gw)
        big = [{"role": "user", "content": "x" * 8192}]
        return _status_error(lambda: client.chat.completions.create(model=MODEL, messages=big))

    err = await in_thread(run)
    assert err.status_code == 413 and err.body["code"] == 413
    # a body under the limit still works
    r = await gw.request("POST", "/v1/chat/completions", CHAT)
    assert r.status == 200


async def test_openai_503_when_no_worker_is_healthy(gateway: GatewayFactory) -> None:
    gw = await gateway(0, extra_urls=[free_port_url()], models=[MODEL])

    def run() -> Any:
        client = client_for(gw)
        return _status_error(lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES))

    err = await in_thread(run)
    assert isinstance(err, openai.InternalServerError) and err.status_code == 503
    assert err.body["type"] == "ServiceUnavailableError"


async def test_openai_502_on_worker_500(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"error_rate": 1.0})

    def run() -> tuple[Any, Any]:
        client = client_for(gw)
        plain = _status_error(
            lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES)
        )
        streamed = _status_error(
            lambda: list(
                client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            )
        )
        return plain, streamed

    for err in await in_thread(run):
        assert isinstance(err, openai.InternalServerError) and err.status_code == 502
        assert "Simulated engine failure" in err.body["message"]
        assert err.body["code"] == 502


async def test_openai_504_on_request_deadline(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"hang": True}, limits={"request_timeout_s": 0.3})

    def run() -> Any:
        client = client_for(gw)
        return _status_error(lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES))

    t0 = time.monotonic()
    err = await in_thread(run)
    assert time.monotonic() - t0 < 3
    assert isinstance(err, openai.InternalServerError) and err.status_code == 504
    assert err.body["type"] == "GatewayTimeoutError"


# == 2. raw HTTP ==================================================================================


async def test_error_bodies_are_exactly_openai_shaped(gateway: GatewayFactory) -> None:
    gw = await gateway(1, limits={"max_body_bytes": 4096})
    cases: list[tuple[int, str, str, Any, str | None]] = [
        (400, "POST", "/v1/chat/completions", b'{"model": "sim-model", "messages": [', None),
        (400, "POST", "/v1/chat/completions", b"", None),
        (400, "POST", "/v1/chat/completions", b"[1, 2]", None),
        (400, "POST", "/v1/chat/completions", b'{"model": "\xff"}', None),  # not UTF-8
        (400, "POST", "/v1/completions", b'{"prompt": "\xed\xa0\x80"}', None),
        (400, "POST", "/v1/chat/completions", {"model": MODEL}, "messages"),
        (400, "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
        (400, "POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        (400, "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        (400, "POST", "/v1/completions", {"model": MODEL}, "prompt"),
        (400, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
        (
            400,
            "POST",
            "/v1/chat/completions",
            {**CHAT, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        (400, "POST", "/v1/chat/completions", {**CHAT, "top_p": 7}, "top_p"),  # the worker's
        (400, "POST", "/v1/chat/completions", {**CHAT, "top_p": 7, "stream": True}, "top_p"),
        (404, "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-nope"}, "model"),
        (404, "GET", "/v1/images/edits", None, None),
        (404, "GET", "/v1/models/gpt-nope", None, "model"),
        (405, "GET", "/v1/chat/completions", None, None),
        (405, "DELETE", "/v1/models", None, None),
        (413, "POST", "/v1/chat/completions", {**CHAT, "pad": "x" * 8192}, None),
    ]
    for status, method, path, body, param in cases:
        r = await gw.request(method, path, body)
        err = assert_error_body(r, status)
        assert err["param"] == param, (path, body, err)
        if status == 405:
            assert r.headers["allow"] == ("POST" if path.endswith("completions") else "GET")
            assert err["type"] == "MethodNotAllowedError"
    # the model route answers known models
    r = await gw.request("GET", f"/v1/models/{MODEL}")
    assert r.status == 200 and r.json()["id"] == MODEL


async def test_model_route_takes_a_percent_encoded_name(gateway: GatewayFactory) -> None:
    """Hugging Face names have a slash, which the openai client sends as %2F."""
    gw = await gateway(1, models=["org/model-a"])
    for path in ("/v1/models/org%2Fmodel-a", "/v1/models/org/model-a", "/v1/models/org%2fmodel-a"):
        r = await gw.request("GET", path)
        assert r.status == 200 and r.json()["id"] == "org/model-a", (path, r.body)
    assert_error_body(await gw.request("GET", "/v1/models/org%2Fmodel-b"), 404)


async def test_request_id_echoed_forwarded_and_generated(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    sim = gw.sims[0]
    for body in (CHAT, {**CHAT, "stream": True}):
        r = await gw.request("POST", "/v1/chat/completions", body, {"X-Request-Id": "client-rid-1"})
        assert r.status == 200 and r.headers["x-request-id"] == "client-rid-1"
        stats = await sim.stats()
        assert stats["request_ids"][-1] == "client-rid-1"
        assert stats["last_headers"]["x-request-id"] == "client-rid-1"
    # absent (or unusable): the gateway makes one, sends it to the worker and to the client
    seen = set()
    for headers in ({}, {"x-request-id": "r" * 300}, {"x-request-id": "caf\xe9"}):
        r = await gw.request("POST", "/v1/chat/completions", CHAT, headers)
        assert r.status == 200
        rid = r.headers["x-request-id"]
        assert rid and rid not in (headers.get("x-request-id"), *seen)
        seen.add(rid)
        assert (await sim.stats())["request_ids"][-1] == rid
        assert r.json()["id"] == f"chatcmpl-{rid}"  # the worker used the same id
    # errors made by the gateway carry it too
    r = await gw.request("POST", "/v1/chat/completions", {"model": MODEL}, {"x-request-id": "e-1"})
    assert r.status == 400 and r.headers["x-request-id"] == "e-1"


class FakeWorker:
    """A minimal OpenAI-ish worker that records what it receives (bytes and headers) and answers
    streams in deliberately awkward write boundaries."""

    def __init__(self, sse_writes: list[bytes] | None = None) -> None:
        self.requests: list[Any] = []
        self.sse_writes = sse_writes or []

    async def __call__(self, req: Any, responder: Any) -> None:
        if req.path == "/health":
            await responder.send_full(200, [], b"")
        elif req.path == "/v1/models":
            body = msgspec.json.encode({"object": "list", "data": [{"id": MODEL}]})
            await responder.send_full(200, [(b"content-type", b"application/json")], body)
        elif msgspec.json.decode(req.body).get("stream"):
            self.requests.append(req)
            await responder.start(200, [(b"content-type", b"text/event-stream")])
            for piece in self.sse_writes:
                await responder.send(piece)
                await trio.sleep(0.02)  # separate reads on the gateway side
            await responder.end()
        else:
            self.requests.append(req)
            await responder.send_full(200, [(b"content-type", b"application/json")], b'{"ok":1}')


async def start_fake(nursery: trio.Nursery, fake: FakeWorker) -> str:
    from lmgw.http.server import serve_http

    port = await nursery.start(serve_http, fake, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}"


async def test_unknown_fields_and_bytes_reach_the_worker_untouched(
    gateway: GatewayFactory, nursery: trio.Nursery
) -> None:
    fake = FakeWorker()
    gw = await gateway(0, extra_urls=[await start_fake(nursery, fake)])
    raw = (
        b'{"model":"sim-model",  "messages":[{"role":"user","content":"caf\\u00e9 \xe2\x98\x95"}],'
        b'"chat_template_kwargs":{"enable_thinking":false},"guided_json":{"type":"object"},'
        b'"priority":-3,"vllm_xargs":{"a":[1,2.5,null]},"top_k":40}'
    )
    headers = {
        "authorization": "Bearer client-key",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-data-parallel-rank": "1",
        "x-request-id": "fields-1",
    }
    r = await gw.request("POST", "/v1/chat/completions", raw, headers)
    assert r.status == 200 and r.body == b'{"ok":1}'
    (seen,) = fake.requests
    assert seen.body == raw
    assert seen.path == "/v1/chat/completions" and seen.method == "POST"
    for k, v in headers.items():
        assert seen.header(k.encode()) == v.encode(), k


async def test_unknown_fields_accepted_by_the_simulator(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    body = {**CHAT, "top_k": 5, "repetition_penalty": 1.1, "chat_template_kwargs": {"x": 1}}
    r = await gw.request("POST", "/v1/chat/completions", body, {"traceparent": "00-abc-def-01"})
    assert r.status == 200
    assert (await gw.sims[0].stats())["last_headers"]["traceparent"] == "00-abc-def-01"


def http_chunks(raw: bytes) -> list[bytes]:
    """The chunks of a chunked body, as framed by the server."""
    out = []
    while True:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out.append(rest[:size])
        raw = rest[size + 2 :]


async def test_sse_relay_cuts_at_event_boundaries(
    gateway: GatewayFactory, nursery: trio.Nursery
) -> None:
    writes = [
        b'data: {"n":1}\n',
        b'\ndata: {"n"',
        b':2}\n\ndata: {"n":3}\n\nda',
        b'ta: {"n":4}\n\n',
        b"data: [DONE]\n\n",
    ]
    fake = FakeWorker(writes)
    gw = await gateway(0, extra_urls=[await start_fake(nursery, fake)])
    with trio.fail_after(5):
        stream = await open_stream(gw.url)
        async with stream:
            await stream.send_all(
                request_bytes(gw.url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
            )
            raw = bytearray()
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = http_chunks(body)
    assert b"".join(chunks) == b"".join(writes)
    assert all(c.endswith(b"\n\n") and c.startswith(b"data: ") for c in chunks), chunks
    assert parse_sse(b"".join(chunks)) == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, "[DONE]"]


async def test_sse_format_is_exact_and_same_as_the_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hello there", "stream": True}),
    ):
        hdrs = {"x-request-id": f"sse-{path}"}
        direct = await http_request(gw.sims[0].url, "POST", path, body, hdrs)
        via = await gw.request("POST", path, body, hdrs)
        assert via.status == 200 and via.complete
        assert via.headers["content-type"].startswith("text/event-stream")
        assert via.body.endswith(b"data: [DONE]\n\n")
        events = via.events()  # asserts the framing of every event
        assert events[-1] == "[DONE]" and len(events) > 3
        assert via.body == direct.body


# == 3. routing ===================================================================================


async def test_round_robin_spreads_evenly(gateway: GatewayFactory) -> None:
    gw = await gateway(3, routing="round_robin")
    for i in range(30):
        body = {"model": MODEL, "prompt": f"prompt {i}", "max_tokens": 2}
        assert (await gw.request("POST", "/v1/completions", body)).status == 200
    assert [(await s.stats())["requests_total"] for s in gw.sims] == [10, 10, 10]
    assert [w.total_requests for w in gw.gateway.registry] == [10, 10, 10]


LONG_STREAM = {
    "model": MODEL,
    "prompt": "Tell me a very long story",
    "max_tokens": 1000,
    "ignore_eos": True,
    "stream": True,
}


async def start_stream(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, events: int = 1
) -> tuple[trio.SocketStream, bytes]:
    """Send a streamed request on a raw socket and read until ``events`` SSE events arrived."""
    stream = await open_stream(url)
    await stream.send_all(request_bytes(url, "POST", "/v1/completions", body, headers))
    raw = b""
    with trio.fail_after(5):
        while raw.count(b"data: ") < events:
            chunk = await stream.receive_some(65536)
            assert chunk, raw
            raw += chunk
    return stream, raw


async def test_least_load_prefers_the_idle_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="least_load", speed=1.0)
    stream, _ = await start_stream(gw.url, LONG_STREAM)
    async with stream:
        busy = [w for w in gw.gateway.registry if w.in_flight == 1]
        assert len(busy) == 1
        idle = next(w for w in gw.gateway.registry if w is not busy[0])
        for i in range(6):
            body = {"model": MODEL, "prompt": f"short {i}", "max_tokens": 1}
            assert (await gw.request("POST", "/v1/completions", body)).status == 200
        assert idle.total_requests == 6 and busy[0].total_requests == 1


async def test_refused_worker_is_skipped_by_retry_and_ejected(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="round_robin")
    dead = gw.sims[1]
    await dead.stop()  # its URL stays in the config with nothing listening
    registry = gw.gateway.registry
    assert registry.get("w1").routable  # the gateway has not noticed yet
    for _ in range(4):
        r = await gw.request("POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
    assert not registry.get("w1").routable
    assert registry.get("w1").state.value == "ejected"
    assert (await gw.sims[0].stats())["requests_total"] == 4
    metrics = await gw.metrics()
    assert 'lmgw_retries_total{role="pd"} 1' in metrics
    assert 'lmgw_upstream_errors_total{role="pd",worker="w1",kind="transport"} 1' in metrics
    assert 'lmgw_worker_healthy{role="pd",worker="w1"} 0' in metrics


async def test_worker_503_is_retried_on_another_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(2, routing="round_robin")
    await gw.sims[0].set_faults(refuse=True)  # healthy at start-up, refusing now
    for _ in range(4):
        r = await gw.request("POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
    assert (await gw.sims[1].stats())["requests_total"] == 4
    first_tries = gw.gateway.registry.get("w0").total_requests
    assert first_tries > 0
    assert metric_value(await gw.metrics(), 'lmgw_retries_total{role="pd"}') == first_tries


async def test_last_worker_failure_reaches_the_client(gateway: GatewayFactory) -> None:
    """With no other worker to retry on, the client hears the worker's own error."""
    gw = await gateway(1)
    await gw.sims[0].set_faults(refuse=True)
    err = assert_error_body(await gw.request("POST", "/v1/chat/completions", CHAT), 502)
    assert "HTTP 503" in err["message"] and "refuses requests" in err["message"]
    await gw.sims[0].stop()
    err = assert_error_body(await gw.request("POST", "/v1/chat/completions", CHAT), 502)
    # a pooled socket to it may still be tried first: either way the client hears it is gone
    assert (
        "cannot connect" in err["message"] or "no longer accepts connections" in err["message"]
    ), err


async def test_model_alias_reaches_the_worker_as_its_name(gateway: GatewayFactory) -> None:
    gw = await gateway(1, models=[MODEL], aliases=["short"])
    direct = await http_request(gw.sims[0].url, "POST", "/v1/chat/completions", CHAT)
    r = await gw.request("POST", "/v1/chat/completions", {**CHAT, "model": "short", "top_k": 3})
    assert r.status == 200, r.body
    assert r.json()["model"] == MODEL
    assert r.json()["choices"] == direct.json()["choices"]
    entry = await gw.request("GET", "/v1/models/short")  # what chat accepts, retrieve finds
    assert entry.status == 200, entry.body
    assert entry.json()["id"] == "short" and entry.json()["root"] == MODEL
    assert (await gw.request("GET", "/v1/models/nope")).status == 404


async def test_dead_worker_in_config_is_ejected_and_never_tried(gateway: GatewayFactory) -> None:
    gw = await gateway(1, extra_urls=[free_port_url()])
    assert gw.gateway.registry.get("w1").state.value == "ejected"  # by the start-up probe
    for _ in range(3):
        assert (await gw.request("POST", "/v1/chat/completions", CHAT)).status == 200
    assert gw.gateway.registry.get("w1").total_requests == 0
    r = await gw.request("GET", "/health")
    assert r.status == 200 and r.json()["workers"] == {"w0": "healthy", "w1": "ejected"}


async def test_health_endpoint(gateway: GatewayFactory) -> None:
    gw = await gateway(2)
    r = await gw.request("GET", "/health")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    report = r.json()
    assert report["status"] == "ok"
    assert report["models"][MODEL]["ready"] is True
    assert report["models"][MODEL]["routable_workers"] == {"merged": 2}
    assert report["workers"] == {"w0": "healthy", "w1": "healthy"}


async def test_health_503_when_no_worker_is_up(gateway: GatewayFactory) -> None:
    gw = await gateway(0, extra_urls=[free_port_url()])
    r = await gw.request("GET", "/health")
    assert r.status == 503
    report = r.json()
    assert report["status"] == "unavailable" and report["workers"] == {"w0": "ejected"}
    err = assert_error_body(await gw.request("POST", "/v1/chat/completions", CHAT), 503)
    assert err["type"] == "ServiceUnavailableError"


async def test_health_503_when_the_model_has_no_routable_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(1, models=[MODEL], faults={"refuse": True})
    r = await gw.request("GET", "/health")
    assert r.status == 503
    assert r.json()["models"][MODEL] == {
        "flow": "pd",
        "ready": False,
        "routable_workers": {"merged": 0},
    }


# == 4. cancellation ==============================================================================


async def test_client_disconnect_mid_stream_aborts_the_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(1, speed=1.0)
    sim = gw.sims[0].sim
    stream, raw = await start_stream(gw.url, LONG_STREAM, {"x-request-id": "gone-1"}, events=4)
    assert raw.startswith(b"HTTP/1.1 200")
    assert gw.gateway.registry.get("w0").in_flight == 1 and sim.stats.in_flight == 1
    closed_at = time.monotonic()
    await stream.aclose()
    entry = await wait_for_abort(sim, "gone-1")
    assert 0 <= entry["at_monotonic"] - closed_at < 0.1, entry["at_monotonic"] - closed_at
    assert 0 < entry["tokens_sent"] < LONG_STREAM["max_tokens"]
    await assert_nothing_in_flight(gw)
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_client_disconnects_total{endpoint="completions"}') == 1
    sample = 'lmgw_requests_total{endpoint="completions",model="sim-model",flow="pd",status="499"}'
    assert metric_value(metrics, sample) == 1


async def test_client_disconnect_while_waiting_aborts_the_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"hang": True})
    sim = gw.sims[0].sim
    stream = await open_stream(gw.url)
    body = {"model": MODEL, "prompt": "never answered", "max_tokens": 5}
    await stream.send_all(
        request_bytes(gw.url, "POST", "/v1/completions", body, {"x-request-id": "gone-2"})
    )
    await wait_until(lambda: sim.stats.in_flight == 1)
    await trio.sleep(0.1)  # well into the wait
    closed_at = time.monotonic()
    await stream.aclose()
    entry = await wait_for_abort(sim, "gone-2")
    assert 0 <= entry["at_monotonic"] - closed_at < 0.1, entry["at_monotonic"] - closed_at
    await assert_nothing_in_flight(gw)
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_client_disconnects_total{endpoint="completions"}') == 1


async def test_many_disconnects_leave_nothing_behind(gateway: GatewayFactory) -> None:
    gw = await gateway(2, speed=1.0)
    streams = []
    for i in range(6):
        s, _ = await start_stream(gw.url, LONG_STREAM, {"x-request-id": f"m-{i}"}, events=2)
        streams.append(s)
    assert sum(w.in_flight for w in gw.gateway.registry) == 6
    for s in streams:
        await s.aclose()
    for i in range(6):
        await wait_for_abort(gw.sims[i % 2].sim, f"m-{i}")
    await assert_nothing_in_flight(gw)
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_client_disconnects_total{endpoint="completions"}') == 6
    # the gateway still serves
    assert (await gw.request("POST", "/v1/chat/completions", CHAT)).status == 200


# == 5. metrics ===================================================================================


async def test_metrics_exposition(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    for _ in range(3):
        assert (await gw.request("POST", "/v1/chat/completions", CHAT)).status == 200
    assert (await gw.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})).complete
    assert (await gw.request("POST", "/v1/chat/completions", {"model": MODEL})).status == 400
    assert (await gw.request("POST", "/v1/chat/completions", {**CHAT, "model": "x"})).status == 404
    r = await gw.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    ok = 'lmgw_requests_total{endpoint="chat",model="sim-model",flow="pd",status="200"}'
    assert metric_value(text, ok) == 4
    bad = 'lmgw_requests_total{endpoint="chat",model="-",flow="-",status="%d"}'
    assert metric_value(text, bad % 400) == 1
    assert metric_value(text, bad % 404) == 1
    assert metric_value(text, 'lmgw_client_disconnects_total{endpoint="chat"}') == 0
    assert "# TYPE lmgw_request_duration_seconds histogram" in text
    e2e = 'lmgw_request_duration_seconds_count{endpoint="chat",model="sim-model"}'
    assert metric_value(text, e2e) == 4
    inf = 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="sim-model",le="+Inf"}'
    assert metric_value(text, inf) == 4
    assert "# TYPE lmgw_time_to_first_token_seconds histogram" in text
    assert metric_value(text, 'lmgw_time_to_first_token_seconds_count{model="sim-model"}') == 1
    assert "# TYPE lmgw_worker_in_flight gauge" in text
    assert metric_value(text, 'lmgw_worker_in_flight{role="pd",worker="w0"}') == 0
    assert 'lmgw_worker_in_flight{role="pd",worker="w0"} 0' in text
    assert metric_value(text, 'lmgw_worker_requests_total{role="pd",worker="w0"}') == 4


async def test_metrics_in_flight_while_busy(gateway: GatewayFactory) -> None:
    gw = await gateway(1, speed=1.0)
    stream, _ = await start_stream(gw.url, LONG_STREAM)
    async with stream:
        text = await gw.metrics()
        assert metric_value(text, 'lmgw_worker_in_flight{role="pd",worker="w0"}') == 1


# == 6. worker failures ===========================================================================


async def test_worker_drops_mid_stream(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"drop_at_token": 3})
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "drop me", "stream": True, "max_tokens": 20},
        ),
    ):
        r = await gw.request("POST", path, body, timeout=5)
        assert r.status == 200 and r.complete
        events = r.events()
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert sorted(err) == sorted(ERROR_KEYS) and err["code"] == 502
        assert all("error" not in e for e in events[:-2])
        assert 1 <= len(events) - 2 <= 4

    def run() -> Any:
        stream = client_for(gw).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            list(stream)
        return info.value

    assert "worker stream failed" in str((await in_thread(run)).message)


async def test_worker_dies_mid_non_stream(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"drop_at_token": 3})
    body = {"model": MODEL, "prompt": "drop me", "max_tokens": 20}
    err = assert_error_body(await gw.request("POST", "/v1/completions", body, timeout=5), 502)
    assert err["type"] == "BadGatewayError"


async def test_worker_killed_mid_request(gateway: GatewayFactory) -> None:
    gw = await gateway(1, speed=1.0)
    sim = gw.sims[0]
    async with trio.open_nursery() as nursery:
        results: dict[str, RawResponse] = {}

        async def non_stream() -> None:
            body = {**LONG_STREAM, "stream": False}
            results["plain"] = await gw.request("POST", "/v1/completions", body, timeout=5)

        async def stream() -> None:
            results["stream"] = await gw.request("POST", "/v1/completions", LONG_STREAM, timeout=5)

        nursery.start_soon(non_stream)
        nursery.start_soon(stream)
        await wait_until(lambda: sim.sim.stats.in_flight == 2)
        await trio.sleep(0.1)
        await sim.stop()
    assert_error_body(results["plain"], 502)
    r = results["stream"]
    assert r.status == 200 and r.complete
    events = r.events()
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 502


async def test_upstream_response_timeout(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"hang": True}, upstream={"response_timeout_s": 0.2})
    r = await gw.request("POST", "/v1/chat/completions", CHAT, {"x-request-id": "slow-head"})
    err = assert_error_body(r, 504)
    assert "no response within" in err["message"]
    await wait_for_abort(gw.sims[0].sim, "slow-head")
    await assert_nothing_in_flight(gw)
    text = await gw.metrics()
    assert (
        metric_value(text, 'lmgw_upstream_errors_total{role="pd",worker="w0",kind="timeout"}') == 1
    )
    assert gw.gateway.registry.get("w0").routable  # slow is not dead


async def test_concurrent_requests_all_answered(gateway: GatewayFactory) -> None:
    gw = await gateway(2, speed=50.0)
    prompts = [f"concurrent prompt number {i}" for i in range(24)]
    expected = {}
    for p in prompts:
        body = {"model": MODEL, "prompt": p, "max_tokens": 8}
        r = await http_request(gw.sims[0].url, "POST", "/v1/completions", body)
        expected[p] = r.json()["choices"][0]["text"]
    got: dict[str, str] = {}

    async def one(p: str, stream: bool) -> None:
        body = {"model": MODEL, "prompt": p, "max_tokens": 8, "stream": stream}
        r = await gw.request("POST", "/v1/completions", body)
        assert r.status == 200 and r.complete
        if stream:
            got[p] = "".join(e["choices"][0]["text"] for e in r.events()[:-1] if e["choices"])
        else:
            got[p] = r.json()["choices"][0]["text"]

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(prompts):
            nursery.start_soon(one, p, i % 2 == 0)
    assert got == expected
    await assert_nothing_in_flight(gw)
    assert gw.gateway.pool.statistics().reuses > 0  # upstream keep-alive works


async def test_deadline_on_a_started_stream(gateway: GatewayFactory) -> None:
    gw = await gateway(1, speed=1.0, limits={"request_timeout_s": 0.4})
    t0 = time.monotonic()
    r = await gw.request("POST", "/v1/completions", LONG_STREAM, {"x-request-id": "late-1"})
    assert time.monotonic() - t0 < 2
    assert r.status == 200 and r.complete
    events = r.events()
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert sorted(err) == sorted(ERROR_KEYS)
    assert err["code"] == 504 and err["type"] == "GatewayTimeoutError"
    assert len(events) > 5 and all("error" not in e for e in events[:-2])
    await wait_for_abort(gw.sims[0].sim, "late-1")
    await assert_nothing_in_flight(gw)
    text = await gw.metrics()
    late = 'lmgw_requests_total{endpoint="completions",model="sim-model",flow="pd",status="504"}'
    assert metric_value(text, late) == 1

    def run() -> Any:
        client = client_for(gw)
        stream = client.completions.create(
            model=MODEL,
            prompt="Tell me a very long story",
            max_tokens=1000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError) as info:
            list(stream)
        return info.value

    assert "deadline" in (await in_thread(run)).message


async def test_deadline_non_stream_raw(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"hang": True}, limits={"request_timeout_s": 0.2})
    r = await gw.request("POST", "/v1/chat/completions", CHAT, {"x-request-id": "late-2"})
    err = assert_error_body(r, 504)
    assert "late-2" in err["message"] and r.headers["x-request-id"] == "late-2"
    await wait_for_abort(gw.sims[0].sim, "late-2")
    await assert_nothing_in_flight(gw)


async def test_a_deadline_answer_on_keep_alive_closes_only_when_it_says_so(
    gateway: GatewayFactory,
) -> None:
    """After a 504 at the deadline on a keep-alive connection, either the answer says
    ``connection: close`` and the server closes, or the connection serves the next request.
    (The native server used to close without saying so: a keep-alive client then sent its next
    request into a closed socket; found by benchmarks/soak.py.)"""
    gw = await gateway(1, faults={"hang": True}, limits={"request_timeout_s": 0.2})
    late = request_bytes(gw.url, "POST", "/v1/chat/completions", CHAT, close=False)
    with trio.fail_after(5):
        stream = await open_stream(gw.url)
        async with stream:
            await stream.send_all(late)
            raw = bytearray()
            while b"\r\n\r\n" not in raw:
                raw += await stream.receive_some(65536)
            head, _, body = bytes(raw).partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 504 ") and b"deadline" in body
            if b"\r\nconnection: close" in head.lower():
                assert await stream.receive_some(65536) == b""  # and it does close
                return
            await gw.sims[0].set_faults(hang=False)
            await stream.send_all(late)
            raw = bytearray()
            while b"\r\n\r\n" not in raw:
                chunk = await stream.receive_some(65536)
                assert chunk, "closed without saying so"
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 200 ")


async def test_every_worker_ejected_still_serves_through_panic_routing(
    gateway: GatewayFactory,
) -> None:
    """A burst of failures ejects both workers (health.outlier_failures in a row each); once
    they answer again, requests reach them through panic routing instead of a 503 for as long
    as the ejection lasts, and /health says so."""
    gw = await gateway(2, faults={"error_rate": 1.0})
    for _ in range(5):  # each request fails on both workers (upstream.max_attempts = 2)
        assert (await gw.request("POST", "/v1/chat/completions", CHAT)).status == 502
    health = await gw.request("GET", "/health")
    assert health.status == 503
    assert set(health.json()["workers"].values()) == {"ejected"}
    assert health.json()["models"][MODEL]["panic"] == ["merged"]
    for sim in gw.sims:
        await sim.set_faults(error_rate=0.0)
    for _ in range(3):
        r = await gw.request("POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_routing_panic_total{role="pd"}') == 3


async def test_a_stuck_worker_is_ejected_and_its_waiting_requests_go_elsewhere(
    gateway: GatewayFactory,
) -> None:
    """A worker that accepts requests and never answers while its /health passes (a hung
    engine behind a live API server): its token counters stand still with requests in flight,
    so after health.stuck_timeout_s it is ejected, and the requests waiting on it are sent to
    the other worker instead of waiting for the 30 s deadline."""
    gw = await gateway(
        2,
        health_interval_s=0.2,
        health={"stuck_timeout_s": 1.0},
        limits={"request_timeout_s": 30.0},
    )
    for _ in range(2):  # both engines are seen counting tokens first
        assert (await gw.request("POST", "/v1/chat/completions", CHAT)).status == 200
    await trio.sleep(0.5)
    await gw.sims[0].set_faults(hang=True)
    results: list[Any] = []

    async def one() -> None:
        results.append(await gw.request("POST", "/v1/chat/completions", CHAT, timeout=8))

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(4):  # round robin: two of them wait on the hung worker
            nursery.start_soon(one)
    assert [r.status for r in results] == [200] * 4
    assert time.monotonic() - t0 < 6
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_worker_stuck_total{role="pd",worker="w0"}') >= 1
    assert (await gw.request("GET", "/health")).json()["workers"]["w0"] == "ejected"


async def test_worker_crash_before_answering_gives_502(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"crash_at_token": 2})
    body = {"model": MODEL, "prompt": "crash me", "max_tokens": 20}
    err = assert_error_body(await gw.request("POST", "/v1/completions", body, timeout=5), 502)
    assert err["type"] == "BadGatewayError"


async def test_a_crashed_generation_is_not_sent_twice(gateway: GatewayFactory) -> None:
    gw = await gateway(1, faults={"crash_at_token": 2})
    body = {"model": MODEL, "prompt": "crash me", "max_tokens": 20}
    assert (await gw.request("POST", "/v1/completions", body, timeout=5)).status == 502
    assert (await gw.sims[0].stats())["requests_total"] == 1  # a POST is not idempotent


async def test_stream_broken_mid_way_is_continued_on_another_worker(
    gateway: GatewayFactory,
) -> None:
    """Mid-stream migration: the client gets one stream with exactly the text an unbroken
    worker gives (the simulator continues a `continue_final_message` answer exactly)."""
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 4}}, {}])
    body = {**CHAT, "stream": True, "max_tokens": 40, "stream_options": {"include_usage": True}}
    direct = await http_request(gw.sims[1].url, "POST", "/v1/chat/completions", body)
    expected = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in direct.events()[:-1] if e["choices"]
    )
    usage = direct.events()[-2]["usage"]
    for _ in range(2):  # round robin: one of the two requests starts on the dropping worker
        r = await gw.request("POST", "/v1/chat/completions", body, timeout=5)
        events = r.events()
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
        )
        assert text == expected
        assert len({e["id"] for e in events[:-1]}) == 1  # one stream id throughout
        roles = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("role")]
        assert len(roles) == 1
        assert events[-2]["usage"]["completion_tokens"] == usage["completion_tokens"]
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="pd",outcome="continued"}') >= 1


async def test_seeded_stream_is_not_continued(gateway: GatewayFactory) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])
    body = {**CHAT, "stream": True, "seed": 7, "temperature": 0.8, "max_tokens": 30}
    results = [await gw.request("POST", "/v1/chat/completions", body, timeout=5) for _ in range(2)]
    broken = [r for r in results if "error" in r.events()[-2]]
    assert len(broken) == 1
    assert "seeded" in broken[0].events()[-2]["error"]["message"]


async def test_non_stream_broken_mid_answer_is_retried_whole(gateway: GatewayFactory) -> None:
    gw = await gateway(per_worker=[{"faults": {"drop_at_token": 3}}, {}])
    body = {"model": MODEL, "prompt": "drop me", "max_tokens": 20}
    for _ in range(2):
        r = await gw.request("POST", "/v1/completions", body, timeout=5)
        assert r.status == 200, r.body


async def test_request_waiting_on_a_worker_that_gets_ejected_is_retried_elsewhere(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(per_worker=[{"faults": {"hang": True}}, {}])
    hung = gw.gateway.registry.get("w0")
    results: list[RawResponse] = []

    async def client() -> None:
        results.append(await gw.request("POST", "/v1/chat/completions", CHAT, timeout=10))

    async with trio.open_nursery() as nursery:
        for _ in range(2):  # round robin: one of them waits on the hung worker
            nursery.start_soon(client)
        await wait_until(lambda: hung.in_flight == 1)
        gw.gateway.registry.set_state(hung, hung.state.EJECTED, "probe timed out")
    assert [r.status for r in results] == [200, 200]
    assert hung.in_flight == 0


async def test_a_500_before_any_byte_is_retried_on_another_worker(gateway: GatewayFactory) -> None:
    gw = await gateway(per_worker=[{"faults": {"error_rate": 1.0}}, {}])
    for _ in range(4):
        r = await gw.request("POST", "/v1/chat/completions", CHAT, timeout=5)
        assert r.status == 200, r.body
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_retries_total{role="pd"}') >= 1


async def test_a_burst_of_large_bodies_gives_the_heap_back(gateway: GatewayFactory) -> None:
    """Past ``limits.trim_heap_after_bytes`` of request bodies let go, the heap is trimmed
    once, on either server (hypercorn's path counts what it buffered as the native one does)."""
    gw = await gateway(1, limits={"trim_heap_after_bytes": 1 << 20})
    pad = "x" * 400_000  # an unknown field: relayed untouched, ignored by the worker
    for _ in range(3):
        r = await gw.request(
            "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "pad": pad}
        )
        assert r.status == 200, r.body[:300]
    with trio.fail_after(10):
        while metric_value(await gw.metrics(), "lmgw_heap_trims_total") < 1:
            await trio.sleep(0.1)
