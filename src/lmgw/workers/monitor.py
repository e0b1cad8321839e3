"""Active health probes and model discovery.

Each interval every worker gets ``GET /health`` (and ``GET /v1/models`` to learn what it serves,
unless config fixed its models). Thresholds turn probe streaks into state changes; an ejected
worker (refused connections on the request path) is re-probed on the same schedule. The probes
go through the same connection pool as requests, with their own short timeout.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable

import msgspec
import trio

from ..config import HealthConfig, is_native_url
from ..errors import DECODE_ERRORS
from ..transport.pool import ConnectionPool, UpstreamError
from .registry import Registry
from .stuck import ProgressWatch
from .worker import EngineLoad, Worker, WorkerState

log = logging.getLogger("lmgw.workers")


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]


class _ModelEntry(msgspec.Struct):
    id: str
    parent: str | None = None  # vLLM: a LoRA adapter's base model


_decode_models = msgspec.json.Decoder(_ModelList).decode


#: the vLLM and SGLang (``--enable-metrics``) gauges and counters the gateway reads, and where
#: they go
_ENGINE_METRICS = {
    b"vllm:num_requests_running": "running",
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:kv_cache_usage_perc": "kv_usage",
    b"vllm:gpu_cache_usage_perc": "kv_usage",  # the name before vLLM 0.10
    b"vllm:prefix_cache_hits_total": "prefix_hits",
    b"vllm:prefix_cache_queries_total": "prefix_queries",
    b"vllm:prompt_tokens_total": "tokens",  # (summed with the next: tokens processed)
    b"vllm:generation_tokens_total": "tokens",
    b"sglang:num_running_reqs": "running",
    b"sglang:num_queue_reqs": "waiting",
    b"sglang:token_usage": "kv_usage",  # (the KV pool's used share, 0..1)
    b"sglang:prompt_tokens_total": "tokens",
    b"sglang:generation_tokens_total": "tokens",
}


_LORA_INFO = b"vllm:lora_requests_info{"
_ENGINE = re.compile(rb'engine="(\d+)"')
_LABEL = re.compile(rb'(\w+)="([^"]*)"')


def apply_engine_metrics(load: EngineLoad, text: bytes, rank: int | None = None) -> None:
    """Sum each known vLLM or SGLang metric over its label sets (data-parallel ranks, models) into
    ``load``; other lines are skipped without parsing them. ``rank``: a data-parallel rank's
    own (vLLM labels each engine's samples ``engine="<rank>"``); only its samples count.
    ``vllm:lora_requests_info`` (a gauge whose value is the time it was set, one label set per
    state seen) gives the running adapters and ``max_lora`` of its latest sample."""
    sums: dict[str, float] = {}
    lora: tuple[float, bytes] | None = None
    mine = None if rank is None else b'engine="%d"' % rank
    for line in text.split(b"\n"):
        if not line.startswith((b"vllm:", b"sglang:")):
            continue
        if line.startswith(_LORA_INFO):  # (vLLM gives it no engine label)
            try:
                at = float(line.rsplit(b" ", 1)[1])
            except (ValueError, IndexError):
                continue
            if lora is None or at > lora[0]:
                lora = (at, line)
            continue
        if mine is not None and mine not in line:
            continue
        name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i > 0), default=-1)
        field = _ENGINE_METRICS.get(line[:name_end]) if name_end > 0 else None
        if field is None:
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (ValueError, IndexError):
            continue
        if not 0.0 <= value < math.inf:  # NaN, infinities and negatives would skew routing
            continue
        sums[field] = sums.get(field, 0.0) + value
    for field, value in sums.items():
        setattr(load, field, value)
    if lora is not None:
        labels = {k.decode(): v.decode("utf-8", "replace") for k, v in _LABEL.findall(lora[1])}
        running = labels.get("running_lora_adapters", "")
        load.lora_running = frozenset(a for a in running.split(",") if a)
        try:
            load.lora_max = int(labels.get("max_lora", "0"))
        except ValueError:
            load.lora_max = 0


class HealthMonitor:
    def __init__(
        self, registry: Registry, pool: ConnectionPool, cfg: HealthConfig, auth: bytes | None = None
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.cfg = cfg
        self._headers = [(b"authorization", auth)] if auth else []
        self._ok_streak: dict[str, int] = {}
        self._fail_streak: dict[str, int] = {}
        self._wake = trio.Event()
        self._probing: set[str] = set()  # worker ids with a probe in progress
        self._dp_hinted: set[str] = set()  # workers told they have data-parallel ranks
        #: told the engines each probe counts in a worker's /metrics; True: the worker's ranks
        #: are sized by the gateway (data_parallel_size = "auto"), so no hint is due
        self.on_engines: Callable[[Worker, int], bool] | None = None
        #: workers with requests in flight and no token processed (health.stuck_timeout_s)
        self.progress = ProgressWatch(cfg.stuck_timeout_s)
        #: (role, worker id) -> times it was found stuck (lmgw_worker_stuck_total)
        self.stuck: dict[tuple[str, str], int] = {}
        #: a dialect names the prefill workers' bootstrap ports (SGLang): ask a prefill worker
        #: configured without one (_discover_bootstrap), once
        self.asks_bootstrap = False
        self._bootstrap_asked: set[str] = set()

    async def probe(self, worker: Worker) -> bool:
        """One probe of ``worker``; updates its state and models. Returns health. Native
        (zmq+) workers are not probed: their channel's heartbeat is their liveness."""
        if is_native_url(worker.url):
            return worker.routable
        self._probing.add(worker.id)
        try:
            return await self._probe(worker)
        finally:
            self._probing.discard(worker.id)

    async def _probe(self, worker: Worker) -> bool:
        ok, reason = False, ""
        try:
            with trio.fail_after(self.cfg.timeout_s):
                resp = await self.pool.request(worker.origin, "GET", self.cfg.path, self._headers)
                try:
                    await resp.read_all(1 << 20)
                finally:
                    resp.release()
                ok = 200 <= resp.status < 300
                reason = "" if ok else f"health probe returned {resp.status}"
                if ok and worker.static_models is None:
                    await self._discover_models(worker)
                if ok and self.asks_bootstrap and worker.role == "p":
                    await self._discover_bootstrap(worker)
                if ok and self.cfg.scrape_metrics:
                    reason = await self._scrape(worker)
                    ok = not reason
        except trio.TooSlowError:
            reason = f"health probe timed out after {self.cfg.timeout_s:g} s"
        except UpstreamError as exc:
            if exc.local:  # the gateway could not even try: says nothing of the worker
                log.warning("worker %s: not probed: %s", worker.id, exc.message)
                return worker.routable
            reason = exc.message
        self._apply(worker, ok, reason)
        return ok

    async def _get(self, worker: Worker, path: str, limit: int) -> tuple[int, bytes] | None:
        """``GET path`` on ``worker``: its status and body (at most ``limit`` bytes); None
        when the exchange failed."""
        try:
            resp = await self.pool.request(worker.origin, "GET", path, self._headers)
            try:
                body = await resp.read_all(limit)
            finally:
                resp.release()
        except UpstreamError:
            return None
        return resp.status, body

    async def _discover_models(self, worker: Worker) -> None:
        got = await self._get(worker, "/v1/models", 4 << 20)
        if got is None or got[0] != 200:
            return
        body = got[1]
        try:
            entries = _decode_models(body).data
            models = frozenset(m.id for m in entries)
        except DECODE_ERRORS:
            log.warning(
                "worker %s: /v1/models answered something that is not a model list", worker.id
            )
            return
        self.registry.note_lora((m.id, m.parent) for m in entries if m.parent is not None)
        self.registry.set_models(worker, models)

    async def _discover_bootstrap(self, worker: Worker) -> None:
        """An SGLang prefill worker's bootstrap port, when its configuration names none: from
        its ``/get_server_info`` (``disaggregation_bootstrap_port``, with
        ``disaggregation_mode`` "prefill"). Without it the legs carry ``bootstrap_port: null``,
        and a prefill server started on another port than SGLang's default (8998) never gets
        its decode workers' connections. Asked once per worker that answers."""
        if worker.bootstrap_port is not None or worker.id in self._bootstrap_asked:
            return
        got = await self._get(worker, "/get_server_info", 1 << 20)
        if got is None:
            return  # asked again at the next probe
        self._bootstrap_asked.add(worker.id)
        try:
            info = msgspec.json.decode(got[1]) if got[0] == 200 else None
        except DECODE_ERRORS:
            info = None
        if not isinstance(info, dict):
            info = {}
        port = info.get("disaggregation_bootstrap_port")
        prefill = info.get("disaggregation_mode") == "prefill"
        if type(port) is not int or not 0 < port < 65536 or not prefill:
            log.warning(
                "worker %s: no bootstrap port configured (bootstrap_port=...) and none in its"
                " /get_server_info: its legs carry bootstrap_port null (SGLang's default)",
                worker.id,
            )
            return
        worker.bootstrap_port = port
        log.info("worker %s: SGLang bootstrap port %d (its /get_server_info)", worker.id, port)

    async def _scrape(self, worker: Worker) -> str:
        """The worker's own load from its Prometheus ``/metrics`` (vLLM's names); a worker
        without them (or unreadable ones) keeps its last values. Returns why the worker
        cannot serve, else "": a data-parallel rank the server's engines do not include
        (``dp=8`` in front of a 4-rank server would send its requests to ranks vLLM refuses)."""
        got = await self._get(worker, "/metrics", 8 << 20)
        if got is None or got[0] != 200:
            return ""
        body = got[1]
        rank = worker.dp_rank
        if b'engine="1"' in body:  # data-parallel: count the ranks (only such servers pay)
            n = len(set(_ENGINE.findall(body)))
        else:
            n = 1 if b'engine="0"' in body else 0
        worker.engine.engines = n
        sized = self.on_engines is not None and self.on_engines(worker, n)
        if rank is not None and b'engine="' in body and b'engine="%d"' % rank not in body:
            return f'the server has no data-parallel rank {rank} (no engine="{rank}" in /metrics)'
        if n > 1 and rank is None and not sized and worker.id not in self._dp_hinted:
            self._dp_hinted.add(worker.id)
            log.warning(
                "worker %s serves %d data-parallel ranks (its /metrics names %d engines),"
                " which vLLM fills blind to their caches; route to each rank with"
                " data_parallel_size = %d or \"auto\" (--worker ROLE=URL,dp=auto)",
                worker.id, n, n, n,
            )  # fmt: skip
        try:
            apply_engine_metrics(worker.engine, body, rank)
        except Exception:  # a worker's text must never end the monitor (and the gateway)
            log.exception("worker %s: its /metrics could not be read", worker.id)
        self._watch_progress(worker)
        return ""

    def _watch_progress(self, worker: Worker) -> None:
        """Eject ``worker`` when it had requests in flight and its engine processed no token
        for ``health.stuck_timeout_s`` (a hung engine whose /health still passes): its waiting
        requests go elsewhere at once (the gateway aborts them on the ejection), streams
        migrate, and it comes back through the usual ejection backoff and probe."""
        # a worker that is not routable is watched as an idle one: its counters are seen to
        # move (or not), and its clock starts when it is back
        in_flight = worker.in_flight if worker.state is WorkerState.HEALTHY else 0
        stalled = self.progress.observe(
            worker.id, time.monotonic(), in_flight, worker.engine.tokens
        )
        if stalled:
            reason = (
                f"stuck: {in_flight} requests in flight and no token processed for {stalled:.0f} s"
            )
            log.warning("worker %s: %s", worker.id, reason)
            key = (worker.role, worker.id)
            self.stuck[key] = self.stuck.get(key, 0) + 1
            worker.stuck = True  # (before the ejection rebuilds the panic sets)
            self.registry.record_failure(worker, reason, eject=True)

    def _apply(self, worker: Worker, ok: bool, reason: str) -> None:
        wid = worker.id
        self.registry.probed(worker, ok)
        if ok:
            self._fail_streak[wid] = 0
            streak = self._ok_streak[wid] = self._ok_streak.get(wid, 0) + 1
            self.registry.record_success(worker)
            if worker.state is WorkerState.EJECTED and time.monotonic() < worker.ejected_until:
                return  # passively ejected: out until its backoff ends, whatever probes say
            if worker.state in (WorkerState.STARTING, WorkerState.EJECTED) and (
                streak >= self.cfg.success_threshold or worker.state is WorkerState.STARTING
            ):
                worker.consecutive_failures = 0
                self.registry.set_state(worker, WorkerState.HEALTHY)
        else:
            self._ok_streak[wid] = 0
            streak = self._fail_streak[wid] = self._fail_streak.get(wid, 0) + 1
            worker.last_error = reason
            if worker.state is WorkerState.STARTING or (
                worker.state is WorkerState.HEALTHY and streak >= self.cfg.failure_threshold
            ):
                self.registry.set_state(worker, WorkerState.EJECTED, reason)

    async def probe_all(self, only_new: bool = False) -> None:
        """Probe every worker (``only_new``: those not probed yet) concurrently."""
        async with trio.open_nursery() as nursery:
            for worker in self.registry:
                if worker.state is WorkerState.GONE or is_native_url(worker.url):
                    continue
                if only_new and worker.state is not WorkerState.STARTING:
                    continue
                nursery.start_soon(self.probe, worker)

    def _on_change(self, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING and worker.id not in self._probing:
            self._wake.set()  # added (or re-announced) at run time: probe it now
        elif worker.state is WorkerState.GONE:  # removed: nothing of it is kept here
            wid = worker.id
            self._ok_streak.pop(wid, None)
            self._fail_streak.pop(wid, None)
            self._dp_hinted.discard(wid)
            self.progress.reset(wid)
            self.stuck.pop((worker.role, wid), None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe everything once (so the gateway starts with a known fleet), then periodically;
        a worker added at run time is probed at once instead of at the next period."""
        self._wake = trio.Event()
        self.registry.subscribe(self._on_change)
        await self.probe_all()
        task_status.started()
        next_round = trio.current_time() + self.cfg.interval_s
        while True:
            with trio.move_on_at(next_round):
                await self._wake.wait()
            self._wake = trio.Event()
            if trio.current_time() < next_round:
                await self.probe_all(only_new=True)
                continue
            self.pool.sweep()
            await self.probe_all()
            next_round = trio.current_time() + self.cfg.interval_s
