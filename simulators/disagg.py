"""Hand-off artefacts of the disaggregated roles, sans-IO: KV blocks (prefill -> decode), vLLM P2P
NCCL pair ids, LMCache chunks in a shared directory (prefill -> decode) and encoder embeddings
(encode -> prefill/merged). No sockets and no trio; the clock is passed in.

Both artefacts are pure functions of what the receiving worker can compute on its own (the prompt
token ids, a media item's content hash), so the receiver re-derives them and compares byte for
byte: a hand-off that moves the wrong bytes, the right bytes in the wrong order, or bytes of a
different prompt fails the request instead of silently producing plausible text.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KV_BLOCK_BYTES = 256
"""Bytes of one simulated KV block (a real block is megabytes; a few hundred keep tests fast)."""
EMBED_BYTES_PER_TOKEN = 16
"""Bytes of simulated encoder output per placeholder token of a media item."""
LMCACHE_CHUNK_TOKENS = 256
"""LMCache's default ``chunk_size``: tokens per stored KV chunk."""
LMCACHE_BYTES_PER_TOKEN = 8
"""Bytes of simulated LMCache KV per token of a chunk."""
EC_FILE_NAME = "encoder_cache.bin"
"""File of one item under ``<ec_dir>/<content_hash>/`` (vLLM's example connector writes
``encoder_cache.safetensors`` there)."""


