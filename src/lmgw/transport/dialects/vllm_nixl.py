"""vLLM NixlConnector P/D (pull mode by default; push mode as an option).

Prefill leg: the body with ``kv_transfer_params`` asking P to keep the KV for a remote decode,
``stream=false``, ``max_tokens=1``. P answers with the ``kv_transfer_params`` D needs (engine id,
block ids, side-channel host/port, and whatever newer connectors add). Decode leg: the original
body plus those params, copied byte for byte: the key set changes between vLLM versions and
connectors (Mooncake adds many), so the gateway must never interpret or rebuild them.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from ...errors import DECODE_ERRORS
from ._vllm import prefill_only
from .base import (
    ClientBody,
    Dialect,
    HandOff,
    StageContext,
    StageError,
    StageRequest,
    check_status,
    leg_headers,
)

_encode = msgspec.json.encode


def remote_decode_params() -> dict[str, object]:
    """What the prefill leg asks of P: prefill here, decode elsewhere (fresh dict per call)."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


class _PrefillAnswer(msgspec.Struct):
    # Raw: the exact bytes of P's value, re-emitted verbatim into D's body
    kv_transfer_params: msgspec.Raw = msgspec.Raw(b"null")


_read_answer = msgspec.json.Decoder(_PrefillAnswer).decode


class VllmNixl(Dialect):
    """``push=True`` drops ``remote_block_ids`` from D's params (vLLM's push-mode proxy):
    D registers with P and P writes the blocks instead of D reading them."""

    name: ClassVar[str] = "vllm-nixl"
    flows: ClassVar[frozenset[str]] = frozenset({"p/d"})
    local_prefill: ClassVar[bool] = True  # a decode instance is a whole vLLM engine
    decode_retry_keeps_handoff: ClassVar[bool] = True
    #: P frees the blocks once D has read them: a D that got the request may have
    decode_consumes_handoff: ClassVar[bool] = True
    one_prompt: ClassVar[bool] = True

    def __init__(self, *, push: bool = False) -> None:
        self.push = push

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        payload = prefill_only(body.fields, kv_transfer_params=remote_decode_params())
        return StageRequest(
            ctx.path, leg_headers(ctx.headers, ctx.request_id), body.encode(payload), "prefill"
        )

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        """P's ``kv_transfer_params`` (a ``msgspec.Raw``), or None when P returned none
        (prompt shorter than a block, or a connector without hand-off): D then computes the
        prompt itself from the unchanged body."""
        check_status("prefill", status, body)
        try:
            raw = _read_answer(body).kv_transfer_params
        except DECODE_ERRORS:
            raise StageError("prefill", status, "answer is not a JSON object") from None
        data: object = None
        first = bytes(raw)[:1]
        if first == b"{":
            data = raw
            if self.push:
                params = msgspec.json.decode(raw)
                params.pop("remote_block_ids", None)
                data = msgspec.Raw(_encode(params))
        elif first != b"n":  # anything but an object or null cannot be a hand-off
            raise StageError("prefill", status, "kv_transfer_params is not a JSON object")
        return HandOff(self.name, data, prefill_done=True)

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        """The original body (its ``stream``, ``max_tokens``, ``stream_options`` restored) with
        P's params; byte-identical to the client's body when P returned none."""
        params = self._require(handoff).data
        payload = (
            body.raw
            if params is None
            else body.encode({**body.fields, "kv_transfer_params": params})
        )
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), payload, "decode")
