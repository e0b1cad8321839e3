"""The mock engine: tokenizer, chat rendering, deterministic output, timing model, prefix cache and
accounting. No sockets, no clock, no trio, so the HTTP layer (``app.py``) and the encode /
prefill / decode roles drive the same core, and unit tests run it directly. The only I/O is
reading the model folder once per process (:func:`load_tokenizer`).

Tokenization is the real thing: a Hugging Face model folder (by default the locally built
sim-model of :mod:`.model_files`) read with ``lmgw.text``, the gateway's own tokenizer and chat
template code, used the way vLLM uses them (chat: render, then encode without special tokens;
completions: encode with them). So a simulated worker's ``/tokenize`` equals the gateway's own
tokenization of the same folder, token for token, which is what the gateway's parity self-test
checks.

Determinism is the point: the completion of a request is a pure function of (prompt token ids,
worker seed, request ``seed``, choice index) -- media items enter through their placeholder ids,
which derive from the items' content hashes -- so a test can assert the exact text whatever
route (direct, through the gateway, through a P/D hand-off) the request took. The choices of an
``n > 1`` request follow vLLM's rule (:func:`choice_sampling`), so a gateway that sends one
request per choice gets the same texts as the worker that fans out itself.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import random
import re
import struct
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from lmgw.protocol import StructuredOutput
from lmgw.text import (
    ChatTemplate,
    ChatTemplateConfigError,
    ChatTemplateError,
    ModelTokenizer,
    TokenIdError,
)
from lmgw.tools import TOOL_PARSERS

from . import kv_events, model_files
from .logprobs import LogprobSource
from .structured import constrained_text, schema_value

# ------------------------------------------------------------------------------------------------
# Output vocabulary
# ------------------------------------------------------------------------------------------------

MIN_OUTPUT_WORDS = 16
"""A model folder must spell at least this many output words as single tokens."""


@dataclass(frozen=True, slots=True)
class VocabEntry:
    """One output token: its id, its text, and the text pre-encoded as a JSON string."""

    token_id: int
    piece: str
    json: bytes


WordForms = tuple[VocabEntry, VocabEntry, VocabEntry, VocabEntry]
"""One word's output tokens: (" word", "word", " Word", "Word")."""


