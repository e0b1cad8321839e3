"""Workers from Kubernetes pods matched by label selectors (one selector per role).

For each configured role the backend LISTs the namespace's pods with the role's
``labelSelector`` (the API server evaluates it, equality- and set-based alike), then WATCHes
from the list's ``resourceVersion`` (``allowWatchBookmarks``, ``timeoutSeconds``): a chunked
stream of JSON lines, ADDED / MODIFIED / DELETED / BOOKMARK / ERROR. Events go through the
sans-IO :class:`~.k8s_pods.PodFleet`; each change syncs source ``k8s:{namespace}``. HTTP goes
through the gateway's own client (``transport/pool.py``, TLS with the cluster's CA).

Failure rules: ``410 Gone`` (an expired resourceVersion, as an HTTP status or an ERROR event)
relists at once. A watch the server ends (its ``timeoutSeconds``) is renewed from the last
resourceVersion at once; a broken stream is renewed after a jittered backoff. An unreachable or
refusing API server keeps the last known workers (logged once per outage, retried with jittered
exponential backoff up to 30 s; the recovery is logged). A selector the API server rejects at the
first LIST is a :class:`ConfigError` naming the key. The bearer token is re-read before every
request, since bound service-account tokens rotate; a token file unreadable at start is a
ConfigError, later the last token read is kept.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

import msgspec
import trio

from ...config import ConfigError, DiscoveryConfig
from ...metrics import Counter, Gauge, Metrics
from ...transport.pool import ConnectionPool, Origin, Response, UpstreamError
from .k8s_pods import (
    Pod,
    PodFleet,
    PodRules,
    decode_event,
    decode_pod,
    decode_pod_list,
    decode_status,
)
from .sink import FleetSink, SourceSync, backoff_delay

__all__ = [
    "ApiError",
    "ApiTarget",
    "BearerToken",
    "K8sDiscovery",
    "K8sMetrics",
    "resolve_api",
    "run_k8s_discovery",
]

log = logging.getLogger("lmgw.workers.discovery")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where a pod finds its service account's token, CA bundle and namespace."""
SELECTOR_KEYS = {
    "pd": "k8s_selector",
    "p": "k8s_prefill_selector",
    "d": "k8s_decode_selector",
    "e": "k8s_encode_selector",
}
LIST_PAGE = 500
"""Pods per LIST page (``limit``/``continue``), so a large namespace is never one huge body."""
MAX_LIST_BYTES = 64 << 20
MAX_EVENT_BYTES = 16 << 20
"""One watch event is one pod: far below this; more without a newline is not the watch API."""
MAX_ERROR_BYTES = 64 << 10
WATCH_SLACK_S = 30.0
"""A watch still open this long after its ``timeoutSeconds`` is abandoned and renewed."""
MIN_WATCH_S = 1.0
"""A watch ended sooner than this (without an error) counts as a failure for the backoff."""
BACKOFF_CAP_S = 30.0
SWEEP_INTERVAL_S = 1.0
"""How often drained workers are checked for being idle (then removed)."""


class ApiError(Exception):
    """A failed exchange with the API server; ``kind`` labels ``lmgw_k8s_api_errors_total``."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


class _Gone(Exception):
    """410: the resourceVersion (or a list's continue token) expired; relist."""


class K8sMetrics:
    """The backend's metrics, exported by every gateway (empty without a selector)."""

    def __init__(self, metrics: Metrics) -> None:
        self.workers = Gauge(
            "lmgw_k8s_discovered_workers",
            "Workers the Kubernetes discovery currently wants, by role (eligible pods).",
            ("role",),
        )
        self.restarts = Counter(
            "lmgw_k8s_watch_restarts_total",
            "Pod watches renewed, by role and reason: closed (the server ended it), expired"
            " (410 Gone: relisted), broken (the stream was cut), error (an error answer).",
            ("role", "reason"),
        )
        self.errors = Counter(
            "lmgw_k8s_api_errors_total",
            "Failed exchanges with the Kubernetes API server, by kind: unreachable, timeout,"
            " denied (401/403), rejected (400), http (other statuses, ERROR events), invalid"
            " (an unreadable answer), broken (a watch stream cut).",
            ("kind",),
        )
        for m in (self.workers, self.restarts, self.errors):
            metrics.add(m)


# -- where the API server is, and how to talk to it --------------------------------------------


@dataclass(frozen=True)
class ApiTarget:
    """The resolved connection settings."""

    url: str  #: e.g. https://10.96.0.1:443 (with any path prefix of k8s_api_url)
    namespace: str
    token_file: str | None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @property
    def origin(self) -> Origin:
        return Origin.from_url(self.url)

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")


def resolve_api(
    cfg: DiscoveryConfig, env: Mapping[str, str] | None = None, sa_dir: str = SA_DIR
) -> ApiTarget:
    """The API server, namespace, token file and TLS context of ``cfg``: explicit keys, else
    in-cluster (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service account files in
    ``sa_dir``). Raises ConfigError (naming the key) when there is no API server to use or the
    CA file cannot be loaded."""
    env = os.environ if env is None else env
    url = cfg.k8s_api_url
    in_cluster = url is None
    if url is None:
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise ConfigError(
                "not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): set"
                " discovery.k8s_api_url",
                path="discovery.k8s_api_url",
            )
        url = f"https://{f'[{host}]' if ':' in host else host}:{port}"
    token_file = cfg.k8s_token_file
    ca_file = cfg.k8s_ca_file
    if in_cluster:
        token_file = token_file or os.path.join(sa_dir, "token")
        ca_file = ca_file or os.path.join(sa_dir, "ca.crt")
    namespace = cfg.k8s_namespace
    if namespace is None:
        try:
            with open(os.path.join(sa_dir, "namespace"), encoding="utf-8") as f:
                namespace = f.read().strip() or "default"
        except OSError:
            namespace = "default"
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"cannot load the CA file `{ca_file}`: {getattr(e, 'strerror', None) or e}",
                path="discovery.k8s_ca_file",
            ) from None
        if cfg.k8s_insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            log.warning(
                "discovery k8s: TLS verification of the API server %s is OFF"
                " (discovery.k8s_insecure_skip_verify): anyone on the path can feed this"
                " gateway workers; use it on development clusters only",
                url,
            )
    return ApiTarget(url, namespace, token_file, context)


