"""The gateway's end of the native protocol: one DEALER per worker, many requests over it.

Why DEALER (gateway, connects) to ROUTER (worker, binds):

* Request/reply and streaming need both directions on one connection; PUSH/PULL (the seed)
  needs two sockets per link and made workers open sockets to whatever ``proxy_addr`` a request
  named. With DEALER/ROUTER the worker answers on the connection the request came in on, and
  several gateways can share a worker (its ROUTER tells them apart).
* One DEALER per worker keeps a worker's failures, HWM and heartbeats to itself and spreads the
  load over one owner task per worker, instead of one gateway ROUTER task for the whole fleet.
  The worker's address is known from discovery, like an HTTP worker's URL.
* No ``IMMEDIATE``: with it, libzmq ends the pipe when the connection drops and discards
  what was received but not yet read (measured: 50 of 50 messages, the last deltas, Finish
  and Exit of a worker that closed right after sending them). Instead a *socket monitor*
  tracks the connection: requests are refused at once, unsent, while there is no connection
  (a worker that is not there is a clear error, not a silent queue; seed weakness 7), and a
  dropped connection makes the channel LOST as soon as the reader has taken what arrived
  before it. A message that was queued in the instant before the drop reaches the next
  connection, which the worker sees as a new, unregistered peer and refuses.

Ownership: :meth:`RpcChannel.run` owns the socket and four tasks: the *reader* (the only task
that waits for incoming messages; it routes them by request id into per-request bounded
queues and never blocks on a slow consumer), the *control* task (registration, heartbeats,
liveness, queued aborts), the *monitor* (connection state) and the *flusher*. Request tasks
send directly (a send that finds room never waits) and wait on their own queue, each wait
bounded by a timeout. With a worker that agreed on the ``batch`` capability, request tasks
and aborts queue their messages in an :class:`~lmgw.protocol.outbox.Outbox` instead; the
flusher, woken by the first, runs after the scheduler pass and sends what the pass queued as
one ZeroMQ message (a ``Batch``; an idle channel sends the first one at once). A lone message
waits for nothing, the messages of one pass share a send, and a send that stays blocked for
``send_timeout_s`` fails the requests it held, unsent.
An optional *control endpoint* gets a second DEALER and its own reader: heartbeats and metrics
go there, so they never queue behind large payloads on the data connection.

Failure policy (a request never hangs): a worker :class:`~lmgw.protocol.Failure` raises
:class:`RpcError` with its code; no answer within the per-wait timeout raises TIMEOUT; a worker
that sends nothing (not even a heartbeat ack) for ``heartbeat_timeout_s``, that says Exit, or
that restarted (its ``instance`` changed) fails every request in flight with UNAVAILABLE; a
consumer that falls ``stream_buffer`` events behind fails with OVERLOADED. A request that ends
early for any reason (cancelled scope, timeout, error, the caller stopped iterating) sends
ABORT, so the worker stops generating.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
import zmq
from trio.lowlevel import Abort as Abort_
from trio.lowlevel import (
    Task,
    cancel_shielded_checkpoint,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from ...protocol.messages import (
    CAPABILITIES,
    MIN_PROTOCOL_VERSION,
    NOT_STARTED_CODES,
    PROTOCOL_VERSION,
    RETRYABLE_CODES,
    TO_GATEWAY,
    Abort,
    Batch,
    Delta,
    Drain,
    EncodeDone,
    Exit,
    Failure,
    FailureCode,
    Finish,
    Heartbeat,
    HeartbeatAck,
    Incoming,
    Message,
    Metrics,
    MetricsRequest,
    PrefillDone,
    ProtocolError,
    Register,
    RegisterAck,
    decode_frames,
    encode_frames,
)
from ...protocol.outbox import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_BYTES, Outbox
from ..shm_host import host_id as shm_host_id
from .socket import CHECKPOINT_EVERY, DEFAULT_HWM, SendBlocked, ZmqSocket
from .wakeup import Wakeup

if TYPE_CHECKING:
    from .curve import CurveClient

__all__ = ["ChannelState", "RpcChannel", "RpcError", "RpcStream", "Session"]

log = logging.getLogger("lmgw.transport.zmq")

_TERMINAL = (Finish, PrefillDone, EncodeDone, Metrics)
_FIRST_RETRY_S = 0.005  # first re-try of a Register that found no connection
_INTERNAL_PREFIX = "~"  # ids of the channel's own Register/Heartbeat messages
_CONTROL_HWM = 64  # heartbeats and metrics only
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_DISCONNECTED
)
_EVENT = struct.Struct("=HI")  # a monitor event's first frame: event id, value
_REDIAL_MIN_S = 0.5  # after a refused handshake (libzmq does not retry those itself)...
_REDIAL_MAX_S = 30.0  # ...doubling up to this
_ABORT_META = "abort"  # an Abort's meta in the outbox (a request's is its _Route)


class ChannelState(enum.Enum):
    CONNECTING = "connecting"  # no session yet (or the worker restarted): registering
    READY = "ready"
    LOST = "lost"  # no traffic for heartbeat_timeout_s, or the worker said Exit
    INCOMPATIBLE = "incompatible"  # no common protocol version
    CLOSED = "closed"


class RpcError(Exception):
    """A request failed: the worker said so, or the channel gave up on it.

    ``sent`` is False when the worker cannot have started the request (it never left the
    gateway, or the worker refused it up front), so retrying it elsewhere cannot run it twice.
    """

    def __init__(
        self,
        code: FailureCode,
        message: str,
        *,
        retryable: bool | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retryable = code in RETRYABLE_CODES if retryable is None else retryable
        self.sent = sent

    @classmethod
    def from_failure(cls, failure: Failure) -> RpcError:
        code = failure.failure_code
        return cls(
            code, failure.message, retryable=failure.retryable, sent=code not in NOT_STARTED_CODES
        )


class Session:
    """What registration agreed on, and what the worker said it is."""

    __slots__ = (
        "capabilities",
        "instance",
        "max_inflight",
        "models",
        "roles",
        "shm",
        "version",
        "worker_id",
    )

    def __init__(self, ack: RegisterAck, host: str = "") -> None:
        self.version = ack.version
        self.capabilities = frozenset(ack.capabilities)
        self.worker_id = ack.worker_id
        self.instance = ack.instance
        self.roles = tuple(ack.roles)
        self.models = tuple(ack.models)
        self.max_inflight = ack.max_inflight
        #: big tensors may travel as shared-memory handles: both sides agreed on tensor_shm
        #: and share a host (``host``: this side's ``shm.host_id()``)
        self.shm = "tensor_shm" in self.capabilities and bool(host) and ack.host == host

    def __repr__(self) -> str:
        return (
            f"<Session v{self.version} worker={self.worker_id} instance={self.instance} "
            f"roles={list(self.roles)}>"
        )


class _Route:
    """The gateway's end of one request in flight: a bounded queue the reader fills and one
    request task drains. (Lighter than a trio memory channel and a cancel scope per wait: the
    reader reschedules the waiting task directly, and the control task enforces deadlines.)"""

    __slots__ = (
        "deadline",
        "ended",
        "failure",
        "items",
        "request_id",
        "sent",
        "size",
        "timed_out",
        "waiter",
    )

    def __init__(self, request_id: str, size: int) -> None:
        self.request_id = request_id
        self.size = size
        # a Message, or an Incoming when it came with payload frames
        self.items: collections.deque[Message | Incoming] = collections.deque()
        self.ended = False  # no more messages will come
        self.failure: RpcError | None = None
        self.sent = False
        self.waiter: Task | None = None
        self.deadline = math.inf  # of the current wait
        self.timed_out = False

    def push(self, item: Message | Incoming) -> bool:
        """Queue a message (reader side); False when the consumer is ``size`` behind."""
        if self.ended or len(self.items) >= self.size:
            return False
        self.items.append(item)
        self.wake()
        return True

    def end(self, error: RpcError | None = None) -> None:
        """No more messages; ``error`` is raised after anything already queued."""
        if error is not None and self.failure is None and not self.ended:
            self.failure = error
        self.ended = True
        self.wake()

    def wake(self) -> None:
        task = self.waiter
        if task is not None:
            self.waiter = None
            reschedule(task)

    def _abort_wait(self, _: Any) -> Abort_:
        self.waiter = None
        return Abort_.SUCCEEDED


class _CallbackRoute(_Route):
    """A route whose messages go to ``on_item`` as the reader dispatches them, and whose end
    to ``on_end`` (with the failure, or None): no task waits on it. The compiled lane's
    requests (:meth:`RpcChannel.open_nowait`) are answered from the reader that way. With
    ``on_deltas``, the Deltas of one received batch come together, in one call at the batch's
    end (or before the next message of the request). The callbacks run inside the reader's
    dispatch: they must not raise, nor open routes."""

    __slots__ = ("on_deltas", "on_end", "on_item")

    def __init__(
        self,
        request_id: str,
        on_item: Callable[[Message | Incoming], None],
        on_end: Callable[[RpcError | None], None],
        on_deltas: Callable[[list[Delta]], None] | None = None,
    ) -> None:
        super().__init__(request_id, _CALLBACK_BURST if on_deltas is not None else 0)
        self.on_item = on_item
        self.on_end = on_end
        self.on_deltas = on_deltas

    def push(self, item: Message | Incoming) -> bool:
        if self.ended:
            return False
        if self.items:
            self.flush()
        self.on_item(item)
        return True

    def flush(self) -> None:
        """The Deltas queued in a batch, to ``on_deltas``."""
        burst = list(self.items)
        self.items.clear()
        self.on_deltas(burst)  # type: ignore[misc]

    def end(self, error: RpcError | None = None) -> None:
        if self.ended:
            return
        if self.items:
            self.flush()
        self.ended = True
        self.failure = error
        self.on_end(error)


#: Deltas of one batch a callback route collects before it hands them on (a batch holds
#: DEFAULT_MAX_BATCH messages at most: this is never reached with a batching worker)
_CALLBACK_BURST = 1 << 16


class RpcChannel:
    """Many concurrent requests to one worker over one DEALER socket.

    Run it in a nursery and use it while it runs::

        chan = await nursery.start(RpcChannel("tcp://10.0.0.5:7000").run)
        done = await chan.call(Prefill(rid, model, prompt=...))        # one answer
        done, frames = await chan.call_with_payload(Encode(rid, model, media))
        async with chan.stream(Generate(rid, model, prompt=...)) as events:
            async for event in events:                                 # Delta..., Finish
                events.payload                                         # its payload frames
    """

    def __init__(
        self,
        endpoint: str,
        *,
        ctx: zmq.Context | None = None,
        client_id: str = "lmgw",
        hwm: int = DEFAULT_HWM,
        send_timeout_s: float = 1.0,
        reply_timeout_s: float = 60.0,
        ready_timeout_s: float = 5.0,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        stream_buffer: int = 256,
        max_inflight: int = 4096,
        max_msg_size: int = 256 << 20,
        recv_copy: bool = True,
        capabilities: frozenset[str] = CAPABILITIES,
        on_state: Callable[[ChannelState, str], None] | None = None,
        on_notice: Callable[[Drain | Exit], None] | None = None,
        control_endpoint: str | None = None,
        control_from_ack: bool = False,
        curve: CurveClient | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        """Timeouts in seconds. ``reply_timeout_s`` bounds every single wait of a request
        (for a stream: the gap between two events), ``ready_timeout_s`` the wait for a session
        before the first registration succeeded. ``stream_buffer`` events may queue per request
        before a slow consumer fails; ``max_inflight`` requests may run at once.

        ``control_endpoint``: the worker's control ROUTER (``READY ... control=...``,
        ``Announce.control_endpoint``); heartbeats and metrics go there, on a connection of
        their own. ``control_from_ack``: without one, use the endpoint the worker names in
        ``RegisterAck.control_endpoint`` (a wildcard host becomes this endpoint's host).
        ``curve``: encrypt and authenticate both connections (:mod:`.curve`).

        ``max_batch`` / ``max_batch_bytes``: the bounds of one batch (capability ``batch``;
        leave ``"batch"`` out of ``capabilities`` to send every message on its own)."""
        self.endpoint = endpoint
        self.control_endpoint = control_endpoint
        self.control_from_ack = control_from_ack
        self._curve = curve
        self.client_id = client_id
        self.send_timeout_s = send_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stream_buffer = stream_buffer
        self.max_inflight = max_inflight
        self.capabilities = capabilities
        self._host = shm_host_id() if "tensor_shm" in capabilities else ""
        self._ctx = ctx
        self._hwm = hwm
        self._max_msg_size = max_msg_size
        self._recv_copy = recv_copy
        self._on_state = on_state
        self._on_notice = on_notice
        self._sock: ZmqSocket | None = None
        self._csock: ZmqSocket | None = None  # the control DEALER, while it runs
        self._control_cancel: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._connected = False  # the data connection completed its handshake
        self._register_sent_at = -math.inf
        self._routes: dict[str, _Route] = {}
        self._ids = itertools.count()
        self._aborts_send, self._aborts_recv = trio.open_memory_channel(1024)
        self._outbox = Outbox(max_batch=max_batch, max_batch_bytes=max_batch_bytes)
        self._outbox_cap = max(1024, 2 * max_inflight)
        self._batching = False  # the session agreed on "batch": sends go through the outbox
        self._flush_wakeup = Wakeup()  # the flusher sleeps there while the outbox is empty
        self._flush_due = False  # the flusher was woken and has not run yet (or is sending)
        self._state_changed = trio.Event()
        self._control_scope: trio.CancelScope | None = None
        self._fast = 0
        self._rx = 0  # messages received; the control task compares it between ticks
        self._rx_seen = -1
        self._last_rx_at = 0.0
        self.state = ChannelState.CONNECTING
        self.state_reason = "not registered yet"
        self.session: Session | None = None
        self.draining = False
        self.peer_load: HeartbeatAck | None = None
        self.stats = dict.fromkeys(
            (
                "requests",
                "failed",
                "aborts_sent",
                "aborts_dropped",
                "malformed",
                "stray",
                "overflows",
                "sessions",
                "disconnects",
                "handshake_failures",
                "redials",
                "control_acks",
                "batches_sent",
                "batched_sent",
                "batches_received",
            ),
            0,
        )

    # -- lifetime -----------------------------------------------------------------------------
    async def run(
        self, *, task_status: trio.TaskStatus[RpcChannel] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the sockets until cancelled; ``task_status.started(self)`` once connecting
        (registration goes on in the background: requests wait up to ``ready_timeout_s``)."""
        sock = self._open_dealer(self._hwm, self._max_msg_size, immediate=False)
        self._sock = sock
        monitor: ZmqSocket | None = None
        try:
            # inproc has no connection events (and no connection to lose): always connected
            if not self.endpoint.startswith("inproc://"):
                monitor = ZmqSocket(sock.socket.get_monitor_socket(_MONITOR_EVENTS))
            self._connected = monitor is None
            sock.connect(self.endpoint)
            self._last_rx_at = trio.current_time()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader, sock)
                nursery.start_soon(self._control, sock)
                nursery.start_soon(self._flusher, sock)
                if monitor is not None:
                    nursery.start_soon(self._monitor, monitor, sock)
                if self.control_endpoint:
                    self._start_control_socket(self.control_endpoint)
                task_status.started(self)
        finally:
            self._nursery = None
            self._set_state(ChannelState.CLOSED, "channel closed")
            self._fail_all(RpcError(FailureCode.UNAVAILABLE, f"channel to {self.endpoint} closed"))
            if monitor is not None:
                try:
                    sock.socket.disable_monitor()
                except zmq.ZMQError:
                    pass
                monitor.close()
            sock.close()

    def _open_dealer(self, hwm: int, max_msg_size: int, *, immediate: bool) -> ZmqSocket:
        options: dict[int, int | bytes] = {zmq.RECONNECT_IVL: 100, zmq.RECONNECT_IVL_MAX: 1000}
        if self._curve is not None:
            options.update(self._curve.socket_options())
        return ZmqSocket.open(
            self._ctx,
            zmq.DEALER,
            hwm=hwm,
            immediate=immediate,
            max_msg_size=max_msg_size,
            options=options,
            send_timeout=self.send_timeout_s,
        )

    # -- requests -----------------------------------------------------------------------------
    async def call(
        self, msg: Message, *, payload: Sequence[Any] = (), timeout: float | None = None
    ) -> Message:
        """Send a request and return its one answer (PrefillDone, EncodeDone, Metrics, or a
        Generate's Finish after its deltas are dropped). Raises RpcError."""
        return (await self.call_with_payload(msg, payload=payload, timeout=timeout))[0]

    async def call_with_payload(
        self, msg: Message, *, payload: Sequence[Any] = (), timeout: float | None = None
    ) -> tuple[Message, list[Any]]:
        """As :meth:`call`, with the answer's payload frames (the arrays its ``tensors``
        reference: ``lmgw.transport.tensors.unpack_tensors(answer.tensors, frames)``).
        Frames are bytes, or zmq Frames with ``recv_copy=False``."""
        async with self.stream(msg, payload=payload, timeout=timeout) as events:
            async for event in events:
                if not isinstance(event, Delta):
                    return event, events.payload
        raise RpcError(FailureCode.PROTOCOL, "the stream ended without an answer")

    def stream(
        self, msg: Message, *, payload: Sequence[Any] = (), timeout: float | None = None
    ) -> RpcStream:
        """``async with chan.stream(msg) as events: async for event in events`` - each wait
        bounded by ``timeout`` (default ``reply_timeout_s``). Leaving early sends ABORT."""
        return RpcStream(self, msg, payload, self.reply_timeout_s if timeout is None else timeout)

    async def metrics(self, *, timeout: float | None = None) -> dict[str, float]:
        """The worker's gauges; asked on the control connection when there is one."""
        msg = MetricsRequest(self._internal_id("m"))
        timeout = self.reply_timeout_s if timeout is None else timeout
        async with RpcStream(self, msg, (), timeout, control=True) as events:
            reply = await events.__anext__()
        if not isinstance(reply, Metrics):
            raise RpcError(FailureCode.PROTOCOL, f"a {type(reply).__name__} answered metrics")
        return reply.values

    async def wait_ready(self, timeout: float | None = None) -> Session:
        """The session, waiting up to ``timeout`` for a first registration; fails fast when
        the worker is lost, incompatible or the channel is closed."""
        if self.state is ChannelState.READY:
            assert self.session is not None
            return self.session
        if self.state is not ChannelState.CONNECTING:
            raise RpcError(self._state_code(), self.state_reason, sent=False)
        wait = self.ready_timeout_s if timeout is None else timeout
        with trio.move_on_after(wait):
            while self.state is ChannelState.CONNECTING:
                await self._state_changed.wait()
        if self.state is ChannelState.READY:
            assert self.session is not None
            return self.session
        if self.state is ChannelState.CONNECTING:
            raise RpcError(
                FailureCode.UNAVAILABLE,
                f"no session with {self.endpoint} within {wait:g}s ({self.state_reason})",
                sent=False,
            )
        raise RpcError(self._state_code(), self.state_reason, sent=False)

    def _state_code(self) -> FailureCode:
        if self.state is ChannelState.INCOMPATIBLE:
            return FailureCode.UNSUPPORTED_VERSION
        return FailureCode.UNAVAILABLE

    async def _open(
        self, request_id: str, msg: Message, payload: Sequence[Any], control: bool = False
    ) -> _Route:
        if self.state is not ChannelState.READY:
            await self.wait_ready()
        if not self._connected:  # between a dropped connection and the monitor's LOST
            raise RpcError(FailureCode.UNAVAILABLE, f"not connected to {self.endpoint}", sent=False)
        if request_id in self._routes:
            raise ValueError(f"request id {request_id!r} is already in flight on this channel")
        if len(self._routes) >= self.max_inflight:
            raise RpcError(
                FailureCode.OVERLOADED,
                f"{len(self._routes)} requests in flight to {self.endpoint}",
                sent=False,
            )
        sock = self._sock
        assert sock is not None
        route = _Route(request_id, self.stream_buffer)
        csock = self._csock
        if self._batching and not (control and csock is not None and not csock.closed):
            outbox = self._outbox
            if len(outbox) >= self._outbox_cap:
                raise RpcError(
                    FailureCode.OVERLOADED,
                    f"{len(outbox)} messages waiting to be sent to {self.endpoint}",
                    sent=False,
                )
            self._enqueue(sock, route, msg, payload)
            return route
        self._routes[request_id] = route
        self.stats["requests"] += 1
        frames = encode_frames(msg, payload)
        if control and csock is not None and not csock.closed:
            try:
                if csock.try_send_multipart(frames):
                    route.sent = True
                    return route
            except trio.ClosedResourceError:
                pass  # the control socket is being replaced: use the data connection
        try:
            await sock.send_multipart(frames, timeout=self.send_timeout_s)
        except SendBlocked as exc:
            self._drop(route)
            raise RpcError(FailureCode.OVERLOADED, f"{self.endpoint}: {exc}", sent=False) from None
        except trio.ClosedResourceError:
            self._drop(route)
            raise RpcError(FailureCode.UNAVAILABLE, "channel closed", sent=False) from None
        except BaseException:
            self._drop(route)
            raise
        route.sent = True
        return route

    def _enqueue(
        self, sock: ZmqSocket, route: _Route, msg: Message, payload: Sequence[Any]
    ) -> None:
        self._routes[route.request_id] = route
        self.stats["requests"] += 1
        route.sent = True  # it leaves now or with the next flush, or fails unsent (_flush)
        self._outbox.add(msg, payload, route)
        self._queued(sock)

    def open_nowait(
        self,
        msg: Message,
        on_item: Callable[[Message | Incoming], None],
        on_end: Callable[[RpcError | None], None],
        on_deltas: Callable[[list[Delta]], None] | None = None,
    ) -> _Route | None:
        """Send ``msg`` (a request without payload) and hand its answers to ``on_item`` as
        they come (a batch's Deltas to ``on_deltas`` together, when given), its end to
        ``on_end`` (None after the terminal message, else the failure), without a task
        waiting (see :class:`_CallbackRoute`); :meth:`cancel` stops it early.
        None when it cannot leave at once: no session or connection, a batching peer's outbox
        full, too many in flight, the id in flight already. :meth:`stream` then says why."""
        request_id: str = msg.request_id  # type: ignore[attr-defined]
        sock = self._sock
        if (
            self.state is not ChannelState.READY
            or not self._connected
            or not self._batching
            or sock is None
            or request_id in self._routes
            or len(self._routes) >= self.max_inflight
            or len(self._outbox) >= self._outbox_cap
        ):
            return None
        route = _CallbackRoute(request_id, on_item, on_end, on_deltas)
        self._enqueue(sock, route, msg, ())
        return route

    def cancel(self, route: _Route, reason: str) -> None:
        """Stop a request opened with :meth:`open_nowait` before its end: forgotten here,
        ABORT sent to the worker. Its ``on_end`` is not called."""
        self._finish(route, route.ended, reason)

    async def _receive(self, route: _Route, timeout: float) -> Message | Incoming:
        items = route.items
        if items:
            # Yield every 16 events, but only with a short queue (else drain it first): the
            # reader yields after every batch (64 messages at most by default) or 16 single
            # messages, and runs at most twice between two runs of this task (trio's random
            # order within a batch), so a consumer that keeps up never overflows.
            fast = self._fast + 1
            if fast >= 16 and len(items) < min(16, route.size >> 2):
                self._fast = 0
                await cancel_shielded_checkpoint()
            else:
                self._fast = fast
            return items.popleft()
        if route.ended:
            raise self._route_error(route)
        if route.waiter is not None:
            raise trio.BusyResourceError("another task is already reading this request")
        deadline = trio.current_time() + timeout
        route.deadline = deadline
        route.timed_out = False
        scope = self._control_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline  # the control task wakes in time to enforce it
        route.waiter = current_task()
        await wait_task_rescheduled(route._abort_wait)
        route.deadline = math.inf
        if items:
            return items.popleft()
        if route.ended:
            raise self._route_error(route)
        if route.timed_out:
            raise RpcError(
                FailureCode.TIMEOUT, f"no answer from {self.endpoint} within {timeout:g}s"
            )
        raise AssertionError("a request task was woken without a reason")

    def _route_error(self, route: _Route) -> RpcError:
        return route.failure or RpcError(FailureCode.PROTOCOL, "the request ended without answer")

    def _finish(self, route: _Route, completed: bool, reason: str) -> None:
        """Forget the route; ABORT it upstream unless it completed (or never left)."""
        self._drop(route)
        if not completed and route.sent and route.failure is None:
            self._abort(route.request_id, reason)

    def _drop(self, route: _Route) -> None:
        if self._routes.get(route.request_id) is route:
            del self._routes[route.request_id]
        route.ended = True

    def _abort(self, request_id: str, reason: str) -> None:
        """Send ABORT now if the queue has room, else leave it to the control task. Synchronous,
        so it works from a cancelled scope. Without a connection there is nothing to abort: the
        worker stops the request itself once it cannot send to this connection."""
        sock = self._sock
        if sock is None or sock.closed:
            return
        if not self._connected:
            self.stats["aborts_dropped"] += 1
            return
        if self._batching:
            outbox = self._outbox
            if len(outbox) >= self._outbox_cap:
                self.stats["aborts_dropped"] += 1
                return
            outbox.add(Abort(request_id, reason), (), _ABORT_META)
            self.stats["aborts_sent"] += 1  # taken back if the flush drops it
            self._queued(sock)
            return
        try:
            if sock.try_send_multipart(encode_frames(Abort(request_id, reason))):
                self.stats["aborts_sent"] += 1
                return
        except trio.ClosedResourceError:
            return
        try:
            self._aborts_send.send_nowait(request_id)
        except trio.WouldBlock:
            self.stats["aborts_dropped"] += 1

    # -- the flusher: the outbox's one sender (capability "batch") ----------------------------
    def _queued(self, sock: ZmqSocket) -> None:
        """A message was queued: wake the flusher, which runs after this scheduler pass and
        sends what the pass queued, together. With one request in flight at most (an idle
        channel: nothing else is likely to share the send) the message goes at once instead,
        so it waits for nothing, and the flusher is not woken for it: on an idle channel that
        wake-up was a scheduler pass per request. (One request sends nothing more in a pass
        but an abort, which may as well go at once too.)"""
        if self._flush_due:
            return  # the flusher takes it
        if len(self._routes) <= 1 and self._connected:
            outbox = self._outbox
            try:
                while outbox and sock.try_send_multipart(outbox.peek()):
                    self._sent(outbox.commit())
            except trio.ClosedResourceError:
                pass  # the flusher fails what is queued
            if not outbox:
                return
        self._flush_due = True
        self._flush_wakeup.wake()

    def _sent(self, n: int) -> None:
        if n > 1:
            self.stats["batches_sent"] += 1
            self.stats["batched_sent"] += n

    async def _flusher(self, sock: ZmqSocket) -> None:
        """Send what the outbox holds whenever it holds something (see :meth:`_queued`)."""
        outbox, wakeup = self._outbox, self._flush_wakeup
        while True:
            if outbox:
                await self._flush(sock)
                continue
            self._flush_due = False
            await wakeup.sleep()

    async def _flush(self, sock: ZmqSocket) -> None:
        outbox = self._outbox
        while outbox:
            if not self._connected or sock.closed:
                reason = "channel closed" if sock.closed else f"not connected to {self.endpoint}"
                self._drop_outbox(RpcError(FailureCode.UNAVAILABLE, reason, sent=False))
                return
            frames = outbox.peek()
            try:
                await sock.send_multipart(frames, timeout=self.send_timeout_s)
            except SendBlocked as exc:  # the worker read nothing for send_timeout_s
                error = RpcError(FailureCode.OVERLOADED, f"{self.endpoint}: {exc}", sent=False)
                self._drop_outbox(error)
                return
            except trio.ClosedResourceError:
                self._drop_outbox(RpcError(FailureCode.UNAVAILABLE, "channel closed", sent=False))
                return
            self._sent(outbox.commit())  # 0 when _fail_all emptied it meanwhile

    def _drop_outbox(self, error: RpcError | None) -> None:
        """Forget what is queued; fail its requests with ``error`` (None: their routes are
        being failed anyway)."""
        for meta in self._outbox.clear():
            if meta is _ABORT_META:
                self.stats["aborts_sent"] -= 1
                self.stats["aborts_dropped"] += 1
            elif error is not None and meta is not None:
                if self._routes.get(meta.request_id) is meta:
                    del self._routes[meta.request_id]
                meta.end(error)

    # -- the readers: the only tasks waiting for incoming messages ---------------------------
    async def _reader(self, sock: ZmqSocket) -> None:
        """Receive and dispatch. Frames are dispatched before any checkpoint, so at every
        checkpoint nothing received is held here: the monitor may then take the rest of the
        queue itself (:meth:`_drain`) without reordering anything. It yields after every
        batch and every ``CHECKPOINT_EVERY`` single messages, so the request tasks drain
        their queues between its runs: by waiting for the next message when none is queued
        (asked of EVENTS: no failed receive, no extra scheduler pass), else at a checkpoint."""
        copy = self._recv_copy
        fast = 0
        while True:
            frames = sock.try_recv_multipart(copy=copy)
            if frames is None:
                fast = 0
                await sock.wait_recv_ready(checked=True)
                continue
            fast += 1 if self._on_frames(frames) == 1 else CHECKPOINT_EVERY
            if fast >= CHECKPOINT_EVERY:
                fast = 0
                if sock.closed or sock.recv_pending():
                    await cancel_shielded_checkpoint()
                else:
                    await sock.wait_recv_ready(checked=True)

    def _drain(self, sock: ZmqSocket) -> None:
        """Dispatch whatever is queued on ``sock`` now, without waiting."""
        copy = self._recv_copy
        with_frames = sock.try_recv_multipart
        while not sock.closed and (frames := with_frames(copy=copy)) is not None:
            self._on_frames(frames)

    def _on_frames(self, frames: list[Any]) -> int:
        """Decode and dispatch one ZeroMQ message; return how many messages it held."""
        self._rx += 1
        try:
            incoming = decode_frames(frames)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            log.warning("malformed message from %s ignored: %s", self.endpoint, exc)
            return 1
        msg = incoming.msg
        if type(msg) is Batch:
            # each as if it had arrived alone; a request woken by the first of its messages
            # finds the rest queued when it runs (one wake-up per batch)
            self.stats["batches_received"] += 1
            dispatch = self._dispatch
            routes = self._routes
            items = msg.messages
            called: list[_Route] | None = None  # callback routes with Deltas queued
            for item in items:
                if type(item) is Delta:  # the bulk of a batch: queued here, no call each
                    route = routes.get(item.request_id)
                    if route is not None and not route.ended and len(route.items) < route.size:
                        route.items.append(item)
                        if route.waiter is not None:
                            route.wake()
                        elif type(route) is _CallbackRoute and len(route.items) == 1:
                            if called is None:
                                called = []
                            called.append(route)
                        continue
                dispatch(item, item)  # the rest, and the Deltas that are stray or overflow
            if called is not None:  # their bursts, in one call each
                for route in called:
                    if route.items and not route.ended:
                        route.flush()  # type: ignore[attr-defined]
            return len(items)
        self._dispatch(msg, incoming if incoming.payload else msg)
        return 1

    async def _control_reader(self, endpoint: str, scope: trio.CancelScope) -> None:
        """Own the control DEALER: heartbeats and metrics, on a connection of their own.
        ``IMMEDIATE``: nothing queues for a control endpoint that is not there (the heartbeat
        then goes over the data connection), and an ack lost with a connection is harmless."""
        with scope, self._open_dealer(_CONTROL_HWM, 1 << 20, immediate=True) as csock:
            csock.connect(endpoint)
            self._csock = csock
            try:
                copy = self._recv_copy
                while True:
                    frames = await csock.recv_multipart(copy=copy)
                    self._on_frames(frames)
            finally:
                if self._csock is csock:
                    self._csock = None

    def _start_control_socket(self, endpoint: str) -> None:
        """(Re)open the control DEALER at ``endpoint`` (a worker restart may move it)."""
        nursery = self._nursery
        if nursery is None:
            return
        if self._control_cancel is not None:
            self._control_cancel.cancel()
        self.control_endpoint = endpoint
        self._control_cancel = scope = trio.CancelScope()
        nursery.start_soon(self._control_reader, endpoint, scope, name="rpc control reader")

    # -- connection state (socket monitor) ----------------------------------------------------
    async def _monitor(self, monitor: ZmqSocket, sock: ZmqSocket) -> None:
        """Track the connection. A handshake refused by the worker (ZAP said no, or one side
        uses CURVE and the other does not) is final for libzmq; here it is re-dialled with a
        backoff, so fixing the allow-list or the worker's settings needs no gateway restart."""
        redial_at = math.inf
        delay = _REDIAL_MIN_S
        diagnosed = False  # a specific handshake failure seen since the last success
        while True:
            frames = None
            with trio.move_on_at(redial_at):
                frames = await monitor.recv_multipart()
            if frames is None:
                redial_at = math.inf
                self.stats["redials"] += 1
                try:
                    sock.socket.disconnect(self.endpoint)
                except zmq.ZMQError:
                    pass  # no session left to end
                sock.connect(self.endpoint)
                continue
            if len(frames) != 2 or len(frames[0]) != _EVENT.size:
                continue
            event, value = _EVENT.unpack(frames[0])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                delay = _REDIAL_MIN_S
                diagnosed = False
                self._connected = True
                if self.state in (ChannelState.CONNECTING, ChannelState.LOST):
                    self._send_register()  # at once, not at the next tick
            elif event == zmq.EVENT_DISCONNECTED:
                if not self._connected:
                    continue  # a handshake that failed: already reported
                self._connected = False
                self.stats["disconnects"] += 1
                # What arrived before the connection dropped is still queued (no IMMEDIATE):
                # deliver it first, so a last Finish or Exit is not turned into a failure.
                self._drain(sock)
                if self.state is ChannelState.READY:
                    self._lose("the connection to the worker closed")
            else:
                self.stats["handshake_failures"] += 1
                reason = _handshake_failure(event, value, self._curve is not None)
                log.warning("zmq channel %s: %s", self.endpoint, reason)
                vague = event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                # libzmq's own retries of a refused handshake often end with no detail (the
                # peer closed first); they must not hide the diagnosis an operator can act on.
                if self.state is not ChannelState.READY and not (vague and diagnosed):
                    self._set_state(self.state, reason)
                diagnosed = diagnosed or not vague
                if not vague:  # a vague one libzmq retries itself
                    redial_at = trio.current_time() + delay
                    delay = min(delay * 2, _REDIAL_MAX_S)

    def _dispatch(self, msg: Message, item: Message | Incoming) -> None:
        """Route ``msg``; ``item`` is what a request's queue keeps (``msg`` itself, or its
        Incoming when payload frames came with it)."""
        cls = type(msg)
        if cls is Delta or cls in _TERMINAL:
            route = self._routes.get(msg.request_id)  # type: ignore[attr-defined]
            if route is None:
                self.stats["stray"] += 1  # late answer to a request that ended
                return
            if not route.push(item):
                self.stats["overflows"] += 1
                route.end(
                    RpcError(
                        FailureCode.OVERLOADED,
                        f"consumer fell {self.stream_buffer} events behind",
                    )
                )
                del self._routes[route.request_id]
                self._abort(route.request_id, "consumer too slow")
                return
            if cls is not Delta:
                route.end()
                self._routes.pop(route.request_id, None)  # (a callback route may be gone)
        elif cls is Failure:
            self._on_failure(msg)  # type: ignore[arg-type]
        elif cls is HeartbeatAck:
            self._on_heartbeat_ack(msg)  # type: ignore[arg-type]
        elif cls is RegisterAck:
            self._on_register_ack(msg)  # type: ignore[arg-type]
        elif cls is Drain:
            self.draining = True
            self._notify(msg)  # type: ignore[arg-type]
        elif cls is Exit:
            self._lose(f"worker exited: {msg.reason}")  # type: ignore[attr-defined]
            self._notify(msg)  # type: ignore[arg-type]
        elif cls not in TO_GATEWAY:
            self.stats["malformed"] += 1
            log.warning("%s sent a %s, which only gateways send", self.endpoint, cls.__name__)

    def _on_failure(self, failure: Failure) -> None:
        rid = failure.request_id
        code = failure.failure_code
        route = self._routes.pop(rid, None)
        if route is not None:
            self.stats["failed"] += 1
            route.end(RpcError.from_failure(failure))
        if code is FailureCode.NOT_REGISTERED and self.state is ChannelState.READY:
            self._restarted("the worker does not know this gateway (restarted?)")
        if route is not None:
            return
        if rid.startswith(_INTERNAL_PREFIX):  # our own Register / Heartbeat
            if code is FailureCode.UNSUPPORTED_VERSION:
                self._set_state(ChannelState.INCOMPATIBLE, failure.message)
                self._fail_all(RpcError(code, failure.message, sent=False))
            elif code is not FailureCode.NOT_REGISTERED:
                log.warning("%s refused %s: %s", self.endpoint, rid, failure.message)
        elif rid:
            self.stats["stray"] += 1
        else:
            log.warning("%s could not read a message: %s", self.endpoint, failure.message)

    def _on_register_ack(self, ack: RegisterAck) -> None:
        if not MIN_PROTOCOL_VERSION <= ack.version <= PROTOCOL_VERSION:
            reason = f"worker chose protocol version {ack.version}, unsupported here"
            self._set_state(ChannelState.INCOMPATIBLE, reason)
            self._fail_all(RpcError(FailureCode.UNSUPPORTED_VERSION, reason))
            return
        old = self.session
        if old is not None and old.instance != ack.instance:
            self._fail_all(RpcError(FailureCode.UNAVAILABLE, "the worker restarted"))
        if self.control_from_ack and ack.control_endpoint:
            control = _resolve_control(ack.control_endpoint, self.endpoint)
            if control != self.control_endpoint or self._control_cancel is None:
                self._start_control_socket(control)
        self.session = Session(ack, self._host)
        self._batching = self._outbox.batching = "batch" in self.session.capabilities
        self.draining = False
        self.stats["sessions"] += 1
        self._last_rx_at = trio.current_time()
        self._set_state(ChannelState.READY, "registered")

    def _on_heartbeat_ack(self, ack: HeartbeatAck) -> None:
        if ack.request_id.startswith(_INTERNAL_PREFIX + "chb"):
            self.stats["control_acks"] += 1
        self.peer_load = ack
        self.draining = ack.draining
        session = self.session
        if session is not None and ack.instance != session.instance:
            self._restarted(f"the worker restarted (instance {session.instance} -> {ack.instance})")

    def _restarted(self, reason: str) -> None:
        self._fail_all(RpcError(FailureCode.UNAVAILABLE, reason))
        self._set_state(ChannelState.CONNECTING, reason)
        self._send_register()

    def _lose(self, reason: str) -> None:
        if self.state in (ChannelState.CLOSED, ChannelState.INCOMPATIBLE):
            return
        self._set_state(ChannelState.LOST, reason)
        self._fail_all(RpcError(FailureCode.UNAVAILABLE, f"{self.endpoint}: {reason}"))

    def _fail_all(self, error: RpcError) -> None:
        self._drop_outbox(None)  # requests of routes failed here, aborts for a lost session
        routes, self._routes = self._routes, {}
        for route in routes.values():
            route.end(error)

    def _set_state(self, state: ChannelState, reason: str) -> None:
        if state is self.state and reason == self.state_reason:
            return
        self.state, self.state_reason = state, reason
        self._state_changed.set()  # wake wait_ready() callers; they re-check the state
        self._state_changed = trio.Event()
        log.info("zmq channel %s: %s (%s)", self.endpoint, state.value, reason)
        if self._on_state is not None:
            self._on_state(state, reason)

    def _notify(self, msg: Drain | Exit) -> None:
        if self._on_notice is not None:
            self._on_notice(msg)

    # -- control: registration, heartbeats, liveness, queued aborts --------------------------
    async def _control(self, sock: ZmqSocket) -> None:
        interval = self.heartbeat_interval_s
        retry = _FIRST_RETRY_S
        next_tick = trio.current_time()
        while True:
            request_id = None
            with trio.move_on_at(min(next_tick, self._sweep(trio.current_time()))) as scope:
                self._control_scope = scope  # request tasks pull its deadline in (_receive)
                request_id = await self._aborts_recv.receive()
            self._control_scope = None
            if request_id is not None:
                try:
                    await sock.send_multipart(
                        encode_frames(Abort(request_id, "cancelled")), timeout=self.send_timeout_s
                    )
                    self.stats["aborts_sent"] += 1
                except SendBlocked:
                    self.stats["aborts_dropped"] += 1
            now = trio.current_time()
            if now < next_tick:
                continue
            if self._tick(now):
                retry = _FIRST_RETRY_S
                next_tick = now + interval
            else:  # no connection for a Register yet: retry soon, backing off
                next_tick = now + min(retry, interval)
                retry *= 2

    def _sweep(self, now: float) -> float:
        """Time out the waits whose deadline passed; return the earliest one left."""
        earliest = math.inf
        for route in self._routes.values():
            if route.waiter is not None:
                if route.deadline <= now:
                    route.timed_out = True
                    route.wake()
                elif route.deadline < earliest:
                    earliest = route.deadline
        return earliest

    def _tick(self, now: float) -> bool:
        """Liveness check and the message this tick owes. False: a Register could not be
        queued (no connection yet)."""
        if self._rx != self._rx_seen:
            self._rx_seen = self._rx
            self._last_rx_at = now
        if self.state is ChannelState.READY:
            silent = now - self._last_rx_at
            if silent <= self.heartbeat_timeout_s:
                if now - self._register_sent_at >= self.heartbeat_interval_s:
                    self._heartbeat()  # (a session younger than one interval needs no probe)
                return True
            self._lose(f"nothing received for {silent:.1f}s")
        if self.state in (ChannelState.CONNECTING, ChannelState.LOST):
            if self._connected and now - self._register_sent_at < self.heartbeat_interval_s:
                return True  # one is on its way (the monitor sends it on connecting)
            return self._send_register()
        return True

    def _send_register(self) -> bool:
        sent = self._try_send(
            Register(
                self._internal_id("reg"),
                self.client_id,
                MIN_PROTOCOL_VERSION,
                PROTOCOL_VERSION,
                sorted(self.capabilities),
                self._host,
            )
        )
        if sent:
            self._register_sent_at = trio.current_time()
        return sent

    def _heartbeat(self) -> None:
        """On the control connection if there is one (its ack is not stuck behind payloads
        on the data connection), else, or if it cannot take it now, on the data one."""
        csock = self._csock
        if csock is not None and not csock.closed:
            try:
                if csock.try_send_multipart(encode_frames(Heartbeat(self._internal_id("chb")))):
                    return
            except trio.ClosedResourceError:
                pass
        self._try_send(Heartbeat(self._internal_id("hb")))

    def _try_send(self, msg: Message) -> bool:
        sock = self._sock
        if sock is None or sock.closed or not self._connected:
            return False
        return sock.try_send_multipart(encode_frames(msg))

    def _internal_id(self, kind: str) -> str:
        return f"{_INTERNAL_PREFIX}{kind}-{os.getpid()}-{next(self._ids)}"

    # -- introspection ------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._routes)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["state"] = self.state.value
        out["connected"] = self._connected
        out["in_flight"] = len(self._routes)
        out["batching"] = self._batching
        out["outbox"] = len(self._outbox)
        if self._sock is not None:
            out.update(self._sock.statistics())
        return out

    def __repr__(self) -> str:
        return f"<RpcChannel {self.endpoint} {self.state.value} in_flight={len(self._routes)}>"


