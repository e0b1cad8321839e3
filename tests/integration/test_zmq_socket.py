"""ZeroMQ under trio: the socket wrapper and the gateway's RPC channel, over real sockets.

Socket: 100k messages in order; a sender and a receiver task sharing one socket (the naive
wrapper loses an edge here and hangs); many tasks waiting on one socket in both directions
(hypothesis over HWM, task and message counts: every message exactly once, never
``BusyResourceError``); HWM full -> SendBlocked, and a blocked send resumes when the peer
reads; ROUTER_MANDATORY; timeouts, cancellation and close.

Channel (against a scripted worker on a ROUTER): many concurrent streams on one socket with
exact contents; ABORT on cancel, on early exit and on timeout; typed worker failures; a worker
that disappears fails its requests (no hang) and is used again when it comes back; a quick
restart is noticed; Drain/Exit notices; garbage from the worker is ignored; a slow consumer
fails alone; a worker that stops reading gives OVERLOADED; no common version.

Everything binds 127.0.0.1 port 0, ipc:// under tmp_path or inproc://; every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
import trio
import trio.testing
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgw.protocol import (
    CAPABILITIES,
    PROTOCOL_VERSION,
    Abort,
    Batch,
    Delta,
    Drain,
    Encode,
    EncodeDone,
    Exit,
    Failure,
    FailureCode,
    Finish,
    Generate,
    Heartbeat,
    HeartbeatAck,
    MediaItem,
    Message,
    Metrics,
    MetricsRequest,
    Prefill,
    PrefillDone,
    ProtocolError,
    Register,
    RegisterAck,
    SamplingParams,
    Usage,
    decode_frames,
    encode_frames,
    negotiate,
)
from lmgw.transport.tensors import pack_tensors, unpack_tensors
from lmgw.transport.zmq import (
    ChannelState,
    PeerUnreachable,
    ReceiveTimeout,
    RpcChannel,
    RpcError,
    SendBlocked,
    ZmqSocket,
)

BOUND = 20.0  # no single test step may take longer than this (fails instead of hanging)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``pred()`` holds."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


# == the socket wrapper ========================================================================


async def test_100k_messages_in_order(ctx: zmq.Context) -> None:
    n = 100_000
    with ZmqSocket.open(ctx, zmq.PULL) as pull, ZmqSocket.open(ctx, zmq.PUSH) as push:
        push.connect(pull.bind("tcp://127.0.0.1:*"))

        async def sender() -> None:
            for i in range(n):
                await push.send_multipart([i.to_bytes(4, "little"), b"x" * 32])

        started = time.perf_counter()
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                for i in range(n):
                    seq, body = await pull.recv_multipart()
                    assert int.from_bytes(seq, "little") == i
                    assert body == b"x" * 32
        elapsed = time.perf_counter() - started
    print(f"\n100k one-way through the wrapper: {n / elapsed:,.0f} msgs/s")
    assert push.sent == pull.received == n


async def _recv(dealer: ZmqSocket) -> list:
    return await dealer.recv_multipart()


async def _reader_loop_recv(dealer: ZmqSocket) -> list:
    """The channel's reader loop: ``try_recv_multipart``, and on None
    ``wait_recv_ready(checked=True)``, which reads EVENTS neither before waiting nor after
    the wake-up."""
    while (frames := dealer.try_recv_multipart()) is None:
        await dealer.wait_recv_ready(checked=True)
    return frames


async def _pending_loop_recv(dealer: ZmqSocket) -> list:
    """The channel's reader after a batch: ``recv_pending`` (EVENTS) instead of a failed
    receive, then ``wait_recv_ready(checked=True)`` when nothing is queued."""
    while not dealer.recv_pending():
        await dealer.wait_recv_ready(checked=True)
    frames = dealer.try_recv_multipart()  # (no checkpoint since: it is still queued)
    assert frames is not None
    return frames


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:*", "inproc://share"])
@pytest.mark.parametrize(
    "receive",
    [_recv, _reader_loop_recv, _pending_loop_recv],
    ids=["recv", "reader-loop", "pending-loop"],
)
async def test_sender_and_receiver_tasks_share_one_socket(
    ctx: zmq.Context, endpoint: str, receive: Callable[[ZmqSocket], Awaitable[list]]
) -> None:
    """Sends in one task consume ZMQ_FD edges the receiving task needs: without the re-check
    after every op (and the kick it sends the task waiting on the fd) the receiver sleeps
    forever (the bound turns that into a failure). A small window of requests in flight, as
    in real RPC, makes that reliable."""
    n, window = 5_000, 4
    for _ in range(3):  # (whether a send takes an edge is timing: a round rarely has none)
        with ZmqSocket.open(ctx, zmq.ROUTER) as router, ZmqSocket.open(ctx, zmq.DEALER) as dealer:
            dealer.connect(router.bind(endpoint))
            credits = trio.Semaphore(window)

            async def echo(router: ZmqSocket = router) -> None:
                while True:
                    await router.send_multipart(await router.recv_multipart())

            async def sender(dealer: ZmqSocket = dealer, credits: trio.Semaphore = credits) -> None:
                for i in range(n):
                    await credits.acquire()
                    await dealer.send_multipart([b"%d" % i])

            got = []
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(echo)
                    nursery.start_soon(sender)
                    for _ in range(n):
                        got.append(int((await receive(dealer))[0]))
                        credits.release()
                    nursery.cancel_scope.cancel()
        assert got == list(range(n))
        if dealer.kicks > 0:
            break
    assert dealer.kicks > 0  # the sends did consume edges: the case was exercised


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hwm=st.integers(1, 50),
    senders=st.integers(1, 8),
    receivers=st.integers(1, 8),
    per_sender=st.integers(1, 400),
    copy=st.booleans(),
)
async def test_many_tasks_wait_on_one_socket(
    hwm: int, senders: int, receivers: int, per_sender: int, copy: bool
) -> None:
    """Many tasks block on the same sockets (senders on a full queue, receivers on an empty
    one): one waits on the fd, the rest park; every message arrives exactly once."""
    total = senders * per_sender
    got: collections.Counter[bytes] = collections.Counter()
    context = zmq.Context()
    try:
        with (
            ZmqSocket.open(context, zmq.PULL, hwm=hwm) as pull,
            ZmqSocket.open(context, zmq.PUSH, hwm=hwm, send_timeout=None) as push,
        ):
            push.connect(pull.bind("inproc://many"))

            async def sender(s: int) -> None:
                for i in range(per_sender):
                    await push.send_multipart([b"%d:%d" % (s, i)], copy=copy)

            async def receiver() -> None:
                while sum(got.values()) < total:
                    frames = await pull.recv_multipart(copy=copy)
                    got[bytes(frames[0])] += 1
                    if sum(got.values()) >= total:
                        nursery.cancel_scope.cancel()  # wake the other receivers

            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    for r in range(receivers):
                        nursery.start_soon(receiver, name=f"receiver-{r}")
                    for s in range(senders):
                        nursery.start_soon(sender, s, name=f"sender-{s}")
    finally:
        context.destroy(linger=0)
    expected = {b"%d:%d" % (s, i) for s in range(senders) for i in range(per_sender)}
    assert set(got) == expected
    assert set(got.values()) == {1}


async def test_full_queue_raises_send_blocked_and_resumes_when_read(ctx: zmq.Context) -> None:
    with (
        ZmqSocket.open(ctx, zmq.ROUTER, hwm=4) as router,
        ZmqSocket.open(ctx, zmq.DEALER, hwm=4) as dealer,
    ):
        dealer.connect(router.bind("inproc://hwm"))
        sent = 0
        with pytest.raises(SendBlocked, match="SNDHWM=4"):
            while sent < 1000:  # the queue holds SNDHWM + the peer's RCVHWM; never 1000
                await dealer.send_multipart([b"m"], timeout=0)
                sent += 1
        assert 4 <= sent < 1000
        with pytest.raises(SendBlocked, match="not reading"):
            await dealer.send_multipart([b"m"], timeout=0.05)

        # a send waiting for room completes as soon as the peer reads (a POLLOUT wake-up)
        async def drain_later() -> None:
            await trio.sleep(0.05)
            for _ in range(sent):
                await router.recv_multipart()

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_later)
                await dealer.send_multipart([b"last"], timeout=BOUND)
            frames = await router.recv_multipart(timeout=BOUND)
        assert frames[1] == b"last"


async def test_immediate_sends_nothing_to_a_peer_that_is_not_there(ctx: zmq.Context) -> None:
    with ZmqSocket.open(ctx, zmq.DEALER, immediate=True) as dealer:
        dealer.connect("ipc:///nonexistent/lmgw-test.sock")
        with pytest.raises(SendBlocked):
            await dealer.send_multipart([b"hello"], timeout=0.02)


async def test_router_mandatory_reports_unknown_peer(ctx: zmq.Context) -> None:
    with ZmqSocket.open(ctx, zmq.ROUTER) as router:
        router.bind("tcp://127.0.0.1:*")
        with pytest.raises(PeerUnreachable):
            await router.send_multipart([b"nobody", b"hello"])
        with pytest.raises(PeerUnreachable):
            router.try_send_multipart([b"nobody", b"hello"])


async def test_recv_pending_says_whether_a_message_is_queued(ctx: zmq.Context) -> None:
    with ZmqSocket.open(ctx, zmq.PULL) as pull, ZmqSocket.open(ctx, zmq.PUSH) as push:
        push.connect(pull.bind("tcp://127.0.0.1:*"))
        assert not pull.recv_pending()
        await push.send_multipart([b"one"])
        with trio.fail_after(BOUND):
            while not pull.recv_pending():
                await pull.wait_recv_ready(checked=True)
        assert pull.recv_pending()  # (asking again takes nothing)
        assert pull.try_recv_multipart() == [b"one"]
        assert not pull.recv_pending()
        pull.close()
        with pytest.raises(trio.ClosedResourceError):
            pull.recv_pending()


async def test_receive_timeout_cancel_and_close(ctx: zmq.Context) -> None:
    with ZmqSocket.open(ctx, zmq.PULL) as pull, ZmqSocket.open(ctx, zmq.PUSH) as push:
        push.connect(pull.bind("tcp://127.0.0.1:*"))
        with pytest.raises(ReceiveTimeout):
            await pull.recv_multipart(timeout=0.02)
        with trio.move_on_after(0.02) as scope:
            await pull.recv_multipart()
        assert scope.cancelled_caught
        # still usable after a timeout and a cancellation
        await push.send_multipart([b"after"])
        with trio.fail_after(BOUND):
            assert await pull.recv_multipart() == [b"after"]

        # closing wakes a waiting task with ClosedResourceError
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await pull.recv_multipart()
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                pull.close()
        assert len(errors) == 1
        with pytest.raises(trio.ClosedResourceError):
            await pull.recv_multipart()
        pull.close()  # idempotent


class LoopFrozen(AssertionError):
    """The event loop ran no other task for the watchdog's whole period."""


