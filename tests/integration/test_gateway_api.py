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
from conftest import (
    MODEL,
    GatewayFactory,
    GatewayHandle,
    RawResponse,
    SimFactory,
    free_port_url,
    http_request,
    open_stream,
    parse_sse,
    request_bytes,
)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("test_deadline")

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
            "unknown_route": _status_error(lambda: client.get("/embeddings", cast_to=object)),
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
        plain = _status_error(lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES))
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
