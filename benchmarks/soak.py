"""Soak: a gateway under minutes of mixed traffic while its workers fail, then idle again.

Why: gateways that need scheduled restarts (LiteLLM's leaks, router indexes that grow without
bound; ANCHORS.md complaints 7-8) and requests that hang or vanish when a worker misbehaves
(complaints 11, 15) are what operators hate most, and neither shows up in a test that runs for
a second. This drives one ``lmgw serve`` process for ``--minutes``:

* fleets (simulator processes, realistic timing at ``--speed``): ``sim-epd`` on one encoder,
  one prefill and two decode workers (flow e+p+d, vllm-epd), and ``sim-pd`` on two merged
  workers; with ``--sglang`` also ``sim-sgl`` on one prefill and two decode workers (flow
  p/d, SGLang's bootstrap rooms: both legs at once);
* ``--clients`` keep-alive clients in closed loops, each request drawn from a mix: chat (plain,
  streamed with usage, with an image through the encoder, a forced tool call), completions
  with ``n = 2``, streams the client drops after two events, bad JSON, an unknown model, a
  ``GET /v1/models`` (on the same connections: each of these last three hands the connection
  from the compiled lane to the server and back);
* a chaos task that, every ``--fault-every`` seconds, gives one random worker one fault for
  ``--fault-for`` seconds: errors on half its requests, a connection dropped mid-answer,
  answers that never come, stalls, 503s for everything, a flapping ``/health``, 5x slower.

Every answer is checked. A 200 stream must end with ``data: [DONE]`` (after an error event is
fine: a failure said so); an error must be OpenAI-shaped JSON; a 500, a stream cut without an
error, an answer that does not come within ``--hang-s`` (the gateway's own request timeout is
10 s) are **bugs**, listed with examples. The gateway's ``/metrics`` is sampled every 5 s:
``process_resident_memory_bytes``, ``process_open_fds``, ``lmgw_tasks``,
``lmgw_client_connections``, requests in flight and upstream connections. After the load the
faults are lifted and the gateway left idle; the report compares the idle figures before and
after, and fits the RSS drift over the run's second half (MB per hour).

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 24] [--server hypercorn]
        [--keys] [--sse-keepalive 0.5] [--stream-head first-token] [--sglang]

``--max-concurrent N`` caps the requests running at once (``limits.max_concurrent_requests``,
with ``queue_timeout_s`` 3 s): most requests then wait in the admission queue, in the compiled
lane or on the server, and a 429 for a wait too long is an error answer, not a bug.

``--keys`` configures three API keys (one plain, one with a rate limit, one with a
tokens-per-minute limit, none of them ever reached) and the clients send them in turn; the
keys' requests in flight must then return to 0 as well.

Exit status 1 when a bug was seen or a resource did not return to its idle level. Prints a
table; writes benchmarks/results/soak.json; the gateway's log goes to
benchmarks/results/soak-logs/.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import signal
import statistics
import struct
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet_runs as F
from lmgw.config import (
    NATIVE_DIALECT,
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    LoggingConfig,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.simulators.fleet import Fleet, open_fleet, stop_process

LOG_DIR = F.RESULTS / "soak-logs"
EPD, PD, SGL = "sim-epd", "sim-pd", "sim-sgl"
#: the models text requests go to (SGL too with --sglang)
TEXT_MODELS = [EPD, PD]
REQUEST_TIMEOUT_S = 10.0


def png(rng: random.Random, side: int = 4) -> dict[str, Any]:
    """A small valid PNG of random pixels: a new image each time (so the encoder stage runs;
    a repeated one is served from the gateway's encoder cache)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\0" + rng.randbytes(3 * side) for _ in range(side))
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return {"type": "image_url", "image_url": {"url": url}}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
#: the simulators' fault settings (POST /sim/faults; lifted by posting NO_FAULTS), and
#: ``pause``: the worker process stopped (SIGSTOP) and continued (SIGCONT), a whole machine
#: frozen, the one fault native (ZeroMQ) workers can be given
FAULTS: list[dict[str, Any]] = [
    {"error_rate": 0.5},
    {"drop_at_token": 3},
    {"hang": True},
    {"stall_rate": 0.5, "stall_s": 3.0},
    {"refuse": True},
    {"flap_health": True},
    {"slow": 5.0},
    {"pause": True},
]
NO_FAULTS = {
    "error_rate": 0.0, "drop_at_token": None, "hang": False, "stall_rate": 0.0,
    "refuse": False, "flap_health": False, "slow": 1.0,
}  # fmt: skip
#: ``--keys``: the keys the clients send in turn (limits far above what the soak asks)
KEYS = [
    ApiKeyConfig(key="sk-soak-plain-0123456789abcdef", name="plain"),
    ApiKeyConfig(key="sk-soak-rate-0123456789abcdef", name="rate", requests_per_s=1e6),
    ApiKeyConfig(key="sk-soak-tpm-0123456789abcdef0", name="tpm", tokens_per_min=10**12),
]
SECRETS = [
    "sk-soak-plain-0123456789abcdef",
    "sk-soak-rate-0123456789abcdef",
    "sk-soak-tpm-0123456789abcdef0",
]

SAMPLED = {
    "rss_mb": "process_resident_memory_bytes",
    "fds": "process_open_fds",
    "tasks": "lmgw_tasks",
    "client_conns": "lmgw_client_connections",
    "threads": "process_threads",
}


# -- the requests -----------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        rng.choice(("alpha", "beta", "gamma", "delta", "omega", "sigma")) for _ in range(n)
    )


