"""The sans-IO parts of issue 11: histogram quantiles and the dashboard's window, the error
ring, the engines' cache totals, routing-decision readings, JSON log lines, the access log's
sampling, the parser's WebSocket upgrade and the feed's slow-subscriber drop."""

from __future__ import annotations

import json
import logging
import math

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lmgw.config import DashboardConfig, GatewayConfig, RoutingConfig
from lmgw.dashboard.feed import QUEUE, Feed
from lmgw.dashboard.snapshot import RecentErrors, SnapshotBuilder, merged_counts, quantile
from lmgw.fleetstats import EngineCacheTotals
from lmgw.gateway import Gateway
from lmgw.http.h1 import H1Connection, ProtocolError
from lmgw.http.types import Request, UpgradeRequest
from lmgw.http.websocket import handshake_problem, same_origin
from lmgw.logs import AccessLog, JsonFormatter, TextFormatter
from lmgw.metrics import Histogram
from lmgw.workers.worker import Worker

BOUNDS = (0.01, 0.1, 1.0)


def test_quantile_interpolates_within_buckets() -> None:
    assert quantile(BOUNDS, [0, 0, 0, 0], 0.5) is None
    assert quantile(BOUNDS, [10, 0, 0, 0], 0.5) == pytest.approx(0.005)
    assert quantile(BOUNDS, [0, 10, 0, 0], 0.5) == pytest.approx(0.055)
    assert quantile(BOUNDS, [5, 5, 0, 0], 0.99) == pytest.approx(0.01 + 0.09 * 0.98)
    assert quantile(BOUNDS, [0, 0, 0, 3], 0.5) == 1.0  # +Inf: the highest finite bound


@given(st.lists(st.integers(0, 50), min_size=4, max_size=4), st.floats(0.01, 1.0))
def test_quantile_is_monotonic_and_bounded(counts: list[int], q: float) -> None:
    v = quantile(BOUNDS, counts, q)
    if sum(counts) == 0:
        assert v is None
        return
    assert 0.0 <= v <= BOUNDS[-1]
    lower = quantile(BOUNDS, counts, q / 2)
    assert lower is not None and lower <= v + 1e-12


def test_merged_counts_filter_on_a_label() -> None:
    h = Histogram("x", "x", ("role", "worker"), buckets=BOUNDS)
    h.observe(("p", "a"), 0.005)
    h.observe(("p", "b"), 0.5)
    h.observe(("d", "c"), 5.0)
    assert merged_counts(h) == [1, 0, 1, 1]
    assert merged_counts(h, 0, "p") == [1, 0, 1, 0]
    assert merged_counts(h, 0, "e") == [0, 0, 0, 0]


def test_snapshot_percentiles_cover_the_window_only() -> None:
    gw = Gateway(GatewayConfig())
    b = SnapshotBuilder(gw, interval_s=1.0, window_s=3.0)
    for _ in range(100):  # old, slow traffic
        gw.metrics.ttft.observe(("m",), 5.0)
    b.tick(0.0)
    for t in (1.0, 2.0, 3.0):
        for _ in range(10):
            gw.metrics.ttft.observe(("m",), 0.002)
        gw.metrics.requests.inc(("chat", "m", "pd", "200"), 10)
        b.tick(t)
    snap = b.snapshot()
    # still in the window (t=0 reading is the oldest kept): only the 30 fast ones count
    ttft = snap["latency"]["ttft"]
    assert ttft["count"] == 30 and ttft["p99"] < 0.0025
    assert snap["rates"]["requests_per_s"] == pytest.approx(10.0)
    b.tick(4.0)  # the window slides: the t=1 reading is now the oldest
    assert b.snapshot()["latency"]["ttft"]["count"] == 20
    assert json.loads(json.dumps(snap))  # plain JSON


def test_recent_errors_ring_keeps_the_newest() -> None:
    ring = RecentErrors(3, clock=lambda: 1.0)
    for i in range(5):
        ring.add(500 + i, f"boom {i}", request_id=f"r{i}", model="m")
    assert ring.total == 5
    assert [e["request_id"] for e in ring.latest()] == ["r4", "r3", "r2"]
    ring.add(0, "x" * 2000, worker="w1")
    assert len(ring.latest(1)[0]["message"]) == 500 and ring.latest(1)[0]["worker"] == "w1"


def test_engine_cache_totals_only_grow() -> None:
    a, b = Worker("a", "http://127.0.0.1:1", "pd"), Worker("b", "http://127.0.0.1:2", "pd")
    totals = EngineCacheTotals()
    a.engine.prefix_hits, a.engine.prefix_queries = 10, 40
    b.engine.prefix_hits, b.engine.prefix_queries = 5, 10
    assert totals.update([a, b]) == (15, 50)
    a.engine.prefix_hits, a.engine.prefix_queries = 12, 50
    assert totals.update([a, b]) == (17, 60)
    a.engine.prefix_hits, a.engine.prefix_queries = 1, 2  # a restarted: its counters reset
    assert totals.update([a, b]) == (18, 62)
    assert totals.update([a]) == (18, 62)  # b removed: nothing goes backwards
    b.engine.prefix_hits, b.engine.prefix_queries = 7, 12  # b back with its old counters
    assert totals.update([a, b]) == (25, 74)


