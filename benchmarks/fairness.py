"""Admission fairness: what one flooding API key does to the others' queue waits, with the
queue in FIFO order (``limits.queue_policy = "fifo"``, the old behaviour) and in fair order
(``"fair"``: per-key fair share), side by side in one run; and what a request should cost
its key (``limits.fair_share_cost``).

Setup, all on 127.0.0.1: two simulated merged workers (``python -m lmgw.simulators``,
processes, ``--speed 1``: a 7-8B model's timing on one GPU, ~9 ms per token, 16 sequences
each, so they never queue themselves), and in front of them a fresh ``lmgw serve`` process per
run with ``limits.max_concurrent_requests = 8`` (the scarce resource), ``queue_size = 64``,
``queue_timeout_s = 10`` and one API key per tenant (weights 1). The load is open loop
(Poisson arrivals, a fixed seed: every mode sees the same schedule), streamed chat requests
with ``ignore_eos`` (so every answer has exactly ``max_tokens`` tokens).

* ``flood``: keys ``heavy``, ``light1``, ``light2``. ``heavy`` sends 5x the requests of each
  light key: it alone offers 1.0x the capacity (capacity = 8 slots / the unloaded service
  time, measured first), the light keys 0.2x each; 1.4x in all. Modes ``fifo`` and ``fair``.
* ``cost``: keys ``long`` (``max_tokens`` 96) and ``short`` (24), each offering 1.0x the
  capacity in requests. Modes ``fair`` with ``fair_share_cost = "requests"`` and ``"tokens"``:
  the first shares slots by request count (so ``long`` holds ~4x the slot time), the second
  by estimated tokens.
* ``kv``: keys ``agent`` (a ~960-token prompt held through 96 output tokens) and ``bulk``
  (~1056 prompt tokens, 1 output token): the same estimated tokens per request, but the agent's
  requests hold their context in the KV cache (and a slot) ~30x longer. Each offers 0.8x the
  capacity in requests. Modes ``fair`` with ``fair_share_cost = "tokens"`` (both pay the same
  per request) and ``"kv_seconds"`` (each pays what it held, settled when it ends).

Per key, over the requests that arrived after the warm-up (the first 20% of a run): sent,
answered (200), turned away (429: ``queue_full``, ``queue_timeout``, ``evicted``), TTFT p50 and
p99 of the answered ones (under a saturated cap TTFT is the queue wait plus the unloaded TTFT,
reported as ``baseline``), ``wait``: the gateway's own mean queue wait for the key
(``lmgw_admission_tenant_wait_seconds_total`` / requests that waited, same window), and the
key's share of the answered requests and of the generated tokens. Medians over ``--repeats``
runs (modes interleaved within each repeat).

Also, in process: the hot path (``Admission.enter`` + ``leave``, nobody waiting) with the cap
off and on, and what a queued request costs (wait + hand-over) in each order.

    .venv/bin/python benchmarks/fairness.py [--quick] [--duration 12] [--repeats 3]

Prints tables and writes benchmarks/results/fairness.json; gateway logs go to
benchmarks/results/fairness-logs/.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
import trio.testing

from lmgw.admission import Admission
from lmgw.config import (
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    LoggingConfig,
    ServerConfig,
    WorkerConfig,
    dump_config,
)
from lmgw.simulators.fleet import open_fleet, stop_process

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "fairness.json"
LOG_DIR = RESULTS / "fairness-logs"
MODEL = "sim-llama"
SPEED = 1.0
CAP = 8
QUEUE_SIZE = 64
QUEUE_TIMEOUT_S = 10.0
WARMUP = 0.2
SEED = 7
PROMPT_SENTENCE = "Summarize the history of fair queueing in network schedulers. "
KEYS = {name: f"sk-bench-{name}-0123456789abcdef" for name in ("heavy", "light1", "light2")}
KEYS.update({name: f"sk-bench-{name}-0123456789abcdef" for name in ("long", "short")})
KEYS.update({name: f"sk-bench-{name}-0123456789abcdef" for name in ("agent", "bulk")})


@dataclass(frozen=True)
class Tenant:
    name: str
    load: float  # offered requests, as a share of the gateway's capacity in requests
    max_tokens: int
    prompt_repeat: int = 6  # the prompt: PROMPT_SENTENCE this many times


@dataclass(frozen=True)
class Mode:
    name: str
    policy: str
    cost: str = "tokens"


SCENARIOS: dict[str, tuple[list[Tenant], list[Mode]]] = {
    "flood": (
        [Tenant("heavy", 1.0, 32), Tenant("light1", 0.2, 32), Tenant("light2", 0.2, 32)],
        [Mode("fifo", "fifo"), Mode("fair", "fair")],
    ),
    "cost": (
        [Tenant("long", 1.0, 96), Tenant("short", 1.0, 24)],
        [Mode("fair/requests", "fair", "requests"), Mode("fair/tokens", "fair", "tokens")],
    ),
    # the same estimated tokens (prompt bytes / 4 + max_tokens), very different KV-seconds
    "kv": (
        [Tenant("agent", 0.8, 96, prompt_repeat=60), Tenant("bulk", 0.8, 1, prompt_repeat=66)],
        [Mode("fair/tokens", "fair", "tokens"), Mode("fair/kv_seconds", "fair", "kv_seconds")],
    ),
}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def median(values: Sequence[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


# -- a small HTTP/1.1 client (one connection per request) ------------------------------------

_FIRST_TOKEN = re.compile(rb'"content":"[^"]')
_ERROR_CODE = re.compile(rb'"message":"([^"]{0,200})')


@dataclass
class Answer:
    status: int
    ttft: float | None
    body: bytes


async def request(
    url: str, path: str, body: Any, key: str | None = None, method: str = "POST"
) -> Answer:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    payload = b"" if body is None else msgspec.json.encode(body)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    t0 = trio.current_time()
    conn = await trio.open_tcp_stream(host, int(port))
    ttft = None
    buf = bytearray()
    async with conn:
        await conn.send_all(head + payload)
        while chunk := await conn.receive_some(65536):
            start = max(0, len(buf) - 32)
            buf += chunk
            if ttft is None and _FIRST_TOKEN.search(buf, start):
                ttft = trio.current_time() - t0
    header, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1]) if header.startswith(b"HTTP/") else 0
    return Answer(status, ttft, rest)


def chat(max_tokens: int, prompt_repeat: int = 6) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT_SENTENCE * prompt_repeat}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


# -- the gateway -------------------------------------------------------------------------------


async def start_gateway(fleet_urls: list[str], mode: Mode, tag: str) -> tuple[trio.Process, str]:
    port = free_port()
    cfg = GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        logging=LoggingConfig(level="warning"),
        health=HealthConfig(interval_s=30.0),
        limits=LimitsConfig(
            max_concurrent_requests=CAP,
            queue_size=QUEUE_SIZE,
            queue_timeout_s=QUEUE_TIMEOUT_S,
            queue_policy=mode.policy,  # type: ignore[arg-type]
            fair_share_cost=mode.cost,  # type: ignore[arg-type]
        ),
        auth=AuthConfig(keys=[ApiKeyConfig(key=k, name=n) for n, k in KEYS.items()]),
        workers=[WorkerConfig(url=u, id=f"w{i}", models=[MODEL]) for i, u in enumerate(fleet_urls)],
    )
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / f"{tag}.toml"
    path.write_text(dump_config(cfg))
    logf = open(LOG_DIR / f"{tag}.log", "ab")  # noqa: SIM115 - the child owns it
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "lmgw.cli", "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=logf,
        start_new_session=True,  # (no PR_SET_PDEATHSIG: trio spawns from a worker thread,
    )  # whose exit would kill the child; stop_process() in a finally stops it instead)
    logf.close()
    url = f"http://127.0.0.1:{port}"
    deadline = trio.current_time() + 60
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"lmgw serve exited with {proc.returncode}; see {LOG_DIR}")
        if trio.current_time() > deadline:
            await stop_process(proc)
            raise RuntimeError(f"lmgw serve did not answer within 60 s; see {LOG_DIR}")
        try:
            r = await request(url, "/v1/chat/completions", chat(1), KEYS["heavy"])
            if r.status == 200:
                return proc, url
        except OSError:
            pass
        await trio.sleep(0.2)


async def tenant_waits(url: str) -> dict[str, tuple[float, float]]:
    """Per key: (seconds waited, requests that queued), from the gateway's /metrics."""
    text = (await request(url, "/metrics", None, method="GET")).body.decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = re.match(r'lmgw_admission_tenant_wait_seconds_total\{tenant="([^"]+)"\} (\S+)', line)
        if m:
            out.setdefault(m.group(1), [0.0, 0.0])[0] += float(m.group(2))
        m = re.match(r'lmgw_admission_tenant_requests_total\{tenant="([^"]+)",outcome="', line)
        if m and 'outcome="queue_full"' not in line:  # turned away at once: never queued
            out.setdefault(m.group(1), [0.0, 0.0])[1] += float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Record:
    tenant: str
    sent: float
    status: int = 0
    ttft: float | None = None
    reason: str = ""
    tokens: int = 0


