"""Prefix hash: the first K prompt tokens (or 4K bytes without a tokenizer) on the bounded-load
ring. Cheap locality with no index: requests that start alike go to the same worker, whose
prefix cache then has that start. Sessions that share a long common start (a system prompt
longer than K tokens) all land on one worker until it is ``bounded_load_factor`` above the
mean, then spill clockwise: use cache_aware when the shared start is not what distinguishes
conversations. K = 256 and c = 1.25 as SMG's prefix_hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..policy import RouteContext
from .consistent_hash import VNODES, ConsistentHashBounded

if TYPE_CHECKING:
    from ...config import RoutingConfig


class PrefixHash(ConsistentHashBounded):
    name = "prefix_hash"
    needs_tokens = True

    def __init__(
        self, prefix_tokens: int = 256, load_factor: float = 1.25, vnodes: int = VNODES
    ) -> None:
        if prefix_tokens < 1:
            raise ValueError("prefix_tokens must be >= 1")
        super().__init__(load_factor, vnodes)
        self.prefix_tokens = prefix_tokens

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> PrefixHash:
        return cls(cfg.prefix_hash_tokens, cfg.bounded_load_factor)

    def key(self, ctx: RouteContext) -> str | bytes:
        tokens = ctx.tokens
        if tokens is not None:
            # hash() of an int tuple is not salted per process: every replica agrees
            return hash(tuple(tokens[: self.prefix_tokens])).to_bytes(8, "little", signed=True)
        if ctx.text_key is not None:
            return ctx.text_key[: 4 * self.prefix_tokens]
        return ctx.session_key or ctx.request_id
