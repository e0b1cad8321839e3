"""Gateway overhead: the same load straight at a simulated worker and through `lmgw serve`.

Everything runs in ONE process tree on 127.0.0.1, in one run, so the gateway/direct ratios are
comparable (timings on a small shared box drift between runs; compare only figures from one run):

  * two simulated workers (`python -m lmgw.simulators --role pd --speed inf`: no simulated
    delays, so what is left is HTTP and proxy cost) and one `lmgw serve` in front of both;
  * layout (2+ CPUs, `--layout pinned`, the default): the gateway alone on the second allowed CPU;
    wrk, the workers and this script on the first. `--layout none` pins nothing;
  * per round, each scenario runs against the gateway AND directly against worker 1 with the same
    wrk settings, back to back (the order flips every round):
      small_c1     non-stream chat completion, max_tokens 16, 1 connection
      small_c64    the same, 64 connections
      stream_c32   SSE stream, max_tokens 256 (ignore_eos), 32 connections
      ttft         time to the first `data:` line with a plain client (blocking socket, no
                   TCP_NODELAY, delayed ACKs left on, one keep-alive connection), N requests
    plus, once, startup: spawn `lmgw serve` (workers already up) and time the first successful
    proxied chat completion (median of --startup-spawns spawns).
  * figures: wrk req/s and latency p50/p99, gateway minus direct (paired per round, then the
    median over rounds), gateway CPU per request (and per relayed SSE event), CPU used by
    processes outside the benchmark (noise flag), wrk errors and non-2xx, per-worker split and
    upstream connections the gateway opened.

    .venv/bin/python benchmarks/overhead.py [--quick] [--rounds 3] [--duration 4] [--layout none]
        [--ttft-n 60] [--startup-spawns 3] [--retries 2] [--nice N] [--out PATH]

P/D mode (`--pd vllm-nixl` or `--pd sglang-bootstrap`): the gateway runs a prefill and a decode
simulator with that dialect (real KV bytes move from P to D over the simulators' side channel);
the direct baseline stays a merged worker, which answers the same text. The gateway's CPU per
request then covers both legs; "added" latency includes the prefill leg's round trip.

A worker or gateway that dies mid-round fails that round: the dead worker is restarted and the
round re-run (--retries), and the death is listed under "ANOMALIES" and in the JSON.

Needs `wrk` (Debian: `apt-get install -y wrk`; `make bench` installs it). Prints a table and
writes benchmarks/results/overhead.json (raw figures of every run); child logs go to
benchmarks/results/overhead-logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httptools

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "overhead.json"
LOG_DIR = RESULTS / "overhead-logs"

MODEL = "bench-model"
SMALL_TOKENS = 16
STREAM_TOKENS = 256
# What the simulator sends per streamed chat answer: a role event (sent with the first token),
# one event per token, a finish_reason event and `data: [DONE]`. CPU per chunk divides by this.
SSE_EVENTS = STREAM_TOKENS + 3
NOISE_CORES = 0.15  # other processes used more than this many cores on average: flag the run
WRK_TIMEOUT_S = 10

SCENARIOS: dict[str, tuple[str, int]] = {
    "small_c1": ("small", 1),
    "small_c64": ("small", 64),
    "stream_c32": ("stream", 32),
}
LABELS = {
    "small_c1": "chat, 16 tokens, c=1",
    "small_c64": "chat, 16 tokens, c=64",
    "stream_c32": "SSE, 256 chunks, c=32",
    "ttft": "TTFT, plain client, c=1",
    "startup": "spawn -> first proxied 200",
}

# wrk script (written to the log folder at run time): cycle through JSON bodies, one per line of
# $OVERHEAD_BODIES, POSTed to the URL's path; print one JSON line with the summary at the end.
WRK_LUA = r"""
local bodies = {}
local count = 0
local next_i = 0

init = function(args)
  local f = assert(io.open(os.getenv("OVERHEAD_BODIES"), "r"))
  for line in f:lines() do
    if #line > 0 then
      count = count + 1
      bodies[count] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, line)
    end
  end
  f:close()
end

request = function()
  next_i = next_i % count + 1
  return bodies[next_i]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'OVERHEAD_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"mean_us":%.1f,"max_us":%d,"err_connect":%d,"err_read":%d,'
    .. '"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

SUBJECTS = [
    "the billing export",
    "a flaky integration test",
    "the onboarding email",
    "quarterly capacity planning",
    "a slow database query",
    "the mobile release notes",
    "an expired TLS certificate",
    "the on-call handover",
]