class BearerToken:
    """The token in a file, re-read on every use (bound service-account tokens rotate: the
    kubelet rewrites the file well before the old one expires)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.token: str | None = None
        self.error: str | None = None

    def _read(self) -> str:
        assert self.path is not None
        with open(self.path, encoding="utf-8") as f:
            token = f.read(1 << 20).strip()
        if not token:
            raise ValueError("the file is empty")
        if not token.isprintable() or " " in token:
            raise ValueError("the file does not hold one token")
        return token

    def load(self) -> None:
        """The first read: ConfigError naming ``discovery.k8s_token_file`` if it fails."""
        if self.path is None:
            return
        try:
            self.token = self._read()
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot read the token file `{self.path}`: {getattr(e, 'strerror', None) or e}",
                path="discovery.k8s_token_file",
            ) from None

    def current(self) -> str | None:
        """The token now; the last good one if the file cannot be read (logged once)."""
        if self.path is None:
            return None
        try:
            self.token = self._read()
        except (OSError, ValueError) as e:
            why = str(getattr(e, "strerror", None) or e)
            if why != self.error:
                log.error(
                    "discovery k8s: cannot re-read the token file `%s` (%s); using the last token",
                    self.path,
                    why,
                )
                self.error = why
            return self.token
        self.error = None
        return self.token


# -- the backend ------------------------------------------------------------------------------


@dataclass
class _RoleWatch:
    role: str
    selector: str
    rv: str | None = None  #: None: LIST first
    streaming: bool = False  #: whether the current watch got its 200 head


class K8sDiscovery:
    """Watches each configured role's pods and keeps source ``k8s:{namespace}`` in sync.

    ``lists`` and ``watches`` count the requests that succeeded (for tests and status pages).
    """

    def __init__(
        self,
        sink: FleetSink,
        cfg: DiscoveryConfig,
        target: ApiTarget,
        metrics: K8sMetrics | None = None,
        *,
        retry_base_s: float = 0.5,
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.metrics = metrics
        self.retry_base_s = retry_base_s
        self.timeout_s = cfg.k8s_timeout_s
        self.watch_timeout = max(1, round(cfg.k8s_watch_timeout_s))
        self.source = f"k8s:{target.namespace}"
        self.sync = SourceSync(sink, self.source)
        self.fleet = PodFleet(
            cfg.k8s_selectors,
            PodRules(
                port=cfg.k8s_port,
                port_name=cfg.k8s_port_name,
                bootstrap_port_annotation=cfg.k8s_bootstrap_port_annotation,
                models_annotation=cfg.k8s_models_annotation,
                native_port_annotation=cfg.k8s_native_port_annotation,
                zone_annotation=cfg.k8s_zone_annotation,
                zone_by_node=cfg.k8s_zone_by_node,
                data_parallel_annotation=cfg.k8s_data_parallel_annotation,
            ),
        )
        self.token = BearerToken(target.token_file)
        # No keep-alive: a watch holds its connection for minutes and a LIST is rare, while a
        # pooled TLS connection that a load balancer closed while idle would read as an outage.
        self.pool = ConnectionPool(
            self.timeout_s, max_idle_per_origin=0, ssl_context=target.ssl_context
        )
        self._origin = target.origin
        self._path = f"{target.base_path}/api/v1/namespaces/{quote(target.namespace)}/pods"
        self._down: dict[str, str] = {}  # role -> why, while its requests fail
        self.lists = self.watches = 0

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; started once every role's first LIST was tried (a rejected
        selector raises ConfigError instead; an unreachable API server does not)."""
        self.token.load()
        log.info(
            "discovery k8s: watching pods in namespace %s at %s (%s)",
            self.target.namespace,
            self.target.url,
            ", ".join(f"{role}: {sel!r}" for role, sel in self.cfg.k8s_selectors.items()),
        )
        pending = len(self.fleet.roles)
        all_tried = trio.Event()

        def tried() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                all_tried.set()

        try:
            async with trio.open_nursery() as nursery:
                for role, selector in self.cfg.k8s_selectors.items():
                    nursery.start_soon(self._run_role, _RoleWatch(role, selector), tried)
                await all_tried.wait()
                task_status.started()
                while True:
                    await trio.sleep(SWEEP_INTERVAL_S)
                    self.sync.update(None)
        finally:
            self.pool.close()

    async def _run_role(self, w: _RoleWatch, tried: Callable[[], None]) -> None:
        first = True
        failures = gone = 0
        while True:
            delay = 0.0
            began = trio.current_time()
            w.streaming = False
            try:
                if w.rv is None:
                    await self._list(w)
                    self._up(w.role)
                    self._sync()
                    failures = 0
                    if first:
                        first = False
                        tried()
                began = trio.current_time()
                await self._watch(w)
                gone = 0
                self._restarted(w.role, "closed")
            except _Gone as e:
                log.info("discovery k8s: %s watch expired (%s); relisting", w.role, e)
                self._restarted(w.role, "expired")
                w.rv = None
                if trio.current_time() - began >= MIN_WATCH_S:
                    gone = 0
                gone += 1
                if gone > 1:  # relisted, and expired again at once: do not spin
                    delay = backoff_delay(gone - 1, self.retry_base_s, BACKOFF_CAP_S)
            except ApiError as e:
                if self.metrics is not None:
                    self.metrics.errors.inc((e.kind,))
                if first and e.kind == "rejected":
                    raise ConfigError(
                        f"the API server rejected the selector {w.selector!r}: {e.message}",
                        path=f"discovery.{SELECTOR_KEYS[w.role]}",
                    ) from None
                if e.kind == "broken":
                    log.info("discovery k8s: %s watch broken (%s); resuming", w.role, e.message)
                    self._restarted(w.role, "broken")
                else:
                    if w.streaming:
                        self._restarted(w.role, "error")
                    self._failed(w.role, e)
                if e.kind == "invalid":
                    w.rv = None  # an event may be lost: start over from a LIST
                # a watch that ran a while before it broke starts a fresh backoff
                fresh = w.streaming and trio.current_time() - began >= MIN_WATCH_S
                failures = 1 if fresh else failures + 1
                delay = backoff_delay(failures, self.retry_base_s, BACKOFF_CAP_S)
                if first:
                    first = False
                    tried()
            else:  # the server ended the watch: renew at once, unless it keeps doing so early
                if trio.current_time() - began < MIN_WATCH_S:
                    failures += 1
                    delay = backoff_delay(failures, self.retry_base_s, BACKOFF_CAP_S)
                else:
                    failures = 0
            finally:
                self._sync()  # events applied before an error still count
            if delay:
                await trio.sleep(delay)

    def _restarted(self, role: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.restarts.inc((role, reason))

    def _failed(self, role: str, exc: ApiError) -> None:
        if not self._down:
            log.warning(
                "discovery k8s: API server %s unavailable (%s); keeping the %d worker(s)"
                " known, retrying",
                self.target.url,
                exc.message,
                len(self.fleet.workers()),
            )
        elif self._down.get(role) != exc.message:
            log.debug("discovery k8s: %s still failing: %s", role, exc.message)
        self._down[role] = exc.message

    def _up(self, role: str) -> None:
        if self._down.pop(role, None) is not None and not self._down:
            log.info("discovery k8s: API server %s answers again", self.target.url)

    def _sync(self) -> None:
        self.sync.update(self.fleet.workers())
        if self.metrics is not None:
            for role, n in self.fleet.counts().items():
                self.metrics.workers.set((role,), float(n))

    # -- HTTP -----------------------------------------------------------------------------
    async def _get(self, query: dict[str, str]) -> Response:
        """GET the pods with ``query``; the response once its head says 200."""
        headers = [(b"accept", b"application/json"), (b"user-agent", b"lmgw")]
        token = self.token.current()
        if token:
            headers.append((b"authorization", b"Bearer " + token.encode()))
        path = f"{self._path}?{urlencode(query)}"
        try:
            resp = await self.pool.request(
                self._origin, "GET", path, headers, response_timeout_s=self.timeout_s
            )
        except UpstreamError as e:
            why = e.message.removeprefix("worker ")  # (the pool speaks of workers)
            raise ApiError("timeout" if e.status == 504 else "unreachable", why) from None
        if resp.status == 200:
            return resp
        body = b""
        try:
            with trio.move_on_after(self.timeout_s):
                body = await resp.read_all(MAX_ERROR_BYTES)
        except UpstreamError:
            pass
        finally:
            resp.release()
        raise _status_error(resp.status, body)

    async def _list(self, w: _RoleWatch) -> None:
        pods: list[Pod] = []
        query = {"labelSelector": w.selector, "limit": str(LIST_PAGE)}
        while True:
            resp = await self._get(query)
            try:
                with trio.move_on_after(self.timeout_s) as scope:
                    body = await resp.read_all(MAX_LIST_BYTES)
            except UpstreamError as e:
                raise ApiError("unreachable", e.message) from None
            finally:
                resp.release()
            if scope.cancelled_caught:
                raise ApiError("timeout", f"the pod list took over {self.timeout_s:g} s")
            try:
                page = decode_pod_list(body)
            except (msgspec.DecodeError, RecursionError) as e:
                raise ApiError("invalid", f"unreadable pod list: {e}") from None
            pods.extend(page.items or ())
            if not page.metadata.continue_:
                break
            query["continue"] = page.metadata.continue_
        self.fleet.replace(w.role, pods)
        w.rv = page.metadata.resource_version or None
        self.lists += 1

    async def _watch(self, w: _RoleWatch) -> None:
        """Follow one watch until the server ends it (returns) or something fails (raises)."""
        query = {
            "labelSelector": w.selector,
            "watch": "1",
            "resourceVersion": w.rv or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        resp = await self._get(query)
        w.streaming = True
        self.watches += 1
        self._up(w.role)
        buf = b""
        try:
            with trio.move_on_after(self.watch_timeout + WATCH_SLACK_S):
                while True:
                    try:
                        chunk = await resp.read_chunk()
                    except UpstreamError as e:
                        raise ApiError("broken", e.message) from None
                    if not chunk:
                        return
                    buf += chunk
                    if b"\n" not in chunk:
                        if len(buf) > MAX_EVENT_BYTES:
                            raise ApiError("invalid", "a watch event without end")
                        continue
                    *lines, buf = buf.split(b"\n")
                    changed = False
                    try:
                        for line in lines:
                            if line.strip():
                                changed |= self._event(w, line)
                    finally:
                        if changed:
                            self._sync()
        finally:
            resp.release()

    def _event(self, w: _RoleWatch, line: bytes) -> bool:
        try:
            event = decode_event(line)
            if event.type == "ERROR":
                status = decode_status(event.object)
            else:
                pod = decode_pod(event.object)
        except (msgspec.DecodeError, RecursionError) as e:
            raise ApiError("invalid", f"unreadable watch event: {e}") from None
        if event.type == "ERROR":
            if status.code == 410:
                raise _Gone(status.message or status.reason or "410 Gone")
            raise ApiError(
                "http", f"watch error {status.code} {status.reason}: {status.message}", status.code
            )
        w.rv = pod.metadata.resource_version or w.rv
        if event.type == "BOOKMARK":
            return False
        if event.type not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("discovery k8s: watch event %r ignored", event.type)
            return False
        return self.fleet.apply(w.role, event.type, pod)


def _status_error(status: int, body: bytes) -> Exception:
    try:
        detail = decode_status(body)
        message = detail.message or detail.reason
    except (msgspec.DecodeError, RecursionError):
        message = body[:200].decode("utf-8", "replace")
    text = f"HTTP {status}" + (f": {message}" if message else "")
    if status == 410:
        return _Gone(text)
    if status in (401, 403):
        return ApiError(
            "denied",
            text + " (the gateway's service account needs get, list and watch on pods in the"
            " namespace: see docs/operations.md, 'Running on Kubernetes')",
            status,
        )
    if status == 400:
        return ApiError("rejected", text, status)
    return ApiError("http", text, status)


async def run_k8s_discovery(
    sink: FleetSink,
    cfg: DiscoveryConfig,
    metrics: K8sMetrics | None = None,
    *,
    env: Mapping[str, str] | None = None,
    sa_dir: str = SA_DIR,
    retry_base_s: float = 0.5,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The function form of :class:`K8sDiscovery` (the API server resolved from ``cfg``)."""
    target = resolve_api(cfg, env, sa_dir)
    discovery = K8sDiscovery(sink, cfg, target, metrics, retry_base_s=retry_base_s)
    await discovery.run(task_status=task_status)
