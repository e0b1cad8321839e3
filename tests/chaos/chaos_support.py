"""The chaos suite's harness: a fleet of simulated worker processes, a gateway in the test's own
trio run, 200 raw streaming clients, and the invariants every scenario checks.

Why the gateway runs in-process: the invariants need its insides. The registry's in-flight
counts, the trio task tree (a leaked task is a descendant of the root task that outlives the
load), the connection pool's idle count and the process's open fds and RSS are read directly,
and the scenarios drive fleet operations (``retire_worker``) and watch state changes
(``registry.subscribe``) without an admin API round trip. The workers are real processes
(:func:`lmgw.simulators.run_fleet`), so SIGKILL / SIGSTOP hit a real peer.

The clients are raw HTTP/1.1 on trio sockets (one connection per request, ``connection:
close``), not the ``openai`` SDK: 200 of them share one core with the gateway, so each keeps
the bytes it receives and parses them once, at the end.

A uniquely named module, so test files import it whatever other ``conftest.py`` files exist.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from lmgw.config import (
    DiscoveryConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.process_stats import ProcessReader, current_tasks
from lmgw.simulators import Fleet, SimWorker, WorkerOptions, run_fleet, serve_worker_inprocess
from lmgw.simulators.model_files import default_model_dir
from lmgw.workers.worker import Worker, WorkerState

MODEL = "sim-model"
SPEED = 0.4
"""Simulator speed: about 30 ms per token at the batch sizes of the load (50 streams per worker),
so a 40-token stream lasts ~1.3 s."""
MAX_TOKENS = 40
CLIENTS = 200
PROMPTS = 16
"""Distinct prompts of the load (each one's answer is known before the load starts)."""
CLIENT_DEADLINE_S = 20.0
"""Every client request must end (complete or with an error) within this."""
RSS_MARGIN_BYTES = 50 << 20
SCENARIO_DEADLINE_S = 60.0
"""A scenario still running after this fails instead of hanging CI."""

ERROR_KEYS = {"message", "type", "param", "code"}


# -- the load's prompts and their answers -------------------------------------------------------


def chat_body(prompt: str, max_tokens: int) -> bytes:
    return msgspec.json.encode(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    )


@dataclass(frozen=True)
class Answers:
    """The load's prompts (each one's answer runs to ``max_tokens``: a stream long enough to be
    broken mid-way) and the exact text an unbroken worker streams for each."""

    max_tokens: int
    prompts: tuple[str, ...]
    texts: tuple[str, ...]


def compute_answers(max_tokens: int, count: int = PROMPTS) -> Answers:
    """Ask an in-process simulated worker (speed inf, the fleet's model folder and seed) for the
    streamed answer of candidate prompts; keep ``count`` that run to ``max_tokens``. Blocking:
    runs its own trio loop (call it from a sync, session-scoped fixture)."""

    async def main() -> Answers:
        sim = SimWorker(
            WorkerOptions(model=MODEL, speed=math.inf, model_dir=str(default_model_dir()))
        )
        prompts: list[str] = []
        texts: list[str] = []
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_worker_inprocess, sim)
            for i in range(20 * count):
                prompt = f"chaos prompt {i}: tell me about failure number {i * 7919 % 1000}"
                result = await one_request(url, chat_body(prompt, max_tokens), 10.0)
                assert result.kind == "complete", result
                if result.tokens == max_tokens:
                    prompts.append(prompt)
                    texts.append(result.text)
                    if len(prompts) == count:
                        break
            nursery.cancel_scope.cancel()
        assert len(prompts) == count, f"only {len(prompts)} prompts run to {max_tokens} tokens"
        return Answers(max_tokens, tuple(prompts), tuple(texts))

    return trio.run(main)


# -- one raw streaming request ------------------------------------------------------------------