def test_routing_decisions_by_reason_pick_and_retry() -> None:
    gw = Gateway(GatewayConfig(routing=RoutingConfig(policy="round_robin")))
    gw.pipeline.picks["pd"] = 7
    gw.metrics.retries.inc(("pd",), 2)
    assert gw.fleet_stats.decisions() == {
        ("pd", "round_robin", "pick"): 7.0,
        ("pd", "round_robin", "retry"): 2.0,
    }
    text = gw.metrics.render().decode()
    assert 'lmgw_routing_decisions_total{role="pd",policy="round_robin",reason="pick"} 7' in text
    sticky = Gateway(GatewayConfig(routing=RoutingConfig(policy="session_affinity")))
    sticky.policies["pd"].counts["new"] = 3
    sticky.pipeline.picks["pd"] = 3  # the policy's own reasons win over the pick count
    assert sticky.fleet_stats.decisions() == {("pd", "session_affinity", "new"): 3.0}


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("lmgw.pipeline", logging.WARNING, __file__, 1,
                               'request %s: "quoted"\nnext', ("r-1",), None)  # fmt: skip
    record.request_id = "r-1"
    record.worker = "w0"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == 'request r-1: "quoted"\nnext'
    assert (out["level"], out["logger"], out["request_id"], out["worker"]) == (
        "warning", "lmgw.pipeline", "r-1", "w0",
    )  # fmt: skip
    assert out["ts"].endswith("Z")
    plain = logging.LogRecord("lmgw", logging.INFO, __file__, 1, "worker gone", (), None)
    plain.request_id = "r-9"
    assert TextFormatter().format(plain).endswith("[request_id=r-9]")


def test_access_log_samples_successes_and_keeps_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmgw.access")
    log = AccessLog(0.25)
    draws = iter([0.1, 0.3, 0.2, 0.9] * 25)
    log._random = lambda: next(draws)
    for _ in range(100):
        log.record("1.2.3.4:5", "POST", "/v1/chat/completions", 200, "r", "m", "pd", 0.01)
    assert len(caplog.records) == 50  # draws under 0.25: two of every four
    caplog.clear()
    for status in (400, 503):
        AccessLog(0.0).record("c", "POST", "/v1/completions", status, "r", "m", "pd", 0.5)
    assert [r.status for r in caplog.records] == [400, 503]
    assert caplog.records[0].duration_ms == 500.0


WS_HEAD = (
    b"GET /dashboard/ws HTTP/1.1\r\nHost: gw:8000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("split", [0, 1, 30, len(WS_HEAD) - 1])
def test_parser_hands_over_a_websocket_upgrade(split: int) -> None:
    conn = H1Connection()
    frame = b"\x81\x85abcdEFGHI"
    data = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + WS_HEAD + frame
    cut = len(data) - len(WS_HEAD) - len(frame) + split
    conn.receive_data(data[:cut])
    conn.receive_data(data[cut:])
    first, second = conn.next_event(), conn.next_event()
    assert type(first) is Request and first.path == "/health"
    assert isinstance(second, UpgradeRequest) and second.path == "/dashboard/ws"
    assert second.trailing == frame and not second.keep_alive
    assert handshake_problem(second) is None
    conn.receive_data(b"more frames are not HTTP")  # ignored: the socket is handed over
    assert conn.next_event() is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    ],
)
def test_other_upgrades_are_still_refused(head: bytes) -> None:
    conn = H1Connection()
    conn.receive_data(head)
    ev = conn.next_event()
    assert isinstance(ev, ProtocolError) and ev.status == 400


def test_handshake_checks() -> None:
    def req(**headers: str) -> Request:
        base = {"upgrade": "websocket", "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "host": "gw:1"}  # fmt: skip
        base.update(headers)
        hs = [(k.encode(), v.encode()) for k, v in base.items() if v]
        return Request("GET", "/dashboard/ws", "", hs, b"")

    assert handshake_problem(req()) is None
    assert "version" in handshake_problem(req(**{"sec-websocket-version": "8"}))
    assert "Key" in handshake_problem(req(**{"sec-websocket-key": "short"}))
    assert same_origin(req()) and same_origin(req(origin="http://gw:1"))
    assert not same_origin(req(origin="http://evil:1"))


async def test_feed_drops_a_subscriber_that_stops_reading() -> None:
    gw = Gateway(GatewayConfig())
    feed = Feed(gw, DashboardConfig(max_subscribers=2))
    slow = feed.subscribe()
    fast = feed.subscribe()
    assert slow is not None and fast is not None and feed.subscribe() is None  # full up
    got = [await fast.receive()]  # the snapshot given on subscribing
    for i in range(QUEUE + 1):
        feed.publish(f"s{i}")
        got.append(await fast.receive())
    assert got[1:] == [f"s{i}" for i in range(QUEUE + 1)]
    assert feed.dropped == 1 and feed.subscribers == 1
    queued = [slow.receive_nowait() for _ in range(QUEUE)]
    assert json.loads(queued[0])["type"] == "snapshot"
    with pytest.raises(trio.EndOfChannel):
        slow.receive_nowait()
    await fast.aclose()
    feed.publish("x")  # a subscriber that left is forgotten
    assert feed.subscribers == 0 and feed.dropped == 1
    assert math.isfinite(gw.dashboard.feed.interval_s)
