"""A vLLM server run with ``--data-parallel-size N``: one HTTP API in front of N engines.

Each rank is a :class:`~.app.SimWorker` of its own (its own prefix cache, request slots,
counters and KV event publisher), as each vLLM data-parallel rank is an engine core with its
own KV cache. A request carrying ``X-data-parallel-rank: r`` runs on rank r (vLLM's header; a
rank that is not a number or out of range is a 400). One without it goes where vLLM's own
balancer would send it: the rank with the fewest requests in flight (vLLM weighs its engines'
waiting and running requests; neither looks at what a rank has cached, which is why a gateway
that knows the ranks can do better: docs/routing.md, "Data-parallel ranks").

``/metrics`` lists every rank's samples, labelled ``engine="<rank>"`` as vLLM labels them;
``/sim/stats`` gives each rank's; ``/sim/faults`` and ``/sim/reset`` apply to all of them.
Merged, prefill and decode workers: a decode rank's KV fetch (``/sim/kv/<key>``, the side
channel) reaches the prefill rank that holds the key, as NIXL reaches the engine that
prefilled.
"""

from __future__ import annotations

import dataclasses
import random
import socket
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec
import trio

from lmgw.config import rank_endpoint
from lmgw.errors import error_body
from lmgw.http.server import serve_http
from lmgw.http.types import Request, Responder

from .app import MAX_KV_WAIT_S, SimWorker, WorkerOptions

_RANK = b"x-data-parallel-rank"
_KV = "/sim/kv/"
_JSON = (b"content-type", b"application/json")
#: answered by every rank at once, or by rank 0 (nothing a rank holds differs there)
_ALL_RANKS = frozenset({"/metrics", "/sim/stats", "/sim/faults", "/sim/reset"})
_FIRST_RANK = frozenset({"/health", "/v1/models", "/version"})


class _Pin(msgspec.Struct):
    """The rank fields of SGLang's ``GenerateReqInput``."""

    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None


_pin_decoder = msgspec.json.Decoder(_Pin)


