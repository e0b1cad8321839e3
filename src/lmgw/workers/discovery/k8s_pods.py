"""Kubernetes pods -> workers, sans-IO: the pod fields we read, and the watch reducer.

The I/O half (LIST/WATCH against the API server) is ``kubernetes.py``; everything here is pure,
so any sequence of watch events can be checked against the pods' final states.

A pod matched by a role's selector is a worker of that role while it is *eligible*: phase
``Running``, a pod IP, the ``Ready`` condition ``True``, and no ``deletionTimestamp`` (it is
terminating). Its URL is ``http://{podIP}:{port}`` (``port``: ``discovery.k8s_port``, else the
container port named ``discovery.k8s_port_name``), or ``zmq+tcp://{podIP}:{port}`` when the pod
carries the native-port annotation. The worker id is ``{pod}/{role}@{podIP}``: a pod matched by
two selectors is two workers, and a pod recreated under the same name (a StatefulSet) with a new
IP is a new worker rather than the old one's address brought back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

from ...config import ConfigError, WorkerConfig

__all__ = [
    "Pod",
    "PodFleet",
    "PodList",
    "PodRules",
    "Status",
    "WatchEvent",
    "decode_event",
    "decode_pod",
    "decode_pod_list",
    "decode_status",
    "pod_worker",
]

log = logging.getLogger("lmgw.workers.discovery")


# -- the subset of the Pod API object we read (unknown fields are ignored) ---------------------


class ObjectMeta(msgspec.Struct, rename="camel"):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletion_timestamp: str | None = None


class ContainerPort(msgspec.Struct, rename="camel"):
    container_port: int = 0
    name: str | None = None
    protocol: str = "TCP"


class Container(msgspec.Struct):
    name: str = ""
    ports: list[ContainerPort] | None = None


class PodSpec(msgspec.Struct, rename="camel"):
    containers: list[Container] | None = None
    node_name: str | None = None


class PodCondition(msgspec.Struct):
    type: str = ""
    status: str = ""


class PodStatus(msgspec.Struct, rename="camel"):
    phase: str = ""
    pod_ip: str | None = msgspec.field(default=None, name="podIP")
    conditions: list[PodCondition] | None = None


class Pod(msgspec.Struct):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: PodSpec = msgspec.field(default_factory=PodSpec)
    status: PodStatus = msgspec.field(default_factory=PodStatus)


class ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str = ""
    continue_: str | None = msgspec.field(default=None, name="continue")


class PodList(msgspec.Struct):
    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    items: list[Pod] | None = None


class Status(msgspec.Struct):
    """The API's error object (a failed request's body, or an ERROR watch event's object)."""

    code: int = 0
    reason: str = ""
    message: str = ""


class WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw = msgspec.Raw(b"null")


decode_pod = msgspec.json.Decoder(Pod).decode
decode_pod_list = msgspec.json.Decoder(PodList).decode
decode_status = msgspec.json.Decoder(Status).decode
decode_event = msgspec.json.Decoder(WatchEvent).decode


# -- one pod -> one worker -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodRules:
    """How a pod's fields become a :class:`WorkerConfig` (the ``discovery.k8s_*`` keys)."""

    port: int | None = None
    port_name: str = "http"
    bootstrap_port_annotation: str | None = "sglang.ai/bootstrap-port"
    models_annotation: str | None = None
    native_port_annotation: str | None = "lmgw.io/native-port"
    zone_annotation: str | None = "lmgw.io/zone"
    zone_by_node: bool = False
    data_parallel_annotation: str | None = "lmgw.io/data-parallel-size"


def eligible(pod: Pod) -> bool:
    """Running, with an IP, Ready, and not terminating."""
    st = pod.status
    if pod.metadata.deletion_timestamp or st.phase != "Running" or not st.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in st.conditions or ())


def _port(text: str, what: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"{what} {text!r} is not a port")
    return port


def _named_port(pod: Pod, name: str) -> int | None:
    for c in pod.spec.containers or ():
        for p in c.ports or ():
            if p.name == name and p.protocol == "TCP" and 0 < p.container_port < 65536:
                return p.container_port
    return None


