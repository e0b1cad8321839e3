"""A channel's bursts without sockets: a Batch's Deltas are queued on their routes as
``_dispatch`` would queue them (strays counted, an overflow ends the route), and
``RpcStream.deltas`` hands a relay the Deltas already queued, never what must come alone."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from lmgw.protocol.messages import (
    Batch,
    Delta,
    FailureCode,
    Finish,
    Generate,
    Incoming,
    Usage,
    encode_frames,
)
from lmgw.transport.zmq.channel import RpcChannel, RpcError, RpcStream, _Route


def _channel(buffer: int = 1024) -> RpcChannel:
    return RpcChannel("tcp://127.0.0.1:1", stream_buffer=buffer)  # never run: no socket


def _route(chan: RpcChannel, rid: str) -> _Route:
    route = _Route(rid, chan.stream_buffer)
    route.sent = True
    chan._routes[rid] = route
    return route


def _stream(chan: RpcChannel, route: _Route) -> RpcStream:
    stream = RpcStream(chan, Generate(route.request_id, "m", prompt_token_ids=[1]), (), 5.0)
    stream._route = route
    return stream


def test_a_batch_queues_each_delta_on_its_route() -> None:
    chan = _channel()
    a, b = _route(chan, "a"), _route(chan, "b")
    msgs: list[Any] = [Delta("a", 0, "x"), Delta("b", 0, "y"), Delta("gone", 0, "z"),
                       Delta("a", 1, "w"), Finish("a", 2, "stop")]  # fmt: skip
    assert chan._on_frames(encode_frames(Batch(msgs))) == 5
    assert list(a.items) == [msgs[0], msgs[3], msgs[4]] and a.ended
    assert list(b.items) == [msgs[1]] and not b.ended
    assert "a" not in chan._routes and "b" in chan._routes
    assert chan.stats["stray"] == 1 and chan.stats["batches_received"] == 1


def test_a_batch_overflowing_a_route_ends_it_overloaded() -> None:
    chan = _channel(buffer=2)
    route = _route(chan, "a")
    chan._on_frames(encode_frames(Batch([Delta("a", i, str(i)) for i in range(4)])))
    assert len(route.items) == 2 and route.ended
    assert route.failure is not None and route.failure.code is FailureCode.OVERLOADED
    assert chan.stats["overflows"] == 1 and "a" not in chan._routes
    assert chan.stats["stray"] == 1  # the fourth came after the route was gone


async def test_a_batch_wakes_the_waiting_reader_once_with_everything_queued() -> None:
    chan = _channel()
    route = _route(chan, "a")
    stream = _stream(chan, route)
    got: list[Any] = []

    async def read() -> None:
        first = await stream.__anext__()
        got.append(first)
        got.extend(stream.deltas(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        chan._on_frames(encode_frames(Batch([Delta("a", i, str(i)) for i in range(5)])))
    assert [d.text for d in got] == ["0", "1", "2", "3", "4"]


async def test_deltas_stop_at_the_limit_the_finish_and_frames() -> None:
    chan = _channel()
    route = _route(chan, "a")
    stream = _stream(chan, route)
    d = [Delta("a", i, str(i)) for i in range(5)]
    with_frames = Incoming([], Delta("a", 5, "f"), [b"frame"])
    finish = Finish("a", 6, "length", usage=Usage(1, 6))
    route.items.extend([*d, with_frames, finish])
    assert stream.deltas(2) == d[:2]
    assert stream.deltas(100) == d[2:]  # not the Delta with payload frames
    assert stream.deltas(100) == []
    assert (await stream.__anext__()).text == "f" and stream.payload == [b"frame"]
    assert stream.deltas(100) == []  # the Finish comes from __anext__
    assert await stream.__anext__() == finish
    route.items.append(Delta("a", 7, "late"))
    assert stream.deltas(100) == []  # the stream is over


async def test_a_failure_after_a_burst_comes_from_anext() -> None:
    chan = _channel()
    route = _route(chan, "a")
    stream = _stream(chan, route)
    route.items.extend([Delta("a", 0, "x"), Delta("a", 1, "y")])
    route.end(RpcError(FailureCode.ENGINE_ERROR, "boom"))
    assert [m.text for m in stream.deltas(10)] == ["x", "y"]
    with pytest.raises(RpcError, match="boom"):
        await stream.__anext__()
