"""What `lmgw bench` sends: sans-IO, seeded, deterministic request generators.

A workload hands out *sessions* by index. A session is one conversation: its first request, then
(for multi-turn chat) each next request built from the previous answer's text. Session ``i`` of a
workload depends only on the seed and ``i``, never on timing or on the order sessions are taken,
so two runs with the same seed send the same requests (up to the answers a multi-turn chat feeds
back). Bodies are encoded once, when the request is built, so the load loop only sends bytes.

Prompt text: words taken from a fixed pseudo-random corpus of common English words, one word per
requested token. Real tokenizers give about one token per such word (with its leading space); the
report counts the tokens the server says it processed (``usage``), not these estimates.
"""

from __future__ import annotations

import base64
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ..errors import DECODE_ERRORS

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
ENDPOINTS = {"chat": CHAT_PATH, "completions": COMPLETIONS_PATH}
WORKLOADS = ("synthetic", "multi-turn", "shared-prefix", "multimodal")
LENGTH_DISTS = ("fixed", "uniform", "normal", "exponential")


class WorkloadError(ValueError):
    """A workload that cannot be built (bad parameters, an unreadable or invalid dataset)."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: the path under the target's base URL and the encoded JSON body."""

    path: str
    body: bytes
    stream: bool
    session: int
    turn: int
    needs_text: bool = False
    """Whether the session needs the answer's text (multi-turn chat feeds it back)."""


class Session(Protocol):
    def first(self) -> BenchRequest: ...

    def next(self, answer: str) -> BenchRequest | None:
        """The request after a successful one whose answer text was ``answer``; None: done."""
        ...


class Workload(Protocol):
    name: str

    def session(self, index: int) -> Session: ...

    def describe(self) -> dict[str, Any]:
        """The parameters, for the report."""
        ...


# -- lengths and text ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-count distribution: ``fixed`` (always ``mean``), ``uniform`` on
    ``mean * [1 - spread, 1 + spread]``, ``normal`` (sd ``spread * mean``) or ``exponential``
    (mean ``mean``). Samples are integers >= 1."""

    mean: int
    kind: str = "fixed"
    spread: float = 0.5

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise WorkloadError(f"a length must be at least 1, got {self.mean}")
        if self.kind not in LENGTH_DISTS:
            raise WorkloadError(
                f"unknown length distribution {self.kind!r}: expected one of"
                f" {', '.join(LENGTH_DISTS)}"
            )
        if not 0.0 <= self.spread <= 1.0:
            raise WorkloadError(f"--len-spread must be in [0, 1], got {self.spread}")

    def sample(self, rng: random.Random) -> int:
        m = self.mean
        if self.kind == "fixed":
            return m
        if self.kind == "uniform":
            x = rng.uniform(m * (1 - self.spread), m * (1 + self.spread))
        elif self.kind == "normal":
            x = rng.gauss(m, self.spread * m)
        else:
            x = rng.expovariate(1.0 / m)
        return max(1, round(x))


_WORD_TEXT = """
the of and to in is was for on that with as by at from his an were are which this be or had not
first one their its new after but who have they has her two been other when there all during into
school time may years more most only over city some world would where later up such used many can
state about national out known university united then made age part well system water people light
house river story small place music name game early long group number line point order power field
market north south east west green black white red blue stone paper table window garden summer
winter morning evening night road bridge village country island ocean mountain forest valley letter
answer question reason season animal bird horse flower tree leaf seed fruit bread cheese apple
orange silver golden iron copper glass wood metal cloud rain snow wind storm fire earth planet star
moon sun sky
"""
_WORDS = tuple(_WORD_TEXT.split())


class _Corpus:
    """A fixed pseudo-random word sequence; ``words(rng, n)`` is one string slice (cheap)."""

    SIZE = 1 << 15

    def __init__(self) -> None:
        rng = random.Random(0x6C6D6777)
        words = rng.choices(_WORDS, k=self.SIZE)
        self.text = " " + " ".join(words) + " " + " ".join(words)  # doubled: no wrap-around
        offsets = [0]
        pos = 0
        for w in words + words:
            pos += 1 + len(w)
            offsets.append(pos)
        self.offsets = offsets

    def words(self, rng: random.Random, n: int) -> str:
        """``n`` words from a random place (a long text repeats the corpus)."""
        out: list[str] = []
        while n > 0:
            k = min(n, self.SIZE)
            start = rng.randrange(self.SIZE)
            out.append(self.text[self.offsets[start] + 1 : self.offsets[start + k]])
            n -= k
        return " ".join(out)


_corpus: _Corpus | None = None


def words(rng: random.Random, n: int) -> str:
    """About ``n`` tokens of English-looking text."""
    global _corpus
    if _corpus is None:
        _corpus = _Corpus()
    return _corpus.words(rng, n)


_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class SplitMix(random.Random):
    """``random.Random`` over SplitMix64: seeding costs 0.3 us instead of Mersenne Twister's
    5 us (a fresh generator per session is on the load loop's path), and consecutive seeds give
    unrelated streams. Every ``Random`` method works (they draw on ``random``/``getrandbits``).
    Not for anything secret."""

    _s: int

    def seed(self, a: Any = None, version: int = 2) -> None:
        self._s = (a if isinstance(a, int) else hash(a)) & _M64

    def getstate(self) -> Any:
        return self._s

    def setstate(self, state: Any) -> None:
        self._s = state

    def random(self) -> float:
        s = self._s = (self._s + _GOLDEN) & _M64
        z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return ((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0)

    def getrandbits(self, k: int) -> int:
        out = got = 0
        while got < k:
            s = self._s = (self._s + _GOLDEN) & _M64
            z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            out = (out << 64) | (z ^ (z >> 31))
            got += 64
        return out >> (got - k)


_TAGS = {"s": 1, "p": 2, "c": 3, "m": 4, "prefix": 5, "img": 6, "arrivals": 7}


def rng_for(seed: int, tag: str, index: int = 0) -> random.Random:
    """The generator of one session (or shared prefix, image, arrival process): a function of
    the seed, the tag and the index only."""
    return SplitMix(((seed * _GOLDEN) ^ (_TAGS[tag] << 56) ^ index) & _M64)


_rng = rng_for


# -- request bodies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What every generated body carries besides its prompt."""

    model: str
    endpoint: str = "chat"
    stream: bool = True
    ignore_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise WorkloadError(
                f"unknown endpoint {self.endpoint!r}: expected one of {', '.join(ENDPOINTS)}"
            )

    def body(self, prompt: Any, max_tokens: int) -> dict[str, Any]:
        key = "messages" if self.endpoint == "chat" else "prompt"
        body: dict[str, Any] = {"model": self.model, key: prompt, "max_tokens": max_tokens}
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra)
        return body

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]