# ------------------------------------------------------------------------------------------------
# KV blocks
# ------------------------------------------------------------------------------------------------


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A short digest of a whole prompt: the decode side compares it with its own to name a
    "different prompt" hand-off precisely (before comparing blocks)."""
    return hashlib.blake2b(array("i", token_ids).tobytes(), digest_size=16).hexdigest()


def kv_block_payloads(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The simulated KV bytes of every *full* block of a prompt, in order.

    Chained like vLLM's block hashes (block i depends on blocks 0..i), so the same tokens at a
    different position give different bytes and a reordered transfer fails verification. A
    prompt shorter than one block has no blocks (vLLM then transfers nothing either).
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    out: list[bytes] = []
    parent = b"lmgw-sim-kv"
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = array("i", token_ids[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=32).digest()
        out.append(hashlib.shake_256(parent).digest(KV_BLOCK_BYTES))
    return out


class KVVerifyError(ValueError):
    """Transferred KV bytes do not match what the receiver derives from its own prompt."""


def verify_kv_blocks(token_ids: Sequence[int], block_size: int, payload: bytes) -> int:
    """Check a transfer (the concatenated blocks, in prompt order) against the prompt.

    Returns the number of blocks verified.

    Raises:
        KVVerifyError: wrong size or block count, or the first block whose bytes differ.
    """
    expected = kv_block_payloads(token_ids, block_size)
    if len(payload) % KV_BLOCK_BYTES:
        raise KVVerifyError(
            f"KV transfer of {len(payload)} bytes is not a whole number of "
            f"{KV_BLOCK_BYTES}-byte blocks"
        )
    got = len(payload) // KV_BLOCK_BYTES
    if got != len(expected):
        raise KVVerifyError(
            f"KV transfer has {got} blocks but the prompt ({len(token_ids)} tokens, "
            f"block size {block_size}) needs {len(expected)}"
        )
    for i, want in enumerate(expected):
        if payload[i * KV_BLOCK_BYTES : (i + 1) * KV_BLOCK_BYTES] != want:
            raise KVVerifyError(
                f"KV block {i} of {len(expected)} does not match the prompt "
                "(corrupted or misordered transfer)"
            )
    return len(expected)


@dataclass(slots=True)
class KVEntry:
    """The KV a prefill worker holds for one finished request until the decode side takes it."""

    key: str
    block_ids: list[int]
    payloads: dict[int, bytes]
    num_tokens: int
    digest: str
    expires_at: float


class KVUnknownBlocks(ValueError):
    """A fetch named block ids the entry does not hold."""


class KVStore:
    """A prefill worker's published KV, keyed by remote request id (NIXL) or room (SGLang).

    Bounded two ways, like the real thing: entries expire ``ttl_s`` after publication (vLLM's
    ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``, 480 s by default), and beyond ``max_entries`` the oldest
    is evicted. A successful :meth:`take` releases the entry (the decode side read it).
    """

    def __init__(self, *, max_entries: int = 4096, ttl_s: float = 480.0) -> None:
        if max_entries < 1 or not ttl_s > 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, KVEntry] = OrderedDict()
        self._next_block = 0
        self.published = 0
        self.released = 0
        self.expired = 0
        self.evicted = 0
        self.blocks_served = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def put(self, key: str, token_ids: Sequence[int], block_size: int, now: float) -> KVEntry:
        """Publish the KV of a prompt under ``key`` (replacing an older entry of that key)."""
        self.expire(now)
        payloads = kv_block_payloads(token_ids, block_size)
        ids = list(range(self._next_block, self._next_block + len(payloads)))
        self._next_block += len(payloads)
        entry = KVEntry(
            key,
            ids,
            dict(zip(ids, payloads, strict=True)),
            len(token_ids),
            prompt_digest(token_ids),
            now + self.ttl_s,
        )
        self._entries.pop(key, None)
        self._entries[key] = entry
        self.published += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        return entry

    def get(self, key: str, now: float) -> KVEntry | None:
        """The live entry of ``key``, if any (expired ones are dropped first)."""
        self.expire(now)
        return self._entries.get(key)

    def take(self, key: str, block_ids: Sequence[int] | None, now: float) -> tuple[KVEntry, bytes]:
        """The requested blocks (all, in order, when ``block_ids`` is None) concatenated in the
        order asked; the entry is released.

        Raises:
            KeyError: no live entry under ``key`` (never published, taken already, or expired).
            KVUnknownBlocks: some ids are not the entry's (the entry stays, as it would in vLLM
                until its timeout).
        """
        entry = self.get(key, now)
        if entry is None:
            raise KeyError(key)
        ids = entry.block_ids if block_ids is None else list(block_ids)
        missing = [b for b in ids if b not in entry.payloads]
        if missing:
            raise KVUnknownBlocks(f"block ids {missing[:8]} are not held for {key!r}")
        del self._entries[key]
        self.released += 1
        self.blocks_served += len(ids)
        return entry, b"".join(entry.payloads[b] for b in ids)

    def discard(self, key: str) -> None:
        """Forget an entry without counting it served (it went elsewhere: the cache pool)."""
        self._entries.pop(key, None)

    def expire(self, now: float) -> int:
        """Drop entries past their deadline (oldest first, so the scan stops early)."""
        n = 0
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires_at > now:
                break
            del entries[key]
            n += 1
        self.expired += n
        return n

    def clear(self) -> None:
        self._entries.clear()
        self.published = self.released = self.expired = self.evicted = self.blocks_served = 0


# ------------------------------------------------------------------------------------------------
# vLLM P2P NCCL pair ids
# ------------------------------------------------------------------------------------------------

# vLLM's P2pNcclConnector.parse_request_id: P takes the decode address, D the prefill address.
P2P_DECODE_ADDR = re.compile(r"___decode_addr_(.*):(\d+)")
P2P_PREFILL_ADDR = re.compile(r"___prefill_addr_(.*):(\d+)___")
_PAIR_ID = re.compile(r"___prefill_addr_\S+?:\d+___decode_addr_\S+?:\d+_[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class PairId:
    """What a P2P NCCL request id says: who prefills, who decodes, and the KV's name."""

    prefill_addr: str
    decode_addr: str
    key: str
    """The pair id itself (without any prefix or suffix the engine adds): both sides name the
    KV by it, so an engine-side id suffix cannot make the keys disagree."""


