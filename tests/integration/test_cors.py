"""CORS (server.cors_allow_origins): preflights, the headers on every kind of answer, and
nothing at all when it is off."""

from __future__ import annotations

from gateway_support import MODEL

from lmgw.config import ApiKeyConfig, AuthConfig

UI = "https://ui.example.com"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PREFLIGHT = {
    "origin": UI,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type",
}


async def test_off_by_default(gateway) -> None:
    gw = await gateway(1)
    r = await gw.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status == 405
    r = await gw.request("POST", "/v1/chat/completions", CHAT, headers={"origin": UI})
    assert r.status == 200 and "access-control-allow-origin" not in r.headers


async def test_listed_origin(gateway) -> None:
    gw = await gateway(1, server_options={"cors_allow_origins": [UI]})
    r = await gw.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status == 204, r.body
    assert r.headers["access-control-allow-origin"] == UI
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "*"
    assert r.headers["access-control-max-age"] == "600"
    assert r.headers["vary"] == "origin"

    for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "model": "nope"}):
        r = await gw.request("POST", "/v1/chat/completions", body, headers={"origin": UI})
        assert r.headers["access-control-allow-origin"] == UI, (body, r.status)
        assert "x-request-id" in r.headers["access-control-expose-headers"]
        # a page resumes an answer by its id (streams.resumable): it must be able to read it
        assert "x-lmgw-stream-id" in r.headers["access-control-expose-headers"]
    assert r.status == 404  # errors carry it too: the page can read the message

    other = {"origin": "https://evil.example.com"}
    r = await gw.request("POST", "/v1/chat/completions", CHAT, headers=other)
    assert r.status == 200 and "access-control-allow-origin" not in r.headers
    r = await gw.request("OPTIONS", "/v1/chat/completions", headers={**PREFLIGHT, **other})
    assert r.status == 405  # not an allowed origin: not a preflight we answer


async def test_any_origin_with_api_keys(gateway) -> None:
    auth = AuthConfig(keys=[ApiKeyConfig(key="sk-cors-test-key-0001")])
    gw = await gateway(1, server_options={"cors_allow_origins": ["*"]}, auth=auth)
    # a preflight carries no credentials: answered before the key check
    r = await gw.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status == 204 and r.headers["access-control-allow-origin"] == "*"
    assert "vary" not in r.headers
    r = await gw.request("POST", "/v1/chat/completions", CHAT, headers={"origin": UI})
    assert r.status == 401 and r.headers["access-control-allow-origin"] == "*"
    ok = {"origin": UI, "authorization": "Bearer sk-cors-test-key-0001"}
    r = await gw.request("POST", "/v1/chat/completions", CHAT, headers=ok)
    assert r.status == 200 and r.headers["access-control-allow-origin"] == "*"
