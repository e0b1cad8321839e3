"""Discovery from Redis (lmgw.workers.discovery.redis) against a real ``redis-server``.

The module starts its own ``redis-server`` on a free 127.0.0.1 port (no persistence, a
password); the outage test starts, kills and restarts another one. Without the binary the tests
are skipped, except under ``CI`` where that is a failure (``make test`` installs it).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from lmgw.config import DiscoveryConfig, GatewayConfig, HealthConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.workers.discovery.redis import (
    RedisDiscovery,
    entry_key,
    entry_value,
    hold_missing,
    key_pattern,
    parse_entries,
    register,
)
from lmgw.workers.discovery.resp import (
    RedisConnection,
    RedisReplyError,
    parse_redis_url,
)
from lmgw.workers.registry import Registry
from lmgw.workers.worker import Worker, WorkerState

PASSWORD = "pa:ss@word"
QUOTED = "pa%3Ass%40word"
FAST = {"interval_s": 0.02, "timeout_s": 2.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (`make test` installs it with apt-get)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """A ``redis-server`` subprocess on a fixed port (so it can be restarted at the same URL)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, password: str = QUOTED) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir), "--requirepass", PASSWORD]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # ready when it accepts connections
            assert self.proc.poll() is None, "redis-server exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start within 10 s"
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a crash, as far as clients can tell
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test alone (with glob characters: SCAN must match it literally)."""
    return f"t[{request.node.name[:40]}]*"


async def keep_registered(
    url: str, worker: WorkerConfig, prefix: str, *, task_status: trio.TaskStatus, **kw: float
) -> None:
    """``register`` in a cancel scope the test gets back (cancel it: the worker deregisters)."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(partial(register, url, worker, prefix=prefix, **kw))
            task_status.started(scope)


async def wait_until(condition, what: str, timeout_s: float = 10.0) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def polls_later(discovery: RedisDiscovery, n: int = 3) -> None:
    """Wait until ``discovery`` has completed ``n`` more polls."""
    target = discovery.polls + n
    await wait_until(lambda: discovery.polls >= target, f"{n} more polls")


def fleet(gw: Gateway) -> dict[str, str]:
    return {w.id: w.state.value for w in gw.registry if gw.source_of(w.id) == "redis"}


def wc(port: int, wid: str, role: str = "pd") -> WorkerConfig:
    return WorkerConfig(url=f"http://127.0.0.1:{port}", role=role, id=wid)


# -- the pure parts ------------------------------------------------------------------------------


def test_entries_parse_like_worker_config_and_bad_ones_are_skipped() -> None:
    good = entry_value(WorkerConfig(url="http://h:1/", role="prefill", models=["m"]))
    assert good == b'{"url":"http://h:1","role":"p","models":["m"]}'
    items = [
        (b"p:workers:z", good),
        (b"p:workers:a", b'{"url": "http://h:2", "id": "a", "kv_address": "h:3"}'),
        (b"p:workers:gone", None),  # expired between SCAN and MGET
        (b"other:workers:x", good),
        (b"p:workers:bad-json", b"{"),
        (b"p:workers:bad-role", b'{"url": "http://h:4", "role": "x"}'),
        (b"p:workers:bad-id", b'{"url": "http://h:5", "id": "other"}'),
        (b"p:workers:extra", b'{"url": "http://h:6", "ttl": 3}'),
        (b"p:workers:list", b"[1]"),
        (b"p:workers:deep", b"[" * 100_000),
        (b"p:workers:\xff", good),
        (b"p:workers: ", good),
    ]
    workers, bad = parse_entries("p", items)
    assert [(w.worker_id, w.url, w.role) for w in workers] == [
        ("a", "http://h:2", "pd"),
        ("z", "http://h:1", "p"),
    ]
    assert workers[0].kv_address == "h:3" and workers[1].models == ["m"]
    assert bad[b"p:workers:bad-json"].startswith("not JSON")
    assert bad[b"p:workers:bad-role"] == "`role`: 'x' is not a role (expected pd/merged, " + (
        "e/encode, p/prefill, d/decode)"
    )
    assert "differs from the key's id" in bad[b"p:workers:bad-id"]
    assert "unknown key `ttl`" in bad[b"p:workers:extra"]
    assert "JSON object" in bad[b"p:workers:list"]
    assert bad[b"p:workers:\xff"] == "key is not UTF-8"
    assert "empty worker id" in bad[b"p:workers: "]
    assert bad[b"p:workers:deep"].startswith("not JSON")
    assert len(bad) == 8


