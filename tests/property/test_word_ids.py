"""Encoding by pre-token (lmgw.text.word_ids) against the tokenizers library itself.

The split regexes of the byte-level families (GPT-2's, and Llama 3 / Qwen / GPT-4 style Split
patterns) translated to ``re`` must split ASCII text as tokenizers' own regex engine does; the
ids must equal a whole encode for the simulator's tokenizer and for a BPE trained here behind a
Llama-3-style split; everything else (non-ASCII, unsupported tokenizers) is left to the
tokenizer, and a wrong id at run time turns the fast path off.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmgw.text import ModelTokenizer
from lmgw.text.sampled_check import EVERY
from lmgw.text.word_ids import GPT2_PATTERN, LATIN1_ALNUM, SYMBOLS, WordIds, translate

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PATTERNS = {"gpt2": GPT2_PATTERN, "llama3": LLAMA3, "qwen2": QWEN2, "o200k": O200K}

ASCII = st.lists(
    st.one_of(
        st.characters(min_codepoint=32, max_codepoint=126),
        st.sampled_from(["\t", "\n", "\r", " ", "  ", "'s", "'LL", "123", "\r\n", "word"]),
        st.sampled_from(SYMBOLS),  # (curly quotes, dashes, currency, emoji...)
        st.sampled_from(LATIN1_ALNUM),  # (é, ß, ª, ², ½...)
    ),
    max_size=30,
).map("".join)
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@SETTINGS
@given(text=ASCII)
def test_translated_split_is_the_tokenizers_split(name: str, text: str) -> None:
    pattern = PATTERNS[name]
    ours = re.compile(translate(pattern), re.ASCII).findall(text)  # type: ignore[arg-type]
    theirs = pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)
    assert ours == [piece for piece, _ in theirs]


@pytest.mark.parametrize(
    "pattern",
    [
        r"\p{P}+",
        r"\P{L}",
        r"[[:alpha:]]",
        r"\X",
        r"(?<name>a)",
        r"[\p{Lt}]",
        r"\h+",
        "[a",
        r"\w+",
        r"(?i:[a-z]+)",
    ],
)
def test_patterns_without_an_ascii_equivalent(pattern: str) -> None:
    assert translate(pattern) is None


def test_translation_keeps_classes_and_literals() -> None:
    assert (
        translate(r" ?\p{Lu}+") == " ?[A-Z" + "".join(c for c in LATIN1_ALNUM if c.isupper()) + "]+"
    )
    assert translate(r"[^\s\p{Nd}]") == r"[^\s0-9]"
    assert translate(r"\p{Lt}|x") == "(?!)|x"
    assert translate(r"[]a]") == r"[\]a]"


# -- ids -------------------------------------------------------------------------------------------

_CORPUS = [
    "Hello world, this is a test of the tokenizer. Don't stop; it's fine.",
    "def f(x):\n    return x * 2  # doubled\n\nprint(f(21))\r\n",
    "Numbers 1 22 333 4444 55555 and 3.14; $5, 100%, 2024-11-27.",
] * 20


def _trained(pre: Any) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=["<|end|>"],
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def _tokenizers() -> dict[str, Tokenizer]:
    sim = Path.home() / ".cache" / "lmgw" / "sim-model-v3" / "tokenizer.json"
    out = {
        "gpt2-style": _trained(pre_tokenizers.ByteLevel(add_prefix_space=False)),
        "llama3-style": _trained(
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        ),
    }
    if sim.exists():
        out["sim"] = Tokenizer.from_file(str(sim))
    return out


TOKENIZERS = _tokenizers()
_BUILT: dict[str, WordIds] = {}


def _words(name: str) -> WordIds:
    if name not in _BUILT:
        words, reason = WordIds.build(TOKENIZERS[name], avoid=["<|end|>"])
        assert words is not None, reason
        _BUILT[name] = words
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@SETTINGS
@given(text=ASCII)
def test_ids_are_a_whole_encodes(name: str, text: str) -> None:
    words = _words(name)
    want = TOKENIZERS[name].encode(text, add_special_tokens=False).ids
    got = words.encode(text)
    assert got is None or got == want
    if text:
        assert got == want  # (every plain ASCII text is encoded here)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_other_text_is_left_to_the_tokenizer(name: str) -> None:
    words = _words(name)
    for text in ("\u0100", "日本語", "Ωmega", "tab\x0b", "nul\x00", "nbsp\u00a0", "\x7f", "\u00ad"):
        assert words.encode(text) is None
    for text in ("café", "Straße", "x²", "½"):  # (Latin-1's letters and numbers are taken)
        assert words.encode(text) == TOKENIZERS[name].encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _trained(pre_tokenizers.ByteLevel(add_prefix_space=True)), "pre-tokenizer"),
        (lambda: _trained(pre_tokenizers.Metaspace()), "pre-tokenizer"),
        (lambda: _trained(pre_tokenizers.Whitespace()), "pre-tokenizer"),
        (
            lambda: _trained(
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(r"\p{P}+|[^\p{P}]+"), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            ),
            "ASCII equivalent",
        ),
    ],
)
def test_tokenizers_it_cannot_be_exact_for(make: Any, reason: str) -> None:
    words, why = WordIds.build(make())
    assert words is None and why is not None and reason in why


def test_text_the_split_does_not_cover_is_left_to_the_tokenizer() -> None:
    tok = _trained(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}+"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    words, why = WordIds.build(tok)
    assert words is not None, why
    assert words.encode("abc123") == tok.encode("abc123", add_special_tokens=False).ids
    assert words.encode("abc, 123") is None  # ", " lies between the matches


def test_symbols_a_normalizer_changes_are_left_to_the_tokenizer() -> None:
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.normalizer = normalizers.NFKC()
    words, why = WordIds.build(tok)
    assert words is not None, why
    for text in ("etc\u2026", "5\u2122"):  # NFKC: "...", "TM"
        assert words.encode(text) is None
    assert words.encode("a \u2014 b") == tok.encode("a \u2014 b", add_special_tokens=False).ids


def test_a_normalizer_that_changes_ascii_turns_it_off() -> None:
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.normalizer = normalizers.Lowercase()
    words, why = WordIds.build(tok)
    assert words is None and "normalizer" in (why or "")


def test_a_wrong_id_at_run_time_turns_it_off(caplog: pytest.LogCaptureFixture) -> None:
    words, _ = WordIds.build(TOKENIZERS["gpt2-style"])
    assert words is not None
    words.encode("hello world")
    words._words[" world"] = [0]  # a cache entry gone bad
    for _ in range(EVERY + 1):
        words.encode("hello world")
    assert words.check.off is not None and words.check.mismatches == 1
    assert "turned off" in caplog.text
    assert words.encode("hello world") is None


def test_model_tokenizer_uses_it_for_uncached_stretches() -> None:
    tok = ModelTokenizer(
        Tokenizer.from_str(TOKENIZERS["llama3-style"].to_str()),
        special_tokens_map={"eos_token": "<|end|>"},
        prefix_cache_min_chars=1,
    )
    assert tok.word_ids is not None, tok.word_ids_off_reason
    text = "<|end|>Hello world, it's fine.<|end|>\nΩmega and more<|end|>"
    want = TOKENIZERS["llama3-style"].encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special_tokens=False) == want
    stats = tok.word_ids.stats
    assert stats.words >= 1 and stats.other >= 1  # the plain stretches here, the Greek one not
    off = ModelTokenizer(Tokenizer.from_str(TOKENIZERS["llama3-style"].to_str()), word_ids=False)
    assert off.word_ids is None and off.word_ids_off_reason == "disabled"


def test_a_build_that_breaks_leaves_the_tokenizer_to_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("unforeseen")

    monkeypatch.setattr(WordIds, "build", broken)
    tok = ModelTokenizer(Tokenizer.from_str(TOKENIZERS["gpt2-style"].to_str()))
    assert tok.word_ids is None and "ValueError" in (tok.word_ids_off_reason or "")
    assert (
        tok.encode("hello world", add_special_tokens=False)
        == TOKENIZERS["gpt2-style"].encode("hello world", add_special_tokens=False).ids
    )
