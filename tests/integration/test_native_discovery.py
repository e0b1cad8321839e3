"""Native worker discovery: ``Announce`` messages in, fleet changes out.

The table (sans-IO): the first ``up`` adds, refreshes are quiet, a restart, move or new role is
remove + add, ``draining`` drains and ``up`` undrains, ``leaving`` and silence remove, garbage is
counted and ignored; a hypothesis property replays the changes and checks they always describe
the table. The service: real ``WorkerServer`` processes-in-a-task announcing with
``gateways=[...]`` (add, drain, leave), silence, garbage. The gateway: ``discovery.native_bind``
puts announced workers into the fleet as ``zmq+tcp://`` workers of source ``"native"``, leaves
a static worker with the same id alone, replaces a restarted worker and drops one that leaves.

Everything binds 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.config import ConfigError, DiscoveryConfig, GatewayConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway
from lmgw.protocol import Announce, Heartbeat, encode_frames
from lmgw.simulators import WorkerOptions
from lmgw.transport.zmq import ZmqSocket
from lmgw.worker import WorkerServer, encode_announce
from lmgw.worker.sim import SimEngine
from lmgw.workers.native_discovery import (
    EXPIRY_INTERVALS,
    SOURCE,
    NativeChange,
    NativeDiscovery,
    NativeTable,
)
from lmgw.workers.worker import WorkerState

BOUND = 20.0
MODEL = "sim-model"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


async def until(pred: Callable[[], bool], timeout: float = BOUND) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


def ann(
    worker_id: str = "p-1",
    instance: str = "i1",
    endpoint: str = "tcp://10.0.0.5:7000",
    *,
    roles: tuple[str, ...] = ("prefill",),
    state: str = "up",
    interval_s: float = 2.0,
    **kw: Any,
) -> list[bytes]:
    """The frames the registration ROUTER receives for one announcement."""
    msg = Announce(
        worker_id,
        instance,
        endpoint,
        roles=list(roles),
        models=[MODEL],
        interval_s=interval_s,
        state=state,
        **kw,
    )
    return [b"peer", bytes(encode_announce(msg))]


def kinds(changes: list[NativeChange]) -> list[tuple[str, str]]:
    return [(c.kind, c.worker.worker_id) for c in changes]


# == the table =================================================================================


def test_first_up_adds_refresh_is_quiet_silence_removes() -> None:
    table = NativeTable()
    added = table.announce(ann(), now=0)
    assert kinds(added) == [("add", "p-1")]
    info = added[0].worker
    assert (info.url, info.role, info.models) == ("zmq+tcp://10.0.0.5:7000", "p", (MODEL,))
    wc = info.worker_config()
    assert (wc.url, wc.role, wc.models, wc.worker_id) == (info.url, "p", [MODEL], "p-1")
    assert table.announce(ann(), now=1) == []  # a refresh
    assert table.next_expiry() == 1 + EXPIRY_INTERVALS * 2.0
    assert wc.zone is None
    zoned = NativeTable().announce(ann("p-2", zone="rack-1"), now=0)[0].worker
    assert zoned.worker_config().zone == "rack-1"  # a worker's --zone reaches workers[].zone
    assert table.expire(now=6.9) == []
    assert kinds(table.expire(now=7)) == [("remove", "p-1")]
    assert len(table) == 0 and table.next_expiry() is None
    # each worker expires on its own interval
    table.announce(ann("fast", interval_s=0.1), now=0)
    table.announce(ann("slow", endpoint="tcp://10.0.0.6:7000", interval_s=10), now=0)
    assert kinds(table.expire(now=1)) == [("remove", "fast")]
    assert [w.worker_id for w in table.workers()] == ["slow"]


@pytest.mark.parametrize(
    "changed",
    [
        {"instance": "i2"},  # a restart
        {"endpoint": "tcp://10.0.0.5:7001"},  # moved
        {"roles": ("decode",)},
        {"control_endpoint": "tcp://10.0.0.5:7002"},
        {"zone": "rack-2"},  # moved to another zone
    ],
)
def test_new_incarnation_is_remove_then_add(changed: dict[str, Any]) -> None:
    table = NativeTable()
    table.announce(ann(), now=0)
    changes = table.announce(ann(**changed), now=1)
    assert kinds(changes) == [("remove", "p-1"), ("add", "p-1")]
    assert changes[0].worker != changes[1].worker
    assert table.desired()[0].url == changes[1].worker.url


def test_draining_leaving_and_undrain() -> None:
    table = NativeTable()
    table.announce(ann(), now=0)
    assert kinds(table.announce(ann(state="draining"), now=1)) == [("drain", "p-1")]
    assert table.desired() == [] and table.is_draining("p-1")
    assert table.announce(ann(state="draining"), now=2) == []
    assert kinds(table.announce(ann(state="up"), now=3)) == [("add", "p-1")]  # undrained
    assert [wc.worker_id for wc in table.desired()] == ["p-1"]
    assert kinds(table.announce(ann(state="leaving"), now=4)) == [("remove", "p-1")]
    assert table.announce(ann(state="leaving"), now=5) == []  # already gone
    # first seen draining: not worth adding, and nothing to remove when it leaves for good
    assert table.announce(ann("late", state="draining"), now=6) == []
    assert table.desired() == [] and len(table) == 1


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"peer"],
        [b"peer", b""],
        [b"peer", b"\x00" * 40],
        [b"peer", bytes(encode_frames(Heartbeat("h"))[0])],  # a session message
        ann()[:1] + ann()[1:] + [b"extra frame"],
        ann(interval_s=0),
        ann(interval_s=math.inf),
        ann(interval_s=-1),
        ann(state="sleeping"),
        ann(roles=()),
        ann(roles=("juggler",)),
        ann(endpoint="inproc://w"),  # not reachable from another process
        ann(endpoint="udp://10.0.0.5:7000"),
        ann(endpoint="tcp://10.0.0.5"),  # no port
        ann(" "),
        ann(zone="no spaces"),
    ],
)
def test_malformed_announcements_are_counted_and_ignored(frames: list[bytes]) -> None:
    table = NativeTable()
    assert table.announce(frames, now=0) == []
    assert (table.malformed, table.announcements, len(table)) == (1, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["i1", "i2"]),
            st.sampled_from(["tcp://10.0.0.1:1", "tcp://10.0.0.2:2"]),
            st.sampled_from(["up", "up", "draining", "leaving"]),
            st.floats(0, 3),  # time step
        ),
        max_size=40,
    )
)
def test_changes_always_describe_the_table(events: list[tuple[str, str, str, str, float]]) -> None:
    """Replaying the changes gives a fleet whose routable part is exactly ``desired()``."""
    table = NativeTable()
    fleet: dict[str, bool] = {}  # worker id -> draining
    now = 0.0

    def apply(changes: list[NativeChange]) -> None:
        for change in changes:
            wid = change.worker.worker_id
            if change.kind == "add":
                assert fleet.get(wid, True)  # new, or undrained
                fleet[wid] = False
            elif change.kind == "drain":
                assert fleet[wid] is False
                fleet[wid] = True
            else:
                fleet.pop(wid, None)

    for wid, instance, endpoint, state, step in events:
        now += step
        apply(table.expire(now))
        apply(table.announce(ann(wid, instance, endpoint, state=state, interval_s=1.0), now))
        routable = sorted(w for w, draining in fleet.items() if not draining)
        assert routable == sorted(wc.worker_id for wc in table.desired())
        assert set(fleet) <= {w.worker_id for w in table.workers()}


# == the service ===============================================================================


def sim(role: str = "p") -> SimEngine:
    return SimEngine(WorkerOptions(role=role, model=MODEL, speed=math.inf))


async def start_discovery(
    nursery: trio.Nursery, ctx: zmq.Context
) -> tuple[NativeDiscovery, list[NativeChange]]:
    seen: list[NativeChange] = []
    discovery = NativeDiscovery("tcp://127.0.0.1:0", seen.extend, ctx=ctx)
    await nursery.start(discovery.run)
    return discovery, seen


async def test_worker_servers_announce_drain_and_leave(
    ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    discovery, seen = await start_discovery(nursery, ctx)
    server = WorkerServer(
        sim("p"), ctx=ctx, gateways=[discovery.endpoint], announce_interval_s=0.05, worker_id="p-1"
    )
    async with trio.open_nursery() as inner:
        await inner.start(server.run)
        await until(lambda: bool(seen))
        assert kinds(seen) == [("add", "p-1")]
        info = seen[0].worker
        assert info.url == "zmq+" + server.endpoint and info.role == "p"
        assert info.instance == server.instance
        assert info.control_endpoint == server.control_endpoint
        server.drain("maintenance", grace_s=0.5)  # announced at once, then Exit, then leaving
    await until(lambda: ("remove", "p-1") in kinds(seen))
    assert kinds(seen) == [("add", "p-1"), ("drain", "p-1"), ("remove", "p-1")]
    assert "left" in seen[-1].reason
    assert discovery.statistics()["workers"] == 0 and discovery.table.malformed == 0


async def test_silence_removes_and_garbage_is_ignored(
    ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    discovery, seen = await start_discovery(nursery, ctx)
    with ZmqSocket.open(ctx, zmq.DEALER) as dealer:
        dealer.connect(discovery.endpoint)
        for junk in ([b""], [b"LGW\x01\x92\x1a"], [b"\xff" * 100], [b"a", b"b"]):
            await dealer.send_multipart(junk)
        await dealer.send_multipart(ann("quiet", interval_s=0.05)[1:])
        await until(lambda: bool(seen))
        assert discovery.table.malformed == 4
        # nothing more: 3 intervals later it is gone
        await until(lambda: len(seen) == 2)
    assert kinds(seen) == [("add", "quiet"), ("remove", "quiet")]
    assert seen[1].reason == "no announcement in time"


# == the gateway ===============================================================================


def gateway_config(*workers: WorkerConfig) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig(port=0),
        discovery=DiscoveryConfig(native_bind="tcp://127.0.0.1:0"),
        workers=list(workers),
    )


async def start_gateway(nursery: trio.Nursery, cfg: GatewayConfig) -> Gateway:
    gw = Gateway(cfg)
    with trio.fail_after(BOUND):
        await nursery.start(gw.run)
    assert gw.native_endpoint is not None and gw.native_endpoint.startswith("tcp://127.0.0.1:")
    return gw


async def test_gateway_fleet_follows_announcements(ctx: zmq.Context, nursery: trio.Nursery) -> None:
    static = WorkerConfig(url="http://127.0.0.1:9", role="d", id="taken")
    gw = await start_gateway(nursery, gateway_config(static))
    assert gw.native_endpoint is not None

    async def announcing(worker_id: str, role: str) -> tuple[WorkerServer, trio.CancelScope]:
        server = WorkerServer(
            sim(role),
            ctx=ctx,
            gateways=[gw.native_endpoint or ""],
            announce_interval_s=0.05,
            worker_id=worker_id,
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await server.run(task_status=task_status)

        await nursery.start(run)
        return server, scope

    first, first_scope = await announcing("pd-1", "pd")
    await until(lambda: gw.registry.get("pd-1") is not None)
    worker = gw.registry.get("pd-1")
    assert worker is not None and gw.source_of("pd-1") == SOURCE
    assert (worker.url, worker.role) == ("zmq+" + first.endpoint, "pd")
    # the gateway's channel to the announced endpoint registers like any native worker's
    await until(lambda: worker.state is WorkerState.HEALTHY)

    # an id another source owns is left alone
    _, stranger_scope = await announcing("taken", "pd")
    await trio.sleep(0.3)  # several announcements
    taken = gw.registry.get("taken")
    assert taken is not None and taken.url == "http://127.0.0.1:9" and taken.role == "d"
    assert gw.source_of("taken") == "static"
    stranger_scope.cancel()

    # a restart (new instance, new port) replaces it
    first_scope.cancel()
    second, _ = await announcing("pd-1", "pd")
    await until(
        lambda: (w := gw.registry.get("pd-1")) is not None and w.url == "zmq+" + second.endpoint
    )
    # draining then leaving: out of the routable fleet, then gone
    second.drain("maintenance", grace_s=0.2)
    await until(lambda: gw.registry.get("pd-1") is None)
    assert gw.registry.get("taken") is not None  # the static worker stays


# == configuration ==============================================================================


def test_native_bind_is_validated() -> None:
    assert DiscoveryConfig(native_bind="tcp://0.0.0.0:7100").native_bind == "tcp://0.0.0.0:7100"
    assert DiscoveryConfig(native_bind="ipc:///run/lmgw/register").native_bind
    for bad in ("0.0.0.0:7100", "http://h:1", "tcp://0.0.0.0", "tcp://", "ipc://"):
        with pytest.raises(ConfigError) as info:
            DiscoveryConfig(native_bind=bad)
        assert info.value.path == "native_bind"
    with pytest.raises(ConfigError, match="p2p_nccl_bind"):
        DiscoveryConfig(native_bind="tcp://0.0.0.0:7100", p2p_nccl_bind="tcp://0.0.0.0:7100")
