"""Kubernetes discovery (lmgw.workers.discovery.kubernetes) against a fake API server
(``k8s_support.FakeKube``: LIST, WATCH, 410, dropped streams, bearer tokens, TLS) on 127.0.0.1.

The backend runs with a tiny retry base, so outages and reconnections take milliseconds.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL, http_request, metric_value
from k8s_support import FakeKube, RecordingSink, make_pod

from lmgw.config import (
    ConfigError,
    DiscoveryConfig,
    GatewayConfig,
    HealthConfig,
    RoutingConfig,
    ServerConfig,
)
from lmgw.gateway import Gateway
from lmgw.metrics import Metrics
from lmgw.simulators import run_fleet
from lmgw.workers.discovery import kubernetes
from lmgw.workers.discovery.kubernetes import K8sDiscovery, K8sMetrics, resolve_api
from lmgw.workers.worker import WorkerState

TOKEN = "secret-token"


async def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


def discovery_config(fake: FakeKube, tmp_path: Path, **keys: Any) -> DiscoveryConfig:
    token = tmp_path / "token"
    if not token.exists():
        token.write_text(TOKEN + "\n")
    keys.setdefault("k8s_selector", "app=sim")
    keys.setdefault("k8s_token_file", str(token))
    return DiscoveryConfig(k8s_api_url=fake.url, k8s_timeout_s=2.0, **keys)


def config_error(match: str) -> pytest.RaisesGroup:
    """A ConfigError, raised as it is or in (nested) exception groups of the nurseries."""
    return pytest.RaisesGroup(
        pytest.RaisesExc(ConfigError, match=match), allow_unwrapped=True, flatten_subgroups=True
    )


class Running:
    """A started backend with its sink and metrics."""

    def __init__(self, disc: K8sDiscovery, sink: RecordingSink, metrics: K8sMetrics) -> None:
        self.disc, self.sink, self.metrics = disc, sink, metrics

    @property
    def ids(self) -> set[str]:
        return set(self.sink.current)

    def restarts(self, role: str, reason: str) -> float:
        return self.metrics.restarts.values.get((role, reason), 0.0)

    def errors(self, kind: str) -> float:
        return self.metrics.errors.values.get((kind,), 0.0)


async def start(nursery: trio.Nursery, cfg: DiscoveryConfig, tmp_path: Path) -> Running:
    sink, metrics = RecordingSink(), K8sMetrics(Metrics())
    target = resolve_api(cfg, env={}, sa_dir=str(tmp_path / "no-sa"))
    disc = K8sDiscovery(sink, cfg, target, metrics, retry_base_s=0.01)
    with trio.fail_after(5):
        await nursery.start(disc.run)
    return Running(disc, sink, metrics)


@pytest.fixture
async def kube(nursery: trio.Nursery) -> FakeKube:
    fake = FakeKube(token=TOKEN)
    await nursery.start(fake.serve)
    return fake


async def test_pods_join_and_leave_as_their_state_changes(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path
) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    kube.put(make_pod("b", "10.0.0.2", ready=False))
    kube.put(make_pod("c", None, phase="Pending"))
    kube.put(make_pod("other", "10.0.0.9", labels={"app": "web"}))
    cfg = discovery_config(
        kube, tmp_path, k8s_prefill_selector="app=sim-p", k8s_models_annotation="lmgw.io/models"
    )
    run = await start(nursery, cfg, tmp_path)
    # started after the first LIST: the ready pod is a worker already
    assert run.ids == {"a/pd@10.0.0.1"}
    (a,) = run.sink.current.values()
    assert (a.url, a.role, a.models, a.bootstrap_port) == ("http://10.0.0.1:8000", "pd", [], None)
    assert run.disc.source == "k8s:default"

    kube.set_ready("b", True)  # becomes ready
    await wait_until(lambda: "b/pd@10.0.0.2" in run.ids)
    kube.set_ready("a", False)  # fails its readiness probe
    await wait_until(lambda: "a/pd@10.0.0.1" not in run.ids)
    kube.set_ready("a", True)
    await wait_until(lambda: "a/pd@10.0.0.1" in run.ids)
    kube.terminate("a")  # graceful deletion started: drains before the pod is gone
    await wait_until(lambda: "a/pd@10.0.0.1" not in run.ids)
    kube.delete("a")
    kube.delete("b")
    await wait_until(lambda: run.ids == set())
    # a pod relabelled into the prefill selector: ADDED there, with its annotations
    kube.put(
        make_pod(
            "c", "10.0.0.3", labels={"app": "sim"},
            annotations={"sglang.ai/bootstrap-port": "8998", "lmgw.io/models": "m1, m2"},
        )
    )  # fmt: skip
    await wait_until(lambda: run.ids == {"c/pd@10.0.0.3"})
    kube.set_labels("c", {"app": "sim-p"})  # out of the pd selector (DELETED), into prefill
    await wait_until(lambda: run.ids == {"c/p@10.0.0.3"})
    c = run.sink.current["c/p@10.0.0.3"]
    assert (c.role, c.bootstrap_port, c.models) == ("p", 8998, ["m1", "m2"])
    kube.put(make_pod("other", "10.0.0.9", labels={"app": "web"}, ready=False))  # unrelated
    kube.bookmark()
    await trio.sleep(0.05)
    assert run.ids == {"c/p@10.0.0.3"}
    assert run.metrics.workers.values == {("pd",): 0.0, ("p",): 1.0}
    # one LIST per role; everything after came through the watches
    assert run.disc.lists == 2 and kube.lists() == 2
    queries = kube.watch_queries()
    assert {q["labelSelector"] for q in queries} == {"app=sim", "app=sim-p"}
    assert all(q["allowWatchBookmarks"] == "true" for q in queries)
    assert all(q["timeoutSeconds"] == "300" for q in queries)


async def test_set_based_selector_and_paged_list(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubernetes, "LIST_PAGE", 2)
    for i in range(5):
        kube.put(make_pod(f"p{i}", f"10.0.1.{i}", labels={"app": "sim", "tier": f"t{i % 3}"}))
    cfg = discovery_config(kube, tmp_path, k8s_selector="app=sim,tier in (t0, t1)")
    run = await start(nursery, cfg, tmp_path)
    assert run.ids == {"p0/pd@10.0.1.0", "p1/pd@10.0.1.1", "p3/pd@10.0.1.3", "p4/pd@10.0.1.4"}
    assert kube.lists() == 2  # two pages of 2 (the fourth pod ended the second)


async def test_expired_watch_relists(nursery: trio.Nursery, kube: FakeKube, tmp_path: Path) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    run = await start(nursery, discovery_config(kube, tmp_path), tmp_path)
    await wait_until(lambda: kube.watchers)
    kube.expire()  # ERROR 410 in the stream
    kube.put(make_pod("b", "10.0.0.2"))  # happens while the client relists
    await wait_until(lambda: run.ids == {"a/pd@10.0.0.1", "b/pd@10.0.0.2"})
    await wait_until(lambda: run.disc.lists == 2)
    assert run.restarts("pd", "expired") == 1
    # the resumed watch is told 410 as an HTTP status: relisted as well
    kube.gone_as_status = True
    await wait_until(lambda: kube.watchers)
    kube.drop_watches()
    kube.expire()
    kube.delete("a")
    await wait_until(lambda: run.ids == {"b/pd@10.0.0.2"})
    assert run.disc.lists == 3
    assert run.restarts("pd", "broken") == 1 and run.restarts("pd", "expired") == 2


async def test_dropped_watch_resumes_from_the_last_version(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path
) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    run = await start(nursery, discovery_config(kube, tmp_path), tmp_path)
    kube.put(make_pod("b", "10.0.0.2"))
    await wait_until(lambda: len(run.ids) == 2)
    seen = str(kube.rv)
    assert kube.drop_watches() == 1
    kube.put(make_pod("c", "10.0.0.3"))  # while no watch is open: replayed on resume
    await wait_until(lambda: len(run.ids) == 3)
    assert run.disc.lists == 1  # no relist needed
    assert kube.watch_queries()[-1]["resourceVersion"] == seen
    assert run.restarts("pd", "broken") == 1 and run.errors("broken") == 1
    assert set(run.sink.current) == {"a/pd@10.0.0.1", "b/pd@10.0.0.2", "c/pd@10.0.0.3"}


async def test_api_server_down_keeps_the_workers(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmgw.workers.discovery")
    kube.put(make_pod("a", "10.0.0.1"))
    kube.put(make_pod("b", "10.0.0.2"))
    run = await start(nursery, discovery_config(kube, tmp_path), tmp_path)
    assert len(run.ids) == 2
    await kube.stop()
    await wait_until(lambda: run.errors("unreachable") >= 3)  # retried, with backoff
    assert len(run.ids) == 2  # kept through the outage
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1 and "keeping the 2 worker(s)" in down[0].getMessage()
    kube.delete("b")  # while the gateway cannot see
    nursery.start_soon(kube.serve)  # back, on the same port
    await wait_until(lambda: run.ids == {"a/pd@10.0.0.1"})
    await wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records))
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


async def test_api_server_down_at_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    fake = FakeKube(token=TOKEN)
    await nursery.start(fake.serve)
    await fake.stop()  # the port is known, nothing listens
    fake.put(make_pod("a", "10.0.0.1"))
    run = await start(nursery, discovery_config(fake, tmp_path), tmp_path)  # does not wait
    assert run.ids == set() and run.errors("unreachable") >= 1
    nursery.start_soon(fake.serve)
    await wait_until(lambda: run.ids == {"a/pd@10.0.0.1"})


async def test_token_file(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    missing = discovery_config(kube, tmp_path, k8s_token_file=str(tmp_path / "nope"))
    with config_error("k8s_token_file"):
        await start(nursery, missing, tmp_path)
    (tmp_path / "empty").write_text("\n")
    empty = discovery_config(kube, tmp_path, k8s_token_file=str(tmp_path / "empty"))
    with config_error("empty"):
        await start(nursery, empty, tmp_path)
    # a token the API server refuses: logged with the RBAC hint, retried, no workers
    token = tmp_path / "token"
    token.write_text("stale-token")
    run = await start(nursery, discovery_config(kube, tmp_path), tmp_path)
    assert run.ids == set() and run.errors("denied") >= 1
    assert any("get, list and watch" in r.getMessage() for r in caplog.records)
    # the kubelet rotates the token: re-read on the next attempt, no restart needed
    token.write_text(TOKEN)
    await wait_until(lambda: run.ids == {"a/pd@10.0.0.1"})
    kube.token = "rotated"
    token.write_text("rotated")
    kube.drop_watches()
    await wait_until(lambda: kube.requests[-1][2].get("authorization") == "Bearer rotated")
    assert run.ids == {"a/pd@10.0.0.1"}


async def test_rejected_selector_is_a_config_error(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path
) -> None:
    cfg = discovery_config(kube, tmp_path, k8s_decode_selector="app in (sim")
    with config_error(r"discovery\.k8s_decode_selector.*unable to parse"):
        await start(nursery, cfg, tmp_path)


async def test_tls_in_cluster(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-cluster settings (env + service account dir) against an HTTPS fake with its own CA;
    the same server without the CA fails verification, and insecure_skip_verify gets through."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    fake = FakeKube(namespace="llm", token=TOKEN, ssl_context=server_ctx)
    await nursery.start(fake.serve)
    fake.put(make_pod("a", "10.0.0.1"))
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "namespace").write_text("llm\n")
    ca.cert_pem.write_to_path(str(sa / "ca.crt"))
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)}
    cfg = DiscoveryConfig(k8s_selector="app=sim", k8s_timeout_s=2.0)
    sink = RecordingSink()
    with trio.fail_after(5):
        await nursery.start(
            partial(kubernetes.run_k8s_discovery, sink, cfg, env=env, sa_dir=str(sa))
        )
    assert set(sink.current) == {"a/pd@10.0.0.1"}
    assert fake.requests[0][1].startswith("/api/v1/namespaces/llm/pods?")

    # an explicit URL with the system trust store: the fake's CA is unknown there
    metrics = K8sMetrics(Metrics())
    plain = DiscoveryConfig(
        k8s_selector="app=sim", k8s_api_url=fake.url, k8s_namespace="llm",
        k8s_token_file=str(sa / "token"), k8s_timeout_s=2.0,
    )  # fmt: skip
    refused = RecordingSink()
    disc = K8sDiscovery(refused, plain, resolve_api(plain, env={}), metrics, retry_base_s=0.01)
    await nursery.start(disc.run)
    assert refused.current == {} and metrics.errors.values.get(("unreachable",), 0) >= 1
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)
    insecure = DiscoveryConfig(
        k8s_selector="app=sim", k8s_api_url=fake.url, k8s_namespace="llm",
        k8s_token_file=str(sa / "token"), k8s_insecure_skip_verify=True,
    )  # fmt: skip
    trusting = RecordingSink()
    await nursery.start(K8sDiscovery(trusting, insecure, resolve_api(insecure, env={})).run)
    assert set(trusting.current) == {"a/pd@10.0.0.1"}


async def test_gateway_serves_through_discovered_pods(
    nursery: trio.Nursery, kube: FakeKube, tmp_path: Path
) -> None:
    """End to end: pods whose IP and port are simulated worker processes (``python -m
    lmgw.simulators``); the openai client's chats go through them; deleting a pod drains its
    worker and it leaves."""
    with trio.fail_after(30):
        fleet = await nursery.start(partial(run_fleet, {"pd": 2}, model=MODEL, speed=1.0))
    urls = fleet.urls("pd")
    for i, url in enumerate(urls):
        kube.put(make_pod(f"vllm-{i}", "127.0.0.1", port=int(url.rsplit(":", 1)[1])))
    kube.put(make_pod("vllm-starting", "127.0.0.1", port=9, ready=False))
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        routing=RoutingConfig(policy="round_robin"),
        discovery=discovery_config(kube, tmp_path),
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        port = await nursery.start(gw.run)
    url = f"http://127.0.0.1:{port}"
    ids = {"vllm-0/pd@127.0.0.1", "vllm-1/pd@127.0.0.1"}
    assert {w.id for w in gw.registry} == ids
    assert {gw.source_of(i) for i in ids} == {"k8s:default"}

    def chat() -> str:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        return r.choices[0].message.content or ""

    async def served(worker_url: str) -> int:
        r = await http_request(worker_url, "GET", "/sim/stats")
        return r.json()["requests_total"]

    with trio.fail_after(20):
        for _ in range(4):
            assert await trio.to_thread.run_sync(chat)
    assert [await served(u) for u in urls] == [2, 2]  # round robin over both pods
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, 'lmgw_k8s_discovered_workers{role="pd"}') == 2

    # a pod deleted while its worker streams an answer: drained (the stream finishes), then gone
    def long_stream() -> int:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a long one"}], max_tokens=80,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return sum(1 for c in stream if c.choices and c.choices[0].delta.content)

    done: list[int] = []

    async def streamer() -> None:
        done.append(await trio.to_thread.run_sync(long_stream))

    nursery.start_soon(streamer)
    await wait_until(lambda: any(w.in_flight for w in gw.registry))
    (busy,) = [w for w in gw.registry if w.in_flight]
    kube.delete(busy.id.split("/")[0])
    await wait_until(lambda: busy.state is WorkerState.DRAINING)
    assert gw.registry.get(busy.id) is busy and not done  # still finishing its stream
    await wait_until(lambda: gw.registry.get(busy.id) is None, timeout=10)
    await wait_until(lambda: done)
    assert done == [80]  # the stream was not cut
    (left,) = gw.registry
    assert left.id != busy.id and left.state is WorkerState.HEALTHY
    before = [await served(u) for u in urls]
    with trio.fail_after(20):
        for _ in range(2):
            assert await trio.to_thread.run_sync(chat)
    after = [await served(u) for u in urls]
    assert sum(after) - sum(before) == 2
    assert after[urls.index(left.url)] - before[urls.index(left.url)] == 2
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, 'lmgw_k8s_discovered_workers{role="pd"}') == 1
