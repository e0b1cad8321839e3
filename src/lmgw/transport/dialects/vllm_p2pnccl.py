"""vLLM P2pNcclConnector P/D (xPyD).

The pair is coupled through the request id alone: ``___prefill_addr_{P}___decode_addr_{D}_{hex}``
with the workers' ZMQ ``ip:kv_port`` addresses, sent as ``X-Request-Id`` on both legs. P parses
the decode address out of it and sends the KV there; D parses the prefill address and waits for
tensors keyed by that id. So the id is fixed when P's request is built, and it names one decode
worker: D's leg must go to exactly that worker (another would wait for KV that never comes).
"""

from __future__ import annotations

import re
from typing import ClassVar

from ._vllm import prefill_only
from .base import (
    ClientBody,
    Dialect,
    HandOff,
    HandOffError,
    Peer,
    PeerError,
    StageContext,
    StageRequest,
    check_status,
    leg_headers,
    random_hex,
)

_ADDRESS = re.compile(r"[^\s_/]+:\d{1,5}")
_DECODE_ADDR = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}$")


def _problem(peer: Peer | None, role: str) -> str | None:
    addr = peer.kv_address if peer is not None else None
    if not addr or not _ADDRESS.fullmatch(addr):
        return (
            f"vllm-p2pnccl needs the {role} worker's KV address as 'ip:kv_port'"
            f" (workers[].kv_address), got {addr!r}"
        )
    return None


def _kv_address(peer: Peer | None, role: str) -> str:
    problem = _problem(peer, role)
    if problem is not None:
        raise PeerError(problem)
    return peer.kv_address  # type: ignore[union-attr,return-value]


def pair_request_id(prefill_addr: str, decode_addr: str, hex32: str) -> str:
    """The id both connectors parse: P extracts the decode address, D the prefill address."""
    return f"___prefill_addr_{prefill_addr}___decode_addr_{decode_addr}_{hex32}"


class VllmP2pNccl(Dialect):
    name: ClassVar[str] = "vllm-p2pnccl"
    flows: ClassVar[frozenset[str]] = frozenset({"p/d"})
    #: the KV went to the decode address inside the id: a retry needs a fresh prefill
    decode_retry_keeps_handoff: ClassVar[bool] = False
    one_prompt: ClassVar[bool] = True

    def peer_problem(self, role: str, peer: Peer) -> str | None:
        if role in ("p", "d"):
            return _problem(peer, "prefill" if role == "p" else "decode")
        return None

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        rid = pair_request_id(
            _kv_address(ctx.prefill, "prefill"),
            _kv_address(ctx.decode, "decode"),
            random_hex(ctx.rng, 32),
        )
        payload = body.encode(prefill_only(body.fields))
        return StageRequest(
            ctx.path, leg_headers(ctx.headers, rid), payload, "prefill", HandOff(self.name, rid)
        )

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        rid = self._require(sent.handoff, prefill_done=False).data
        check_status("prefill", status, body)
        return HandOff(self.name, rid, prefill_done=True)

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        rid = self._require(handoff).data
        m = _DECODE_ADDR.search(rid) if isinstance(rid, str) else None
        if m is None:
            raise HandOffError(f"vllm-p2pnccl: not a pair request id: {rid!r}")
        if ctx.decode is None or ctx.decode.kv_address != m.group(1):
            raise HandOffError(
                f"vllm-p2pnccl: the KV was sent to decode {m.group(1)}, not to"
                f" {ctx.decode.kv_address if ctx.decode else None}; restart from prefill"
            )
        return StageRequest(ctx.path, leg_headers(ctx.headers, rid), body.raw, "decode")
