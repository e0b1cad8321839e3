"""Kubernetes discovery without a server: a pod's worker, the reducer's bookkeeping, the
``discovery.k8s_*`` keys and flags, in-cluster settings, tokens, API error answers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from lmgw.config import ConfigError, DiscoveryConfig, add_serve_arguments, config_from_args
from lmgw.workers.discovery import configured
from lmgw.workers.discovery.k8s_pods import PodFleet, PodRules, decode_pod, pod_worker
from lmgw.workers.discovery.kubernetes import (
    ApiError,
    BearerToken,
    _Gone,
    _status_error,
    resolve_api,
)

RULES = PodRules()


def pod(
    name: str = "w0",
    ip: str | None = "10.0.0.7",
    *,
    ready: bool = True,
    phase: str = "Running",
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
    labels: dict[str, str] | None = None,
    node: str | None = None,
):
    meta: dict[str, Any] = {"name": name, "labels": {"app": "sim", **(labels or {})}}
    if annotations is not None:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    if ports is None:
        ports = [{"name": "http", "containerPort": 8000}]
    spec: dict[str, Any] = {"containers": [{"name": "c", "ports": ports}]}
    if node is not None:
        spec["nodeName"] = node
    doc = {"metadata": meta, "spec": spec}
    return decode_pod(json.dumps({**doc, "status": status}).encode())


def test_a_ready_pod_is_a_worker() -> None:
    w = pod_worker(pod(), "pd", RULES)
    assert w is not None
    assert (w.url, w.role, w.worker_id, w.models) == (
        "http://10.0.0.7:8000",
        "pd",
        "w0/pd@10.0.0.7",
        [],
    )
    assert pod_worker(pod(), "prefill", RULES).role == "p"  # any role spelling


@pytest.mark.parametrize(
    "changes",
    [{"ready": False}, {"phase": "Pending"}, {"phase": "Failed"}, {"ip": None}, {"deleting": True}],
)
def test_pods_that_are_not_eligible(changes: dict[str, Any]) -> None:
    assert pod_worker(pod(**changes), "pd", RULES) is None


def test_ports_and_annotations() -> None:
    two = [{"name": "metrics", "containerPort": 9090}, {"name": "api", "containerPort": 8100}]
    assert pod_worker(pod(ports=two), "d", PodRules(port_name="api")).url == "http://10.0.0.7:8100"
    assert pod_worker(pod(ports=two), "d", PodRules(port=7000)).url == "http://10.0.0.7:7000"
    with pytest.raises(ValueError, match="no TCP container port named 'http'"):
        pod_worker(pod(ports=two), "d", RULES)
    udp = [{"name": "http", "containerPort": 8000, "protocol": "UDP"}]
    with pytest.raises(ValueError, match="no TCP container port"):
        pod_worker(pod(ports=udp), "d", RULES)
    assert pod_worker(pod(ip="fd00::7"), "pd", RULES).url == "http://[fd00::7]:8000"
    notes = {"sglang.ai/bootstrap-port": "8998", "lmgw.io/models": "m1, m2,m1,"}
    w = pod_worker(pod(annotations=notes), "p", PodRules(models_annotation="lmgw.io/models"))
    assert (w.bootstrap_port, w.models) == (8998, ["m1", "m2"])
    assert pod_worker(pod(annotations=notes), "p", RULES).models == []  # annotation not read
    off = PodRules(bootstrap_port_annotation=None)
    assert pod_worker(pod(annotations=notes), "p", off).bootstrap_port is None
    with pytest.raises(ValueError, match="bootstrap-port '0x1' is not a port"):
        pod_worker(pod(annotations={"sglang.ai/bootstrap-port": "0x1"}), "p", RULES)
    native = pod_worker(pod(annotations={"lmgw.io/native-port": "7101"}, ports=[]), "pd", RULES)
    assert native.url == "zmq+tcp://10.0.0.7:7101"
    with pytest.raises(ValueError, match="native-port '70000' is not a port"):
        pod_worker(pod(annotations={"lmgw.io/native-port": "70000"}), "pd", RULES)


def test_a_pods_zone_comes_from_its_annotation_label_or_node() -> None:
    assert pod_worker(pod(node="n1"), "p", RULES).zone is None
    assert pod_worker(pod(annotations={"lmgw.io/zone": "rack-2"}), "p", RULES).zone == "rack-2"
    assert pod_worker(pod(labels={"lmgw.io/zone": "rack-3"}), "d", RULES).zone == "rack-3"
    by_node = PodRules(zone_by_node=True)
    assert pod_worker(pod(node="gpu-node-4"), "d", by_node).zone == "gpu-node-4"
    assert pod_worker(pod(node="n", labels={"lmgw.io/zone": "z"}), "d", by_node).zone == "z"
    with pytest.raises(ValueError, match="zone"):
        pod_worker(pod(annotations={"lmgw.io/zone": "bad zone"}), "p", RULES)


def test_a_pods_data_parallel_ranks_come_from_its_annotation() -> None:
    """``lmgw.io/data-parallel-size: "4"``: the pod's entry stands for 4 ranks (the gateway
    adds each, ``sync_workers``); a bad count skips the pod with the reason."""
    plain = pod_worker(pod(), "pd", RULES)
    assert plain.data_parallel_size == 1 and len(plain.ranks()) == 1
    wc = pod_worker(pod(annotations={"lmgw.io/data-parallel-size": "4"}), "pd", RULES)
    assert [r.worker_id for r in wc.ranks()] == [f"{wc.worker_id}#dp{r}" for r in range(4)]
    for bad in ("four", "0", "5000"):
        with pytest.raises(ValueError, match=r"data-parallel-size|data_parallel_size"):
            pod_worker(pod(annotations={"lmgw.io/data-parallel-size": bad}), "pd", RULES)
    auto = pod_worker(pod(annotations={"lmgw.io/data-parallel-size": "auto"}), "pd", RULES)
    assert auto.auto_ranks and auto.ranks() == [auto]  # counted at the probes
    off = PodRules(data_parallel_annotation=None)
    assert pod_worker(pod(annotations={"lmgw.io/data-parallel-size": "4"}), "pd", off).ranks() == [
        pod_worker(pod(), "pd", off)
    ]


def test_fleet_logs_a_skipped_pod_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="lmgw.workers.discovery")
    fleet = PodFleet(["pd"], RULES)
    bad = pod(ports=[{"name": "grpc", "containerPort": 1}])
    assert not fleet.replace("pd", [bad])
    assert not fleet.apply("pd", "MODIFIED", bad)
    assert len(caplog.records) == 1 and "w0 (pd) skipped" in caplog.records[0].getMessage()
    assert fleet.apply("pd", "MODIFIED", pod())  # fixed: joins, and the problem is forgotten
    assert fleet.problems == {} and fleet.counts() == {"pd": 1}
    assert not fleet.apply("pd", "ADDED", pod())  # the same again: no change
    assert fleet.apply("pd", "DELETED", pod())
    assert fleet.workers() == []
    with pytest.raises(ValueError, match="not a pod event"):
        fleet.apply("pd", "BOOKMARK", pod())


# -- config ----------------------------------------------------------------------------------


def test_k8s_keys_validate_and_name_the_key() -> None:
    cfg = DiscoveryConfig(k8s_selector=" app=vllm ", k8s_decode_selector="role in (d)")
    assert cfg.k8s_selectors == {"pd": "app=vllm", "d": "role in (d)"}
    assert configured(cfg) and not configured(DiscoveryConfig())
    assert DiscoveryConfig(k8s_bootstrap_port_annotation="").k8s_bootstrap_port_annotation is None
    url = DiscoveryConfig(k8s_api_url="https://k8s.example:6443/prefix/").k8s_api_url
    assert url == "https://k8s.example:6443/prefix"
    bad = [
        ({"k8s_selector": "  "}, "k8s_selector", "must not be empty"),
        ({"k8s_prefill_selector": "a=b\nc=d"}, "k8s_prefill_selector", "one line"),
        ({"k8s_namespace": "Prod_1"}, "k8s_namespace", "not a namespace name"),
        ({"k8s_port": 0}, "k8s_port", "not a port"),
        ({"k8s_port_name": ""}, "k8s_port_name", "must not be empty"),
        ({"k8s_api_url": "k8s.example:6443"}, "k8s_api_url", "expected https://"),
        ({"k8s_api_url": "https://u:p@k8s.example"}, "k8s_api_url", "no credentials"),
        ({"k8s_api_url": "https://k8s:99999"}, "k8s_api_url", "out of range"),
        (
            {"k8s_api_url": "http://127.0.0.1:8001", "k8s_ca_file": "/ca.crt"},
            "k8s_ca_file",
            "https://",
        ),
        ({"k8s_token_file": ""}, "k8s_token_file", "must not be empty"),
        ({"k8s_watch_timeout_s": 0}, "k8s_watch_timeout_s", "positive"),
        ({"k8s_timeout_s": -1.0}, "k8s_timeout_s", "positive"),
    ]
    for keys, path, reason in bad:
        with pytest.raises(ConfigError, match=reason) as info:
            DiscoveryConfig(**keys)
        assert info.value.path == path, keys


def test_serve_flags_set_the_keys() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    ns = parser.parse_args(
        ["--k8s-selector", "app=vllm", "--k8s-prefill-selector", "app=sglang,role=prefill",
         "--k8s-decode-selector", "app=sglang,role=decode", "--k8s-encode-selector", "r=e",
         "--k8s-namespace", "llm"]
    )  # fmt: skip
    d = config_from_args(ns, env={}).discovery
    assert d.k8s_selectors == {
        "pd": "app=vllm", "p": "app=sglang,role=prefill", "d": "app=sglang,role=decode", "e": "r=e"
    }  # fmt: skip
    assert d.k8s_namespace == "llm"
    with pytest.raises(ConfigError, match="--k8s-namespace") as info:
        config_from_args(parser.parse_args(["--k8s-namespace", "NO"]), env={})
    assert info.value.path == "discovery.k8s_namespace"


# -- in-cluster settings, tokens, error answers -----------------------------------------------


def test_resolve_in_cluster(tmp_path: Path) -> None:
    cfg = DiscoveryConfig(k8s_selector="app=x")
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST") as info:
        resolve_api(cfg, env={}, sa_dir=str(tmp_path))
    assert info.value.path == "discovery.k8s_api_url"
    # in a pod: the service env, the service account's token, CA and namespace
    with pytest.raises(ConfigError, match="CA file") as info:
        resolve_api(cfg, env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, sa_dir=str(tmp_path))
    assert info.value.path == "discovery.k8s_ca_file"
    trustme = pytest.importorskip("trustme")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "namespace").write_text("llm\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    t = resolve_api(cfg, env=env, sa_dir=str(tmp_path))
    assert (t.url, t.namespace) == ("https://[fd00::1]:6443", "llm")
    assert t.token_file == str(tmp_path / "token") and t.ssl_context is not None
    assert (t.origin.host, t.origin.port, t.base_path) == ("fd00::1", 6443, "")
    # explicit: a proxy on loopback, no token, no TLS; the namespace key wins over the file
    proxy = DiscoveryConfig(
        k8s_selector="app=x", k8s_api_url="http://127.0.0.1:8001/k8s", k8s_namespace="prod"
    )
    t = resolve_api(proxy, env=env, sa_dir=str(tmp_path))
    assert (t.url, t.namespace, t.token_file, t.ssl_context) == (
        "http://127.0.0.1:8001/k8s", "prod", None, None
    )  # fmt: skip
    assert t.base_path == "/k8s"
    outside = DiscoveryConfig(k8s_selector="a", k8s_api_url="http://h:1")
    assert resolve_api(outside, env={}, sa_dir=str(tmp_path / "none")).namespace == "default"


def test_bearer_token_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("t1\n")
    token = BearerToken(str(path))
    token.load()
    assert token.current() == "t1"
    path.write_text("t2")
    assert token.current() == "t2"  # rotated: re-read
    path.unlink()
    assert token.current() == "t2" and token.current() == "t2"
    assert len([r for r in caplog.records if "cannot re-read" in r.getMessage()]) == 1
    path.write_text("two words")
    with pytest.raises(ConfigError, match="one token"):
        BearerToken(str(path)).load()
    assert BearerToken(None).current() is None


def test_error_answers() -> None:
    body = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden",
                       "message": 'pods is forbidden: User "x" cannot list'}).encode()  # fmt: skip
    e = _status_error(403, body)
    assert isinstance(e, ApiError) and e.kind == "denied" and "cannot list" in e.message
    assert "get, list and watch" in e.message
    assert isinstance(_status_error(410, b""), _Gone)
    assert _status_error(400, b"{}").kind == "rejected"
    e = _status_error(500, b"<html>oops")
    assert e.kind == "http" and e.message == "HTTP 500: <html>oops"
