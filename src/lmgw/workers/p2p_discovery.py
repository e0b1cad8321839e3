"""Service discovery pushed by vLLM P2pNcclConnector workers (PROTOCOLS.md §2.3).

Each P2P NCCL instance opens a ZeroMQ DEALER (identity = its ``ip:kv_port``) to the proxy's
ROUTER and every 3 s sends one msgpack frame
``{"type": "P"|"D", "http_address": "ip:http_port", "zmq_address": "ip:kv_port"}``.
vLLM's example proxy never forgets an instance; here an instance that has not pinged for
``expiry_s`` (default 10 s: three missed pings plus slack) is removed, so a dead worker stops
getting requests without a health probe.

:class:`P2pTable` is the sans-IO part (pings and expiry in, changes out, with the clock passed
in); :class:`P2pDiscovery` binds the ROUTER and drives it under trio. Malformed pings are
counted and ignored: one bad sender never stops discovery for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import trio
import zmq

from ..transport.zmq import ZmqSocket

__all__ = [
    "DEFAULT_EXPIRY_S",
    "P2pChange",
    "P2pDiscovery",
    "P2pInstance",
    "P2pTable",
    "run_p2p_discovery",
]

log = logging.getLogger("lmgw.workers.p2p")

DEFAULT_EXPIRY_S = 10.0
"""vLLM pings every 3 s: three missed pings (plus slack) and the instance is gone."""
MAX_PING_BYTES = 4096
"""A ping is ~100 bytes; anything much larger is not a ping (ZMQ_MAXMSGSIZE drops it)."""

_Address = Annotated[str, msgspec.Meta(min_length=3, max_length=300)]


class _Ping(msgspec.Struct):
    type: str
    http_address: _Address
    zmq_address: _Address


_decode_ping = msgspec.msgpack.Decoder(_Ping).decode


class P2pInstance(NamedTuple):
    """One announced instance. ``role`` is ``"p"`` (kv_producer) or ``"d"`` (kv_consumer)."""

    role: Literal["p", "d"]
    http_address: str  # "ip:port", as announced
    kv_address: str  # "ip:kv_port": what P2P NCCL request ids name

    @property
    def http_url(self) -> str:
        host, _, port = self.http_address.rpartition(":")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        return f"http://{host}:{port}"


class P2pChange(NamedTuple):
    kind: Literal["add", "remove"]
    instance: P2pInstance


def _check_address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {value!r} is not host:port")
    return value


class P2pTable:
    """Live P2P NCCL instances, keyed by HTTP address (sans-IO; times are in seconds).

    ``ping`` and ``expire`` return the changes to apply: an instance that re-announces itself
    with another role or KV address is a remove followed by an add.
    """

    def __init__(self, expiry_s: float = DEFAULT_EXPIRY_S) -> None:
        if expiry_s <= 0:
            raise ValueError("expiry_s must be positive")
        self.expiry_s = expiry_s
        self._live: dict[str, tuple[P2pInstance, float]] = {}
        self.pings = 0
        self.malformed = 0

    def ping(self, frames: Sequence[Any], now: float) -> list[P2pChange]:
        """Feed one message as a ROUTER receives it (``[identity, payload]``)."""
        try:
            instance = self.parse(frames)
        except ValueError as exc:
            self.malformed += 1
            log.debug("malformed P2P ping ignored: %s", exc)
            return []
        self.pings += 1
        changes: list[P2pChange] = []
        known = self._live.get(instance.http_address)
        if known is not None and known[0] != instance:
            changes.append(P2pChange("remove", known[0]))
            known = None
        if known is None:
            changes.append(P2pChange("add", instance))
        self._live[instance.http_address] = (instance, now + self.expiry_s)
        return changes

    @staticmethod
    def parse(frames: Sequence[Any]) -> P2pInstance:
        """The instance a ping announces. Raises ValueError for anything else."""
        if len(frames) != 2:
            raise ValueError(f"expected [identity, payload], got {len(frames)} frames")
        try:
            ping = _decode_ping(frames[1])
        except (msgspec.DecodeError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a ping: {exc}") from None
        role = ping.type.lower()
        if role not in ("p", "d"):
            raise ValueError(f"unknown instance type {ping.type!r}")
        return P2pInstance(
            role,  # type: ignore[arg-type]
            _check_address(ping.http_address, "http_address"),
            _check_address(ping.zmq_address, "zmq_address"),
        )

    def expire(self, now: float) -> list[P2pChange]:
        """Remove every instance whose last ping is older than ``expiry_s``."""
        gone = [key for key, (_, deadline) in self._live.items() if deadline <= now]
        return [P2pChange("remove", self._live.pop(key)[0]) for key in gone]

    def next_expiry(self) -> float | None:
        """When the next instance expires if nothing pings (None: the table is empty)."""
        return min((deadline for _, deadline in self._live.values()), default=None)

    def instances(self) -> list[P2pInstance]:
        return [instance for instance, _ in self._live.values()]

    def __len__(self) -> int:
        return len(self._live)


class P2pDiscovery:
    """Binds a ROUTER for P2P NCCL pings and reports membership changes.

    ``on_change(change)`` is called synchronously from the discovery task for every add and
    remove, in order; it must not block (a registry update is the intended use).
    """

    def __init__(
        self,
        bind: str,
        on_change: Callable[[P2pChange], None],
        *,
        expiry_s: float = DEFAULT_EXPIRY_S,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.bind = bind
        self.on_change = on_change
        self.table = P2pTable(expiry_s)
        self.endpoint = ""
        self._ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(endpoint)`` with the bound address
        (``tcp://0.0.0.0:*`` style binds report the real port)."""
        with ZmqSocket.open(self._ctx, zmq.ROUTER, hwm=10_000, max_msg_size=MAX_PING_BYTES) as sock:
            self.endpoint = sock.bind(self.bind)
            log.info("P2P NCCL discovery listening on %s", self.endpoint)
            task_status.started(self.endpoint)
            table = self.table
            while True:
                deadline = table.next_expiry()
                frames = None
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    frames = await sock.recv_multipart()
                now = trio.current_time()
                if frames is not None:
                    self._apply(table.ping(frames, now))
                self._apply(table.expire(now))

    def _apply(self, changes: list[P2pChange]) -> None:
        for change in changes:
            log.info(
                "P2P NCCL %s: %s %s (kv %s)",
                change.kind,
                change.instance.role,
                change.instance.http_url,
                change.instance.kv_address,
            )
            self.on_change(change)

    def statistics(self) -> dict[str, int]:
        return {
            "instances": len(self.table),
            "pings": self.table.pings,
            "malformed": self.table.malformed,
        }


async def run_p2p_discovery(
    bind: str,
    on_change: Callable[[P2pChange], None],
    *,
    expiry_s: float = DEFAULT_EXPIRY_S,
    ctx: zmq.Context | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``await nursery.start(run_p2p_discovery, "tcp://0.0.0.0:30001", on_change)``: the
    function form of :class:`P2pDiscovery`; started with the bound endpoint."""
    await P2pDiscovery(bind, on_change, expiry_s=expiry_s, ctx=ctx).run(task_status=task_status)