class OutputVocab:
    """The tokens the mock model says: the sim-model's output words
    (:func:`.model_files.output_words`) in four spellings (" word", "word", " Word", "Word"), a
    comma and a period, each a single token of the folder's tokenizer that decodes to exactly its
    text. So every streamed event is one real token, and the text re-tokenizes to the ids that
    produced it (a follow-up turn hits the prefix cache on the previous answer).

    Raises:
        ValueError: the folder's tokenizer spells too few of the words as single tokens.
    """

    __slots__ = ("comma", "entries", "json_of", "period", "word_forms")

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        def single(piece: str) -> VocabEntry | None:
            ids = tokenizer.encode(piece, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.decode(ids) != piece:
                return None
            return VocabEntry(ids[0], piece, msgspec.json.encode(piece))

        forms: list[WordForms] = []
        for w in model_files.output_words():
            a, b, c, d = (single(p) for p in (f" {w}", w, f" {w.title()}", w.title()))
            if a and b and c and d:
                forms.append((a, b, c, d))
        comma, period = single(","), single(".")
        if comma is None or period is None or len(forms) < MIN_OUTPUT_WORDS:
            raise ValueError(
                f"the tokenizer of {tokenizer.name!r} spells only {len(forms)} of the simulator's "
                f"output words as single tokens (at least {MIN_OUTPUT_WORDS} are needed, and ',' "
                "and '.'): use the sim-model folder (simulators/model_files.py)"
            )
        self.comma: VocabEntry = comma
        self.period: VocabEntry = period
        self.word_forms: tuple[WordForms, ...] = tuple(forms)
        """Indexed by word: (" word", "word", " Word", "Word")."""
        self.entries: tuple[VocabEntry, ...] = (comma, period, *(e for f in forms for e in f))
        self.json_of: dict[str, bytes] = {e.piece: e.json for e in self.entries}
        """Output pieces pre-encoded as JSON strings, so the streaming path never re-encodes."""


# ------------------------------------------------------------------------------------------------
# Tokenizer and chat rendering
# ------------------------------------------------------------------------------------------------

PROMPT_CACHE_ENTRIES = 1024
"""Tokenized prompts kept (LRU): benchmarks and retries repeat prompts."""
PROMPT_CACHE_CHARS = 2**20
"""...and at most this many characters of prompt text (JSON for chats) behind them; longer
single prompts are not cached (the segment cache of ``ModelTokenizer`` still helps them)."""


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

    def tokens(self, kind: str) -> int:
        return {"image": self.image_tokens, "audio": self.audio_tokens}.get(kind, self.video_tokens)


# Content-part type (or, untyped / with a uuid, payload key) -> modality, as lmgw.text (and vLLM)
# read parts; the order is the payload keys' precedence.
_MEDIA_KEYS = {
    "image_url": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_embeds": "audio",
    "audio_url": "audio",
    "input_audio": "audio",
    "video_url": "video",
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
    item_key: str = ""
    """The item as the gateway's dialects name it: its uuid, else the sha256 of its URL (the key
    of its encoder output in the gateway's cache pool, ``ec:{model}:{item_key}``)."""


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A chat rendered for the model: the template's text (media as marker tokens), the token
    ids (each marker expanded to the item's placeholder ids), and the media items."""

    text: str
    token_ids: tuple[int, ...]
    media: tuple[MediaItem, ...] = ()


def _media_hash(part: dict[str, Any], key: str) -> tuple[str, str, str]:
    """(hash of the content for the placeholder ids, key for the encoder cache, the item's key
    as the gateway names it).

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
        uuid if has_uuid else hashlib.sha256(ident.encode()).hexdigest(),  # type: ignore[return-value]
    )


def _media_key(part: dict[str, Any]) -> str | None:
    """The payload key of a media part, read as ``lmgw.text`` reads parts: by ``type`` unless
    the part carries a uuid (or no type), then by the first media payload key present."""
    ptype = part.get("type")
    if isinstance(ptype, str) and part.get("uuid") is None:
        return ptype if ptype in _MEDIA_KEYS else None
    for key in _MEDIA_KEYS:
        if key in part and (key != "input_audio" or part[key] is not None):
            return key
    return None


def _media_parts(messages: Sequence[Any]) -> list[tuple[str, str, str, str]]:
    """(modality, mm_hash, content_hash, item_key) of every media part, in message order."""
    out: list[tuple[str, str, str, str]] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            key = _media_key(part) if isinstance(part, dict) else None
            if key is not None:
                out.append((_MEDIA_KEYS[key], *_media_hash(part, key)))
    return out


class _PromptCache:
    """An LRU of tokenized prompts bounded in entries and in characters of key text."""

    __slots__ = ("_chars", "_entries", "max_chars", "max_entries")

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: OrderedDict[Hashable, tuple[int, Any]] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key: Hashable, value: Any, chars: int) -> None:
        if chars > self.max_chars // 4 or self.max_entries <= 0 or key in self._entries:
            return
        self._entries[key] = (chars, value)
        self._chars += chars
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            _, (old_chars, _) = self._entries.popitem(last=False)
            self._chars -= old_chars


class Tokenizer:
    """The mock model's tokenizer and chat template, from a Hugging Face model folder.

    Encoding, decoding and rendering are ``lmgw.text``'s :class:`~lmgw.text.ModelTokenizer` and
    :class:`~lmgw.text.ChatTemplate`, the gateway's own code, so a simulated worker tokenizes
    exactly like the gateway (and like a vLLM worker) with the same folder. On top: media marker
    tokens expanded into per-item placeholder ids, the :class:`OutputVocab`, and an LRU of
    tokenized prompts. Loading reads files: share instances (:func:`load_tokenizer`).

    Args:
        model_dir: the folder (default: :func:`.model_files.default_model_dir`).
        cache_entries, cache_chars: the prompt LRU's bounds.

    Raises:
        ValueError: the folder cannot be loaded, or lacks the output words (:class:`OutputVocab`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        cache_entries: int = PROMPT_CACHE_ENTRIES,
        cache_chars: int = PROMPT_CACHE_CHARS,
    ) -> None:
        folder = Path(model_dir) if model_dir is not None else model_files.default_model_dir()
        self.model_dir = folder
        try:
            self.model = ModelTokenizer.load(folder)
        except ValueError as exc:  # TokenizerLoadError
            raise ValueError(f"simulated model folder: {exc}") from None
        tok = self.model
        markers = {
            kind: token
            for kind, token in model_files.MEDIA_TOKENS.items()
            if tok.token_to_id(token) is not None
        }
        try:
            self.template: ChatTemplate | None = ChatTemplate.load(
                folder, special_tokens=tok.special_tokens_map, media_placeholders=markers
            )
        except ChatTemplateConfigError:
            self.template = None  # a base model: completions only, as in vLLM
        self.vocab_size: int = tok.vocab_size
        self.max_model_len: int | None = tok.max_model_len
        """The folder's context length (``config.json``), if it names one."""
        self.output = OutputVocab(tok)
        self._marker_kind: dict[int, str] = {
            tid: kind
            for kind, token in markers.items()
            if (tid := tok.token_to_id(token)) is not None
        }
        # Placeholder ids come from the ordinary (trained) part of the vocabulary.
        base = tok.backend.get_vocab_size(with_added_tokens=False)
        added_below = [a.id for a in tok.added_tokens if a.id < base]
        self._media_lo = max(added_below, default=-1) + 1
        self._media_span = max(1, base - self._media_lo)
        self._cache = _PromptCache(cache_entries, cache_chars)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_dir)!r}, vocab={self.vocab_size})"

    # -- ids and text ------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        """Token ids of ``text`` (``add_special_tokens``: the BOS a completion prompt gets, as
        in vLLM and transformers); cached."""
        key = ("prompt", text, add_special_tokens)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ids = tuple(self.model.encode(text, add_special_tokens=add_special_tokens))
        self._cache.put(key, ids, len(text))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included (vLLM's ``/detokenize``).

        Raises:
            PromptError: an id outside the vocabulary.
        """
        try:
            return self.model.decode(ids)
        except TokenIdError as exc:
            raise PromptError(exc.message, exc.param) from None

    def check_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        """Raise :class:`PromptError` unless every id is in the vocabulary."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise PromptError(f"Token id {bad} is out of vocabulary", param)

    def token_strs(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary strings of ``ids`` (vLLM's ``token_strs``)."""
        return self.model.convert_ids_to_tokens(ids)

    def media_token_ids(self, mm_hash: str, count: int) -> list[int]:
        """Placeholder ids that depend on the item's content, so different images do not share a
        prefix-cache block (vLLM gets the same effect by keying blocks with the mm hash)."""
        base = int(mm_hash[:8], 16)
        lo, span = self._media_lo, self._media_span
        return [lo + (base + 7919 * i) % span for i in range(count)]

    # -- chats ---------------------------------------------------------------------------------

    def cached(self, key: Hashable) -> Any | None:
        """A prompt tokenized before under ``key`` (see :meth:`render_chat`), or None."""
        return self._cache.get(key)

    def render_chat(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Any = None,
        documents: Any = None,
        chat_template_kwargs: Any = None,
        add_special_tokens: bool = False,
        media: MediaConfig = MediaConfig(),
        cache_key: Hashable | None = None,
        cache_chars: int = 0,
    ) -> RenderedPrompt:
        """A chat request's prompt as vLLM builds it: the template rendered with the request's
        options, encoded without special tokens (unless asked), and each media marker token
        expanded into its item's placeholder ids.

        ``cache_key`` (with the size of what it stands for, ``cache_chars``) files the result in
        the LRU, for callers that look it up with :meth:`cached` before decoding a request (the
        raw JSON makes a good key); without one, a key is made from the arguments' JSON.

        Raises:
            PromptError: bad messages or options, the template refused them, or media items that
                do not match the template's markers (the HTTP layer answers 400).
        """
        if cache_key is None:
            try:
                blob = msgspec.json.encode(
                    [messages, tools, documents, chat_template_kwargs], order="deterministic"
                )
            except (TypeError, msgspec.EncodeError):
                blob = None
            if blob is not None:
                cache_key = ("chat", blob, add_generation_prompt, continue_final_message,
                             add_special_tokens, media)  # fmt: skip
                cache_chars = len(blob)
                hit = self._cache.get(cache_key)
                if hit is not None:
                    return hit
        if self.template is None:
            raise PromptError(
                "this model has no chat template: use /v1/completions (or configure a template)",
                "messages",
            )
        kwargs = chat_template_kwargs
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise PromptError("chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            text = self.template.render(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                chat_template_kwargs=kwargs,
            )
        except ChatTemplateError as exc:
            raise PromptError(exc.message, exc.param) from None
        ids = self.model.encode(text, add_special_tokens=add_special_tokens)
        parts = _media_parts(messages)
        items: tuple[MediaItem, ...] = ()
        if parts or (self._marker_kind and any(ids.count(m) for m in self._marker_kind)):
            ids, items = self._expand_media(ids, parts, media)
        rendered = RenderedPrompt(text, tuple(ids), items)
        if cache_key is not None:
            self._cache.put(cache_key, rendered, cache_chars)
        return rendered

    def _expand_media(
        self, ids: list[int], parts: list[tuple[str, str, str, str]], media: MediaConfig
    ) -> tuple[list[int], tuple[MediaItem, ...]]:
        """Replace the k-th marker of each modality by the k-th item's placeholder ids. As in
        vLLM, markers and items must pair up exactly."""
        queues: dict[str, deque[tuple[str, str, str]]] = {}
        for kind, mm_hash, content_hash, item_key in parts:
            queues.setdefault(kind, deque()).append((mm_hash, content_hash, item_key))
        markers = self._marker_kind
        out: list[int] = []
        items: list[MediaItem] = []
        last = 0
        for pos, tid in enumerate(ids):
            kind = markers.get(tid)
            if kind is None:
                continue
            queue = queues.get(kind)
            if not queue:
                raise PromptError(
                    f"the prompt has more {kind} placeholders than {kind} items", "messages"
                )
            mm_hash, content_hash, item_key = queue.popleft()
            out += ids[last:pos]
            count = media.tokens(kind)
            items.append(MediaItem(kind, mm_hash, len(out), count, content_hash, item_key))
            out += self.media_token_ids(mm_hash, count)
            last = pos + 1
        left = {kind: len(q) for kind, q in queues.items() if q}
        if left:
            kind, n = next(iter(left.items()))
            if kind not in markers.values():
                raise PromptError(f"this model does not accept {kind} input", "messages")
            raise PromptError(
                f"{n} {kind} item(s) have no placeholder in the rendered prompt", "messages"
            )
        out += ids[last:]
        return out, tuple(items)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: str) -> Tokenizer:
    return Tokenizer(folder)


