"""The Kubernetes watch reducer (``PodFleet``): whatever the order of events, relists and lost
streams, the workers it ends with are the ones the pods' final states give directly.

The model cluster applies random pod changes; each role's "watch" sees them the way the API
server sends them (a pod entering a selector is ADDED, leaving it DELETED, deletion DELETED),
unless that role's stream is down, in which case it sees nothing until its next relist.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.workers.discovery.k8s_pods import PodFleet, PodRules, decode_pod, pod_worker

RULES = PodRules(models_annotation="lmgw.io/models")
SELECTORS = {  # role -> the labels its selector requires (equality-based)
    "pd": {"app": "sim"},
    "p": {"app": "sim-p"},
    "d": {"tier": "d"},
}
NAMES = ["a", "b", "c"]


def matches(role: str, pod: dict[str, Any] | None) -> bool:
    if pod is None:
        return False
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in SELECTORS[role].items())


def mostly(usual: Any, *others: Any) -> st.SearchStrategy:
    """``usual`` three times in four: most pods are workers, so the changes matter."""
    return st.sampled_from([usual] * 3 * len(others) + list(others))


pod_states = st.fixed_dictionaries(
    {
        "app": st.sampled_from([None, "sim", "sim", "sim-p", "web"]),
        "tier": st.sampled_from([None, "d"]),
        "ready": mostly(True, False),
        "phase": mostly("Running", "Pending", "Succeeded"),
        "ip": mostly("10.0.0.1", None, "10.0.0.2", "fd00::5"),
        "deleting": mostly(False, True),
        "port_name": mostly("http", "grpc"),
        "bootstrap": mostly(None, "8998", "bad"),
        "models": st.sampled_from([None, "m1", "m1,m2"]),
    }
)

ops = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(NAMES), pod_states),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.none()),
    st.tuples(st.just("drop"), st.sampled_from(list(SELECTORS)), st.none()),
    st.tuples(st.just("relist"), st.sampled_from(list(SELECTORS)), st.none()),
)


def build(name: str, s: dict[str, Any], rv: int) -> dict[str, Any]:
    labels = {k: s[k] for k in ("app", "tier") if s[k] is not None}
    notes = {}
    if s["bootstrap"] is not None:
        notes["sglang.ai/bootstrap-port"] = s["bootstrap"]
    if s["models"] is not None:
        notes["lmgw.io/models"] = s["models"]
    meta: dict[str, Any] = {"name": name, "resourceVersion": str(rv), "labels": labels}
    if notes:
        meta["annotations"] = notes
    if s["deleting"]:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": s["phase"],
        "conditions": [{"type": "Ready", "status": "True" if s["ready"] else "False"}],
    }
    if s["ip"] is not None:
        status["podIP"] = s["ip"]
    ports = [{"name": s["port_name"], "containerPort": 8000, "protocol": "TCP"}]
    return {"metadata": meta, "spec": {"containers": [{"ports": ports}]}, "status": status}


def decoded(pod: dict[str, Any]):
    return decode_pod(json.dumps(pod).encode())


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_any_event_sequence_gives_the_final_states_workers(sequence: list) -> None:
    cluster: dict[str, dict[str, Any]] = {}
    fleet = PodFleet(SELECTORS, RULES)
    connected = dict.fromkeys(SELECTORS, True)
    rv = 0

    def relist(role: str) -> None:
        fleet.replace(role, [decoded(p) for p in cluster.values() if matches(role, p)])
        connected[role] = True

    for kind, arg, state in sequence:
        if kind in ("put", "delete"):
            rv += 1
            old = cluster.get(arg)
            if kind == "put":
                new = cluster[arg] = build(arg, state, rv)
            elif old is None:
                continue
            else:
                new = None
                del cluster[arg]
            for role in SELECTORS:
                if not connected[role]:
                    continue
                was, now = matches(role, old), matches(role, new)
                if now:
                    fleet.apply(role, "MODIFIED" if was else "ADDED", decoded(new))
                elif was:
                    fleet.apply(role, "DELETED", decoded(new or old))
        elif kind == "drop":
            connected[arg] = False  # its stream is cut: events are missed ...
        else:
            relist(arg)  # ... until it lists again
    for role, up in connected.items():
        if not up:
            relist(role)  # the client always relists after a lost stream (410)

    expected = {}
    for role in SELECTORS:
        for pod in cluster.values():
            if not matches(role, pod):
                continue
            try:
                worker = pod_worker(decoded(pod), role, RULES)
            except ValueError:
                continue  # an eligible pod that cannot be a worker (logged) is no worker
            if worker is not None:
                expected[worker.worker_id] = worker
    got = fleet.workers()
    assert {w.worker_id: w for w in got} == expected
    assert [w.worker_id for w in got] == sorted(expected)
    assert sum(fleet.counts().values()) == len(expected)
    # why each skipped pod was skipped is remembered only for pods still matched
    for role, name in fleet.problems:
        assert name in cluster and matches(role, cluster[name])
