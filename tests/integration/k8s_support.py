"""A fake Kubernetes API server for the discovery tests: pods of one namespace, LIST with label
selectors (and ``limit``/``continue``), WATCH streams (chunked JSON lines, bookmarks, 410 for an
expired resourceVersion), bearer-token auth, optional TLS. trio, 127.0.0.1, port 0.

Watches behave like the API server's watch cache: a pod that starts matching a selector arrives
as ADDED, one that stops matching as DELETED (with its new state). Test controls: ``put`` /
``patch`` / ``delete`` pods, ``bookmark()``, ``expire()`` (410 to every watch and to resumes
from older versions), ``drop_watches()`` (cut the streams mid-way), ``stop()`` / ``start()``
(the same port).
"""

from __future__ import annotations

import copy
import json
import math
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio


def make_pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    port: int = 8000,
    port_name: str = "http",
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    """A Pod object as the API returns it (the fields discovery reads, and a few it does not)."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "uid": f"uid-{name}",
        "labels": labels if labels is not None else {"app": "sim"},
        "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "image": "vllm/vllm-openai",
                    "ports": [
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                        {"name": port_name, "containerPort": port, "protocol": "TCP"},
                    ],
                }
            ]
        },
        "status": status,
    }


# -- label selectors (the grammar the API server accepts, enough of it) -------------------------

_TERM = re.compile(
    r"^\s*(?:(?P<neg>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[\w.-]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<vals>[^()]*)\))?)\s*$"
)


def parse_selector(text: str) -> list[Callable[[dict[str, str]], bool]]:
    """The selector's requirements; ValueError for one the API server would reject."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for term in terms:
        if not term.strip() and text.strip() == "":
            continue
        m = _TERM.match(term)
        if m is None or depth != 0:
            raise ValueError(f"unable to parse requirement: {term!r}")
        if m["neg"]:
            reqs.append(lambda lab, k=m["nkey"]: k not in lab)
        elif m["op"]:
            k, v = m["key"], m["val"]
            if m["op"] == "!=":
                reqs.append(lambda lab, k=k, v=v: lab.get(k) != v)
            else:
                reqs.append(lambda lab, k=k, v=v: lab.get(k) == v)
        elif m["set"]:
            vals = {x.strip() for x in m["vals"].split(",")}
            if m["set"] == "in":
                reqs.append(lambda lab, k=m["key"], vs=vals: lab.get(k) in vs)
            else:
                reqs.append(lambda lab, k=m["key"], vs=vals: lab.get(k) not in vs)
        else:
            reqs.append(lambda lab, k=m["key"]: k in lab)
    return reqs


def matches(reqs: list[Callable[[dict[str, str]], bool]], pod: dict[str, Any] | None) -> bool:
    if pod is None:
        return False
    labels = pod["metadata"].get("labels") or {}
    return all(r(labels) for r in reqs)


# -- the server ---------------------------------------------------------------------------------


@dataclass
class _Change:
    rv: int
    old: dict[str, Any] | None
    new: dict[str, Any] | None  #: None: deleted


@dataclass(eq=False)
class _Watcher:
    reqs: list[Callable[[dict[str, str]], bool]]
    send: trio.MemorySendChannel
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False


