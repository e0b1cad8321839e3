"""Model routes through a real gateway and simulated workers: one name split between models
by weight (exact shares) or by session (sticky), falling back to other models when the one
chosen cannot serve, changed at run time through the admin API."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
from gateway_support import GatewayFactory, metric_value

from lmgw.config import AdminConfig, ApiKeyConfig, AuthConfig, ModelRouteConfig, RouteTargetConfig

pytestmark = pytest.mark.parametrize("server", ["native"])

TOKEN = "admin-secret"
A, B, C = "model-a", "model-b", "model-c"


def _route(name: str, *targets: tuple[str, float], **kw: Any) -> ModelRouteConfig:
    return ModelRouteConfig(
        model=name, targets=[RouteTargetConfig(model=m, weight=w) for m, w in targets], **kw
    )


def _chat(model: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": stream,
        **extra,
    }


async def _fleet(gateway: GatewayFactory, *routes: ModelRouteConfig, **kw: Any) -> Any:
    """One simulated worker per model (w0: A, w1: B, w2: C) and the routes."""
    per_worker = kw.pop("per_worker", [{"model": A}, {"model": B}, {"model": C}])
    return await gateway(
        per_worker=per_worker, model_routes=routes, admin=AdminConfig(token=TOKEN), **kw
    )


async def _served_by(gw: Any, n: int, model: str = "chat", **extra: Any) -> list[str]:
    out = []
    for _ in range(n):
        r = await gw.request("POST", "/v1/chat/completions", _chat(model, **extra))
        assert r.status == 200, r.body
        out.append(r.json()["model"])
    return out


async def test_weights_split_requests_exactly_and_workers_get_their_own_name(
    gateway: GatewayFactory,
) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 3), (B, 1)))
    served = await _served_by(gw, 8)
    assert Counter(served) == {A: 6, B: 2}  # exact over every window of 4, not on average
    assert served[:4].count(B) == 1
    stats = [await s.stats() for s in gw.sims[:2]]
    assert [st["requests_total"] for st in stats] == [6, 2]  # each worker saw its model's name
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_model_route_requests_total{route="chat",target="model-a"}') == 6
    assert metric_value(text, 'lmgw_model_route_requests_total{route="chat",target="model-b"}') == 2
    # the request's own metrics name the model that served it
    assert metric_value(
        text, 'lmgw_requests_total{endpoint="chat",model="model-b",flow="pd",status="200"}'
    ) == 2  # fmt: skip


async def test_a_session_stays_on_one_model(gateway: GatewayFactory) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1), (B, 1), split="session"))
    per_user = {}
    for user in (f"user-{i}" for i in range(12)):
        served = set(await _served_by(gw, 3, user=user))
        assert len(served) == 1, (user, served)
        per_user[user] = served.pop()
    assert set(per_user.values()) == {A, B}  # 12 users hash to both halves


async def test_a_model_without_a_routable_worker_falls_back(gateway: GatewayFactory) -> None:
    """A's only worker refuses everything (its probe fails: no routable worker): requests go
    to the fallback B, streamed or not, with B's answer; the fallback is counted."""
    gw = await _fleet(
        gateway,
        _route("chat", (A, 1), fallbacks=[B]),
        per_worker=[{"model": A, "faults": {"refuse": True}}, {"model": B}, {"model": C}],
        health_interval_s=0.1,
    )
    assert await _served_by(gw, 3) == [B, B, B]
    r = await gw.request("POST", "/v1/chat/completions", _chat("chat", stream=True))
    assert r.status == 200
    events = r.events()
    assert events[-1] == "[DONE]" and events[0]["model"] == B
    text = await gw.metrics()
    sample = 'lmgw_model_route_fallbacks_total{route="chat",from="model-a",to="model-b"}'
    assert metric_value(text, sample) == 4


async def test_failing_workers_fall_back_and_the_last_model_answers_its_error(
    gateway: GatewayFactory,
) -> None:
    """A's worker answers 500s: the request ends on B. With B failing too and nothing after
    it, the client gets the error of B, the last model tried (not a hang)."""
    gw = await _fleet(
        gateway,
        _route("chat", (A, 1), fallbacks=[B]),
        per_worker=[{"model": A, "faults": {"error_rate": 1.0}}, {"model": B}, {"model": C}],
    )
    assert await _served_by(gw, 2) == [B, B]
    await gw.sims[1].set_faults(error_rate=1.0)
    r = await gw.request("POST", "/v1/chat/completions", _chat("chat"))
    assert r.status == 502
    assert "Simulated engine failure" in r.json()["error"]["message"]


async def test_client_errors_do_not_fall_back(gateway: GatewayFactory) -> None:
    """A 4xx is the request's fault, and would be the same on any model: no fallback."""
    gw = await _fleet(gateway, _route("chat", (A, 1), fallbacks=[B]))
    bad = _chat("chat", response_format={"type": "json_schema"})  # no schema: the worker's 400
    r = await gw.request("POST", "/v1/chat/completions", bad)
    assert 400 <= r.status < 500, r.body
    stats = await gw.sims[1].stats()
    assert stats["requests_total"] == 0


