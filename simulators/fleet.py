"""Start simulated workers: in-process (a trio task, for fast tests) or as a fleet of processes
(for demos, benchmarks and chaos tests that kill workers). A fleet speaks HTTP (the vLLM API,
``python -m lmgw.simulators``) or the native ZeroMQ protocol (``python -m lmgw.worker``, the
same simulated engine): ``transport``.

Resource handling: ``run_fleet`` owns its children. Each child is spawned in its own session,
binds port 0 and reports its URL on a READY line. When ``run_fleet`` ends for any reason (its
caller cancels it, a child fails to start, an unexpected error), every child gets SIGTERM, then
SIGKILL (to its whole process group) after a grace period, and is reaped before ``run_fleet``
returns, so no child outlives it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from lmgw.http.server import serve_http

from . import model_files
from .app import ROLES, SimWorker, WorkerOptions, unsupported_role_message

log = logging.getLogger("lmgw.simulators.fleet")

STDERR_TAIL_BYTES = 16384
"""How much of a child's stderr is kept for error messages (it is drained continuously so a
chatty child never blocks on a full pipe)."""


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve_worker_inprocess(
    options: WorkerOptions | SimWorker,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    **limits: float,
) -> None:
    """Serve a simulated worker inside the caller's nursery until cancelled.

    Args:
        options: the worker's options, or a ready :class:`SimWorker` (so that a test keeps a
            handle on its engine, stats and faults).
        limits: server limits passed to :func:`lmgw.http.server.serve_http`.

    ``task_status.started(url)`` reports ``http://host:port`` once the port is bound (and the
    KV listener's, when ``options.kv_port`` is set: then ``worker.kv_address`` names it; and the
    KV event publisher's, when ``options.kv_events`` is set: ``worker.kv_events.endpoint``).
    """
    worker = options if isinstance(options, SimWorker) else SimWorker(options)
    opts = worker.options
    try:
        async with trio.open_nursery() as nursery:
            if worker.kv_events is not None:  # the publisher's socket owner task
                await nursery.start(worker.kv_events.run)
            if worker.handoff_pool is not None:  # Redis reconnection, shm sweeps
                await nursery.start(worker.handoff_pool.run)
            port = await nursery.start(partial(serve_http, worker, opts.host, opts.port, **limits))
            worker.bound_port = port  # the KV side channel (and SGLang bootstrap) port
            if opts.kv_port is not None:  # P2P NCCL's KV port: the same handler, a second port
                worker.kv_bound_port = await nursery.start(
                    partial(serve_http, worker, opts.host, opts.kv_port, **limits)
                )
            task_status.started(_url(opts.host, port))
    finally:
        worker.close()


class FleetError(RuntimeError):
    """A worker process failed to start (its exit status and stderr are in the message)."""


@dataclass(slots=True)
class FleetMember:
    """One worker process of a fleet."""

    role: str
    index: int
    process: trio.Process
    url: str = ""
    kv_address: str | None = None
    """``host:kv_port`` of a worker started with a KV port (P2P NCCL), from its READY line."""
    kv_events: str | None = None
    """The KV event publisher's endpoint of a worker started with ``--kv-events``."""
    zone: str | None = None
    """Its KV-transfer zone (``--zone``), in a fleet spread over zones."""
    stderr_tail: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace")


