"""OpenAI error bodies, worker-error mapping and the Prometheus text."""

import json
import re
from pathlib import Path

import msgspec

from lmgw.errors import GatewayError, error_body, sse_error_event
from lmgw.metrics import Metrics
from lmgw.transport.openai_http import worker_error
from lmgw.workers.worker import Worker

W = Worker("w", "http://127.0.0.1:9", "pd")
DOCS = Path(__file__).parents[2] / "docs"


def test_error_body_shape() -> None:
    body = msgspec.json.decode(error_body(404, "no such model", param="model"))
    assert body == {
        "error": {
            "message": "no such model",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert GatewayError(504, "slow").type == "GatewayTimeoutError"
    ev = sse_error_event(502, "boom")
    assert ev.startswith(b"data: {") and ev.endswith(b"\n\ndata: [DONE]\n\n")


def test_worker_errors_keep_4xx_and_wrap_5xx() -> None:
    e = worker_error(
        W,
        400,
        b'{"error":{"message":"max_tokens too big","type":"BadRequestError",'
        b'"param":"max_tokens","code":400}}',
    )
    assert (e.status, e.message, e.param) == (400, "max_tokens too big", "max_tokens")
    old_style = worker_error(
        W, 400, b'{"object":"error","message":"bad","type":"x","param":null,"code":400}'
    )
    assert (old_style.status, old_style.message) == (400, "bad")
    e5 = worker_error(W, 500, b"Internal Server Error")
    assert e5.status == 502 and "HTTP 500" in e5.message and "Internal Server Error" in e5.message
    empty = worker_error(W, 503, b"")
    assert empty.status == 502 and "HTTP 503" in empty.message


def test_metrics_text() -> None:
    m = Metrics(in_flight=lambda: [(("pd", "w1"), 3)])
    m.requests.inc(("chat", "m", "pd", "200"))
    m.requests.inc(("chat", "m", "pd", "200"))
    m.e2e.observe(("chat", "m"), 0.003)
    text = m.render().decode()
    assert 'lmgw_requests_total{endpoint="chat",model="m",flow="pd",status="200"} 2' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="0.0025"} 0' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="0.005"} 1' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="+Inf"} 1' in text
    assert 'lmgw_request_duration_seconds_count{endpoint="chat",model="m"} 1' in text
    assert 'lmgw_worker_in_flight{role="pd",worker="w1"} 3' in text
    assert "# TYPE lmgw_time_to_first_token_seconds histogram" in text


def _documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """docs/metrics.md's tables: name -> (type, labels)."""
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\| `((?:lmgw|process|python)_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", line)
        if m:
            labels = tuple(re.findall(r"`([a-z_]+)`", m.group(3)))
            assert labels or m.group(3).strip() == "none", line
            assert m.group(1) not in out, f"{m.group(1)} listed twice"
            out[m.group(1)] = (m.group(2), labels)
    return out


def _exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    from lmgw.config import ConfigError, GatewayConfig, config_from_mapping
    from lmgw.gateway import Gateway
    from lmgw.metrics import Histogram

    def tool(x: int) -> int:
        """A native tool: the gateway then exports the tool-loop metrics too."""
        return x

    # plain, with resumable answers; with a native tool and an MCP server (not contacted:
    # the gateway is not run)
    gateways = [
        Gateway(GatewayConfig()),
        Gateway(config_from_mapping({"streams": {"resumable": True}})),
        Gateway(config_from_mapping({"routing": {"shadow_policies": ["cache_aware"]}})),
        Gateway(config_from_mapping({"hedging": {"enabled": True}})),
    ]
    try:
        mcp = config_from_mapping(
            {"tools": {"mcp": [{"name": "docs", "url": "http://127.0.0.1:9/mcp"}]}}
        )
        gateways.append(Gateway(mcp, tools=[tool]))
    except ConfigError:  # no `mcp` package: lmgw_mcp_server_up cannot be exported here
        gateways.append(Gateway(GatewayConfig(), tools=[tool]))
    return {
        m.name: ("histogram" if isinstance(m, Histogram) else m.kind, m.labelnames)
        for gw in gateways
        for m in gw.metrics._all
    }


def test_every_metric_is_documented() -> None:
    """docs/metrics.md lists every metric a gateway exports, with its type and labels, and
    nothing it does not export (kept honest here)."""
    documented, exported = _documented(), _exported()
    assert "lmgw_requests_total" in exported and len(exported) >= 30
    assert sorted(set(exported) - set(documented)) == [], "exported but not in docs/metrics.md"
    missing = set(documented) - set(exported)
    if "lmgw_mcp_server_up" not in exported:  # only with the optional `mcp` package
        missing.discard("lmgw_mcp_server_up")
    assert sorted(missing) == [], "in docs/metrics.md but not exported"
    wrong = {n: (exported[n], documented[n]) for n in exported if exported[n] != documented[n]}
    assert wrong == {}, "(exported, documented) type and labels differ"
    assert "metrics.md" in (DOCS / "operations.md").read_text(encoding="utf-8")


def test_grafana_dashboard_uses_real_metrics() -> None:
    """Every query of docs/grafana-lmgw.json names exported metrics (histograms by their
    _bucket/_sum/_count series) and only labels those metrics have."""
    exported = _exported()
    series: dict[str, tuple[str, ...]] = {}
    for name, (kind, labels) in exported.items():
        if kind == "histogram":
            series[name + "_bucket"] = (*labels, "le")
            series[name + "_sum"] = series[name + "_count"] = labels
        else:
            series[name] = labels
    board = json.loads((DOCS / "grafana-lmgw.json").read_text(encoding="utf-8"))
    exprs = [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = re.findall(r"\b(?:lmgw|process)_[a-z0-9_]+", expr)
        assert names, expr
        for name in names:
            assert name in series, f"{name} in {expr!r} is not an exported series"
            used.add(name)
        for name, selector in re.findall(r"\b(lmgw_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert label in series[name], f"{name} has no label {label} ({expr!r})"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",") if x.strip()}
            have = set().union(*(series[n] for n in names))
            # (instance and job: the labels Prometheus gives every scraped series)
            allowed = have | {"le", "instance", "job"}
            assert labels <= allowed, f"grouping by {labels - have} in {expr!r}"
    # the list: requests, TTFT, TPOT, e2e, queue, stages, load, routing, caches, pool,
    # worker health all have a panel
    for needed in (
        "lmgw_requests_total", "lmgw_time_to_first_token_seconds_bucket",
        "lmgw_time_per_output_token_seconds_bucket", "lmgw_request_duration_seconds_bucket",
        "lmgw_queue_time_seconds_bucket", "lmgw_stage_duration_seconds_bucket",
        "lmgw_requests_in_flight", "lmgw_admission_queue_depth", "lmgw_routing_decisions_total",
        "lmgw_cache_hits_total", "lmgw_upstream_pool_events_total",
        "lmgw_worker_state_transitions_total", "lmgw_worker_kv_cache_usage",
    ):  # fmt: skip
        assert needed in used, needed