async def test_a_target_nobody_serves_falls_back_or_is_a_503(gateway: GatewayFactory) -> None:
    gw = await _fleet(
        gateway,
        _route("chat", ("model-gone", 1), fallbacks=[B]),
        _route("lonely", ("model-gone", 1)),
    )
    assert await _served_by(gw, 1) == [B]
    r = await gw.request("POST", "/v1/chat/completions", _chat("lonely"))
    assert r.status == 503
    assert "model-gone" in r.json()["error"]["message"]


async def test_the_admin_api_moves_weights_at_run_time(gateway: GatewayFactory) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1)))
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = await gw.request("GET", "/admin/model_routes", headers=auth)
    assert r.status == 200
    assert [d["model"] for d in r.json()["data"]] == ["chat"]
    assert await _served_by(gw, 2) == [A, A]
    body = {"targets": [{"model": A, "weight": 1}, {"model": B, "weight": 1}], "fallbacks": [C]}
    r = await gw.request("PUT", "/admin/model_routes/chat", body, headers=auth)
    assert r.status == 200, r.body
    got = r.json()
    assert [t["share"] for t in got["targets"]] == [0.5, 0.5] and got["fallbacks"] == [C]
    assert Counter(await _served_by(gw, 4)) == {A: 2, B: 2}
    # a new route, then its removal
    r = await gw.request(
        "PUT", "/admin/model_routes/beta", {"targets": [{"model": C}]}, headers=auth
    )
    assert r.status == 201
    assert await _served_by(gw, 1, model="beta") == [C]
    r = await gw.request("GET", "/admin/model_routes/chat", headers=auth)
    assert r.json()["requests"] == {A: 2, B: 2}
    r = await gw.request("DELETE", "/admin/model_routes/beta", headers=auth)
    assert r.status == 200
    r = await gw.request("POST", "/v1/chat/completions", _chat("beta"))
    assert r.status == 404
    r = await gw.request("DELETE", "/admin/model_routes/beta", headers=auth)
    assert r.status == 404


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"targets": []}, "at least one target"),
        ({"targets": [{"model": A, "weight": 0}]}, "weight above 0"),
        ({"targets": [{"model": A, "weight": -1}]}, "between 0 and 1e9"),
        ({"targets": [{"model": A}, {"model": A}]}, "listed twice"),
        ({"targets": [{"model": "other"}]}, "is a model route"),
        ({"targets": [{"model": A}], "split": "coin"}, "split must be"),
        ({"targets": [{"model": A}], "color": "red"}, "invalid request body"),
        ({"targets": [{"model": A}], "model": "elsewhere"}, "the path"),
    ],
)
async def test_bad_route_definitions_are_400s(
    gateway: GatewayFactory, body: dict[str, Any], words: str
) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1)), _route("other", (B, 1)))
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = await gw.request("PUT", "/admin/model_routes/chat", body, headers=auth)
    assert r.status == 400, r.body
    assert words in r.json()["error"]["message"]
    r = await gw.request("GET", "/admin/model_routes/chat", headers=auth)
    assert r.json()["targets"][0]["model"] == A  # unchanged


async def test_the_admin_api_needs_the_token(gateway: GatewayFactory) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1)))
    for method, body in (("GET", None), ("PUT", {"targets": [{"model": B}]}), ("DELETE", None)):
        r = await gw.request(method, "/admin/model_routes/chat", body)
        assert r.status in (401, 403), (method, r.status)
    assert await _served_by(gw, 1) == [A]


async def test_models_lists_routes_and_keys_allow_them_by_name(gateway: GatewayFactory) -> None:
    keys = AuthConfig(
        keys=[
            ApiKeyConfig(key="k-route-0123456789abcdef", name="route-user", models=["chat"]),
            ApiKeyConfig(key="k-a-only-0123456789abcdef", name="a-user", models=[A]),
        ]
    )
    gw = await _fleet(gateway, _route("chat", (A, 1), (B, 3)), auth=keys)
    route_key = {"authorization": "Bearer k-route-0123456789abcdef"}
    a_key = {"authorization": "Bearer k-a-only-0123456789abcdef"}
    r = await gw.request("GET", "/v1/models", headers=route_key)
    listed = {m["id"]: m for m in r.json()["data"]}
    assert set(listed) == {"chat"} and listed["chat"]["root"] == B
    r = await gw.request("POST", "/v1/chat/completions", _chat("chat"), headers=route_key)
    assert r.status == 200
    r = await gw.request("POST", "/v1/chat/completions", _chat("chat"), headers=a_key)
    assert r.status == 403
    r = await gw.request("POST", "/v1/chat/completions", _chat(A), headers=a_key)
    assert r.status == 200


