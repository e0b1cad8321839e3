"""The registration endpoint for lmgw native workers (``discovery.native_bind``).

A worker started with ``python -m lmgw.worker --gateway ADDR`` connects a DEALER to ``ADDR``
and sends an :class:`~lmgw.protocol.messages.Announce` every ``interval_s`` (at once when it
starts to drain, and ``state="leaving"`` on the way out). Nothing is ever answered: discovery
only says where a worker is; the session (``Register``/``RegisterAck``, versions,
capabilities) is then the same as for a worker configured statically, over the channel the
gateway opens to the announced endpoint.

:class:`NativeTable` is the sans-IO part (announcements and the clock in, changes out), keyed
by ``worker_id``:

* the first ``up`` adds the worker (``zmq+tcp://`` URL, its first role, its models);
* a new ``instance`` (a restart), endpoint, role, models or control endpoint is a remove
  followed by an add, so the gateway never keeps a session to an old incarnation;
* ``draining`` drains it (no new requests; those in flight finish), ``up`` again undrains;
* ``leaving``, or silence for :data:`EXPIRY_INTERVALS` of the worker's own interval, removes
  it. A worker that dies without a word is gone after ~6 s at the default 2 s interval (its
  channel's heartbeat usually notices first).

:class:`NativeDiscovery` binds the ROUTER and drives the table from one reader task;
:func:`run_native_discovery` applies the changes to a Gateway as discovery source
``"native"``: adds through ``sync_workers`` (so an id owned by another source, e.g. a static
worker, is never touched), drains through ``drain_worker``, removals at once. Malformed
announcements are counted and ignored: one bad sender never stops discovery for the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import trio
import zmq

from ..config import ConfigError, WorkerConfig, normalize_role
from ..protocol.messages import Announce, ProtocolError
from ..transport.zmq import ZmqSocket
from ..worker.announce import decode_announce

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = [
    "EXPIRY_INTERVALS",
    "SOURCE",
    "NativeChange",
    "NativeDiscovery",
    "NativeTable",
    "NativeWorkerInfo",
    "run_native_discovery",
]

log = logging.getLogger("lmgw.workers.native")

SOURCE = "native"
"""The discovery source name announced workers belong to (``Gateway.source_of``)."""
EXPIRY_INTERVALS = 3.0
"""A worker silent for this many of its announce intervals is gone."""
MAX_ANNOUNCE_BYTES = 64 << 10
"""An announcement is a few hundred bytes; anything much larger is dropped by ZeroMQ."""
MAX_INTERVAL_S = 3600.0
SWEEP_S = 1.0
"""How often drained workers of this source are checked for removal (once idle)."""


class NativeWorkerInfo(NamedTuple):
    """What an announcement says about a worker, as the gateway will use it."""

    worker_id: str
    instance: str
    url: str  # zmq+tcp://host:port or zmq+ipc://path
    role: str  # short: e, p, d, pd
    models: tuple[str, ...]
    control_endpoint: str | None
    max_inflight: int
    zone: str | None = None

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            url=self.url, role=self.role, models=list(self.models), id=self.worker_id,
            zone=self.zone,
        )  # fmt: skip

    def same_incarnation(self, other: NativeWorkerInfo) -> bool:
        """Whether ``other`` may keep this one's session (else: remove, then add)."""
        return (
            self.instance == other.instance
            and self.url == other.url
            and self.role == other.role
            and self.models == other.models
            and self.control_endpoint == other.control_endpoint
            and self.zone == other.zone
        )


class NativeChange(NamedTuple):
    kind: Literal["add", "remove", "drain"]
    worker: NativeWorkerInfo
    reason: str


class _Entry:
    __slots__ = ("deadline", "draining", "info")

    def __init__(self, info: NativeWorkerInfo, draining: bool, deadline: float) -> None:
        self.info = info
        self.draining = draining
        self.deadline = deadline