class FakeKube:
    """See the module docstring. ``requests`` logs every ``(method, target, headers)``."""

    def __init__(
        self,
        *,
        namespace: str = "default",
        token: str | None = "secret-token",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.namespace = namespace
        self.token = token
        self.ssl_context = ssl_context
        self.port = 0
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.history: list[_Change] = []
        self.compacted = 0  #: watches from a version below this get 410
        self.gone_as_status = False  #: 410 as an HTTP status (else an ERROR event in a 200)
        self.watchers: set[_Watcher] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    # -- controls -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def put(self, pod: dict[str, Any]) -> None:
        """Create or replace a pod (its resourceVersion is set here)."""
        name = pod["metadata"]["name"]
        pod = copy.deepcopy(pod)
        self.rv += 1
        pod["metadata"]["resourceVersion"] = str(self.rv)
        old = self.pods.get(name)
        self.pods[name] = pod
        self._publish(_Change(self.rv, old, pod))

    def patch(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Change a pod in place: ``fn`` edits a copy."""
        pod = copy.deepcopy(self.pods[name])
        fn(pod)
        self.put(pod)

    def set_ready(self, name: str, ready: bool) -> None:
        def edit(pod: dict[str, Any]) -> None:
            for c in pod["status"]["conditions"]:
                if c["type"] == "Ready":
                    c["status"] = "True" if ready else "False"

        self.patch(name, edit)

    def set_labels(self, name: str, labels: dict[str, str]) -> None:
        self.patch(name, lambda pod: pod["metadata"].__setitem__("labels", labels))

    def terminate(self, name: str) -> None:
        """Start a graceful deletion: deletionTimestamp set, the pod still there."""
        self.patch(
            name, lambda pod: pod["metadata"].__setitem__("deletionTimestamp", "2026-01-01T00:02Z")
        )

    def delete(self, name: str) -> None:
        old = self.pods.pop(name)
        self.rv += 1
        self._publish(_Change(self.rv, old, None))

    def bookmark(self) -> None:
        obj = {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}
        for w in list(self.watchers):
            w.send.send_nowait({"type": "BOOKMARK", "object": obj})

    def expire(self) -> None:
        """Compact: every open watch gets an ERROR 410 event and ends; resuming from any version
        seen so far gets 410 too, so clients must relist."""
        self.compacted = self.rv + 1
        self.history.clear()
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                  "reason": "Expired", "message": "too old resource version"}  # fmt: skip
        for w in list(self.watchers):
            w.send.send_nowait({"type": "ERROR", "object": status})
            w.send.send_nowait(None)  # then the stream ends normally

    def drop_watches(self) -> int:
        """Cut every open watch stream mid-way (no terminal chunk). Returns how many."""
        n = 0
        for w in list(self.watchers):
            w.dropped = True
            w.scope.cancel()
            n += 1
        return n

    def watch_queries(self) -> list[dict[str, str]]:
        """The query of every WATCH request so far."""
        out = []
        for _, target, _ in self.requests:
            q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            if q.get("watch") == "1":
                out.append(q)
        return out

    def lists(self) -> int:
        return sum(1 for _, t, _ in self.requests if "watch=1" not in t)

    # -- serving ------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (or cancelled); started with the URL."""
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.serve_listeners, self._connection, listeners)
                    task_status.started(self.url)
        finally:
            self.watchers.clear()
            self._stopped.set()

    async def stop(self) -> None:
        """Close the listener and every connection (the API server is down)."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self.requests.append((method, target, headers))
                if not await self._handle(stream, method, target, headers):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(
        self, stream: trio.abc.Stream, method: str, target: str, headers: dict[str, str]
    ) -> bool:
        """Answer one request; False when the connection must close."""
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            await self._status(stream, 401, "Unauthorized", "Unauthorized")
            return True
        if method != "GET" or parts.path != f"/api/v1/namespaces/{self.namespace}/pods":
            await self._status(stream, 404, "NotFound", f"no route {parts.path}")
            return True
        try:
            reqs = parse_selector(query.get("labelSelector", ""))
        except ValueError as e:
            await self._status(stream, 400, "BadRequest", str(e))
            return True
        if query.get("watch") in ("1", "true"):
            return await self._watch(stream, reqs, query)
        items = sorted(
            (p for p in self.pods.values() if matches(reqs, p)),
            key=lambda p: p["metadata"]["name"],
        )
        start = int(query["continue"]) if query.get("continue") else 0
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page}
        await self._json(stream, 200, body)
        return True

    async def _watch(
        self, stream: trio.abc.Stream, reqs: list[Callable], query: dict[str, str]
    ) -> bool:
        since = int(query.get("resourceVersion") or self.rv)
        if since < self.compacted and self.gone_as_status:
            await self._status(stream, 410, "Expired", "too old resource version")
            return True
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        send, recv = trio.open_memory_channel[Any](math.inf)
        watcher = _Watcher(reqs, send)
        if since < self.compacted:
            status = {"kind": "Status", "code": 410, "reason": "Expired",
                      "message": f"too old resource version: {since}"}  # fmt: skip
            send.send_nowait({"type": "ERROR", "object": status})
            send.send_nowait(None)
        else:
            for change in self.history:
                if change.rv > since:
                    event = self._event(reqs, change)
                    if event is not None:
                        send.send_nowait(event)
        self.watchers.add(watcher)
        timeout = float(query.get("timeoutSeconds") or 1800)
        try:
            with watcher.scope, trio.move_on_after(timeout):
                async for event in recv:
                    if event is None:
                        break
                    data = json.dumps(event).encode() + b"\n"
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))
        finally:
            self.watchers.discard(watcher)
        if watcher.dropped:
            return False  # cut: no terminal chunk, the connection closes
        await stream.send_all(b"0\r\n\r\n")
        return True

    def _publish(self, change: _Change) -> None:
        self.history.append(change)
        for w in list(self.watchers):
            event = self._event(w.reqs, change)
            if event is not None:
                w.send.send_nowait(event)

    @staticmethod
    def _event(reqs: list[Callable], change: _Change) -> dict[str, Any] | None:
        was, now = matches(reqs, change.old), matches(reqs, change.new)
        if now:
            return {"type": "MODIFIED" if was else "ADDED", "object": change.new}
        if was:
            obj = copy.deepcopy(change.new or change.old)
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(change.rv)
            return {"type": "DELETED", "object": obj}
        return None

    async def _json(self, stream: trio.abc.Stream, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        await stream.send_all(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(data), data)
        )

    async def _status(self, stream: trio.abc.Stream, code: int, reason: str, msg: str) -> None:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                "reason": reason, "message": msg}  # fmt: skip
        await self._json(stream, code, body)


class RecordingSink:
    """A FleetSink that keeps what each source wants (no real workers), like the gateway's
    bookkeeping: ``current`` is the last list synced, ``syncs`` counts the calls."""

    def __init__(self) -> None:
        self.current: dict[str, Any] = {}
        self.source = ""
        self.syncs = 0
        self.sweeps = 0

    def sync_workers(self, source: str, desired: Any) -> tuple[int, int]:
        self.source = source
        want = {w.worker_id: w for w in desired}
        added = len(set(want) - set(self.current))
        retired = len(set(self.current) - set(want))
        self.current = want
        self.syncs += 1
        return added, retired

    def sweep_retired(self) -> None:
        self.sweeps += 1

    def source_of(self, worker_id: str) -> str:
        return self.source if worker_id in self.current else "static"
