"""OpenAI error bodies, worker-error mapping and the Prometheus text."""

import msgspec

from lmgw.errors import GatewayError, error_body, sse_error_event
from lmgw.metrics import Metrics
from lmgw.transport.openai_http import worker_error
from lmgw.workers.worker import Worker

W = Worker("w", "http://127.0.0.1:9", "pd")


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
    m.requests.inc(("chat", "m", "200"))
    m.requests.inc(("chat", "m", "200"))
    m.e2e.observe(("chat", "m"), 0.003)
    text = m.render().decode()
    assert 'lmgw_requests_total{endpoint="chat",model="m",status="200"} 2' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="0.0025"} 0' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="0.005"} 1' in text
    assert 'lmgw_request_duration_seconds_bucket{endpoint="chat",model="m",le="+Inf"} 1' in text
    assert 'lmgw_request_duration_seconds_count{endpoint="chat",model="m"} 1' in text
    assert 'lmgw_worker_in_flight{role="pd",worker="w1"} 3' in text
    assert "# TYPE lmgw_time_to_first_token_seconds histogram" in text


def test_every_metric_is_documented() -> None:
    """docs/operations.md lists every metric a gateway exports (kept honest here)."""
    from pathlib import Path

    from lmgw.config import GatewayConfig
    from lmgw.gateway import Gateway

    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    names = [m.name for m in Gateway(GatewayConfig()).metrics._all]
    assert "lmgw_requests_total" in names
    assert [n for n in names if f"`{n}`" not in text] == []