@dataclass
class RunResult:
    scenario: str
    mode: str
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)


def schedule(tenants: list[Tenant], capacity: float, duration: float, seed: int) -> list[tuple]:
    """(time, tenant) arrivals: Poisson per tenant at load x capacity requests/s."""
    rng = random.Random(seed)
    out = []
    for t in tenants:
        rate = t.load * capacity
        at = rng.expovariate(rate)
        while at < duration:
            out.append((at, t))
            at += rng.expovariate(rate)
    return sorted(out, key=lambda x: x[0])


async def run_once(
    fleet_urls: list[str],
    scenario: str,
    mode: Mode,
    tenants: list[Tenant],
    capacity: float,
    duration: float,
    seed: int,
    tag: str,
) -> RunResult:
    proc, url = await start_gateway(fleet_urls, mode, tag)
    records: list[Record] = []
    try:
        arrivals = schedule(tenants, capacity, duration, seed)

        async def one(rec: Record, tenant: Tenant) -> None:
            try:
                payload = chat(tenant.max_tokens, tenant.prompt_repeat)
                r = await request(url, "/v1/chat/completions", payload, KEYS[tenant.name])
            except OSError:
                rec.status = -1
                return
            rec.status, rec.ttft = r.status, r.ttft
            if r.status == 200:
                rec.tokens = tenant.max_tokens
            else:
                m = _ERROR_CODE.search(r.body)
                msg = m.group(1).decode() if m else ""
                rec.reason = (
                    "evicted" if "yielded" in msg
                    else "queue_timeout" if "no slot freed" in msg
                    else "queue_full" if "queue" in msg
                    else str(r.status)
                )  # fmt: skip

        waits_at_warmup: dict[str, tuple[float, float]] = {}

        async def snapshot() -> None:
            await trio.sleep(duration * WARMUP)
            waits_at_warmup.update(await tenant_waits(url))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot)
            t0 = trio.current_time()
            for at, tenant in arrivals:
                delay = t0 + at - trio.current_time()
                if delay > 0:
                    await trio.sleep(delay)
                rec = Record(tenant.name, at)
                records.append(rec)
                nursery.start_soon(one, rec, tenant)
        waits_at_end = await tenant_waits(url)
    finally:
        await stop_process(proc)
    result = RunResult(scenario, mode.name)
    window = [r for r in records if r.sent >= duration * WARMUP]
    ok_total = sum(1 for r in window if r.status == 200)
    tokens_total = sum(r.tokens for r in window)
    for t in tenants:
        mine = [r for r in window if r.tenant == t.name]
        ok = [r for r in mine if r.status == 200]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        w_end, n_end = waits_at_end.get(t.name, (0.0, 0.0))
        w_start, n_start = waits_at_warmup.get(t.name, (0.0, 0.0))
        waited = (w_end - w_start) / (n_end - n_start) if n_end > n_start else 0.0
        reasons: dict[str, int] = {}
        for r in mine:
            if r.status != 200:
                reasons[r.reason or str(r.status)] = reasons.get(r.reason or str(r.status), 0) + 1
        result.tenants[t.name] = {
            "sent": len(mine),
            "ok": len(ok),
            "rejected": reasons,
            "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p99_s": percentile(ttfts, 0.99),
            "mean_wait_s": waited,
            "share_ok": len(ok) / ok_total if ok_total else 0.0,
            "share_tokens": sum(r.tokens for r in ok) / tokens_total if tokens_total else 0.0,
        }
    return result