_encode = msgspec.json.encode


class _OneShot:
    """A single-turn session."""

    __slots__ = ("_request",)

    def __init__(self, request: BenchRequest) -> None:
        self._request = request

    def first(self) -> BenchRequest:
        return self._request

    def next(self, answer: str) -> BenchRequest | None:
        return None


# -- the workloads -------------------------------------------------------------------------------


@dataclass(slots=True)
class Synthetic:
    """Independent single-turn requests; input and output lengths from distributions."""

    shape: RequestShape
    input_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    name: str = "synthetic"

    def session(self, index: int) -> Session:
        rng = _rng(self.seed, "s", index)
        text = words(rng, self.input_len.sample(rng))
        prompt: Any = [{"role": "user", "content": text}] if self.shape.endpoint == "chat" else text
        body = self.shape.body(prompt, self.output_len.sample(rng))
        return _OneShot(BenchRequest(self.shape.path, _encode(body), self.shape.stream, index, 0))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoint": self.shape.endpoint,
            "input_len": _dist(self.input_len),
            "output_len": _dist(self.output_len),
        }


@dataclass(slots=True)
class SharedPrefix:
    """Single-turn requests that start with one of ``groups`` shared prefixes of ``prefix_len``
    tokens (a system prompt for chat), then a per-request part of ``input_len`` tokens: what a
    prefix cache and cache-aware routing are for."""

    shape: RequestShape
    input_len: LengthDist
    output_len: LengthDist
    prefix_len: int = 512
    groups: int = 4
    seed: int = 0
    eager: bool = True
    name: str = "shared-prefix"
    _prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prefix_len < 1 or self.groups < 1:
            raise WorkloadError("--prefix-len and --prefix-groups must be at least 1")
        if self.eager:
            self._prefixes = [
                words(_rng(self.seed, "prefix", g), self.prefix_len) for g in range(self.groups)
            ]

    def session(self, index: int) -> Session:
        if not self._prefixes:
            self._prefixes = [
                words(_rng(self.seed, "prefix", g), self.prefix_len) for g in range(self.groups)
            ]
        rng = _rng(self.seed, "p", index)
        prefix = self._prefixes[rng.randrange(self.groups)]
        text = words(rng, self.input_len.sample(rng))
        if self.shape.endpoint == "chat":
            prompt: Any = [
                {"role": "system", "content": prefix},
                {"role": "user", "content": text},
            ]
        else:
            prompt = prefix + "\n\n" + text
        body = self.shape.body(prompt, self.output_len.sample(rng))
        return _OneShot(BenchRequest(self.shape.path, _encode(body), self.shape.stream, index, 0))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoint": self.shape.endpoint,
            "input_len": _dist(self.input_len),
            "output_len": _dist(self.output_len),
            "prefix_len": self.prefix_len,
            "prefix_groups": self.groups,
        }