class DataParallelSim:
    """The ranks of one simulated data-parallel server and the front that dispatches to them."""

    def __init__(self, options: WorkerOptions, size: int) -> None:
        if not 1 <= size <= 64:
            raise ValueError("data_parallel_size must be 1..64")
        if options.role not in ("pd", "p", "d") or options.kv_port is not None:
            raise ValueError(
                "data-parallel ranks are simulated for merged, prefill and decode workers"
                " whose KV moves over the HTTP side channel (no --kv-port)"
            )
        if options.handoff != "direct":
            raise ValueError("data-parallel ranks hand KV off directly (--handoff direct)")
        self.options = options
        events = options.kv_events
        if events and size > 1 and events.startswith("tcp://") and events.endswith(":0"):
            # a free base port with the next size - 1 free too: rank r at base + r, as vLLM
            host = events[len("tcp://") : -2]
            events = f"tcp://{host}:{free_port_run(host, size)}"
        self.ranks = [
            SimWorker(
                dataclasses.replace(
                    options, dp_rank=r, kv_events=rank_endpoint(events, r) if events else None
                )
            )
            for r in range(size)
        ]
        #: requests each rank took because the header named it, and because the balancer chose it
        self.pinned = [0] * size
        self.balanced = [0] * size
        self._in_flight = [0] * size
        self._start = 0

    def pick(self, request: Request) -> int:
        """The rank a request runs on: the one it names, else the fewest in flight (ties from
        a rotating start). ValueError for a rank that is not one. The OpenAI routes read
        ``X-data-parallel-rank`` (vLLM; SGLang too); SGLang's ``/generate`` reads only its
        body's ``routed_dp_rank`` (or the older ``data_parallel_rank``)."""
        named: Any = None
        if request.path.endswith("/generate"):
            try:
                pin = _pin_decoder.decode(request.body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                pin = None  # the rank answers the body's error
            if pin is not None:
                named = (
                    pin.routed_dp_rank if pin.routed_dp_rank is not None else pin.data_parallel_rank
                )
        else:
            named = next((v for k, v in request.headers if k == _RANK), None)
        if named is not None:
            try:
                rank = int(named)
            except ValueError:
                raise ValueError(f"X-data-parallel-rank {named[:32]!r} is not a number") from None
            if not 0 <= rank < len(self.ranks):
                raise ValueError(
                    f"X-data-parallel-rank {rank} is out of range (0..{len(self.ranks) - 1})"
                )
            self.pinned[rank] += 1
            return rank
        n = len(self.ranks)
        loads = self._in_flight
        best = self._start % n
        for i in range(n):
            r = (self._start + i) % n
            if loads[r] < loads[best]:
                best = r
        self._start += 1
        self.balanced[best] += 1
        return best

    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.path
        if path.startswith(_KV):  # a decode worker fetching KV: from the rank that holds it
            await self.ranks[await self._holder(path, request.query)](request, responder)
            return
        if path in _ALL_RANKS:
            await self._all(request, responder)
            return
        if path in _FIRST_RANK:
            await self.ranks[0](request, responder)
            return
        try:
            rank = self.pick(request)
        except ValueError as exc:
            body = error_body(400, str(exc))
            await responder.send_full(400, [_JSON], body)
            return
        self._in_flight[rank] += 1
        try:
            await self.ranks[rank](request, responder)
        finally:
            self._in_flight[rank] -= 1

    async def _holder(self, path: str, query: str) -> int:
        """The rank whose KV store holds the side channel's key, or the first to publish it
        within the fetch's ``wait_s`` (a decode that came first, SGLang's way); else rank 0,
        which answers the 404. Each rank is an engine with its own store, as in vLLM."""
        key = unquote(path[len(_KV) :])
        try:
            wait = float(parse_qs(query).get("wait_s", ["0"])[0])
        except ValueError:
            wait = 0.0
        with trio.move_on_after(min(MAX_KV_WAIT_S, max(0.0, wait))):
            while True:
                now = trio.current_time()
                for r, w in enumerate(self.ranks):
                    if w.kv_store.get(key, now) is not None:
                        return r
                await trio.sleep(0.002)
        return 0

    async def _all(self, request: Request, responder: Responder) -> None:
        path = request.path
        if path == "/metrics":
            body = merge_metrics([w.metrics_text() for w in self.ranks]).encode()
            await responder.send_full(200, [(b"content-type", b"text/plain; version=0.0.4")], body)
            return
        if path == "/sim/stats":
            stats = [await _answer(w, request) for w in self.ranks]
            body = msgspec.json.encode(
                {"ranks": stats, "pinned": self.pinned, "balanced": self.balanced}
            )
            await responder.send_full(200, [_JSON], body)
            return
        for w in self.ranks[1:]:  # faults and resets: every rank, rank 0 answers
            await _answer(w, request)
        await self.ranks[0](request, responder)

    def close(self) -> None:
        for w in self.ranks:
            w.close()


def free_port_run(host: str, n: int, tries: int = 50) -> int:
    """A port p such that p .. p + n - 1 are all free on ``host`` now (bound and released)."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no {n} consecutive free ports on {host}")


class _Collect:
    """A responder that keeps a whole answer (the front asks each rank for its part)."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.started = self.finished = False

    async def send_full(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.body, self.started, self.finished = status, body, True, True

    async def start(self, status: int, headers: Any) -> None:
        self.status, self.started = status, True

    async def send(self, data: bytes) -> None:
        self.body += data

    async def end(self, data: bytes = b"") -> None:
        self.body += data
        self.finished = True


async def _answer(worker: SimWorker, request: Request) -> Any:
    out = _Collect()
    await worker(request, out)  # type: ignore[arg-type]
    return msgspec.json.decode(out.body) if out.body else None


def merge_metrics(texts: list[str]) -> str:
    """Prometheus texts of several engines as one exposition: each family's ``# HELP`` and
    ``# TYPE`` once, its samples from every engine together (the format wants a family's
    lines in one group), families in first-seen order."""
    families: dict[str, list[str]] = {}
    heads: dict[str, list[str]] = {}
    for text in texts:
        name = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                head = heads.setdefault(name, [])
                if line not in head:
                    head.append(line)
                families.setdefault(name, [])
            elif line and not line.startswith("#"):
                families.setdefault(name, []).append(line)
    out: list[str] = []
    for name, samples in families.items():
        out.extend(heads.get(name, ()))
        out.extend(samples)
    return "\n".join(out) + "\n"


async def serve_dp_inprocess(
    sim: DataParallelSim,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    **limits: float,
) -> None:
    """Serve a data-parallel server inside the caller's nursery until cancelled; reports its
    URL (each rank's KV event publisher, when asked for, is ``sim.ranks[r].kv_events``)."""
    from .fleet import _url

    opts = sim.options
    try:
        async with trio.open_nursery() as nursery:
            for w in sim.ranks:
                if w.kv_events is not None:
                    await nursery.start(w.kv_events.run)
            port = await nursery.start(partial(serve_http, sim, opts.host, opts.port, **limits))
            for w in sim.ranks:
                w.bound_port = port
            task_status.started(_url(opts.host, port))
    finally:
        sim.close()
