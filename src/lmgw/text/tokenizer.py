"""A model's tokenizer, loaded from a local Hugging Face folder, safe to call from the event loop.

Why this shape:

- **Local files only.** lmgw never downloads from a model hub: a tokenizer is a folder on disk
  (``tokenizer.json`` + ``tokenizer_config.json``, optionally ``special_tokens_map.json``,
  ``generation_config.json``, ``config.json``). A hub id with no local copy is a configuration
  error that says how to fetch it, never a silent download at startup.
- **Transformers' semantics without transformers.** Only ``tokenizers`` (Rust) is used, but the
  loaded tokenizer answers like ``AutoTokenizer.from_pretrained(folder)`` for what the gateway
  needs: special tokens from ``tokenizer_config.json`` (``special_tokens_map.json`` only when the
  config has no ``added_tokens_decoder``, as transformers 5 does), added tokens declared only in
  the config, truncation and padding stored in ``tokenizer.json`` switched off (transformers
  ignores them unless asked), ``clean_up_tokenization_spaces`` on decode (not for BPE).
- **Off the loop when long.** ``tokenizers.Tokenizer.encode`` holds the GIL for the whole call
  (DESIGN.md §3: a 1.5 MB document froze the loop for 1.2 s even from a thread), while
  ``encode_batch_fast`` releases it. So :meth:`ModelTokenizer.encode_async` encodes short texts
  inline (a thread hop costs more than they do) and sends long ones through ``encode_batch_fast``
  in ``trio.to_thread.run_sync`` under a bounded :class:`trio.CapacityLimiter`.
- **A segment cache for shared prefixes.** A templated chat is special tokens with text between
  them, and ``tokenizers`` encodes each stretch between added tokens on its own. So the ids of long
  stretches (a shared system prompt, a tools block, a document) are cached and reused: a
  request that repeats an 8k-token system turn skips ~7 ms of encoding (``benchmarks/text.py``).
  It is used only where it is exact: for ``add_special_tokens=False`` (chat prompts), and only
  for tokenizers whose normalizer and pre-tokenizer provably treat each stretch alone (checked
  from ``tokenizer.json``, then verified on probe strings at load); otherwise it stays off and
  :attr:`ModelTokenizer.prefix_cache_off_reason` says why.
- **Chunks of long stretches.** A document and the question after it are often one stretch
  (RAG: "Document: ...\n\nQuestion: ..."), so a whole-stretch cache never hits there. A long
  stretch is cut into chunks of about ``prefix_cache_chunk_chars``, each cut at the first space
  after every multiple of that size that follows a non-space: the same prefix gets the same
  cuts, so a shared document's chunks hit and only the last, with the question, is encoded.
  Pre-tokenizers (ByteLevel's and Llama-3's regexes, whitespace splits) never join a word to
  the space before the next one, so a cut there changes no id; that is verified on probe
  strings at load, cut at every such place, and chunking stays off (the rest of the cache on)
  when it fails: :attr:`ModelTokenizer.prefix_cache_chunk_off_reason`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import trio
from tokenizers import AddedToken, Tokenizer

from lmgw.errors import GatewayError

from .word_ids import WordIds

__all__ = [
    "DEFAULT_OFFLOAD_THRESHOLD_CHARS",
    "NAMED_SPECIAL_TOKENS",
    "AddedTokenInfo",
    "ModelTokenizer",
    "TokenIdError",
    "TokenizerLoadError",
    "resolve_model_dir",
]

DEFAULT_OFFLOAD_THRESHOLD_CHARS = 4096
"""Texts at least this long are encoded in a worker thread. Measured (``benchmarks/text.py``):
4 KiB costs ~0.85 ms inline and about the same wall time off-loop; below that the thread hop
costs more than the encoding, above it the loop time saved grows with the text."""

DEFAULT_OFFLOAD_THRESHOLD_IDS = 16384
"""Decodes of at least this many ids go to a worker thread (decode is ~5x cheaper per token)."""

DEFAULT_PREFIX_CACHE_CHARS = 4 * 2**20
"""The segment cache's budget, in characters of cached text (ids take ~1/3 of that in bytes)."""

