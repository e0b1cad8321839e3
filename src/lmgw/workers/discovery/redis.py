"""Workers registered in Redis with a TTL.

Each worker (or an operator on its behalf) keeps one key alive::

    {prefix}:workers:{id}  ->  {"url": "http://10.0.0.5:8000", "role": "prefill", "models": [...]}

with an expiry (``SET ... PX``), refreshed well before it runs out (:func:`register` does that
every ttl/3). The value holds :class:`~lmgw.config.WorkerConfig` fields and is validated like a
``[[workers]]`` entry; ``id`` defaults to the key's suffix and, if given, must equal it. Every
``interval_s`` the gateway reads all entries (``SCAN MATCH {prefix}:workers:*``, then ``MGET``)
and syncs source ``redis``: a new key adds a worker, an expired or deleted one drains it (it is
removed once idle). Gateway replicas polling the same Redis see the same fleet.

Failure rules: a bad entry is skipped and logged once (the others still count). When Redis is
unreachable the last known fleet stays as it is; the failure is logged once, retried with
jittered exponential backoff, and the recovery is logged. After a reconnection, workers missing
from Redis are kept for ``reconnect_grace_s`` before they drain, so that a Redis restart that
lost its data does not empty the fleet before the workers' next refresh writes them back. If
Redis is down when the gateway starts, it starts without these workers and keeps trying.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from ...config import ConfigError, WorkerConfig, config_from_mapping, parse_worker_flag
from .resp import RedisAddress, RedisConnection, RedisError, parse_redis_url
from .sink import FleetSink, SourceSync, backoff_delay

__all__ = [
    "RedisDiscovery",
    "entry_key",
    "entry_value",
    "hold_missing",
    "key_pattern",
    "main",
    "parse_entries",
    "register",
    "run_redis_discovery",
]

log = logging.getLogger("lmgw.workers.discovery")

SOURCE = "redis"
SCAN_COUNT = 1000
MGET_BATCH = 1000
BACKOFF_CAP_S = 30.0
"""Longest wait between reconnection attempts."""
MAX_ENTRIES = 100_000
"""A fleet is at most thousands of workers; more keys than this under the prefix is a mistake."""


def key_pattern(prefix: str) -> str:
    """The SCAN pattern of every entry under ``prefix`` (glob characters in it escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return f"{escaped}:workers:*"


def entry_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:workers:{worker_id}"


def entry_value(worker: WorkerConfig) -> bytes:
    """The JSON a worker's key holds: its WorkerConfig fields that are set."""
    fields = msgspec.structs.asdict(worker)
    if fields["data_parallel_size"] == 1:  # one engine: the default, left out
        del fields["data_parallel_size"]
    return msgspec.json.encode({k: v for k, v in fields.items() if v is not None and v != []})


def parse_entries(
    prefix: str, items: Sequence[tuple[bytes, bytes | None]]
) -> tuple[list[WorkerConfig], dict[bytes, str]]:
    """The workers in ``(key, value)`` pairs (value None: expired between SCAN and MGET), and
    the reason each bad entry was skipped, by key. Sorted by worker id, so that replicas (and
    successive polls) build the same list."""
    head = f"{prefix}:workers:".encode()
    workers: dict[str, WorkerConfig] = {}
    bad: dict[bytes, str] = {}
    for key, value in items:
        if value is None or not key.startswith(head):
            continue
        try:
            wid = key[len(head) :].decode("utf-8")
            if not wid.strip():
                raise ConfigError("empty worker id in the key")
            try:
                doc = msgspec.json.decode(value)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
                raise ConfigError(f"not JSON: {e}") from None
            if not isinstance(doc, dict):
                raise ConfigError('expected a JSON object like {"url": ..., "role": ...}')
            if doc.get("id") is None:
                doc["id"] = wid
            elif doc["id"] != wid:
                raise ConfigError(f"`id` {doc['id']!r} differs from the key's id {wid!r}")
            try:
                (worker,) = config_from_mapping({"workers": [doc]}).workers
            except ConfigError as e:  # drop the "workers[0]." of the wrapper table
                path = (e.path or "").removeprefix("workers[0]").lstrip(".")
                raise ConfigError(e.reason, path=path or None) from None
        except (ConfigError, UnicodeDecodeError) as e:
            where = f"`{e.path}`: " if isinstance(e, ConfigError) and e.path else ""
            reason = e.reason if isinstance(e, ConfigError) else "key is not UTF-8"
            bad[key] = where + reason
            continue
        workers[worker.worker_id] = worker
    return [workers[wid] for wid in sorted(workers)], bad


def hold_missing(
    previous: Sequence[WorkerConfig] | None, seen: list[WorkerConfig]
) -> list[WorkerConfig]:
    """``seen`` plus the previous workers it lacks (kept during the reconnection grace)."""
    ids = {w.worker_id for w in seen}
    kept = [w for w in previous or () if w.worker_id not in ids]
    return sorted([*seen, *kept], key=lambda w: w.worker_id) if kept else seen


async def read_entries(conn: RedisConnection, prefix: str) -> list[tuple[bytes, bytes | None]]:
    """Every ``(key, value)`` under the prefix: SCAN to the end, then MGET in batches."""
    pattern = key_pattern(prefix)
    keys: dict[bytes, None] = {}  # SCAN may return a key twice
    cursor: bytes = b"0"
    while True:
        reply = await conn.command("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)):
            raise RedisError(f"unexpected SCAN reply {reply!r:.80}")
        cursor = reply[0]
        keys.update(dict.fromkeys(reply[1]))
        if len(keys) > MAX_ENTRIES:
            raise RedisError(f"more than {MAX_ENTRIES} keys match {pattern!r}")
        if cursor == b"0":
            break
    ordered = list(keys)
    items: list[tuple[bytes, bytes | None]] = []
    for i in range(0, len(ordered), MGET_BATCH):
        batch = ordered[i : i + MGET_BATCH]
        values = await conn.command("MGET", *batch)
        if not isinstance(values, list) or len(values) != len(batch):
            raise RedisError("unexpected MGET reply")
        items.extend(zip(batch, values, strict=True))
    return items


class RedisDiscovery:
    """Polls Redis and keeps source ``redis`` in sync; see the module docstring for the rules.

    ``failures`` (consecutive failed polls) and ``polls`` (successful ones) are for tests and
    status pages.
    """

    def __init__(
        self,
        sink: FleetSink,
        address: RedisAddress,
        *,
        prefix: str = "lmgw",
        interval_s: float = 2.0,
        timeout_s: float = 2.0,
        reconnect_grace_s: float = 10.0,
    ) -> None:
        self.address = address
        self.prefix = prefix
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reconnect_grace_s = reconnect_grace_s
        self.sync = SourceSync(sink, SOURCE)
        self.failures = 0
        self.polls = 0
        self._bad: dict[bytes, str] = {}
        self._hold_until = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled; started after the first attempt, successful or not."""
        conn: RedisConnection | None = None
        started = False
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await RedisConnection.open(self.address, self.timeout_s)
                        if self.failures:
                            self._hold_until = trio.current_time() + self.reconnect_grace_s
                    items = await read_entries(conn, self.prefix)
                except RedisError as e:
                    if conn is not None:
                        await conn.aclose()
                    self._failed(e)
                    delay = backoff_delay(
                        self.failures, self.interval_s, max(self.interval_s, BACKOFF_CAP_S)
                    )
                else:
                    self._apply(items)
                    delay = self.interval_s
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(delay)
        finally:
            if conn is not None:
                await conn.aclose()

    def _failed(self, exc: RedisError) -> None:
        self.failures += 1
        if self.failures == 1:
            kept = len(self.sync.workers or ())
            log.warning(
                "discovery redis %s unavailable (%s); keeping the %d worker(s) known, retrying",
                self.address,
                exc,
                kept,
            )
        else:
            log.debug("discovery redis %s still unavailable: %s", self.address, exc)

    def _apply(self, items: list[tuple[bytes, bytes | None]]) -> None:
        if self.failures:
            log.info(
                "discovery redis %s reachable again after %d failed attempt(s)",
                self.address,
                self.failures,
            )
        self.failures = 0
        self.polls += 1
        workers, bad = parse_entries(self.prefix, items)
        for key, why in bad.items():
            if self._bad.get(key) != why:
                log.error(
                    "discovery redis: entry `%s` skipped: %s", key.decode("utf-8", "replace"), why
                )
        self._bad = bad
        if trio.current_time() < self._hold_until:
            workers = hold_missing(self.sync.workers, workers)
        self.sync.update(workers)


async def run_redis_discovery(
    sink: FleetSink,
    url: str,
    *,
    prefix: str = "lmgw",
    interval_s: float = 2.0,
    timeout_s: float = 2.0,
    reconnect_grace_s: float = 10.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The function form of :class:`RedisDiscovery` (``url`` is ``redis://...``)."""
    discovery = RedisDiscovery(
        sink,
        parse_redis_url(url),
        prefix=prefix,
        interval_s=interval_s,
        timeout_s=timeout_s,
        reconnect_grace_s=reconnect_grace_s,
    )
    await discovery.run(task_status=task_status)


async def register(
    url: str,
    worker: WorkerConfig,
    *,
    prefix: str = "lmgw",
    ttl_s: float = 10.0,
    timeout_s: float = 2.0,
    deregister: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``worker``'s entry alive in Redis until cancelled (for workers, operators, tests).

    The key is written with a ``ttl_s`` expiry every ``ttl_s / 3``, so two refreshes may fail
    before it lapses; a failure reconnects with jittered backoff (logged once per outage), and
    the entry is written back as soon as Redis answers again, also after a restart that lost it.
    Started after the first write. On exit the key is deleted (``deregister``), so gateways
    drain the worker at their next poll instead of after the TTL.
    """
    if not ttl_s > 0.003:
        raise ValueError("ttl_s must be more than a few milliseconds")
    address = parse_redis_url(url)
    key = entry_key(prefix, worker.worker_id)
    value = entry_value(worker)
    ttl_ms = max(1, round(ttl_s * 1000))
    refresh_s = ttl_s / 3
    conn: RedisConnection | None = None
    failures = 0
    started = False
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = await RedisConnection.open(address, timeout_s)
                await conn.command("SET", key, value, "PX", ttl_ms)
            except RedisError as e:
                if conn is not None:
                    await conn.aclose()
                failures += 1
                if failures == 1:
                    log.warning("register %s in %s failed (%s); retrying", key, address, e)
                await trio.sleep(backoff_delay(failures, refresh_s, max(refresh_s, BACKOFF_CAP_S)))
                continue
            if failures:
                log.info("register %s in %s: written again", key, address)
            failures = 0
            if not started:
                started = True
                task_status.started()
            await trio.sleep(refresh_s)
    finally:
        if conn is not None:
            if deregister and not conn.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
                    try:
                        await conn.command("DEL", key)
                    except RedisError:
                        pass  # it expires on its own
            with trio.CancelScope(shield=True):
                await conn.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmgw.workers.discovery.redis --redis-url URL ROLE=URL[,K=V...]``: keep one
    worker registered until interrupted (for workers without their own registration)."""
    parser = argparse.ArgumentParser(
        prog="python -m lmgw.workers.discovery.redis",
        description="Keep a worker registered in Redis for lmgw's Redis discovery.",
    )
    parser.add_argument("worker", metavar="ROLE=URL[,K=V...]", help="as lmgw serve --worker")
    parser.add_argument("--redis-url", required=True, help="redis://[[user]:password@]host:port/db")
    parser.add_argument("--prefix", default="lmgw", help="key prefix (discovery.redis_prefix)")
    parser.add_argument("--ttl", type=float, default=10.0, help="entry TTL in seconds")
    parser.add_argument("--model", action="append", default=[], help="a model it serves")
    args = parser.parse_args(argv)
    try:
        parse_redis_url(args.redis_url)
        worker = parse_worker_flag(args.worker)
        if args.model:
            worker = msgspec.structs.replace(worker, models=args.model)
    except (ConfigError, ValueError) as e:
        print(f"lmgw: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(_register_forever, args.redis_url, worker, args.prefix, args.ttl)
    except KeyboardInterrupt:
        pass
    return 0


async def _register_forever(url: str, worker: WorkerConfig, prefix: str, ttl_s: float) -> Any:
    await register(url, worker, prefix=prefix, ttl_s=ttl_s)


if __name__ == "__main__":
    sys.exit(main())