class _ChatSession:
    """A multi-turn conversation: each turn adds the answer and a new user message."""

    __slots__ = ("_index", "_messages", "_out", "_owner", "_rng", "_turn")

    def __init__(self, owner: MultiTurn, index: int) -> None:
        self._owner = owner
        self._index = index
        self._rng = _rng(owner.seed, "c", index)
        self._messages: list[dict[str, Any]] = []
        self._turn = 0
        self._out = 0

    def _request(self) -> BenchRequest:
        o = self._owner
        self._messages.append(
            {"role": "user", "content": words(self._rng, o.input_len.sample(self._rng))}
        )
        body = o.shape.body(self._messages, o.output_len.sample(self._rng))
        last = self._turn + 1 >= o.turns
        return BenchRequest(
            o.shape.path, _encode(body), o.shape.stream, self._index, self._turn, not last
        )

    def first(self) -> BenchRequest:
        return self._request()

    def next(self, answer: str) -> BenchRequest | None:
        self._turn += 1
        if self._turn >= self._owner.turns:
            return None
        self._messages.append({"role": "assistant", "content": answer})
        return self._request()


@dataclass(slots=True)
class MultiTurn:
    """Chat sessions of ``turns`` turns: every turn resends the history (the real answers)
    plus a new user message, so prompts grow turn after turn as in a chat UI."""

    shape: RequestShape
    input_len: LengthDist
    output_len: LengthDist
    turns: int = 4
    seed: int = 0
    name: str = "multi-turn"

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise WorkloadError("--turns must be at least 1")
        if self.shape.endpoint != "chat":
            raise WorkloadError("the multi-turn workload needs --endpoint chat")

    def session(self, index: int) -> Session:
        return _ChatSession(self, index)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_len": _dist(self.input_len),
            "output_len": _dist(self.output_len),
            "turns": self.turns,
        }


def png_data_url(rng: random.Random, size: tuple[int, int]) -> str:
    """A small PNG (a background and a few rectangles, colours from ``rng``) as a data URL."""
    from PIL import Image, ImageDraw

    w, h = size

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = rng.randrange(x0, w + 1), rng.randrange(y0, h + 1)
        draw.rectangle((x0, y0, x1, y1), fill=colour())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(slots=True)
class Multimodal:
    """Chat requests with ``images`` generated PNG images (data URLs) and a text question.
    Images come from a pool of ``pool`` distinct ones, so an encoder cache sees repeats."""

    shape: RequestShape
    input_len: LengthDist
    output_len: LengthDist
    images: int = 1
    image_size: tuple[int, int] = (256, 256)
    pool: int = 32
    seed: int = 0
    eager: bool = True
    """Generate the image pool now (not while the load runs)."""
    name: str = "multimodal"
    _urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.shape.endpoint != "chat":
            raise WorkloadError("the multimodal workload needs --endpoint chat")
        if self.images < 1 or self.pool < 1:
            raise WorkloadError("--images and the image pool must be at least 1")
        if min(self.image_size) < 1:
            raise WorkloadError(f"bad --image-size {self.image_size}")
        if self.eager:
            self._urls = [
                png_data_url(_rng(self.seed, "img", k), self.image_size) for k in range(self.pool)
            ]

    def _image(self, k: int) -> str:
        if not self._urls:
            self._urls = [
                png_data_url(_rng(self.seed, "img", k), self.image_size) for k in range(self.pool)
            ]
        return self._urls[k]

    def session(self, index: int) -> Session:
        rng = _rng(self.seed, "m", index)
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": self._image(rng.randrange(self.pool))}}
            for _ in range(self.images)
        ]
        content.append({"type": "text", "text": words(rng, self.input_len.sample(rng))})
        body = self.shape.body([{"role": "user", "content": content}], self.output_len.sample(rng))
        return _OneShot(BenchRequest(self.shape.path, _encode(body), self.shape.stream, index, 0))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_len": _dist(self.input_len),
            "output_len": _dist(self.output_len),
            "images": self.images,
            "image_size": f"{self.image_size[0]}x{self.image_size[1]}",
            "image_pool": self.pool,
        }


