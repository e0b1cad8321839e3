"""The mock engine, sans-IO: tokenizer, chat rendering, deterministic output, timing model, prefix
cache and accounting. No sockets, no clock, no trio, so the HTTP layer (``app.py``) and the later
encode / prefill / decode simulators drive the same core, and unit tests run it directly.

Determinism is the point: the completion of a request is a pure function of (prompt token ids,
worker seed, request ``seed``, choice index), so a test can assert the exact text whatever route
(direct, through the gateway, through a P/D hand-off) the request took.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
import struct
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

VOCAB_SIZE = 32000
"""Token ids live in [0, VOCAB_SIZE); ids below RESERVED are special tokens."""
RESERVED = 256

UNK_ID = 0
IM_START_ID = 1
IM_END_ID = 2
EOS_ID = 3
SPECIAL_TOKENS: dict[str, int] = {
    "<unk>": UNK_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|endoftext|>": EOS_ID,
    "<|image|>": 4,
    "<|audio|>": 5,
    "<|video|>": 6,
}
_SPECIAL_BY_ID = {v: k for k, v in SPECIAL_TOKENS.items()}

# Every character belongs to exactly one piece, so "".join(pieces) == text (lossless round trip):
# special tokens, a word with its leading whitespace, one punctuation char with its leading
# whitespace, or trailing whitespace.
_PIECE_RE = re.compile(r"<\|[a-z_]+\|>|\s*\w+|\s*[^\w\s]|\s+")

_ENCODE_CACHE_ENTRIES = 4096
_ENCODE_CACHE_MAX_CHARS = 32768
_REVERSE_MAP_MAX = 262144


def _hash_id(piece: str) -> int:
    """A stable hash into the non-special ids (crc32 is C-fast and process-independent)."""
    return RESERVED + zlib.crc32(piece.encode()) % (VOCAB_SIZE - RESERVED)


def piece_id(piece: str) -> int:
    """The id of one non-special piece. Ids of the output vocabulary are kept for it (a colliding
    input piece probes to the next free id), so generated text always decodes exactly."""
    entry = _BY_PIECE.get(piece)
    if entry is not None:
        return entry.token_id
    tid = _hash_id(piece)
    while tid in _OUTPUT_IDS:
        tid = RESERVED + (tid - RESERVED + 1) % (VOCAB_SIZE - RESERVED)
    return tid


class Tokenizer:
    """A deterministic word/punctuation tokenizer for the mock model.

    ``encode`` is lossless at the piece level; ``decode`` knows every id of the output vocabulary
    and every piece this tokenizer has encoded (a bounded map; when two input pieces hash to the
    same id the latest wins, so a round trip is exact unless a text holds such a pair). Unknown
    ids decode to a visible ``<|tokN|>`` marker rather than raising.
    """

    def __init__(self) -> None:
        self._piece_ids: dict[str, int] = {}
        self._id_pieces: dict[int, str] = dict(_SPECIAL_BY_ID)
        self._encode_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        for entry in OUTPUT_VOCAB:
            self._piece_ids[entry.piece] = entry.token_id
            self._id_pieces[entry.token_id] = entry.piece
        self._static_ids = frozenset(self._id_pieces)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in the text are recognised, as HF does)."""
        cache = self._encode_cache
        hit = cache.get(text)
        if hit is not None:
            cache.move_to_end(text)
            return list(hit)
        ids = self._encode_uncached(text)
        if len(text) <= _ENCODE_CACHE_MAX_CHARS:
            cache[text] = tuple(ids)
            if len(cache) > _ENCODE_CACHE_ENTRIES:
                cache.popitem(last=False)
        return ids

    def _encode_uncached(self, text: str) -> list[int]:
        known = self._piece_ids
        out: list[int] = []
        append = out.append
        for piece in _PIECE_RE.findall(text):
            tid = known.get(piece)
            if tid is None:
                tid = SPECIAL_TOKENS.get(piece)
                if tid is None:
                    tid = piece_id(piece)
                    self._remember(piece, tid)
            append(tid)
        return out

    def _remember(self, piece: str, tid: int) -> None:
        if len(self._piece_ids) >= _REVERSE_MAP_MAX:
            # Bounded memory: forget learned pieces (the static output vocabulary stays).
            self._piece_ids = {e.piece: e.token_id for e in OUTPUT_VOCAB}
            self._id_pieces = {i: p for i, p in self._id_pieces.items() if i in self._static_ids}
        self._piece_ids[piece] = tid
        if tid not in self._static_ids:
            self._id_pieces[tid] = piece

    def id_to_piece(self, tid: int) -> str:
        """The text of one token id."""
        piece = self._id_pieces.get(tid)
        return piece if piece is not None else f"<|tok{tid}|>"

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; exact inverse of ``encode`` for pieces this tokenizer has seen."""
        return "".join(self.id_to_piece(t) for t in ids)


@dataclass(frozen=True, slots=True)
class VocabEntry:
    """One output token: its id, its text, and the text pre-encoded as a JSON string."""

    token_id: int
    piece: str
    json: bytes


def _build_output_vocab(size: int = 1024) -> tuple[VocabEntry, ...]:
    """Pseudo-words (fixed RNG, so identical in every process), each in four spellings: with and
    without a leading space, lower and capitalised. Pieces whose ids collide are dropped so that
    every output id decodes to exactly one text."""
    rng = random.Random(0x5EED)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "st"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    used: set[int] = set(SPECIAL_TOKENS.values())
    entries: list[VocabEntry] = []
    for piece in [",", ".", *(v for w in words for v in (f" {w}", w, f" {w.title()}", w.title()))]:
        tid = _hash_id(piece)
        if tid in used:
            continue
        used.add(tid)
        entries.append(VocabEntry(tid, piece, msgspec.json.encode(piece)))
    return tuple(entries)


OUTPUT_VOCAB: tuple[VocabEntry, ...] = _build_output_vocab()
_BY_PIECE = {e.piece: e for e in OUTPUT_VOCAB}
_OUTPUT_IDS = frozenset(e.token_id for e in OUTPUT_VOCAB)
_COMMA = _BY_PIECE[","]
_PERIOD = _BY_PIECE["."]
# Indexed by word: (" word", "word", " Word", "Word") where all four survived de-duplication.
_WORD_FORMS: tuple[tuple[VocabEntry, VocabEntry, VocabEntry, VocabEntry], ...] = tuple(
    (_BY_PIECE[f" {w}"], _BY_PIECE[w], _BY_PIECE[f" {w.title()}"], _BY_PIECE[w.title()])
    for w in (
        e.piece[1:] for e in OUTPUT_VOCAB if e.piece.startswith(" ") and e.piece[1:].islower()
    )
    if all(p in _BY_PIECE for p in (w, f" {w.title()}", w.title()))
)
PIECE_JSON: dict[str, bytes] = {e.piece: e.json for e in OUTPUT_VOCAB}
"""Output pieces pre-encoded as JSON strings, so the streaming path never re-encodes them."""


# ------------------------------------------------------------------------------------------------
# Chat rendering
# ------------------------------------------------------------------------------------------------


class PromptError(ValueError):
    """A request whose prompt cannot be built (bad message shape, unknown content part)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class MediaConfig:
    """Placeholder tokens per multimodal item (fixed, like a model with fixed-size patches)."""

    image_tokens: int = 256
    audio_tokens: int = 128
    video_tokens: int = 1024