@dataclass
class Result:
    """How one client request ended.

    ``kind``: ``complete`` (200, SSE, every event well formed, no error, ``[DONE]`` last),
    ``error`` (an OpenAI-shaped error: a JSON error body, or an SSE error event followed by
    ``[DONE]``), ``malformed`` (anything else: truncated, bad framing, ...), ``hung`` (no end
    within the deadline). ``text`` is the streamed content; ``correct`` is set by the load."""

    kind: str
    status: int = 0
    text: str = ""
    tokens: int = 0
    detail: str = ""
    elapsed_s: float = 0.0
    prompt: int = -1
    correct: bool = False


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep or not size_line:
            return bytes(out), False
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return bytes(out), False
        if size == 0:
            return bytes(out), True
        out += rest[:size]
        if len(rest) < size + 2:
            return bytes(out), False
        data = rest[size + 2 :]


def _is_error(obj: Any, status: int | None = None) -> bool:
    err = obj.get("error") if isinstance(obj, dict) and list(obj) == ["error"] else None
    return (
        isinstance(err, dict)
        and set(err) == ERROR_KEYS
        and isinstance(err["message"], str)
        and bool(err["message"])
        and isinstance(err["type"], str)
        and isinstance(err["code"], int)
        and (status is None or err["code"] == status)
    )


