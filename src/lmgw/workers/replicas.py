"""Gateway replicas in front of one fleet, sharing what each learns through Redis.

N gateways behind a load balancer see the same workers (Redis discovery, or the same static
list) but each learns on its own: which prompts it sent where (``cache_aware``'s dispatch-time
predictions) and which workers failed. Without sharing, a conversation whose turns land on
different replicas loses its cache affinity, and a dead worker is found out N times. So each
replica publishes, and applies what the others publish:

* **routing hints**: ``cache_aware``'s dispatch predictions (role, worker, the prompt's chained
  block hashes; the hashes are deterministic, so every replica's index gets the same entries).
  Workers whose engines send KV events need none: every replica subscribes to the same events;
* **health verdicts**: a worker ejected (with the time it stays out) or back to healthy;
* **stored responses**: which worker holds a Responses API response (its id, worker, model,
  owner key and the time left), so a follow-up reaches it through any replica.

Transport: one Redis stream, ``{prefix}:replicas:events`` (``XADD ... MAXLEN ~ history``), so a
replica that starts or restarts replays the recent history before it serves (warm), then reads
new entries with ``XREAD BLOCK``. Publishing never waits on the request path: a dispatch appends
to a bounded queue (oldest dropped, counted) that a task flushes in pipelined batches. Events a
replica applies are not published again. Everything is best effort: Redis down means each
replica routes on what it knows (logged once, retried with backoff), never failed requests.
"""

from __future__ import annotations

import logging
import secrets
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .discovery.resp import RedisConnection, RedisError, parse_redis_url
from .discovery.sink import backoff_delay
from .registry import Registry
from .worker import Worker, WorkerState

if TYPE_CHECKING:
    from ..config import ReplicasConfig
    from ..metrics import Metrics
    from ..routing.policy import Policy
    from ..routing.responses import ResponseAffinity, Stored

__all__ = ["ReplicaSync", "register_metrics", "stream_key"]

log = logging.getLogger("lmgw.replicas")

QUEUE_MAX = 10_000
"""Events waiting to be published; beyond it the oldest are dropped (and counted)."""
BATCH_MAX = 500
BLOCK_MS = 1000
BACKOFF_CAP_S = 10.0

_enc = msgspec.msgpack.Encoder()


def stream_key(prefix: str) -> str:
    return f"{prefix}:replicas:events"


