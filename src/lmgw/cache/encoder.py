"""The gateway's encoder-output cache on the pool: which media items need no E stage.

A media item's encoder output is known in the pool as ``ec:{model}:{item key}`` (the item key is
what the dialect routes the item by: its uuid, which the gateway pins to the content hash, or a
hash of its URL; on the native protocol the content hash). Three writers:

* workers that hand encoder outputs through the pool (the simulators' ``--handoff pool``) put
  the embedding itself there, and the P/PD worker reads it back;
* native encoders that send their outputs back through the gateway: the gateway keeps them
  there (:meth:`PooledEncodedItems.keep`) and hands them to the prompt stage on a repeat;
* otherwise, after an encoder leg succeeds, the gateway puts a small note (an empty value with
  the encoder's id as producer and the ``media.encoder_cache_ttl_s`` lifetime): the engine's own
  encoder cache (vLLM's EC connector storage) holds the output.

Either way a request repeating the item skips its E leg, and with a shared tier (shm, Redis)
so does every other gateway replica and a gateway that restarted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .api import CachePool

__all__ = ["NOTE", "PooledEncodedItems", "encoder_key"]

NOTE = b""
"""The value of the gateway's note (the output itself is in the engine's encoder cache)."""


def encoder_key(model: str, item_key: str) -> str:
    return f"ec:{model}:{item_key}"


class PooledEncodedItems:
    """The skip-E set of :class:`~lmgw.pipeline.disagg.DisaggRunner` backed by ``pool``.

    ``ttl_s`` is the note's lifetime (0: the gateway writes no notes and skips E only for items
    whose output a worker put in the pool)."""

    def __init__(self, pool: CachePool, ttl_s: float) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        #: :meth:`keep` holds outputs (the runner copies them out of shared memory only then)
        self.keeps_outputs = bool(ttl_s)

    async def holding(self, model: str, keys: Iterable[str | None]) -> set[str]:
        """The item keys among ``keys`` whose encoder output the pool knows of."""
        wanted = {encoder_key(model, k): k for k in keys if k}
        if not wanted:
            return set()
        found = await self.pool.contains_many(list(wanted))
        return {wanted[k] for k in found}

    async def remember(self, model: str, key: str | None, producer: str) -> None:
        """After ``producer`` (an encoder) answered for the item: note it, unless the pool
        already holds its output."""
        if not key or not self.ttl_s:
            return
        name = encoder_key(model, key)
        if not await self.pool.contains(name):
            await self.pool.put(name, NOTE, producer=producer, role="e", ttl_s=self.ttl_s)

    async def keep(self, model: str, key: str | None, output: Any, producer: str) -> None:
        """An encoder ``output`` (an array) that came back through the gateway (native
        encoders without shared storage): kept in the pool, so a repeat skips E and the
        prompt stage gets the output from here (:meth:`outputs`)."""
        if key and self.ttl_s:
            await self.pool.put(
                encoder_key(model, key), output, producer=producer, role="e", ttl_s=self.ttl_s
            )

    async def outputs(self, model: str, keys: Iterable[str]) -> dict[str, Any]:
        """The outputs the gateway kept among ``keys`` (arrays, from :meth:`keep`); a note, or
        a worker's own output (bytes it reads back itself), is left out."""
        wanted = {encoder_key(model, k): k for k in keys if k}
        if not wanted:
            return {}
        found = await self.pool.get_many(list(wanted))
        return {wanted[k]: v for k, v in found.items() if not isinstance(v, bytes)}

    def __len__(self) -> int:  # (the in-process set reports its size; the pool has metrics)
        return 0