def pod_worker(pod: Pod, role: str, rules: PodRules) -> WorkerConfig | None:
    """The worker an eligible pod is, None for a pod that is not eligible.

    Raises:
        ValueError: an eligible pod that cannot be a worker (no such port, a bad annotation),
            in words for the log.
    """
    if not eligible(pod):
        return None
    ip = pod.status.pod_ip or ""
    host = f"[{ip}]" if ":" in ip else ip
    notes = pod.metadata.annotations or {}
    native = notes.get(rules.native_port_annotation) if rules.native_port_annotation else None
    if native is not None:
        url = f"zmq+tcp://{host}:{_port(native, f'annotation {rules.native_port_annotation}')}"
    else:
        port = rules.port if rules.port is not None else _named_port(pod, rules.port_name)
        if port is None:
            raise ValueError(
                f"no TCP container port named {rules.port_name!r} (set discovery.k8s_port"
                " or discovery.k8s_port_name)"
            )
        url = f"http://{host}:{port}"
    bootstrap = None
    key = rules.bootstrap_port_annotation
    if key is not None and notes.get(key) is not None:
        bootstrap = _port(notes[key], f"annotation {key}")
    models: list[str] = []
    key = rules.models_annotation
    if key is not None and notes.get(key) is not None:
        models = list(dict.fromkeys(m.strip() for m in notes[key].split(",") if m.strip()))
    zone = None
    key = rules.zone_annotation
    if key is not None:  # the annotation, else a label of that name
        zone = notes.get(key) or (pod.metadata.labels or {}).get(key)
    if zone is None and rules.zone_by_node:
        zone = pod.spec.node_name
    dp: int | Literal["auto"] = 1
    key = rules.data_parallel_annotation
    if key is not None and notes.get(key) is not None:  # its ranks are workers (ids #dp<r>)
        text = notes[key].strip()
        if text == "auto":  # counted in the pod's /metrics at each probe
            dp = "auto"
        elif text.isdigit():
            dp = int(text)
        else:
            raise ValueError(f"annotation {key} {notes[key]!r} is not a number of ranks or auto")
    try:
        return WorkerConfig(
            url=url,
            role=role,
            models=models,
            id=f"{pod.metadata.name}/{role}@{ip}",
            bootstrap_port=bootstrap,
            zone=zone,
            data_parallel_size=dp,
        )
    except ConfigError as e:
        raise ValueError(str(e)) from None


# -- the watch reducer -----------------------------------------------------------------------


class PodFleet:
    """The workers the watched pods are, per role: fed LIST results and watch events.

    ``replace(role, pods)`` is a LIST (it is the whole truth for that role: pods it lacks are
    gone); ``apply(role, type, pod)`` is one ADDED/MODIFIED/DELETED event. A pod that stops
    matching a selector arrives as DELETED (the API server filters watches that way). Both
    return whether the worker set changed. :meth:`workers` is sorted by id, so successive
    syncs (and gateway replicas) build the same list.

    ``problems`` holds, per (role, pod name), why an eligible pod is not a worker (logged once).
    """

    def __init__(self, roles: Iterable[str], rules: PodRules) -> None:
        self.rules = rules
        self._by_role: dict[str, dict[str, WorkerConfig]] = {role: {} for role in roles}
        self.problems: dict[tuple[str, str], str] = {}
        self._list: list[WorkerConfig] | None = []

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._by_role)

    def counts(self) -> dict[str, int]:
        """Workers per role."""
        return {role: len(ws) for role, ws in self._by_role.items()}

    def workers(self) -> list[WorkerConfig]:
        if self._list is None:
            every = [w for ws in self._by_role.values() for w in ws.values()]
            self._list = sorted(every, key=lambda w: w.worker_id)
        return self._list

    def replace(self, role: str, pods: Iterable[Pod]) -> bool:
        fresh: dict[str, WorkerConfig] = {}
        seen: set[str] = set()
        for pod in pods:
            name = pod.metadata.name
            seen.add(name)
            worker = self._worker(role, pod)
            if worker is not None:
                fresh[name] = worker
        for key in [k for k in self.problems if k[0] == role and k[1] not in seen]:
            del self.problems[key]
        return self._set(role, fresh)

    def apply(self, role: str, kind: str, pod: Pod) -> bool:
        name = pod.metadata.name
        workers = self._by_role[role]
        if kind == "DELETED":
            self.problems.pop((role, name), None)
            worker = None
        elif kind in ("ADDED", "MODIFIED"):
            worker = self._worker(role, pod)
        else:
            raise ValueError(f"not a pod event: {kind!r}")
        if workers.get(name) == worker:
            return False
        if worker is None:
            del workers[name]
        else:
            workers[name] = worker
        self._list = None
        return True

    def _set(self, role: str, workers: dict[str, WorkerConfig]) -> bool:
        if workers == self._by_role[role]:
            return False
        self._by_role[role] = workers
        self._list = None
        return True

    def _worker(self, role: str, pod: Pod) -> WorkerConfig | None:
        key = (role, pod.metadata.name)
        try:
            worker = pod_worker(pod, role, self.rules)
        except ValueError as e:
            why = str(e)
            if self.problems.get(key) != why:
                log.error("discovery k8s: pod %s (%s) skipped: %s", key[1], role, why)
                self.problems[key] = why
            return None
        self.problems.pop(key, None)
        return worker
