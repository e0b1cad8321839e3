"""Token ids of plain text (ASCII, Latin-1's letters, punctuation and symbols), pre-token by
pre-token: a byte-level BPE's split regex run by Python's ``re``, and each pre-token's ids from
a dictionary.

Why: after the chat template (:mod:`lmgw.text.template_shapes`), encoding a request's new turn
is the largest cost of a tokenizing gateway's request. ``tokenizers`` takes ~14 µs for a
70-character turn: most of it in its pre-tokenizer's regex engine and in building the
``Encoding`` (offsets, masks) the gateway never reads. The same split in ``re`` and a dictionary
lookup per word take ~2 µs.

Why it is exact: in a byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek...) merges never cross a
pre-token, so a pre-token has the same ids wherever it stands, provided nothing is added in
front of the text (``add_prefix_space`` false) and the normalizer leaves the text alone (a
character it would change is other text). For text of printable ASCII, tab, newline, carriage
return, Latin-1's letters and numbers (:data:`LATIN1_ALNUM`) and punctuation or symbols beyond
ASCII (:data:`SYMBOLS`: curly quotes, dashes, currency signs, emoji...), the model's split regex
(onig syntax, ``\\p{L}``...) has an exact ``re`` equivalent with explicit classes
(:func:`translate`). A new pre-token's ids come from the tokenizer's BPE model itself (its
bytes mapped to byte-level characters, as the ByteLevel pre-tokenizer maps them). Other text
(any other character) is encoded by the tokenizer as before.

Checks: at load, the split and the ids must agree with the tokenizer on a probe corpus and on
seeded random strings of those characters (else off, with the reason); at run time one encode
in 256 is compared with the tokenizer (:class:`lmgw.text.sampled_check.SampledCheck`), and a
difference turns this off for the model (logged, counted).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from .sampled_check import SampledCheck

__all__ = ["GPT2_PATTERN", "WordIds", "translate"]

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The split of ``ByteLevel(use_regex=true)``."""
MAX_WORDS = 1 << 16


def _latin1(categories: tuple[str, ...]) -> str:
    """The characters of U+00A0-U+00FF in ``categories``, as class members (Latin-1's letters
    and numbers: é, ß, ª, ², ½... whose categories have not changed since Unicode 1.1)."""
    return "".join(
        re.escape(chr(c)) for c in range(0xA0, 0x100) if unicodedata.category(chr(c)) in categories
    )


_LETTERS = ("Lu", "Ll", "Lt", "Lm", "Lo")
_NUMBERS = ("Nd", "Nl", "No")
# Unicode classes as their members in ASCII and Latin-1 ("": none there).
_CLASSES = {
    "L": "A-Za-z" + _latin1(_LETTERS), "Lu": "A-Z" + _latin1(("Lu",)),
    "Ll": "a-z" + _latin1(("Ll",)), "Lt": "", "Lm": "", "Lo": _latin1(("Lo",)),
    "N": "0-9" + _latin1(_NUMBERS), "Nd": "0-9", "Nl": "", "No": _latin1(("No",)),
    "M": "", "Mn": "", "Mc": "", "Me": "",
}  # fmt: skip
LATIN1_ALNUM = "".join(
    chr(c) for c in range(0xA0, 0x100) if unicodedata.category(chr(c)) in _LETTERS + _NUMBERS
)
"""Latin-1's letters and numbers: text may hold them (the classes above name them)."""
# The one case-insensitive group the split regexes use: ASCII literals, which no admitted
# character folds to.
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# Escapes that mean the same in onig and in ``re`` with re.ASCII for the text admitted (not
# \w: onig's holds é).
_SAME_ESCAPES = frozenset("sSdDrntfv\\'\"-.[](){}?*+|^$/!#%&,:;<=>@_`~ ")


def _symbols() -> str:
    """Characters beyond ASCII that every split regex here treats as ASCII punctuation: not a
    letter, digit, mark or space in any Unicode version (categories P* and S*), such as curly
    quotes, dashes, the ellipsis, currency signs and emoji. A text may hold them and still be
    split by the translated regex: each class it names (letters, digits, spaces) leaves them
    out, as onig's do, and ``(?i:...)`` folds none of them to an ASCII letter."""
    ranges = [(0xA1, 0xBF), (0x2010, 0x205E), (0x20A0, 0x20C0), (0x2190, 0x23FF),
              (0x2500, 0x27BF), (0x1F300, 0x1FAFF)]  # fmt: skip
    return "".join(
        chr(c)
        for lo, hi in ranges
        for c in range(lo, hi + 1)
        if unicodedata.category(chr(c))[0] in "PS"
    )


SYMBOLS = _symbols()