DEFAULT_PREFIX_CACHE_MIN_CHARS = 1
"""Shorter stretches are not cached. Every stretch is: a lookup (~0.2 µs) costs less than
encoding even a "\\n" (~2 µs), and a chat's turns are short stretches that come back in every
later request of its conversation (sim model, 12 turns of ~200 characters: 336 µs per request
with only stretches of 1024 or more cached, 60 µs with all; a shared system turn and a new
user turn: 33.6 -> 29.0 µs; all new: 32 -> 36 µs)."""

ENTRY_CHARS = 200
"""What each cached stretch counts in the budget beyond its characters: its Python objects
(the key, the ids' bytes, the dictionary's slot and links), so that many tiny stretches
cannot outgrow the budget's memory."""

DEFAULT_PREFIX_CACHE_CHUNK_CHARS = 512
"""Stretches of twice this or more are cached in chunks of about this many characters (the
part of a 1.3k-token RAG prompt left to encode falls from ~1.1 ms to ~0.1 ms)."""

NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The special tokens transformers exposes by name (and passes to chat templates)."""

# config.json keys that bound the context, as vLLM reads them (the smallest one wins).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# transformers writes int(1e30) as model_max_length when a tokenizer has no limit.
_NO_LIMIT = 10**12
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class TokenizerLoadError(ValueError):
    """A model folder cannot be used (missing, a hub id without local files, unreadable JSON).

    Raised at startup; the message names the path and what to do about it.
    """


class TokenIdError(GatewayError):
    """A token id outside the vocabulary (a 400 for ``/detokenize`` and prompt-token inputs)."""

    def __init__(self, message: str, *, param: str = "tokens") -> None:
        super().__init__(400, message, param=param)


@dataclass(frozen=True, slots=True)
class AddedTokenInfo:
    """One added token: special ones are skipped by ``decode(skip_special_tokens=True)``."""

    id: int
    content: str
    special: bool


def _default_hf_cache() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env)
    if env := os.environ.get("HF_HOME"):
        return Path(env) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_cache_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The local snapshot of ``repo_id`` in a Hugging Face cache, if one was downloaded before."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text(encoding="utf-8").strip()
        return snap if snap.is_dir() else None
    found = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def resolve_model_dir(
    name_or_path: str | os.PathLike[str], *, hf_cache: str | os.PathLike[str] | None = None
) -> Path:
    """The local folder for a configured tokenizer: a path, or a hub id already in the local
    Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``).

    Raises:
        TokenizerLoadError: the folder does not exist, or the id was never downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(name_or_path)
    if path.exists():
        raise TokenizerLoadError(f"tokenizer path {text!r} is a file; expected a model folder")
    if _HUB_ID.match(text) and not text.startswith("."):
        cache = Path(hf_cache) if hf_cache is not None else _default_hf_cache()
        snap = _hf_cache_snapshot(text, cache)
        if snap is not None:
            return snap
        raise TokenizerLoadError(
            f"tokenizer {text!r} looks like a Hugging Face Hub id, but there is no local copy "
            f"(no folder {text!r}, nothing in {cache}). lmgw never downloads models: fetch it "
            f"first (e.g. `huggingface-cli download {text} --local-dir DIR`) and configure DIR"
        )
    raise TokenizerLoadError(f"tokenizer folder {text!r} does not exist")


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise TokenizerLoadError(f"{path} is missing") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise TokenizerLoadError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _token_content(value: Any, where: str) -> str | None:
    """A special-token entry: a string, an AddedToken dict (``{"content": ...}``) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerLoadError(f"{where}: expected a string or {{'content': ...}}, got {value!r}")


def _ids(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerLoadError(f"{where}: expected a token id or a list of ids, got {value!r}")
    return tuple(values)


def _context_length(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    found = [
        v
        for k in _CONTEXT_KEYS
        if isinstance(v := config.get(k), int) and not isinstance(v, bool) and 0 < v < _NO_LIMIT
    ]
    if found:
        return min(found)
    text_config = config.get("text_config")  # multimodal models nest the language model's
    return _context_length(text_config) if isinstance(text_config, dict) else None


class ModelTokenizer:
    """One model's tokenizer: encode/decode/count, special tokens, EOS ids and context length.

    Thread-safety: a ``tokenizers.Tokenizer`` may be used from several threads at once, so the
    event loop and the worker threads share one instance. Nothing here mutates after ``__init__``.

    Args:
        tokenizer: the Rust tokenizer (truncation and padding are switched off here).
        special_tokens_map: named special tokens (``bos_token``...) as transformers exposes them;
            tokens named here that the vocabulary lacks are added as special tokens.
        generation_config: the parsed ``generation_config.json`` (EOS ids, defaults).
        max_model_len: the context length, if known.
        clean_up_tokenization_spaces: transformers' decode clean-up (ignored for BPE models).
        offload_threshold_chars: texts at least this long are encoded in a worker thread.
        limiter: bounds the worker threads (share one across models); a private one with
            ``offload_threads`` tokens is made on first use otherwise.
        prefix_cache_chars: the segment cache's budget in characters (an entry counts its own
            and :data:`ENTRY_CHARS`); 0 turns it off.
        prefix_cache_min_chars: stretches shorter than this are never cached.
        word_ids: encode the stretches the segment cache misses pre-token by pre-token where
            that is exact (:mod:`lmgw.text.word_ids`; needs the segment cache).
        name: the folder or id, for messages.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens_map: Mapping[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        generation_config: Mapping[str, Any] | None = None,
        max_model_len: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        offload_threshold_chars: int = DEFAULT_OFFLOAD_THRESHOLD_CHARS,
        offload_threshold_ids: int = DEFAULT_OFFLOAD_THRESHOLD_IDS,
        offload_threads: int | None = None,
        limiter: trio.CapacityLimiter | None = None,
        prefix_cache_chars: int = DEFAULT_PREFIX_CACHE_CHARS,
        prefix_cache_min_chars: int = DEFAULT_PREFIX_CACHE_MIN_CHARS,
        prefix_cache_chunk_chars: int = DEFAULT_PREFIX_CACHE_CHUNK_CHARS,
        word_ids: bool = True,
        name: str = "",
    ) -> None:
        if offload_threshold_chars < 0 or offload_threshold_ids < 0:
            raise ValueError("offload thresholds must be >= 0")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        named = {k: v for k, v in (special_tokens_map or {}).items() if v is not None}
        wanted = (*named.values(), *extra_special_tokens)
        missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )
        self._tok = tokenizer
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens_map: Mapping[str, str] = MappingProxyType(named)
        self.added_tokens: tuple[AddedTokenInfo, ...] = tuple(
            AddedTokenInfo(i, t.content, bool(t.special))
            for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
        )
        special_ids = {a.id for a in self.added_tokens if a.special}
        for t in (*named.values(), *extra_special_tokens):
            if (tid := self._id_of(t)) is not None:
                special_ids.add(tid)
        self.all_special_ids: frozenset[int] = frozenset(special_ids)
        self.bos_token: str | None = named.get("bos_token")
        self.eos_token: str | None = named.get("eos_token")
        self.pad_token: str | None = named.get("pad_token")
        self.unk_token: str | None = named.get("unk_token")
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.unk_token_id = self._id_of(self.unk_token)
        gen = dict(generation_config or {})
        self.generation_config: Mapping[str, Any] = MappingProxyType(gen)
        eos = list(_ids(gen.get("eos_token_id"), "generation_config.eos_token_id"))
        if self.eos_token_id is not None:
            eos.append(self.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        """Every id that ends generation: generation_config's first, then the tokenizer's."""
        gen_max = gen.get("max_new_tokens", gen.get("max_length"))
        self.generation_max_tokens: int | None = (
            gen_max if isinstance(gen_max, int) and not isinstance(gen_max, bool) else None
        )
        """generation_config's ``max_new_tokens`` (or ``max_length``): the model's own default."""
        self.max_model_len = max_model_len
        self._cleanup = clean_up_tokenization_spaces and type(tokenizer.model).__name__ != "BPE"
        self.offload_threshold_chars = offload_threshold_chars
        self.offload_threshold_ids = offload_threshold_ids
        self._offload_threads = offload_threads or max(1, min(8, (os.cpu_count() or 2) - 1))
        self._limiter = limiter
        self._segments: _SegmentCache | None = None
        self.prefix_cache_off_reason: str | None = "disabled (prefix_cache_chars=0)"
        """Why the segment cache is off, or None when it is on."""
        self.prefix_cache_chunk_off_reason: str | None = "disabled (prefix_cache_chunk_chars=0)"
        """Why long stretches are not cached in chunks, or None when they are."""
        if prefix_cache_chars > 0:
            raw = json.loads(tokenizer.to_str())
            reason = _segment_unsafe_reason(raw)
            if reason is None:
                cache = _SegmentCache(
                    tokenizer, self.added_tokens, prefix_cache_chars, prefix_cache_min_chars
                )
                reason = cache.self_test()
                if reason is None:
                    self._segments = cache
                    if prefix_cache_chunk_chars > 0:
                        chunking = (
                            "no pre-tokenizer: words may merge across spaces"
                            if raw.get("pre_tokenizer") is None
                            else cache.chunk_self_test()
                        )
                        if chunking is None:
                            cache.chunk_chars = prefix_cache_chunk_chars
                        self.prefix_cache_chunk_off_reason = chunking
            self.prefix_cache_off_reason = reason
        if self._segments is None:
            self.prefix_cache_chunk_off_reason = self.prefix_cache_off_reason
        self.word_ids: WordIds | None = None
        """Plain-text stretches encoded by pre-token (:mod:`lmgw.text.word_ids`), or None."""
        self.word_ids_off_reason: str | None = "the segment cache is off"
        if self._segments is not None and word_ids:
            try:
                self.word_ids, self.word_ids_off_reason = WordIds.build(
                    tokenizer, avoid=[a.content for a in self.added_tokens], name=name
                )
            except Exception as exc:  # (a tokenizer it did not foresee: the library encodes)
                self.word_ids_off_reason = f"the check failed: {type(exc).__name__}: {exc}"
        elif not word_ids:
            self.word_ids_off_reason = "disabled"

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        max_model_len: int | None = None,
        hf_cache: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> ModelTokenizer:
        """Load from a local model folder (blocking file I/O: call at startup or in a thread).

        Args:
            name_or_path: the folder, or a hub id already in the local Hugging Face cache.
            max_model_len: overrides the context length read from ``config.json`` /
                ``tokenizer_config.json``.
            hf_cache: where to look for hub ids (default: the usual HF cache locations).
            **options: passed to :class:`ModelTokenizer` (thresholds, limiter, threads).

        Raises:
            TokenizerLoadError: missing folder or ``tokenizer.json``, a hub id with no local
                copy, invalid JSON, or a tokenizer that ``tokenizers`` cannot build.
        """
        folder = resolve_model_dir(name_or_path, hf_cache=hf_cache)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            slow_files = ("tokenizer.model", "vocab.json", "vocab.txt")
            slow = [n for n in slow_files if (folder / n).exists()]
            hint = (
                f" (found {', '.join(slow)}: only fast tokenizers are supported; convert once "
                "with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
                if slow
                else ""
            )
            raise TokenizerLoadError(f"{tok_file} is missing{hint}")
        try:
            raw = tok_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerLoadError(f"cannot read {tok_file}: {exc}") from exc
        try:
            json.loads(raw)  # for a precise message: tokenizers' own says little
        except json.JSONDecodeError as exc:
            raise TokenizerLoadError(f"{tok_file} is not valid JSON: {exc}") from exc
        try:
            tokenizer = Tokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises a bare Exception for bad models
            raise TokenizerLoadError(f"{tok_file} is not a valid tokenizer: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json", required=False) or {}
        named: dict[str, str | None] = {
            k: _token_content(config.get(k), f"tokenizer_config.json {k}")
            for k in NAMED_SPECIAL_TOKENS
            if k in config
        }
        extra: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key)
            if isinstance(value, list):
                extra += [
                    t
                    for v in value
                    if (t := _token_content(v, f"tokenizer_config.json {key}")) is not None
                ]
        if "added_tokens_decoder" not in config:  # legacy folders: the map file wins
            legacy = _read_json(folder / "special_tokens_map.json", required=False) or {}
            for k in NAMED_SPECIAL_TOKENS:
                if k in legacy:
                    named[k] = _token_content(legacy[k], f"special_tokens_map.json {k}")
        _add_config_tokens(tokenizer, config.get("added_tokens_decoder"), tok_file.parent)
        gen = _read_json(folder / "generation_config.json", required=False)
        model_config = _read_json(folder / "config.json", required=False)
        if max_model_len is None:
            max_model_len = _context_length(model_config)
            cfg_len = config.get("model_max_length")
            if (
                max_model_len is None
                and isinstance(cfg_len, int | float)
                and math.isfinite(cfg_len)
                and 0 < cfg_len < _NO_LIMIT
            ):
                max_model_len = int(cfg_len)
        return cls(
            tokenizer,
            special_tokens_map={k: v for k, v in named.items() if v is not None},
            extra_special_tokens=extra,
            generation_config=gen,
            max_model_len=max_model_len,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name=os.fspath(name_or_path),
            **options,
        )

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, inline (holds the GIL: keep it for short texts).

        ``add_special_tokens`` runs the tokenizer's post-processor (e.g. a BOS for completions);
        a rendered chat prompt already carries its special tokens, so pass False for it, as
        transformers' ``apply_chat_template`` and vLLM do.
        """
        seg = self._segments
        if seg is not None and not add_special_tokens and len(text) >= seg.min_chars:
            plan = seg.plan(text)
            return seg.assemble(plan, self._encode_each(plan.misses))
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    async def encode_async(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Like :meth:`encode`; when ``offload_threshold_chars`` or more characters need
        encoding, they go to a worker thread through the GIL-releasing ``encode_batch_fast``,
        bounded by the limiter (cached segments are not re-encoded)."""
        ids, plan = self._inline(text, add_special_tokens)
        if ids is not None:
            return ids
        if plan is not None:  # the segments' misses, in a worker thread
            misses = await trio.to_thread.run_sync(
                self._encode_many, plan.misses, limiter=self.limiter
            )
            return self._segments.assemble(plan, misses)  # type: ignore[union-attr]
        return await trio.to_thread.run_sync(
            self._encode_off_loop, text, add_special_tokens, limiter=self.limiter
        )

    def encode_inline(self, text: str, *, add_special_tokens: bool = True) -> list[int] | None:
        """:meth:`encode_async`'s answer when it would encode inline; None when it would take
        a worker thread (callers that cannot await, the compiled lane, leave those to it)."""
        return self._inline(text, add_special_tokens)[0]

    def _inline(self, text: str, add_special_tokens: bool) -> tuple[list[int] | None, Any]:
        """(ids, None) when ``text`` is encoded inline; else (None, the segment plan whose
        misses go to a worker thread, or None: the whole text goes)."""
        seg = self._segments
        if seg is not None and not add_special_tokens and len(text) >= seg.min_chars:
            plan = seg.plan(text)
            if plan.miss_chars >= self.offload_threshold_chars:
                return None, plan
            return seg.assemble(plan, self._encode_each(plan.misses)), None
        if len(text) >= self.offload_threshold_chars:
            return None, None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids, None

    def _encode_off_loop(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def _encode_each(self, texts: list[str]) -> list[list[int]]:
        # Inline: keep the GIL (encode_batch_fast would release it, and taking it back can wait
        # for another thread's switch interval). The stretches hold no added token.
        encode = self._tok.encode
        words = self.word_ids
        if words is None:
            return [encode(t, add_special_tokens=False).ids for t in texts]
        out = []
        for t in texts:
            ids = words.encode(t)
            out.append(encode(t, add_special_tokens=False).ids if ids is None else ids)
        return out

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def prefix_cache_statistics(self) -> PrefixCacheStatistics | None:
        """A snapshot of the segment cache (None when it is off), for metrics."""
        return None if self._segments is None else self._segments.statistics()

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int:
        """How many tokens ``text`` encodes to (inline)."""
        return len(self._tok.encode(text, add_special_tokens=add_special_tokens))

    async def count_tokens_async(self, text: str, *, add_special_tokens: bool = True) -> int:
        """:meth:`count_tokens` with :meth:`encode_async`'s off-loop rule."""
        return len(await self.encode_async(text, add_special_tokens=add_special_tokens))

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The limiter for worker threads (made on first use when none was given)."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._offload_threads)
        return self._limiter

    # -- decoding --------------------------------------------------------------------------------

    def check_ids(self, ids: Sequence[int], *, param: str = "tokens") -> None:
        """Raise :class:`TokenIdError` unless every id is in ``[0, vocab_size)``."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenIdError(
                f"token id {bad} is out of vocabulary (size {self.vocab_size})", param=param
            )

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (transformers' default keeps special tokens, and so does vLLM's
        ``/detokenize``).

        Raises:
            TokenIdError: an id is outside the vocabulary (``tokenizers`` would drop it silently).
        """
        self.check_ids(ids)
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text) if self._cleanup else text

    async def decode_async(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """:meth:`decode`, in a worker thread for ``offload_threshold_ids`` ids or more."""
        if len(ids) < self.offload_threshold_ids:
            return self.decode(ids, skip_special_tokens=skip_special_tokens)
        self.check_ids(ids)
        text = await trio.to_thread.run_sync(
            self._decode_off_loop, list(ids), skip_special_tokens, limiter=self.limiter
        )
        return self._clean_up(text) if self._cleanup else text

    def _decode_off_loop(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    @staticmethod
    def _clean_up(text: str) -> str:
        for old, new in _CLEANUPS:
            text = text.replace(old, new)
        return text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """The vocabulary strings of ``ids`` (vLLM's ``token_strs``); None for unknown ids."""
        to_token = self._tok.id_to_token
        return [to_token(i) if i >= 0 else None for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string or added token."""
        return self._tok.token_to_id(token)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (shared: do not reconfigure it)."""
        return self._tok

    def __repr__(self) -> str:
        return (
            f"ModelTokenizer({self.name!r}, vocab={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, max_model_len={self.max_model_len})"
        )


def _add_config_tokens(tokenizer: Tokenizer, decoder: Any, where: Path) -> None:
    """Add the tokens ``tokenizer_config.json`` declares but ``tokenizer.json`` lacks, at the ids
    the config says (transformers does the same; a mismatch would shift every later id)."""
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise TokenizerLoadError(f"{where}/tokenizer_config.json added_tokens_decoder: not a map")
    entries: list[tuple[int, dict[str, Any]]] = []
    for key, value in decoder.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(value, dict)):
            raise TokenizerLoadError(
                f"{where}/tokenizer_config.json added_tokens_decoder: bad entry {key!r}"
            )
        if not isinstance(value.get("content"), str):
            raise TokenizerLoadError(
                f"{where}/tokenizer_config.json added_tokens_decoder[{key}]: no content"
            )
        entries.append((int(key), value))
    for tid, value in sorted(entries, key=lambda e: e[0]):
        content = value["content"]
        if tokenizer.id_to_token(tid) == content:
            continue
        token = AddedToken(
            content,
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not value.get("special", False))),
            special=bool(value.get("special", False)),
        )
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(content)
        if got != tid:
            raise TokenizerLoadError(
                f"{where}/tokenizer_config.json declares {content!r} as id {tid}, but "
                f"tokenizer.json gives it id {got}: the files do not belong together"
            )