_MEDIA_KINDS = {
    "image_url": ("image", "<|image|>"),
    "image_pil": ("image", "<|image|>"),
    "image_embeds": ("image", "<|image|>"),
    "input_audio": ("audio", "<|audio|>"),
    "audio_url": ("audio", "<|audio|>"),
    "video_url": ("video", "<|video|>"),
}


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One multimodal item of a prompt: its kind, a content hash (like vLLM's mm_hash), and where
    its placeholder tokens sit in the prompt. ``content_hash`` (sha256 of the data URL / URL, or
    of the item's uuid) keys the item's embedding in a shared encoder cache, as vLLM's EC
    connectors key it by mm hash."""

    kind: str
    mm_hash: str
    offset: int
    length: int
    content_hash: str = ""


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A chat rendered for the model: template text (media as markers), token ids, media items."""

    text: str
    token_ids: list[int]
    media: tuple[MediaItem, ...] = ()


def media_token_ids(mm_hash: str, count: int) -> list[int]:
    """Placeholder ids that depend on the item's content, so different images do not share a
    prefix-cache block (vLLM gets the same effect by keying blocks with the mm hash)."""
    base = int(mm_hash[:8], 16)
    span = VOCAB_SIZE - RESERVED
    return [RESERVED + (base + 7919 * i) % span for i in range(count)]


def _media_hash(part: dict[str, Any], key: str) -> tuple[str, str]:
    """(hash of the content for the placeholder ids, key for the encoder cache).

    As in vLLM, a part's ``uuid`` is its cache key (E stores the embedding under it, P looks
    it up by it), while what the model "sees" is the content: the same picture gives the same
    text with or without a uuid. A part with a uuid and no media is known by the uuid alone."""
    payload = part.get(key)
    if isinstance(payload, dict):
        ident = payload.get("url") or payload.get("data") or msgspec.json.encode(payload).decode()
    else:
        ident = str(payload) if payload is not None else ""
    uuid = part.get("uuid")
    has_uuid = isinstance(uuid, str) and bool(uuid)
    seen = ident if ident and ident != "None" else ("uuid:" + uuid if has_uuid else ident)
    cache = "uuid:" + uuid if has_uuid else ident
    return (
        hashlib.blake2b(seen.encode(), digest_size=16).hexdigest(),
        hashlib.sha256(cache.encode()).hexdigest(),
    )


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    media: MediaConfig = MediaConfig(),
) -> RenderedPrompt:
    """Render messages with a ChatML-like template and tokenize them.

    Content is a string, None, or a list of parts: text parts are concatenated, each media part
    (image_url, input_audio, audio_url, video_url) becomes a marker in the text and a fixed number
    of placeholder tokens in the ids.

    Raises:
        PromptError: a message or part has the wrong shape (the HTTP layer answers 400).
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise PromptError("messages must be a non-empty list", "messages")
    if continue_final_message and add_generation_prompt:
        raise PromptError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    segments: list[str | tuple[str, str, int, str]] = []
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptError(f"messages[{i}] must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str):
            raise PromptError(f"messages[{i}].role must be a string", "messages")
        segments.append(f"<|im_start|>{role}\n")
        content = msg.get("content")
        if isinstance(content, str):
            segments.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _render_part(part, i, j, segments, media)
        elif content is not None:
            raise PromptError(f"messages[{i}].content must be a string or a list", "messages")
        tool_calls = msg.get("tool_calls")
        if tool_calls:
            segments.append(f"<tool_call>{msgspec.json.encode(tool_calls).decode()}</tool_call>")
        if not (continue_final_message and i == last):
            segments.append("<|im_end|>\n")
    if add_generation_prompt:
        segments.append("<|im_start|>assistant\n")
    return _tokenize_segments(tokenizer, segments)


def _render_part(
    part: Any,
    i: int,
    j: int,
    segments: list[str | tuple[str, str, int, str]],
    media: MediaConfig,
) -> None:
    if isinstance(part, str):
        segments.append(part)
        return
    if not isinstance(part, dict):
        raise PromptError(f"messages[{i}].content[{j}] must be an object", "messages")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"messages[{i}].content[{j}].text must be a string", "messages")
        segments.append(text)
        return
    known = _MEDIA_KINDS.get(kind) if isinstance(kind, str) else None
    if known is None:
        raise PromptError(f"Unknown part type: {kind!r}", "messages")
    media_kind, marker = known
    count = {
        "image": media.image_tokens,
        "audio": media.audio_tokens,
        "video": media.video_tokens,
    }[media_kind]
    mm_hash, content_hash = _media_hash(part, kind)
    segments.append((marker, mm_hash, count, content_hash))


def _tokenize_segments(
    tokenizer: Tokenizer, segments: list[str | tuple[str, str, int, str]]
) -> RenderedPrompt:
    texts: list[str] = []
    ids: list[int] = []
    items: list[MediaItem] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            chunk = "".join(pending)
            ids.extend(tokenizer.encode(chunk))
            pending.clear()

    for seg in segments:
        if isinstance(seg, str):
            texts.append(seg)
            pending.append(seg)
        else:
            flush()
            marker, mm_hash, count, content_hash = seg
            texts.append(marker)
            items.append(MediaItem(marker.strip("<|>"), mm_hash, len(ids), count, content_hash))
            ids.extend(media_token_ids(mm_hash, count))
    flush()
    return RenderedPrompt("".join(texts), ids, tuple(items))


# ------------------------------------------------------------------------------------------------
# Deterministic output
# ------------------------------------------------------------------------------------------------

MIN_NATURAL_TOKENS = 8
MAX_NATURAL_TOKENS = 64


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """The sampling fields that change the output. Temperature, top_p etc. are ignored on purpose:
    the output must not depend on them so that tests can assert exact text."""

    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """One generated choice. ``pieces[i]`` is the visible text of token ``i`` (empty or truncated
    for the token that hit a stop condition); ``text == "".join(pieces)``."""

    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]
    text: str
    finish_reason: str
    stop_reason: str | int | None = None
    pieces_json: tuple[bytes, ...] = ()
    """``pieces`` pre-encoded as JSON strings (the streaming path splices them into events)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def completion_key(
    prompt_ids: Sequence[int], engine_seed: int, request_seed: int | None, index: int
) -> int:
    """64-bit key from which the whole completion derives."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqq", engine_seed, -1 if request_seed is None else request_seed, index))
    h.update(array("i", prompt_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def natural_length(key: int) -> int:
    """How many tokens the mock model "wants" to say before EOS (8..64)."""
    return MIN_NATURAL_TOKENS + key % (MAX_NATURAL_TOKENS - MIN_NATURAL_TOKENS + 1)


def _draw_tokens(key: int, count: int) -> list[VocabEntry]:
    """Sentence-like output: words, an occasional comma, a period every 6-16 words, capitals
    after periods, no leading space on the very first token."""
    rng = random.Random(key)
    forms = _WORD_FORMS
    nforms = len(forms)
    out: list[VocabEntry] = []
    capital = True
    until_period = rng.randint(6, 16)
    for i in range(count):
        if until_period <= 0 and not capital and out[-1] is not _COMMA:
            out.append(_PERIOD)
            capital = True
            until_period = rng.randint(6, 16)
            continue
        r = rng.getrandbits(32)
        if not capital and r % 13 == 0 and out and out[-1] is not _COMMA:
            out.append(_COMMA)
            continue
        word = forms[(r >> 4) % nforms]
        out.append(word[(0 if i else 1) + (2 if capital else 0)])
        capital = False
        until_period -= 1
    return out


def generate(
    prompt_ids: Sequence[int],
    spec: SamplingSpec,
    *,
    engine_seed: int,
    max_model_len: int,
    index: int = 0,
) -> Completion:
    """The completion for one choice: a pure function of its arguments."""
    key = completion_key(prompt_ids, engine_seed, spec.seed, index)
    room = max(0, max_model_len - len(prompt_ids))
    cap = room if spec.max_tokens is None else min(spec.max_tokens, room)
    natural: float = math.inf if spec.ignore_eos else natural_length(key)
    natural = max(natural, spec.min_tokens)
    if natural <= cap:
        length, finish = int(natural), "stop"
    else:
        length, finish = cap, "length"
    entries = _draw_tokens(key, length)
    token_ids = [e.token_id for e in entries]
    pieces = [e.piece for e in entries]
    stop_reason: str | int | None = None

    first_checked = max(0, spec.min_tokens - 1)  # vLLM skips stop checks before min_tokens
    if spec.stop_token_ids:
        stop_ids = set(spec.stop_token_ids)
        for i in range(first_checked, len(token_ids)):
            if token_ids[i] in stop_ids:
                token_ids, pieces = token_ids[: i + 1], pieces[: i + 1]
                if not spec.include_stop_str_in_output:
                    pieces[i] = ""
                finish, stop_reason = "stop", token_ids[i]
                break
    if spec.stop:
        hit = _find_stop(pieces, spec.stop, first_checked, spec.include_stop_str_in_output)
        if hit is not None:
            ntok, cut, stop_str = hit
            token_ids, pieces = token_ids[:ntok], _cut_pieces(pieces[:ntok], cut)
            finish, stop_reason = "stop", stop_str
    pieces_json = tuple(PIECE_JSON.get(p) or msgspec.json.encode(p) for p in pieces)
    return Completion(
        tuple(token_ids), tuple(pieces), "".join(pieces), finish, stop_reason, pieces_json
    )


def _find_stop(
    pieces: list[str], stops: tuple[str, ...], first_checked: int, include: bool
) -> tuple[int, int, str] | None:
    """The stop string that completes first (at a token index >= first_checked), as vLLM finds it
    checking after every token: (tokens kept, text cut offset, the stop string)."""
    text = "".join(pieces)
    ends: list[int] = []
    pos = 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    best: tuple[int, int, str] | None = None
    for s in stops:
        if not s:
            continue
        start = text.find(s)
        while start != -1:
            tok = bisect.bisect_left(ends, start + len(s))  # the token that completes the match
            if tok >= first_checked:
                if best is None or tok + 1 < best[0]:
                    best = (tok + 1, start + len(s) if include else start, s)
                break
            start = text.find(s, start + 1)
    return best


def _cut_pieces(pieces: list[str], cut: int) -> list[str]:
    out: list[str] = []
    pos = 0
    for p in pieces:
        keep = max(0, min(len(p), cut - pos))
        out.append(p if keep == len(p) else p[:keep])
        pos += len(p)
    return out


# ------------------------------------------------------------------------------------------------
# Timing model
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TimingModel:
    """Latency of a 7-8B model on one GPU, divided by ``speed`` (``inf``: no delays at all).

    prefill_s = a + b * uncached_tokens; decode_s (per token step) = c + d * batch_size;
    encode_s = e per multimodal item (the encoder role). ``slow`` is the fault-injection
    multiplier applied on top.
    """

    a: float = 0.002
    b: float = 0.0001
    c: float = 0.008
    d: float = 0.0001
    speed: float = 1.0
    e: float = 0.01

    @property
    def instant(self) -> bool:
        return math.isinf(self.speed)

    def prefill_s(self, uncached_tokens: int, slow: float = 1.0) -> float:
        if self.instant:
            return 0.0
        return (self.a + self.b * max(0, uncached_tokens)) * slow / self.speed

    def decode_s(self, batch_size: int, slow: float = 1.0) -> float:
        if self.instant:
            return 0.0
        return (self.c + self.d * max(1, batch_size)) * slow / self.speed

    def encode_s(self, items: int, slow: float = 1.0) -> float:
        if self.instant:
            return 0.0
        return self.e * max(0, items) * slow / self.speed


# ------------------------------------------------------------------------------------------------
# Prefix cache
# ------------------------------------------------------------------------------------------------


def block_hashes(token_ids: Sequence[int], block_size: int, known: Sequence[int] = ()) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``: block i's key covers blocks 0..i, so a
    hit on block i implies the whole prefix matches (vLLM's scheme). Python's hash of int tuples
    is not randomised, so keys agree across processes. ``known`` are already computed hashes of
    a prefix of ``token_ids`` (e.g. the prompt's, when hashing prompt + output)."""
    out = list(known)
    parent = out[-1] if out else 0
    for start in range(len(out) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, *token_ids[start : start + block_size]))
        out.append(parent)
    return out


