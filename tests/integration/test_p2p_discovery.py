"""P2P NCCL discovery: vLLM-style DEALER pings in, add/remove changes out.

The table (sans-IO): pings add once, a changed role or KV address is remove + add, silence
expires, garbage is counted and ignored; a hypothesis property replays the reported changes
and checks they always describe exactly the live set. The service: real DEALER sockets with
the identity and payload vLLM uses -> add; silence -> remove; garbage -> ignored.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import trio
import zmq
from hypothesis import given
from hypothesis import strategies as st

from lmgw.transport.zmq import ZmqSocket
from lmgw.workers.p2p_discovery import (
    P2pChange,
    P2pDiscovery,
    P2pInstance,
    P2pTable,
    run_p2p_discovery,
)

BOUND = 10.0


def ping(kind: str, http: str, kv: str, **extra: object) -> list[bytes]:
    """The frames a ROUTER receives from vLLM's ``P2pNcclEngine._ping``."""
    body = {"type": kind, "http_address": http, "zmq_address": kv, **extra}
    return [kv.encode(), msgspec.msgpack.encode(body)]


P1 = P2pInstance("p", "10.0.0.1:8100", "10.0.0.1:21001")
D1 = P2pInstance("d", "10.0.0.2:8200", "10.0.0.2:22001")


# -- the table --------------------------------------------------------------------------------


def test_announce_refresh_expire() -> None:
    table = P2pTable(expiry_s=10)
    assert table.ping(ping("P", P1.http_address, P1.kv_address), now=0) == [P2pChange("add", P1)]
    assert table.ping(ping("D", D1.http_address, D1.kv_address), now=1) == [P2pChange("add", D1)]
    assert table.ping(ping("P", P1.http_address, P1.kv_address), now=3) == []  # a refresh
    assert table.next_expiry() == 11
    assert table.expire(now=10.5) == []
    assert table.expire(now=11) == [P2pChange("remove", D1)]
    assert table.expire(now=13) == [P2pChange("remove", P1)]
    assert len(table) == 0 and table.next_expiry() is None
    assert table.pings == 3 and table.malformed == 0


def test_changed_role_or_kv_address_is_remove_then_add() -> None:
    table = P2pTable()
    table.ping(ping("P", "10.0.0.1:8100", "10.0.0.1:21001"), now=0)
    moved = P2pInstance("p", "10.0.0.1:8100", "10.0.0.1:21009")
    assert table.ping(ping("P", "10.0.0.1:8100", "10.0.0.1:21009"), now=1) == [
        P2pChange("remove", P1),
        P2pChange("add", moved),
    ]
    as_decode = P2pInstance("d", "10.0.0.1:8100", "10.0.0.1:21009")
    assert table.ping(ping("d", "10.0.0.1:8100", "10.0.0.1:21009"), now=2) == [
        P2pChange("remove", moved),
        P2pChange("add", as_decode),
    ]
    assert table.instances() == [as_decode]


@pytest.mark.parametrize(
    "frames",
    [
        [b"id"],
        [b"id", b"x", b"y"],
        [b"id", b""],
        [b"id", b"\xff\xfe"],
        [b"id", msgspec.msgpack.encode([1, 2, 3])],
        [b"id", msgspec.msgpack.encode({"type": "P", "http_address": "h:1"})],
        ping("X", "10.0.0.1:8100", "10.0.0.1:21001"),
        ping("P", "no-port", "10.0.0.1:21001"),
        ping("P", "10.0.0.1:8100", "10.0.0.1:99999"),
        ping("P", "10.0.0.1:8100", ":21001"),
        [b"id", msgspec.msgpack.encode({"type": 1, "http_address": "a:1", "zmq_address": "b:2"})],
    ],
)
def test_malformed_pings_are_counted_and_ignored(frames: list[bytes]) -> None:
    table = P2pTable()
    assert table.ping(frames, now=0) == []
    assert (table.malformed, table.pings, len(table)) == (1, 0, 0)


@given(st.lists(st.binary(max_size=80), max_size=3))
def test_garbage_never_raises(frames: list[bytes]) -> None:
    table = P2pTable()
    table.ping(frames, now=0)
    assert table.malformed + table.pings == 1