def _other(symbols: str) -> Any:
    """A search for the first character outside printable ASCII, tab, newline, carriage return
    and ``symbols``."""
    return re.compile("[^\t\n\r -~" + re.escape(symbols) + "]").search


def _byte_table() -> list[str]:
    """Byte-level BPE's byte -> character map (GPT-2's): printable bytes stand for themselves,
    the others for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return [table[b] for b in range(256)]


_BYTE_TABLE = _byte_table()
_BYTE_CHARS = str.maketrans(dict(enumerate(_BYTE_TABLE[:128])))


def _byte_level(word: str) -> str:
    """``word`` as the ByteLevel pre-tokenizer hands it to the model: its UTF-8 bytes mapped."""
    if word.isascii():
        return word.translate(_BYTE_CHARS)
    return "".join(_BYTE_TABLE[b] for b in word.encode())


_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})  # (identities on ASCII)

_PROBES = (
    "Hello world! This is a test. Don't stop; it's fine, isn't it? I'M SURE they'LL go.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1)\n",
    "    indented\n\n\n  two  spaces\t\ttabs \t mixed\r\nCRLF line\r\n\r\n trailing   ",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 +7 1e10 0x1F 2024-11-27 12:30:45 $1,000.00 50%",
    "Punctuation!!! ??? ... --- *** ### @user #tag (parens) [brackets] {braces} <angle> a|b",
    "URL https://example.com/path?query=1&x=y#frag email@example.org C:\\dir\\file.txt",
    "'quoted' \"double\" `back` 's 't 're 've 'm 'll 'd ''s x's X'S ''",
    "camelCase snake_case kebab-case PascalCase UPPER_CASE mixed123abc abc123def 1a2b3c",
    "a\nb\n\nc \n d\t\ne  \n\n  f",
    " leading space",
    "trailing space ",
    "\n",
    "  ",
    "x",
    "Don\u2019t \u2014 \u201csmart\u201d quotes\u2026 \u2018single\u2019 \u2013 dashes;"
    " \u20ac5, \u00a33 \u00a9 \u00ae \u2122 \u00b0 \u00b1 \u00d7 \u2192 \u2022 \u2030"
    " \u00bf\u00a1 \U0001f600\U0001f44d \U0001f389ok",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, Stra\u00dfe \u00fcber M\u00fcnchen, ni\u00f1o,"
    " \u00c0 la fa\u00e7on, 2\u00b2 + \u00bd, \u00aa \u00ba \u00b5s, L'\u00c9T\u00c9 it's",
)


def translate(pattern: str) -> str | None:
    """``pattern`` (onig syntax, as tokenizer.json holds it) for ``re`` with ASCII classes, or
    None when it uses something without a known ASCII equivalent."""
    if "(?i" in pattern.replace(_CONTRACTIONS, ""):
        return None  # (another case-insensitive part: onig folds beyond ASCII, re.ASCII not)
    out: list[str] = []
    in_class = False
    class_start = body_at = 0
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            e = pattern[i + 1]
            if e in "pP":
                m = re.match(r"\{(\^?)([A-Za-z]+)\}", pattern[i + 2 :])
                if e == "P" or m is None or m.group(1) or m.group(2) not in _CLASSES:
                    return None
                members = _CLASSES[m.group(2)]
                if in_class:
                    out.append(members)
                else:
                    out.append(f"[{members}]" if members else "(?!)")
                i += 2 + m.end()
                continue
            if e == "x" and re.match(r"[0-9A-Fa-f]{2}", pattern[i + 2 : i + 4]):
                out.append(pattern[i : i + 4])
                i += 4
                continue
            if e not in _SAME_ESCAPES:
                return None
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "[":
                return None  # nested classes or [:posix:]
            if c == "]" and i > class_start:
                body = "".join(out[body_at:])
                if not body or body == "^":
                    return None  # a class left empty (its members were all non-ASCII)
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            body_at = len(out)
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            class_start = i
            if i < n and pattern[i] == "]":  # a literal ] first
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pattern[i + 1 : i + 3] == "?<" and pattern[i + 3 : i + 4] not in "=!":
            return None  # a named group (different syntax)
        out.append(c)
        i += 1
    if in_class:
        return None
    return "".join(out)


def _split_pattern(raw: dict[str, Any]) -> str | None:
    """The split regex of a byte-level BPE's tokenizer.json, or None."""
    pre = raw.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return GPT2_PATTERN
    if kind != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, level = parts
    if level.get("type") != "ByteLevel" or level.get("add_prefix_space") or level.get("use_regex"):
        return None
    if split.get("type") != "Split" or split.get("invert") or split.get("behavior") != "Isolated":
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    return regex if isinstance(regex, str) else None