def test_key_pattern_escapes_glob_characters() -> None:
    assert key_pattern("lmgw") == "lmgw:workers:*"
    assert key_pattern("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\:workers:*"


def test_hold_missing_keeps_previous_workers_not_seen() -> None:
    a, b, c = wc(1, "a"), wc(2, "b"), wc(3, "c")
    assert hold_missing(None, [b]) == [b]
    assert hold_missing([a, b], [b, c]) == [a, b, c]
    assert hold_missing([a], [a]) == [a]


# -- against redis-server ------------------------------------------------------------------------


async def test_two_gateway_replicas_see_the_same_fleet(
    nursery: trio.Nursery, redis_server: RedisServer, prefix: str
) -> None:
    url = redis_server.url()
    replicas = [Gateway(GatewayConfig(workers=[wc(1, "static")])) for _ in range(2)]
    watchers = [RedisDiscovery(gw, parse_redis_url(url), prefix=prefix, **FAST) for gw in replicas]
    for d in watchers:
        await nursery.start(d.run)
    reg_a = await nursery.start(partial(keep_registered, url, wc(11, "a"), prefix))
    await nursery.start(partial(keep_registered, url, wc(12, "b", "decode"), prefix))
    for gw in replicas:
        await wait_until(lambda gw=gw: set(fleet(gw)) == {"a", "b"}, "a and b on every replica")
        assert gw.registry.get("b").role == "d" and gw.source_of("static") == "static"

    conn = await RedisConnection.open(parse_redis_url(url), 2.0)
    try:  # an entry nobody refreshes: it expires and every replica lets it go
        await conn.command("SET", entry_key(prefix, "c"), entry_value(wc(13, "c")))
        for gw in replicas:
            await wait_until(lambda gw=gw: "c" in fleet(gw), "c on every replica")
        busy = replicas[0].registry.get("c")
        Registry.acquire(busy)  # a request in flight on replica 0's c
        await conn.command("PEXPIRE", entry_key(prefix, "c"), 50)
        for gw in replicas:
            await wait_until(
                lambda gw=gw: fleet(gw).get("c", "draining") == "draining", "c draining or gone"
            )
        assert fleet(replicas[0])["c"] == "draining"  # kept while busy ...
        Registry.release(busy)
        await wait_until(lambda: "c" not in fleet(replicas[0]), "c removed once idle")
        assert busy.state is WorkerState.GONE
    finally:
        await conn.aclose()

    reg_a.cancel()  # deregisters at once (DEL), no need to wait for the TTL
    for gw in replicas:
        await wait_until(lambda gw=gw: set(fleet(gw)) == {"b"}, "only b on every replica")
        assert gw.registry.get("static") is not None


async def test_a_bad_entry_is_skipped_and_logged_once(
    nursery: trio.Nursery,
    redis_server: RedisServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "lmgw.workers.discovery")
    url = redis_server.url()
    conn = await RedisConnection.open(parse_redis_url(url), 2.0)
    try:
        await conn.command("SET", entry_key(prefix, "bad"), b'{"url": "ftp://x"}', "PX", 60_000)
        await conn.command("SET", entry_key(prefix, "ok"), entry_value(wc(21, "ok")), "PX", 60_000)
        gw = Gateway(GatewayConfig())
        d = RedisDiscovery(gw, parse_redis_url(url), prefix=prefix, **FAST)
        await nursery.start(d.run)
        assert fleet(gw) == {"ok": "starting"}  # the first poll is done when started
        await polls_later(d)
        errors = [r.getMessage() for r in caplog.records]
        assert len(errors) == 1 and "workers:bad` skipped: `url`" in errors[0], errors
    finally:
        await conn.command("DEL", entry_key(prefix, "bad"), entry_key(prefix, "ok"))
        await conn.aclose()


async def test_password_and_database_are_used(
    nursery: trio.Nursery, redis_server: RedisServer, prefix: str
) -> None:
    with pytest.raises(RedisReplyError, match=r"WRONGPASS|invalid"):
        await RedisConnection.open(parse_redis_url(redis_server.url(password="nope")), 2.0)
    await nursery.start(partial(keep_registered, redis_server.url(db=3), wc(31, "x"), prefix))
    on_db0, on_db3 = Gateway(GatewayConfig()), Gateway(GatewayConfig())
    d0 = RedisDiscovery(on_db0, parse_redis_url(redis_server.url(db=0)), prefix=prefix, **FAST)
    d3 = RedisDiscovery(on_db3, parse_redis_url(redis_server.url(db=3)), prefix=prefix, **FAST)
    await nursery.start(d0.run)
    await nursery.start(d3.run)
    await polls_later(d0)
    assert fleet(on_db0) == {} and fleet(on_db3) == {"x": "starting"}
    assert d0.failures == 0


async def test_redis_outage_keeps_the_fleet_and_recovers(
    nursery: trio.Nursery, tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lmgw.workers.discovery")
    server = RedisServer(redis_binary(), tmp_path)
    server.start()
    try:
        url = server.url()
        gw = Gateway(GatewayConfig())
        drained: list[str] = []

        def watch(worker: Worker) -> None:
            if worker.state in (WorkerState.DRAINING, WorkerState.GONE):
                drained.append(worker.id)

        gw.registry.subscribe(watch)
        d = RedisDiscovery(gw, parse_redis_url(url), prefix=prefix, reconnect_grace_s=5.0, **FAST)
        await nursery.start(d.run)
        await nursery.start(partial(keep_registered, url, wc(41, "a"), prefix, ttl_s=1.5))
        await wait_until(lambda: "a" in fleet(gw), "a registered")

        server.stop()  # Redis dies (and loses everything: no persistence)
        await wait_until(lambda: d.failures >= 3, "three failed polls")
        assert fleet(gw) == {"a": "starting"} and drained == []
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "keeping the 1 worker(s)" in warnings[0].getMessage()

        server.start()  # back, empty; a's registration writes it again, b registers anew
        await nursery.start(partial(keep_registered, url, wc(42, "b"), prefix, ttl_s=1.5))
        await wait_until(lambda: set(fleet(gw)) == {"a", "b"} and d.failures == 0, "recovery")
        await polls_later(d)
        assert set(fleet(gw)) == {"a", "b"} and drained == []  # a never left
        assert "reachable again" in caplog.text
    finally:
        server.stop()


async def test_gateway_starts_with_workers_from_redis_and_a_file(
    nursery: trio.Nursery, sim_worker, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    a, b = await sim_worker(), await sim_worker()
    path = tmp_path / "fleet.toml"
    path.write_text(f'[[workers]]\nurl = "{a.url}"\nid = "from-file"\n')
    url = redis_server.url()
    await nursery.start(
        partial(keep_registered, url, WorkerConfig(url=b.url, id="from-redis"), prefix)
    )
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        discovery=DiscoveryConfig(
            file=str(path), redis_url=url, redis_prefix=prefix, redis_interval_s=0.05
        ),
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    assert {w.id: (w.state.value, gw.source_of(w.id)) for w in gw.registry} == {
        "from-file": ("healthy", f"file:{path}"),
        "from-redis": ("healthy", "redis"),
    }


async def test_an_unreachable_redis_does_not_stop_the_gateway_starting(
    nursery: trio.Nursery,
) -> None:
    port = free_port()  # nothing listens there
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        workers=[wc(free_port(), "static")],
        discovery=DiscoveryConfig(redis_url=f"redis://127.0.0.1:{port}", redis_interval_s=0.05),
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    assert [w.id for w in gw.registry] == ["static"]


def test_register_command_line_deregisters_on_interrupt(redis_server: RedisServer) -> None:
    prefix = "cli"
    key = entry_key(prefix, "http://127.0.0.1:9")
    args = ["--redis-url", redis_server.url(), "--prefix", prefix, "--ttl", "30", "--model", "m"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmgw.workers.discovery.redis", *args, "pd=http://127.0.0.1:9/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        value = _wait_for_key(redis_server, key, present=True)
        assert value == b'{"url":"http://127.0.0.1:9","role":"pd","models":["m"]}'
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
        assert _wait_for_key(redis_server, key, present=False) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _wait_for_key(server: RedisServer, key: str, *, present: bool) -> bytes | None:
    async def poll() -> bytes | None:
        conn = await RedisConnection.open(parse_redis_url(server.url()), 2.0)
        try:
            with trio.fail_after(10):
                while True:
                    value = await conn.command("GET", key)
                    if (value is not None) == present:
                        return value
                    await trio.sleep(0.02)
        finally:
            await conn.aclose()

    return trio.run(poll)
