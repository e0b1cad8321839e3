"""A small, real Hugging Face model folder for the simulators' model ("sim-model").

Why: the gateway's tokenizer and chat-template features (`lmgw.text`) need a real ``tokenizer.json``
and ``tokenizer_config.json`` to run against, and lmgw never downloads from a model hub. So the
simulated fleet ships its own: a byte-level BPE trained with ``tokenizers`` on a fixed built-in
corpus (deterministic: same bytes on every machine and in every process), a ChatML-style chat
template with tools and multimodal parts, bos/eos/pad, ``special_tokens_map.json``,
``generation_config.json`` and a ``config.json`` carrying the context length.

The simulated workers tokenize with this folder through ``lmgw.text`` (the gateway's own code),
so the gateway's parity self-test passes against them token for token, and the words they
generate (:func:`output_words`, in four spellings) are whole tokens of this vocabulary.

Building takes well under a second; :func:`ensure_model_dir` caches the folder under a directory
you pass in, named by a version, and publishes it with an atomic rename, so concurrent processes
(a gateway and its simulated workers) may call it at once. :func:`default_model_dir` is that
folder in the per-user cache (``$XDG_CACHE_HOME/lmgw`` or ``~/.cache/lmgw``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SIM_MODEL_NAME = "sim-model"
BUILD_VERSION = 3
"""Bump when anything below changes what is written: the folder name carries it."""

MAX_MODEL_LEN = 32768
VOCAB_SIZE = 4096

BOS = "<|startoftext|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
MEDIA_TOKENS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}
# Special tokens first (ids 0..), in this order; then the non-special added tokens that the
# template writes as text markers (as Qwen-style models do with <tool_call>).
SPECIAL_TOKENS = (PAD, BOS, IM_START, EOS, *MEDIA_TOKENS.values())
ADDED_TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

_MARKER = ".lmgw-sim-model.json"

# ChatML with an optional tools block in the system turn, tool calls and tool responses, and
# content either as a string or as a list of parts (text, image, audio, video): vLLM detects that
# the template iterates over the content and passes the "openai" content format.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is not none -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}{{ part.text }}
{%- elif part.type == 'image' -%}<|image|>
{%- elif part.type == 'audio' -%}<|audio|>
{%- elif part.type == 'video' -%}<|video|>
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if tools -%}
{{- '<|im_start|>system\\n' -}}
{%- if messages and messages[0].role == 'system' -%}
{{- render_content(messages[0].content) + '\\n\\n' -}}
{%- endif -%}
{{- '# Tools\\n\\nYou may call these functions:\\n<tools>' -}}
{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\\n</tools>\\nAnswer a call with <tool_call>{"name": ..., "arguments": ...}</tool_call>.' -}}
{{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (tools and loop.first and message.role == 'system') -%}
{{- '<|im_start|>' + message.role + '\\n' -}}
{%- if message.role == 'tool' -%}
{{- '<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}
{%- else -%}
{{- render_content(message.content) -}}
{%- endif -%}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}
{%- endif -%}
{{- '}\\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

# The training corpus: prose, chat, code, JSON, numbers, several scripts, and the pseudo-words of
# the simulators' output vocabulary (onsets x vowels; see output_words()).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
You are a helpful assistant. Answer the user's question as briefly and accurately as you can.
What is the weather like in Paris today? It is sunny, with a high of 24 degrees Celsius.
Please summarize the following document in three sentences, then list the key points.
The gateway routes each request to the worker that already holds the longest cached prefix.
Prefill computes the key-value cache for the prompt; decode generates one token at a time.
Disaggregated serving runs encode, prefill and decode on separate workers and moves the cache.
Tokens per second, time to first token and inter-token latency are the numbers that matter.
I'm sure you'll find it useful; we've tested it, and they're happy with the results.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i}: {fibonacci(i)}")

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
SELECT id, name, created_at FROM users WHERE active = true ORDER BY created_at DESC LIMIT 10;
0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 8192 32768 65536 3.14159 2.71828 1e-5
Le café est très bon, mais la crème brûlée est encore meilleure. Où est la bibliothèque?
Die Straße ist lang und schön. Grüße aus München! Über den Wolken muss die Freiheit sein.
El niño comió una manzana. ¿Dónde está la estación? ¡Qué día tan bonito!
日本語のテキストも少し含めます。東京は日本の首都です。
中文文本也包括在内。北京是中国的首都。
Привет, мир! Как дела? Москва — столица России.
مرحبا بالعالم. هذه جملة باللغة العربية.
Emoji: 😀 🎉 🚀 ❤️ 👍🏽 — and symbols: © ® ™ € £ ¥ § ¶ • … ≤ ≥ ≠ ∞ → ←
    Indented line with tabs\tand\tspaces.   Trailing spaces.\x20\x20
Line one.
Line two.

Paragraph after a blank line.\r\nWindows line ending.
"""

_ROLES = ("system", "user", "assistant", "tool")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")