# -- the segment cache ----------------------------------------------------------------------------

# Pre-tokenizers and normalizers that work on each stretch between added tokens without looking at
# where it sits in the text. Metaspace's "first" scheme (Llama-2/Mistral SentencePiece ports)
# prepends to the first stretch only, so a stretch encoded alone would differ: not listed.
_SAFE_PRE_TOKENIZERS = frozenset(
    {
        "ByteLevel",
        "Split",
        "Digits",
        "Punctuation",
        "Whitespace",
        "WhitespaceSplit",
        "BertPreTokenizer",
        "UnicodeScripts",
        "CharDelimiterSplit",
    }
)
_SAFE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})


def _component_unsafe(node: Any, safe: frozenset[str], what: str) -> str | None:
    if node is None:
        return None
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "Sequence":
        children = node.get("pretokenizers") or node.get("normalizers") or []
        return next((r for c in children if (r := _component_unsafe(c, safe, what))), None)
    if kind == "Metaspace" and what == "pre-tokenizer" and node.get("prepend_scheme") == "never":
        return None
    return None if kind in safe else f"the {what} {kind!r} may depend on a stretch's position"


def _segment_unsafe_reason(raw: Mapping[str, Any]) -> str | None:
    """Why encoding stretches between added tokens one by one might differ from a whole
    encode, or None when it cannot (from the tokenizer.json structure)."""
    reason = _component_unsafe(raw.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS, "pre-tokenizer")
    reason = reason or _component_unsafe(raw.get("normalizer"), _SAFE_NORMALIZERS, "normalizer")
    if reason:
        return reason
    has_normalizer = raw.get("normalizer") is not None
    for token in raw.get("added_tokens") or ():
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} strips or matches whole words"
        if token.get("normalized") and has_normalizer:
            return f"added token {token.get('content')!r} is matched after normalization"
    return None