class PrefixCache:
    """An LRU set of token blocks keyed by chained block hashes, with a capacity in blocks.

    Like vLLM, a lookup never reports the whole prompt as cached: the last token is always
    computed, so at most ``(len - 1) // block_size`` blocks hit.
    """

    def __init__(self, capacity_blocks: int = 8192, block_size: int = 16) -> None:
        if capacity_blocks < 0 or block_size < 1:
            raise ValueError("capacity_blocks must be >= 0 and block_size >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, token_ids: Sequence[int], hashes: Sequence[int] | None = None) -> int:
        """Cached tokens for a prompt (a multiple of block_size); counts queries and hits."""
        if hashes is None:
            hashes = block_hashes(token_ids, self.block_size)
        usable = min(len(hashes), max(0, len(token_ids) - 1) // self.block_size)
        blocks = self._blocks
        n = 0
        while n < usable and hashes[n] in blocks:
            blocks.move_to_end(hashes[n])
            n += 1
        cached = n * self.block_size
        self.queries += len(token_ids)
        self.hits += cached
        return cached

    def insert(self, token_ids: Sequence[int], hashes: Sequence[int] | None = None) -> None:
        """Cache every full block of ``token_ids`` (most recently used), evicting LRU blocks."""
        if self.capacity_blocks == 0:
            return
        if hashes is None:
            hashes = block_hashes(token_ids, self.block_size)
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.queries = self.hits = self.evictions = 0


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """A cumulative-bucket histogram in Prometheus' shape (bucket counts are not cumulative here;
    the exposition sums them)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


@dataclass(slots=True)
class EngineStats:
    """Counters behind /metrics and /sim/stats."""

    requests_total: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    aborted_total: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass(slots=True)
class EngineConfig:
    """Everything that shapes the mock engine; the CLI and tests build one of these."""

    seed: int = 0
    max_model_len: int = 8192
    max_num_seqs: int = 256
    kv_blocks: int = 8192
    block_size: int = 16
    timing: TimingModel = field(default_factory=TimingModel)
    media: MediaConfig = field(default_factory=MediaConfig)


class Ticket:
    """One request's life in the engine: waiting -> running (prefill, decode) -> closed.

    The HTTP layer calls ``admit``, ``prefill``, ``begin_decode``, ``emitted`` as the request
    progresses and ``close`` exactly once in a ``finally``; ``close`` undoes whatever the current
    state holds, so no exit path (success, error, cancellation) leaks a running slot.
    """

    __slots__ = (
        "_engine",
        "_kv_blocks",
        "_nseq",
        "_prompt_hashes",
        "_prompts",
        "cached_tokens",
        "prompt_tokens",
        "state",
    )

    def __init__(self, engine: Engine, prompt_tokens: int, nseq: int) -> None:
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self._nseq = nseq
        self._kv_blocks = 0
        self.cached_tokens = 0
        self._prompt_hashes: list[list[int]] = []
        self._prompts: Sequence[Sequence[int]] = ()
        self.state = "waiting"
        engine.waiting += 1
        engine.stats.requests_total += 1

    def admit(self, expected_tokens: int) -> None:
        """Leave the queue; reserve KV blocks for the prompt and the expected output."""
        e = self._engine
        assert self.state == "waiting"
        e.waiting -= 1
        e.running += 1
        bs = e.config.block_size
        self._kv_blocks = -(-(self.prompt_tokens + expected_tokens) // bs)
        e.kv_blocks_in_use += self._kv_blocks
        self.state = "running"

    def prefill(self, prompts: Sequence[Sequence[int]], external_cached: int = 0) -> float:
        """Look the prompts up in the prefix cache and cache them; returns the prefill seconds.

        ``external_cached`` tokens of each prompt arrived from elsewhere (a disaggregated decode
        worker's KV fetched from its prefill worker): they count as cached, not computed, but
        not as local prefix-cache hits (vLLM's metrics count those separately too)."""
        e = self._engine
        cache = e.cache
        uncached = 0
        self._prompts = prompts
        for ids in prompts:
            hashes = block_hashes(ids, cache.block_size)
            self._prompt_hashes.append(hashes)
            hit = max(cache.lookup(ids, hashes), min(external_cached, len(ids)))
            self.cached_tokens += hit
            uncached += len(ids) - hit
            cache.insert(ids, hashes)
        e.stats.prompt_tokens += sum(len(p) for p in prompts)
        return e.config.timing.prefill_s(uncached, e.slow)

    def begin_decode(self) -> None:
        assert self.state == "running"
        self._engine.decoding += self._nseq
        self.state = "decoding"

    def emitted(self, tokens: int) -> None:
        self._engine.stats.generation_tokens += tokens

    def decode_step_s(self) -> float:
        """Seconds of the next decode step, given everyone decoding right now."""
        e = self._engine
        return e.config.timing.decode_s(e.decoding, e.slow)

    def close(self, completions: Sequence[Completion] = (), *, aborted: bool = False) -> None:
        """Release everything the ticket holds (idempotent); record how it finished.

        ``completions`` are the request's choices in order, ``n`` per prompt given to
        ``prefill``; their prompt + output blocks stay in the prefix cache, as in vLLM.
        """
        e = self._engine
        if self.state == "closed":
            return
        if self.state == "waiting":
            e.waiting -= 1
        else:
            if self.state == "decoding":
                e.decoding -= self._nseq
            e.running -= 1
            e.kv_blocks_in_use -= self._kv_blocks
        self.state = "closed"
        if aborted:
            e.stats.aborted_total += 1
            return
        finished = e.stats.finished
        for c in completions:
            finished[c.finish_reason] = finished.get(c.finish_reason, 0) + 1
        prompts, hashes = self._prompts, self._prompt_hashes
        if not prompts or not completions:
            return
        per_prompt = max(1, len(completions) // len(prompts))
        bs = e.cache.block_size
        for i, c in enumerate(completions):
            p = min(i // per_prompt, len(prompts) - 1)
            ids = [*prompts[p], *c.token_ids]
            e.cache.insert(ids, block_hashes(ids, bs, hashes[p]))


_MEMO_ENTRIES = 1024


class Engine:
    """State of one mock worker: tokenizer, prefix cache, timing, load and counters.

    Queueing itself (waiting for one of ``max_num_seqs`` slots) is the I/O layer's job; the engine
    only counts who waits and who runs, for the metrics and the decode batch size.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = Tokenizer()
        self.cache = PrefixCache(self.config.kv_blocks, self.config.block_size)
        self.stats = EngineStats()
        self.slow = 1.0
        self.waiting = 0
        self.running = 0
        self.decoding = 0
        self.kv_blocks_in_use = 0
        self._memo: OrderedDict[tuple[tuple[int, ...], SamplingSpec, int], Completion] = (
            OrderedDict()
        )

    def submit(self, prompt_tokens: int, nseq: int = 1) -> Ticket:
        """A new request enters the queue."""
        return Ticket(self, prompt_tokens, nseq)

    def generate(self, prompt_ids: Sequence[int], spec: SamplingSpec, index: int = 0) -> Completion:
        """:func:`generate` with this engine's seed, memoised: completions are immutable and
        benchmarks repeat prompts, so a hit costs one tuple hash instead of a draw per token."""
        key = (tuple(prompt_ids), spec, index)
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return hit
        out = generate(
            prompt_ids,
            spec,
            engine_seed=self.config.seed,
            max_model_len=self.config.max_model_len,
            index=index,
        )
        memo[key] = out
        if len(memo) > _MEMO_ENTRIES:
            memo.popitem(last=False)
        return out

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running requests (cached-but-free blocks count as free,
        as in vLLM's ``kv_cache_usage_perc``)."""
        cap = self.config.kv_blocks
        return 0.0 if cap <= 0 else min(1.0, self.kv_blocks_in_use / cap)

    def reset(self) -> None:
        """Forget the cache and the counters (not the load of requests still running)."""
        self.cache.clear()
        self.stats = EngineStats()