def load_tokenizer(model_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The process-wide :class:`Tokenizer` of a model folder (default: the per-user sim-model,
    built on first use), loaded once: every simulated worker of a process shares it."""
    folder = model_files.default_model_dir() if model_dir is None else Path(model_dir)
    return _load_tokenizer(os.path.realpath(folder))


def render_chat(tokenizer: Tokenizer, messages: Any, **options: Any) -> RenderedPrompt:
    """:meth:`Tokenizer.render_chat` (``add_generation_prompt`` defaults to True)."""
    return tokenizer.render_chat(messages, **options)


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
    key: int = 0
    """The completion key it derives from (its logprobs too: :mod:`.logprobs`)."""
    offset: int = 0
    """The position of its first token in the answer it is part of (a continued answer's
    tokens keep the uninterrupted answer's logprobs)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


SAMPLE_INDEX = "lmgw_sample_index"
"""The key of ``SamplingParams.extra`` that names an unseeded choice's index (the gateway's
fan-out of ``n > 1`` to one native Generate per choice: see :func:`choice_sampling`)."""


def choice_sampling(spec: SamplingSpec, index: int) -> tuple[SamplingSpec, int]:
    """(spec, index) that choice ``index`` of a request is drawn with. vLLM runs choice ``i``
    of ``n`` as a child request with ``seed + i`` when the request is seeded (its
    ``ParentRequest``): choice ``i`` is then exactly the ``n = 1`` answer for that seed. An
    unseeded child is random in vLLM; here it is drawn by its index, so choices differ."""
    if index == 0 or spec.seed is None:
        return spec, index
    return replace(spec, seed=spec.seed + index), 0


def sample_index(extra: Mapping[str, Any] | None) -> int:
    """The choice index a native request names in ``SamplingParams.extra`` (0 if none)."""
    value = (extra or {}).get(SAMPLE_INDEX)
    return value if type(value) is int and value > 0 else 0


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


def _draw_tokens(key: int, count: int, vocab: OutputVocab) -> list[VocabEntry]:
    """Sentence-like output: words, an occasional comma, a period every 6-16 words, capitals
    after periods, no leading space on the very first token (never two punctuation tokens in a
    row, so the text re-tokenizes to the same ids)."""
    rng = random.Random(key)
    forms = vocab.word_forms
    nforms = len(forms)
    comma, period = vocab.comma, vocab.period
    out: list[VocabEntry] = []
    capital = True
    until_period = rng.randint(6, 16)
    for i in range(count):
        if until_period <= 0 and not capital and out[-1] is not comma:
            out.append(period)
            capital = True
            until_period = rng.randint(6, 16)
            continue
        r = rng.getrandbits(32)
        if not capital and r % 13 == 0 and out and out[-1] is not comma:
            out.append(comma)
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
    vocab: OutputVocab,
    index: int = 0,
) -> Completion:
    """The completion for one choice: a pure function of its arguments (``vocab``: the model
    folder's output tokens)."""
    key = completion_key(prompt_ids, engine_seed, spec.seed, index)
    room = max(0, max_model_len - len(prompt_ids))
    cap = room if spec.max_tokens is None else min(spec.max_tokens, room)
    natural: float = math.inf if spec.ignore_eos else natural_length(key)
    natural = max(natural, spec.min_tokens)
    if natural <= cap:
        length, finish = int(natural), "stop"
    else:
        length, finish = cap, "length"
    entries = _draw_tokens(key, length, vocab)
    token_ids = [e.token_id for e in entries]
    pieces = [e.piece for e in entries]
    return _stop_and_pack(token_ids, pieces, finish, spec, vocab, key)


def _stop_and_pack(
    token_ids: list[int],
    pieces: list[str],
    finish: str,
    spec: SamplingSpec,
    vocab: OutputVocab,
    key: int,
) -> Completion:
    """Apply the request's stop token ids and stop strings (as vLLM checks them after every
    token) to a drawn output, and pack it."""
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
    json_of = vocab.json_of
    pieces_json = tuple(json_of.get(p) or msgspec.json.encode(p) for p in pieces)
    return Completion(
        tuple(token_ids), tuple(pieces), "".join(pieces), finish, stop_reason, pieces_json, key
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
# Tool mode
# ------------------------------------------------------------------------------------------------

DEFAULT_TOOL_FORMAT = "hermes"
"""The tool-call format a simulated worker writes unless configured (``--tool-format``)."""


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A completion that calls a function: the format the model writes it in (a name of
    :data:`lmgw.tools.TOOL_PARSERS`), the function, and its parameters schema as JSON text (so a
    plan is hashable and keys the completion memo)."""

    format: str
    name: str
    parameters: str = "{}"


@dataclass(frozen=True, slots=True)
class ReplyPlan:
    """A completion with fixed text: the simulated model's answer to tool results, which quotes
    them (so a test sees that a result reached the model)."""

    text: str


@dataclass(frozen=True, slots=True)
class StructuredPlan:
    """A completion constrained by a request's structured output (:mod:`.structured`): its kind
    and spec, the spec as JSON text (so a plan is hashable and keys the completion memo; keys
    keep their order, which is the order a schema's properties are written in). Options
    (whitespace) are left out: they do not change the compact output."""

    kind: str
    spec: str = "null"

    @classmethod
    def of(cls, c: StructuredOutput) -> StructuredPlan:
        return cls(c.kind, msgspec.json.encode(c.spec).decode())

    def constraint(self) -> StructuredOutput:
        return StructuredOutput(self.kind, msgspec.json.decode(self.spec))


OutputPlan = ToolPlan | ReplyPlan | StructuredPlan
"""What shapes a completion other than the prompt: a tool call, fixed text, a constraint."""


def tool_results_reply(messages: Any) -> ReplyPlan | None:
    """When the conversation ends with tool results: ``Tool results: <r1> | <r2>`` (in order);
    else None."""
    if not isinstance(messages, list):
        return None
    results: list[str] = []
    for m in reversed(messages):
        if not (isinstance(m, dict) and m.get("role") == "tool"):
            break
        results.append(_message_text(m))
    if not results:
        return None
    return ReplyPlan("Tool results: " + " | ".join(reversed(results)))


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _function_of(tool: Any) -> dict[str, Any] | None:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
        return fn
    return None


def plan_tool_call(
    tools: Any, tool_choice: Any, messages: Any, fmt: str
) -> ToolPlan | ReplyPlan | None:
    """Which function a chat request makes the simulated model call, if any.

    ``tool_choice`` as OpenAI defines it: a named function is called; ``"required"`` calls the
    first tool; ``"auto"`` (the default with tools) calls the first tool whose name the request's
    final message mentions, when that message is the user's; ``"none"`` never calls. When no call
    is made and the conversation ends with tool results, the answer quotes them
    (:func:`tool_results_reply`), so an agent loop ends and shows what the model read.

    Raises:
        PromptError: a ``tool_choice`` vLLM would reject (unknown shape, or naming a function
            that is not among ``tools``).
    """
    functions = [fn for fn in map(_function_of, tools or ()) if fn is not None]
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        fn_choice = tool_choice.get("function")
        wanted = fn_choice.get("name") if isinstance(fn_choice, dict) else None
        if not isinstance(wanted, str):
            raise PromptError("tool_choice.function.name must be a string", "tool_choice")
        chosen = next((fn for fn in functions if fn["name"] == wanted), None)
        if chosen is None:
            raise PromptError(f"Tool '{wanted}' has not been passed in `tools`.", "tool_choice")
    elif tool_choice == "none" or not functions:
        return tool_results_reply(messages)
    elif tool_choice == "required":
        chosen = functions[0]
    elif tool_choice == "auto":
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not (isinstance(last, dict) and last.get("role") == "user"):
            return tool_results_reply(messages)
        said = _message_text(last)
        chosen = next(
            (
                fn
                for fn in functions
                if re.search(rf"(?<![A-Za-z0-9_]){re.escape(fn['name'])}(?![A-Za-z0-9_])", said)
            ),
            None,
        )
        if chosen is None:
            return None
    else:
        raise PromptError(
            "tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice"
        )
    params = chosen.get("parameters")
    schema = params if isinstance(params, dict) else {}
    return ToolPlan(fmt, chosen["name"], msgspec.json.encode(schema).decode())


def _decoded_pieces(model: ModelTokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's new visible text, as vLLM's incremental detokenizer sends it: a token that
    ends inside a UTF-8 character shows nothing until the character is complete."""
    pieces: list[str] = []
    shown = ""
    for k in range(1, len(ids) + 1):
        text = model.decode(ids[:k])
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(shown) :])
        shown = text
    return pieces


def generate_tool_call(
    prompt_ids: Sequence[int],
    spec: SamplingSpec,
    plan: ToolPlan,
    *,
    engine_seed: int,
    max_model_len: int,
    tokenizer: Tokenizer,
    index: int = 0,
) -> Completion:
    """A completion that calls ``plan``'s function, written as a model of ``plan.format``
    writes calls (the gateway's parser of that name turns it back into the call): a pure
    function of its arguments, like :func:`generate`. The arguments are drawn from the
    function's schema with the completion key; the text is real tokens of the model folder.
    Stops, ``max_tokens``, ``min_tokens`` and ``ignore_eos`` apply as to any output (words
    follow the call when the model may not stop)."""
    key = completion_key(prompt_ids, engine_seed, spec.seed, index)
    vocab = tokenizer.output
    words = [forms[1].piece for forms in vocab.word_forms]
    args = schema_value(msgspec.json.decode(plan.parameters), random.Random(key), words)
    if not isinstance(args, dict):
        args = {}
    text = TOOL_PARSERS[plan.format].render([(plan.name, args)])
    return _fixed_text(text, key, prompt_ids, spec, max_model_len, tokenizer)


def generate_reply(
    prompt_ids: Sequence[int],
    spec: SamplingSpec,
    plan: ReplyPlan,
    *,
    engine_seed: int,
    max_model_len: int,
    tokenizer: Tokenizer,
    index: int = 0,
) -> Completion:
    """A completion whose text is ``plan.text`` (real tokens of the model folder); limits and
    stops apply as in :func:`generate_tool_call`."""
    key = completion_key(prompt_ids, engine_seed, spec.seed, index)
    return _fixed_text(plan.text, key, prompt_ids, spec, max_model_len, tokenizer)


def generate_structured(
    prompt_ids: Sequence[int],
    spec: SamplingSpec,
    plan: StructuredPlan,
    *,
    engine_seed: int,
    max_model_len: int,
    tokenizer: Tokenizer,
    index: int = 0,
) -> Completion:
    """A completion that satisfies ``plan``'s constraint (:func:`.structured.constrained_text`
    drawn with the completion key): a pure function of its arguments, like
    :func:`generate_tool_call`, whose limits and stops apply (``max_tokens`` cuts the text
    short with ``finish_reason: "length"``, as a real worker's).

    Raises:
        Unsimulated: a constraint the simulator does not produce output for.
    """
    key = completion_key(prompt_ids, engine_seed, spec.seed, index)
    words = [forms[1].piece for forms in tokenizer.output.word_forms]
    text = constrained_text(plan.constraint(), random.Random(key), words)
    return _fixed_text(text, key, prompt_ids, spec, max_model_len, tokenizer)


_PLAN_TEXT: dict[type, Callable[..., Completion]] = {
    ToolPlan: generate_tool_call,
    ReplyPlan: generate_reply,
    StructuredPlan: generate_structured,
}
"""The completion each kind of output plan makes (same arguments: prompt, spec, plan, ...)."""


def _fixed_text(
    text: str,
    key: int,
    prompt_ids: Sequence[int],
    spec: SamplingSpec,
    max_model_len: int,
    tokenizer: Tokenizer,
) -> Completion:
    vocab = tokenizer.output
    token_ids = list(tokenizer.model.encode(text, add_special_tokens=False))
    pieces = _decoded_pieces(tokenizer.model, token_ids)
    room = max(0, max_model_len - len(prompt_ids))
    cap = room if spec.max_tokens is None else min(spec.max_tokens, room)
    natural: float = math.inf if spec.ignore_eos else max(len(token_ids), spec.min_tokens)
    length, finish = (int(natural), "stop") if natural <= cap else (cap, "length")
    if length > len(token_ids):
        extra = _draw_tokens(key, length - len(token_ids), vocab)
        token_ids += [e.token_id for e in extra]
        pieces += [e.piece for e in extra]
    return _stop_and_pack(token_ids[:length], pieces[:length], finish, spec, vocab, key)


# ------------------------------------------------------------------------------------------------
# Timing model
# ------------------------------------------------------------------------------------------------


#: the timing model's coefficients, by name (``--timing``)
TIMING_KEYS = ("a", "b", "c", "d", "e")


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


@functools.lru_cache(maxsize=1024)
def lora_root(name: str) -> int:
    """The root an adapter's block-hash chains start from, instead of the base model's 0.

    vLLM puts the adapter into every block's hash, so an adapter never hits blocks of the base
    model or of another adapter; one root per adapter does the same at no cost per block. A
    digest of the name, not ``hash(name)`` (randomised per process), so that hashes, and the KV
    events that carry them, agree across workers and restarts; never 0."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


@dataclass(frozen=True, slots=True)
class LoraKey:
    """The LoRA adapter a request runs, as the prefix cache needs it: ``root`` keys its blocks
    (:func:`lora_root`), ``lora_id`` and ``name`` label its ``BlockStored`` events as vLLM's
    ``lora_id`` and ``lora_name``."""

    name: str
    lora_id: int | None
    root: int

    @classmethod
    def of(cls, name: str, lora_id: int | None) -> LoraKey:
        return cls(name, lora_id, lora_root(name))


def block_hashes(
    token_ids: Sequence[int], block_size: int, known: Sequence[int] = (), root: int = 0
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``: block i's key covers blocks 0..i, so a
    hit on block i implies the whole prefix matches (vLLM's scheme). Python's hash of int tuples
    is not randomised, so keys agree across processes. ``known`` are already computed hashes of
    a prefix of ``token_ids`` (e.g. the prompt's, when hashing prompt + output); ``root`` is the
    parent of the first block: 0 for the base model, :func:`lora_root` for an adapter."""
    out = list(known)
    parent = out[-1] if out else root
    for start in range(len(out) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, *token_ids[start : start + block_size]))
        out.append(parent)
    return out