class ReplicaSync:
    """Publishes this replica's hints and verdicts and applies the others' (see the module).

    ``run`` (in the gateway's nursery) replays the stream's history before reporting started,
    so a gateway serves warm."""

    def __init__(
        self,
        cfg: ReplicasConfig,
        registry: Registry,
        policies: Mapping[str, Policy],
    ) -> None:
        assert cfg.redis_url is not None
        self.cfg = cfg
        self.id = cfg.id or secrets.token_hex(6)
        self.address = parse_redis_url(cfg.redis_url)
        self.key = stream_key(cfg.prefix)
        self.registry = registry
        self.policies = policies
        self._out: deque[tuple[str, bytes]] = deque()
        self._wake: trio.Event | None = None
        self._applying = False
        self.counts: dict[tuple[str, str], int] = {}
        self.up = False
        self.affinity: ResponseAffinity | None = None
        if cfg.hints:
            for role, policy in policies.items():
                if hasattr(policy, "hint_sink"):
                    policy.hint_sink = partial(self._hint, role)  # type: ignore[attr-defined]
        if cfg.health:
            registry.subscribe(self._on_change)

    def share_responses(self, affinity: ResponseAffinity) -> None:
        """Publish the Responses API ids this replica records, and record the others'."""
        self.affinity = affinity
        affinity.listener = self._response

    def _count_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        return [(k, float(v)) for k, v in sorted(self.counts.items())]

    def _count(self, direction: str, kind: str, n: int = 1) -> None:
        key = (direction, kind)
        self.counts[key] = self.counts.get(key, 0) + n

    # -- what this replica learns (sync: called on the request path and by the registry) ----
    def _push(self, kind: str, entry: list[Any]) -> None:
        if len(self._out) >= QUEUE_MAX:
            self._out.popleft()
            self._count("dropped", kind)
        self._out.append((kind, _enc.encode(entry)))
        if self._wake is not None:
            self._wake.set()

    def _hint(self, role: str, worker_id: str, hashes: Any) -> None:
        if not self._applying:
            self._push("hint", [self.id, "hint", role, worker_id, bytes(memoryview(hashes))])

    def _response(self, response_id: str, stored: Stored) -> None:
        assert self.affinity is not None
        left = self.affinity.remaining_s(stored)
        self._push("response", [self.id, "response", response_id, stored.worker_id,
                                stored.model, stored.owner, time.time(), left])  # fmt: skip

    def _on_change(self, worker: Worker) -> None:
        if self._applying:
            return
        if worker.state is WorkerState.EJECTED:
            remaining = max(0.0, worker.ejected_until - time.monotonic())
            entry = [self.id, "verdict", worker.id, "ejected", time.time(), remaining,
                     worker.last_error or ""]  # fmt: skip
        elif worker.state is WorkerState.HEALTHY:
            entry = [self.id, "verdict", worker.id, "healthy", time.time(), 0.0, ""]
        else:
            return
        self._push("verdict", entry)

    # -- what the others learned ------------------------------------------------------------
    def apply(self, payload: bytes) -> bool:
        """Apply one stream entry (another replica's); False when it is not for us to apply."""
        try:
            entry = msgspec.msgpack.decode(payload)
            origin, kind = entry[0], entry[1]
        except (msgspec.DecodeError, IndexError, TypeError, RecursionError):
            return False
        if origin == self.id:
            return False
        self._applying = True
        try:
            if kind == "hint":
                return self._apply_hint(entry)
            if kind == "verdict":
                return self._apply_verdict(entry)
            if kind == "response":
                return self._apply_response(entry)
        except (ValueError, TypeError, IndexError):
            return False
        finally:
            self._applying = False
        return False

    def _apply_hint(self, entry: list[Any]) -> bool:
        _origin, _kind, role, worker_id, raw = entry
        policy = self.policies.get(role)
        worker = self.registry.get(worker_id)
        if policy is None or worker is None or not hasattr(policy, "import_hint"):
            return False
        policy.import_hint(worker, array("q", raw))  # type: ignore[attr-defined]
        self._count("applied", "hint")
        return True

    def _apply_response(self, entry: list[Any]) -> bool:
        _origin, _kind, response_id, worker_id, model, owner, at, remaining = entry
        left = remaining - max(0.0, time.time() - at)
        if self.affinity is None or left <= 0:
            return False
        self.affinity.record(response_id, worker_id, model, owner, left, share=False)
        self._count("applied", "response")
        return True

    def _apply_verdict(self, entry: list[Any]) -> bool:
        _origin, _kind, worker_id, state, at, remaining, reason = entry
        worker = self.registry.get(worker_id)
        if worker is None:
            return False
        left = remaining - max(0.0, time.time() - at)
        if state == "ejected" and left > 0 and worker.state is WorkerState.HEALTHY:
            worker.ejected_at = time.monotonic()
            worker.ejected_until = worker.ejected_at + left
            self.registry.set_state(worker, WorkerState.EJECTED, f"a replica saw: {reason}")
        elif state == "healthy" and worker.state is WorkerState.EJECTED:
            self.registry.set_state(worker, WorkerState.HEALTHY, "a replica saw it recover")
        else:
            return False
        self._count("applied", "verdict")
        return True

    # -- tasks ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._wake = trio.Event()
        last_id = await self._warm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish)
            nursery.start_soon(self._subscribe, last_id)
            task_status.started()

    async def _warm(self) -> str:
        """Replay the recent history (oldest first); returns the id to read on from."""
        try:
            with trio.fail_after(self.cfg.timeout_s * 5):
                conn = await RedisConnection.open(self.address, self.cfg.timeout_s * 5)
                try:
                    entries = await conn.command(
                        "XREVRANGE", self.key, "+", "-", "COUNT", self.cfg.history
                    )
                finally:
                    await conn.aclose()
        except (RedisError, trio.TooSlowError) as exc:
            log.warning("replicas: cannot read the shared history at %s (%s)", self.address, exc)
            return "$"
        applied = 0
        for _entry_id, fields in reversed(entries or []):
            if isinstance(fields, list) and len(fields) >= 2:
                applied += self.apply(fields[1])
        self.up = True
        last = entries[0][0].decode() if entries else "0"
        log.info("replicas: %s warmed from %d shared events (%d applied)", self.id,
                 len(entries or []), applied)  # fmt: skip
        return last

    async def _subscribe(self, last_id: str) -> None:
        failures = 0
        conn: RedisConnection | None = None
        while True:
            try:
                if conn is None or conn.closed:
                    conn = await RedisConnection.open(
                        self.address, self.cfg.timeout_s + BLOCK_MS / 1000
                    )
                    if last_id == "$":  # history unreadable at start: from now on
                        info = await conn.command("XREVRANGE", self.key, "+", "-", "COUNT", 1)
                        last_id = info[0][0].decode() if info else "0"
                reply = await conn.command(
                    "XREAD", "COUNT", BATCH_MAX, "BLOCK", BLOCK_MS, "STREAMS", self.key, last_id
                )
                if failures:
                    log.warning("replicas: the shared stream at %s is back", self.address)
                failures = 0
                self.up = True
            except RedisError as exc:
                if conn is not None:
                    await conn.aclose()
                conn = None
                failures += 1
                if failures == 1:
                    self.up = False
                    log.warning("replicas: lost the shared stream at %s (%s); retrying",
                                self.address, exc)  # fmt: skip
                await trio.sleep(backoff_delay(failures, 0.1, BACKOFF_CAP_S))
                continue
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    if isinstance(fields, list) and len(fields) >= 2:
                        self.apply(fields[1])
            await trio.lowlevel.checkpoint()

    async def _publish(self) -> None:
        failures = 0
        conn: RedisConnection | None = None
        out = self._out
        while True:
            if not out:
                assert self._wake is not None
                await self._wake.wait()
                self._wake = trio.Event()
                await trio.sleep(self.cfg.flush_interval_s)  # gather a batch
            batch = [out.popleft() for _ in range(min(len(out), BATCH_MAX))]
            commands = [
                ("XADD", self.key, "MAXLEN", "~", self.cfg.history, "*", "e", payload)
                for _kind, payload in batch
            ]
            try:
                if conn is None or conn.closed:
                    conn = await RedisConnection.open(self.address, self.cfg.timeout_s)
                await conn.pipeline(commands)
                failures = 0
            except RedisError as exc:
                if conn is not None:
                    await conn.aclose()
                conn = None
                failures += 1
                out.extendleft(reversed(batch))  # kept (bounded) for the next try
                while len(out) > QUEUE_MAX:
                    self._count("dropped", out.pop()[0])
                if failures == 1:
                    log.warning("replicas: cannot publish to %s (%s); retrying",
                                self.address, exc)  # fmt: skip
                await trio.sleep(backoff_delay(failures, 0.1, BACKOFF_CAP_S))
                continue
            for kind, _payload in batch:
                self._count("published", kind)


def register_metrics(metrics: Metrics, sync: Callable[[], ReplicaSync | None]) -> None:
    """The replica metrics, exported by every gateway (empty without ``[replicas]``)."""
    from ..metrics import Counter, Gauge

    def events() -> Iterable[tuple[tuple[str, ...], float]]:
        s = sync()
        return () if s is None else s._count_samples()

    def up() -> Iterable[tuple[tuple[str, ...], float]]:
        s = sync()
        return () if s is None else [((), 1.0 if s.up else 0.0)]

    metrics.add(
        Counter(
            "lmgw_replica_events_total",
            "Events shared with the other gateway replicas through Redis: published, applied"
            " (from another replica) or dropped (queue full), by kind (hint, verdict, response).",
            ("direction", "kind"),
            collect=events,
        )
    )
    metrics.add(
        Gauge(
            "lmgw_replica_sync_up",
            "1 while this replica reads the shared event stream from Redis.",
            collect=up,
        )
    )
