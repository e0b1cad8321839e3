"""Worker -> gateway announcements: how a worker started with ``--gateway ADDR`` joins a fleet.

Design (docs/native-protocol.md, "Worker side"): discovery and sessions are separate steps.

1. *Discovery* (this module): the gateway binds a small ROUTER, its registration endpoint. The
   worker connects one DEALER per ``--gateway`` address and sends an :class:`Announce` every
   ``interval_s``: who it is (worker id, instance), where to reach it (its data endpoint and
   its control endpoint), its roles, models, versions and ``max_inflight``, and its state
   (``up``, ``draining``, ``leaving``). No answer is expected; silence for a few intervals
   means the worker is gone, as with vLLM's P2P NCCL pings.
2. *Session*: the gateway opens its usual :class:`~lmgw.transport.zmq.RpcChannel` to the
   announced endpoint, and ``Register``/``RegisterAck`` negotiate version and capabilities as
   for a worker configured statically. So one code path serves both, a worker never opens
   sockets to addresses found in requests (seed weakness 19), and announcing is optional.

Wire format: :class:`~lmgw.protocol.messages.Announce` (tag 26) in the standard framing;
:mod:`lmgw.protocol.messages` is its one definition. :func:`decode_announce` is the
registration endpoint's decoder: the shared codec, plus "exactly one frame, and an Announce".
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio
import zmq

from ..protocol.messages import Announce, ProtocolError, decode_frames, encode_header

__all__ = [
    "ANNOUNCE_TAG",
    "Announce",
    "advertised_endpoint",
    "announce_loop",
    "decode_announce",
    "encode_announce",
]

log = logging.getLogger("lmgw.worker")

ANNOUNCE_TAG = 26
"""The tag :class:`Announce` takes in the message union."""


def encode_announce(msg: Announce) -> bytearray:
    """The one frame of an announcement (a DEALER sends it as is)."""
    return encode_header(msg)


def decode_announce(frames: Sequence[Any], envelope: int = 1) -> tuple[list[Any], Announce]:
    """``(envelope, announce)`` from a registration ROUTER's frames. Raises ProtocolError
    (and nothing else) for anything but one well-formed Announce frame."""
    if len(frames) != envelope + 1:
        raise ProtocolError(f"an announcement is one frame after {envelope} of envelope")
    incoming = decode_frames(frames, envelope)
    if type(incoming.msg) is not Announce:
        raise ProtocolError(f"a {type(incoming.msg).__name__} is not an announcement")
    return incoming.envelope, incoming.msg


def advertised_endpoint(bound: str, gateway: str | None = None) -> str:
    """What a gateway should connect to, given the endpoint the worker bound.

    A wildcard host (``0.0.0.0``, ``::``) is replaced by the local address the kernel would
    use to reach ``gateway`` (a UDP ``connect``, which sends nothing), or by 127.0.0.1
    without one. Other endpoints are returned unchanged.
    """
    scheme, sep, rest = bound.partition("://")
    if scheme != "tcp" or not sep:
        return bound
    host, _, port = rest.rpartition(":")
    bare = host.strip("[]")
    try:
        wildcard = ipaddress.ip_address(bare).is_unspecified
    except ValueError:
        wildcard = bare == "*"
    if not wildcard:
        return bound
    local = "::1" if ":" in bare else "127.0.0.1"
    if gateway:
        local = _local_address_towards(gateway) or local
    return f"tcp://[{local}]:{port}" if ":" in local else f"tcp://{local}:{port}"


def _local_address_towards(gateway: str) -> str | None:
    scheme, _, rest = gateway.partition("://")
    if scheme != "tcp":
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port)))
            return probe.getsockname()[0]
    except (OSError, ValueError):
        return None


async def announce_loop(
    gateways: Sequence[str],
    make: Callable[[str], Announce],
    *,
    ctx: zmq.Context | None = None,
    interval_s: float = 2.0,
    wake: Callable[[], trio.Event] | None = None,
    leave_linger_ms: int = 500,
) -> None:
    """Announce to every gateway each ``interval_s`` (and at once whenever ``wake()``'s event
    fires, e.g. on drain) until cancelled; on the way out send ``state="leaving"`` once.

    ``make(gateway)`` builds the announcement for one gateway (the advertised address may
    differ per gateway). Sends never wait: a gateway that is down or not reading misses that
    round (``IMMEDIATE`` and a small HWM keep stale announcements from piling up). These
    DEALERs only ever send without blocking, so they are plain pyzmq sockets (nothing waits
    on their fd); the last one closes with a short linger so "leaving" still goes out.
    """
    context = ctx or zmq.Context.instance()
    socks: list[tuple[str, zmq.Socket]] = []
    try:
        for gw in gateways:
            sock = context.socket(zmq.DEALER)
            socks.append((gw, sock))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(gw)
        first = True
        while True:
            for gw, sock in socks:
                _try_announce(sock, make(gw), gw)
            event = wake() if wake is not None else None
            # the first connection takes a moment: announce again soon after starting
            with trio.move_on_after(0.05 if first else interval_s):
                if event is not None:
                    await event.wait()
                else:
                    await trio.sleep_forever()
            first = False
    finally:
        for gw, sock in socks:
            msg = make(gw)
            _try_announce(sock, msgspec.structs.replace(msg, state="leaving"), gw)
            sock.close(linger=leave_linger_ms)


def _try_announce(sock: zmq.Socket, msg: Announce, gateway: str) -> None:
    try:
        sock.send(encode_announce(msg), zmq.NOBLOCK)
    except zmq.Again:
        log.debug("gateway %s not connected: announcement skipped", gateway)
    except zmq.ZMQError as exc:
        log.warning("announcement to %s failed: %s", gateway, exc)