class PrefixCache:
    """An LRU set of token blocks keyed by chained block hashes, with a capacity in blocks.

    Like vLLM, a lookup never reports the whole prompt as cached: the last token is always
    computed, so at most ``(len - 1) // block_size`` blocks hit. A prompt's blocks are touched
    deepest first, so a prefix is always more recent than its extensions and eviction takes
    leaves first (vLLM frees a request's blocks tail first for the same reason): an evicted
    root never strands its descendants as unreachable garbage that still takes capacity.

    ``listener``, when set, gets vLLM-shaped KV events (:mod:`.kv_events`) for every change:
    ``BlockStored`` per run of new blocks, ``BlockRemoved`` for evictions, ``AllBlocksCleared``
    on :meth:`clear`. It must not block (the publisher only appends to a list).
    """

    def __init__(
        self,
        capacity_blocks: int = 8192,
        block_size: int = 16,
        listener: Callable[[Any], None] | None = None,
    ) -> None:
        if capacity_blocks < 0 or block_size < 1:
            raise ValueError("capacity_blocks must be >= 0 and block_size >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.listener = listener
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def block_hashes(self) -> list[int]:
        """The cached blocks' hashes, least recently used first (``/sim/prefix_cache``)."""
        return list(self._blocks)

    def lookup(self, token_ids: Sequence[int], hashes: Sequence[int] | None = None) -> int:
        """Cached tokens for a prompt (a multiple of block_size); counts queries and hits."""
        if hashes is None:
            hashes = block_hashes(token_ids, self.block_size)
        usable = min(len(hashes), max(0, len(token_ids) - 1) // self.block_size)
        blocks = self._blocks
        n = 0
        while n < usable and hashes[n] in blocks:
            n += 1
        for i in range(n - 1, -1, -1):  # deepest first: the prefix stays the most recent
            blocks.move_to_end(hashes[i])
        cached = n * self.block_size
        self.queries += len(token_ids)
        self.hits += cached
        return cached

    def insert(
        self,
        token_ids: Sequence[int],
        hashes: Sequence[int] | None = None,
        lora: LoraKey | None = None,
    ) -> None:
        """Cache every full block of ``token_ids`` (most recently used), evicting LRU blocks;
        ``lora``: the adapter that computed them (None: the base model)."""
        if self.capacity_blocks == 0:
            return
        if hashes is None:
            hashes = block_hashes(token_ids, self.block_size, root=lora.root if lora else 0)
        blocks = self._blocks
        listener = self.listener
        if listener is not None:
            self._announce(token_ids, hashes, listener, lora)
        for i in range(len(hashes) - 1, -1, -1):  # deepest first, as in lookup
            h = hashes[i]
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        if len(blocks) > self.capacity_blocks:
            evicted = []
            while len(blocks) > self.capacity_blocks:
                evicted.append(blocks.popitem(last=False)[0])
            self.evictions += len(evicted)
            if listener is not None:
                listener(kv_events.BlockRemoved(evicted))

    def _announce(
        self,
        token_ids: Sequence[int],
        hashes: Sequence[int],
        listener: Callable[[Any], None],
        lora: LoraKey | None = None,
    ) -> None:
        """One ``BlockStored`` per run of blocks not cached yet, chained to the block before."""
        blocks, bs = self._blocks, self.block_size
        i, n = 0, len(hashes)
        while i < n:
            if hashes[i] in blocks:
                i += 1
                continue
            j = i
            while j < n and hashes[j] not in blocks:
                j += 1
            parent = hashes[i - 1] if i else None
            listener(_block_stored(list(hashes[i:j]), parent, token_ids[i * bs : j * bs], bs, lora))
            i = j

    def clear(self) -> None:
        self._blocks.clear()
        self.queries = self.hits = self.evictions = 0
        if self.listener is not None:
            self.listener(kv_events.AllBlocksCleared())


def _block_stored(
    hashes: list[int], parent: int | None, token_ids: Sequence[int], bs: int, lora: LoraKey | None
) -> kv_events.BlockStored:
    """A ``BlockStored`` event; an adapter's blocks carry its ``lora_id`` and ``lora_name`` where
    vLLM puts them, the base model's leave ``lora_id`` unset and have no ``lora_name``."""
    if lora is None:
        return kv_events.BlockStored(hashes, parent, list(token_ids), bs)
    return kv_events.LoraBlockStored(
        hashes, parent, list(token_ids), bs, lora.lora_id, lora_name=lora.name
    )


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
    max_model_len: int | None = None
    """The context length; None: the model folder's (else :data:`DEFAULT_MAX_MODEL_LEN`)."""
    max_num_seqs: int = 256
    kv_blocks: int = 8192
    block_size: int = 16
    timing: TimingModel = field(default_factory=TimingModel)
    media: MediaConfig = field(default_factory=MediaConfig)
    model_dir: str | None = None
    """The model folder (tokenizer, chat template); None: the per-user sim-model."""
    serial_prefill: bool = False
    """Prefills compute one at a time, first come first served, like one GPU's forward passes
    (the I/O layer holds a lock for each prefill's duration; queued requests count as waiting).
    Off: every request prefills in parallel, so load never delays a first token."""


DEFAULT_MAX_MODEL_LEN = 8192
"""The context length of a model folder that names none."""


class Ticket:
    """One request's life in the engine: waiting -> running (prefill, decode) -> closed.

    The HTTP layer calls ``admit``, ``prefill``, ``begin_decode``, ``emitted`` as the request
    progresses and ``close`` exactly once in a ``finally``; ``close`` undoes whatever the current
    state holds, so no exit path (success, error, cancellation) leaks a running slot.
    """

    __slots__ = (
        "_engine",
        "_kv_blocks",
        "_lora",
        "_nseq",
        "_prompt_hashes",
        "_prompts",
        "cached_per_prompt",
        "cached_tokens",
        "prompt_tokens",
        "state",
    )

    def __init__(
        self, engine: Engine, prompt_tokens: int, nseq: int, lora: LoraKey | None = None
    ) -> None:
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self._nseq = nseq
        self._lora = lora
        self._kv_blocks = 0
        self.cached_tokens = 0
        self.cached_per_prompt: list[int] = []
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

    def prefill(
        self, prompts: Sequence[Sequence[int]], external_cached: int | Sequence[int] = 0
    ) -> float:
        """Look the prompts up in the prefix cache and cache them; returns the prefill seconds.

        ``external_cached`` tokens of each prompt (one count for all, or one per prompt)
        arrived from elsewhere (a disaggregated decode worker's KV fetched from its prefill
        worker): they count as cached, not computed, but not as local prefix-cache hits
        (vLLM's metrics count those separately too)."""
        e = self._engine
        cache = e.cache
        lora = self._lora
        root = 0 if lora is None else lora.root
        uncached = 0
        self._prompts = prompts
        for i, ids in enumerate(prompts):
            hashes = block_hashes(ids, cache.block_size, root=root)
            self._prompt_hashes.append(hashes)
            ext = external_cached if isinstance(external_cached, int) else external_cached[i]
            hit = max(cache.lookup(ids, hashes), min(ext, len(ids)))
            self.cached_tokens += hit
            self.cached_per_prompt.append(hit)
            uncached += len(ids) - hit
            cache.insert(ids, hashes, lora)
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
        lora = self._lora
        root = 0 if lora is None else lora.root  # a prompt under one block has no known hashes
        for i, c in enumerate(completions):
            p = min(i // per_prompt, len(prompts) - 1)
            ids = [*prompts[p], *c.token_ids]
            e.cache.insert(ids, block_hashes(ids, bs, hashes[p], root), lora)


_MEMO_ENTRIES = 1024


class Engine:
    """State of one mock worker: tokenizer, prefix cache, timing, load and counters.

    Queueing itself (waiting for one of ``max_num_seqs`` slots) is the I/O layer's job; the engine
    only counts who waits and who runs, for the metrics and the decode batch size.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = load_tokenizer(self.config.model_dir)
        self.max_model_len: int = (
            self.config.max_model_len or self.tokenizer.max_model_len or DEFAULT_MAX_MODEL_LEN
        )
        """The context length: the config's, else the model folder's."""
        self.cache = PrefixCache(self.config.kv_blocks, self.config.block_size)
        """The prefix cache; set ``cache.listener`` to receive its KV events."""
        self.stats = EngineStats()
        self.slow = 1.0
        self.waiting = 0
        self.running = 0
        self.decoding = 0
        self.kv_blocks_in_use = 0
        self._memo: OrderedDict[
            tuple[tuple[int, ...], SamplingSpec, int, OutputPlan | None], Completion
        ] = OrderedDict()

    def submit(self, prompt_tokens: int, nseq: int = 1, lora: LoraKey | None = None) -> Ticket:
        """A new request enters the queue; ``lora``: the adapter it runs (None: the base model),
        whose blocks the prefix cache keeps apart."""
        return Ticket(self, prompt_tokens, nseq, lora)

    def generate(
        self,
        prompt_ids: Sequence[int],
        spec: SamplingSpec,
        index: int = 0,
        tool: OutputPlan | None = None,
    ) -> Completion:
        """:func:`generate` with this engine's seed (:func:`generate_tool_call` when the request
        makes the model call ``tool``, :func:`generate_reply` for fixed text,
        :func:`generate_structured` for a constraint), memoised: completions are immutable and
        benchmarks repeat prompts, so a hit costs one tuple hash instead of a draw per token.

        Raises:
            Unsimulated: a :class:`StructuredPlan` the simulator cannot produce output for.
        """
        key = (tuple(prompt_ids), spec, index, tool)
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return hit
        if tool is None:
            out = generate(
                prompt_ids,
                spec,
                engine_seed=self.config.seed,
                max_model_len=self.max_model_len,
                vocab=self.tokenizer.output,
                index=index,
            )
        else:  # a completion with text of the plan's making
            make = _PLAN_TEXT[type(tool)]
            out = make(
                prompt_ids,
                spec,
                tool,  # type: ignore[arg-type]
                engine_seed=self.config.seed,
                max_model_len=self.max_model_len,
                tokenizer=self.tokenizer,
                index=index,
            )
        memo[key] = out
        if len(memo) > _MEMO_ENTRIES:
            memo.popitem(last=False)
        return out

    @functools.cached_property
    def logprobs(self) -> LogprobSource:
        """This model's logprobs (:mod:`.logprobs`): the output vocabulary as candidates, each
        token named by its text decoded alone (what vLLM's ``decoded_token`` is)."""
        tok = self.tokenizer
        return LogprobSource(
            [e.token_id for e in tok.output.entries],
            self.config.seed,
            lambda t: tok.model.decode([t]),
        )

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