def log(*parts: object) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# Child processes: every one is registered, started in its own session (a Ctrl-C in the terminal
# reaches only this script, which then stops them in order) with PR_SET_PDEATHSIG as a backstop,
# so none outlives the benchmark even if it is killed with SIGKILL.
# ------------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    parent = os.getpid()

    def setup() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Children:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cpus: set[int] | None = None,
        stdout: Path | None = None,
        extra_env: dict[str, str] | None = None,
        capture: bool = False,
    ) -> subprocess.Popen[bytes]:
        env = dict(self.env, **(extra_env or {}))
        with contextlib.ExitStack() as files:
            err = files.enter_context(open(log_path, "ab"))
            if capture:
                out: Any = subprocess.PIPE
            elif stdout is not None:
                out = files.enter_context(open(stdout, "wb"))
            else:
                out = err
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=REPO,
                start_new_session=True,
                preexec_fn=_child_setup(cpus),
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to `grace` s, then SIGKILL; plus any descendants it left behind."""
        if proc is None:
            return None
        descendants = proc_tree(proc.pid)[1:] if proc.poll() is None else []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc, grace=3.0)
            except Exception as exc:  # keep going: the others must still be stopped
                log(f"could not stop pid {proc.pid}: {exc!r}")


# ------------------------------------------------------------------------------------------------
# CPU accounting
# ------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
HAVE_SCHEDSTAT = Path("/proc/self/schedstat").exists()
CPU_METHOD = (
    "sum over threads of /proc/<pid>/task/*/schedstat run time (ns) of the gateway process tree, "
    "delta over the wrk run, divided by the requests wrk completed"
    if HAVE_SCHEDSTAT
    else "utime+stime from /proc/<pid>/stat (clock ticks) of the gateway process tree, delta over "
    "the wrk run, divided by the requests wrk completed"
)


def proc_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def stat_cpu_s(pid: int) -> float:
    """utime+stime of a process (includes its exited threads), seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_s(pids: Sequence[int], thread_prefix: str | None = None) -> float:
    """CPU time of these processes (all their threads, or only those whose name starts with
    ``thread_prefix``), seconds."""
    if not HAVE_SCHEDSTAT and thread_prefix is None:
        return sum(stat_cpu_s(p) for p in pids)
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            path = f"/proc/{pid}/task/{task}/"
            try:
                if thread_prefix and not Path(path + "comm").read_text().startswith(thread_prefix):
                    continue
                total += int(Path(path + "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def machine_busy_s() -> float:
    """user+nice+system time of the whole machine, seconds (irq/softirq left out, so the
    'other processes' figure derived from it is a lower bound)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / CLK_TCK


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------------------
# A small HTTP/1.1 client on a plain blocking socket (httptools parses the responses)
# ------------------------------------------------------------------------------------------------


class Response:
    __slots__ = ("body", "headers", "keep_alive", "status", "t_end", "t_first_data")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.keep_alive = True
        self.t_first_data: float | None = None
        self.t_end = 0.0


class _Collector:
    """httptools callbacks for one response."""

    def __init__(self, resp: Response) -> None:
        self.resp = resp
        self.parser: httptools.HttpResponseParser | None = None
        self.now = 0.0
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.resp.status = self.parser.get_status_code()
        # Must be read here: httptools answers False once the message is complete.
        self.resp.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        body = self.resp.body
        if self.resp.t_first_data is None and b"data:" in bytes(body[-8:]) + data:
            self.resp.t_first_data = self.now
        body += data

    def on_message_complete(self) -> None:
        self.complete = True


class HttpClient:
    """One keep-alive connection; reconnects when the server closes it. `nodelay=False` keeps
    the kernel defaults (Nagle on, delayed ACKs on): the 'plain client' of the TTFT scenario."""

    def __init__(self, port: int, *, timeout: float = 10.0, nodelay: bool = True) -> None:
        self.port = port
        self.timeout = timeout
        self.nodelay = nodelay
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        raw = head.encode() + payload
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            if self.nodelay:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.sock
        resp = Response()
        col = _Collector(resp)
        parser = httptools.HttpResponseParser(col)
        col.parser = parser
        deadline = time.monotonic() + self.timeout
        try:
            t0 = time.perf_counter()
            sock.sendall(raw)
            while not col.complete:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{method} {path}: no complete response in {self.timeout}s")
                data = sock.recv(262144)
                col.now = time.perf_counter()
                if not data:
                    raise ConnectionError(f"{method} {path}: connection closed mid-response")
                parser.feed_data(data)
        except BaseException:
            self.close()
            raise
        resp.t_end = col.now
        if resp.t_first_data is not None:
            resp.t_first_data -= t0
        resp.t_end -= t0
        if not resp.keep_alive:
            self.close()
        return resp


def http_once(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> Response:
    with HttpClient(port, timeout=timeout) as c:
        return c.request(method, path, body, headers)


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


def chat_body(i: int, *, stream: bool) -> dict[str, Any]:
    subject = SUBJECTS[i % len(SUBJECTS)]
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for an engineering team."},
            {"role": "user", "content": f"Request {i}: write a short status note on {subject}."},
        ],
        "max_tokens": STREAM_TOKENS if stream else SMALL_TOKENS,
        "ignore_eos": True,  # always the full token count, so every request is the same work
        "temperature": 0.0,
    }
    if stream:
        body["stream"] = True
    return body


def write_bodies(path: Path, *, stream: bool, n: int = 64) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(chat_body(i, stream=stream), separators=(",", ":")) + "\n")


def sse_events(body: bytes) -> list[bytes]:
    return [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]


def stream_text(events: list[bytes]) -> str:
    out = []
    for ev in events:
        if ev == b"[DONE]":
            continue
        for choice in json.loads(ev).get("choices", ()):
            out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Processes under test
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(
    children: Children, name: str, role: str = "pd"
) -> tuple[subprocess.Popen[bytes], str]:
    ready = LOG_DIR / f"{name}.stdout"
    argv = [sys.executable, "-m", "lmgw.simulators", "--role", role, "--port", "0"]
    argv += ["--model", MODEL, "--speed", "inf", "--log-level", "WARNING"]
    proc = children.spawn(argv, log_path=LOG_DIR / f"{name}.log", stdout=ready)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = ready.read_text() if ready.exists() else ""
        for line in text.splitlines():
            if line.startswith("READY "):
                return proc, line.split()[1]
        if proc.poll() is not None:
            raise BenchError(
                f"worker {name} exited with {proc.returncode}; see {LOG_DIR}/{name}.log"
            )
        time.sleep(0.05)
    raise BenchError(f"worker {name} printed no READY line in 30 s")


def log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in lines[-n:])


def ensure_workers(children: Children, ctx: dict[str, Any], deaths: list[dict[str, Any]]) -> None:
    """Start the workers (``ctx["roles"]``), or restart any that died (each death is recorded).
    Worker 1 is always a merged ``pd`` worker: the direct baseline."""
    roles = ctx["roles"]
    procs = ctx.setdefault("worker_procs", [None] * len(roles))
    for k in range(len(roles)):
        name = f"worker{k + 1}"
        proc = procs[k]
        if proc is not None and proc.poll() is None:
            continue
        if proc is not None:
            children.stop(proc)
            death = {
                "worker": name,
                "exit": proc.returncode,
                "log_tail": log_tail(LOG_DIR / f"{name}.log"),
            }
            deaths.append(death)
            log(f"{name} had died (exit {proc.returncode}): {death['log_tail'][:300]}; restarting")
            (LOG_DIR / f"{name}.log").rename(LOG_DIR / f"{name}-died-{len(deaths)}.log")
        procs[k], url = start_worker(children, name, roles[k])
        ctx.setdefault("worker_urls", [""] * len(roles))[k] = url
    urls = ctx["worker_urls"]
    ctx["worker_ports"] = [int(u.rsplit(":", 1)[1]) for u in urls]
    ctx["w1_port"] = ctx["worker_ports"][0]
    ctx["worker_pids"] = [p.pid for p in procs]


def dead_workers(ctx: dict[str, Any]) -> list[str]:
    return [
        f"worker{k + 1} (exit {p.returncode})"
        for k, p in enumerate(ctx.get("worker_procs", ()))
        if p is not None and p.poll() is not None
    ]


def gateway_workers(ctx: dict[str, Any]) -> list[str]:
    """The gateway's ``--worker`` values: both merged workers, or (P/D mode) the p and d
    workers with the dialect's options (a simulated prefill serves SGLang's bootstrap
    rendezvous on its HTTP port)."""
    specs = []
    for role, url in zip(ctx["roles"], ctx["worker_urls"], strict=True):
        if ctx["pd_dialect"] is None:
            specs.append(f"pd={url}")
        elif role == "p":
            specs.append(f"p={url},bootstrap_port={url.rsplit(':', 1)[1]}")
        elif role == "d":
            specs.append(f"d={url}")
    return specs


def gateway_argv(port: int, worker_specs: Sequence[str], dialect: str | None = None) -> list[str]:
    exe = Path(sys.executable).with_name("lmgw")
    cmd = str(exe) if exe.exists() else shutil.which("lmgw")
    if cmd is None:
        raise BenchError(
            "the `lmgw` command is not installed next to this Python (pip install -e .)"
        )
    argv = [cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
    for spec in worker_specs:
        argv += ["--worker", spec]
    if dialect is not None:
        argv += ["--dialect", dialect]
    return [*argv, "--log-level", "warning"]


def wait_first_proxied(
    proc: subprocess.Popen[bytes], port: int, t_spawn: float, timeout: float = 60.0
) -> dict[str, float]:
    """Poll until a proxied chat completion answers 200: seconds from spawn to the first
    accepted connection and to that 200."""
    t_listen = None
    deadline = t_spawn + timeout
    body = chat_body(0, stream=False)
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"lmgw serve exited with {proc.returncode} during startup")
        try:
            with HttpClient(port, timeout=5.0) as c:
                c.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
                if t_listen is None:
                    t_listen = time.perf_counter() - t_spawn
                resp = c.request("POST", "/v1/chat/completions", body)
            if resp.status == 200:
                return {"listen_s": t_listen, "first_200_s": time.perf_counter() - t_spawn}
        except (OSError, httptools.HttpParserError):
            pass
        time.sleep(0.005)
    raise BenchError(f"lmgw serve gave no 200 on a proxied request within {timeout:.0f} s")


def start_gateway(
    children: Children, ctx: dict[str, Any], tag: str
) -> tuple[subprocess.Popen[bytes], int, dict[str, float]]:
    port = free_port()
    log_path = LOG_DIR / f"gateway-{tag}.log"
    t_spawn = time.perf_counter()
    argv = gateway_argv(port, gateway_workers(ctx), ctx["pd_dialect"])
    proc = children.spawn(argv, log_path=log_path, cpus=ctx["gw_cpus"])
    timing = wait_first_proxied(proc, port, t_spawn)
    health = http_once(port, "GET", "/health")
    if health.status != 200:
        raise BenchError(f"gateway /health answered {health.status}: {bytes(health.body)[:300]!r}")
    return proc, port, timing


# ------------------------------------------------------------------------------------------------
# Observations around each run
# ------------------------------------------------------------------------------------------------


def worker_stats(ports: Sequence[int]) -> list[dict[str, int]]:
    out = []
    for port in ports:
        try:
            j = json.loads(bytes(http_once(port, "GET", "/sim/stats", timeout=3.0).body))
            out.append({k: j[k] for k in ("requests_total", "aborted_total", "dropped_total")})
        except (OSError, ValueError, KeyError):
            out.append({})
    return out


GW_METRICS = (
    "lmgw_requests_total",
    "lmgw_upstream_errors_total",
    "lmgw_retries_total",
    "lmgw_client_disconnects_total",
    "lmgw_worker_in_flight",
    "lmgw_worker_healthy",
)


def gateway_metrics(port: int) -> dict[str, float]:
    """The gateway's own counters that tell whether a run went cleanly (from GET /metrics)."""
    try:
        text = bytes(http_once(port, "GET", "/metrics", timeout=3.0).body).decode()
    except (OSError, httptools.HttpParserError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(GW_METRICS):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def tcp_peers(ports: set[int]) -> set[tuple[int, int]]:
    """(local port, remote port) of every TCP socket (any state, TIME_WAIT included) whose remote
    port is one of `ports`: connections opened *to* those servers in the last minute or so."""
    out: set[tuple[int, int]] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote = parts[1], parts[2]
            rport = int(remote.rsplit(":", 1)[1], 16)
            if rport in ports:
                out.add((int(local.rsplit(":", 1)[1], 16), rport))
    return out


# ------------------------------------------------------------------------------------------------
# Load runs
# ------------------------------------------------------------------------------------------------


def run_wrk(
    children: Children, url: str, bodies: Path, conns: int, duration: int, lua: Path
) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", f"{WRK_TIMEOUT_S}s"]
    argv += ["--latency", "-s", str(lua), url]
    before = children_cpu_s()
    proc = children.spawn(
        argv,
        log_path=LOG_DIR / "wrk.log",
        extra_env={"OVERHEAD_BODIES": str(bodies)},
        capture=True,
    )
    try:
        out, _ = proc.communicate(timeout=duration + WRK_TIMEOUT_S + 20)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        raise BenchError(f"wrk against {url} did not finish in time") from None
    children.stop(proc)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("OVERHEAD_WRK "):
            r = json.loads(line.split(" ", 1)[1])
            break
    else:
        err = log_tail(LOG_DIR / "wrk.log", 2)
        raise BenchError(f"wrk printed no summary (exit {proc.returncode}): {text[-1000:]} {err}")
    r["wrk_cpu_s"] = children_cpu_s() - before  # only wrk was reaped in between
    r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_timeout"))
    r["non_2xx"] = r["err_status"]  # wrk counts status >= 400 here
    r["rps"] = r["requests"] / max(r["duration_us"] / 1e6, 1e-9)
    r["bytes_per_req"] = r["bytes"] / max(r["requests"], 1)
    return r


def measured_run(
    children: Children,
    target: dict[str, Any],
    ctx: dict[str, Any],
    bodies: Path,
    conns: int,
    duration: int,
) -> dict[str, Any]:
    gw_tree = proc_tree(ctx["gw_pid"])
    gw_port = ctx.get("gw_port")
    met0 = gateway_metrics(gw_port) if gw_port else {}
    worker_pids = ctx["worker_pids"]
    stats0 = worker_stats(ctx["worker_ports"])
    peers0 = tcp_peers(set(ctx["worker_ports"]))
    gw0, gw_stat0 = cpu_s(gw_tree), sum(stat_cpu_s(p) for p in gw_tree)
    w0, me0, m0 = cpu_s(worker_pids), cpu_s([os.getpid()]), machine_busy_s()
    t0 = time.perf_counter()
    r = run_wrk(children, target["url"], bodies, conns, duration, ctx["lua"])
    wall = time.perf_counter() - t0
    gw1, gw_stat1 = cpu_s(gw_tree), sum(stat_cpu_s(p) for p in gw_tree)
    w1, me1, m1 = cpu_s(worker_pids), cpu_s([os.getpid()]), machine_busy_s()
    stats1 = worker_stats(ctx["worker_ports"])
    peers1 = tcp_peers(set(ctx["worker_ports"]))
    n = max(r["requests"], 1)
    r["wall_s"] = wall
    r["gw_cpu_s"] = gw1 - gw0
    r["gw_cpu_stat_s"] = gw_stat1 - gw_stat0
    r["worker_cpu_s"] = w1 - w0
    r["self_cpu_s"] = me1 - me0
    r["machine_busy_s"] = m1 - m0
    ours = r["gw_cpu_s"] + r["worker_cpu_s"] + r["wrk_cpu_s"] + r["self_cpu_s"]
    r["other_cpu_s"] = max(0.0, r["machine_busy_s"] - ours)
    r["other_cores"] = r["other_cpu_s"] / wall
    r["gw_cpu_us_per_req"] = r["gw_cpu_s"] / n * 1e6
    r["gw_util_cores"] = r["gw_cpu_s"] / wall
    r["worker_cpu_us_per_req"] = r["worker_cpu_s"] / n * 1e6
    r["wrk_cpu_us_per_req"] = r["wrk_cpu_s"] / n * 1e6
    r["worker_requests"] = [
        a.get("requests_total", 0) - b.get("requests_total", 0)
        for a, b in zip(stats1, stats0, strict=True)
    ]
    r["worker_aborted"] = [
        a.get("aborted_total", 0) - b.get("aborted_total", 0)
        for a, b in zip(stats1, stats0, strict=True)
    ]
    # new connections to the workers during the run: wrk's own (direct) or the gateway's upstream
    r["conns_to_workers"] = len(peers1 - peers0)
    if gw_port:
        met1 = gateway_metrics(gw_port)
        # in flight before the run: not 0 means a leaked count (the last run ended > 0.3 s ago)
        r["gw_in_flight_before"] = sum(v for k, v in met0.items() if "in_flight" in k)
        r["gw_unhealthy_after"] = [k for k, v in met1.items() if "healthy" in k and v != 1]
        r["gw_counters"] = {
            k: v - met0.get(k, 0.0)
            for k, v in met1.items()
            if "_total" in k and v != met0.get(k, 0.0)
        }
    return r


def percentile(xs: Sequence[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ttft_probe(port: int, n: int) -> dict[str, Any]:
    """`n` streamed requests over one keep-alive plain socket (no TCP_NODELAY, delayed ACKs on);
    time from sending each request to the first `data:` line, and to the end of the stream.
    A failed request is recorded (with how long it took) and the next one reconnects."""
    ttft, total, events, failures = [], [], [], []
    with HttpClient(port, timeout=10.0, nodelay=False) as c:
        for i in range(n):
            t0 = time.perf_counter()
            try:
                resp = c.request("POST", "/v1/chat/completions", chat_body(i, stream=True))
            except (OSError, httptools.HttpParserError) as exc:
                failures.append(f"request {i}: {exc!r} after {time.perf_counter() - t0:.3f} s")
                continue
            if resp.status != 200 or resp.t_first_data is None:
                failures.append(f"request {i}: status {resp.status}: {bytes(resp.body)[:200]!r}")
                continue
            ttft.append(resp.t_first_data * 1e6)
            total.append(resp.t_end * 1e6)
            events.append(len(sse_events(bytes(resp.body))))
    return {
        "n": len(ttft),
        "p50_us": percentile(ttft, 50),
        "p90_us": percentile(ttft, 90),
        "max_us": max(ttft) if ttft else None,
        "over_20ms": sum(1 for x in ttft if x > 20_000),
        "total_p50_us": percentile(total, 50),
        "events_per_stream": sorted(set(events)),
        "failures": failures,
        "samples_us": [round(x, 1) for x in ttft],
    }


def check_answers(gw_port: int, direct_port: int) -> dict[str, Any]:
    """The gateway must answer exactly what the worker answers (the simulator's output is a
    deterministic function of the prompt), with every SSE event relayed."""
    out: dict[str, Any] = {"problems": []}
    answers = {}
    for name, port in (("direct", direct_port), ("gateway", gw_port)):
        small = http_once(port, "POST", "/v1/chat/completions", chat_body(3, stream=False))
        stream = http_once(port, "POST", "/v1/chat/completions", chat_body(3, stream=True))
        if small.status != 200 or stream.status != 200:
            out["problems"].append(f"{name}: status {small.status}/{stream.status}")
            continue
        j = json.loads(bytes(small.body))
        evs = sse_events(bytes(stream.body))
        answers[name] = {
            "text": j["choices"][0]["message"]["content"],
            "completion_tokens": j["usage"]["completion_tokens"],
            "events": len(evs),
            "done_last": bool(evs) and evs[-1] == b"[DONE]",
            "stream_text": stream_text(evs),
            "stream_content_type": stream.headers.get(b"content-type", b"").decode(),
        }
    out.update(
        {k: {kk: vv for kk, vv in v.items() if "text" not in kk} for k, v in answers.items()}
    )
    if len(answers) == 2:
        d, g = answers["direct"], answers["gateway"]
        if d["completion_tokens"] != SMALL_TOKENS:
            out["problems"].append(f"worker returned {d['completion_tokens']} tokens, not 16")
        if d["events"] != SSE_EVENTS:
            out["problems"].append(f"worker sent {d['events']} SSE events, expected {SSE_EVENTS}")
        for key in ("text", "completion_tokens", "events", "done_last", "stream_text"):
            if d[key] != g[key]:
                out["problems"].append(f"gateway differs from direct in {key}")
    return out


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------


def med(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(rounds: list[dict[str, Any]], startup: list[dict[str, float]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for sc in SCENARIOS:
        pairs = [r["runs"][sc] for r in rounds if sc in r["runs"]]
        if not pairs:
            continue
        s: dict[str, Any] = {}
        for target in ("direct", "gateway"):
            runs = [p[target] for p in pairs]
            s[target] = {
                k: med([x[k] for x in runs])
                for k in (
                    "rps",
                    "p50_us",
                    "p90_us",
                    "p99_us",
                    "bytes_per_req",
                    "worker_cpu_us_per_req",
                )
            }
            s[target]["errors"] = sum(x["errors"] for x in runs)
            s[target]["non_2xx"] = sum(x["non_2xx"] for x in runs)
            s[target]["max_other_cores"] = max(x["other_cores"] for x in runs)
        gw = [p["gateway"] for p in pairs]
        s["added_p50_us"] = med([p["gateway"]["p50_us"] - p["direct"]["p50_us"] for p in pairs])
        s["added_p99_us"] = med([p["gateway"]["p99_us"] - p["direct"]["p99_us"] for p in pairs])
        s["rps_ratio"] = med([p["gateway"]["rps"] / max(p["direct"]["rps"], 1e-9) for p in pairs])
        s["gw_cpu_us_per_req"] = med([x["gw_cpu_us_per_req"] for x in gw])
        s["gw_cpu_us_per_req_min"] = min(x["gw_cpu_us_per_req"] for x in gw)
        s["gw_util_cores"] = med([x["gw_util_cores"] for x in gw])
        if sc.startswith("stream"):
            s["sse_events_per_req"] = SSE_EVENTS
            s["gw_cpu_us_per_chunk"] = s["gw_cpu_us_per_req"] / SSE_EVENTS
            s["gw_cpu_us_per_token_chunk"] = s["gw_cpu_us_per_req"] / STREAM_TOKENS
        s["gw_conns_to_workers"] = [x["conns_to_workers"] for x in gw]
        s["gw_worker_split"] = [x["worker_requests"] for x in gw]
        s["noisy"] = (
            max(s["direct"]["max_other_cores"], s["gateway"]["max_other_cores"]) > NOISE_CORES
        )
        summary[sc] = s
    tt = [r["ttft"] for r in rounds if "ttft" in r]
    if tt:
        s = {}
        for target in ("direct", "gateway"):
            s[target] = {
                "p50_us": med([t[target]["p50_us"] for t in tt]),
                "p90_us": med([t[target]["p90_us"] for t in tt]),
                "n": sum(t[target]["n"] for t in tt),
                "over_20ms": sum(t[target]["over_20ms"] for t in tt),
            }
        s["added_p50_us"] = med([t["gateway"]["p50_us"] - t["direct"]["p50_us"] for t in tt])
        s["added_p90_us"] = med([t["gateway"]["p90_us"] - t["direct"]["p90_us"] for t in tt])
        summary["ttft"] = s
    if startup:
        summary["startup"] = {
            "first_200_s": med([x["first_200_s"] for x in startup]),
            "listen_s": med([x["listen_s"] for x in startup]),
            "spawns": len(startup),
        }
    return summary


def fmt(x: float | None, spec: str = ",.0f", sign: bool = False) -> str:
    if x is None:
        return "-"
    s = format(x, spec)
    return f"+{s}" if sign and x >= 0 else s


def two(a: float | None, b: float | None, sign: bool = False) -> str:
    return f"{fmt(a, ',.0f', sign)} / {fmt(b, ',.0f', sign)} µs"


def table(summary: dict[str, Any]) -> str:
    head = (
        "| scenario | direct req/s | gateway req/s | ratio | direct p50 / p99 | gateway p50 / p99 "
        "| added p50 / p99 | gateway CPU | noise |"
    )
    rows = [head, "|" + "---|" * 9]
    for sc in SCENARIOS:
        s = summary.get(sc)
        if s is None:
            continue
        d, g = s["direct"], s["gateway"]
        other = max(d["max_other_cores"], g["max_other_cores"])
        noise = f"NOISY ({other:.2f})" if s["noisy"] else f"ok ({other:.2f})"
        if sc.startswith("stream"):
            cpu = f"{s['gw_cpu_us_per_chunk']:.1f} µs/chunk ({s['gw_cpu_us_per_req']:,.0f} µs/req)"
        else:
            cpu = f"{s['gw_cpu_us_per_req']:,.1f} µs/req"
        rows.append(
            f"| {LABELS[sc]} | {fmt(d['rps'])} | {fmt(g['rps'])} | {fmt(s['rps_ratio'], '.2f')} "
            f"| {two(d['p50_us'], d['p99_us'])} | {two(g['p50_us'], g['p99_us'])} "
            f"| {two(s['added_p50_us'], s['added_p99_us'], True)} "
            f"| {cpu} | {noise} |"
        )
    t = summary.get("ttft")
    if t:
        d, g = t["direct"], t["gateway"]
        rows.append(
            f"| {LABELS['ttft']} (p50 / p90, n={g['n']}) | - | - | - "
            f"| {two(d['p50_us'], d['p90_us'])} | {two(g['p50_us'], g['p90_us'])} "
            f"| {two(t['added_p50_us'], t['added_p90_us'], True)} "
            "| - | - |"
        )
    st = summary.get("startup")
    if st:
        rows.append(
            f"| {LABELS['startup']} (median of {st['spawns']}) | - | - | - | - "
            f"| {st['first_200_s']:.2f} s (port open {st['listen_s']:.2f} s) | - | - | - |"
        )
    return "\n".join(rows)


def notes(summary: dict[str, Any], meta: dict[str, Any], anomalies: list[str]) -> str:
    lines = [
        f"Medians of {meta['rounds']} round(s), {meta['duration_s']} s per wrk run (1 thread), "
        f"layout: {meta['layout_text']}; nproc {meta['nproc']}; commit {meta['git']['commit']}"
        f"{' (dirty tree)' if meta['git']['dirty'] else ''}.",
        "added = gateway minus direct, and ratio = gateway/direct req/s, paired within each round "
        "(the median over rounds is shown).",
        f"Gateway CPU: {CPU_METHOD}. SSE: per chunk = per request / {SSE_EVENTS} events "
        f"(role + {STREAM_TOKENS} tokens + finish + [DONE]; the simulator sends the role event in "
        "the same write as the first token).",
        "noise: the most CPU (cores, averaged over a wrk run) that processes outside the "
        f"benchmark used during the scenario's runs; NOISY above {NOISE_CORES} (from /proc/stat "
        "minus our processes, irq/softirq left out).",
    ]
    for sc in SCENARIOS:
        s = summary.get(sc)
        if s is None:
            continue
        other = max(s["direct"]["max_other_cores"], s["gateway"]["max_other_cores"])
        lines.append(
            f"{sc}: gateway util {fmt(s['gw_util_cores'], '.2f')} cores; worker CPU µs/req "
            f"direct {fmt(s['direct']['worker_cpu_us_per_req'], '.1f')} / via gateway "
            f"{fmt(s['gateway']['worker_cpu_us_per_req'], '.1f')}; "
            f"worker split {s['gw_worker_split']}; "
            f"gateway upstream conns opened {s['gw_conns_to_workers']}; errors "
            f"{s['direct']['errors']}/{s['gateway']['errors']}, non-2xx "
            f"{s['direct']['non_2xx']}/{s['gateway']['non_2xx']} (direct/gateway); "
            f"max other load {other:.2f} cores"
        )
    if anomalies:
        lines.append("ANOMALIES:")
        lines += [f"  - {a}" for a in anomalies]
    else:
        lines.append("No anomalies: no errors or non-2xx, answers identical to direct.")
    return "\n".join(lines)


def find_anomalies(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    out = []
    for r in rounds:
        i = r["round"]
        for p in r["checks"]["problems"]:
            out.append(f"round {i}: answer check: {p}")
        for sc, pair in r["runs"].items():
            conns = SCENARIOS[sc][1]
            for target, run in pair.items():
                if run["errors"] or run["non_2xx"]:
                    out.append(
                        f"round {i} {sc} {target}: {run['errors']} socket errors "
                        f"(connect {run['err_connect']}, read {run['err_read']}, write "
                        f"{run['err_write']}, timeout {run['err_timeout']}), "
                        f"{run['non_2xx']} non-2xx"
                    )
                if run["max_us"] > 1_000_000:
                    out.append(
                        f"round {i} {sc} {target}: slowest request {run['max_us'] / 1e6:.2f} s"
                    )
            g, d = pair["gateway"], pair["direct"]
            if g.get("gw_in_flight_before"):
                out.append(
                    f"round {i} {sc}: gateway reported {g['gw_in_flight_before']:.0f} requests in "
                    "flight before the run started (leaked in-flight count?)"
                )
            for target, run in pair.items():
                if run.get("gw_unhealthy_after"):
                    out.append(
                        f"round {i} {sc} {target}: the gateway marked workers unroutable: "
                        f"{run['gw_unhealthy_after']}"
                    )
            # wrk stops with up to `conns` requests in flight: those end as 499 (client gone)
            bad = {
                k: v
                for k, v in g.get("gw_counters", {}).items()
                if "upstream_errors" in k
                or "retries" in k
                or ("requests_total" in k and 'status="200"' not in k and 'status="499"' not in k)
                or ('status="499"' in k and v > conns)
            }
            if bad:
                out.append(f"round {i} {sc}: gateway counters during the run: {bad}")
            if g["conns_to_workers"] > 4 * conns + 8:
                out.append(
                    f"round {i} {sc}: gateway opened {g['conns_to_workers']} upstream connections "
                    f"for {g['requests']} requests at c={conns} (keep-alive not reused?)"
                )
            # sizes differ a little anyway: the worker builds its completion ids from the
            # x-request-id it receives, and the gateway's ids are shorter than the worker's own
            if d["bytes_per_req"] and abs(g["bytes_per_req"] / d["bytes_per_req"] - 1) > 0.3:
                out.append(
                    f"round {i} {sc}: response size differs: gateway {g['bytes_per_req']:.0f} B vs "
                    f"direct {d['bytes_per_req']:.0f} B per request"
                )
            split = g["worker_requests"]
            if len(split) == 2 and sum(split) > 100 and min(split) < 0.25 * sum(split):
                out.append(f"round {i} {sc}: uneven worker split {split}")
        for target in ("direct", "gateway"):
            t = r["ttft"][target]
            for f in t["failures"][:3]:
                out.append(f"round {i} ttft {target}: {f}")
            if t["events_per_stream"] and t["events_per_stream"] != [SSE_EVENTS]:
                out.append(
                    f"round {i} ttft {target}: SSE events per stream {t['events_per_stream']}, "
                    f"expected {SSE_EVENTS}"
                )
            if t["over_20ms"]:
                out.append(
                    f"round {i} ttft {target}: {t['over_20ms']}/{t['n']} first chunks took >20 ms "
                    "(delayed-ACK/Nagle stall?)"
                )
        if r.get("gateway_died_early"):
            out.append(f"round {i}: the gateway died (exit {r['gateway_exit']}) before the end")
        elif r.get("gateway_exit") not in (0, None):
            out.append(f"round {i}: gateway exited with {r['gateway_exit']} on SIGTERM")
        if r.get("gateway_log"):
            out.append(f"round {i}: gateway logged: {r['gateway_log'][-1][:300]}")
    return out


# ------------------------------------------------------------------------------------------------
# Main flow
# ------------------------------------------------------------------------------------------------


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(dirty),
        "modified": [line.split(maxsplit=1)[-1] for line in dirty.splitlines()],
    }


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10).stdout
    return {
        "nproc": os.cpu_count(),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_v.splitlines()[0] if wrk_v else "",
        "loadavg_start": os.getloadavg(),
    }


def gateway_log_lines(tag: str) -> list[str]:
    path = LOG_DIR / f"gateway-{tag}.log"
    try:
        return [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []


def run_round(
    i: int, children: Children, args: argparse.Namespace, ctx: dict[str, Any], attempt: int = 0
) -> dict[str, Any]:
    tag = f"r{i}" if attempt == 0 else f"r{i}-retry{attempt}"
    proc, port, timing = start_gateway(children, ctx, tag)
    rec: dict[str, Any] = {"round": i, "attempt": attempt, "gateway_start": timing, "runs": {}}
    try:
        ctx["gw_pid"] = proc.pid
        ctx["gw_port"] = port
        targets = {
            "direct": {
                "url": f"{ctx['worker_urls'][0]}/v1/chat/completions",
                "port": ctx["w1_port"],
            },
            "gateway": {"url": f"http://127.0.0.1:{port}/v1/chat/completions", "port": port},
        }
        order = ["direct", "gateway"] if i % 2 == 0 else ["gateway", "direct"]
        rec["order"] = order
        rec["checks"] = check_answers(port, ctx["w1_port"])
        for name in order:  # warm up pools, caches and the JIT-less interpreter paths
            for pool, conns in (("small", 64), ("stream", 32)):
                run_wrk(children, targets[name]["url"], ctx["bodies"][pool], conns, 1, ctx["lua"])
        rec["ttft"] = {name: ttft_probe(targets[name]["port"], args.ttft_n) for name in order}
        for sc, (pool, conns) in SCENARIOS.items():
            pair = {}
            for name in order:
                time.sleep(0.3)  # let the previous run's connections close
                r = measured_run(
                    children, targets[name], ctx, ctx["bodies"][pool], conns, args.duration
                )
                pair[name] = r
                log(
                    f"round {i} {sc:10s} {name:7s} {r['rps']:9,.0f} req/s  p50 {r['p50_us']:7,} µs"
                    f"  p99 {r['p99_us']:8,} µs  gw CPU {r['gw_cpu_us_per_req']:8.1f} µs/req"
                    f"  err {r['errors']}/{r['non_2xx']}  other {r['other_cores']:.2f} cores"
                )
            rec["runs"][sc] = pair
        t = rec["ttft"]
        log(
            f"round {i} ttft p50 direct {t['direct']['p50_us']:.0f} µs, gateway "
            f"{t['gateway']['p50_us']:.0f} µs; checks: {rec['checks']['problems'] or 'ok'}"
        )
    except Exception as exc:
        if proc.poll() is not None:
            tail = log_tail(LOG_DIR / f"gateway-{tag}.log")
            raise BenchError(f"the gateway died (exit {proc.returncode}): {tail}") from exc
        raise
    finally:
        rec["gateway_died_early"] = proc.poll() is not None
        rec["gateway_exit"] = children.stop(proc)
        rec["gateway_log"] = gateway_log_lines(tag)[-20:]
    return rec


def measure_startup(children: Children, args: argparse.Namespace, ctx: dict[str, Any]) -> list:
    samples = []
    for k in range(args.startup_spawns):
        proc, _port, timing = start_gateway(children, ctx, f"s{k}")
        children.stop(proc)
        samples.append(timing)
        log(f"startup {k}: first proxied 200 after {timing['first_200_s']:.3f} s")
        time.sleep(0.2)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 round, 2 s runs, 20 TTFT samples")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--duration", type=int, default=None, help="s per wrk run (4; --quick: 2)")
    ap.add_argument("--ttft-n", type=int, default=None, help="TTFT requests (60; --quick: 20)")
    ap.add_argument("--startup-spawns", type=int, default=3)
    ap.add_argument("--layout", choices=("pinned", "none"), default="pinned")
    ap.add_argument(
        "--retries", type=int, default=2, help="re-run a failed round this often (default 2)"
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for this script and every process it starts (e.g. -5 on a box shared "
        "with other load; needs privileges; recorded in the JSON)",
    )
    ap.add_argument(
        "--pd",
        metavar="DIALECT",
        choices=("vllm-nixl", "sglang-bootstrap"),
        help="P/D mode: the gateway runs prefill + decode workers with this dialect; the direct "
        "baseline is a merged worker (same text). Default out: benchmarks/results/overhead-pd-"
        "DIALECT.json",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = OUT_JSON if args.pd is None else RESULTS / f"overhead-pd-{args.pd}.json"
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 2 if args.quick else 4
    if args.ttft_n is None:
        args.ttft_n = 20 if args.quick else 60
    if min(args.rounds, args.duration, args.ttft_n, args.startup_spawns) < 1:
        ap.error("--rounds, --duration, --ttft-n and --startup-spawns must be >= 1")

    if shutil.which("wrk") is None:
        print(
            "overhead.py needs wrk (HTTP load generator). Install it with:\n"
            "    apt-get install -y wrk        # Debian/Ubuntu (sudo if not root)\n"
            "`make bench` installs it when missing.",
            file=sys.stderr,
        )
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in LOG_DIR.iterdir():
        if old.is_file():
            old.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    if args.nice:
        os.nice(args.nice)  # inherited by every child
    allowed = sorted(os.sched_getaffinity(0))
    if args.layout == "pinned" and len(allowed) >= 2:
        gen_cpus, gw_cpus = {allowed[0]}, {allowed[1]}
        os.sched_setaffinity(0, gen_cpus)  # inherited by the workers and wrk
        layout_text = (
            f"gateway on CPU {allowed[1]}; wrk, workers and this script on CPU {allowed[0]}"
        )
    else:
        gen_cpus = gw_cpus = None
        layout_text = "no pinning" + (" (fewer than 2 CPUs)" if args.layout == "pinned" else "")

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    children = Children(env)
    lua = LOG_DIR / "wrk_bodies.lua"
    lua.write_text(WRK_LUA)
    bodies = {"small": LOG_DIR / "bodies_small.jsonl", "stream": LOG_DIR / "bodies_stream.jsonl"}
    write_bodies(bodies["small"], stream=False)
    write_bodies(bodies["stream"], stream=True)

    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "benchmark": "overhead" if args.pd is None else f"overhead-pd-{args.pd}",
        "pd_dialect": args.pd,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "ttft_n": args.ttft_n,
        "startup_spawns": args.startup_spawns,
        "quick": args.quick,
        "layout": args.layout,
        "layout_text": layout_text,
        "nice": args.nice,
        "nproc": os.cpu_count(),
        "git": git_info(),
        "machine": machine_info(),
        "cpu_method": CPU_METHOD,
        "sse_events_per_request": SSE_EVENTS,
        "stream_tokens": STREAM_TOKENS,
        "small_tokens": SMALL_TOKENS,
        "noise_threshold_cores": NOISE_CORES,
        "wrk_lua": WRK_LUA,
    }
    rounds: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    deaths: list[dict[str, Any]] = []
    startup: list[dict[str, float]] = []
    status = 0
    try:
        ctx: dict[str, Any] = {
            "gw_cpus": gw_cpus,
            "lua": lua,
            "bodies": bodies,
            "pd_dialect": args.pd,
            "roles": ["pd", "pd"] if args.pd is None else ["pd", "p", "d"],
        }
        ensure_workers(children, ctx, deaths)
        log(f"workers: {', '.join(ctx['worker_urls'])}; {layout_text}")
        startup = measure_startup(children, args, ctx)
        for i in range(args.rounds):
            for attempt in range(args.retries + 1):
                ensure_workers(children, ctx, deaths)
                try:
                    rounds.append(run_round(i, children, args, ctx, attempt))
                    break
                except (OSError, httptools.HttpParserError, BenchError, ValueError, KeyError):
                    err = traceback.format_exc()
                    dead = dead_workers(ctx)
                    last = err.strip().splitlines()[-1]
                    log(f"round {i} attempt {attempt} FAILED (dead: {dead or 'none'}): {last}")
                    failed.append(
                        {"round": i, "attempt": attempt, "dead_workers": dead, "error": err}
                    )
            else:
                status = 1
    except KeyboardInterrupt:
        log("interrupted: stopping every child process")
        status = 130
    except SystemExit as exc:
        log("terminated: stopping every child process")
        status = exc.code if isinstance(exc.code, int) else 1
    except BenchError as exc:
        log(f"FAILED: {exc}")
        status = 1
    except Exception:
        log(f"FAILED:\n{traceback.format_exc()}")
        status = 1
    finally:
        # a second Ctrl-C or SIGTERM must not cut the cleanup short
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        children.stop_all()

    meta["runtime_s"] = round(time.perf_counter() - t_start, 1)
    meta["complete"] = status == 0
    summary = summarize(rounds, startup)
    anomalies = find_anomalies(rounds, summary)
    anomalies += [
        f"round {f['round']} attempt {f['attempt']} failed: "
        f"{f['error'].strip().splitlines()[-1][:300]}; dead workers: {f['dead_workers'] or 'none'}"
        for f in failed
    ]
    anomalies += [
        f"{d['worker']} died (exit {d['exit']}) and was restarted: {d['log_tail'][:300]}"
        for d in deaths
    ]
    result = {
        "meta": meta,
        "summary": summary,
        "anomalies": anomalies,
        "startup": startup,
        "rounds": rounds,
        "failed_rounds": failed,
        "worker_deaths": deaths,
    }
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if rounds:
        print()
        print(table(summary))
        print()
        print(notes(summary, meta, anomalies))
    elif anomalies:
        print("No complete round. ANOMALIES:\n" + "\n".join(f"  - {a}" for a in anomalies))
    log(f"wrote {args.out} ({meta['runtime_s']} s); child logs in {LOG_DIR}")
    return status


if __name__ == "__main__":
    sys.exit(main())
