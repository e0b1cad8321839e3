"""Which requests may share a generation (streams.coalesce): deterministic ones with one
choice, keyed by API key, path and body (lmgw.streams.coalesce_key)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from lmgw.http.types import Request
from lmgw.streams import coalesce_key

CHAT = "/v1/chat/completions"


def req(body: Any, path: str = CHAT, key: str | None = None) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = Request("POST", path, "", [], raw)
    if key is not None:
        r.principal = SimpleNamespace(name=key)
    return r


BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0},
        {"temperature": 0.0, "n": 1},
        {"seed": 3},
        {"temperature": 1.2, "seed": 0},
    ],
)
def test_deterministic_requests_have_a_key(extra: dict) -> None:
    assert coalesce_key(req({**BASE, **extra})) is not None


@pytest.mark.parametrize(
    "extra",
    [
        {},  # the engine's default temperature samples
        {"temperature": 0.5},
        {"temperature": 0, "n": 2},
        {"temperature": 0, "best_of": 3},
        {"temperature": 0, "use_beam_search": True},
    ],
)
def test_requests_meant_to_differ_have_none(extra: dict) -> None:
    assert coalesce_key(req({**BASE, **extra})) is None


def test_unreadable_bodies_have_none() -> None:
    for body in (b"{", b"[]", b'{"temperature": "zero"}', b""):
        assert coalesce_key(req(body)) is None


def test_the_key_names_the_api_key_the_path_and_the_body() -> None:
    body = {**BASE, "temperature": 0}
    k = coalesce_key(req(body))
    assert k == coalesce_key(req(body))
    assert k != coalesce_key(req(body, key="alice"))
    assert coalesce_key(req(body, key="alice")) != coalesce_key(req(body, key="bob"))
    assert k != coalesce_key(req(body, path="/v1/completions"))
    assert k != coalesce_key(req({**body, "max_tokens": 5}))