@contextlib.contextmanager
def loop_watchdog(seconds: float = BOUND) -> Iterator[None]:
    """A hard bound on the block that also holds when code spins without ever yielding:
    trio's deadlines cannot fire then, but a SIGALRM handler still runs between bytecodes."""

    def frozen(signum: int, frame: object) -> None:
        raise LoopFrozen(f"still running after {seconds:g}s: the event loop is frozen")

    previous = signal.signal(signal.SIGALRM, frozen)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def test_router_send_to_a_full_peer_backs_off_instead_of_spinning(ctx: zmq.Context) -> None:
    """With ROUTER_MANDATORY a ROUTER reports POLLOUT when *any* peer has room. A send to the
    one full peer used to retry at once, forever, without a checkpoint: the event loop froze
    (and the send timeout, a trio deadline, could never fire)."""
    with (
        ZmqSocket.open(ctx, zmq.ROUTER, hwm=2) as router,
        ZmqSocket.open(ctx, zmq.DEALER, hwm=2) as full,
        ZmqSocket.open(ctx, zmq.DEALER, hwm=2) as other,
    ):
        endpoint = router.bind("inproc://two-peers")
        full.connect(endpoint)
        other.connect(endpoint)
        await full.send_multipart([b"full"])
        await other.send_multipart([b"other"])
        ident = {}
        with trio.fail_after(BOUND):
            for _ in range(2):
                peer, body = await router.recv_multipart()
                ident[body] = peer
        queued = 0
        while router.try_send_multipart([ident[b"full"], b"x"]):  # `full` never reads
            queued += 1
            assert queued < 1000
        assert router.socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT  # `other` has room
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0)
                ticks += 1

        with loop_watchdog(), trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                with pytest.raises(SendBlocked, match="SNDHWM=2"):
                    await router.send_multipart([ident[b"full"], b"y"], timeout=0.1)
                assert ticks > 0  # the loop ran other tasks while the send waited
                # the other peer is served meanwhile, and the full one once it reads again
                await router.send_multipart([ident[b"other"], b"fine"])
                assert await other.recv_multipart() == [b"fine"]

                async def read_later() -> None:
                    await trio.sleep(0.02)
                    for _ in range(queued):
                        await full.recv_multipart()

                nursery.start_soon(read_later)
                await router.send_multipart([ident[b"full"], b"late"], timeout=BOUND)
                assert await full.recv_multipart() == [b"late"]
                nursery.cancel_scope.cancel()