def classify(raw: bytes) -> Result:
    """Judge a whole HTTP response (read to EOF)."""
    head, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        return Result("malformed", detail=f"no response head: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    complete = True
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload, complete = _dechunk(payload)
    elif "content-length" in headers:
        complete = len(payload) == int(headers["content-length"])
    if not complete:
        return Result("malformed", status, detail=f"truncated body: ...{payload[-200:]!r}")
    if status != 200:
        try:
            body = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            body = None
        if _is_error(body, status):
            return Result("error", status, detail=body["error"]["message"])
        return Result("malformed", status, detail=f"non-OpenAI error body {payload[:300]!r}")
    if not headers.get("content-type", "").startswith("text/event-stream"):
        return Result("malformed", status, detail=f"not SSE: {headers}")
    return _judge_sse(status, payload)


def _judge_sse(status: int, payload: bytes) -> Result:
    if not payload.endswith(b"\n\n"):
        return Result("malformed", status, detail=f"SSE not ended: ...{payload[-200:]!r}")
    events: list[Any] = []
    for block in payload[:-2].split(b"\n\n"):
        if not block.startswith(b"data: ") or b"\n" in block:
            return Result("malformed", status, detail=f"bad SSE framing {block[:200]!r}")
        data = block[6:]
        try:
            events.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
        except msgspec.DecodeError:
            return Result("malformed", status, detail=f"bad SSE JSON {data[:200]!r}")
    if not events or events[-1] != "[DONE]" or "[DONE]" in events[:-1]:
        return Result("malformed", status, detail=f"[DONE] is not last and once: {events[-3:]}")
    body = events[:-1]
    errors = [e for e in body if isinstance(e, dict) and "error" in e]
    parts: list[str] = []
    finishes = 0
    ids = set()
    for ev in body:
        if ev in errors:
            continue
        if not isinstance(ev, dict) or ev.get("object") != "chat.completion.chunk":
            return Result("malformed", status, detail=f"not a chat chunk: {ev!r:.200}")
        ids.add(ev.get("id"))
        for choice in ev.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
            if choice.get("finish_reason"):
                finishes += 1
    text = "".join(parts)
    if errors:
        if len(errors) == 1 and body[-1] is errors[0] and _is_error(errors[0]):
            detail = errors[0]["error"]["message"]
            return Result("error", status, text, len(parts), detail)
        return Result("malformed", status, text, len(parts), f"bad error events {errors}")
    if finishes != 1 or len(ids) != 1:
        detail = f"{finishes} finish_reasons, stream ids {ids}"
        return Result("malformed", status, text, len(parts), detail)
    return Result("complete", status, text, len(parts))


async def one_request(url: str, body: bytes, deadline_s: float) -> Result:
    """POST ``body`` to ``url``'s chat endpoint on a fresh connection; read to EOF."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    t0 = trio.current_time()
    raw = bytearray()
    with trio.move_on_after(deadline_s):
        try:
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(head + body)
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        except (OSError, trio.BrokenResourceError) as exc:
            result = classify(bytes(raw)) if raw else Result("malformed")
            if result.kind not in ("complete", "error"):  # a reset after a whole answer is fine
                result = Result("malformed", result.status, detail=f"{exc!r} after {raw[-200:]!r}")
        else:
            result = classify(bytes(raw))
        result.elapsed_s = trio.current_time() - t0
        return result
    return Result("hung", elapsed_s=trio.current_time() - t0, detail=f"got {raw[-200:]!r}")


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Load:
    """``clients`` concurrent clients, each sending ``per_client`` streaming chat requests one
    after the other (prompts in turn), every one bounded by ``deadline_s``."""

    url: str
    answers: Answers
    clients: int = CLIENTS
    per_client: int = 2
    deadline_s: float = CLIENT_DEADLINE_S
    results: list[Result] = field(default_factory=list)

    async def run(self) -> None:
        bodies = [chat_body(p, self.answers.max_tokens) for p in self.answers.prompts]
        async with trio.open_nursery() as nursery:
            for c in range(self.clients):
                nursery.start_soon(self._client, c, bodies)
                if c % 20 == 19:
                    await trio.sleep(0)  # let the first clients connect while others start

    async def _client(self, c: int, bodies: list[bytes]) -> None:
        for r in range(self.per_client):
            k = (c + r * 7) % len(bodies)
            result = await one_request(self.url, bodies[k], self.deadline_s)
            result.prompt = k
            result.correct = result.kind == "complete" and result.text == self.answers.texts[k]
            self.results.append(result)

    async def wait_streaming(self, gateway: Gateway, worker_id: str, min_in_flight: int) -> None:
        """Wait until ``worker_id`` has ``min_in_flight`` requests in flight (10 s at most)
        and they had a moment to stream tokens."""
        worker = gateway.registry.get(worker_id)
        assert worker is not None
        with trio.fail_after(10):
            while worker.in_flight < min_in_flight:
                await trio.sleep(0.01)
        await trio.sleep(0.3)

    # -- summaries --
    def counts(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for r in self.results:
            c["correct" if r.correct else "incorrect" if r.kind == "complete" else r.kind] += 1
        return c

    @property
    def completion_ratio(self) -> float:
        return sum(r.correct for r in self.results) / max(1, len(self.results))

    def summary(self) -> str:
        c = self.counts()
        slowest = max((r.elapsed_s for r in self.results), default=0.0)
        errors = Counter(f"{r.status} {r.detail[:90]}" for r in self.results if r.kind == "error")
        return (
            f"{len(self.results)} requests: {dict(c)}; complete and correct "
            f"{100 * self.completion_ratio:.2f}%; slowest {slowest:.2f} s; errors {dict(errors)}"
        )

    def check(self, min_correct: float = 1.0) -> None:
        """Every request ended within its deadline, complete and correct or with an
        OpenAI-shaped error, and at least ``min_correct`` of them complete and correct."""
        assert len(self.results) == self.clients * self.per_client, self.summary()
        bad = [r for r in self.results if not r.correct and r.kind != "error"]
        assert not bad, f"{self.summary()}; e.g. {bad[:3]}"
        assert all(r.elapsed_s <= self.deadline_s for r in self.results), self.summary()
        assert self.completion_ratio >= min_correct, self.summary()


# -- gateway-side invariants --------------------------------------------------------------------


PROCESS = ProcessReader()


def open_fds() -> int:
    return PROCESS.open_fds()


def rss_bytes() -> int:
    stats = PROCESS.stats()
    assert stats is not None, "no /proc/self/stat"
    return stats.resident_bytes


@dataclass
class Snapshot:
    tasks: int
    fds: int  #: open fds not counting the pool's idle upstream connections
    rss: int


def snapshot(gw: Gateway) -> Snapshot:
    return Snapshot(current_tasks(), open_fds() - gw.pool.statistics().idle, rss_bytes())


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


_IN_FLIGHT = re.compile(r'^lmgw_worker_in_flight\{[^}]*worker="([^"]+)"[^}]*\} (\S+)$', re.M)
_REQS_IN_FLIGHT = re.compile(r"^lmgw_requests_in_flight (\S+)$", re.M)


async def scrape_metrics(gw: Gateway) -> str:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            raw = bytearray()
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"transfer-encoding: chunked" in head.lower():
        body, done = _dechunk(body)
        assert done
    return body.decode()


async def check_gateway_invariants(gw: Gateway, before: Snapshot, seen: Sequence[Worker]) -> str:
    """After the load: nothing in flight (registry, every worker ever seen, the gauges), no
    task, connection or fd left behind, RSS steady. Returns what it measured, for the log."""
    await wait_for(
        lambda: all(w.in_flight == 0 for w in seen) and all(w.in_flight == 0 for w in gw.registry),
        "every worker's in-flight count back to 0",
        5.0,
    )
    text = await scrape_metrics(gw)
    gauges = {wid: float(v) for wid, v in _IN_FLIGHT.findall(text)}
    assert gauges and all(v == 0 for v in gauges.values()), gauges
    m = _REQS_IN_FLIGHT.search(text)
    assert m is not None and float(m.group(1)) == 0, m
    assert gw.server is not None
    await wait_for(lambda: gw.server.active_connections == 0, "client connections closed", 5.0)
    await wait_for(lambda: current_tasks() <= before.tasks, "task count back to its baseline", 5.0)
    await wait_for(
        lambda: open_fds() - gw.pool.statistics().idle <= before.fds,
        f"open fds (less idle pooled connections) back to {before.fds}",
        5.0,
    )
    after = snapshot(gw)
    assert after.rss <= before.rss + RSS_MARGIN_BYTES, (before.rss >> 20, after.rss >> 20)
    return (
        f"tasks {before.tasks} -> {after.tasks}, fds {before.fds} -> {after.fds}"
        f" (+{gw.pool.statistics().idle} idle pooled), RSS {before.rss / 2**20:.1f}"
        f" -> {after.rss / 2**20:.1f} MiB"
    )


# -- the environment: fleet + gateway -----------------------------------------------------------


@dataclass
class Env:
    fleet: Fleet
    gateway: Gateway
    answers: Answers
    nursery: trio.Nursery
    #: every worker object the gateway registered (also ones removed later)
    seen: list[Worker] = field(default_factory=list)
    #: (trio time, worker id, new state) of every state change after start
    changes: list[tuple[float, str, WorkerState]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def load(self, **kw: Any) -> Load:
        return Load(self.url, self.answers, **kw)

    def worker(self, wid: str) -> Worker:
        w = self.gateway.registry.get(wid)
        assert w is not None, wid
        return w

    async def sim_call(self, index: int, method: str, path: str, body: Any = None) -> Any:
        """A ``/sim/*`` control call to fleet member ``index``; its JSON answer."""
        data = b"" if body is None else msgspec.json.encode(body)
        url = self.fleet.members[index].url
        host, port = url.removeprefix("http://").rsplit(":", 1)
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        ).encode()
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(head + data)
                raw = bytearray()
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        head_bytes, _, payload = bytes(raw).partition(b"\r\n\r\n")
        assert head_bytes.startswith(b"HTTP/1.1 200"), raw[:300]
        if b"transfer-encoding: chunked" in head_bytes.lower():
            payload, done = _dechunk(payload)
            assert done
        return msgspec.json.decode(payload)

    async def set_faults(self, index: int, **faults: Any) -> None:
        await self.sim_call(index, "POST", "/sim/faults", faults)

    def _watch(self, worker: Worker) -> None:
        if not any(w is worker for w in self.seen):
            self.seen.append(worker)
        self.changes.append((trio.current_time(), worker.id, worker.state))


def gateway_config(
    urls: Sequence[str] = (),
    *,
    policy: str = "round_robin",
    health: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    discovery: DiscoveryConfig | None = None,
    dp: int = 1,
) -> GatewayConfig:
    """``dp`` > 1: each URL is a server of that many data-parallel ranks (``w<i>#dp<r>``)."""
    return GatewayConfig(
        server=ServerConfig(port=0, graceful_shutdown_s=1.0),
        limits=LimitsConfig(**{"request_timeout_s": CLIENT_DEADLINE_S - 5, **(limits or {})}),
        upstream=UpstreamConfig(
            **{"connect_timeout_s": 1.0, "idle_timeout_s": 2.0, **(upstream or {})}
        ),
        routing=RoutingConfig(policy=policy),
        health=HealthConfig(**{"interval_s": 1.0, "timeout_s": 1.0, **(health or {})}),
        workers=[
            WorkerConfig(url=u, role="pd", id=f"w{i}", data_parallel_size=dp)
            for i, u in enumerate(urls)
        ],
        discovery=discovery or DiscoveryConfig(),
    )


@asynccontextmanager
async def chaos_env(
    answers: Answers,
    workers: int = 4,
    *,
    static: bool = True,
    before_gateway: Callable[[Fleet, trio.Nursery], Awaitable[None]] | None = None,
    dp: int = 1,
    **config: Any,
) -> AsyncIterator[Env]:
    """A fleet of ``workers`` simulator processes and a gateway (port 0) in front of them:
    as ``[[workers]]`` w0, w1, ... (``static``; each ``dp`` data-parallel ranks, w0#dp0, ...),
    or found by the caller's ``discovery`` after ``await before_gateway(fleet, nursery)``
    (which may start tasks in the nursery). Yields once every worker is healthy. Everything
    stops when the block ends, whatever happens; a scenario running past
    ``SCENARIO_DEADLINE_S`` fails."""
    async with trio.open_nursery() as nursery:
        watchdog = trio.CancelScope()

        async def guard() -> None:
            with watchdog:
                await trio.sleep(SCENARIO_DEADLINE_S)
                raise TimeoutError(f"chaos scenario still running after {SCENARIO_DEADLINE_S} s")

        nursery.start_soon(guard)
        try:
            with trio.fail_after(30):
                fleet: Fleet = await nursery.start(
                    partial(
                        run_fleet,
                        {"pd": workers},
                        model=MODEL,
                        speed=SPEED,
                        extra_args=["--log-level", "ERROR", "--data-parallel-size", str(dp)],
                        grace_s=2.0,
                    )
                )
                if before_gateway is not None:
                    await before_gateway(fleet, nursery)
                cfg = gateway_config(fleet.urls() if static else (), dp=dp, **config)
                gw = Gateway(cfg)
                env = Env(fleet, gw, answers, nursery)
                gw.registry.subscribe(env._watch)
                for w in gw.registry:
                    env.seen.append(w)
                await nursery.start(gw.run)
            await wait_for(
                lambda: (
                    len(gw.registry) == workers * dp
                    and all(w.state is WorkerState.HEALTHY for w in gw.registry)
                ),
                "every worker healthy",
            )
            env.changes.clear()
            yield env
        finally:
            watchdog.cancel()
            nursery.cancel_scope.cancel()


def states_of(env: Env, wid: str) -> list[tuple[float, WorkerState]]:
    return [(t, s) for t, w, s in env.changes if w == wid]


# -- redis-server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A ``redis-server`` child on a fixed 127.0.0.1 port (so it restarts at the same URL), with
    no persistence: a restart loses every key, like a crash of a cache node."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, "redis-server exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start within 10 s"
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (`make test` installs it with apt-get)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total