class Fleet:
    """The running workers of :func:`run_fleet`: iterate for ``(role, url)`` pairs."""

    def __init__(self) -> None:
        self.members: list[FleetMember] = []
        self.ec_dir: str | None = None
        """The shared encoder-cache directory run_fleet created, if any."""
        self.lmcache_dir: str | None = None
        """The shared LMCache directory run_fleet created (dialect vllm-lmcache), if any."""
        self.model_dir: Path | None = None
        """The model folder every worker tokenizes with (``--model-dir``): give the gateway the
        same one (``models[].tokenizer``) and its tokenization matches the workers'."""
        self.transport = "http"
        """``http`` (members' URLs are ``http://``) or ``zmq`` (``zmq+tcp://``)."""

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.endpoints())

    def __len__(self) -> int:
        return len(self.members)

    def endpoints(self) -> list[tuple[str, str]]:
        """``(role, url)`` of every started worker, in spawn order."""
        return [(m.role, m.url) for m in self.members if m.url]

    def urls(self, role: str | None = None) -> list[str]:
        return [m.url for m in self.members if m.url and (role is None or m.role == role)]

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one member (chaos tests); the fleet still reaps it at the end."""
        member = self.members[index]
        if member.alive:
            member.process.send_signal(sig)


def dialect_args(dialect: str | None, role: str, lmcache_dir: str | None) -> list[str]:
    """The worker flags a P/D dialect needs on the p and d workers of a fleet: a KV port for
    vLLM P2P NCCL (pair ids name ``host:kv_port``), the LMCache connector and its shared store
    for vLLM LMCache. Other dialects need nothing: the simulator reads NIXL, SGLang and EPD
    hand-offs from the requests themselves."""
    if role not in ("p", "d"):
        return []
    if dialect == "vllm-p2pnccl":
        return ["--kv-port", "0"]
    if dialect == "vllm-lmcache":
        args = ["--kv-connector", "lmcache"]
        if lmcache_dir is not None:  # else the caller's extra args name the directory
            args += ["--lmcache-dir", lmcache_dir]
        return args
    return []


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1 :]
    return None


TRANSPORTS = ("http", "zmq")


def worker_command(
    role: str,
    *,
    model: str,
    speed: float,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
    transport: str = "http",
) -> list[str]:
    """The argv of one worker process (port 0: the child picks a free port); ``transport``
    ``zmq`` starts the native worker (``python -m lmgw.worker``) around the same engine."""
    if transport == "zmq":
        return [
            python,
            "-m",
            "lmgw.worker",
            "--engine",
            "sim",
            "--role",
            role,
            "--bind",
            "tcp://127.0.0.1:0",
            "--model",
            model,
            "--speed",
            repr(float(speed)),
            *extra_args,
        ]
    return [
        python,
        "-m",
        "lmgw.simulators",
        "--role",
        role,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        model,
        "--speed",
        repr(float(speed)),
        *extra_args,
    ]


async def run_fleet(
    counts: Mapping[str, int],
    *,
    model: str,
    speed: float,
    extra_args: Sequence[str] = (),
    role_args: Mapping[str, Sequence[str]] | None = None,
    dialect: str | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    ready_timeout_s: float = 30.0,
    grace_s: float = 3.0,
    python: str = sys.executable,
    transport: str = "http",
    zones: int = 0,
    task_status: trio.TaskStatus[Fleet] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Spawn ``counts[role]`` worker processes per role, wait for all to be READY, report the
    :class:`Fleet` through ``task_status``, and keep them until cancelled.

    A fleet with encoders gets a shared encoder-cache directory (a temporary one, removed when
    the fleet ends) passed as ``--ec-dir`` to its e, p and pd workers, unless ``extra_args``
    already names one (``Fleet.ec_dir`` tells which).

    ``dialect`` (the gateway's, e.g. ``vllm-p2pnccl``) adds what its p and d workers need
    (:func:`dialect_args`): for ``vllm-lmcache`` that is a shared LMCache directory, temporary
    and removed at the end like the encoder cache, unless ``extra_args`` names one
    (``Fleet.lmcache_dir``); for ``vllm-p2pnccl`` a KV port each (``FleetMember.kv_address``).

    Every worker tokenizes with one model folder, passed as ``--model-dir``: ``model_dir``, the
    one ``extra_args`` names, or the per-user sim-model (built here once, before any spawn, so
    the workers do not race to build it). ``Fleet.model_dir`` tells which.

    ``role_args`` are further flags for the workers of one role (e.g. ``{"pd": ["--kv-events",
    "tcp://127.0.0.1:0"]}``: a KV event publisher each, ``FleetMember.kv_events``).

    ``zones`` > 0 spreads each role's workers over that many KV-transfer zones (``z0``,
    ``z1``, ...: the k-th worker of a role in ``z{k % zones}``; ``--zone``, and
    ``FleetMember.zone`` for the gateway's ``workers[].zone``; native workers announce it).

    ``transport="zmq"`` starts native workers (``python -m lmgw.worker --engine sim``, the same
    engine behind the native protocol; members' URLs are ``zmq+tcp://``). They take no
    ``--model-dir`` yet and tokenize with the per-user sim-model, so another model folder is
    refused, and ``dialect`` must be None (the hand-offs travel in the protocol).

    Raises:
        ValueError: an unknown role or a negative count, an unknown transport, or a model
            folder or dialect a native fleet cannot use (before anything is spawned).
        FleetError: a child exited or stayed silent for ``ready_timeout_s`` before READY.
    """
    for role, count in counts.items():
        if role not in ROLES:
            raise ValueError(unsupported_role_message(role))
        if count < 0:
            raise ValueError(f"negative worker count for role {role!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: expected one of {TRANSPORTS}")
    fleet = Fleet()
    fleet.transport = transport
    named = _flag_value(extra_args, "--model-dir")
    if transport == "zmq":
        if dialect is not None:
            raise ValueError("a native (zmq) fleet takes no dialect: hand-offs use the protocol")
        default = await trio.to_thread.run_sync(model_files.default_model_dir)
        wanted = named if named is not None else model_dir
        if wanted is not None and os.path.realpath(wanted) != os.path.realpath(default):
            raise ValueError(
                "native (zmq) workers take no --model-dir yet: they tokenize with the per-user"
                f" sim-model ({default})"
            )
        fleet.model_dir = Path(default)
    elif named is not None:
        fleet.model_dir = Path(named)
    else:
        if model_dir is None:
            model_dir = await trio.to_thread.run_sync(model_files.default_model_dir)
        fleet.model_dir = Path(model_dir)
        extra_args = [*extra_args, "--model-dir", os.fspath(model_dir)]
    errors: list[str] = []
    own_ec_dir: str | None = None
    own_lmcache_dir: str | None = None
    # embeddings go to the cache pool or through the gateway: no shared directory
    pooled = _flag_value(extra_args, "--handoff") in ("pool", "gateway")
    if counts.get("e", 0) > 0 and not _has_flag(extra_args, "--ec-dir") and not pooled:
        own_ec_dir = tempfile.mkdtemp(prefix="lmgw-sim-ec-")
        fleet.ec_dir = own_ec_dir
    if dialect == "vllm-lmcache" and not _has_flag(extra_args, "--lmcache-dir"):
        own_lmcache_dir = tempfile.mkdtemp(prefix="lmgw-sim-lmcache-")
        fleet.lmcache_dir = own_lmcache_dir
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starters:
                index = 0
                for role, count in counts.items():
                    args = list(extra_args)
                    if own_ec_dir is not None and role in ("e", "p", "pd"):
                        args += ["--ec-dir", own_ec_dir]
                    args += dialect_args(dialect, role, own_lmcache_dir)
                    args += (role_args or {}).get(role, ())
                    for k in range(count):
                        # independent fault draws per worker (the same answers): correlated
                        # stalls or errors across a fleet would be no fleet's reality
                        own = []
                        if transport == "http" and not _has_flag(args, "--fault-seed"):
                            own = ["--fault-seed", str(index)]
                        if zones > 0:
                            own += ["--zone", f"z{k % zones}"]
                        cmd = worker_command(
                            role,
                            model=model,
                            speed=speed,
                            extra_args=[*args, *own],
                            python=python,
                            transport=transport,
                        )
                        starters.start_soon(
                            _start_member, nursery, fleet, role, index, cmd, ready_timeout_s, errors
                        )
                        index += 1
            if errors:
                nursery.cancel_scope.cancel()
            else:
                fleet.members.sort(key=lambda m: m.index)
                task_status.started(fleet)
                await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await _terminate_all(fleet.members, grace_s)
        for own_dir in (own_ec_dir, own_lmcache_dir):
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
    if errors:
        raise FleetError("; ".join(errors))