def parse_pair_id(request_id: str) -> PairId | None:
    """The pair in ``...___prefill_addr_{P}___decode_addr_{D}_{32 hex}...``, or None when the id
    is not one. Addresses are parsed with the connector's own patterns, so the simulator reads
    exactly what vLLM would."""
    m = _PAIR_ID.search(request_id)
    if m is None:
        return None
    p = P2P_PREFILL_ADDR.search(request_id)
    d = P2P_DECODE_ADDR.search(request_id)
    if p is None or d is None:  # pragma: no cover - _PAIR_ID implies both
        return None
    return PairId(f"{p.group(1)}:{int(p.group(2))}", f"{d.group(1)}:{int(d.group(2))}", m.group(0))


_LOOPBACK = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def same_address(a: str, b: str) -> bool:
    """Whether two ``host:port`` texts name the same listener (loopback spellings agree)."""
    ha, _, pa = a.rpartition(":")
    hb, _, pb = b.rpartition(":")
    ha, hb = ha.strip("[]").lower(), hb.strip("[]").lower()
    return pa == pb and _LOOPBACK.get(ha, ha) == _LOOPBACK.get(hb, hb)


# ------------------------------------------------------------------------------------------------
# LMCache chunks
# ------------------------------------------------------------------------------------------------


def lmcache_chunks(
    token_ids: Sequence[int], chunk_size: int, model: str
) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of every chunk of a prompt: ``chunk_size`` tokens each, the last one
    partial (LMCache with ``discard_partial_chunks: false``, as in vLLM's P/D example).

    Keys are chained prefix hashes (like LMCache's): chunk i's key depends on the model and on
    tokens ``0..end``, so prompts that share a prefix share its chunks, and the last key is a
    digest of the whole prompt.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    out: list[tuple[str, int, int]] = []
    parent = hashlib.blake2b(b"lmgw-sim-lmcache:" + model.encode(), digest_size=16).digest()
    for start in range(0, len(token_ids), chunk_size):
        end = min(len(token_ids), start + chunk_size)
        chunk = array("i", token_ids[start:end]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        out.append((parent.hex(), start, end))
    return out


def lmcache_chunk_payload(key: str, num_tokens: int) -> bytes:
    """The simulated KV bytes of one chunk: a pure function of its key and length."""
    return hashlib.shake_256(b"lmgw-sim-lmcache-kv:" + bytes.fromhex(key)).digest(
        num_tokens * LMCACHE_BYTES_PER_TOKEN
    )


class LMCacheStore:
    """LMCache's remote/P2P store, simulated by a directory shared by prefill and decode workers:
    one file per chunk, ``<root>/<key>.kv`` (keys from :func:`lmcache_chunks`).

    The producer stores every chunk of every prompt it prefills; the consumer looks the prompt's
    chunks up in order, verifies each found one byte for byte, and counts the hit. Writes are
    atomic (temporary file, then rename); the I/O is synchronous on purpose, as in
    :class:`EmbeddingStore` (chunk files are a few KiB).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, model: str, chunk_size: int = LMCACHE_CHUNK_TOKENS
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.root = Path(root)
        self.model = model
        self.chunk_size = chunk_size
        self.chunks_stored = 0
        self.chunks_hit = 0
        self.hit_tokens = 0
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.kv"

    def put(self, token_ids: Sequence[int]) -> int:
        """Store a prompt's chunks; returns how many were written (present ones are kept)."""
        written = 0
        self.root.mkdir(parents=True, exist_ok=True)
        for key, start, end in lmcache_chunks(token_ids, self.chunk_size, self.model):
            target = self.path(key)
            if target.exists():
                continue
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(lmcache_chunk_payload(key, end - start))
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written += 1
        self.chunks_stored += written
        return written

    def lookup(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of the prompt the store holds (whole chunks, in order; the
        first missing chunk ends the hit, as in LMCache). Counts a hit only for the whole prompt.

        Raises:
            KVVerifyError: a found chunk's bytes are not this prompt's (corrupted or truncated).
        """
        chunks = lmcache_chunks(token_ids, self.chunk_size, self.model)
        hit = 0
        for i, (key, start, end) in enumerate(chunks):
            try:
                data = self.path(key).read_bytes()
            except FileNotFoundError:
                break
            if data != lmcache_chunk_payload(key, end - start):
                raise KVVerifyError(
                    f"LMCache chunk {i} of {len(chunks)} (tokens {start}..{end}) in "
                    f"{str(self.root)!r} does not match the prompt (corrupted)"
                )
            self.chunks_hit += 1
            hit = end
        self.hit_tokens += hit
        if chunks and hit == len(token_ids):
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def reset_counters(self) -> None:
        self.chunks_stored = self.chunks_hit = self.hit_tokens = self.hits = self.misses = 0


# ------------------------------------------------------------------------------------------------
# Encoder embeddings
# ------------------------------------------------------------------------------------------------


def derive_embedding(content_hash: str, kind: str, tokens: int) -> bytes:
    """The simulated encoder output of one media item: a pure function of its content."""
    return hashlib.shake_256(f"lmgw-sim-ec:{kind}:{content_hash}".encode()).digest(
        max(1, tokens) * EMBED_BYTES_PER_TOKEN
    )


class EmbeddingError(ValueError):
    """An embedding in the shared directory is missing or does not match its item."""


class EmbeddingStore:
    """Encoder outputs in a directory shared by encode and prefill/merged workers, one file per
    item at ``<root>/<content_hash>/encoder_cache.bin`` (the layout of vLLM's
    ECSharedStorageConnector).

    Writes go to a temporary file in the item's directory and are renamed into place, so a
    reader sees a whole file or none. The I/O is synchronous on purpose: files are a few KiB on
    a local disk, cheaper to write inline than to hand to a thread.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.stored = 0
        self.found = 0
        self.missing = 0

    def path(self, content_hash: str) -> Path:
        if not content_hash or not all(c in "0123456789abcdef" for c in content_hash):
            raise ValueError(f"not a content hash: {content_hash!r}")
        return self.root / content_hash / EC_FILE_NAME

    def put(self, content_hash: str, data: bytes) -> bool:
        """Store an item's embedding; False when an identical file was already there."""
        target = self.path(content_hash)
        try:
            if target.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stored += 1
        return True

    def get(self, content_hash: str) -> bytes | None:
        try:
            return self.path(content_hash).read_bytes()
        except FileNotFoundError:
            return None

    def require(self, content_hash: str, kind: str, tokens: int) -> None:
        """Check that the item's embedding is present and intact (what a consumer loads).

        Raises:
            EmbeddingError: missing, or bytes that are not this item's embedding.
        """
        data = self.get(content_hash)
        if data is None:
            self.missing += 1
            raise EmbeddingError(
                f"no encoder output for {kind} item {content_hash[:16]}... in the shared "
                f"encoder cache {str(self.root)!r} (the encode leg must finish first)"
            )
        if data != derive_embedding(content_hash, kind, tokens):
            raise EmbeddingError(
                f"encoder output for {kind} item {content_hash[:16]}... in {str(self.root)!r} "
                "is corrupted (does not match the item)"
            )
        self.found += 1


__all__ = [
    "EC_FILE_NAME",
    "EMBED_BYTES_PER_TOKEN",
    "KV_BLOCK_BYTES",
    "LMCACHE_BYTES_PER_TOKEN",
    "LMCACHE_CHUNK_TOKENS",
    "P2P_DECODE_ADDR",
    "P2P_PREFILL_ADDR",
    "EmbeddingError",
    "EmbeddingStore",
    "KVEntry",
    "KVStore",
    "KVUnknownBlocks",
    "KVVerifyError",
    "LMCacheStore",
    "PairId",
    "derive_embedding",
    "kv_block_payloads",
    "lmcache_chunk_payload",
    "lmcache_chunks",
    "parse_pair_id",
    "prompt_digest",
    "same_address",
    "verify_kv_blocks",
]