class NativeTable:
    """Announced native workers, keyed by worker id (sans-IO; times in seconds)."""

    def __init__(self) -> None:
        self._live: dict[str, _Entry] = {}
        self.announcements = 0
        self.malformed = 0

    def announce(self, frames: Sequence[Any], now: float) -> list[NativeChange]:
        """Feed one message as the ROUTER received it (``[identity, frame]``)."""
        try:
            msg = decode_announce(frames, envelope=1)[1]
            info = self.parse(msg)
        except (ProtocolError, ValueError) as exc:  # ConfigError is a ValueError
            self.malformed += 1
            log.debug("malformed announcement ignored: %s", exc)
            return []
        self.announcements += 1
        wid = info.worker_id
        entry = self._live.get(wid)
        changes: list[NativeChange] = []
        if msg.state == "leaving":
            if entry is not None:
                del self._live[wid]
                changes.append(NativeChange("remove", entry.info, "the worker left"))
            return changes
        if entry is not None and not entry.info.same_incarnation(info):
            del self._live[wid]
            changes.append(NativeChange("remove", entry.info, "replaced (restart or move)"))
            entry = None
        deadline = now + EXPIRY_INTERVALS * msg.interval_s
        draining = msg.state == "draining"
        if entry is None:
            self._live[wid] = _Entry(info, draining, deadline)
            if not draining:  # a worker first seen draining is not worth adding
                changes.append(NativeChange("add", info, "announced"))
            return changes
        entry.deadline = deadline
        if draining != entry.draining:
            entry.draining = draining
            kind: Literal["add", "drain"] = "drain" if draining else "add"
            changes.append(NativeChange(kind, info, "announced " + msg.state))
        return changes

    @staticmethod
    def parse(msg: Announce) -> NativeWorkerInfo:
        """The worker an announcement describes. Raises ValueError for what cannot be used."""
        if msg.state not in ("up", "draining", "leaving"):
            raise ValueError(f"unknown state {msg.state!r}")
        if not (0 < msg.interval_s <= MAX_INTERVAL_S and math.isfinite(msg.interval_s)):
            raise ValueError(f"interval_s {msg.interval_s!r} out of range")
        if not msg.worker_id.strip():
            raise ValueError("empty worker_id")
        if not msg.roles:
            raise ValueError("no role")
        scheme, sep, _ = msg.endpoint.partition("://")
        if not sep or scheme not in ("tcp", "ipc"):
            raise ValueError(f"endpoint {msg.endpoint!r} is not tcp:// or ipc://")
        role = normalize_role(msg.roles[0])
        info = NativeWorkerInfo(
            msg.worker_id,
            msg.instance,
            "zmq+" + msg.endpoint,
            role,
            tuple(msg.models),
            msg.control_endpoint,
            msg.max_inflight,
            msg.zone,
        )
        try:
            info = info._replace(url=info.worker_config().url)  # validated and normalized
        except ConfigError as exc:
            raise ValueError(exc.reason) from None
        return info

    def expire(self, now: float) -> list[NativeChange]:
        """Remove every worker silent past its deadline."""
        gone = [wid for wid, entry in self._live.items() if entry.deadline <= now]
        changes = []
        for wid in gone:
            entry = self._live.pop(wid)
            changes.append(NativeChange("remove", entry.info, "no announcement in time"))
        return changes

    def next_expiry(self) -> float | None:
        return min((entry.deadline for entry in self._live.values()), default=None)

    def desired(self) -> list[WorkerConfig]:
        """The workers this source wants in the fleet now (announced ``up``)."""
        return [e.info.worker_config() for e in self._live.values() if not e.draining]

    def workers(self) -> list[NativeWorkerInfo]:
        return [entry.info for entry in self._live.values()]

    def is_draining(self, worker_id: str) -> bool:
        entry = self._live.get(worker_id)
        return entry is not None and entry.draining

    def __len__(self) -> int:
        return len(self._live)


class NativeDiscovery:
    """Binds the registration ROUTER; ``on_changes(changes)`` is called synchronously from the
    reader task for every announcement or expiry that changed something (and with ``[]`` every
    :data:`SWEEP_S`, so an applier can finish removals it deferred). It must not block."""

    def __init__(
        self,
        bind: str,
        on_changes: Callable[[list[NativeChange]], None],
        *,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.bind = bind
        self.on_changes = on_changes
        self.table = NativeTable()
        self.endpoint = ""
        self._ctx = ctx

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(endpoint)`` with the bound address."""
        with ZmqSocket.open(
            self._ctx, zmq.ROUTER, hwm=10_000, max_msg_size=MAX_ANNOUNCE_BYTES
        ) as sock:
            self.endpoint = sock.bind(self.bind)
            log.info("native worker registration listening on %s", self.endpoint)
            task_status.started(self.endpoint)
            table = self.table
            next_sweep = trio.current_time() + SWEEP_S
            while True:
                expiry = table.next_expiry()
                wake = next_sweep if expiry is None else min(expiry, next_sweep)
                frames = None
                with trio.move_on_at(wake):
                    frames = await sock.recv_multipart()
                now = trio.current_time()
                changes = table.announce(frames, now) if frames is not None else []
                changes += table.expire(now)
                if changes or now >= next_sweep:
                    if now >= next_sweep:
                        next_sweep = now + SWEEP_S
                    for change in changes:
                        log.info(
                            "native worker %s: %s %s (%s, %s)",
                            change.kind,
                            change.worker.worker_id,
                            change.worker.url,
                            change.worker.role,
                            change.reason,
                        )
                    self.on_changes(changes)

    def statistics(self) -> dict[str, int]:
        return {
            "workers": len(self.table),
            "announcements": self.table.announcements,
            "malformed": self.table.malformed,
        }


def apply_to_gateway(gateway: Gateway, table: NativeTable, changes: list[NativeChange]) -> None:
    """Make the gateway's ``"native"`` workers what the table says. Workers another source owns
    (a static ``[[workers]]`` entry with the same id) are left alone. Without changes (the
    periodic call) only drained workers that became idle are removed: a full sync would also
    undo an operator's drain of an announced worker every second."""
    if not changes:
        gateway.sweep_retired()
        return
    for change in changes:
        wid = change.worker.worker_id
        if gateway.source_of(wid) != SOURCE or gateway.registry.get(wid) is None:
            continue
        if change.kind == "remove":
            gateway.remove_worker(wid)
        elif change.kind == "drain":
            gateway.drain_worker(wid, "the worker announced it is draining")
    # adds (and undrains) go through the fleet's one path for discovery sources; workers
    # drained above are not in `desired`, and leave once idle (sync_workers sweeps them)
    gateway.sync_workers(SOURCE, table.desired())


async def run_native_discovery(
    gateway: Gateway,
    bind: str,
    *,
    ctx: zmq.Context | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``await nursery.start(run_native_discovery, gateway, "tcp://0.0.0.0:7100")``: started
    with the bound endpoint."""
    discovery: NativeDiscovery

    def on_changes(changes: list[NativeChange]) -> None:
        apply_to_gateway(gateway, discovery.table, changes)

    discovery = NativeDiscovery(bind, on_changes, ctx=ctx)
    await discovery.run(task_status=task_status)