@asynccontextmanager
async def open_fleet(
    counts: Mapping[str, int], *, model: str, speed: float, **kwargs: object
) -> AsyncIterator[Fleet]:
    """``async with open_fleet({"pd": 2}, model=..., speed=...) as fleet:`` (see run_fleet)."""
    async with trio.open_nursery() as nursery:
        fleet = await nursery.start(
            lambda task_status: run_fleet(
                counts, model=model, speed=speed, task_status=task_status, **kwargs
            )
        )
        try:
            yield fleet
        finally:
            nursery.cancel_scope.cancel()


async def _start_member(
    nursery: trio.Nursery,
    fleet: Fleet,
    role: str,
    index: int,
    cmd: list[str],
    ready_timeout_s: float,
    errors: list[str],
) -> None:
    try:
        proc = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        errors.append(f"{role}#{index}: cannot spawn {cmd[0]!r}: {exc}")
        return
    member = FleetMember(role, index, proc, zone=_flag_value(cmd, "--zone"))
    fleet.members.append(member)  # registered at once, so cleanup covers it whatever happens
    assert proc.stdout is not None and proc.stderr is not None
    stderr_done = trio.Event()
    nursery.start_soon(_drain_stderr, proc.stderr, member.stderr_tail, stderr_done)
    line = b""
    with trio.move_on_after(ready_timeout_s) as timeout:
        line = await _read_line(proc.stdout)
    if line.startswith(b"READY "):
        url, *fields = line[6:].decode().split()
        if url.startswith(("tcp://", "ipc://")):  # a native worker: "READY tcp://h:p control=.."
            url = "zmq+" + url
        member.url = url
        for f in fields:  # "kv_address=HOST:PORT" (a KV port), "kv_events=tcp://..."
            key, _, value = f.partition("=")
            if key == "kv_address" and value:
                member.kv_address = value
            elif key == "kv_events" and value:
                member.kv_events = value
        nursery.start_soon(_drain, proc.stdout)
        return
    if timeout.cancelled_caught:
        why = f"no READY line within {ready_timeout_s:g} s"
    else:
        with trio.move_on_after(2):
            await proc.wait()
            await stderr_done.wait()
        why = f"exited with status {proc.returncode} before READY"
        if line:
            why += f" (stdout: {line[:200]!r})"
    stderr = member.stderr_text().strip()[-4000:]
    errors.append(
        f"{role}#{index} (pid {proc.pid}) {why}" + (f"; stderr:\n{stderr}" if stderr else "")
    )


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return bytes(buf.split(b"\n", 1)[0])


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(65536):
        pass