@dataclass(frozen=True, slots=True)
class PrefixCacheStatistics:
    """Counters since start, and the current size."""

    hits: int
    misses: int
    hit_tokens: int
    entries: int
    chars: int


@dataclass(slots=True)
class _Plan:
    parts: list[int | bytes | None]  # a special id, cached ids, or None: the next miss
    misses: list[str]
    store: list[bool]  # per miss: cache it afterwards
    miss_chars: int


def chunk_cuts(text: str, every: int) -> list[int]:
    """Where to cut ``text`` into chunks of about ``every`` characters: at the first space at or
    after each multiple of ``every`` (counted from the last cut) that follows a non-space.
    A cut depends only on the text before it and its own character, so texts that share a
    prefix share the cuts inside it."""
    cuts: list[int] = []
    find = text.find
    at = 0
    while True:
        i = find(" ", at + every)
        while i > 0 and text[i - 1].isspace():
            i = find(" ", i + 1)
        if i <= 0:
            return cuts
        cuts.append(i)
        at = i


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    """``text`` cut at the ascending positions ``cuts``."""
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


_CHUNK_PROBES = (
    "Hello world, this is a test of words. And more words!",
    "a  b   c\t d\n e \r\n f",
    "x = foo(1, 2) + bar[3]; # a comment -- with dashes",
    "café 日本語 テキスト 😀 emoji 👍🏽 test ünïcödé ß",
    "don't won't it's I'm we'll they've you'd 'quoted' words",
    "1234567 89 0.5 1e10 -3 +4 12,345 $5 100%",
    "  leading and trailing spaces  ",
    "mixed\r\n lines \n\n paragraph.\n\nQuestion: why? Because.",
    "URL https://example.com/a?b=c d@e.f <tag attr='x'> </tag>",
    "tabs\t\tand\u00a0nbsp\u3000ideographic space ...and... -- ** __",
)


