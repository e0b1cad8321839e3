"""The compiled lane inside the native server: one trio task drives the relay's epoll set.

Why: see :mod:`lmgw._fast.relay_py` (the loop) and :mod:`lmgw.api.lane` (the decisions). Here
the structure around them: the server hands each accepted connection to the lane; the lane
hands a connection back (``on_demote``) when a request is not for it, and the server serves it
from then on as any other, the continuation of a request first when there is one. One task
waits on the epoll fd and runs the loop; a second sweeps its timeouts. Both live in the
server's nursery, and the lane's connections close when it is cancelled (requests still in
flight are accounted as abandoned).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import wait_readable

from .._fast.relay_py import BURST_WAIT_S, pack_sockaddr
from ..netio import RawStream, peer_of

try:
    from .._fast.relay import Relay

    IMPLEMENTATION = "cython"
except ImportError:  # pragma: no cover - the extension is built by `make build`
    from .._fast.relay_py import Relay  # type: ignore[assignment]

    IMPLEMENTATION = "python"
if os.environ.get("LMGW_RELAY") == "python":  # the twin, for comparing (benchmarks/floor.py)
    from .._fast.relay_py import Relay  # type: ignore[assignment]

    IMPLEMENTATION = "python"

if TYPE_CHECKING:
    from .server import HTTPServer

_now = time.perf_counter
log = logging.getLogger("lmgw.http")
#: how often the lane looks up the host names of the workers it reaches again, and how long a
#: look-up may take
_RESOLVE_EVERY_S = 30.0
_LOOKUP_TIMEOUT_S = 5.0
#: how often the sweeper checks deadlines while requests are in flight, and when none is
_SWEEP_BUSY_S = 0.05
_SWEEP_IDLE_S = 1.0


class Lane:
    """The relay serving for ``server`` with the decisions of ``app`` (an
    :class:`lmgw.api.lane.LaneApp`)."""

    def __init__(self, server: HTTPServer, app: Any) -> None:
        self.server = server
        self.app = app
        app.trimmer = server.trimmer
        lim = server.limits
        self.relay = Relay(
            app.on_request, app.on_answer, app.on_handoff, app.on_failure, app.on_timeout,
            app.on_abandon, self._on_demote,
            on_stream=app.on_stream, on_first=app.on_first, on_stream_end=app.on_stream_end,
            on_broken=app.on_broken, on_beat=app.on_beat, on_side=app.on_side,
            beat_s=app.api.sse_keepalive_s,
            max_head=lim.max_header_bytes, max_body=lim.max_body_bytes,
            keepalive_s=lim.keepalive_timeout_s, write_timeout_s=lim.write_timeout_s,
            upstream_idle_s=app.pool.idle_timeout_s, connect_timeout_s=app.pool.connect_timeout_s,
            max_idle=app.pool.max_idle_per_origin,
        )  # fmt: skip
        self._nursery: trio.Nursery | None = None
        #: host names to look up for the lane (LaneApp.resolve), and those it reaches
        self._lookups, self._pending = trio.open_memory_channel[Any](math.inf)
        #: parked requests whose wait for an admission slot is over (LaneApp.resume_soon)
        self._resumes, self._to_resume = trio.open_memory_channel[Any](math.inf)
        self._named: list[Any] = []
        #: connections the server gave back between requests (lmgw_lane_returns_total)
        self.returned = 0

    @property
    def clients(self) -> int:
        return self.relay.clients

    def install_metrics(self, metrics: Any) -> None:
        """Read the loop's counts at scrape time (``lmgw_lane_*``)."""
        relay = self.relay
        metrics.lane_answers.collect = lambda: [((), float(relay.served))]
        metrics.lane_streams.collect = lambda: [((), float(relay.streamed))]
        metrics.lane_handovers.collect = lambda: [((), float(relay.demoted))]
        native = self.app.native
        metrics.lane_native.collect = lambda: [((), float(native.answered if native else 0))]
        metrics.lane_returns.collect = lambda: [((), float(self.returned))]
        declined = self.app.declined
        metrics.lane_declined.collect = lambda: [((r,), float(n)) for r, n in declined.items()]
        metrics.lane_connections.collect = lambda: [
            (("client",), float(relay.clients)),
            (("upstream",), float(relay.upstreams)),
        ]

    def take(self, stream: RawStream, client: str | None = None, *, back: bool = False) -> None:
        """Serve the accepted connection ``stream`` (from ``client``, "host:port", else its
        peer's) in the lane from now on (closed, and counted closed, when the lane cannot
        hold it); ``back``: one the server gives back (lmgw_lane_returns_total)."""
        if back:
            self.returned += 1
        if client is None:
            client = peer_of(stream)
        fd = stream.socket.detach()
        try:
            self.relay.add_client(fd, client, _now())
        except (OSError, ValueError, MemoryError):
            socket.close(fd)
            self.server.lane_closed([client])

    def drain(self) -> None:
        self.app.draining = True
        self.relay.drain()
        self._closed()

    async def run(self, nursery: trio.Nursery) -> None:
        """Drive the relay until cancelled; ``nursery``: where handed-back connections go."""
        self._nursery = nursery
        relay = self.relay
        self.app.bind(relay)
        self.app.resolve = self._lookups.send_nowait
        self.app.resume_soon = self._resumes.send_nowait
        try:
            async with trio.open_nursery() as own:
                own.start_soon(self._sweep)
                own.start_soon(self._resolver)
                own.start_soon(self._resumer)
                while True:
                    if relay.paused:  # streams left unread for a moment: read them again soon
                        with trio.move_on_after(BURST_WAIT_S):
                            await wait_readable(relay)
                    else:
                        await wait_readable(relay)
                    relay.run(_now())
                    if relay.closed:
                        self._closed()
        finally:
            self.app.resolve = self.app.resume_soon = None
            self.app.unbind()
            relay.close()
            self._closed()

    async def _sweep(self) -> None:
        relay = self.relay
        busy, idle = _SWEEP_BUSY_S, _SWEEP_IDLE_S
        if relay.beat_s:  # keep-alive comments at most half an interval late
            busy, idle = min(busy, relay.beat_s / 2), min(idle, relay.beat_s / 2)
        while True:
            await trio.sleep(busy if relay.in_flight or relay.sides else idle)
            relay.sweep(_now())
            if relay.closed:
                self._closed()

    async def _resumer(self) -> None:
        """Go on with the parked requests whose wait for an admission slot is over, here in
        a task of the lane's: the grant comes from wherever a slot was given back, often from
        inside the relay's own pass, which must not be re-entered."""
        to_resume = self._to_resume
        async for ex in to_resume:
            while True:  # (every grant of the relay's last pass at one wake-up)
                try:
                    self.app.resume(ex)
                except Exception:  # (a bug: the request's deadline still ends it)
                    log.exception("lane: resuming a parked request failed")
                try:
                    ex = to_resume.receive_nowait()
                except trio.WouldBlock:
                    break
            self._closed()

    async def _resolver(self) -> None:
        """Look up the host names of workers (a worker named ``vllm-0:8000`` rather than by
        address) for the lane, and again every ``_RESOLVE_EVERY_S`` for those it reaches: a
        name that moves to another address takes the lane's new connections there."""
        pending = self._pending
        while True:
            origin = None
            with trio.move_on_after(_RESOLVE_EVERY_S):
                origin = await pending.receive()
            if origin is not None:
                await self._lookup(origin)
                continue
            self._named = [o for o in self._named if o.slot >= 0]
            for origin in list(self._named):
                await self._lookup(origin)

    async def _lookup(self, origin: Any) -> None:
        sockaddr = None
        try:
            with trio.fail_after(_LOOKUP_TIMEOUT_S):
                found = await trio.socket.getaddrinfo(
                    origin.host, origin.port, type=socket.SOCK_STREAM
                )
            if found:  # IPv4 first: "localhost" is often ::1 too, and servers listen on v4
                found.sort(key=lambda info: info[0] != socket.AF_INET)
                sockaddr = pack_sockaddr(found[0][4][0], origin.port)
        except (OSError, trio.TooSlowError) as exc:
            log.info("the compiled lane cannot look up %s: %s (served on trio)", origin.host, exc)
        if origin.slot == -2:  # removed meanwhile
            return
        if sockaddr is None:
            if origin.slot == -3:  # a first look-up: the express lane on trio serves it
                origin.slot = -2
            return
        first = origin.slot < 0
        self.app.assign(origin, sockaddr)
        if first:
            self._named.append(origin)

    def _closed(self) -> None:
        gone = self.relay.take_closed()
        if gone:
            self.server.lane_closed(gone)

    def _on_demote(self, client: str, fd: int, pending: bytes, cont: Any) -> None:
        """A connection back from the lane: the server serves it from here on."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the lane is not running")
        back = self.app.take_back()
        nursery.start_soon(self.server.adopt, fd, client, pending, cont, back)
