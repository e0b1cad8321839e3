"""The gateway's own limits are not the workers' faults: when the gateway cannot open an
upstream connection because its host is out of descriptors (EMFILE, ENFILE) or ephemeral
ports (EADDRNOTAVAIL), the client gets a 503 in OpenAI's shape, no other worker is tried, the
worker is neither ejected nor marked failing by requests or probes, and the metric says
``local``. Found by running a gateway at a 80-descriptor limit: every worker was ejected."""

from __future__ import annotations

import errno

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, metric_value

import lmgw.transport.pool as pool_module
from lmgw.workers.worker import WorkerState

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL])
@pytest.mark.parametrize("server", ["native", "hypercorn"])  # (the lane: tests/unit/test_relay.py)
async def test_out_of_descriptors_is_a_503_and_no_worker_is_blamed(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    gw = await gateway(2, health_interval_s=30.0)
    assert (await gw.request("POST", "/v1/chat/completions", BODY)).status == 200
    real = pool_module.connect_tcp
    refused: list[int] = []

    async def out_of_fds(host: str, port: int) -> object:
        refused.append(port)
        raise OSError(code, "simulated")

    monkeypatch.setattr(pool_module, "connect_tcp", out_of_fds)
    for w in gw.gateway.registry:
        gw.gateway.pool.forget(w.origin)  # no idle connection to fall back on
    for _ in range(8):  # more than outlier_failures: a worker fault would eject by now
        r = await gw.request("POST", "/v1/chat/completions", BODY)
        assert r.status == 503, r.body
        err = r.json()["error"]
        assert "not the worker" in err["message"] and err["type"]
    assert len(refused) == 8  # one connect per request: no other worker was tried
    workers = list(gw.gateway.registry)
    assert all(w.state is WorkerState.HEALTHY and w.consecutive_failures == 0 for w in workers)
    for _ in range(3):  # past failure_threshold (2): the probes meet the same limit
        await gw.gateway.monitor.probe_all()
    assert all(w.state is WorkerState.HEALTHY for w in workers)
    text = await gw.metrics()
    total = sum(
        metric_value(text, f'lmgw_upstream_errors_total{{role="pd",worker="{w.id}",kind="local"}}')
        for w in workers
    )
    assert total == 8
    monkeypatch.setattr(pool_module, "connect_tcp", real)  # the host recovers: so does service
    with trio.fail_after(10):
        assert (await gw.request("POST", "/v1/chat/completions", BODY)).status == 200