class _SegmentCache:
    """Ids of long stretches of text between added tokens: an LRU bounded in characters.

    ``plan`` and ``assemble`` take a lock around the dictionary, so callers on several threads
    are safe; the encoding itself happens outside, between the two calls.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        added: Sequence[AddedTokenInfo],
        max_chars: int,
        min_chars: int,
    ) -> None:
        self._tok = tokenizer
        self.max_chars = max_chars
        self.min_chars = max(1, min_chars)
        contents = sorted({a.content for a in added if a.content}, key=len, reverse=True)
        self._ids = {a.content: a.id for a in added}
        # Leftmost-longest, as tokenizers matches added tokens: at each position the alternatives
        # are tried longest first.
        self._split = (
            re.compile("(" + "|".join(re.escape(c) for c in contents) + ")").split
            if contents
            else None
        )
        # The ids as bytes (uint32, native order): bytes are not tracked by the garbage
        # collector, arrays are, and a full cache of them made every full collection walk
        # ~15k objects (~3 ms, a pause of every request in flight).
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._hit_tokens = 0
        self.chunk_chars = 0
        """Stretches of twice this or more are kept in chunks (0: whole); set once verified."""

    def chunk_self_test(self) -> str | None:
        """Compare with whole encodes when probe strings are cut before every space that
        follows a non-space, one cut at a time and all at once."""
        encode = self._tok.encode
        for text in _CHUNK_PROBES:
            want = encode(text, add_special_tokens=False).ids
            cuts = [i for i in range(1, len(text)) if text[i] == " " and not text[i - 1].isspace()]
            for bounds in [[c] for c in cuts] + [cuts]:
                got = []
                for piece in split_at(text, bounds):
                    got += encode(piece, add_special_tokens=False).ids
                if got != want:
                    return f"cutting before a space changes the ids of {text!r}"
        return None

    def self_test(self) -> str | None:
        """Compare with whole encodes on strings that put every added token in awkward places."""
        words = ("Hello world", " spaced  out ", "\n\nline\r\n", "café 日本 😀", "x=1;")
        samples = []
        for i, token in enumerate(self._ids):
            a, b = words[i % len(words)], words[(i + 2) % len(words)]
            samples += [
                f"{a}{token}{b}",
                f" {token} {token}{token}\n",
                f"{token}{a}",
                f"{b}{token}",
            ]
        samples.append(
            "".join(f"{w}{t}" for w, t in zip(words * 4, list(self._ids)[:20], strict=False))
        )
        for text in samples:
            plan = self.plan(text, min_chars=1, lookup=False)
            ids = [
                e.ids for e in self._tok.encode_batch_fast(plan.misses, add_special_tokens=False)
            ]
            got = self.assemble(plan, ids, store=False)
            if got != self._tok.encode(text, add_special_tokens=False).ids:
                return f"segment encoding differs from a whole encode on {text!r}"
        return None

    def plan(self, text: str, *, min_chars: int | None = None, lookup: bool = True) -> _Plan:
        pieces = self._split(text) if self._split is not None else [text]
        least = self.min_chars if min_chars is None else min_chars
        parts: list[int | bytes | None] = []
        misses: list[str] = []
        store: list[bool] = []
        miss_chars = 0
        entries = self._entries
        chunk = self.chunk_chars if lookup else 0
        with self._lock:
            for i, stretch in enumerate(pieces):
                if i % 2:
                    parts.append(self._ids[stretch])
                    continue
                if not stretch:
                    continue
                if chunk and len(stretch) >= 2 * chunk:
                    chunks = split_at(stretch, chunk_cuts(stretch, chunk))
                    least_here = 1  # the last too: it ends a shared system turn as often
                else:
                    chunks = [stretch]
                    least_here = least
                for piece in chunks:
                    long = len(piece) >= least_here
                    hit = entries.get(piece) if (lookup and long) else None
                    if hit is not None:
                        entries.move_to_end(piece)
                        self._hits += 1
                        self._hit_tokens += len(hit) >> 2
                        parts.append(hit)
                        continue
                    if lookup and long:
                        self._misses += 1
                    parts.append(None)
                    misses.append(piece)
                    store.append(lookup and long and len(piece) <= self.max_chars // 4)
                    miss_chars += len(piece)
        return _Plan(parts, misses, store, miss_chars)

    def assemble(self, plan: _Plan, miss_ids: list[list[int]], *, store: bool = True) -> list[int]:
        out: list[int] = []
        it = iter(zip(plan.misses, miss_ids, plan.store, strict=True))
        new: list[tuple[str, list[int]]] = []
        for part in plan.parts:
            if part is None:
                text, ids, keep = next(it)
                out += ids
                if keep and store:
                    new.append((text, ids))
            elif isinstance(part, int):
                out.append(part)
            else:
                out += memoryview(part).cast("I")
        if new:
            with self._lock:
                for text, ids in new:
                    if text not in self._entries:
                        self._entries[text] = array("I", ids).tobytes()
                        self._chars += len(text) + ENTRY_CHARS
                while self._chars > self.max_chars and self._entries:
                    old, _ = self._entries.popitem(last=False)
                    self._chars -= len(old) + ENTRY_CHARS
        return out

    def statistics(self) -> PrefixCacheStatistics:
        with self._lock:
            return PrefixCacheStatistics(
                self._hits, self._misses, self._hit_tokens, len(self._entries), self._chars
            )
