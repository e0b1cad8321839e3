"""API keys end to end, on both front-door servers: 401/403/429 in OpenAI's shapes, the model
allow-list on every route that names a model, the per-key limits, open paths, the keys file
reloaded without a restart, and keys kept out of logs and away from workers."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import MODEL, http_request, server_config

from lmgw.config import (
    AdminConfig,
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

KEY = "sk-alpha-0123456789abcdef"
SLOW = "sk-slow-0123456789abcdef"
NARROW = "sk-narrow-0123456789abcdef"
TOKENS = "sk-tokens-0123456789abcdef"
ADMIN = "admin-0123456789abcdef"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def start(nursery: trio.Nursery, sim_url: str, server: str, **auth_kw: Any) -> Gateway:
    cfg = GatewayConfig(
        server=server_config(server, port=0, graceful_shutdown_s=1.0),
        health=HealthConfig(interval_s=30.0),
        models=[ModelConfig(name=MODEL, aliases=["short"]), ModelConfig(name="other")],
        workers=[WorkerConfig(url=sim_url, id="w0")],
        admin=AdminConfig(token=ADMIN),
        auth=AuthConfig(**auth_kw),
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw


KEYS = [
    ApiKeyConfig(key=KEY, name="alpha"),
    ApiKeyConfig(key=SLOW, name="slow", requests_per_s=0.01, burst=2, max_concurrent=1),
    ApiKeyConfig(key=NARROW, name="narrow", models=["short"]),
    ApiKeyConfig(key=TOKENS, name="tokens", tokens_per_min=10),
]


def assert_error(r, status: int, code: str) -> dict:
    assert r.status == status, (r.status, r.body)
    err = r.json()["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.usefixtures("hard_deadline")
async def test_keys_guard_the_api(
    nursery: trio.Nursery, sim_worker, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = await sim_worker()
    gw = await start(nursery, sim.url, server, keys=KEYS)
    url = gw.url
    chat = "/v1/chat/completions"

    r = await http_request(url, "POST", chat, CHAT)
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(
        await http_request(url, "POST", chat, CHAT, auth(KEY + "x")), 401, "invalid_api_key"
    )
    assert_error(await http_request(url, "GET", "/v1/models"), 401, "invalid_api_key")
    assert_error(
        await http_request(url, "POST", "/tokenize", {"prompt": "x"}), 401, "invalid_api_key"
    )
    assert_error(await http_request(url, "GET", "/no/such/route"), 401, "invalid_api_key")

    r = await http_request(url, "POST", chat, CHAT, auth(KEY))
    assert r.status == 200, r.body
    # the gateway's key is not the worker's business
    assert "authorization" not in {k.lower() for k, _ in sim.sim.stats.last_headers}

    # open paths and the admin API (its own token) need no API key
    assert (await http_request(url, "GET", "/health")).status == 503  # "other": no worker
    assert (await http_request(url, "GET", "/metrics")).status == 200
    assert (await http_request(url, "GET", "/admin/workers", headers=auth(KEY))).status == 401
    assert (await http_request(url, "GET", "/admin/workers", headers=auth(ADMIN))).status == 200

    # the model allow-list: by alias, on generation, listing and tokenize
    r = await http_request(url, "POST", chat, {**CHAT, "model": "short"}, auth(NARROW))
    assert r.status == 200, r.body
    err = assert_error(
        await http_request(url, "POST", chat, CHAT | {"model": "other"}, auth(NARROW)),
        403,
        "model_not_allowed",
    )
    assert err["param"] == "model"
    listed = (await http_request(url, "GET", "/v1/models", headers=auth(NARROW))).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    all_models = (await http_request(url, "GET", "/v1/models", headers=auth(KEY))).json()
    assert {m["id"] for m in all_models["data"]} == {MODEL, "other"}
    r = await http_request(url, "GET", "/v1/models/other", headers=auth(NARROW))
    assert r.status == 404
    r = await http_request(
        url, "POST", "/tokenize", {"model": "other", "prompt": "x"}, auth(NARROW)
    )
    assert_error(r, 403, "model_not_allowed")

    # requests per second: a burst of 2, then 429 with Retry-After; OpenAI's x-ratelimit-*
    # headers on every answer of a key with limits (none for a key without)
    r = await http_request(url, "POST", chat, CHAT, auth(KEY))
    assert r.status == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)
    for left in ("1", "0"):
        r = await http_request(url, "POST", chat, CHAT, auth(SLOW))
        assert r.status == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == left
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    r = await http_request(url, "POST", chat, CHAT, auth(SLOW))
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0"

    # tokens per minute: charged from the answer's usage at its end, refusing the next one
    r = await http_request(url, "POST", chat, CHAT, auth(TOKENS))
    assert r.status == 200
    assert r.headers["x-ratelimit-limit-tokens"] == "10"
    assert r.headers["x-ratelimit-remaining-tokens"] == "10"  # as the answer began
    r = await http_request(url, "POST", chat, CHAT, auth(TOKENS))
    err = assert_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "tokens" and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"

    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert 'lmgw_auth_rejected_total{reason="missing_key"}' in metrics
    assert 'lmgw_auth_rejected_total{reason="model"}' in metrics
    assert 'lmgw_api_key_requests_total{key="alpha"}' in metrics
    assert 'lmgw_api_key_tokens_total{key="tokens"}' in metrics
    for secret in (KEY, SLOW, NARROW, TOKENS):
        assert secret not in caplog.text and secret not in metrics
    nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("hard_deadline")
async def test_concurrency_cap_per_key(nursery: trio.Nursery, sim_worker) -> None:
    sim = await sim_worker(speed=1.0)
    keys = [ApiKeyConfig(key=SLOW, name="slow", max_concurrent=1)]
    gw = await start(nursery, sim.url, "native", keys=keys)
    body = {**CHAT, "max_tokens": 40}
    first_done = trio.Event()
    statuses: list[int] = []

    async def long_one() -> None:
        r = await http_request(gw.url, "POST", "/v1/chat/completions", body, auth(SLOW))
        statuses.append(r.status)
        first_done.set()

    nursery.start_soon(long_one)
    with trio.fail_after(5):
        while gw.keys is None or next(iter(gw.keys.table)).in_flight == 0:
            await trio.sleep(0.005)
    r = await http_request(gw.url, "POST", "/v1/chat/completions", CHAT, auth(SLOW))
    assert_error(r, 429, "rate_limit_exceeded")
    with trio.fail_after(10):
        await first_done.wait()
    assert statuses == [200]
    assert (
        await http_request(gw.url, "POST", "/v1/chat/completions", CHAT, auth(SLOW))
    ).status == 200
    nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("hard_deadline")
async def test_keys_file_is_reloaded_and_a_bad_edit_keeps_the_old_keys(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await sim_worker()
    path = tmp_path / "keys.txt"
    path.write_text(f"{KEY}\n")
    gw = await start(nursery, sim.url, "native", keys_file=str(path), reload_interval_s=0.02)
    chat = "/v1/chat/completions"

    async def status_with(key: str) -> int:
        return (await http_request(gw.url, "POST", chat, CHAT, auth(key))).status

    assert await status_with(KEY) == 200
    other = "sk-other-0123456789abcdef"
    assert await status_with(other) == 401
    path.write_text(f"{other} {MODEL}\n")
    with trio.fail_after(5):
        while await status_with(other) != 200:
            await trio.sleep(0.02)
    assert await status_with(KEY) == 401  # a removed key stops working at once
    path.write_text("not a key\n")  # a bad edit: logged, the keys in force stay
    with trio.fail_after(5):
        while "keys file not reloaded" not in caplog.text:
            await trio.sleep(0.02)
    assert await status_with(other) == 200
    assert other not in caplog.text and KEY not in caplog.text
    nursery.cancel_scope.cancel()


async def test_open_gateway_warns_at_start(
    nursery: trio.Nursery, sim_worker, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await sim_worker()
    gw = await start(nursery, sim.url, "native", open=True)
    assert "open to anyone" in caplog.text
    r = await http_request(gw.url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200
    assert not math.isnan(gw.port or 0)
    nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("hard_deadline")
async def test_the_openai_client_reads_the_rate_limit_headers(
    nursery: trio.Nursery, sim_worker, server: str
) -> None:
    """The official client sees x-ratelimit-* on a stream's head, as it does from OpenAI."""
    import openai

    sim = await sim_worker()
    limited = ApiKeyConfig(key=SLOW, name="slow", requests_per_s=1.0, burst=5)
    gw = await start(nursery, sim.url, server, keys=[limited])

    def stream() -> tuple[dict[str, str], str]:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=SLOW, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return dict(raw.headers), text

    headers, text = await trio.to_thread.run_sync(stream)
    assert text
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"
    nursery.cancel_scope.cancel()