def test_unknown_keys_are_fine_and_ipv6_urls_are_bracketed() -> None:
    table = P2pTable()
    [change] = table.ping(ping("D", "fd00::2:8200", "fd00::2:22001", version="0.11"), now=0)
    assert change.instance.http_url == "http://[fd00::2]:8200"
    assert P1.http_url == "http://10.0.0.1:8100"


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from("PD"), st.floats(0, 6)),
        max_size=40,
    )
)
def test_changes_always_describe_the_live_set(events: list[tuple[int, str, float]]) -> None:
    """Replaying the reported changes gives exactly the instances pinged within expiry."""
    expiry = 5.0
    table = P2pTable(expiry_s=expiry)
    replay: set[P2pInstance] = set()
    last: dict[str, tuple[P2pInstance, float]] = {}
    now = 0.0

    def apply(changes: list[P2pChange]) -> None:
        for change in changes:
            if change.kind == "add":
                assert change.instance not in replay
                replay.add(change.instance)
            else:
                replay.remove(change.instance)

    for n, kind, dt in events:
        now += dt
        apply(table.expire(now))
        http, kv = f"10.0.0.{n}:8000", f"10.0.0.{n}:2000{n}"
        apply(table.ping(ping(kind, http, kv), now))
        last[http] = (P2pInstance(kind.lower(), http, kv), now)  # type: ignore[arg-type]
        live = {inst for inst, at in last.values() if at + expiry > now}
        assert replay == live == set(table.instances())


# -- the service over real sockets -------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


async def wait_for(changes: list[P2pChange], n: int) -> None:
    with trio.fail_after(BOUND):
        while len(changes) < n:
            await trio.sleep(0.005)


def vllm_dealer(ctx: zmq.Context, endpoint: str, kv: str) -> ZmqSocket:
    sock = ZmqSocket.open(ctx, zmq.DEALER, identity=kv.encode())
    sock.connect(endpoint)
    return sock


async def test_pings_add_silence_expires(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    changes: list[P2pChange] = []
    endpoint = await nursery.start(
        lambda task_status: run_p2p_discovery(
            "tcp://127.0.0.1:*", changes.append, expiry_s=0.3, ctx=ctx, task_status=task_status
        )
    )
    assert endpoint.startswith("tcp://127.0.0.1:")
    with (
        vllm_dealer(ctx, endpoint, P1.kv_address) as p,
        vllm_dealer(ctx, endpoint, D1.kv_address) as d,
    ):
        await p.send_multipart([ping("P", P1.http_address, P1.kv_address)[1]])
        await d.send_multipart([ping("D", D1.http_address, D1.kv_address)[1]])
        await wait_for(changes, 2)
        assert sorted(changes) == sorted([P2pChange("add", P1), P2pChange("add", D1)])

        # P keeps pinging, D falls silent: only D expires
        with trio.fail_after(BOUND):
            while len(changes) < 3:
                await p.send_multipart([ping("P", P1.http_address, P1.kv_address)[1]])
                await trio.sleep(0.05)
        assert changes[2] == P2pChange("remove", D1)
    await wait_for(changes, 4)
    assert changes[3] == P2pChange("remove", P1)


async def test_garbage_is_ignored(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    changes: list[P2pChange] = []
    discovery = P2pDiscovery("tcp://127.0.0.1:*", changes.append, ctx=ctx)
    endpoint = await nursery.start(discovery.run)
    with (
        vllm_dealer(ctx, endpoint, "junk:1") as junk,
        vllm_dealer(ctx, endpoint, P1.kv_address) as p,
    ):
        await junk.send_multipart([b"\x00garbage"])
        await junk.send_multipart([b"two", b"frames"])
        await junk.send_multipart([msgspec.msgpack.encode({"type": "Q"})])
        await junk.send_multipart([b"x" * 10_000])  # over MAXMSGSIZE: ZeroMQ drops the peer
        await p.send_multipart([ping("P", P1.http_address, P1.kv_address)[1]])
        await wait_for(changes, 1)
    assert changes == [P2pChange("add", P1)]
    with trio.fail_after(BOUND):
        while discovery.statistics()["malformed"] < 3:
            await trio.sleep(0.005)
    assert discovery.statistics() == {"instances": 1, "pings": 1, "malformed": 3}
