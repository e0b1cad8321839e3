"""ZeroMQ under trio: a socket wrapper (one fd waiter, no missed wake-ups) and the gateway's
RPC channel for the native protocol (see docs/native-protocol.md)."""

from .channel import ChannelState, RpcChannel, RpcError, RpcStream, Session
from .socket import (
    DEFAULT_HWM,
    PeerUnreachable,
    ReceiveTimeout,
    SendBlocked,
    ZmqSocket,
    ZmqTransportError,
)

__all__ = [
    "DEFAULT_HWM",
    "ChannelState",
    "PeerUnreachable",
    "ReceiveTimeout",
    "RpcChannel",
    "RpcError",
    "RpcStream",
    "SendBlocked",
    "Session",
    "ZmqSocket",
    "ZmqTransportError",
]