@dataclass(slots=True)
class Dataset:
    """Requests from a JSONL file, one OpenAI request body per line, sent in file order (and
    again from the top when the run wants more). A body with ``messages`` goes to
    ``/v1/chat/completions``, one with ``prompt`` to ``/v1/completions``. A body without
    ``model`` gets ``model``; streaming is switched on with usage (``stream_options``) unless
    the line says ``"stream": false``. ``extra`` keys are added to every body."""

    path: str
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    name: str = "dataset"
    _requests: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkloadError(f"cannot read --dataset {self.path}: {exc}") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                self._requests.append(self._parse(line, n))
        if not self._requests:
            raise WorkloadError(f"--dataset {self.path} has no requests")

    def _parse(self, line: str, n: int) -> tuple[str, bytes, bool]:
        where = f"--dataset {self.path}, line {n}"
        try:
            body = msgspec.json.decode(line)
        except DECODE_ERRORS as exc:
            raise WorkloadError(f"{where}: not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise WorkloadError(f"{where}: expected a JSON object (an OpenAI request body)")
        if "messages" in body:
            path = CHAT_PATH
        elif "prompt" in body:
            path = COMPLETIONS_PATH
        else:
            raise WorkloadError(
                f"{where}: a request body needs 'messages' (chat) or 'prompt' (completions)"
            )
        body.update(self.extra)
        if "model" not in body:
            if not self.model:
                raise WorkloadError(f"{where}: no 'model' in the body and no --model given")
            body["model"] = self.model
        stream = body.get("stream", True) is not False
        if stream:
            body["stream"] = True
            options = body.get("stream_options")
            if not isinstance(options, dict):
                options = body["stream_options"] = {}
            options.setdefault("include_usage", True)
        return path, _encode(body), stream

    def __len__(self) -> int:
        return len(self._requests)

    def session(self, index: int) -> Session:
        path, body, stream = self._requests[index % len(self._requests)]
        return _OneShot(BenchRequest(path, body, stream, index, 0))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "requests": len(self._requests)}


def _dist(d: LengthDist) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": d.mean, "dist": d.kind}
    if d.kind in ("uniform", "normal"):
        out["spread"] = d.spread
    return out


def build_workload(
    name: str,
    shape: RequestShape,
    *,
    input_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
    turns: int = 4,
    prefix_len: int = 512,
    prefix_groups: int = 4,
    images: int = 1,
    image_size: tuple[int, int] = (256, 256),
    check_only: bool = False,
) -> Workload:
    """The named workload (see ``WORKLOADS``). ``check_only``: validate the parameters but skip
    the up-front work (shared prefixes, the image pool)."""
    if name == "synthetic":
        return Synthetic(shape, input_len, output_len, seed)
    if name == "multi-turn":
        return MultiTurn(shape, input_len, output_len, turns, seed)
    if name == "shared-prefix":
        return SharedPrefix(
            shape, input_len, output_len, prefix_len, prefix_groups, seed, eager=not check_only
        )
    if name == "multimodal":
        return Multimodal(
            shape, input_len, output_len, images, image_size, seed=seed, eager=not check_only
        )
    raise WorkloadError(f"unknown workload {name!r}: expected one of {', '.join(WORKLOADS)}")


# -- arrivals ------------------------------------------------------------------------------------


def poisson_gaps(rate: float, rng: random.Random) -> Iterator[float]:
    """Endless inter-arrival gaps (seconds) of a Poisson process of ``rate`` per second."""
    if not rate > 0 or math.isinf(rate):
        raise WorkloadError(f"--rate must be a positive number, got {rate}")
    expo = rng.expovariate
    while True:
        yield expo(rate)
