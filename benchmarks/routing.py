"""Routing quality: cache hit rate, TTFT, throughput and load spread per policy, on a simulated
fleet whose prefix caches are small enough that where a request goes matters.

The question (issue 6): does cache_aware turn prefix sharing into faster first tokens without
piling load on a few workers, and does it cost nothing when nothing is shared? Targets: on the
sharing workloads cache_aware's TTFT p50 <= 0.7x round_robin's and <= 0.9x sglang-router's
cache_aware; on the no-sharing control <= 1.05x round_robin; max/mean requests per worker
<= 1.25. One run, one process tree on 127.0.0.1, every figure compared only within the run:

* fleets of 4 and 8 simulated merged workers (``python -m lmgw.simulators``, processes), with
  the routing-relevant parts of an engine: prefill time in proportion to the *uncached* prompt
  tokens, prefills computed one at a time (``--serial-prefill``: a busy worker queues), a
  prefix cache of ``--kv-blocks`` blocks (LRU, leaves first) and KV events (``--kv-events``);
  ``--speed`` scales the timing model (7-8B on one GPU at 1.0) so that a fleet's capacity stays
  within what 2 shared cores can drive. The workers' caches and counters are reset before
  every run; answers are deterministic, so every system sees the same conversations.
* workloads: ``chat`` (many users, multi-turn, histories growing with the real answers),
  ``sysprompt`` (a few long shared system prompts, short unique questions), ``rag`` (shared
  documents, Zipf popularity, then a question), ``control`` (unique prompts: no sharing).
* load: capacity first, per fleet and workload: a short closed-loop run (3 requests in flight
  per worker) through round_robin; then open-loop Poisson arrivals at 70% and 90% of it.
* systems, each a fresh process per run: ``lmgw serve`` with round_robin, least_load,
  power_of_two, prefix_hash and cache_aware (text keys: the raw prompt bytes), cache_aware with
  the gateway's tokenizer (``models[].tokenizer`` = the sim-model folder: chat-templated token
  ids, as the engine caches them) and cache_aware exact (tokenizer + ``workers[].kv_events``:
  the workers' own reports); variants with one knob changed (``+rep2``: replicas 2,
  ``+missN``: miss weight N, ``+bl2``/``+bl3``: bounded_load_factor 2 or 3, and pairs of
  them); plus, when their venv exists (``$PEERS_VENV``, default
  ``~/.cache/lmgw-peers-venv``, see /work/shared/bench), sglang-router and vllm-router with
  their ``cache_aware`` policy, command lines as in ``run_peers.py``.
* figures, over requests that arrived after the warm-up (the first ``--warmup`` share of each
  run): hit rate = sum of ``usage.prompt_tokens_details.cached_tokens`` / sum of prompt tokens;
  TTFT p50/p99 at the client (first streamed token); the p50 "floor" (each request's own
  prefill time on the workers' timing model, for the tokens it did not find cached: its TTFT
  with no queueing and no HTTP, below which no routing gets with the same hits); throughput
  (completions per second of the measured window: every system gets the same arrival
  schedule, so it differs only when a system falls behind); max/mean requests per worker (the
  workers' own counts, whole run); errors; CPU busy (the whole machine, /proc/stat: a box
  shared with other work shows it).

    .venv/bin/python benchmarks/routing.py [--quick] [--fleets 4,8] [--loads 0.7,0.9]
        [--workloads chat,sysprompt,rag,control] [--systems ...] [--duration 5] [--no-peers]

Prints a table and writes benchmarks/results/routing.json; child logs go to
benchmarks/results/routing-logs/. Every child is stopped on exit (the routers from ``finally``
blocks; the simulated workers also stop when their parent dies).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from lmgw.config import (
    GatewayConfig,
    LoggingConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
    dump_config,
)
from lmgw.simulators import model_files
from lmgw.simulators.engine import TimingModel
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "routing.json"
LOG_DIR = RESULTS / "routing-logs"
MODEL = "sim-model"
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 60.0
MAX_OUTSTANDING = 2000
"""Open-loop requests in flight at most; arrivals past it are counted as dropped."""
PEERS_VENV = Path(
    os.environ.get("PEERS_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmgw-peers-venv"
)
SHARING = ("chat", "sysprompt", "rag")
TARGET_VS_RR = 0.7
TARGET_VS_SGLANG = 0.9
TARGET_CONTROL = 1.05
TARGET_SPREAD = 1.25
CACHE_AWARE = (
    "cache_aware",
    "cache_aware+tok",
    "cache_aware-exact",
    "cache_aware+tok+rep2",
    "cache_aware+tok+miss2",
    "cache_aware+tok+miss3",
    "cache_aware+tok+miss4",
    "cache_aware+tok+miss3+rep2",
    "cache_aware+tok+bl2",
    "cache_aware+tok+bl3",
    "cache_aware+tok+miss3+bl2",
)


def log(*parts: object) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Systems under test
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    name: str
    policy: str = ""
    tokenizer: bool = False
    exact: bool = False
    peer: str = ""
    """A peer router's command template (``{py} {bin} {port} {prom} {workers}``)."""
    replicas: int = 1
    """cache_aware: ``routing.cache_aware_replicas`` (hot prefixes warmed on more holders)."""
    miss_weight: float = 1.0
    """cache_aware: ``routing.cache_aware_miss_weight``."""
    bounded_load_factor: float = 1.25
    """``routing.bounded_load_factor`` (cache_aware: the share of recent dispatches a holder
    of the prompt may take before a hit spills elsewhere)."""


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("round_robin", "round_robin"),
        System("least_load", "least_load"),
        System("power_of_two", "power_of_two"),
        System("prefix_hash", "prefix_hash"),
        System("cache_aware", "cache_aware"),
        System("cache_aware+tok", "cache_aware", tokenizer=True),
        System("cache_aware-exact", "cache_aware", tokenizer=True, exact=True),
        System("cache_aware+tok+rep2", "cache_aware", tokenizer=True, replicas=2),
        System("cache_aware+tok+miss2", "cache_aware", tokenizer=True, miss_weight=2.0),
        System("cache_aware+tok+miss3", "cache_aware", tokenizer=True, miss_weight=3.0),
        System("cache_aware+tok+miss4", "cache_aware", tokenizer=True, miss_weight=4.0),
        System("cache_aware+tok+bl2", "cache_aware", tokenizer=True, bounded_load_factor=2.0),
        System("cache_aware+tok+bl3", "cache_aware", tokenizer=True, bounded_load_factor=3.0),
        System(
            "cache_aware+tok+miss3+bl2",
            "cache_aware",
            tokenizer=True,
            miss_weight=3.0,
            bounded_load_factor=2.0,
        ),
        System(
            "cache_aware+tok+miss3+rep2", "cache_aware", tokenizer=True, miss_weight=3.0, replicas=2
        ),
        System(
            "sglang-router-ca",
            peer="{py} -m sglang_router.launch_router --host 127.0.0.1 --port {port} "
            "--worker-urls {workers} --policy cache_aware --prometheus-port {prom} "
            "--prometheus-host 127.0.0.1 --log-level warn --worker-startup-check-interval 1",
        ),
        System(
            "vllm-router-ca",
            peer="{bin}/vllm-router --host 127.0.0.1 --port {port} --worker-urls {workers} "
            "--policy cache_aware --prometheus-port {prom} --prometheus-host 127.0.0.1 "
            "--log-level warning --worker-startup-check-interval 1",
        ),
    )
}


