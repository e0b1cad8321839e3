"""Engine KV-cache events, as vLLM publishes them (``--kv-events-config``), for exact routing.

vLLM's ``ZmqEventPublisher`` sends multipart messages ``[topic, seq (8 bytes big-endian),
payload]`` on a PUB socket; the payload is a msgpack ``KVEventBatch(ts, events,
data_parallel_rank)`` whose events are tagged structs (``vllm/distributed/kv_events.py``):

- ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, group_idx, ...)``: full blocks entered the prefix cache; block i holds
  ``token_ids[i*block_size:(i+1)*block_size]`` and extends ``parent_block_hash`` (None: the
  first block of a sequence).
- ``BlockRemoved(block_hashes, medium, group_idx)``: blocks were evicted.
- ``AllBlocksCleared()``: the cache was reset.

Block hashes are the engine's own (int or bytes, seeded per process), so they cannot be
recomputed here; the cache-aware policy recomputes *its* chained hashes from ``token_ids`` and
keeps an alias from the engine's hash to its own (llm-d does the same). Older vLLM encodes
structs as arrays (``array_like``, tag first), newer ones as maps with a ``type`` tag: the
decoder takes both. This module is pure: the subscriber (a socket owner task) lives elsewhere.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventError",
    "decode_vllm_batch",
]

EngineHash = int | bytes


class BlockStored(msgspec.Struct, frozen=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: Annotated[int, msgspec.Meta(gt=0)]
    lora_id: int | None = None
    #: "GPU" (or None: older engines) is the tier routing predicts from; others are ignored
    medium: str | None = None
    #: KV-cache group (hybrid models); only group 0 / None is the full-attention prefix cache
    group_idx: int | None = None
    #: the LoRA adapter the blocks were computed with (newer vLLM; older ones send only
    #: lora_id, whose names the gateway cannot know)
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, frozen=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, frozen=True, gc=False):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventError(ValueError):
    """A payload that is not a vLLM KV event batch."""


_BLOCK_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                        "lora_id", "medium", "lora_name", "extra_keys", "group_idx")  # fmt: skip
_BLOCK_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


_STORED_KEYS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                "medium", "group_idx", "lora_name")  # fmt: skip
_STORED_REQUIRED = ("block_hashes", "parent_block_hash", "token_ids", "block_size")
_REMOVED_KEYS = ("block_hashes", "medium", "group_idx")


def _fields(raw: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    return dict(zip(names, raw[1:], strict=False))  # array form: [tag, field0, field1, ...]


def _event(raw: Any) -> KVEvent | None:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise KVEventError(f"not an event: {type(raw).__name__}")
    # msgspec.convert checks every field's type (a Struct's constructor would not): a
    # worker's event with a string where a hash belongs is refused here, not in the index
    if tag == "BlockStored":
        f = _fields(raw, _BLOCK_STORED_FIELDS)
        return msgspec.convert(
            {k: f.get(k) for k in _STORED_KEYS if k in f or k in _STORED_REQUIRED}, BlockStored
        )
    if tag == "BlockRemoved":
        f = _fields(raw, _BLOCK_REMOVED_FIELDS)
        return msgspec.convert({k: f[k] for k in _REMOVED_KEYS if k in f}, BlockRemoved)
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None  # a newer event kind: skipped, not an error


def decode_vllm_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """``(ts, events, data_parallel_rank)`` of one vLLM ``KVEventBatch`` payload (the third
    frame of a message). Unknown event kinds are skipped; a malformed payload raises
    :class:`KVEventError`."""
    try:
        raw = msgspec.msgpack.decode(payload)
        if isinstance(raw, dict):
            ts, events, rank = raw.get("ts", 0.0), raw["events"], raw.get("data_parallel_rank")
        else:
            ts, events = raw[0], raw[1]
            rank = raw[2] if len(raw) > 2 else None
        out = [e for e in map(_event, events) if e is not None]
        ts = float(ts)
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, ValueError, RecursionError) as e:
        if isinstance(e, KVEventError):
            raise
        raise KVEventError(f"bad KV event batch: {e}") from None
    if not isinstance(rank, int | None):
        raise KVEventError(f"bad KV event batch: data_parallel_rank {rank!r}")
    return ts, out, rank
