"""The Gateway: owns the root nursery, the fleet registry, the monitor, the pipeline and servers.

``await nursery.start(gateway.run)`` returns the bound port once the first health round is done
and the server is listening; cancelling the nursery stops everything (no task outlives it).
:meth:`shutdown` is the graceful path: stop accepting, let requests in flight finish within
``server.graceful_shutdown_s``, then cancel.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .api.app import App
from .api.batches import BatchesAPI
from .api.keys import ApiKeys, AuthMetrics, Guarded
from .api.model_routes import register_route_metrics, route_from_config
from .api.text import TextAPI
from .batch import BatchService
from .cache import build_pool
from .cache.metrics import CacheMetrics
from .config import (
    ROLES,
    ConfigError,
    GatewayConfig,
    ModelRouteConfig,
    WorkerConfig,
    is_native_url,
)
from .dashboard import Dashboard
from .dashboard.snapshot import RecentErrors
from .fleetstats import FleetStats
from .http.server import HTTPServer, ServerLimits
from .logs import AccessLog
from .memtrim import HeapTrimmer
from .metrics import Counter, Gauge, Metrics
from .mirrors import Mirrors
from .model_routes import ModelRoute, ModelRoutes
from .pipeline.native import NativeChannels, NativeWorker
from .pipeline.runner import Pipeline
from .planner.feed import PlannerFeed
from .process_stats import register_process_metrics
from .routing.registry import make_policy
from .tracing import Tracing
from .transport.pool import ConnectionPool
from .workers.discovery import configured as discovery_configured
from .workers.discovery.kubernetes import K8sMetrics
from .workers.dp_auto import AutoRanks
from .workers.kv_events import KvEventSubscribers
from .workers.lora import AdapterManager
from .workers.monitor import HealthMonitor
from .workers.registry import Registry, WorkerExists
from .workers.replicas import ReplicaSync
from .workers.replicas import register_metrics as register_replica_metrics
from .workers.worker import Worker, WorkerState

if TYPE_CHECKING:
    from .text.service import ModelText
    from .workers.p2p_discovery import P2pChange
    from .workers.parity import ParityChecker

log = logging.getLogger("lmgw")


def is_loopback_host(host: str) -> bool:
    """Whether a listen address only accepts local clients (``localhost``, 127/8, ``::1``)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_limits(cfg: GatewayConfig) -> ServerLimits:
    """The server's limits from ``limits.*`` (same names) and ``server.backlog``."""
    names = {f.name for f in dataclasses.fields(ServerLimits)}
    given = msgspec.structs.asdict(cfg.limits)
    return ServerLimits(
        **{k: v for k, v in given.items() if k in names}, backlog=cfg.server.backlog
    )