async def baseline(fleet_urls: list[str], n: int) -> tuple[float, float]:
    """Unloaded TTFT and service time (one request at a time, through a gateway)."""
    proc, url = await start_gateway(fleet_urls, Mode("fair", "fair"), "baseline")
    ttfts, totals = [], []
    try:
        for _ in range(n):
            t0 = trio.current_time()
            r = await request(url, "/v1/chat/completions", chat(32), KEYS["heavy"])
            assert r.status == 200 and r.ttft is not None, r
            ttfts.append(r.ttft)
            totals.append(trio.current_time() - t0)
    finally:
        await stop_process(proc)
    return statistics.median(ttfts), statistics.median(totals)


# -- in process: the hot path and the queued path -------------------------------------------


def per_call(fn: Callable[[], object], n: int, repeats: int = 7) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def micro(quick: bool) -> dict[str, float]:
    n = 50_000 if quick else 500_000
    out: dict[str, float] = {}

    def noop() -> None:
        pass

    out["loop overhead"] = per_call(noop, n)
    for policy in ("fifo", "fair"):
        for cap in (0, 1000):
            adm = Admission(cap, 100, 60.0, policy=policy)

            def cycle(adm: Admission = adm) -> None:
                if adm.enter():
                    adm.leave(0.0)

            label = f"enter+leave, cap {'off' if not cap else 'on, slot free'}, {policy}"
            out[label] = per_call(cycle, n) - out["loop overhead"]
    waiters = 200 if quick else 2000
    for policy in ("fifo", "fair"):
        samples = []
        for _ in range(5):
            samples.append(trio.run(_queued_cost, policy, waiters))
        out[f"queued request (wait + hand-over), {policy}"] = statistics.median(samples)
    return out