# ------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_env() -> dict[str, str]:
    """No model-hub traffic: a router that looks for a tokenizer finds a closed local port."""
    env = dict(os.environ)
    env.update({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    return env


def gateway_argv(system: System, fleet: Fleet, port: int, run_dir: Path) -> list[str]:
    if system.peer:
        workers = " ".join(m.url for m in fleet.members)
        cmd = system.peer.format(
            py=PEERS_VENV / "bin" / "python",
            bin=PEERS_VENV / "bin",
            port=port,
            prom=free_port(),
            workers=workers,
        )
        return cmd.split()
    models = []
    if system.tokenizer:
        models.append(ModelConfig(name=MODEL, tokenizer=str(fleet.model_dir)))
    cfg = GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        routing=RoutingConfig(
            policy=system.policy,
            cache_aware_replicas=system.replicas,
            cache_aware_miss_weight=system.miss_weight,
            bounded_load_factor=system.bounded_load_factor,
        ),
        logging=LoggingConfig(level="warning"),
        models=models,
        workers=[
            WorkerConfig(
                url=m.url,
                id=f"w{i}",
                models=[MODEL],
                kv_events=m.kv_events if system.exact else None,
            )
            for i, m in enumerate(fleet.members)
        ],
    )
    path = run_dir / f"{system.name}.toml"
    path.write_text(dump_config(cfg))
    return [sys.executable, "-m", "lmgw.cli", "serve", "--config", str(path)]


# ------------------------------------------------------------------------------------------------
# A small HTTP/1.1 client (one connection per request, Connection: close)
# ------------------------------------------------------------------------------------------------

_FIRST_TOKEN = re.compile(rb'"content":"[^"]')


@dataclass
class Answer:
    status: int
    body: bytes
    ttft: float | None = None


def _split_url(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    return host, int(port)


def _dechunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return bytes(out)
        size = int(data[i:j].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


async def http(url: str, method: str, path: str, body: Any = None, stream: bool = False) -> Answer:
    """One exchange; for a stream, ``ttft`` is when the first generated token arrived."""
    host, port = _split_url(url)
    payload = b"" if body is None else msgspec.json.encode(body)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    t0 = trio.current_time()
    stream_ = await trio.open_tcp_stream(host, port)
    async with stream_:
        await stream_.send_all(head + payload)
        buf = bytearray()
        ttft = None
        while chunk := await stream_.receive_some(65536):
            if stream and ttft is None:
                start = max(0, len(buf) - 32)
                buf += chunk
                if _FIRST_TOKEN.search(buf, start):
                    ttft = trio.current_time() - t0
            else:
                buf += chunk
    header, _, raw = bytes(buf).partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1]) if header.startswith(b"HTTP/") else 0
    if b"transfer-encoding: chunked" in header.lower():
        raw = _dechunk(raw)
    return Answer(status, raw, ttft)


def sse_answer(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """The streamed answer's text and its usage (the last event that has one)."""
    text: list[str] = []
    usage = None
    for line in body.split(b"\n"):
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        try:
            event = msgspec.json.decode(line[6:])
        except msgspec.DecodeError:
            continue
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
        if event.get("usage"):
            usage = event["usage"]
    return "".join(text), usage


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------

Messages = list[dict[str, str]]
WORDS = model_files.output_words()  # one token each in the sim-model's vocabulary


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@dataclass
class Item:
    messages: Messages
    key: Any = None


class Workload:
    """Makes requests; ``finish`` hands back the answer (multi-turn chats grow with it)."""

    name = "workload"

    def next(self, rng: random.Random) -> Item:
        raise NotImplementedError

    def finish(self, item: Item, answer: str | None) -> None:
        pass


class Chat(Workload):
    """Many users in multi-turn conversations: a short system prompt shared by all, then the
    user's history (each turn ~``turn_words`` new tokens plus the real answer). An arrival goes
    to a random idle conversation; a finished one (4-10 turns) is replaced by a new user."""

    name = "chat"

    def __init__(self, users: int, seed: int, turn_words: int = 120) -> None:
        self.rng = random.Random(seed)
        self.system = words(random.Random(seed + 1), 60)
        self.turn_words = turn_words
        self.idle: list[dict[str, Any]] = [self._new() for _ in range(users)]
        self.users = 0

    def _new(self) -> dict[str, Any]:
        return {"history": [], "turns": self.rng.randint(4, 10), "seed": self.rng.random()}

    def next(self, rng: random.Random) -> Item:
        conv = self.idle.pop(rng.randrange(len(self.idle))) if self.idle else self._new()
        turn = len(conv["history"]) // 2
        question = words(random.Random(f"{conv['seed']}:{turn}"), self.turn_words)
        messages = [{"role": "system", "content": self.system}, *conv["history"]]
        messages.append({"role": "user", "content": question})
        return Item(messages, conv)

    def finish(self, item: Item, answer: str | None) -> None:
        conv = item.key
        if answer is not None:
            conv["history"] += [item.messages[-1], {"role": "assistant", "content": answer}]
        if len(conv["history"]) // 2 >= conv["turns"]:
            conv = self._new()
        self.idle.append(conv)


class SystemPrompts(Workload):
    """A few long system prompts shared by everyone, each request a short unique question."""

    name = "sysprompt"

    def __init__(self, prompts: int, seed: int, prompt_words: int = 1500) -> None:
        r = random.Random(seed)
        self.prompts = [words(r, prompt_words) for _ in range(prompts)]

    def next(self, rng: random.Random) -> Item:
        system = rng.choice(self.prompts)
        return Item(
            [{"role": "system", "content": system}, {"role": "user", "content": words(rng, 50)}]
        )


class Rag(Workload):
    """Retrieval-augmented questions: a shared instruction, one document (Zipf popularity over
    ``docs``), then a unique question."""

    name = "rag"

    def __init__(self, docs: int, seed: int, doc_words: int = 1200, zipf: float = 1.0) -> None:
        r = random.Random(seed)
        self.instruction = words(r, 30)
        self.docs = [words(r, doc_words) for _ in range(docs)]
        self.weights = [1.0 / (i + 1) ** zipf for i in range(docs)]

    def next(self, rng: random.Random) -> Item:
        doc = rng.choices(self.docs, self.weights)[0]
        user = f"Document: {doc}\n\nQuestion: {words(rng, 40)}"
        return Item(
            [{"role": "system", "content": self.instruction}, {"role": "user", "content": user}]
        )


class Control(Workload):
    """No sharing at all: every prompt is new."""

    name = "control"

    def __init__(self, prompt_words: int = 1300) -> None:
        self.prompt_words = prompt_words

    def next(self, rng: random.Random) -> Item:
        return Item([{"role": "user", "content": words(rng, self.prompt_words)}])


def make_workload(name: str, workers: int, seed: int) -> Workload:
    """Working sets sized to the fleet: several times one worker's cache, within the fleet's."""
    if name == "chat":
        return Chat(users=8 * workers, seed=seed)
    if name == "sysprompt":
        return SystemPrompts(prompts=2 * workers, seed=seed)
    if name == "rag":
        return Rag(docs=4 * workers, seed=seed)
    if name == "control":
        return Control()
    raise ValueError(f"unknown workload {name!r}")


def request_body(item: Item) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": item.messages,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ------------------------------------------------------------------------------------------------
# Load generation
# ------------------------------------------------------------------------------------------------


@dataclass
class Record:
    arrival: float  # seconds since the run's start
    ok: bool = False
    ttft: float | None = None
    done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


async def one_request(url: str, workload: Workload, item: Item, rec: Record, t0: float) -> None:
    answer_text = None
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
            r = await http(url, "POST", "/v1/chat/completions", request_body(item), stream=True)
        if scope.cancelled_caught:
            rec.error = "timeout"
        elif r.status != 200:
            rec.error = f"status {r.status}: {r.body[:200]!r}"
        else:
            text, usage = sse_answer(r.body)
            if usage is None or r.ttft is None:
                rec.error = "no usage or no token"
            else:
                rec.ok, rec.ttft = True, r.ttft
                rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                rec.cached_tokens = int(details.get("cached_tokens") or 0)
                answer_text = text
    except OSError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.done = trio.current_time() - t0
        workload.finish(item, answer_text)


async def open_loop(
    url: str, workload: Workload, rate: float, duration: float, seed: int
) -> tuple[list[Record], int]:
    """Poisson arrivals at ``rate`` for ``duration`` s (the schedule depends only on ``seed``);
    waits for every request to finish. Returns the records and the arrivals dropped."""
    rng = random.Random(seed)
    records: list[Record] = []
    dropped = 0
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration:
                break
            await trio.sleep_until(t0 + t)
            if len(nursery.child_tasks) >= MAX_OUTSTANDING:
                dropped += 1
                continue
            rec = Record(t)
            records.append(rec)
            nursery.start_soon(one_request, url, workload, workload.next(rng), rec, t0)
    return records, dropped


async def closed_loop(
    url: str, workload: Workload, concurrency: int, duration: float, seed: int
) -> list[Record]:
    """``concurrency`` clients, each sending its next request when the last one ends."""
    rng = random.Random(seed)
    records: list[Record] = []
    t0 = trio.current_time()

    async def client() -> None:
        while trio.current_time() - t0 < duration:
            rec = Record(trio.current_time() - t0)
            records.append(rec)
            await one_request(url, workload, workload.next(rng), rec, t0)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return records


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(
    records: list[Record], start: float, end: float, speed: float = 1.0
) -> dict[str, Any]:
    """Figures over the requests that arrived in [start, end). ``prefill_floor_p50_ms``: the
    median of each request's own prefill time (the workers' timing model on the tokens it
    did not find cached), what its TTFT would be with no queueing and no HTTP: the lowest p50
    routing can reach with the hits it got."""
    window = [r for r in records if start <= r.arrival < end]
    ok = [r for r in window if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    timing = TimingModel(speed=speed)
    floors = [timing.prefill_s(r.prompt_tokens - r.cached_tokens) for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    done_in = [r for r in records if r.ok and r.done is not None and start <= r.done < end]
    errors = [r.error for r in window if not r.ok]
    return {
        "requests": len(window),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "prompt_tokens_mean": prompt / len(ok) if ok else 0.0,
        "ttft_p50_ms": None if not ttfts else 1e3 * statistics.median(ttfts),
        "ttft_p99_ms": None if not ttfts else 1e3 * (percentile(ttfts, 0.99) or 0.0),
        "ttft_mean_ms": None if not ttfts else 1e3 * statistics.fmean(ttfts),
        "prefill_floor_p50_ms": None if not floors else 1e3 * statistics.median(floors),
        "throughput_rps": len(done_in) / (end - start) if end > start else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    fleet: Fleet
    run_dir: Path
    results: list[dict[str, Any]] = field(default_factory=list)

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Each engine's /sim/stats (a data-parallel server's: each rank's)."""
        out = []
        for m in self.fleet.members:
            r = await http(m.url, "GET", "/sim/stats")
            stats = msgspec.json.decode(r.body)
            out.extend(stats.get("ranks", [stats]))
        return out

    def engines(self) -> int:
        """Engines in the fleet (what the workload and the closed loop are sized to)."""
        return len(self.fleet.members)

    def gateway_argv(self, system: System, port: int) -> list[str]:
        """The command line of the router under test (a benchmark of other fleets overrides
        it: benchmarks/data_parallel.py)."""
        return gateway_argv(system, self.fleet, port, self.run_dir)

    async def reset_workers(self) -> None:
        for m in self.fleet.members:
            r = await http(m.url, "POST", "/sim/reset")
            assert r.status == 200, r

    async def start_system(self, system: System) -> tuple[trio.Process, str]:
        """Spawn the router, wait until it answers a chat (and, in exact mode, until it
        subscribed to every worker's events)."""
        port = free_port()
        argv = self.gateway_argv(system, port)
        subs = (
            [s["kv_events"]["subscriptions"] for s in await self.worker_stats()]
            if system.exact
            else []
        )
        logf = open(LOG_DIR / f"{system.name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = peer_env() if system.peer else None
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env=env,
            start_new_session=True,  # no PR_SET_PDEATHSIG: trio forks in a worker thread,
        )  # and the signal would fire when that thread retires (idle 10 s), not when we die
        logf.close()
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        deadline = trio.current_time() + 60
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{system.name} exited with {proc.returncode}; see {LOG_DIR}")
            if trio.current_time() > deadline:
                await stop_process(proc)
                raise RuntimeError(f"{system.name} did not answer within 60 s; see {LOG_DIR}")
            try:
                if (await http(url, "POST", "/v1/chat/completions", body)).status == 200:
                    break
            except OSError:
                pass
            await trio.sleep(0.2)
        if system.exact:
            while True:
                now = [s["kv_events"]["subscriptions"] for s in await self.worker_stats()]
                if all(a > b for a, b in zip(now, subs, strict=True)):
                    break
                if trio.current_time() > deadline:
                    raise RuntimeError(f"{system.name} did not subscribe to every worker")
                await trio.sleep(0.1)
        return proc, url

    async def gateway_stats(self, system: System, url: str) -> dict[str, float]:
        """lmgw's own view: the policy's statistics and the KV event gaps (from /metrics)."""
        if system.peer:
            return {}
        text = (await http(url, "GET", "/metrics")).body.decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(
                r'lmgw_routing_policy_stat\{role="pd",policy="[^"]+",stat="([^"]+)"\} (\S+)', line
            )
            if m:
                out[m.group(1)] = float(m.group(2))
            elif line.startswith("lmgw_kv_event_gaps_total{"):
                out["kv_event_gaps"] = out.get("kv_event_gaps", 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    async def run(
        self, system: System, workload_name: str, mode: str, level: float, rate: float | None
    ) -> dict[str, Any]:
        args = self.args
        n = self.engines()
        workload = make_workload(workload_name, n, args.seed)
        proc, url = await self.start_system(system)
        try:
            await self.reset_workers()
            duration = args.capacity_duration if mode == "capacity" else args.duration
            dropped = 0
            cpu0 = cpu_times()
            if mode == "capacity":
                records = await closed_loop(url, workload, 3 * n, duration, args.seed)
            else:
                assert rate is not None
                records, dropped = await open_loop(url, workload, rate, duration, args.seed)
            cpu1 = cpu_times()
            stats = await self.worker_stats()
            gw = await self.gateway_stats(system, url)
        finally:
            await stop_process(proc)
        per_worker = [s["requests_total"] for s in stats]
        mean = statistics.fmean(per_worker) if per_worker else 0.0
        figures = summarize(records, args.warmup * duration, duration, args.speed)
        result = {
            "system": system.name,
            "workers": n,
            "workload": workload_name,
            "mode": mode,
            "load": level,
            "rate_rps": rate,
            "duration_s": duration,
            "dropped": dropped,
            **figures,
            "cpu_busy": (cpu1[0] - cpu0[0]) / max(1.0, cpu1[1] - cpu0[1]),
            "per_worker_requests": per_worker,
            "max_mean_load": max(per_worker) / mean if mean else None,
            "worker_hit_rate": sum(s["prefix_cache"]["hits"] for s in stats)
            / max(1, sum(s["prefix_cache"]["queries"] for s in stats)),
            "evictions": sum(s["prefix_cache"]["evictions"] for s in stats),
            "gateway": {k: gw[k] for k in sorted(gw) if k in _GW_KEYS or k.startswith("routed_")},
        }
        self.results.append(result)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)  # partial results survive a crash
        self.args.out.write_text(json.dumps({"partial": True, "runs": self.results}, indent=1))
        log(
            f"{n}w {workload_name:<9} {mode:<8} {level:>4.0%} {system.name:<18} "
            f"hit {result['hit_rate']:.0%} ttft p50 {_ms(result['ttft_p50_ms'])} "
            f"p99 {_ms(result['ttft_p99_ms'])} thr {result['throughput_rps']:.1f}/s "
            f"max/mean {_f(result['max_mean_load'])} err {result['errors']} "
            f"cpu {result['cpu_busy']:.0%}"
        )
        return result


_GW_KEYS = {"kv_events", "kv_event_gaps", "exact_workers", "precision", "recall", "hit_ratio"}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    rows = [r for r in results if r["mode"] == "open"]
    lines = [
        "| workers | workload | load | system | hit rate | TTFT p50 | (floor) | TTFT p99 "
        "| throughput | max/mean load | errors | CPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['workload']} | {r['load']:.0%} ({r['rate_rps']:.1f}/s) "
            f"| {r['system']} | {r['hit_rate']:.0%} | {_ms(r['ttft_p50_ms'])} "
            f"| {_ms(r.get('prefill_floor_p50_ms'))} "
            f"| {_ms(r['ttft_p99_ms'])} | {r['throughput_rps']:.1f}/s "
            f"| {_f(r['max_mean_load'])} | {r['errors'] + r['dropped']} | {r['cpu_busy']:.0%} |"
        )
    return "\n".join(lines)


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, per fleet, workload, load and cache_aware variant."""
    by = {
        (r["workers"], r["workload"], r["load"], r["system"]): r
        for r in results
        if r["mode"] == "open"
    }
    out = []
    for (n, wl, load, name), r in sorted(by.items()):
        if name not in CACHE_AWARE or r["ttft_p50_ms"] is None:
            continue
        rr = by.get((n, wl, load, "round_robin"))
        sg = by.get((n, wl, load, "sglang-router-ca"))
        checks: dict[str, Any] = {}
        if rr and rr["ttft_p50_ms"]:
            ratio = r["ttft_p50_ms"] / rr["ttft_p50_ms"]
            limit = TARGET_VS_RR if wl in SHARING else TARGET_CONTROL
            checks["vs_round_robin"] = {"ratio": ratio, "limit": limit, "met": ratio <= limit}
        if sg and sg["ttft_p50_ms"] and wl in SHARING:
            ratio = r["ttft_p50_ms"] / sg["ttft_p50_ms"]
            checks["vs_sglang"] = {
                "ratio": ratio,
                "limit": TARGET_VS_SGLANG,
                "met": ratio <= TARGET_VS_SGLANG,
            }
        spread = r["max_mean_load"]
        if spread is not None:
            checks["max_mean_load"] = {
                "value": spread,
                "limit": TARGET_SPREAD,
                "met": spread <= TARGET_SPREAD,
            }
        out.append({"workers": n, "workload": wl, "load": load, "system": name, **checks})
    return out


def targets_text(targets: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | workload | load | system | vs round_robin | vs sglang-router | max/mean |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(c: dict[str, Any] | None, key: str = "ratio") -> str:
        if not c:
            return "-"
        return f"{c[key]:.2f} (<= {c['limit']}) {'ok' if c['met'] else 'MISSED'}"

    for t in targets:
        lines.append(
            f"| {t['workers']} | {t['workload']} | {t['load']:.0%} | {t['system']} "
            f"| {cell(t.get('vs_round_robin'))} | {cell(t.get('vs_sglang'))} "
            f"| {cell(t.get('max_mean_load'), 'value')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 workers, chat and control, 4 s runs")
    p.add_argument("--fleets", default="4,8", help="fleet sizes (workers)")
    p.add_argument("--loads", default="0.7,0.9", help="open-loop rates, share of capacity")
    p.add_argument("--workloads", default="chat,sysprompt,rag,control")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run")
    p.add_argument("--no-peers", action="store_true", help="skip sglang-router and vllm-router")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of open-loop arrivals")
    p.add_argument("--capacity-duration", type=float, default=4.0, help="closed-loop seconds")
    p.add_argument("--warmup", type=float, default=0.3, help="share of each run not measured")
    p.add_argument("--speed", type=float, default=1.0, help="simulator speed (timing model / x)")
    p.add_argument("--kv-blocks", type=int, default=640, help="prefix cache blocks per worker")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT_JSON)
    args = p.parse_args(argv)
    if args.quick:
        if args.fleets == "4,8":
            args.fleets = "4"
        if args.workloads == "chat,sysprompt,rag,control":
            args.workloads = "chat,control"
        args.duration = min(args.duration, 4.0)
        args.capacity_duration = min(args.capacity_duration, 3.0)
    return args


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """When, where and with what a run ran (the JSON's ``meta``)."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    fleets = [int(x) for x in args.fleets.split(",") if x]
    loads = [float(x) for x in args.loads.split(",") if x]
    workloads = [w for w in args.workloads.split(",") if w]
    systems = [SYSTEMS[s] for s in args.systems.split(",") if s]
    peers_ok = (PEERS_VENV / "bin" / "python").exists()
    skipped = []
    if args.no_peers or not peers_ok:
        skipped = [s.name for s in systems if s.peer]
        systems = [s for s in systems if not s.peer]
        if skipped and not args.no_peers:
            log(f"no peer venv at {PEERS_VENV}: skipping {', '.join(skipped)}")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
    worker_args = ["--serial-prefill", "--kv-blocks", str(args.kv_blocks)]
    worker_args += ["--kv-events", "tcp://127.0.0.1:0", "--log-level", "WARNING"]
    results: list[dict[str, Any]] = []
    capacity: dict[str, float] = {}
    t_start = time.monotonic()
    for n in fleets:
        log(f"fleet of {n} workers (speed {args.speed}, {args.kv_blocks} KV blocks each)")
        async with open_fleet(
            {"pd": n},
            model=MODEL,
            speed=args.speed,
            model_dir=model_dir,
            role_args={"pd": worker_args},
            ready_timeout_s=60.0,
        ) as fleet:
            bench = Bench(args, fleet, LOG_DIR, results)
            for wl in workloads:
                cap = await bench.run(SYSTEMS["round_robin"], wl, "capacity", 1.0, None)
                capacity[f"{n}:{wl}"] = cap["throughput_rps"]
                for level in loads:
                    rate = level * cap["throughput_rps"]
                    for system in systems:
                        await bench.run(system, wl, "open", level, rate)
    return {
        "meta": {
            **run_meta(args),
            "max_tokens": MAX_TOKENS,
            "skipped": skipped,
            "wall_s": time.monotonic() - t_start,
        },
        "capacity_rps": capacity,
        "runs": results,
        "targets": check_targets(results),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = trio.run(main_async, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report["runs"]))
    print()
    print(targets_text(report["targets"]))
    print(f"\n{len(report['runs'])} runs in {report['meta']['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
