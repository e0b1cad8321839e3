"""vLLM with LMCache P/D (``LMCacheConnectorV1``).

KV is matched by token-chunk hashes inside LMCache, so nothing couples the legs but their
order: P runs the prompt with ``max_tokens=1`` and pushes the chunks; then D gets the client's
body unmodified and finds them. The hand-off is only the proof that P finished: sent earlier,
D would miss the chunks and silently recompute the whole prompt.
"""

from __future__ import annotations

from typing import ClassVar

from ._vllm import prefill_only
from .base import (
    ClientBody,
    Dialect,
    HandOff,
    StageContext,
    StageRequest,
    check_status,
    leg_headers,
)


class VllmLmcache(Dialect):
    name: ClassVar[str] = "vllm-lmcache"
    flows: ClassVar[frozenset[str]] = frozenset({"p/d"})
    local_prefill: ClassVar[bool] = True  # a decode instance is a whole vLLM engine
    #: any decode worker finds the chunks (or recomputes): safe to retry elsewhere
    decode_retry_keeps_handoff: ClassVar[bool] = True

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        payload = body.encode(prefill_only(body.fields))
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), payload, "prefill")

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        check_status("prefill", status, body)
        return HandOff(self.name, None, prefill_done=True)

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        self._require(handoff)
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), body.raw, "decode")