class Gateway:
    def __init__(
        self, config: GatewayConfig, *, tools: Sequence[Any] = (), tracer_provider: Any = None
    ) -> None:
        """``tools``: native tools (functions or :class:`lmgw.tools.registry.Tool`) besides
        those registered process-wide and those of the ``lmgw.tools`` entry points.
        ``tracer_provider``: an OpenTelemetry TracerProvider to trace into (turns tracing on,
        whatever ``tracing.enabled`` says; else tracing follows the config)."""
        native_tools = tools
        self.config = config
        self.started_at = time.time()
        self.request_id_prefix = os.urandom(4).hex()
        self.metrics = Metrics(
            in_flight=self._in_flight_samples, worker_requests=self._worker_request_samples
        )
        # observability (docs/observability.md): scrape-time metrics, the dashboard's error
        # ring, tracing and the access log (None when off: one test per request)
        self.fleet_stats = FleetStats(self)
        self.fleet_stats.install(self.metrics)
        register_process_metrics(self.metrics, connections=self._client_connections)
        self.recent_errors = RecentErrors(config.dashboard.recent_errors)
        self.tracing = Tracing.from_config(config.tracing, tracer_provider)
        lc = config.logging
        self.access_log = AccessLog(lc.access_log_sample) if lc.access_log else None
        h = config.health
        self.registry = Registry(
            h.outlier_failures,
            h.outlier_base_ejection_s,
            h.outlier_max_ejection_s,
            panic_routing=h.panic_routing,
        )
        self.registry.subscribe(self._on_worker_change)
        up = config.upstream
        self.pool = ConnectionPool(up.connect_timeout_s, up.idle_timeout_s, up.max_idle_per_worker)
        self.policies = {
            role: make_policy(config.routing.policy_for(role), config.routing) for role in ROLES
        }
        if config.routing.shadow_policies:  # candidates asked on live traffic, never obeyed
            from .routing.shadow import Shadowed, ShadowMetrics

            shadow_metrics = ShadowMetrics()
            for metric in shadow_metrics.all():
                self.metrics.add(metric)
            for role, active in self.policies.items():
                names = [n for n in config.routing.shadow_policies if n != active.name]
                if role != "e" and names:  # encoders: media affinity, not prompt routing
                    shadows = [make_policy(n, config.routing) for n in names]
                    self.policies[role] = Shadowed(role, active, shadows, shadow_metrics)
        if config.routing.lora_affinity:  # adapters where they are active or can be
            from .routing.lora_affinity import LoraAffine

            for role in ("pd", "p", "d"):
                self.policies[role] = LoraAffine(self.policies[role])
        self.metrics.add(
            Gauge(
                "lmgw_routing_policy_stat",
                "What each role's routing policy reports about itself (cache_aware: index"
                " entries, bytes, budget, evictions, hit ratio...).",
                ("role", "policy", "stat"),
                collect=self._policy_samples,
            )
        )
        self.pipeline = Pipeline(config, self.registry, self.pool, self.policies, self.metrics)
        self.pipeline.is_lora = self.is_lora
        # the distributed cache pool ([cache]; None without tiers) and the encoder-output cache
        self.cache_metrics = CacheMetrics(self.metrics)
        self.cache = build_pool(
            config.cache, producer=f"gateway-{self.request_id_prefix}", role="gateway"
        )
        if self.cache is not None:
            self.cache_metrics.attach(self.cache)
            if config.cache.encoder_outputs:
                from .cache.encoder import PooledEncodedItems

                self.pipeline.disagg.encoded = PooledEncodedItems(
                    self.cache, config.media.encoder_cache_ttl_s
                )
        # replicas sharing routing hints and health verdicts through Redis ([replicas])
        self.replicas: ReplicaSync | None = None
        if config.replicas.redis_url is not None:
            self.replicas = ReplicaSync(config.replicas, self.registry, self.policies)
        register_replica_metrics(self.metrics, lambda: self.replicas)
        self.k8s_metrics = K8sMetrics(self.metrics)  # Kubernetes discovery (discovery.k8s_*)
        # engine KV events (workers[].kv_events) for policies that use them, one SUB task each
        self.kv_events = KvEventSubscribers(self.policies, self.metrics)
        self.model_aliases = {alias: m.name for m in config.models for alias in m.aliases}
        self._configured = {m.name: m for m in config.models}
        # names split between models and falling back to others ([[model_routes]])
        self.model_routes = ModelRoutes(route_from_config(r) for r in config.model_routes)
        register_route_metrics(self.metrics, self.model_routes)
        # copies of a share of a route's requests to its mirror model (shadow traffic)
        self.mirrors = Mirrors(self.metrics)
        #: recommended worker counts per role (planner.enabled)
        self.planner = (
            PlannerFeed(config.planner, self.registry, self.metrics)
            if config.planner.enabled
            else None
        )
        auth = b"Bearer " + up.api_key.encode() if up.api_key else None
        self._sources: dict[str, str] = {}  # worker id -> discovery source that added it
        #: data_parallel_size = "auto" entries: their ranks follow the servers' /metrics
        self.auto_ranks = AutoRanks()
        self._retiring: set[str] = set()  # ranks a server no longer has, drained until idle
        self.monitor = HealthMonitor(self.registry, self.pool, config.health, auth)
        pipe = self.pipeline
        self.monitor.asks_bootstrap = any(
            d is not None and d.names_bootstrap_port
            for d in (*pipe.dialects.values(), pipe.default_dialect)
        )
        self.metrics.add(
            Counter(
                "lmgw_worker_stuck_total",
                "Times a worker was ejected as stuck: requests in flight and no token processed"
                " by its engine for health.stuck_timeout_s, whatever its /health said.",
                ("role", "worker"),
                collect=lambda: [(k, float(n)) for k, n in self.monitor.stuck.items()],
            )
        )
        # LoRA adapters loaded on the fleet through the admin API, and kept loaded
        self.adapters = AdapterManager(self.registry, self.pool, auth, self.metrics)
        # one RpcChannel per native (zmq+) worker, run in this gateway's nursery
        self.native = NativeChannels(
            self.registry,
            h,
            up.response_timeout_s,
            on_exit=self._on_native_exit,
            curve_secret_key_file=config.native.curve_secret_key_file,
            shm_threshold_bytes=config.native.shm_threshold_bytes,
        )
        for entry in config.workers:
            for wc in self.auto_ranks.expand(entry):  # data-parallel: one worker per rank
                self.add_worker(wc)
        self.monitor.on_engines = self._on_engines
        # models with a gateway-side tokenizer (models[].tokenizer): loaded now, so a bad
        # folder stops the start instead of failing requests
        self.texts: dict[str, ModelText] = {}
        self.parity: ParityChecker | None = None
        if any(m.tokenizer for m in config.models):
            from .text.service import load_model_texts
            from .workers.parity import ParityChecker

            self.texts = load_model_texts(config.models)
            self.pipeline.native.texts = self.texts
            self._segment_metrics()
            self.parity = ParityChecker(
                self.registry, self.pool, self.texts, self.metrics.tokenizer_parity
            )
        # per model: the tool-call parser and reasoning split applied to its chat answers
        self.output_parsers: dict[str, tuple[Any, Any]] = {}
        self.worker_tool_choice = {m.name: m.worker_tool_choice for m in config.models}
        for m in config.models:
            if m.tool_parser or m.reasoning_parser:
                from .tools import ReasoningParser, get_tool_parser

                tools = get_tool_parser(m.tool_parser) if m.tool_parser else None
                reasoning = (
                    ReasoningParser(opened=m.reasoning_parser == "think_opened")
                    if m.reasoning_parser
                    else None
                )
                self.output_parsers[m.name] = (tools, reasoning)
        # tools the gateway executes itself (docs/tools.md): None when it has none, and then
        # nothing of the tool loop runs per request
        from .tools.caller import build_caller

        self.tools = build_caller(config.tools, native_tools, self.metrics)
        self.tool_loop = None
        if self.tools is not None:
            from .tools.loop import ToolLoop

            self.tool_loop = ToolLoop(self.tools, config, self.pipeline)
        else:
            for i, m in enumerate(config.models):
                if m.tool_loop is not None:
                    raise ConfigError(
                        "the gateway has no tools to run (register some, or add [[tools.mcp]])",
                        path=f"models[{i}].tool_loop",
                    )
        # client API keys (auth.*): None when none are configured (the API is then open)
        self.keys = ApiKeys.from_config(config.auth, AuthMetrics(self.metrics))
        if self.keys is None and not config.auth.open and not is_loopback_host(config.server.host):
            raise ConfigError(
                f"no API keys configured and server.host {config.server.host!r} is not a"
                " loopback address: give keys (auth.keys_file / --api-keys-file,"
                " LMGW_API_KEYS) or serve the API open on purpose (auth.open = true / --open)",
                path="auth",
            )
        #: resumable answers (streams.resumable): None when off, and nothing of them runs
        self.streams = None
        if config.streams.resumable or config.streams.coalesce:
            from .streams import StreamStore

            self.streams = StreamStore(
                config.streams, request_timeout_s=config.limits.request_timeout_s
            )
            self.metrics.add(self.streams.active)
            self.metrics.add(self.streams.resumes)
            self.metrics.add(self.streams.coalesced)
        self.app = App(self)
        if self.planner is not None:  # requests waiting for an admission slot are demand too
            self.planner.queued = self.app.admission.waiting_by_model
        if self.streams is not None:
            self.streams.on_timeout = self.app.on_timeout
        TextAPI(self).install(self.app)
        # OpenAI's Files and Batch APIs: batches run through the app itself (lmgw.batch)
        self.batches: BatchService | None = None
        if config.batches.enabled:
            self.batches = BatchService(
                config.batches,
                self.app,
                config.limits.request_timeout_s or None,
                metrics=self.metrics,
            )
            BatchesAPI(self.batches, config.limits.max_json_depth).install(self.app)
        if self.replicas is not None:  # Responses API ids: any replica routes a follow-up
            self.replicas.share_responses(self.app.passthru.affinity)
        self.dashboard: Dashboard | None = None
        if config.dashboard.enabled:
            self.dashboard = Dashboard(self)
            self.dashboard.install(self.app)
        #: what the servers run: the App, behind the key check when keys are configured
        self.handler = Guarded(self.app, self.keys) if self.keys is not None else self.app
        #: the CORS rules (api/cors.py) when browser pages of other origins may call the API
        self.cors: Any = None
        if config.server.cors_allow_origins:
            from .api.cors import Cors, CorsHandler

            self.cors = Cors(config.server)
            self.handler = CorsHandler(self.handler, self.cors)
        self.server: HTTPServer | None = None
        self.port: int | None = None
        #: the bound P2P NCCL discovery address (``discovery.p2p_nccl_bind``), once listening
        self.p2p_endpoint: str | None = None
        #: the bound native registration endpoint (``discovery.native_bind``), once listening
        self.native_endpoint: str | None = None
        self._cancel = trio.CancelScope()
        self._hypercorn_stop = trio.Event()
        self._server_done = trio.Event()

    # -- fleet ----------------------------------------------------------------------------
    def add_worker(self, wc: WorkerConfig) -> Worker:
        """Add one worker (one rank of a data-parallel entry: see :meth:`WorkerConfig.ranks`)."""
        if len(wc.ranks()) > 1:
            raise ValueError("add each rank of a data-parallel worker (WorkerConfig.ranks)")
        if is_native_url(wc.url):  # its channel opens now (or when the gateway starts)
            native = NativeWorker(wc)
            self.native.prepare(native)  # bad CURVE key files raise before it joins
            native.zone = wc.zone
            self.registry.add(native)
            self.native.start(native)
            self.kv_events.watch(native, wc.kv_events)
            return native
        worker = Worker(
            wc.worker_id,
            wc.url,
            wc.role,
            frozenset(wc.models) if wc.models else None,
            wc.bootstrap_port,
            wc.kv_address,
            wc.data_parallel_rank,
        )
        worker.zone = wc.zone
        self.registry.add(worker)
        self.kv_events.watch(worker, wc.kv_events)
        return worker

    def add_entry(self, entry: WorkerConfig) -> list[Worker]:
        """Add a ``[[workers]]`` entry given at run time (admin API, SDK): the worker, or each
        of its data-parallel ranks. Nothing is added when any id is taken.

        Raises:
            WorkerExists: naming an id that is taken.
            ValueError: a model's dialect cannot name the worker on the wire.
        """
        for wc in entry.ranks():  # (an "auto" entry: its one worker until a probe counts)
            if self.registry.get(wc.worker_id) is not None:
                raise WorkerExists(wc.worker_id)
        self.pipeline.check_worker(entry)  # the ranks differ in nothing a dialect names
        return [self.add_worker(wc) for wc in self.auto_ranks.expand(entry)]

    def remove_worker(self, worker_id: str) -> Worker:
        """Remove at once (requests in flight on it finish on their own connections)."""
        worker = self.registry.remove(worker_id)
        self.native.close(worker)
        self.kv_events.unwatch(worker)
        self.pool.forget(worker.origin)
        for policy in self.policies.values():
            policy.on_worker_removed(worker)
        self._sources.pop(worker_id, None)
        self.auto_ranks.forget(worker_id)
        self._retiring.discard(worker_id)
        return worker

    def drain_worker(self, worker_id: str, reason: str = "drained") -> Worker:
        """No new requests for the worker; those in flight finish. KeyError if unknown."""
        worker = self.registry.get(worker_id)
        if worker is None:
            raise KeyError(worker_id)
        self.registry.set_state(worker, WorkerState.DRAINING, reason)
        return worker

    async def retire_worker(self, worker_id: str, grace_s: float) -> Worker:
        """Drain, wait up to ``grace_s`` for its requests in flight to end, then remove it."""
        worker = self.drain_worker(worker_id, "retiring")
        with trio.move_on_after(grace_s):
            while worker.in_flight > 0:
                await trio.sleep(0.05)
        if self.registry.get(worker_id) is worker:
            self.remove_worker(worker_id)
        return worker

    def sync_workers(self, source: str, desired: Iterable[WorkerConfig]) -> tuple[int, int]:
        """Make the workers owned by ``source`` (a discovery backend) exactly ``desired``: add
        the new ones, drain the ones gone (removed once idle, by :meth:`sweep_retired`).
        Workers of other sources, static ones included, are never touched; a worker whose id
        another source owns is skipped. Returns (added, retired)."""
        want = {wc.worker_id: wc for entry in desired for wc in self.auto_ranks.expand(entry)}
        added = retired = 0
        for wid, wc in want.items():
            known = self.registry.get(wid)
            if known is None:
                self.add_worker(wc)
                self._sources[wid] = source
                added += 1
            elif self._sources.get(wid) == source and known.state is WorkerState.DRAINING:
                self.registry.set_state(known, WorkerState.STARTING, "announced again")
        for wid, owner in list(self._sources.items()):
            if owner == source and wid not in want:
                worker = self.registry.get(wid)
                if worker is not None and worker.state is not WorkerState.DRAINING:
                    self.drain_worker(wid, f"gone from {source}")
                    retired += 1
        self.sweep_retired()
        return added, retired

    def sweep_retired(self) -> None:
        """Remove the workers retired on their way out that have nothing in flight any more:
        discovered ones drained because their source dropped them, and data-parallel ranks
        their server no longer has."""
        for wid in [*self._sources, *self._retiring]:
            worker = self.registry.get(wid)
            if worker is None:
                self._retiring.discard(wid)  # removed by other means meanwhile
            elif worker.state is WorkerState.DRAINING and not worker.in_flight:
                self.remove_worker(wid)  # (out of both as it goes)

    def _on_engines(self, worker: Worker, engines: int) -> bool:
        """A probe counted the engines of ``worker``'s server. For a worker of a
        ``data_parallel_size = "auto"`` entry, add the ranks the server has and the fleet
        lacks, and drain those it no longer has (removed once idle); True when it is one (or
        such a worker being retired)."""
        ours = worker.id in self._retiring
        if self._retiring:
            self.sweep_retired()
        if not self.auto_ranks.owns(worker.id):
            return ours
        adds, retires = self.auto_ranks.observe(worker.id, engines)
        source = self._sources.get(worker.id)
        for wc in adds:
            known = self.registry.get(wc.worker_id)
            if known is None:
                self.add_worker(wc)
            else:  # retiring from an earlier size, and back
                self._retiring.discard(wc.worker_id)
                self.registry.set_state(known, WorkerState.STARTING, "a rank again")
            if source is not None:
                self._sources[wc.worker_id] = source
        for wid in retires:
            if self.registry.get(wid) is not None:
                self.drain_worker(wid, "the server's data-parallel ranks changed")
                self._retiring.add(wid)
        return True

    def source_of(self, worker_id: str) -> str:
        """Which discovery source owns the worker ("static" for config and admin additions)."""
        return self._sources.get(worker_id, "static")

    def _on_p2p_change(self, change: P2pChange) -> None:
        """A vLLM P2P NCCL instance announced itself or went silent (workers/p2p_discovery)."""
        inst = change.instance
        wid = f"p2p-{inst.http_address}"
        known = self.registry.get(wid)
        if change.kind == "add":
            if known is None:
                self.add_worker(
                    WorkerConfig(
                        url=inst.http_url, role=inst.role, id=wid, kv_address=inst.kv_address
                    )
                )
        elif known is not None:
            self.remove_worker(wid)

    def _on_native_exit(self, worker: Worker) -> None:
        """A native worker said Exit: a discovered one leaves the fleet; a static one stays
        ejected (its channel saw it lost) until it registers again after a restart."""
        if worker.id in self._sources:
            self.remove_worker(worker.id)

    def configured_models(self) -> set[str]:
        return set(self._configured)

    def served_models(self) -> set[str]:
        return set(self._configured) | self.registry.known_models()

    def is_lora(self, model: str) -> bool:
        """Whether ``model`` is a LoRA adapter: loaded through the gateway, or listed by a
        worker's ``/v1/models`` with a ``parent``."""
        return model in self.adapters.adapters or model in self.registry.lora_models

    def base_of(self, model: str) -> str:
        """The base model of a LoRA adapter (its tokenizer, template and context are the
        base's), ``model`` itself for anything else: the parent a worker lists, else the base
        it was loaded for, else the only configured model with a tokenizer."""
        parent = self.registry.lora_models.get(model)
        if parent is not None:
            return parent
        managed = self.adapters.adapters.get(model)
        if managed is None:
            return model
        if managed.base is not None:
            return managed.base
        return next(iter(self.texts)) if len(self.texts) == 1 else model

    def _segment_metrics(self) -> None:
        """The tokenizers' segment caches, read at scrape time (``lmgw_tokenizer_segment_*``)."""
        texts, m = self.texts, self.metrics

        def samples(field: str) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
            def collect() -> list[tuple[tuple[str, ...], float]]:
                out = []
                for name, text in texts.items():
                    stats = text.tokenizer.prefix_cache_statistics()
                    if stats is not None:
                        out.append(((name,), float(getattr(stats, field))))
                return out

            return collect

        m.segment_hits.collect = samples("hits")
        m.segment_misses.collect = samples("misses")
        m.segment_hit_tokens.collect = samples("hit_tokens")
        m.segment_chars.collect = samples("chars")

        def by_path(
            of: Callable[[ModelText], Any], paths: tuple[tuple[str, str], ...]
        ) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
            """Per model and path, the counter at the dotted attribute of ``of(text)``."""
            getters = [(path, attrgetter(field)) for path, field in paths]

            def collect() -> list[tuple[tuple[str, ...], float]]:
                out = []
                for name, text in texts.items():
                    fast = of(text)
                    if fast is not None:
                        out += [((name, path), float(get(fast))) for path, get in getters]
                return out

            return collect

        def shapes(text: ModelText) -> Any:
            return text.template.shapes if text.template is not None else None

        mismatch = ("mismatch", "check.mismatches")
        m.template_renders.collect = by_path(
            shapes, (("shape", "stats.shaped"), ("full", "stats.full"), mismatch)
        )
        m.word_ids.collect = by_path(
            lambda text: text.tokenizer.word_ids,
            (("words", "stats.words"), ("other", "stats.other"), mismatch),
        )

    def text_for(self, model: str) -> ModelText | None:
        """The tokenizer and chat template of ``model`` (an adapter's: its base model's)."""
        texts = self.texts
        if not texts:
            return None
        text = texts.get(model)
        if text is None and self.is_lora(model):
            text = texts.get(self.base_of(model))
        return text

    def set_model_route(self, cfg: ModelRouteConfig) -> tuple[ModelRoute, bool]:
        """Add or replace a model route at run time (the admin API, the SDK); True when it
        replaced one. ValueError when it would chain routes (:meth:`ModelRoutes.set`)."""
        route = route_from_config(cfg)
        return route, self.model_routes.set(route)

    def knows_model(self, name: str) -> bool:
        return name in self._configured or self.registry.has_model(name)

    def flow_of(self, model: str) -> str:
        return self.pipeline.flows.get(model, self.pipeline.default_flow)

    def _in_flight_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for w in self.registry:
            yield (w.role, w.id), w.in_flight

    def _worker_request_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for w in self.registry:
            yield (w.role, w.id), w.total_requests

    def _policy_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for role, policy in self.policies.items():
            for stat, value in policy.statistics().items():
                yield (role, policy.name, stat), float(value)

    def _client_connections(self) -> int | None:
        """Open client connections at the native front door (None under hypercorn, which
        does not say; 0 before serving)."""
        if self.config.server.server == "hypercorn":
            return None
        return self.server.active_connections if self.server is not None else 0

    def _on_worker_change(self, worker: Worker) -> None:
        self.metrics.healthy.set((worker.role, worker.id), 1.0 if worker.routable else 0.0)
        self.fleet_stats.on_worker_change(worker)
        if worker.state in (WorkerState.EJECTED, WorkerState.GONE):
            # requests still waiting for its answer go elsewhere now, not at the timeout
            self.pool.abort(worker.origin)

    # -- lifecycle ------------------------------------------------------------------------
    async def run(
        self,
        *,
        serve: bool = True,
        task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled or shut down. Reports the bound port through ``task_status``.

        ``serve=False`` runs the fleet side only (monitor, discovery, parity) without listening,
        for the in-process SDK (:class:`lmgw.sdk.Gateway`), which calls the handlers directly;
        the port reported is then None."""
        cfg = self.config
        with self._cancel:
            try:
                async with trio.open_nursery() as nursery:
                    if self.cache is not None:
                        await nursery.start(self.cache.run)
                    if discovery_configured(cfg.discovery):
                        # before the monitor: its first round then probes the discovered workers
                        from .workers.discovery import run_discovery

                        await nursery.start(
                            partial(
                                run_discovery, self, cfg.discovery, k8s_metrics=self.k8s_metrics
                            )
                        )
                    if self.replicas is not None:  # warm from the shared history, then serve
                        await nursery.start(self.replicas.run)
                    await nursery.start(self.native.run)
                    if self.streams is not None:
                        await nursery.start(self.streams.run)
                    await nursery.start(self.kv_events.run)
                    if self.tools is not None:  # MCP sessions; every server had one try
                        await nursery.start(self.tools.run)
                        self.tool_loop.check()
                    await nursery.start(self.monitor.run)
                    await nursery.start(self.adapters.run)
                    await nursery.start(self.mirrors.run)
                    if self.planner is not None:
                        await nursery.start(self.planner.run)
                    if self.pipeline.warmer is not None:
                        await nursery.start(self.pipeline.warmer.run)
                    if self.batches is not None:
                        await nursery.start(self.batches.run)
                    if self.dashboard is not None:
                        await nursery.start(self.dashboard.feed.run)
                    if self.parity is not None:
                        await nursery.start(self.parity.run)
                    if cfg.discovery.p2p_nccl_bind:
                        from .workers.p2p_discovery import run_p2p_discovery

                        self.p2p_endpoint = await nursery.start(
                            partial(
                                run_p2p_discovery,
                                cfg.discovery.p2p_nccl_bind,
                                self._on_p2p_change,
                                expiry_s=cfg.discovery.p2p_nccl_expiry_s,
                            )
                        )
                    if cfg.discovery.native_bind:
                        from .workers.native_discovery import run_native_discovery

                        self.native_endpoint = await nursery.start(
                            run_native_discovery, self, cfg.discovery.native_bind
                        )
                    if self.keys is not None and cfg.auth.keys_file is not None:
                        await nursery.start(self.keys.watch)
                    if serve:
                        self._warn_if_open()
                    trimmer = HeapTrimmer(
                        cfg.limits.trim_heap_after_bytes,
                        growth_bytes=cfg.limits.trim_heap_on_growth_bytes,
                        on_trim=self.metrics.heap_trimmed,
                    )
                    if not serve:
                        self._server_done.set()  # shutdown() has no server to wait for
                    elif cfg.server.server == "hypercorn":
                        self.port = await nursery.start(self._run_hypercorn, trimmer)
                    else:
                        limits = server_limits(cfg)
                        self.server = HTTPServer(
                            self.handler, limits, self.handler.on_timeout, trimmer,
                            lane=self._lane_app(limits),
                        )  # fmt: skip
                        self.port = await nursery.start(
                            self.server.serve, cfg.server.host, cfg.server.port
                        )
                        if self.server.lane is not None:
                            self.server.lane.install_metrics(self.metrics)
                    if serve:
                        log.info(
                            "lmgw listening on http://%s:%d (%d workers)",
                            cfg.server.host,
                            self.port,
                            len(self.registry),
                        )
                    task_status.started(self.port)
            finally:
                self.pool.close()
                if self.tracing is not None:
                    self.tracing.shutdown()
                if self.cache is not None:
                    with trio.CancelScope(shield=True):
                        await self.cache.aclose()

    async def _run_hypercorn(
        self,
        trimmer: HeapTrimmer | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from .http.asgi import serve_hypercorn

        try:
            await serve_hypercorn(
                self.handler, self.config, self._hypercorn_stop, trimmer, task_status=task_status
            )
        finally:
            self._server_done.set()

    def _lane_app(self, limits: ServerLimits) -> Any:
        """The compiled lane's decisions (lmgw.api.lane) when ``server.compiled_lane`` is on
        and nothing wraps the API that the lane would have to repeat: middleware (an SDK's,
        or coalescing). None otherwise (the trio path serves). API keys, CORS, tracing and
        resumable answers (it leaves the requests that ask for one to the server) it does
        itself."""
        cfg = self.config
        if not cfg.server.compiled_lane or not cfg.upstream.express_lane:
            return None
        middleware = list(self.app.middleware)
        if self.streams is not None and not cfg.streams.coalesce:
            # resumable answers only: the middleware passes on what does not ask for one
            middleware = [m for m in middleware if m != self.streams.middleware]
        skipped = [what for what, on in (("middleware", bool(middleware)),) if on]
        if skipped:
            log.info("server.compiled_lane: off with %s (the trio path serves)", ", ".join(skipped))
            return None
        from .api.lane import LaneApp

        return LaneApp(
            self.app, limits.max_header_bytes, limits.max_body_bytes, limits.request_timeout_s
        )

    def _warn_if_open(self) -> None:
        cfg = self.config
        if self.keys is not None:
            log.info("API keys: %d configured", len(self.keys))
        elif cfg.auth.open:
            log.warning(
                "auth.open: the API on %s:%s is open to anyone who can reach it (no API keys)",
                cfg.server.host,
                cfg.server.port,
            )
        else:
            log.warning(
                "no API keys configured: the API is open to every local client of %s; set"
                " auth.keys_file or LMGW_API_KEYS (or auth.open = true to say it is meant)",
                cfg.server.host,
            )

    async def shutdown(self) -> None:
        """Graceful stop: refuse new connections, finish requests in flight, then cancel."""
        grace = self.config.server.graceful_shutdown_s
        with trio.move_on_after(grace):
            if self.server is not None:
                await self.server.drain()
                await self.server.wait_idle()
            else:  # hypercorn drains itself, bounded by the same grace period
                self._hypercorn_stop.set()
                await self._server_done.wait()
        self._cancel.cancel()

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.port}"