def _resolve_control(announced: str, data_endpoint: str) -> str:
    """The control endpoint a worker named, with a wildcard host (it bound ``0.0.0.0``)
    replaced by the host this channel reached its data endpoint at."""
    scheme, sep, rest = announced.partition("://")
    if scheme != "tcp" or not sep:
        return announced
    host, _, port = rest.rpartition(":")
    if host.strip("[]") not in ("0.0.0.0", "::", "*", ""):
        return announced
    data_scheme, _, data_rest = data_endpoint.partition("://")
    if data_scheme != "tcp":
        return announced
    return f"tcp://{data_rest.rpartition(':')[0]}:{port}"


def _handshake_failure(event: int, value: int, curve: bool) -> str:
    """A monitor's handshake failure, in words an operator can act on."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the worker refused this gateway's CURVE key (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            side = "the worker does not use CURVE" if curve else "the worker requires CURVE"
            return f"security mechanism mismatch: {side}"
        if curve and value in (
            zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC,
            zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE,
        ):
            return "CURVE handshake failed (is the worker's public key the right one?)"
        try:
            name = zmq.Event(value).name  # pyzmq names protocol errors in the same enum
        except ValueError:
            name = str(value)
        return f"handshake failed: protocol error {name}"
    if curve:
        return "CURVE handshake failed (wrong worker public key, or the worker refused us)"
    return "handshake failed"


class RpcStream:
    """One request's answers, as an async context manager and iterator (see RpcChannel).
    ``payload`` holds the payload frames of the event last returned."""

    __slots__ = ("_chan", "_control", "_done", "_msg", "_payload", "_route", "_timeout", "payload")

    def __init__(
        self,
        chan: RpcChannel,
        msg: Message,
        payload: Sequence[Any],
        timeout: float,
        *,
        control: bool = False,
    ) -> None:
        request_id = getattr(msg, "request_id", None)
        if not request_id:
            raise ValueError(f"{type(msg).__name__} carries no request id")
        self._chan = chan
        self._msg = msg
        self._payload = payload
        self._timeout = timeout
        self._control = control
        self._route: _Route | None = None
        self._done = False
        self.payload: list[Any] = []

    async def __aenter__(self) -> RpcStream:
        self._route = await self._chan._open(
            self._msg.request_id,  # type: ignore[attr-defined]
            self._msg,
            self._payload,
            self._control,
        )
        return self

    async def __aexit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        route = self._route
        if route is not None:
            if exc is None:
                reason = "the caller stopped reading"
            elif isinstance(exc, trio.Cancelled):
                reason = "cancelled"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self._chan._finish(route, self._done, reason)

    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Message:
        if self._done:
            raise StopAsyncIteration
        route = self._route
        if route is None:
            raise RuntimeError("use `async with channel.stream(...)` before iterating")
        try:
            item = await self._chan._receive(route, self._timeout)
        except RpcError as exc:
            if exc.code is not FailureCode.TIMEOUT:
                self._done = True  # the worker ended it (or is gone): nothing to abort
            raise
        if type(item) is Incoming:
            msg = item.msg
            self.payload = item.payload
        else:
            msg = item  # type: ignore[assignment]
            self.payload = []
        if type(msg) is not Delta:
            self._done = True
        return msg

    @property
    def pending(self) -> int:
        """Events already received and not yet returned: the next ``__anext__`` returns one
        without waiting (lets a relay write several in one go)."""
        route = self._route
        return len(route.items) if route is not None else 0

    def deltas(self, limit: int) -> list[Delta]:
        """Up to ``limit`` Deltas already received, in order, without waiting: a relay builds
        and writes a burst together instead of one ``__anext__`` each. Stops before anything
        else (the Finish, a Delta with payload frames): ``__anext__`` returns those, and any
        failure after them."""
        route = self._route
        if route is None or self._done:
            return []
        items = route.items
        out: list[Delta] = []
        while items and len(out) < limit and type(items[0]) is Delta:
            out.append(items.popleft())  # type: ignore[arg-type]
        return out

    @property
    def request_id(self) -> str:
        return self._msg.request_id  # type: ignore[attr-defined]

    @property
    def timeout(self) -> float:
        """The bound on each wait from now on (settable: e.g. a stall timeout once the first
        event came, instead of the time allowed for the first answer)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = value
