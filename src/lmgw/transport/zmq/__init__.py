"""ZeroMQ under trio: a socket wrapper (one fd waiter, no missed wake-ups), the gateway's RPC
channel for the native protocol, and CURVE for its links (see docs/native-protocol.md)."""

from .channel import ChannelState, RpcChannel, RpcError, RpcStream, Session
from .curve import CurveClient, CurveError, CurveServer, KeyPair, generate_keys
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
    "CurveClient",
    "CurveError",
    "CurveServer",
    "KeyPair",
    "PeerUnreachable",
    "ReceiveTimeout",
    "RpcChannel",
    "RpcError",
    "RpcStream",
    "SendBlocked",
    "Session",
    "ZmqSocket",
    "ZmqTransportError",
    "generate_keys",
]