OUTPUT_WORDS = 256
"""How many pseudo-words the simulated model says. Each is trained as a whole token in four
spellings (" word", "word", " Word", "Word"): 256 words leave the vocabulary ~1000 tokens under
:data:`VOCAB_SIZE`; at 512 the budget runs out and some stop being single tokens."""


def output_words(count: int = OUTPUT_WORDS) -> tuple[str, ...]:
    """The simulated model's words (1-3 syllables from a fixed RNG: the same in every process).

    Why here: the simulators' generated text should be made of real tokens of this vocabulary
    (one token per streamed event, and the text re-tokenizes to the ids that produced it), so the
    tokenizer is trained on exactly these words.
    """
    rng = random.Random(0x5EED)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


_WORD_TEXT = """\
the of and to a in is you that it he was for on are as with his they I at be this have from
or one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him into
time has look two more write go see number no way could people my than first water been call
who oil its now find long down day did get come made may part over new sound take only little
work know place year live me back give most very after thing our just name good sentence man
think say great where help through much before line right too mean old any same tell boy follow
came want show also around form three small set put end does another well large must big even
such because turn here why ask went men read need land different home us move try kind hand
picture again change off play spell air away animal house point page letter mother answer found
study still learn should world high every near add food between own below country plant last
school father keep tree never start city earth eye light thought head under story saw left
user assistant system tool function model request response token prompt cache worker gateway
server client error value list string number object array true false null return print data
"""
_WORDS = _WORD_TEXT.split()


def _corpus() -> list[str]:
    rng = random.Random(0x70CE)  # fixed: the corpus (and so the vocabulary) never changes
    sentences = []
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice(".?!,;:") + rng.choice((" ", "\n")))
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    pseudo = " ".join(a + b for a in syllables for b in syllables[::7])
    # Repetition gives the common words enough frequency to merge into whole-word tokens.
    # Chat turns as the template writes them, so role names after <|im_start|> are whole tokens.
    turns = [f"{role}\n{s}" for role, s in zip(_ROLES * 100, sentences, strict=False)]
    lines = _CORPUS.splitlines(keepends=True) * 8
    # Each output word alone in each spelling, twice (min_frequency): whole tokens each.
    spelled = [f for w in output_words() for f in (w, f" {w}", w.title(), f" {w.title()}")] * 2
    return lines + sentences + turns + [pseudo, pseudo.title()] + spelled


def build_tokenizer() -> Tokenizer:
    """Train the sim-model's byte-level BPE (deterministic for a given ``tokenizers`` version)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TEXT_TOKENS])
    bos_id = tok.token_to_id(BOS)
    # Plain completions get a BOS (add_special_tokens=True); chats get it from the template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _files(tok: Tokenizer) -> dict[str, Any]:
    ids = {t: tok.token_to_id(t) for t in (*SPECIAL_TOKENS, *ADDED_TEXT_TOKENS)}
    added_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in (*SPECIAL_TOKENS, *ADDED_TEXT_TOKENS)
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_MODEL_LEN,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_decoder,
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
        "generation_config.json": {
            "bos_token_id": ids[BOS],
            "eos_token_id": [ids[EOS], ids[PAD]],
            "pad_token_id": ids[PAD],
        },
        "config.json": {
            "model_type": "lmgw-sim",
            "architectures": ["LmgwSimForCausalLM"],
            "max_position_embeddings": MAX_MODEL_LEN,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
        },
    }


def write_model_dir(target: Path) -> None:
    """Write the model folder's files into ``target`` (which must exist)."""
    tok = build_tokenizer()
    (target / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    for name, obj in _files(tok).items():
        text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        (target / name).write_text(text, encoding="utf-8")
    marker = {"name": SIM_MODEL_NAME, "version": BUILD_VERSION}
    (target / _MARKER).write_text(json.dumps(marker), encoding="utf-8")


def default_cache_dir() -> Path:
    """The per-user cache of lmgw: ``$XDG_CACHE_HOME/lmgw``, else ``~/.cache/lmgw``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "lmgw"


def default_model_dir() -> Path:
    """The sim-model folder in :func:`default_cache_dir`, built on first use (safe to call from
    several processes at once). Where that cache is not writable, a per-user folder under the
    system's temporary directory is used instead."""
    try:
        return ensure_model_dir(default_cache_dir())
    except OSError:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        return ensure_model_dir(Path(tempfile.gettempdir()) / f"lmgw-{uid}")


def ensure_model_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """The sim-model folder under ``cache_dir``, built on first use.

    The folder is named by :data:`BUILD_VERSION` (a changed builder never reuses a stale folder)
    and is complete once it exists: it is written into a temporary sibling and renamed into
    place, and a process that loses the race keeps the winner's copy.
    """
    root = Path(cache_dir)
    target = root / f"{SIM_MODEL_NAME}-v{BUILD_VERSION}"
    if (target / _MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SIM_MODEL_NAME}-", dir=root))
    try:
        write_model_dir(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