def chat(model: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def make_request(kind: str, rng: random.Random) -> tuple[str, bytes]:
    """(path, body) of one request of ``kind``."""
    model = rng.choice(TEXT_MODELS)
    n_tokens = rng.randint(4, 24)
    body: Any
    if kind == "chat":
        body = chat(model, words(rng, rng.randint(5, 200)), max_tokens=n_tokens)
    elif kind in ("stream", "dropped"):
        body = chat(
            model, words(rng, rng.randint(5, 200)), max_tokens=n_tokens, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    elif kind == "image":
        text = {"type": "text", "text": "Describe this image. " + words(rng, 8)}
        body = chat(EPD, [text, png(rng)], max_tokens=n_tokens, stream=rng.random() < 0.5)
    elif kind == "tool":
        body = chat(
            PD, f"Weather in {words(rng, 1)}?", max_tokens=32, tools=[WEATHER],
            tool_choice="required",
        )  # fmt: skip
    elif kind == "completions":
        body = {"model": model, "prompt": words(rng, 30), "max_tokens": n_tokens, "n": 2}
        return "/v1/completions", json.dumps(body).encode()
    elif kind == "bad_json":
        return "/v1/chat/completions", b'{"model": "' + PD.encode() + b'", "messages": ['
    elif kind == "unknown_model":
        body = chat("no-such-model", "hi", max_tokens=4)
    elif kind == "models":
        return "/v1/models", b""  # (a GET)
    else:
        raise ValueError(kind)
    return "/v1/chat/completions", json.dumps(body).encode()


#: kind -> weight in the mix
MIX = {
    "chat": 4, "stream": 4, "image": 2, "tool": 1, "completions": 2, "dropped": 1,
    "bad_json": 1, "unknown_model": 1, "models": 1,
}  # fmt: skip


class Bug(Exception):
    """An answer the gateway must never give."""


def check_error_body(status: int, body: bytes) -> tuple[str, str]:
    """An error answer's OpenAI shape: (status, message)."""
    try:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert "type" in err
    except (ValueError, KeyError, TypeError, AssertionError):
        raise Bug(f"{status} without an OpenAI error body: {body[:200]!r}") from None
    if status >= 500 and status not in (502, 503, 504):
        raise Bug(f"{status}: {err['message'][:200]}")
    return f"{status}", err["message"]


def check_stream(body: bytes) -> str:
    """A 200 stream: ends with [DONE]; 'stream_error' when an error event came before it."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        tail = body[-200:]
        raise Bug(f"a stream ended without data: [DONE] ({len(events)} events): {tail!r}")
    if any(e.startswith(b'data: {"error"') or b"event: error" in e for e in events):
        return "stream_error"
    return "200"


# -- a keep-alive client ----------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection (h11), reopened when the gateway closes it."""

    def __init__(self, url: str, key: str | None = None) -> None:
        self.key = key
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.served = 0  # answers read on this connection
        self.last = ""  # what the previous one was (for a bug report)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = None

    async def request(
        self, path: str, body: bytes, stop_after_events: int = 0
    ) -> tuple[int, bytes, bool]:
        """(status, body, whole): ``stop_after_events`` > 0 drops the connection after that many
        SSE events (whole is then False)."""
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.conn = h11.Connection(h11.CLIENT)
            self.served, self.last = 0, ""
        method = "POST" if body else "GET"
        headers = [("host", self.host)]
        if body:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        if self.key is not None:
            headers.append(("authorization", f"Bearer {self.key}"))
        out = self.conn.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        status, data = 0, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                if not chunk and status == 0:
                    raise Bug(
                        "the gateway closed the connection without an answer (after"
                        f" {self.served} on it, the last: {self.last})"
                    )
                self.conn.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
                if stop_after_events and data.count(b"\n\n") >= stop_after_events:
                    await self.close()
                    return status, bytes(data), False
            elif isinstance(event, h11.EndOfMessage):
                self.served += 1
                self.last = f"{path} {status} {bytes(data[:80])!r}"
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    await self.close()
                else:
                    self.conn.start_next_cycle()
                return status, bytes(data), True
            elif isinstance(event, h11.ConnectionClosed):
                raise Bug(f"the connection closed mid-answer (status {status}, {len(data)} bytes)")


async def client_loop(
    url: str,
    seed: int,
    until: float,
    hang_s: float,
    tally: Counter,
    bugs: dict[str, list[str]],
    errors: dict[tuple[str, str], list[str]],
    key: str | None = None,
) -> None:
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    client = Client(url, key)
    try:
        while trio.current_time() < until:
            kind = rng.choices(kinds, weights)[0]
            path, body = make_request(kind, rng)
            try:
                with trio.fail_after(hang_s):
                    status, data, whole = await client.request(
                        path, body, stop_after_events=2 if kind == "dropped" else 0
                    )
                if status == 200 and kind in ("bad_json", "unknown_model"):
                    raise Bug(f"{kind} answered 200")
                if not whole:
                    outcome = "dropped by client"
                elif status != 200:
                    outcome, message = check_error_body(status, data)
                    if len(errors[(kind, outcome)]) < 3 and message not in errors[(kind, outcome)]:
                        errors[(kind, outcome)].append(message)
                elif data.startswith(b"data:") or b"\n\ndata:" in data[:400]:
                    outcome = check_stream(data)
                else:
                    json.loads(data)  # a whole JSON answer
                    outcome = "200"
            except trio.TooSlowError:
                outcome = "BUG"
                bugs[f"no answer within {hang_s:g}s"].append(f"{kind} {body[:120]!r}")
                await client.close()
            except Bug as exc:
                outcome = "BUG"
                bugs[str(exc)[:60]].append(f"{kind}: {exc}")
                await client.close()
            except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
                outcome = "BUG"
                bugs[f"client error {type(exc).__name__}"].append(f"{kind}: {exc!r}")
                await client.close()
            tally[(kind, outcome)] += 1
    finally:
        await client.close()


# -- faults and samples -----------------------------------------------------------------------


async def chaos(
    faults: list[dict[str, Any]],
    fleets: list[Fleet],
    every_s: float,
    for_s: float,
    seed: int,
    t0: float,
    log: list[dict[str, Any]],
) -> None:
    rng = random.Random(seed)
    members = [m for f in fleets for m in f.members]
    while True:
        await trio.sleep(every_s)
        m, fault = rng.choice(members), rng.choice(faults)
        log.append(
            {"t": round(trio.current_time() - t0, 1), "worker": m.url, "role": m.role, **fault}
        )
        pause = "pause" in fault
        try:
            if pause:
                os.kill(m.pid, signal.SIGSTOP)
            else:
                await F.http(m.url, "POST", "/sim/faults", json.dumps(fault).encode())
            await trio.sleep(for_s)
        finally:
            with trio.CancelScope(shield=True):
                if pause:
                    os.kill(m.pid, signal.SIGCONT)
                else:
                    await F.http(m.url, "POST", "/sim/faults", json.dumps(NO_FAULTS).encode())


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        if base in SAMPLED.values():
            out[base] = float(value)
        elif base == "lmgw_requests_in_flight":
            out["in_flight"] += float(value)
        elif base == "lmgw_upstream_pool_connections":
            out["upstream_conns"] += float(value)
        elif base == "lmgw_api_key_in_flight":
            out["key_in_flight"] += float(value)
    return out


async def sample(url: str, t0: float) -> dict[str, float]:
    status, body = await F.http(url, "GET", "/metrics")
    assert status == 200
    m = parse_metrics(body.decode())
    row = {k: m[v] for k, v in SAMPLED.items()}
    row["rss_mb"] /= 1e6
    row.update(t=round(trio.current_time() - t0, 1), in_flight=m["in_flight"],
               upstream_conns=m["upstream_conns"], key_in_flight=m["key_in_flight"])  # fmt: skip
    return row


async def sampler(url: str, t0: float, every_s: float, rows: list[dict[str, float]]) -> None:
    while True:
        rows.append(await sample(url, t0))
        await trio.sleep(every_s)


async def idle_sample(url: str, t0: float, settle_s: float) -> dict[str, float]:
    """A sample once nothing is in flight and the idle connections' timers had time."""
    with trio.move_on_after(30):
        while (await sample(url, t0))["in_flight"] > 0:
            await trio.sleep(0.5)
    await trio.sleep(settle_s)
    return await sample(url, t0)


def slope_per_hour(rows: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` over time, per hour."""
    ts, vs = [r["t"] for r in rows], [r[key] for r in rows]
    if len(ts) < 3:
        return 0.0
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return (
        3600 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / den if den else 0.0
    )


# -- the run ----------------------------------------------------------------------------------


def gateway_config(
    fleets: dict[str, Fleet],
    port: int,
    server: str,
    stuck_timeout_s: float = 5.0,
    keys: bool = False,
    sse_keepalive_s: float = 0.0,
    max_concurrent: int = 0,
) -> GatewayConfig:
    native = fleets[PD].transport == "zmq"  # the native protocol: one dialect for every flow
    workers = [
        WorkerConfig(
            url=m.url,
            role=m.role,
            id=f"{model}-{m.role}{i}",
            models=[model],
            # (SGLang: a simulated prefill worker's bootstrap server is its HTTP port)
            bootstrap_port=int(m.url.rsplit(":", 1)[1]) if model == SGL else None,
        )
        for model, fleet in fleets.items()
        for i, m in enumerate(fleet.members)
    ]
    tokenizer = str(fleets[EPD].model_dir)
    return GatewayConfig(
        server=ServerConfig(host="127.0.0.1", port=port, server=server),  # type: ignore[arg-type]
        auth=AuthConfig(keys=KEYS) if keys else AuthConfig(open=True),
        logging=LoggingConfig(level="warning"),
        # idle keep-alive connections closed after 5 s: hypercorn holds a connection its client
        # closed after a streamed answer until then (the native server closes it at once)
        limits=LimitsConfig(
            request_timeout_s=REQUEST_TIMEOUT_S,
            keepalive_timeout_s=5.0,
            sse_keepalive_s=sse_keepalive_s,
            max_concurrent_requests=max_concurrent,
            queue_timeout_s=3.0,
        ),
        # probes every second, and a hung worker (the hang fault) ejected within 5 s by
        # default: before the requests waiting on it reach the 10 s deadline
        health=HealthConfig(interval_s=1.0, timeout_s=1.0, stuck_timeout_s=stuck_timeout_s),
        models=[
            ModelConfig(
                name=EPD,
                flow="e+p+d",
                dialect=NATIVE_DIALECT if native else "vllm-epd",
                tokenizer=tokenizer,
                tool_parser="hermes",
            ),
            ModelConfig(
                name=PD,
                flow="pd",
                tokenizer=tokenizer,
                tool_parser="hermes",
                dialect=NATIVE_DIALECT if native else "openai",
            ),
            *(
                [ModelConfig(name=SGL, flow="p/d", tokenizer=tokenizer, dialect="sglang-bootstrap")]
                if SGL in fleets
                else []
            ),
        ],
        workers=workers,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    zmq = args.transport == "zmq"
    fleet_options: dict[str, Any] = {"speed": args.speed, "transport": args.transport}
    if args.stream_head != "arrival":  # the HTTP workers' streams' heads with the first token
        fleet_options["extra_args"] = ["--stream-head", args.stream_head]
    async with (
        open_fleet(
            {"e": 1, "p": 2, "d": 2}, model=EPD, dialect=None if zmq else "vllm-epd",
            **fleet_options,
        ) as epd,
        open_fleet({"pd": 2}, model=PD, **fleet_options) as pd,
        contextlib.AsyncExitStack() as more,
    ):  # fmt: skip
        fleets = {EPD: epd, PD: pd}
        if args.sglang:
            fleets[SGL] = await more.enter_async_context(
                open_fleet({"p": 1, "d": 2}, model=SGL, **fleet_options)
            )
            TEXT_MODELS.append(SGL)
        proc, url = await F.start_gateway(
            "soak",
            [],
            pd,
            LOG_DIR,
            model=PD,
            config=lambda port: gateway_config(
                fleets,
                port,
                args.server,
                args.stuck_timeout,
                args.keys,
                args.sse_keepalive,
                args.max_concurrent,
            ),
            env_extra=dict(kv.split("=", 1) for kv in args.gateway_env),
            headers={"authorization": f"Bearer {SECRETS[0]}"} if args.keys else None,
        )
        try:
            t0 = trio.current_time()
            before = await idle_sample(url, t0, settle_s=1.0)
            tally: Counter = Counter()
            bugs: dict[str, list[str]] = defaultdict(list)
            errors: dict[tuple[str, str], list[str]] = defaultdict(list)
            rows: list[dict[str, float]] = []
            faults: list[dict[str, Any]] = []
            until = trio.current_time() + 60 * args.minutes
            print(f"soak: {args.minutes} min, {args.clients} clients, gateway {url}", flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler, url, t0, 5.0, rows)
                nursery.start_soon(
                    chaos,
                    [f for f in FAULTS if next(iter(f)) in args.faults.split(",")],
                    list(fleets.values()),
                    args.fault_every,
                    args.fault_for,
                    args.seed,
                    t0,
                    faults,
                )
                async with trio.open_nursery() as clients:
                    for i in range(args.clients):
                        clients.start_soon(
                            client_loop,
                            url,
                            args.seed * 1000 + i,
                            until,
                            args.hang_s,
                            tally,
                            bugs,
                            errors,
                            SECRETS[i % len(SECRETS)] if args.keys else None,
                        )
                nursery.cancel_scope.cancel()  # the load is over: stop faults and samples
            for m in [m for f in fleets.values() for m in f.members] if not zmq else ():
                await F.http(m.url, "POST", "/sim/faults", json.dumps(NO_FAULTS).encode())
            after = await idle_sample(url, t0, settle_s=args.settle)
            alive = proc.returncode is None
        finally:
            await stop_process(proc)
    return report(args, before, after, rows, tally, bugs, errors, faults, alive)


def report(
    args: argparse.Namespace,
    before: dict[str, float],
    after: dict[str, float],
    rows: list[dict[str, float]],
    tally: Counter,
    bugs: dict[str, list[str]],
    errors: dict[tuple[str, str], list[str]],
    faults: list[dict[str, Any]],
    alive: bool,
) -> dict[str, Any]:
    total = sum(tally.values())
    outcomes: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, outcome), n in sorted(tally.items()):
        outcomes[kind][outcome] = n
    half = rows[len(rows) // 2 :]
    drift = {
        "rss_mb_per_hour_second_half": round(slope_per_hour(half, "rss_mb"), 1),
        "tasks_per_hour_second_half": round(slope_per_hour(half, "tasks"), 1),
        "fds_per_hour_second_half": round(slope_per_hour(half, "fds"), 1),
    }
    # idle after vs before: client connections and tasks back to where they were; fds may
    # keep the upstream pool's idle keep-alive connections (counted in upstream_conns)
    leaks = []
    if after["client_conns"] > before["client_conns"]:
        leaks.append(f"client connections {before['client_conns']:g} -> {after['client_conns']:g}")
    if after["tasks"] > before["tasks"] + 2:
        leaks.append(f"tasks {before['tasks']:g} -> {after['tasks']:g}")
    extra_fds = after["fds"] - before["fds"] - (after["upstream_conns"] - before["upstream_conns"])
    if extra_fds > 2:
        leaks.append(f"fds {before['fds']:g} -> {after['fds']:g} (+{extra_fds:g} beyond the pool)")
    if after["in_flight"] > 0:
        leaks.append(f"{after['in_flight']:g} requests still in flight")
    if after.get("key_in_flight", 0.0) > 0:
        leaks.append(f"{after['key_in_flight']:g} requests still in flight for their API keys")
    n_bugs = sum(len(v) for v in bugs.values())
    lines = [
        f"requests {total} in {args.minutes} min ({total / (60 * args.minutes):.0f}/s), "
        f"{len(faults)} faults, gateway {'alive' if alive else 'DEAD'}",
        "",
        "| kind | outcomes |",
        "|---|---|",
        *(f"| {k} | {', '.join(f'{o}: {n}' for o, n in v.items())} |" for k, v in outcomes.items()),
        "",
        "| gateway | idle before | peak under load | idle after |",
        "|---|---|---|---|",
    ]
    for key in ("rss_mb", "fds", "tasks", "threads", "client_conns", "upstream_conns", "in_flight"):
        peak = max((r[key] for r in rows), default=0.0)
        lines.append(f"| {key} | {before[key]:.1f} | {peak:.1f} | {after[key]:.1f} |")
    lines += ["", "drift over the second half: " + ", ".join(f"{k} {v}" for k, v in drift.items())]
    lines.append(
        f"bugs: {n_bugs}"
        + "".join(f"\n  {k}: {len(v)}, e.g. {v[0][:300]}" for k, v in bugs.items())
    )
    lines.append("error answers (examples):")
    lines += [
        f"  {k} {o}: {' | '.join(m[:100] for m in v)}" for (k, o), v in sorted(errors.items())
    ]
    lines.append("leaks: " + ("; ".join(leaks) if leaks else "none"))
    return F.result(
        "soak", args, requests=total, outcomes=outcomes, bugs={k: v[:5] for k, v in bugs.items()},
        bug_count=n_bugs, leaks=leaks, before=before, after=after, drift=drift, samples=rows,
        errors={f"{k} {o}": v for (k, o), v in sorted(errors.items())},
        faults=faults, gateway_alive=alive, table="\n".join(lines),
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--speed", type=float, default=2.0, help="simulator speed factor")
    ap.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    ap.add_argument("--fault-for", type=float, default=6.0, help="seconds a fault lasts")
    ap.add_argument("--hang-s", type=float, default=30.0, help="a client gives up after this")
    ap.add_argument("--settle", type=float, default=8.0, help="idle seconds before the last sample")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keys", action="store_true", help="API keys, sent in turn by the clients")
    ap.add_argument("--server", choices=("native", "hypercorn"), default="native")
    ap.add_argument(
        "--sse-keepalive", type=float, default=0.0, metavar="S",
        help="limits.sse_keepalive_s: keep-alive comments before a stream's first event",
    )  # fmt: skip
    ap.add_argument(
        "--max-concurrent", type=int, default=0, metavar="N",
        help="limits.max_concurrent_requests (a queue of 3 s at most): requests wait for a slot",
    )  # fmt: skip
    ap.add_argument(
        "--stream-head", choices=("arrival", "first-token"), default="arrival",
        help="when the HTTP workers send a stream's head (arrival: vLLM's way)",
    )  # fmt: skip
    ap.add_argument(
        "--transport", choices=("http", "zmq"), default="http",
        help="how the gateway reaches the workers: HTTP (vLLM's API) or the native protocol",
    )  # fmt: skip
    ap.add_argument(
        "--sglang", action="store_true",
        help="a third fleet in SGLang's P/D (bootstrap rooms) sharing the text requests",
    )  # fmt: skip
    ap.add_argument(
        "--stuck-timeout", type=float, default=5.0,
        help="the gateway's health.stuck_timeout_s (0: off)",
    )  # fmt: skip
    ap.add_argument(
        "--faults", default=",".join(f for fault in FAULTS for f in list(fault)[:1]),
        help="the faults drawn from (default: all)",
    )  # fmt: skip
    ap.add_argument(
        "--gateway-env", action="append", default=[], metavar="KEY=VALUE",
        help="environment of the gateway process (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )  # fmt: skip
    args = ap.parse_args()
    if args.transport == "zmq" and args.faults == ap.get_default("faults"):
        args.faults = "pause"  # native workers have no /sim/faults
    wanted = set(args.faults.split(","))
    if args.transport == "zmq" and wanted - {"pause"}:
        ap.error("native (zmq) workers take only the pause fault")
    unknown = wanted - {next(iter(f)) for f in FAULTS}
    if unknown:
        ap.error(f"unknown faults: {sorted(unknown)}")
    data = trio.run(run, args)
    F.save("soak", data)
    return 1 if data["bug_count"] or data["leaks"] or not data["gateway_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
