"""The worker's end of the native protocol: an :class:`~lmgw.worker.engine.Engine` behind a
ZeroMQ ROUTER (docs/native-protocol.md, "Worker side").

Tasks and ownership (all in :meth:`WorkerServer.run`'s nurseries, nothing outlives it):

* one *reader* per socket, the only task receiving on it. It decodes, answers control
  messages (Register, Heartbeat, MetricsRequest, Abort, refusals) on the spot with a
  non-blocking send, and starts one *job* task per stage request. It never awaits the engine
  or a data send, so a heartbeat is answered while a job waits for room to send its tensors.
* *jobs* (one per Generate/Prefill/Encode) run the engine and send their own answers.
  ``Abort`` and the request's deadline cancel the job's scope; the job then awaits
  ``engine.abort`` (shielded, bounded). A peer that stops reading makes the job's sends time
  out, which aborts the job too: a worker never generates for nobody.
* the *outbox* task retries control answers that found a full queue (bounded by time).
* the *flusher* (capability ``batch``): jobs and control answers for a gateway that agreed on
  it queue their messages in that peer's :class:`~lmgw.protocol.outbox.Outbox`; the flusher,
  woken by the first, runs after the scheduler pass and sends what the pass queued as one
  ZeroMQ message (``Batch``) per bound (an idle worker sends the first one at once). So a lone
  message waits for nothing, a non-streamed answer's Delta and Finish are one send, and so
  are the messages the jobs produced in one pass.
* the *announcer* (with ``gateways``) tells registration endpoints where to reach us.

Heartbeats never queue behind data (seed weakness 6). Inside the process they do not wait
for engine work or for sends (the reader answers them at once). On the wire, a separate
**control ROUTER** (``control_bind``) serves Heartbeat and MetricsRequest on its own TCP
connection. A ZeroMQ pipe is FIFO per peer: once a 100 MiB tensor is handed to it, a
heartbeat ack queued on the same connection waits until the whole tensor has gone out, and
no sender-side priority can overtake bytes that are already in the pipe. A second
connection can, so a gateway that probes there sees a worker that is alive even while its
data connection is saturated or stuck.

Sends: ROUTER with ``ROUTER_MANDATORY``. A job never uses a blocking send. With several
peers a ROUTER reports POLLOUT when *any* peer has room, so waiting on POLLOUT would spin
while one peer is full. Instead a job retries a non-blocking send with a short backoff until
``send_timeout_s``; batched, the flusher retries a full peer the same way and gives it up
after ``send_timeout_s`` (its jobs then stop at their next send), and a job whose peer's
outbox is over its bound waits for room, at most ``send_timeout_s``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket as _socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import trio
import zmq
from trio.lowlevel import checkpoint

from ..protocol.messages import (
    CAPABILITIES,
    MAGIC,
    MAX_BATCH,
    MAX_REQUEST_ID,
    MIN_PROTOCOL_VERSION,
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
    Message,
    Metrics,
    MetricsRequest,
    Prefill,
    PrefillDone,
    ProtocolError,
    Register,
    RegisterAck,
    TensorRef,
    Token,
    Usage,
    decode_frames,
    encode_frames,
    negotiate,
)
from ..protocol.messages import ShmHandle as WireShmHandle
from ..protocol.outbox import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_BYTES, Outbox
from ..transport.shm import DEFAULT_THRESHOLD as SHM_THRESHOLD
from ..transport.shm import ShmError, ShmPool, map_shm, sweep_stale_segments
from ..transport.shm import host_id as shm_host_id
from ..transport.tensors import pack_tensors
from ..transport.zmq.curve import CurveServer, ZapHandler
from ..transport.zmq.socket import DEFAULT_HWM, PeerUnreachable, ZmqSocket
from ..transport.zmq.wakeup import Wakeup
from .announce import Announce, advertised_endpoint, announce_loop
from .engine import ROLE_NAMES, Engine, EngineError, EngineRequest

__all__ = ["SERVER_CAPABILITIES", "WorkerServer", "control_endpoint_for"]

log = logging.getLogger("lmgw.worker")

SERVER_CAPABILITIES: frozenset[str] = frozenset(
    {"abort", "metrics", "drain", "batch", "tensor_shm", "finish_output"}
)
"""What the server implements for any engine (the engine adds its stage capabilities)."""
WAITING_METRIC = "vllm:num_requests_waiting"
"""The engine metric a HeartbeatAck reports as ``queued``."""

_STAGE_ROLES: dict[type[Message], tuple[str, ...]] = {
    Generate: ("d", "pd"),
    Prefill: ("p", "pd"),
    Encode: ("e",),
}
_CHECKPOINT_EVERY = 16
_MIN_BACKOFF_S = 0.001
_MAX_BACKOFF_S = 0.05
_BATCH_TAG = Batch.__struct_config__.tag


class _PeerGone(Exception):
    """A send found the peer disconnected, or not reading for ``send_timeout_s``."""


class _PeerOutbox(Outbox):
    """A gateway's outbox, with the flusher's bookkeeping."""

    __slots__ = ("blocked_since", "gone", "peer", "room", "scheduled")

    def __init__(self, peer: bytes, max_batch: int, max_batch_bytes: int) -> None:
        super().__init__(envelope=(peer,), max_batch=max_batch, max_batch_bytes=max_batch_bytes)
        self.peer = peer
        self.scheduled = False  # in the flusher's list (dirty, or blocked and retried)
        self.blocked_since: float | None = None  # the first send that found the peer full
        self.gone: str | None = None  # given up: why (its jobs stop at their next send)
        self.room: trio.Event | None = None  # jobs waiting for the outbox to shrink


class _Job:
    __slots__ = (
        "aborted", "fold", "kind", "mapped", "outbox", "peer", "request_id", "scope", "shm",
        "timeout_s",
    )  # fmt: skip

    def __init__(
        self,
        peer: bytes,
        request_id: str,
        kind: type[Message],
        timeout_s: float | None,
        outbox: _PeerOutbox | None = None,
    ) -> None:
        self.peer = peer
        self.outbox = outbox  # the peer agreed on "batch": answers go through it
        self.request_id = request_id
        self.kind = kind
        self.timeout_s = timeout_s
        self.scope = trio.CancelScope()
        if timeout_s is not None:
            self.scope.deadline = trio.current_time() + timeout_s
        self.aborted: str | None = None  # the gateway's reason, once it aborted the request
        self.shm = False  # the peer shares this host: big hand-offs go by shared memory
        #: the peer agreed on "finish_output": a non-streamed answer goes in its Finish
        self.fold = False
        self.mapped: list[Callable[[], None]] = []  # closers of the segments it reads


class _Peer:
    __slots__ = ("capabilities", "client", "outbox", "shm", "version")

    def __init__(
        self,
        client: str,
        version: int,
        capabilities: frozenset[str],
        outbox: _PeerOutbox | None = None,
        shm: bool = False,
    ) -> None:
        self.client = client
        self.version = version
        self.capabilities = capabilities
        self.outbox = outbox
        self.shm = shm  # agreed on tensor_shm and on the same host


def control_endpoint_for(bind: str) -> str:
    """The default control endpoint next to a data endpoint: same host on a free port for
    tcp, ``<path>-ctl`` for ipc and inproc."""
    scheme, sep, rest = bind.partition("://")
    if not sep:
        raise ValueError(f"not a ZeroMQ endpoint: {bind!r}")
    if scheme == "tcp":
        return f"tcp://{rest.rpartition(':')[0]}:0"
    if scheme in ("ipc", "inproc"):
        return f"{bind}-ctl"
    raise ValueError(f"no default control endpoint for {scheme}:// (give control_bind)")


def _close_flushing(sock: ZmqSocket, linger_ms: int) -> None:
    """Close with a short linger, so the Exit (or Drain) just queued still goes out: with
    ``LINGER=0`` ZeroMQ drops what its I/O thread has not written yet. ZeroMQ flushes in the
    background; nothing here waits. Call only when no task waits on the socket."""
    if linger_ms > 0 and not sock.closed:
        with contextlib.suppress(zmq.ZMQError):
            sock.socket.close(linger=linger_ms)
    sock.close()  # idempotent for the zmq socket; tells trio the fd is gone


def _request_id_hints(frames: Sequence[Any]) -> list[str]:
    """Best effort: the request ids of a message that failed validation (a bad tensor
    reference, a field out of range; in a batch, those of all its messages), so the gateway
    fails those requests at once instead of waiting for their timeouts. [""] when the header
    is not even msgpack."""
    if len(frames) < 2:
        return [""]
    try:
        raw = msgspec.msgpack.decode(memoryview(frames[1])[len(MAGIC) + 1 :])
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError):
        return [""]
    if not isinstance(raw, list) or len(raw) < 2:
        return [""]
    if raw[0] == _BATCH_TAG and isinstance(raw[1], list):
        ids = {
            item[1][:MAX_REQUEST_ID]: None
            for item in raw[1][:MAX_BATCH]
            if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str) and item[1]
        }
        return list(ids) or [""]
    return [raw[1][:MAX_REQUEST_ID]] if isinstance(raw[1], str) else [""]


class WorkerServer:
    """Serve ``engine`` on a ROUTER until cancelled or drained.

    ::

        server = await nursery.start(WorkerServer(engine, bind="tcp://127.0.0.1:0").run)
        server.endpoint, server.control_endpoint   # the bound addresses
        server.drain()                             # finish in-flight work, then Exit

    Args:
        engine: what runs the stages.
        bind: the data endpoint (``tcp://host:0`` picks a free port).
        control_bind: the control endpoint (Heartbeat, MetricsRequest); ``"auto"`` derives
            one from ``bind`` (:func:`control_endpoint_for`), None: no control socket.
        max_inflight: stage requests running at once; more are refused ``overloaded``.
        gateways: registration endpoints to announce this worker to (see :mod:`.announce`).
        advertise: the data endpoint to announce (default: the bound one, wildcard host
            replaced by the address that routes to each gateway).
        send_timeout_s: how long a job waits for a peer that does not read before aborting.
        drain_grace_s: how long :meth:`drain` lets in-flight requests finish.
        abort_timeout_s: bound on ``engine.abort`` after a job ended early.
        exit_grace_s: after a drain's ``Exit``, how long the socket stays open (taking
            nothing new) so gateways read what was sent before it closes.
        exit_linger_ms: how long ZeroMQ may keep flushing the final Exit after the socket is
            closed (in the background; 0 drops it if not yet written).
        curve: CURVE on both ROUTERs: this worker's key pair and the gateways it admits
            (:class:`~lmgw.transport.zmq.curve.CurveServer`); None: plaintext.
        batch: offer the ``batch`` capability (False: every message on its own, as a
            worker before it). ``max_batch`` / ``max_batch_bytes`` bound one batch;
            ``outbox_limit_bytes``: a job whose gateway's outbox holds more waits for room.
        shm_threshold: with a gateway on the same host (capability ``tensor_shm``), hand-off
            tensors at least this big go by shared memory (a handle, not the bytes); None:
            never (the capability is not offered).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bind: str = "tcp://127.0.0.1:0",
        control_bind: str | None = "auto",
        worker_id: str | None = None,
        max_inflight: int = 256,
        gateways: Sequence[str] = (),
        advertise: str | None = None,
        announce_interval_s: float = 2.0,
        zone: str | None = None,
        send_timeout_s: float = 10.0,
        drain_grace_s: float = 30.0,
        abort_timeout_s: float = 5.0,
        exit_grace_s: float = 0.5,
        exit_linger_ms: int = 250,
        hwm: int = DEFAULT_HWM,
        max_msg_size: int = -1,
        recv_copy: bool = True,
        max_peers: int = 1024,
        min_version: int = MIN_PROTOCOL_VERSION,
        max_version: int = PROTOCOL_VERSION,
        ctx: zmq.Context | None = None,
        curve: CurveServer | None = None,
        batch: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        outbox_limit_bytes: int = 4 << 20,
        shm_threshold: int | None = SHM_THRESHOLD,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.engine = engine
        self.bind = bind
        self.control_bind = control_endpoint_for(bind) if control_bind == "auto" else control_bind
        self.worker_id = worker_id or f"{engine.role}-{_socket.gethostname()}-{os.getpid()}"
        self.max_inflight = max_inflight
        self.gateways = tuple(gateways)
        self.advertise = advertise
        self.announce_interval_s = announce_interval_s
        #: announced KV-transfer zone (the gateway's workers[].zone)
        self.zone = zone
        self.send_timeout_s = send_timeout_s
        self.drain_grace_s = drain_grace_s
        self.abort_timeout_s = abort_timeout_s
        self.exit_grace_s = exit_grace_s
        self.exit_linger_ms = exit_linger_ms
        self.exited = False
        self.min_version = min_version
        self.max_version = max_version
        self.capabilities = (engine.capabilities | SERVER_CAPABILITIES) & CAPABILITIES
        if not batch:
            self.capabilities -= {"batch"}
        self.shm_threshold = shm_threshold
        self.host = shm_host_id() if shm_threshold is not None else ""
        if not self.host:
            self.capabilities -= {"tensor_shm"}
        self._shm_pool: ShmPool | None = None  # created at the first hand-off that uses it
        Outbox(max_batch=max_batch)  # checks the bound now, not at the first registration
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.outbox_limit_bytes = outbox_limit_bytes
        self._ctx = ctx
        self.curve = curve
        self.zap: ZapHandler | None = None  # with curve: its accepted/refused counters
        self._hwm = hwm
        self._max_msg_size = max_msg_size
        self._recv_copy = recv_copy
        self._max_peers = max_peers
        self.instance = uuid.uuid4().hex
        self.endpoint = ""
        self.control_endpoint: str | None = None
        self.draining = False
        self.drain_reason = ""
        self._sock: ZmqSocket | None = None
        self._peers: collections.OrderedDict[bytes, _Peer] = collections.OrderedDict()
        self._jobs: dict[str, _Job] = {}
        self._jobs_nursery: trio.Nursery | None = None
        self._job_ended = trio.Event()
        self._drain_requested = trio.Event()
        self._state_changed = trio.Event()
        self._outbox: collections.deque[tuple[ZmqSocket, list[Any], float]] = collections.deque()
        self._outbox_ready = trio.Event()
        self._dirty: list[_PeerOutbox] = []  # batch outboxes with something to send
        self._flush_wakeup = Wakeup()
        self._fast = 0
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "completed",
                "failed",
                "aborted",
                "timeouts",
                "rejected",
                "killed",
                "peer_gone",
                "malformed",
                "heartbeats",
                "replies_dropped",
                "batches_sent",
                "batched_sent",
                "batches_received",
                "shm_full",  # hand-offs sent as frames: no room left in /dev/shm
            ),
            0,
        )

    # -- lifetime -------------------------------------------------------------------------------
    async def run(
        self, *, task_status: trio.TaskStatus[WorkerServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, then serve until cancelled, or until a :meth:`drain` completes (then ``Exit``
        has been sent to every registered gateway and this returns). A server runs once; a
        :meth:`drain` asked for before ``run`` starts happens right after binding.

        With ``curve``, both ROUTERs live in a context of their own whose ZAP handler (the
        allow-list) is bound before them and closed after them: libzmq accepts every client
        of a context that has no handler, and a context has only one."""
        self.instance = uuid.uuid4().hex  # a new instance per start: restarts are visible
        curve = self.curve
        if curve is None:
            await self._serve(self._ctx, {}, task_status)
            return
        ctx = zmq.Context()
        try:
            async with trio.open_nursery() as auth:
                self.zap = ZapHandler(curve, ctx)
                await auth.start(self.zap.run, name="worker ZAP handler")
                await self._serve(ctx, curve.socket_options(), task_status)
                auth.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):  # every socket is closed: only lingering Exits
                await trio.to_thread.run_sync(ctx.term)

    async def _serve(
        self,
        ctx: zmq.Context | None,
        options: dict[int, int | bytes],
        task_status: trio.TaskStatus[WorkerServer],
    ) -> None:
        data = ZmqSocket.open(
            ctx, zmq.ROUTER, hwm=self._hwm, max_msg_size=self._max_msg_size, options=options
        )
        control: ZmqSocket | None = None
        exit_reason = "worker stopped"
        try:
            if self.host:
                sweep_stale_segments()  # what workers that died on this host left behind
            self.endpoint = data.bind(self.bind)
            if self.control_bind:
                control = ZmqSocket.open(
                    ctx, zmq.ROUTER, hwm=self._hwm, max_msg_size=1 << 20, options=options
                )
                self.control_endpoint = control.bind(self.control_bind)
            self._sock = data
            log.info(
                "worker %s (%s) serving %s, control %s",
                self.worker_id,
                ROLE_NAMES[self.engine.role],
                self.endpoint,
                self.control_endpoint,
            )
            async with trio.open_nursery() as service:
                service.start_soon(self._reader, data, False, name="worker reader")
                if control is not None:
                    service.start_soon(self._reader, control, True, name="worker control reader")
                service.start_soon(self._outbox_task, name="worker outbox")
                service.start_soon(self._flusher, data, name="worker flusher")
                if self.gateways:
                    service.start_soon(self._announce, name="worker announcer")
                async with trio.open_nursery() as jobs:
                    self._jobs_nursery = jobs
                    task_status.started(self)
                    await self._drain_requested.wait()
                    exit_reason = await self._finish_drain(jobs)
                self._jobs_nursery = None
                self._send_exit(data, exit_reason, self.stats["killed"])
                # Keep the connection up a moment: a DEALER with IMMEDIATE (gateways before
                # the socket monitor) drops what it received but has not read yet when the
                # connection closes, and the last Finish and the Exit may be among them.
                await trio.sleep(self.exit_grace_s)
                service.cancel_scope.cancel()
        finally:
            self._jobs_nursery = None
            if not data.closed and self._peers:
                self._send_exit(data, exit_reason, self.stats["killed"])
            _close_flushing(data, self.exit_linger_ms)
            if control is not None:
                control.close()
            if self._shm_pool is not None:  # a receiver that mapped a segment keeps it
                self._shm_pool.close()
                self._shm_pool = None

    def drain(self, reason: str = "draining", grace_s: float | None = None) -> None:
        """Take nothing new (``Failure(draining)``), tell the gateways (``Drain``), let the
        requests in flight finish for up to ``grace_s``, cancel the rest, send ``Exit`` and
        return from :meth:`run`. Idempotent."""
        if self.draining:
            return
        self.draining = True
        self.drain_reason = reason
        if grace_s is not None:
            self.drain_grace_s = grace_s
        self._drain_requested.set()
        self._wake_state()

    async def _finish_drain(self, jobs: trio.Nursery) -> str:
        sock = self._sock
        assert sock is not None
        notice = Drain(self.drain_reason, self.drain_grace_s)
        for peer in list(self._peers):
            self._reply(sock, peer, notice)
        with trio.move_on_after(self.drain_grace_s):
            while self._jobs:
                await self._job_ended.wait()
        left = len(self._jobs)
        if left:
            log.warning("drain grace (%gs) over: %d requests cut short", self.drain_grace_s, left)
        jobs.cancel_scope.cancel()
        return self.drain_reason

    def _send_exit(self, sock: ZmqSocket, reason: str, in_flight: int) -> None:
        """Best effort, now: after what each gateway's outbox still holds (an Exit read
        before the last Finish would fail that request)."""
        self.exited = True
        notice = Exit(reason, in_flight)
        for peer, state in list(self._peers.items()):
            outbox = state.outbox
            if outbox is not None and outbox.gone is None:
                outbox.add(notice)
                self._flush_outbox(sock, outbox)
                continue
            with contextlib.suppress(PeerUnreachable, trio.ClosedResourceError):
                sock.try_send_multipart(encode_frames(notice, envelope=(peer,)))
        self._peers.clear()

    def _wake_state(self) -> None:
        event, self._state_changed = self._state_changed, trio.Event()
        event.set()

    # -- the readers ----------------------------------------------------------------------------
    async def _reader(self, sock: ZmqSocket, control: bool) -> None:
        copy = self._recv_copy
        while True:
            frames = await sock.recv_multipart(copy=copy)
            first = frames[0]
            peer = first.bytes if isinstance(first, zmq.Frame) else bytes(first)
            try:
                incoming = decode_frames(frames, envelope=1)
            except ProtocolError as exc:
                self.stats["malformed"] += 1
                log.warning("unreadable message ignored: %s", exc)
                for rid in _request_id_hints(frames):
                    self._reply(sock, peer, Failure.of(rid, exc.code, str(exc)))
                continue
            msg = incoming.msg
            if type(msg) is Batch:  # each as if it had arrived alone
                self.stats["batches_received"] += 1
                handle = self._handle
                for item in msg.messages:
                    handle(sock, control, peer, item, ())
                continue
            self._handle(sock, control, peer, msg, incoming.payload)

    def _handle(
        self, sock: ZmqSocket, control: bool, peer: bytes, msg: Message, payload: Sequence[Any]
    ) -> None:
        cls = type(msg)
        if cls is Heartbeat:
            self.stats["heartbeats"] += 1
            if not control and peer not in self._peers:
                self._refuse(sock, peer, msg, FailureCode.NOT_REGISTERED, "register first")
                return
            self._reply(sock, peer, self._heartbeat_ack(msg.request_id))  # type: ignore[attr-defined]
        elif cls is MetricsRequest:
            if not control and peer not in self._peers:
                self._refuse(sock, peer, msg, FailureCode.NOT_REGISTERED, "register first")
                return
            self._reply(sock, peer, self._metrics(msg.request_id))  # type: ignore[attr-defined]
        elif control:
            self._refuse(
                sock,
                peer,
                msg,
                FailureCode.UNSUPPORTED,
                "the control endpoint answers Heartbeat and MetricsRequest only",
            )
        elif cls is Register:
            if not self.exited:  # after Exit a new session would only be lost again
                self._register(sock, peer, msg)  # type: ignore[arg-type]
        elif cls is Abort:
            job = self._jobs.get(msg.request_id)  # type: ignore[attr-defined]
            if job is not None and job.peer == peer and job.aborted is None:
                job.aborted = msg.reason or "aborted"  # type: ignore[attr-defined]
                job.scope.cancel()
        elif cls in _STAGE_ROLES:
            self._admit(sock, peer, msg, payload)
        else:
            self.stats["malformed"] += 1
            self._refuse(
                sock, peer, msg, FailureCode.PROTOCOL, f"a worker does not accept {cls.__name__}"
            )

    def _register(self, sock: ZmqSocket, peer: bytes, msg: Register) -> None:
        try:
            version, caps = negotiate(
                msg,
                min_version=self.min_version,
                max_version=self.max_version,
                capabilities=self.capabilities,
            )
        except ProtocolError as exc:
            self._reply(sock, peer, Failure.of(msg.request_id, exc.code, str(exc)))
            return
        peers = self._peers
        outbox = None
        if "batch" in caps and sock is self._sock:
            old = peers.get(peer)
            outbox = old.outbox if old is not None else None  # the same connection: keep it
            if outbox is None or outbox.gone is not None:
                outbox = _PeerOutbox(peer, self.max_batch, self.max_batch_bytes)
        shm = "tensor_shm" in caps and bool(msg.host) and msg.host == self.host
        peers[peer] = _Peer(msg.client, version, caps, outbox, shm)
        peers.move_to_end(peer)
        while len(peers) > self._max_peers:  # identities of gateways that reconnected
            peers.popitem(last=False)
        engine = self.engine
        ack = RegisterAck(
            msg.request_id,
            version,
            sorted(caps),
            self.worker_id,
            self.instance,
            [ROLE_NAMES[engine.role]],
            list(engine.models),
            self.max_inflight,
            self.control_endpoint,  # as bound: a gateway puts its own host for a wildcard
            self.host if "tensor_shm" in caps else "",
        )
        self._reply(sock, peer, ack)
        if self.draining:  # a gateway that (re)connects during a drain learns it at once
            self._reply(sock, peer, Drain(self.drain_reason, self.drain_grace_s))

    def _admit(self, sock: ZmqSocket, peer: bytes, msg: Any, payload: Sequence[Any]) -> None:
        rid: str = msg.request_id
        engine = self.engine
        if peer not in self._peers:
            code, why = FailureCode.NOT_REGISTERED, "register first"
        elif self.draining or self._jobs_nursery is None:
            code, why = FailureCode.DRAINING, f"the worker is draining ({self.drain_reason})"
        elif engine.role not in _STAGE_ROLES[type(msg)]:
            code = FailureCode.UNSUPPORTED
            why = f"a {ROLE_NAMES[engine.role]} worker does not run {type(msg).__name__}"
        elif engine.models and msg.model not in engine.models:
            code = FailureCode.BAD_REQUEST
            why = f"model {msg.model!r} is not served here (serving {', '.join(engine.models)})"
        elif rid in self._jobs:
            code, why = FailureCode.BAD_REQUEST, f"request id {rid!r} is already in flight"
        elif len(self._jobs) >= self.max_inflight:
            code = FailureCode.OVERLOADED
            why = f"{len(self._jobs)} requests in flight (max_inflight={self.max_inflight})"
        elif msg.timeout_s is not None and msg.timeout_s <= 0:
            code, why = FailureCode.TIMEOUT, "the request's deadline passed before it arrived"
        elif (
            msg.tensors
            and not self._peers[peer].shm
            and any(ref.shm is not None for ref in msg.tensors)
        ):
            code = FailureCode.UNSUPPORTED  # no frame to read, and no segment it can open
            why = "this worker shares no host with the gateway: tensors must come as frames"
        else:
            info = self._peers[peer]
            job = _Job(peer, rid, type(msg), msg.timeout_s, info.outbox)
            job.shm = info.shm
            job.fold = "finish_output" in info.capabilities
            try:
                tensors = _received_tensors(msg.tensors, payload, job.mapped)
            except ShmError as exc:
                _close_all(job.mapped)
                # not the request's fault: its hand-off is gone (the sender exited): the
                # gateway may still hold it, or try another worker
                code, why = FailureCode.ENGINE_ERROR, f"a tensor in shared memory: {exc}"
            else:
                self._jobs[rid] = job
                self.stats["requests"] += 1
                req = EngineRequest(msg, tensors)
                self._jobs_nursery.start_soon(self._run_job, sock, job, req)
                return
        self.stats["rejected"] += 1
        self._reply(sock, peer, Failure.of(rid, code, why))

    # -- control answers ------------------------------------------------------------------------
    def _heartbeat_ack(self, request_id: str) -> HeartbeatAck:
        try:
            queued = int(self.engine.metrics().get(WAITING_METRIC, 0))
        except Exception:  # a probe must not fail because a gauge did
            queued = 0
        return HeartbeatAck(
            request_id, self.instance, len(self._jobs), max(0, queued), self.draining
        )

    def _metrics(self, request_id: str) -> Message:
        try:
            values = {k: float(v) for k, v in self.engine.metrics().items()}
        except Exception as exc:
            log.exception("engine metrics failed")
            return Failure.of(request_id, FailureCode.ENGINE_ERROR, f"metrics: {exc}")
        stats = self.stats
        values.update(
            {
                "lmgw_worker_in_flight": float(len(self._jobs)),
                "lmgw_worker_max_inflight": float(self.max_inflight),
                "lmgw_worker_draining": float(self.draining),
                "lmgw_worker_requests_total": float(stats["requests"]),
                "lmgw_worker_completed_total": float(stats["completed"]),
                "lmgw_worker_failed_total": float(stats["failed"]),
                "lmgw_worker_aborted_total": float(stats["aborted"]),
                "lmgw_worker_timeouts_total": float(stats["timeouts"]),
                "lmgw_worker_rejected_total": float(stats["rejected"]),
                "lmgw_worker_malformed_total": float(stats["malformed"]),
            }
        )
        return Metrics(request_id, values)

    def _refuse(
        self, sock: ZmqSocket, peer: bytes, msg: Message, code: FailureCode, why: str
    ) -> None:
        self._reply(sock, peer, Failure.of(getattr(msg, "request_id", "") or "", code, why))

    def _reply(self, sock: ZmqSocket, peer: bytes, msg: Message) -> None:
        """Send a control answer now; if the peer's queue is full, leave it to the outbox
        task. For a gateway that agreed on ``batch`` (data socket only), queue it in its
        batch outbox instead (dropped when that holds twice its bound)."""
        if sock is self._sock:
            state = self._peers.get(peer)
            outbox = state.outbox if state is not None else None
            if outbox is not None and outbox.gone is None:
                if outbox.nbytes > 2 * self.outbox_limit_bytes:
                    self.stats["replies_dropped"] += 1
                    return
                outbox.add(msg)
                self._schedule(outbox)
                return
        frames = encode_frames(msg, envelope=(peer,))
        try:
            if sock.try_send_multipart(frames):
                return
        except PeerUnreachable:
            self._peers.pop(peer, None)
            return
        except trio.ClosedResourceError:
            return
        if len(self._outbox) >= 4096:
            self.stats["replies_dropped"] += 1
            return
        self._outbox.append((sock, frames, trio.current_time() + self.send_timeout_s))
        self._outbox_ready.set()

    async def _outbox_task(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            while self._outbox:
                now = trio.current_time()
                keep: collections.deque[tuple[ZmqSocket, list[Any], float]] = collections.deque()
                for item in self._outbox:
                    sock, frames, deadline = item
                    try:
                        sent = sock.try_send_multipart(frames)
                    except (PeerUnreachable, trio.ClosedResourceError):
                        sent = True  # nobody to send to: drop it
                    if not sent:
                        if now < deadline:
                            keep.append(item)
                        else:
                            self.stats["replies_dropped"] += 1
                self._outbox = keep
                if keep:
                    await trio.sleep(0.005)

    # -- jobs -----------------------------------------------------------------------------------
    async def _run_job(self, sock: ZmqSocket, job: _Job, req: EngineRequest[Any]) -> None:
        rid = job.request_id
        completed = False
        try:
            try:
                with job.scope:
                    if job.kind is Generate:
                        await self._generate(sock, job, req)
                    elif job.kind is Prefill:
                        res = await self.engine.prefill(req)
                        refs, frames = await self._tensor_frames(job, res.payload)
                        done = PrefillDone(
                            rid, res.kv_transfer_params, res.usage, list(res.first_token_ids),
                            refs,
                        )  # fmt: skip
                        await self._send(sock, job, done, frames)
                    else:
                        enc = await self.engine.encode(req)
                        refs, frames = await self._tensor_frames(job, enc.payload)
                        done_e = EncodeDone(rid, list(enc.mm_hashes), enc.ec_transfer_params, refs)
                        await self._send(sock, job, done_e, frames)
                    completed = True
            except trio.Cancelled:
                self.stats["killed"] += 1  # cancelled from outside: the worker is stopping
                raise
            if completed:
                self.stats["completed"] += 1
            elif job.aborted is not None:
                self.stats["aborted"] += 1  # the gateway asked: it expects no answer
            else:
                self.stats["timeouts"] += 1
                await self._send_failure(
                    sock, job, FailureCode.TIMEOUT, f"the deadline ({job.timeout_s:g}s) passed"
                )
        except _PeerGone as exc:
            self.stats["peer_gone"] += 1
            log.info("request %s stopped: %s", rid, exc)
        except EngineError as exc:
            self.stats["failed"] += 1
            await self._send_failure(sock, job, exc.code, exc.message)
        except Exception as exc:
            self.stats["failed"] += 1
            log.exception("request %s failed in the engine", rid)
            await self._send_failure(
                sock, job, FailureCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"
            )
        finally:
            del self._jobs[rid]
            del req
            _close_all(job.mapped)  # the engine is done with the segments it was handed
            if not completed:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self.abort_timeout_s
                    try:
                        await self.engine.abort(rid)
                    except Exception:
                        log.exception("engine.abort(%s) failed", rid)
            event, self._job_ended = self._job_ended, trio.Event()
            event.set()

    async def _generate(self, sock: ZmqSocket, job: _Job, req: EngineRequest[Generate]) -> None:
        rid = job.request_id
        stream = req.msg.stream
        seq = 0
        texts: list[str] = []
        ids: list[int] = []
        logprobs: list[Token] | None = None
        prompt_logprobs: list[Token | None] | None = None
        async with contextlib.aclosing(self.engine.generate(req)) as outputs:  # type: ignore[type-var]
            async for out in outputs:
                if out.prompt_logprobs is not None:  # once, on any output: sent with Finish
                    prompt_logprobs = out.prompt_logprobs
                if out.text or out.token_ids or out.logprobs:
                    if stream:
                        delta = Delta(rid, seq, out.text, list(out.token_ids), out.logprobs)
                        await self._send(sock, job, delta)
                        seq += 1
                    else:
                        texts.append(out.text)
                        ids.extend(out.token_ids)
                        if out.logprobs:
                            logprobs = (logprobs or []) + out.logprobs
                if out.finish_reason is not None:
                    merged = None
                    output: tuple[str, list[int], list[Token] | None] = ("", [], None)
                    if not stream and (texts or ids or logprobs):
                        output = ("".join(texts), ids, logprobs)
                        if not job.fold:  # a peer without finish_output: a Delta first
                            merged = Delta(rid, 0, *output)
                            output = ("", [], None)
                            seq = 1
                    finish = Finish(
                        rid,
                        seq,
                        out.finish_reason,
                        out.stop_reason,
                        out.usage or Usage(),
                        out.kv_transfer_params,
                        prompt_logprobs,
                        *output,
                    )
                    if merged is not None:  # one send for both (one batch when batching)
                        await self._send(sock, job, merged, then=finish)
                    else:
                        await self._send(sock, job, finish)
                    return
        raise EngineError(FailureCode.ENGINE_ERROR, "the engine ended without a finish reason")

    async def _send(
        self,
        sock: ZmqSocket,
        job: _Job,
        msg: Message,
        payload: Sequence[Any] = (),
        *,
        then: Message | None = None,
    ) -> None:
        """Send a job's answer (payload frames zero-copy), and ``then`` right after it. A
        checkpoint every few sends lets an abort in. Batched: queue both in the peer's outbox
        (one flush sends them together); past the outbox's bound, wait for room. Else a full
        queue is retried with backoff. Either way a peer that reads nothing for
        ``send_timeout_s`` is given up on (``_PeerGone``)."""
        fast = self._fast + 1
        if fast >= _CHECKPOINT_EVERY:
            fast = 0
            await checkpoint()  # before the send: a cancel here loses nothing
        self._fast = fast
        outbox = job.outbox
        if outbox is not None:
            if outbox.gone is not None:
                raise _PeerGone(outbox.gone)
            outbox.add(msg, payload)
            if then is not None:
                outbox.add(then)
            self._schedule(outbox)
            if outbox.gone is not None:
                raise _PeerGone(outbox.gone)
            if outbox.nbytes > self.outbox_limit_bytes:
                await self._wait_room(outbox)
            return
        await self._send_now(sock, job.peer, encode_frames(msg, payload, envelope=(job.peer,)))
        if then is not None:
            await self._send_now(sock, job.peer, encode_frames(then, envelope=(job.peer,)))

    async def _tensor_frames(
        self, job: _Job, payload: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """An engine's hand-off arrays as the answer's ``tensors`` and payload frames
        (zero-copy views; bytes-like items travel as uint8). For a gateway on this host, the
        ones of at least ``shm_threshold`` bytes go into a shared-memory segment (copied in a
        worker thread) and travel as its handle."""
        refs: list[Any] = []
        frames: list[Any] = []
        for item in payload:
            array = item if isinstance(item, np.ndarray) else np.frombuffer(item, dtype=np.uint8)
            threshold = self.shm_threshold
            if job.shm and threshold is not None and array.nbytes >= threshold:
                if self._shm_pool is None:
                    self._shm_pool = ShmPool()
                try:
                    handle = await trio.to_thread.run_sync(self._shm_pool.put, array)
                except ShmError as exc:  # no room in /dev/shm: the bytes go as a frame
                    self.stats["shm_full"] += 1
                    log.warning("hand-off of %d bytes sent as a frame: %s", array.nbytes, exc)
                else:
                    wire = WireShmHandle(handle.name, handle.size, handle.header, handle.generation)
                    refs.append(TensorRef(0, handle.header, wire))
                    continue
            (ref,), (frame,) = pack_tensors([array], first_frame=len(frames))
            refs.append(ref)
            frames.append(frame)
        return refs, frames

    async def _send_now(self, sock: ZmqSocket, peer: bytes, frames: list[Any]) -> None:
        try:
            if sock.try_send_multipart(frames):
                return
            deadline = trio.current_time() + self.send_timeout_s
            delay = _MIN_BACKOFF_S
            while True:
                await trio.sleep(delay)
                if sock.try_send_multipart(frames):
                    return
                if trio.current_time() >= deadline:
                    raise _PeerGone(f"the gateway read nothing for {self.send_timeout_s:g}s")
                delay = min(delay * 2, _MAX_BACKOFF_S)
        except PeerUnreachable:
            self._peers.pop(peer, None)
            raise _PeerGone("the gateway disconnected") from None

    async def _wait_room(self, outbox: _PeerOutbox) -> None:
        """Backpressure: wait until the flusher got the outbox under its bound."""
        limit = self.outbox_limit_bytes
        with trio.move_on_after(self.send_timeout_s):
            while outbox.gone is None and outbox.nbytes > limit:
                if outbox.room is None:
                    outbox.room = trio.Event()
                await outbox.room.wait()
        if outbox.gone is not None:
            raise _PeerGone(outbox.gone)
        if outbox.nbytes > limit:
            raise _PeerGone(f"the gateway read nothing for {self.send_timeout_s:g}s")

    # -- the flusher (capability "batch") -------------------------------------------------------
    def _schedule(self, outbox: _PeerOutbox) -> None:
        """Something was queued: wake the flusher, which runs after this scheduler pass and
        sends what the pass queued, together. With one job running at most (an idle worker:
        nothing else is likely to share the send) the first message goes at once instead, so
        it waits for nothing; what the pass queues after it waits for the flusher."""
        if outbox.scheduled:
            return  # the flusher takes it
        outbox.scheduled = True
        self._dirty.append(outbox)
        self._flush_wakeup.wake()
        sock = self._sock
        if len(self._jobs) <= 1 and sock is not None:
            self._flush_outbox(sock, outbox)

    async def _flusher(self, sock: ZmqSocket) -> None:
        """Send what the scheduled outboxes hold: after the tasks of this scheduler pass ran,
        so what they queued leaves together. A peer whose queue is full (HWM) is retried with
        a backoff of 1 to 50 ms, and given up after ``send_timeout_s`` without room."""
        wakeup = self._flush_wakeup
        blocked: list[_PeerOutbox] = []
        delay = _MIN_BACKOFF_S
        while True:
            if not blocked:
                delay = _MIN_BACKOFF_S
                if not self._dirty:  # work queued before this task first ran has no wake-up
                    await wakeup.sleep()
            else:
                with trio.move_on_after(delay):
                    await wakeup.sleep()
                delay = min(delay * 2, _MAX_BACKOFF_S)
            todo, self._dirty = blocked + self._dirty, []
            blocked = []
            now = None
            for outbox in todo:
                if self._flush_outbox(sock, outbox):
                    outbox.scheduled = False
                    continue
                now = trio.current_time() if now is None else now
                if outbox.blocked_since is None:
                    outbox.blocked_since = now
                elif now - outbox.blocked_since >= self.send_timeout_s:
                    self._give_up(outbox, f"the gateway read nothing for {self.send_timeout_s:g}s")
                    outbox.scheduled = False
                    continue
                blocked.append(outbox)

    def _flush_outbox(self, sock: ZmqSocket, outbox: _PeerOutbox) -> bool:
        """Send without waiting; False when the peer's queue is full (HWM)."""
        stats = self.stats
        try:
            while outbox:
                if not sock.try_send_multipart(outbox.peek()):
                    if outbox.room is not None and outbox.nbytes <= self.outbox_limit_bytes:
                        outbox.room.set()
                        outbox.room = None
                    return False
                n = outbox.commit()
                if n > 1:
                    stats["batches_sent"] += 1
                    stats["batched_sent"] += n
        except PeerUnreachable:
            state = self._peers.get(outbox.peer)
            if state is not None and state.outbox is outbox:
                del self._peers[outbox.peer]
            self._give_up(outbox, "the gateway disconnected")
            return True
        except trio.ClosedResourceError:
            self._give_up(outbox, "the worker is closing")
            return True
        outbox.blocked_since = None
        if outbox.room is not None:
            outbox.room.set()
            outbox.room = None
        return True

    def _give_up(self, outbox: _PeerOutbox, reason: str) -> None:
        """Drop what ``outbox`` holds; its jobs stop at their next send. A gateway that is
        still registered gets a fresh outbox (it may read again: new requests then work)."""
        outbox.gone = reason
        outbox.clear()
        if outbox.room is not None:
            outbox.room.set()
            outbox.room = None
        state = self._peers.get(outbox.peer)
        if state is not None and state.outbox is outbox:
            state.outbox = _PeerOutbox(outbox.peer, self.max_batch, self.max_batch_bytes)
        log.info("gave up sending to a gateway: %s", reason)

    async def _send_failure(
        self, sock: ZmqSocket, job: _Job, code: FailureCode, message: str
    ) -> None:
        with contextlib.suppress(_PeerGone, trio.ClosedResourceError):
            await self._send(sock, job, Failure.of(job.request_id, code, message))

    # -- announcing -----------------------------------------------------------------------------
    async def _announce(self) -> None:
        engine = self.engine
        control = self.control_endpoint

        def make(gateway: str) -> Announce:
            endpoint = self.advertise or advertised_endpoint(self.endpoint, gateway)
            return Announce(
                self.worker_id,
                self.instance,
                endpoint,
                advertised_endpoint(control, gateway) if control else None,
                [ROLE_NAMES[engine.role]],
                list(engine.models),
                self.min_version,
                self.max_version,
                self.max_inflight,
                self.announce_interval_s,
                "draining" if self.draining else "up",
                self.zone,
            )

        await announce_loop(
            self.gateways,
            make,
            ctx=self._ctx,
            interval_s=self.announce_interval_s,
            wake=lambda: self._state_changed,
        )

    # -- introspection --------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["in_flight"] = len(self._jobs)
        out["peers"] = len(self._peers)
        out["draining"] = self.draining
        out["outboxes"] = sum(1 for p in self._peers.values() if p.outbox is not None)
        if self._sock is not None:
            out.update(self._sock.statistics())
        return out

    def __repr__(self) -> str:
        return (
            f"<WorkerServer {self.worker_id} {self.endpoint or 'unbound'} jobs={len(self._jobs)}>"
        )


def _received_tensors(
    refs: Sequence[TensorRef], payload: Sequence[Any], mapped: list[Callable[[], None]]
) -> tuple[Any, ...]:
    """A request's tensors as buffers: its payload frames, or the shared-memory segments its
    refs name, mapped read-only (their closers go to ``mapped``). Raises ShmError."""
    out = []
    for ref in refs:
        if ref.shm is None:
            out.append(payload[ref.frame])
        else:
            buffer, close = map_shm(ref.shm, populate=False)
            mapped.append(close)
            out.append(buffer)
    return tuple(out)


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        close()
    closers.clear()