async def test_close_with_linger_still_delivers_what_was_queued(ctx: zmq.Context, tmp_path) -> None:
    """``close(linger=ms)`` for graceful paths: a message queued for a peer that is not there
    yet goes out once it appears (``close()`` keeps LINGER=0: shutdown never waits)."""
    endpoint = f"ipc://{tmp_path}/late.sock"
    dealer = ZmqSocket.open(ctx, zmq.DEALER)  # no IMMEDIATE: queued until a peer connects
    dealer.connect(endpoint)
    await dealer.send_multipart([b"last words"])
    dealer.close(linger=10_000)
    assert dealer.closed
    dealer.close()  # still idempotent
    with ZmqSocket.open(ctx, zmq.ROUTER) as router:
        router.bind(endpoint)
        frames = await router.recv_multipart(timeout=BOUND)
    assert frames[1:] == [b"last words"]


# == a scripted worker ==========================================================================


class FakeWorker:
    """A worker on a ROUTER speaking the native protocol, scripted by the prompt.

    prompt "hang": accept, never answer; "slow": a delta every 10 ms until aborted;
    "fail": an engine_error Failure; "busy": refused as overloaded;
    anything else: ``max_tokens`` deltas then Finish. A Prefill with prompt "tensors" answers
    with two arrays in payload frames. ``control``: a second ROUTER answering Heartbeat and
    MetricsRequest only (named in the RegisterAck with ``ack_control``). ``batch``: agree on
    the capability (it then reads batches; it always answers message by message); False: an
    older worker that does not know it.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        bind: str,
        *,
        instance: str = "w1",
        versions: tuple[int, int] = (1, PROTOCOL_VERSION),
        hwm: int = 1000,
        deaf_after_register: bool = False,
        control: bool = False,
        ack_control: bool = False,
        batch: bool = True,
    ) -> None:
        self.ctx = ctx
        self.batch = batch
        self.batches_received = 0
        self.bind = bind
        self.instance = instance
        self.versions = versions
        self.hwm = hwm
        self.deaf_after_register = deaf_after_register
        self.control = control
        self.ack_control = ack_control
        self.control_endpoint: str | None = None
        self.control_received: list[Message] = []
        self.endpoint = ""
        self.clients: set[bytes] = set()
        self.aborted: list[str] = []
        self.received: list[Message] = []
        self.sock: ZmqSocket | None = None
        self.scope = trio.CancelScope()

    async def run(
        self, *, task_status: trio.TaskStatus[FakeWorker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with (
            self.scope,
            ZmqSocket.open(self.ctx, zmq.ROUTER, hwm=self.hwm) as sock,
            ZmqSocket.open(self.ctx, zmq.ROUTER) as control,
        ):
            self.sock = sock
            self.endpoint = sock.bind(self.bind)
            async with trio.open_nursery() as nursery:
                if self.control:
                    self.control_endpoint = control.bind("tcp://127.0.0.1:*")
                    nursery.start_soon(self.control_reader, control)
                task_status.started(self)
                while True:
                    frames = await sock.recv_multipart()
                    try:
                        incoming = decode_frames(frames, envelope=1)
                    except ProtocolError as exc:
                        await self.send(frames[0], Failure.of("", exc.code, str(exc)))
                        continue
                    if isinstance(incoming.msg, Batch):
                        assert self.batch, "a batch to a worker that did not agree on it"
                        self.batches_received += 1
                        for item in incoming.msg.messages:
                            await self.handle(nursery, frames[0], item)
                    else:
                        await self.handle(nursery, frames[0], incoming.msg)

    def stop(self) -> None:
        self.scope.cancel()

    async def control_reader(self, sock: ZmqSocket) -> None:
        while True:
            frames = await sock.recv_multipart()
            msg = decode_frames(frames, envelope=1).msg
            self.control_received.append(msg)
            if isinstance(msg, Heartbeat):
                reply: Message = HeartbeatAck(msg.request_id, self.instance, in_flight=7)
            elif isinstance(msg, MetricsRequest):
                reply = Metrics(msg.request_id, {"answered_on_control": 1.0})
            else:
                reply = Failure.of(getattr(msg, "request_id", ""), FailureCode.UNSUPPORTED, "no")
            await sock.send_multipart([frames[0], *encode_frames(reply)])

    async def send(self, ident: bytes, msg: Message) -> None:
        assert self.sock is not None
        try:
            await self.sock.send_multipart([ident, *encode_frames(msg)])
        except PeerUnreachable:
            pass

    async def handle(self, nursery: trio.Nursery, ident: bytes, msg: Message) -> None:
        self.received.append(msg)
        if isinstance(msg, Register):
            try:
                version, caps = negotiate(
                    msg,
                    min_version=self.versions[0],
                    max_version=self.versions[1],
                    capabilities=CAPABILITIES if self.batch else CAPABILITIES - {"batch"},
                )
            except ProtocolError as exc:
                await self.send(ident, Failure.of(msg.request_id, exc.code, str(exc)))
                return
            self.clients.add(ident)
            ack = RegisterAck(
                msg.request_id,
                version,
                sorted(caps),
                "fake",
                self.instance,
                ["decode"],
                ["m"],
                control_endpoint=self.control_endpoint if self.ack_control else None,
            )
            await self.send(ident, ack)
            if self.deaf_after_register:
                await trio.sleep_forever()
            return
        if ident not in self.clients:
            rid = getattr(msg, "request_id", "")
            await self.send(ident, Failure.of(rid, FailureCode.NOT_REGISTERED, "who are you?"))
            return
        if isinstance(msg, Heartbeat):
            await self.send(ident, HeartbeatAck(msg.request_id, self.instance, in_flight=1))
        elif isinstance(msg, Abort):
            self.aborted.append(msg.request_id)
        elif isinstance(msg, MetricsRequest):
            await self.send(ident, Metrics(msg.request_id, {"vllm:num_requests_running": 1.0}))
        elif isinstance(msg, Prefill) and msg.prompt == "tensors":
            refs, frames = pack_tensors(TENSORS)
            done = PrefillDone(msg.request_id, tensors=refs)
            assert self.sock is not None
            await self.sock.send_multipart([ident, *encode_frames(done, frames)])
        elif isinstance(msg, Prefill):
            await self.send(ident, PrefillDone(msg.request_id, {"remote_block_ids": [1, 2]}))
        elif isinstance(msg, Encode):
            await self.send(ident, EncodeDone(msg.request_id, [m.hash or "h" for m in msg.media]))
        elif isinstance(msg, Generate):
            if msg.prompt == "hang":
                return
            if msg.prompt == "fail":
                await self.send(ident, Failure.of(msg.request_id, FailureCode.ENGINE_ERROR, "boom"))
            elif msg.prompt == "busy":
                await self.send(ident, Failure.of(msg.request_id, FailureCode.OVERLOADED, "full"))
            elif msg.prompt == "slow":
                nursery.start_soon(self.slow_stream, ident, msg.request_id)
            else:
                n = msg.params.max_tokens or 3
                for i in range(n):
                    await self.send(ident, Delta(msg.request_id, i, f"{msg.request_id}/{i} ", [i]))
                await self.send(ident, Finish(msg.request_id, n, "length", usage=Usage(1, n)))

    async def slow_stream(self, ident: bytes, rid: str) -> None:
        for i in range(10_000):
            if rid in self.aborted:
                return
            await self.send(ident, Delta(rid, i, "."))
            await trio.sleep(0.01)


TENSORS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((2, 2), dtype=np.int64).T]


def gen(rid: str, prompt: str = "hello", max_tokens: int = 3) -> Generate:
    return Generate(rid, "m", prompt=prompt, params=SamplingParams(max_tokens=max_tokens))


async def start_worker(
    nursery: trio.Nursery, ctx: zmq.Context, bind: str = "tcp://127.0.0.1:*", **kw: object
) -> FakeWorker:
    return await nursery.start(FakeWorker(ctx, bind, **kw).run)  # type: ignore[arg-type]


async def start_channel(
    nursery: trio.Nursery, ctx: zmq.Context, endpoint: str, **kw: object
) -> RpcChannel:
    kw.setdefault("heartbeat_interval_s", 0.05)
    kw.setdefault("heartbeat_timeout_s", 0.5)
    kw.setdefault("reply_timeout_s", 5.0)
    ready = kw.pop("ready", True)
    chan: RpcChannel = await nursery.start(RpcChannel(endpoint, ctx=ctx, **kw).run)  # type: ignore[arg-type]
    if ready:
        with trio.fail_after(BOUND):
            await chan.wait_ready()
    return chan


async def collect(chan: RpcChannel, msg: Generate) -> tuple[str, Finish]:
    text = []
    async with chan.stream(msg) as events:
        async for event in events:
            if isinstance(event, Delta):
                text.append(event.text)
            else:
                assert isinstance(event, Finish)
                return "".join(text), event
    raise AssertionError("no Finish")


# == the channel ===============================================================================


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
async def test_many_concurrent_requests_on_one_channel(
    nursery: trio.Nursery, ctx: zmq.Context, batch: bool
) -> None:
    worker = await start_worker(nursery, ctx, batch=batch)
    chan = await start_channel(nursery, ctx, worker.endpoint)
    session = await chan.wait_ready()
    assert ("batch" in session.capabilities) is batch
    assert (session.version, session.instance, session.roles) == (
        PROTOCOL_VERSION,
        "w1",
        ("decode",),
    )

    tasks, per_task = 64, 20
    results: dict[str, str] = {}

    async def client(t: int) -> None:
        for i in range(per_task):
            rid = f"r{t}-{i}"
            n = 1 + (t + i) % 5
            text, finish = await collect(chan, gen(rid, max_tokens=n))
            assert finish.usage.completion_tokens == n
            results[rid] = text

    started = time.perf_counter()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as clients:
            for t in range(tasks):
                clients.start_soon(client, t)
    elapsed = time.perf_counter() - started
    print(f"\n{tasks} tasks on one channel: {tasks * per_task / elapsed:,.0f} streams/s")
    assert len(results) == tasks * per_task
    for rid, text in results.items():
        t, i = map(int, rid[1:].split("-"))
        assert text == "".join(f"{rid}/{k} " for k in range(1 + (t + i) % 5))
    # one-answer calls share the same socket
    done = await chan.call(Prefill("p1", "m", prompt_token_ids=[1, 2, 3]))
    assert done == PrefillDone("p1", {"remote_block_ids": [1, 2]})
    enc = await chan.call(Encode("e1", "m", [MediaItem("image", hash="abc")]))
    assert enc == EncodeDone("e1", ["abc"])
    assert await chan.metrics() == {"vllm:num_requests_running": 1.0}
    assert chan.in_flight == 0
    stats = chan.statistics()
    assert stats["stray"] == 0 and stats["outbox"] == 0
    # 64 tasks starting requests in the same scheduler passes: their Generates share sends
    assert (stats["batches_sent"] > 0) is (worker.batches_received > 0) is batch
    assert stats["batched_sent"] >= 2 * stats["batches_sent"]


async def test_idle_sends_at_once_busy_sends_after_the_pass(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    """No added latency when idle: with nothing else in flight the Generate is handed to
    ZeroMQ before the stream even opens. With other requests in flight it waits for the
    flusher, which sends what the scheduler pass queued in one message."""
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(  # no heartbeats on the data socket: they would count as sent
        nursery, ctx, worker.endpoint, heartbeat_interval_s=60.0, heartbeat_timeout_s=120.0
    )
    sent = chan.statistics()["sent"]
    with trio.fail_after(BOUND):
        async with chan.stream(gen("idle", prompt="hang")):
            stats = chan.statistics()  # no checkpoint since the stream opened
            assert (stats["sent"], stats["outbox"]) == (sent + 1, 0)
            async with (
                chan.stream(gen("busy-1", prompt="hang")),
                chan.stream(gen("busy-2", prompt="hang")),
            ):
                stats = chan.statistics()
                assert (stats["sent"], stats["outbox"]) == (sent + 1, 2)  # for the flusher
                await until(lambda: chan.statistics()["outbox"] == 0)
                assert chan.statistics()["sent"] == sent + 2  # both in one batch
                assert chan.statistics()["batches_sent"] == 1
        await until(lambda: {"idle", "busy-1", "busy-2"} <= set(worker.aborted))


async def test_old_and_new_peers_side_by_side(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    """A worker without the capability never gets a batch (FakeWorker asserts it), and a
    gateway without it sends none; both work next to batching peers, concurrently."""
    new_worker = await start_worker(nursery, ctx)
    old_worker = await start_worker(nursery, ctx, batch=False)
    chans = {
        "new-new": await start_channel(nursery, ctx, new_worker.endpoint),
        "new-old": await start_channel(nursery, ctx, old_worker.endpoint),
        "old-new": await start_channel(
            nursery, ctx, new_worker.endpoint, capabilities=CAPABILITIES - {"batch"}
        ),
    }
    texts: dict[str, str] = {}

    async def client(name: str, t: int) -> None:
        for i in range(5):
            rid = f"{name}:{t}-{i}"
            texts[rid], finish = await collect(chans[name], gen(rid, max_tokens=3))
            assert finish.seq == 3

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as clients:
            for name in chans:
                for t in range(16):
                    clients.start_soon(client, name, t)
    assert len(texts) == 3 * 16 * 5
    assert all(text == "".join(f"{rid}/{k} " for k in range(3)) for rid, text in texts.items())
    assert chans["new-new"].statistics()["batches_sent"] > 0
    assert chans["new-old"].statistics()["batching"] is False
    assert chans["old-new"].statistics()["batches_sent"] == 0
    assert new_worker.batches_received > 0 and old_worker.batches_received == 0


async def test_cancellation_sends_abort(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(nursery, ctx, worker.endpoint)
    with trio.move_on_after(0.05) as scope:
        async with chan.stream(gen("cancel-me", prompt="hang")) as events:
            async for _ in events:
                pass
    assert scope.cancelled_caught
    await until(lambda: "cancel-me" in worker.aborted)
    # leaving a stream early (the client went away) aborts too; the worker stops generating
    async with chan.stream(gen("leave-early", prompt="slow")) as events:
        async for event in events:
            assert isinstance(event, Delta)
            break
    await until(lambda: "leave-early" in worker.aborted)
    assert chan.in_flight == 0
    # a finished request is not aborted
    await collect(chan, gen("complete"))
    assert "complete" not in worker.aborted


async def test_reply_timeout_is_typed_and_aborts(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(nursery, ctx, worker.endpoint, reply_timeout_s=0.05)
    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await chan.call(gen("slowpoke", prompt="hang"))
    assert info.value.code is FailureCode.TIMEOUT
    await until(lambda: "slowpoke" in worker.aborted)
    # the timeout bounds each wait, not the whole stream: a slow but steady stream lives on
    async with chan.stream(gen("steady", prompt="slow"), timeout=BOUND) as events:
        assert events.timeout == BOUND
        events.timeout = 0.5  # e.g. a stall bound once the first event came
        seqs = []
        async for event in events:
            seqs.append(event.seq)
            if len(seqs) == 20:
                break
    assert seqs == list(range(20))
    async with chan.stream(gen("lowered", prompt="hang"), timeout=BOUND) as events:
        events.timeout = 0.05
        with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
            await events.__anext__()
    assert info.value.code is FailureCode.TIMEOUT
    async with chan.stream(gen("shared", prompt="hang")) as events, trio.open_nursery() as n:
        n.start_soon(events.__anext__)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):  # one reader per request
            await events.__anext__()
        n.cancel_scope.cancel()


async def test_worker_failures_are_typed(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(nursery, ctx, worker.endpoint)
    with pytest.raises(RpcError) as info:
        await chan.call(gen("bad", prompt="fail"))
    assert (info.value.code, info.value.message, info.value.retryable) == (
        FailureCode.ENGINE_ERROR,
        "boom",
        False,
    )
    assert info.value.sent  # it ran: retrying elsewhere would run it twice
    assert "bad" not in worker.aborted  # the worker ended it: nothing to abort
    with pytest.raises(RpcError) as info:
        await chan.call(gen("refused", prompt="busy"))
    assert (info.value.code, info.value.retryable, info.value.sent) == (
        FailureCode.OVERLOADED,
        True,
        False,
    )
    with pytest.raises(ValueError, match="already in flight"):
        async with chan.stream(gen("dup", prompt="hang")), chan.stream(gen("dup", prompt="hang")):
            pass


async def test_peer_disappears_and_comes_back(
    nursery: trio.Nursery, ctx: zmq.Context, tmp_path
) -> None:
    endpoint = f"ipc://{tmp_path}/worker.sock"
    states: list[ChannelState] = []
    first = await start_worker(nursery, ctx, endpoint, instance="first")
    chan = await start_channel(nursery, ctx, endpoint, on_state=lambda s, _r: states.append(s))
    await chan.wait_ready()
    errors: list[RpcError] = []

    async def in_flight(rid: str) -> None:
        try:
            await chan.call(gen(rid, prompt="hang"))
        except RpcError as exc:
            errors.append(exc)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as requests:
            for i in range(5):
                requests.start_soon(in_flight, f"h{i}")
            await until(lambda: chan.in_flight == 5)
            first.stop()  # the worker vanishes: no answers, no heartbeat acks
    assert [e.code for e in errors] == [FailureCode.UNAVAILABLE] * 5
    assert all(e.retryable for e in errors)
    assert chan.state is ChannelState.LOST
    with pytest.raises(RpcError) as info:  # while lost, new requests fail fast, unsent
        await chan.call(gen("while-lost"))
    assert (info.value.code, info.value.sent) == (FailureCode.UNAVAILABLE, False)

    await start_worker(nursery, ctx, endpoint, instance="second")
    await until(lambda: chan.state is ChannelState.READY, BOUND)
    assert chan.session is not None and chan.session.instance == "second"
    text, _ = await collect(chan, gen("again", max_tokens=2))
    assert text == "again/0 again/1 "
    assert states[:3] == [ChannelState.READY, ChannelState.LOST, ChannelState.READY]


async def test_quick_restart_is_noticed(nursery: trio.Nursery, ctx: zmq.Context, tmp_path) -> None:
    """A worker that restarts faster than the heartbeat timeout: the new instance does not know
    this gateway, the channel re-registers and fails what the old instance had."""
    endpoint = f"ipc://{tmp_path}/worker.sock"
    old = await start_worker(nursery, ctx, endpoint, instance="old")
    chan = await start_channel(nursery, ctx, endpoint, heartbeat_timeout_s=60.0)
    await chan.wait_ready()
    errors: list[RpcError] = []

    async def in_flight() -> None:
        try:
            await chan.call(gen("lost-in-restart", prompt="hang"))
        except RpcError as exc:
            errors.append(exc)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as requests:
            requests.start_soon(in_flight)
            await until(lambda: chan.in_flight == 1)
            old.stop()
            await start_worker(nursery, ctx, endpoint, instance="new")
    assert errors[0].code is FailureCode.UNAVAILABLE
    await until(lambda: chan.session is not None and chan.session.instance == "new", BOUND)
    await collect(chan, gen("after-restart"))


async def test_drain_and_exit_notices(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx)
    notices: list[Message] = []
    chan = await start_channel(
        nursery, ctx, worker.endpoint, on_notice=notices.append, heartbeat_timeout_s=60.0
    )
    await chan.wait_ready()
    ident = next(iter(worker.clients))
    await worker.send(ident, Drain("maintenance", 30.0))
    await until(lambda: chan.draining)
    errors: list[RpcError] = []

    async def in_flight() -> None:
        try:
            await chan.call(gen("doomed", prompt="hang"))
        except RpcError as exc:
            errors.append(exc)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as requests:
            requests.start_soon(in_flight)
            await until(lambda: chan.in_flight == 1)
            await worker.send(ident, Exit("sigterm", 1))
    assert errors[0].code is FailureCode.UNAVAILABLE and "sigterm" in errors[0].message
    assert notices == [Drain("maintenance", 30.0), Exit("sigterm", 1)]
    assert chan.state is ChannelState.LOST


async def test_garbage_from_the_worker_is_counted_and_ignored(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(nursery, ctx, worker.endpoint)
    await chan.wait_ready()
    ident = next(iter(worker.clients))
    assert worker.sock is not None
    for junk in ([b""], [b"\xff" * 10], [b"LGW\x01\x92\x63\xa0"], [b"LGW\x01" + b"\x91" * 5000]):
        await worker.sock.send_multipart([ident, *junk])
    await worker.send(ident, Abort("wrong-direction"))
    await until(lambda: chan.statistics()["malformed"] == 5)
    text, _ = await collect(chan, gen("still-fine", max_tokens=1))
    assert text == "still-fine/0 "


async def test_slow_consumer_fails_alone(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx)
    chan = await start_channel(nursery, ctx, worker.endpoint, stream_buffer=4)
    async with chan.stream(gen("glutton", max_tokens=50)) as events:
        await until(lambda: chan.statistics()["overflows"] == 1)
        got = 0
        with pytest.raises(RpcError) as info:
            async for _ in events:
                got += 1
    assert info.value.code is FailureCode.OVERLOADED
    assert got == 4  # what was buffered is still delivered, then the error
    await until(lambda: "glutton" in worker.aborted)
    await collect(chan, gen("others-unaffected"))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
async def test_worker_not_reading_gives_overloaded(
    nursery: trio.Nursery, ctx: zmq.Context, batch: bool
) -> None:
    """Unsent and typed, batched or not (batched, the flusher's send times out and fails the
    requests it held; the caller learns it at its first wait)."""
    worker = await start_worker(
        nursery, ctx, "inproc://deaf", hwm=2, deaf_after_register=True, batch=batch
    )
    chan = await start_channel(
        nursery, ctx, worker.endpoint, hwm=2, send_timeout_s=0.05, heartbeat_timeout_s=60.0
    )
    await chan.wait_ready()
    assert chan.statistics()["batching"] is batch
    codes = []
    with trio.fail_after(BOUND):
        for i in range(100):  # bounded: the queue is a few messages deep
            try:
                async with chan.stream(gen(f"q{i}", prompt="hang"), timeout=0.1) as events:
                    await events.__anext__()
            except RpcError as exc:
                if exc.code is FailureCode.TIMEOUT and exc.sent:
                    continue  # it went out; the worker does not read it
                codes.append((exc.code, exc.sent, "SNDHWM=2" in exc.message))
                break
    assert codes == [(FailureCode.OVERLOADED, False, True)]


async def test_no_common_version(nursery: trio.Nursery, ctx: zmq.Context) -> None:
    worker = await start_worker(nursery, ctx, versions=(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2))
    chan = await start_channel(nursery, ctx, worker.endpoint, ready=False)
    await until(lambda: chan.state is ChannelState.INCOMPATIBLE)
    with pytest.raises(RpcError) as info:
        await chan.call(gen("x"))
    assert (info.value.code, info.value.sent) == (FailureCode.UNSUPPORTED_VERSION, False)


async def test_channel_close_fails_in_flight(ctx: zmq.Context) -> None:
    errors: list[RpcError] = []
    async with trio.open_nursery() as outer:
        worker = await start_worker(outer, ctx)
        with trio.CancelScope() as chan_scope:
            async with trio.open_nursery() as inner:
                chan = await start_channel(inner, ctx, worker.endpoint)

                async def in_flight() -> None:
                    try:
                        await chan.call(gen("orphan", prompt="hang"))
                    except RpcError as exc:
                        errors.append(exc)

                outer.start_soon(in_flight)
                await until(lambda: chan.in_flight == 1)
                chan_scope.cancel()
        await until(lambda: bool(errors))
        outer.cancel_scope.cancel()
    assert errors[0].code is FailureCode.UNAVAILABLE
    assert chan.state is ChannelState.CLOSED


async def test_answers_received_before_the_worker_closed_are_not_lost(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    """With ``IMMEDIATE=1`` libzmq ends the DEALER's pipe when the connection drops and
    discards what it received but the app had not read yet (measured: 50 of 50). A worker that
    sends its last deltas, Finish and Exit and closes at once lost them all."""
    router = ZmqSocket.open(ctx, zmq.ROUTER)
    endpoint = router.bind("tcp://127.0.0.1:*")
    n = 50

    async def worker() -> None:
        while True:
            frames = await router.recv_multipart()
            ident, msg = frames[0], decode_frames(frames, envelope=1).msg
            if isinstance(msg, Register):
                ack = RegisterAck(msg.request_id, 1, [], "w", "i1", ["decode"], ["m"])
                await router.send_multipart(encode_frames(ack, envelope=[ident]))
            elif isinstance(msg, Generate):
                for i in range(n):
                    await router.send_multipart(
                        encode_frames(Delta(msg.request_id, i, f"{i} "), envelope=[ident])
                    )
                finish = Finish(msg.request_id, n, "length")
                await router.send_multipart(encode_frames(finish, envelope=[ident]))
                await router.send_multipart(encode_frames(Exit("done", 0), envelope=[ident]))
                router.close(linger=5_000)
                # Freeze the loop (deliberately blocking): the channel's reader cannot run
                # until the messages have arrived and the connection has dropped.
                time.sleep(0.3)
                return

    nursery.start_soon(worker)
    notices: list[Message] = []
    chan = await start_channel(
        nursery, ctx, endpoint, heartbeat_timeout_s=2.0, on_notice=notices.append
    )
    got: list[Message] = []
    with trio.fail_after(BOUND):
        async with chan.stream(gen("last-words", max_tokens=n)) as events:
            async for event in events:
                got.append(event)
    assert [type(m) for m in got] == [Delta] * n + [Finish]
    assert "".join(m.text for m in got[:-1]) == "".join(f"{i} " for i in range(n))
    await until(lambda: bool(notices))
    assert notices == [Exit("done", 0)]
    assert chan.state is ChannelState.LOST


async def test_answer_payload_frames_reach_the_caller(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    """``call_with_payload`` and ``RpcStream.payload``: the frames an answer's ``tensors``
    reference, decoded back to the worker's arrays."""
    worker = await start_worker(nursery, ctx)
    for copy in (True, False):
        chan = await start_channel(nursery, ctx, worker.endpoint, recv_copy=copy)
        done, frames = await chan.call_with_payload(Prefill(f"t{copy}", "m", prompt="tensors"))
        assert isinstance(done, PrefillDone) and len(done.tensors) == len(frames) == 2
        for got, want in zip(unpack_tensors(done.tensors, frames), TENSORS, strict=True):
            np.testing.assert_array_equal(got, want)
        async with chan.stream(Prefill(f"s{copy}", "m", prompt="tensors")) as events:
            assert events.payload == []
            async for event in events:
                assert isinstance(event, PrefillDone)
                assert [bytes(f) for f in events.payload] == [bytes(f) for f in frames]
        async with chan.stream(gen(f"g{copy}", max_tokens=2)) as events:
            async for _ in events:
                assert events.payload == []  # answers without payload have none
        # the one-answer API is unchanged
        assert await chan.call(Prefill(f"c{copy}", "m", prompt="x")) == PrefillDone(
            f"c{copy}", {"remote_block_ids": [1, 2]}
        )


