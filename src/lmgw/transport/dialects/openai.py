"""Merged workers over the plain OpenAI API: one leg, the client's body byte for byte."""

from __future__ import annotations

from typing import ClassVar

from .base import (
    ClientBody,
    Dialect,
    HandOff,
    HandOffError,
    StageContext,
    StageRequest,
    leg_headers,
)


class OpenAIPassThrough(Dialect):
    name: ClassVar[str] = "openai"
    flows: ClassVar[frozenset[str]] = frozenset({"pd"})
    decode_retry_keeps_handoff: ClassVar[bool] = True
    serves_generate: ClassVar[bool] = True  # whatever the merged worker serves

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        """The body is never decoded here: nothing to change, so nothing to parse."""
        if handoff is not None:
            raise HandOffError("openai: the merged flow has no hand-off")
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), body.raw, "pd")