async def _queued_cost(policy: str, waiters: int) -> float:
    """ns per request that queues, waits and gets a handed-over slot (3 tenants)."""
    adm = Admission(1, waiters + 1, 600.0, policy=policy)
    assert adm.enter()

    class Req:
        def __init__(self, i: int) -> None:
            self.principal = None
            self.body = b"x" * 400
            self.tenant = b"t%d" % (i % 3)

        def header(self, name: bytes) -> bytes:
            return self.tenant

    adm.tenant_header = b"x-tenant"
    done = trio.Event()
    count = 0

    async def one(i: int) -> None:
        nonlocal count
        await adm.wait(Req(i), None)  # type: ignore[arg-type]
        count += 1
        adm.leave(0.0)
        if count == waiters:
            done.set()

    async with trio.open_nursery() as nursery:
        for i in range(waiters):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        t0 = time.perf_counter_ns()
        adm.leave(0.0)
        await done.wait()
        return (time.perf_counter_ns() - t0) / waiters


# -- report -------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def table(scenario: str, modes: list[Mode], tenants: list[Tenant], agg: dict) -> str:
    lines = [f"\n{scenario}: " + ", ".join(f"{t.name} {t.load:g}x cap" for t in tenants)]
    head = (
        f"{'mode':14} {'key':7} {'sent':>5} {'ok':>5} {'429':>5} {'ttft p50':>9} "
        f"{'ttft p99':>9} {'wait':>7} {'share ok':>9} {'share tok':>9}"
    )
    lines.append(head)
    for mode in modes:
        for t in tenants:
            r = agg[mode.name][t.name]
            lines.append(
                f"{mode.name:14} {t.name:7} {r['sent']:5.0f} {r['ok']:5.0f} {r['rejected']:5.0f} "
                f"{_ms(r['ttft_p50_s']):>9} {_ms(r['ttft_p99_s']):>9} {_ms(r['mean_wait_s']):>7} "
                f"{r['share_ok'] * 100:8.1f}% {r['share_tokens'] * 100:8.1f}%"
            )
    return "\n".join(lines)