def _normalizers(raw: dict[str, Any]) -> list[Any]:
    norm = raw.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Sequence":
        return [n.get("type") for n in norm.get("normalizers") or []]
    return [norm.get("type")] if isinstance(norm, dict) else []


def _unsupported(raw: dict[str, Any]) -> str | None:
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return "not a byte-level BPE without dropout"
    kinds = _normalizers(raw)
    if any(k not in _NORMALIZERS for k in kinds):
        return f"a normalizer that changes ASCII ({', '.join(map(str, kinds))})"
    return None


@dataclass(slots=True)
class WordStats:
    """Counters since start."""

    words: int = 0
    """Texts encoded here."""
    other: int = 0
    """Texts left to the tokenizer (a character outside plain ASCII)."""


class WordIds:
    """A byte-level BPE's ids, pre-token by pre-token, for plain ASCII text (build with
    :meth:`build`)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        pattern: re.Pattern[str],
        name: str = "",
        symbols: str = SYMBOLS,
    ) -> None:
        self._tok = tokenizer
        self._other = _other(symbols)
        self._findall = pattern.findall
        self._tokenize = tokenizer.model.tokenize
        self._words: dict[str, tuple[int, ...]] = {}  # (tuples of ints: untracked by the GC)
        self.name = name
        self.stats = WordStats()
        self.check = SampledCheck(f"tokenizer {name}: encoding by pre-token")

    @classmethod
    def build(
        cls, tokenizer: Tokenizer, *, avoid: Sequence[str] = (), name: str = ""
    ) -> tuple[WordIds | None, str | None]:
        """The encoder for ``tokenizer`` and None, or None and why it cannot be exact.
        ``avoid``: the added tokens' texts (the caller encodes only text without them)."""
        raw = json.loads(tokenizer.to_str())
        reason = _unsupported(raw)
        if reason:
            return None, reason
        source = _split_pattern(raw)
        if source is None:
            return None, "a pre-tokenizer other than a byte-level split"
        translated = translate(source)
        if translated is None:
            return None, f"a split regex without an ASCII equivalent: {source!r}"
        try:
            pattern = re.compile(translated, re.ASCII)
        except re.error as exc:
            return None, f"the split regex does not compile for re: {exc}"
        forms = _normalizers(raw)  # (characters the normalizer would change are other text)
        symbols = "".join(
            c
            for c in SYMBOLS + LATIN1_ALNUM
            if all(unicodedata.normalize(f, c) == c for f in forms)
        )
        words = cls(tokenizer, pattern, name, symbols)
        reason = words.self_test(avoid)
        if reason:
            return None, reason
        words._words.clear()
        return words, None

    def self_test(self, avoid: Sequence[str] = ()) -> str | None:
        """Agreement with the tokenizer on the probes and on seeded random ASCII strings."""
        rng = random.Random(20261127)
        alphabet = "".join(chr(c) for c in range(32, 127)) + "\t\n\r" + " " * 12 + "e" * 6
        alphabet += "".join(rng.sample(SYMBOLS, 40)) + LATIN1_ALNUM
        texts = list(_PROBES)
        texts += ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(400)]
        encode = self._tok.encode
        for text in texts:
            if any(a in text for a in avoid if a) or self._other(text) is not None:
                continue  # (text encode() leaves to the tokenizer)
            got = self._encode(text)
            if got is not None and got != encode(text, add_special_tokens=False).ids:
                return f"pre-token ids differ from a whole encode on {text!r}"
        return None

    def encode(self, text: str) -> list[int] | None:
        """``text``'s ids (``text`` holds no added token), or None: the tokenizer's to do."""
        if self.check.off is not None or self._other(text) is not None:
            self.stats.other += 1
            return None
        ids = self._encode(text)
        if ids is None:
            self.stats.other += 1
            return None
        self.stats.words += 1
        if self.check.due() and ids != self._tok.encode(text, add_special_tokens=False).ids:
            self.check.failed(f"ids differed from a whole encode ({len(text)} characters)")
            return None
        return ids

    def _encode(self, text: str) -> list[int] | None:
        """None when the split leaves characters between matches (the tokenizer keeps them as
        pre-tokens of their own)."""
        words = self._words
        out: list[int] = []
        covered = 0
        for word in self._findall(text):
            ids = words.get(word)
            if ids is None:  # (the model alone: ~1 µs; a whole encode call costs ~3)
                ids = tuple([t.id for t in self._tokenize(_byte_level(word))])
                if len(words) >= MAX_WORDS:
                    words.clear()
                words[word] = ids
            out += ids
            covered += len(word)
        return out if covered == len(text) else None