async def _drain_stderr(stream: trio.abc.ReceiveStream, tail: bytearray, done: trio.Event) -> None:
    try:
        while chunk := await stream.receive_some(65536):
            tail += chunk
            if len(tail) > STDERR_TAIL_BYTES:
                del tail[: len(tail) - STDERR_TAIL_BYTES]
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()


async def stop_process(proc: trio.Process, grace_s: float = 5.0) -> None:
    """Stop one child started in its own session (shielded, so it works while cancelled):
    SIGTERM, up to ``grace_s`` to exit, then SIGKILL its process group; reaped either way."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            with trio.move_on_after(grace_s):
                await proc.wait()
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                await proc.wait()


async def _terminate_all(members: list[FleetMember], grace_s: float) -> None:
    """SIGTERM everyone, wait up to ``grace_s``, SIGKILL the process group of stragglers, reap."""
    for m in members:
        if m.alive:
            try:
                m.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    with trio.move_on_after(grace_s):
        for m in members:
            await m.process.wait()
    for m in members:
        # Only while the child is unreaped does its pid (= its process group id) still name it.
        if m.alive:
            log.warning("worker %s#%d (pid %d) ignored SIGTERM; killing", m.role, m.index, m.pid)
            try:
                os.killpg(m.pid, signal.SIGKILL)  # its session: also anything it spawned
            except (ProcessLookupError, PermissionError):
                m.process.kill()
    for m in members:
        await m.process.wait()
        for pipe in (m.process.stdout, m.process.stderr):
            if pipe is not None:
                await pipe.aclose()