async def test_no_worker_is_a_clear_error_not_a_queue(
    nursery: trio.Nursery, ctx: zmq.Context, tmp_path
) -> None:
    """Without IMMEDIATE a DEALER would queue for a worker that is not there; the connection
    state (socket monitor) refuses instead, at once and unsent, and nothing piles up."""
    endpoint = f"ipc://{tmp_path}/later.sock"
    chan = await start_channel(nursery, ctx, endpoint, ready=False, ready_timeout_s=0.1)
    with pytest.raises(RpcError) as info, trio.fail_after(BOUND):
        await chan.call(gen("nobody"))
    assert (info.value.code, info.value.sent) == (FailureCode.UNAVAILABLE, False)
    stats = chan.statistics()
    assert stats["connected"] is False and stats["sent"] == 0  # not even a Register queued
    worker = await start_worker(nursery, ctx, endpoint)
    await until(lambda: chan.state is ChannelState.READY, BOUND)
    text, _ = await collect(chan, gen("finally", max_tokens=1))
    assert text == "finally/0 "
    assert [type(m) for m in worker.received].count(Register) == 1


async def test_heartbeats_and_metrics_use_the_control_endpoint(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    worker = await start_worker(nursery, ctx, control=True)
    chan = await start_channel(
        nursery, ctx, worker.endpoint, control_endpoint=worker.control_endpoint
    )
    await until(lambda: chan.statistics()["control_acks"] >= 3)
    assert chan.peer_load is not None and chan.peer_load.in_flight == 7  # the control's ack
    assert await chan.metrics() == {"answered_on_control": 1.0}
    assert not [m for m in worker.received if isinstance(m, Heartbeat | MetricsRequest)]
    assert {type(m) for m in worker.control_received} == {Heartbeat, MetricsRequest}
    text, _ = await collect(chan, gen("data", max_tokens=1))  # data still on the data socket
    assert text == "data/0 "


async def test_control_acks_keep_a_stuck_data_connection_alive(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    """A worker whose data connection is stuck (here: it stopped reading it) but whose control
    endpoint answers is alive: heartbeat acks there count, as the worker library intends."""
    worker = await start_worker(nursery, ctx, control=True, deaf_after_register=True)
    chan = await start_channel(
        nursery,
        ctx,
        worker.endpoint,
        control_endpoint=worker.control_endpoint,
        heartbeat_interval_s=0.02,
        heartbeat_timeout_s=0.2,
    )
    # 30 acks, one per tick, span well over the 0.2 s heartbeat timeout
    await until(lambda: chan.statistics()["control_acks"] >= 30, BOUND)
    assert chan.state is ChannelState.READY


async def test_control_endpoint_named_in_the_register_ack(
    nursery: trio.Nursery, ctx: zmq.Context
) -> None:
    worker = await start_worker(nursery, ctx, control=True, ack_control=True)
    plain = await start_channel(nursery, ctx, worker.endpoint)  # not asked to: no control
    chan = await start_channel(nursery, ctx, worker.endpoint, control_from_ack=True)
    await until(lambda: chan.statistics()["control_acks"] >= 2)
    assert chan.control_endpoint == worker.control_endpoint
    assert plain.control_endpoint is None and plain.statistics()["control_acks"] == 0


def test_control_endpoint_wildcard_host_is_the_data_host() -> None:
    from lmgw.transport.zmq.channel import _resolve_control

    assert _resolve_control("tcp://0.0.0.0:7001", "tcp://10.0.0.5:7000") == "tcp://10.0.0.5:7001"
    assert _resolve_control("tcp://[::]:7001", "tcp://[fd00::5]:7000") == "tcp://[fd00::5]:7001"
    assert _resolve_control("tcp://10.0.0.9:7001", "tcp://10.0.0.5:7000") == "tcp://10.0.0.9:7001"
    assert _resolve_control("ipc:///run/w-ctl", "ipc:///run/w") == "ipc:///run/w-ctl"