def aggregate(runs: list[RunResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians over repeats, per mode and key."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    by_mode: dict[str, list[RunResult]] = {}
    for r in runs:
        by_mode.setdefault(r.mode, []).append(r)
    for mode, rs in by_mode.items():
        out[mode] = {}
        for tenant in rs[0].tenants:
            vals = [r.tenants[tenant] for r in rs]
            out[mode][tenant] = {
                "sent": median([v["sent"] for v in vals]),
                "ok": median([v["ok"] for v in vals]),
                "rejected": median([sum(v["rejected"].values()) for v in vals]),
                "rejected_by_reason": [v["rejected"] for v in vals],
                "ttft_p50_s": median([v["ttft_p50_s"] for v in vals]),
                "ttft_p99_s": median([v["ttft_p99_s"] for v in vals]),
                "mean_wait_s": median([v["mean_wait_s"] for v in vals]),
                "share_ok": median([v["share_ok"] for v in vals]),
                "share_tokens": median([v["share_tokens"] for v in vals]),
            }
    return out


async def main_async(args: argparse.Namespace, micro_ns: dict[str, float]) -> dict[str, Any]:
    async with open_fleet({"pd": 2}, model=MODEL, speed=SPEED,
                          extra_args=["--max-num-seqs", "16"]) as fleet:  # fmt: skip
        urls = [m.url for m in fleet.members]
        base_ttft, service_s = await baseline(urls, 5 if args.quick else 10)
        capacity = CAP / service_s
        log(f"unloaded: TTFT {base_ttft * 1000:.0f} ms, service {service_s * 1000:.0f} ms"
            f" -> capacity {capacity:.1f} req/s at {CAP} slots")  # fmt: skip
        results: dict[str, Any] = {}
        for scenario, (tenants, modes) in SCENARIOS.items():
            if args.scenarios and scenario not in args.scenarios:
                continue
            runs: list[RunResult] = []
            for rep in range(args.repeats):
                order = modes if rep % 2 == 0 else list(reversed(modes))
                for mode in order:
                    log(f"{scenario} / {mode.name}: repeat {rep + 1}/{args.repeats}")
                    tag = f"{scenario}-{mode.name.replace('/', '-')}-{rep}"
                    result = await run_once(
                        urls, scenario, mode, tenants, capacity, args.duration, SEED + rep, tag
                    )
                    runs.append(result)
            agg = aggregate(runs)
            print(table(scenario, modes, tenants, agg), flush=True)
            results[scenario] = {
                "tenants": [t.__dict__ for t in tenants],
                "modes": {m.name: {"policy": m.policy, "cost": m.cost} for m in modes},
                "median": agg,
                "runs": [r.__dict__ for r in runs],
            }
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cap": CAP,
        "queue_size": QUEUE_SIZE,
        "queue_timeout_s": QUEUE_TIMEOUT_S,
        "speed": SPEED,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "baseline": {"ttft_s": base_ttft, "service_s": service_s, "capacity_rps": capacity},
        "micro_ns": micro_ns,
        "scenarios": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 6 s runs")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    if args.quick:
        args.duration, args.repeats = 6.0, 1
    report = trio.run(main_async, args, micro(args.quick))
    print("\nin process, ns per call (hot path: nobody waits):")
    for name, ns in report["micro_ns"].items():
        print(f"  {name:48} {ns:8.0f}")
    flood = report["scenarios"].get("flood", {}).get("median")
    if flood:
        for key in ("light1", "light2"):
            fifo, fair = flood["fifo"][key], flood["fair"][key]
            if fifo["ttft_p50_s"] and fair["ttft_p50_s"]:
                ratio = fair["ttft_p50_s"] / fifo["ttft_p50_s"]
                print(f"\n{key}: TTFT p50 fair/fifo = {ratio:.2f}")
    RESULTS.mkdir(exist_ok=True)
    OUT_JSON.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT_JSON}")


if __name__ == "__main__":
    main()
