"""Issue 11: metrics present and moving after traffic, request ids and the access log, the
dashboard's HTTP and WebSocket routes (auth included) on both front-door servers, and
OpenTelemetry spans with ``traceparent`` reaching the workers."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import MODEL, http_request, metric_value, open_stream
from ws_support import Rejected, WSClient

from lmgw.config import (
    AdminConfig,
    DashboardConfig,
    GatewayConfig,
    HealthConfig,
    LoggingConfig,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "observe me " * 8}],
    "max_tokens": 6,
    "stream": True,
}


async def start(nursery: trio.Nursery, workers: list[WorkerConfig], **sections: Any) -> str:
    """A gateway on port 0 in front of ``workers``; ``sections`` are GatewayConfig fields."""
    sections.setdefault("server", ServerConfig(port=0))
    sections.setdefault("health", HealthConfig(interval_s=30.0))
    gw = Gateway(GatewayConfig(workers=workers, **sections))
    await nursery.start(gw.run)
    return gw


def url_of(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.port}"


async def scrape(url: str) -> str:
    r = await http_request(url, "GET", "/metrics")
    assert r.status == 200
    return r.body.decode()


# -- metrics -------------------------------------------------------------------------------------


async def test_metrics_present_and_moving_after_traffic(gateway) -> None:
    g = await gateway(2, health_interval_s=0.2)
    before = await g.metrics()
    n = 6
    for _ in range(n):
        r = await g.request("POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
    text = await g.metrics()
    # every metric of the list is exported
    for name in (
        "lmgw_requests_total", "lmgw_time_to_first_token_seconds",
        "lmgw_time_per_output_token_seconds", "lmgw_request_duration_seconds",
        "lmgw_queue_time_seconds", "lmgw_stage_duration_seconds", "lmgw_requests_in_flight",
        "lmgw_admission_queue_depth", "lmgw_worker_in_flight", "lmgw_routing_decisions_total",
        "lmgw_cache_hits_total", "lmgw_upstream_pool_events_total",
        "lmgw_upstream_pool_connections", "lmgw_worker_state_transitions_total",
    ):  # fmt: skip
        assert f"# TYPE {name} " in text, name

    def moved(sample: str) -> float:
        return metric_value(text, sample) - metric_value(before, sample)

    ok = 'lmgw_requests_total{endpoint="chat",model="sim-model",flow="pd",status="200"}'
    assert moved(ok) == n
    assert moved('lmgw_time_to_first_token_seconds_count{model="sim-model"}') == n
    assert moved('lmgw_time_per_output_token_seconds_count{model="sim-model"}') == n
    assert moved('lmgw_request_duration_seconds_count{endpoint="chat",model="sim-model"}') == n
    legs = sum(
        moved(f'lmgw_stage_duration_seconds_count{{role="pd",worker="w{i}"}}') for i in (0, 1)
    )
    assert legs == n
    assert moved('lmgw_routing_decisions_total{role="pd",policy="round_robin",reason="pick"}') == n
    pool = moved('lmgw_upstream_pool_events_total{event="reuse"}') + moved(
        'lmgw_upstream_pool_events_total{event="connect"}'
    )
    assert pool >= n
    idle = 'lmgw_upstream_pool_connections{role="pd",worker="w%d",state="idle"}'
    assert sum(metric_value(text, idle % i) for i in (0, 1)) >= 1
    moves = 'lmgw_worker_state_transitions_total{role="pd",worker="w%d",from="%s",to="%s"}'
    for i in (0, 1):
        assert metric_value(text, moves % (i, "new", "starting")) == 1
        assert metric_value(text, moves % (i, "starting", "healthy")) == 1
        assert f'lmgw_worker_kv_cache_usage{{role="pd",worker="w{i}"}}' in text
    # the engines' prefix caches (scraped from the workers' /metrics by the health rounds)
    with trio.fail_after(5):
        while metric_value(text, 'lmgw_cache_queries_total{tier="prefix"}') <= 0:
            await trio.sleep(0.1)
            text = await g.metrics()
    assert metric_value(text, 'lmgw_cache_hits_total{tier="prefix"}') >= 0
    # worker health transitions move too
    g.gateway.drain_worker("w1")
    text = await g.metrics()
    drained = (
        'lmgw_worker_state_transitions_total{role="pd",worker="w1",from="healthy",to="draining"}'
    )
    assert metric_value(text, drained) == 1


async def test_process_series_tasks_and_client_connections(gateway, server: str) -> None:
    g = await gateway(1)
    text = await g.metrics()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds",
                 "lmgw_tasks"):  # fmt: skip
        assert metric_value(text, name, default=None) > 0, name
    tasks = metric_value(text, "lmgw_tasks")
    if server == "hypercorn":  # it does not say how many connections it holds
        assert "\nlmgw_client_connections " not in text
        return
    base = metric_value(text, "lmgw_client_connections", default=None)
    held = [await open_stream(g.url) for _ in range(3)]  # accepted, no request yet
    try:
        with trio.fail_after(5):
            while metric_value(text, "lmgw_client_connections") < base + 3:
                await trio.sleep(0.02)
                text = await g.metrics()
        if server == "native":  # one task per connection (the lane's hold none)
            assert metric_value(text, "lmgw_tasks") >= tasks + 3
    finally:
        for stream in held:
            await stream.aclose()
    with trio.fail_after(5):  # closed ones are gone from both counts
        while metric_value(text, "lmgw_client_connections") > base or (
            metric_value(text, "lmgw_tasks") > tasks
        ):
            await trio.sleep(0.02)
            text = await g.metrics()


async def test_queue_time_observed_under_the_concurrency_cap(gateway) -> None:
    g = await gateway(1, speed=100.0, limits={"max_concurrent_requests": 1, "queue_size": 8})
    body = {**CHAT, "max_tokens": 10}
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(g.request, "POST", "/v1/chat/completions", body)
    text = await g.metrics()
    assert metric_value(text, "lmgw_queue_time_seconds_count") == 3
    assert metric_value(text, "lmgw_queue_time_seconds_sum") > 0  # two of them waited


async def test_retry_decisions_and_request_ids_in_logs(
    nursery: trio.Nursery, sim_worker, caplog: pytest.LogCaptureFixture
) -> None:
    bad = await sim_worker(faults={"error_rate": 1.0})
    good = await sim_worker()
    gw = await start(
        nursery,
        [WorkerConfig(url=bad.url, id="bad"), WorkerConfig(url=good.url, id="good")],
        logging=LoggingConfig(access_log=True, access_log_sample=0.0),
    )
    caplog.set_level(logging.INFO, logger="lmgw")
    for i in range(4):
        r = await http_request(
            url_of(gw), "POST", "/v1/chat/completions", CHAT, {"x-request-id": f"obs-{i}"}
        )
        assert r.status == 200 and r.headers["x-request-id"] == f"obs-{i}"
    text = await scrape(url_of(gw))
    retried = metric_value(
        text, 'lmgw_routing_decisions_total{role="pd",policy="round_robin",reason="retry"}'
    )
    assert retried >= 1
    # the retry's log record names the request (a field of its own in JSON logs)
    retries = [r for r in caplog.records if "retrying on" in r.getMessage()]
    assert retries and all(getattr(r, "request_id", "").startswith("obs-") for r in retries)
    # the access log: sample 0 writes errors only, and these requests all succeeded
    assert [r for r in caplog.records if r.name == "lmgw.access"] == []
    r = await http_request(url_of(gw), "POST", "/v1/chat/completions", {"model": "nope"})
    assert r.status in (400, 404)
    access = [r for r in caplog.records if r.name == "lmgw.access"]
    assert len(access) == 1 and access[0].status == r.status and access[0].request_id
    # and the dashboard's error ring has it
    assert gw.recent_errors.latest()[0]["status"] == r.status


async def test_access_log_sampling_writes_everything_at_one(
    nursery: trio.Nursery, sim_worker, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await sim_worker()
    gw = await start(
        nursery,
        [WorkerConfig(url=sim.url)],
        logging=LoggingConfig(access_log=True, access_log_sample=1.0),
    )
    caplog.set_level(logging.INFO, logger="lmgw.access")
    for _ in range(3):
        assert (await http_request(url_of(gw), "POST", "/v1/chat/completions", CHAT)).status == 200
    access = [r for r in caplog.records if r.name == "lmgw.access"]
    assert len(access) == 3
    assert {(r.status, r.model, r.flow, r.path) for r in access} == {
        (200, MODEL, "pd", "/v1/chat/completions")
    }


# -- the dashboard: HTTP and WebSocket -----------------------------------------------------------


async def test_dashboard_routes_and_live_feed(gateway) -> None:
    g = await gateway(2)
    page = await g.request("GET", "/dashboard")
    assert page.status == 200 and b"<canvas" in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert b"http://" not in page.body and b"https://" not in page.body  # no CDN
    for asset in ("dashboard.js", "dashboard.css", "favicon.svg"):
        r = await g.request("GET", f"/dashboard/static/{asset}")
        assert r.status == 200 and r.body, asset
    snap = (await g.request("GET", "/dashboard/snapshot")).json()
    assert [w["id"] for w in snap["workers"]["pd"]] == ["w0", "w1"]
    assert (await g.request("GET", "/dashboard/ws")).status == 426

    ws_url = g.url.replace("http://", "ws://") + "/dashboard/ws"
    async with await WSClient.connect(ws_url) as ws:
        first = msgspec.json.decode(await ws.receive())
        assert first["type"] == "snapshot"
        assert {w["id"]: w["state"] for w in first["workers"]["pd"]} == {
            "w0": "healthy",
            "w1": "healthy",
        }
        for _ in range(3):
            r = await g.request("POST", "/v1/chat/completions", CHAT)
            assert r.status == 200
        with trio.fail_after(5):  # a later snapshot shows the traffic
            while True:
                snap = msgspec.json.decode(await ws.receive())
                if snap["totals"]["requests"] >= 3:
                    break
        assert snap["latency"]["ttft"]["count"] == 3
        assert sum(w["total_requests"] for w in snap["workers"]["pd"]) == 3
        assert snap["stages"]["pd"]["duration"]["p50"] > 0
        assert any(r["reason"] == "pick" and r["total"] == 3 for r in snap["routing"])
    with pytest.raises(Rejected) as info:
        await WSClient.connect(g.url.replace("http://", "ws://") + "/dashboard/nope")
    assert info.value.status in (403, 404)  # hypercorn turns a pre-accept close into 403


async def test_dashboard_needs_the_admin_token(nursery: trio.Nursery, sim_worker) -> None:
    sim = await sim_worker()
    gw = await start(nursery, [WorkerConfig(url=sim.url)], admin=AdminConfig(token="s3cret"))
    url = url_of(gw)
    ws_url = url.replace("http://", "ws://") + "/dashboard/ws"
    for path in ("/dashboard", "/dashboard/snapshot", "/dashboard/static/dashboard.js"):
        r = await http_request(url, "GET", path)
        assert r.status == 401 and r.headers["www-authenticate"] == "Bearer", path
    assert (await http_request(url, "GET", "/dashboard?token=wrong")).status == 401
    r = await http_request(url, "GET", "/dashboard?token=s3cret")
    assert r.status == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    jar = {"cookie": cookie.split(";", 1)[0]}
    assert (await http_request(url, "GET", "/dashboard", headers=jar)).status == 200
    bearer = {"authorization": "Bearer s3cret"}
    assert (await http_request(url, "GET", "/dashboard/snapshot", headers=bearer)).status == 200
    with pytest.raises(Rejected) as info:
        await WSClient.connect(ws_url)
    assert info.value.status == 401
    with pytest.raises(Rejected) as info:  # another site's page, even with the cookie
        await WSClient.connect(ws_url, {**jar, "origin": "http://evil.example"})
    assert info.value.status == 403
    async with await WSClient.connect(ws_url, {**jar, "origin": url}) as ws:
        assert msgspec.json.decode(await ws.receive())["type"] == "snapshot"


async def test_dashboard_limits_viewers_and_can_be_off(nursery: trio.Nursery, sim_worker) -> None:
    sim = await sim_worker()
    gw = await start(
        nursery,
        [WorkerConfig(url=sim.url)],
        dashboard=DashboardConfig(interval_s=0.05, window_s=1.0, max_subscribers=1),
    )
    ws_url = url_of(gw).replace("http://", "ws://") + "/dashboard/ws"
    async with await WSClient.connect(ws_url) as first:
        assert await first.receive() is not None
        async with await WSClient.connect(ws_url) as second:
            assert await second.receive() is None and second.close_code == 1013
        # a viewer that stops reading is dropped, and the feed goes on for nobody
        feed = gw.dashboard.feed
        with trio.fail_after(10):
            while feed.dropped == 0:
                await trio.sleep(0.05)
        assert feed.subscribers == 0
    off = await start(
        nursery, [WorkerConfig(url=sim.url)], dashboard=DashboardConfig(enabled=False)
    )
    assert (await http_request(url_of(off), "GET", "/dashboard")).status == 404
    assert off.dashboard is None


# -- tracing -------------------------------------------------------------------------------------


def _traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"


async def test_spans_per_request_and_stage_reach_the_workers(
    nursery: trio.Nursery, sim_worker
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    prefill = await sim_worker(role="p")
    decode = await sim_worker(role="d")
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30.0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-nixl")],
        workers=[
            WorkerConfig(url=prefill.url, role="p", id="p0", kv_address=prefill.sim.kv_address),
            WorkerConfig(url=decode.url, role="d", id="d0", kv_address=decode.sim.kv_address),
        ],
    )
    gw = Gateway(cfg, tracer_provider=provider)
    await nursery.start(gw.run)
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    client_parent = "00f067aa0ba902b7"
    r = await http_request(
        url_of(gw),
        "POST",
        "/v1/chat/completions",
        CHAT,
        {"traceparent": f"00-{client_trace}-{client_parent}-01", "tracestate": "vendor=x"},
    )
    assert r.status == 200, r.body
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"lmgw chat", "lmgw prefill p0", "lmgw decode d0"}, list(spans)
    root, p_leg, d_leg = spans["lmgw chat"], spans["lmgw prefill p0"], spans["lmgw decode d0"]
    # the request span continues the client's trace; the legs are its children
    assert root.kind is SpanKind.SERVER and f"{root.context.trace_id:032x}" == client_trace
    assert f"{root.parent.span_id:016x}" == client_parent
    for leg in (p_leg, d_leg):
        assert leg.kind is SpanKind.CLIENT and leg.parent.span_id == root.context.span_id
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["lmgw.flow"] == "p/d"
    # each worker received its own leg's traceparent (and the client's tracestate)
    p_headers = (await prefill.stats())["last_headers"]
    d_headers = (await decode.stats())["last_headers"]
    assert p_headers["traceparent"] == _traceparent(p_leg)
    assert d_headers["traceparent"] == _traceparent(d_leg)
    assert d_headers["tracestate"] == "vendor=x"
    provider.shutdown()


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys; from lmgw.config import GatewayConfig; from lmgw.gateway import Gateway;"
        "gw = Gateway(GatewayConfig()); assert gw.tracing is None and gw.access_log is None;"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tracing_without_the_sdk_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmgw.config import ConfigError, TracingConfig

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigError, match="opentelemetry"):
        Gateway(GatewayConfig(tracing=TracingConfig(enabled=True, exporter="console")))