async def test_a_route_may_stand_in_front_of_a_model_of_its_name(
    gateway: GatewayFactory,
) -> None:
    """A route named as a served model wraps it: that name now falls back when its own
    workers cannot serve, on the relayed endpoints (embeddings) too."""
    gw = await _fleet(
        gateway,
        _route(A, (A, 1), fallbacks=[B]),
        per_worker=[{"model": A, "faults": {"error_rate": 1.0}}, {"model": B}, {"model": C}],
    )
    assert await _served_by(gw, 2, model=A) == [B, B]
    r = await gw.request("POST", "/v1/embeddings", {"model": A, "input": "hi"})
    assert r.status == 200, r.body
    assert r.json()["model"] == B
    text = await gw.metrics()
    sample = 'lmgw_model_route_fallbacks_total{route="model-a",from="model-a",to="model-b"}'
    assert metric_value(text, sample) == 3


# -- mirrors (lmgw.mirrors) ----------------------------------------------------------------------


async def _mirrored(gw: Any, sample_outcome: str, n: int) -> str:
    """/metrics once ``n`` copies to model B ended with ``sample_outcome`` (they run in the
    background, after the client's answer)."""
    sample = (
        f'lmgw_mirror_requests_total{{route="chat",model="model-b",outcome="{sample_outcome}"}}'
    )
    with trio.fail_after(5):
        while True:
            text = await gw.metrics()
            if metric_value(text, sample) >= n:
                assert metric_value(text, sample) == n
                return text
            await trio.sleep(0.02)


async def test_a_mirror_gets_copies_of_its_share_and_clients_see_only_the_target(
    gateway: GatewayFactory,
) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1), mirror=B, mirror_share=0.5))
    assert await _served_by(gw, 3) == [A, A, A]
    r = await gw.request("POST", "/v1/chat/completions", _chat("chat", stream=True))
    assert r.events()[0]["model"] == A and r.events()[-1] == "[DONE]"
    text = await _mirrored(gw, "ok", 2)  # every second request, the stream included
    assert 'lmgw_mirror_request_seconds_count{model="model-b"} 2' in text
    stats = [await s.stats() for s in gw.sims[:2]]
    assert stats[0]["requests_total"] == 4 and stats[1]["requests_total"] == 2
    assert all(rid.endswith("-mirror") for rid in stats[1]["request_ids"])
    assert not any(rid.endswith("-mirror") for rid in stats[0]["request_ids"])
    # copies are not client requests
    copies = 'lmgw_requests_total{endpoint="chat",model="model-b",flow="pd",status="200"}'
    assert metric_value(text, copies) == 0


async def test_a_failing_or_missing_mirror_never_touches_the_client(
    gateway: GatewayFactory,
) -> None:
    gw = await _fleet(
        gateway,
        _route("chat", (A, 1), mirror=B),
        per_worker=[{"model": A}, {"model": B, "faults": {"error_rate": 1.0}}, {"model": C}],
    )
    assert await _served_by(gw, 2) == [A, A]
    await _mirrored(gw, "error", 2)
    # no copy at all while the service cannot take one: skipped, counted
    gw.gateway.mirrors.max_in_flight = 0
    assert await _served_by(gw, 1) == [A]
    await _mirrored(gw, "skipped", 1)


async def test_the_admin_api_sets_a_mirror(gateway: GatewayFactory) -> None:
    gw = await _fleet(gateway, _route("chat", (A, 1)))
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"targets": [{"model": A}], "mirror": B, "mirror_share": 1.0}
    r = await gw.request("PUT", "/admin/model_routes/chat", body, headers=auth)
    assert r.status == 200 and r.json()["mirror"] == B
    assert await _served_by(gw, 1) == [A]
    await _mirrored(gw, "ok", 1)
    r = await gw.request("GET", "/admin/model_routes/chat", headers=auth)
    assert r.json()["mirrored"] == 1
    for bad, words in (({"mirror_share": 0}, "mirror_share"), ({"mirror": "chat2"}, "route")):
        await gw.request(
            "PUT", "/admin/model_routes/chat2", {"targets": [{"model": C}]}, headers=auth
        )
        r = await gw.request(
            "PUT", "/admin/model_routes/chat", {"targets": [{"model": A}], **bad}, headers=auth
        )
        assert r.status == 400 and words in r.json()["error"]["message"], r.body


async def test_a_prompt_too_long_for_the_model_falls_back_to_a_longer_context(
    gateway: GatewayFactory,
) -> None:
    """A's workers take 64 tokens of context, B's 4096: a long prompt gets A's 400 (vLLM's
    "maximum context length") and goes on to B; a short one stays on A."""
    gw = await _fleet(
        gateway,
        _route("chat", (A, 1), fallbacks=[B]),
        per_worker=[{"model": A, "max_model_len": 64}, {"model": B, "max_model_len": 4096},
                    {"model": C}],
    )  # fmt: skip
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}]}
    assert await _served_by(gw, 1, **long_prompt) == [B]
    assert await _served_by(gw, 1) == [A]
    r = await gw.request("POST", "/v1/chat/completions", _chat(A, **long_prompt))
    assert r.status == 400 and "maximum context length" in r.json()["error"]["message"]
