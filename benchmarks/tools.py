"""Tool-call parser cost per streamed chunk: plain content passing through each parser, and
streams that hold tool calls.

Why: once a model has a ``tool_parser``, every SSE chunk of every chat answer that offers tools
goes through ``ToolStream.feed``, most of them plain content. The target is at most 2 µs per
plain chunk (a fraction of the ~10 µs the relay spends per SSE event), so turning tools on costs
the gateway next to nothing until a call actually appears.

Scenarios, per parser (``lmgw.tools.TOOL_PARSERS``):

- ``plain``: 256 word-sized chunks of ordinary text (what the simulator says), no marker
  characters: the fast path;
- ``plain+<``: the same with an HTML-ish ``<b>`` every 16 chunks, so the parser has to look and
  hold (the slow path that still finds no call);
- ``calls``: one sentence of content, then two calls in the format (nested JSON arguments),
  cut into 1-6 character chunks like tokens;
- ``extract``: the same ``calls`` text parsed whole (the non-streamed answer), per call made.

Also the ``<think>`` reasoning split on plain chunks, and a bare ``[{"content": chunk}]`` per
chunk (``baseline``), the least any per-chunk delta can cost.

    .venv/bin/python benchmarks/tools.py [--quick]

Prints medians of 5 runs (ns per chunk) and writes benchmarks/results/tools.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmgw.tools import TOOL_PARSERS, ReasoningParser, get_tool_parser

REPEATS = 5
TARGET_NS = 2000
RESULTS = Path(__file__).parent / "results" / "tools.json"
# fmt: off
WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "was", "for", "on", "are", "as",
    "with", "they", "at", "be", "this", "have", "from", "or", "one", "word", "but", "not", "what",
    "all", "were", "when", "your", "can", "said", "there", "use", "each", "which", "she", "how",
    "their", "will", "up", "other", "about", "out", "many", "then", "them", "these", "some",
    "her", "would", "make", "like", "him", "into", "time", "has", "look", "more",
)
# fmt: on
CALLS = [
    ("get_weather", {"city": "San Francisco", "days": 3, "units": ["c", "f"], "hourly": True}),
    ("search", {"query": "trio nurseries", "filters": {"lang": "en", "year": 2024}, "k": 5}),
]


def plain_chunks(n: int, seed: int, html_every: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        if html_every and i % html_every == html_every - 1:
            w = "<b>" + w + "</b>"
        out.append((" " if i else "") + w + ("." if rng.random() < 0.08 else ""))
    return out


def token_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i : i + k])
        i += k
    return out


def ns_per_chunk(make: Callable[[], object], streams: list[list[str]]) -> float:
    """Feed every stream through a fresh parser stream (creation and finish() included)."""
    chunks = sum(map(len, streams))
    start = time.perf_counter_ns()
    for chunks_of_one in streams:
        s = make()
        feed = s.feed  # type: ignore[attr-defined]
        for c in chunks_of_one:
            feed(c)
        s.finish()  # type: ignore[attr-defined]
    return (time.perf_counter_ns() - start) / chunks


def baseline(streams: list[list[str]]) -> float:
    chunks = sum(map(len, streams))
    start = time.perf_counter_ns()
    for chunks_of_one in streams:
        for c in chunks_of_one:
            [{"content": c}]  # noqa: B018 - the cost being measured
    return (time.perf_counter_ns() - start) / chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams per run")
    args = parser.parse_args()
    n_streams = 40 if args.quick else 400

    plain = [plain_chunks(256, seed) for seed in range(n_streams)]
    htmlish = [plain_chunks(256, seed, html_every=16) for seed in range(n_streams)]
    texts = {
        name: "Let me look that up for you. " + cls.render(CALLS)
        if name not in ("llama3_json", "pythonic")
        else cls.render(CALLS)
        for name, cls in TOOL_PARSERS.items()
    }
    calls = {name: [token_chunks(t, s) for s in range(n_streams)] for name, t in texts.items()}
    parsers = {name: get_tool_parser(name) for name in TOOL_PARSERS}
    for name, p in parsers.items():  # the streams must really find the calls
        assert len(p.extract(texts[name])[1]) == len(CALLS), name

    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(REPEATS):  # interleaved, so drift hits every configuration alike
        runs.setdefault(("baseline", "plain"), []).append(baseline(plain))
        think = ReasoningParser()
        runs.setdefault(("reasoning", "plain"), []).append(ns_per_chunk(think.stream, plain))
        for name, p in parsers.items():
            make = p.stream
            runs.setdefault((name, "plain"), []).append(ns_per_chunk(make, plain))
            runs.setdefault((name, "plain+<"), []).append(ns_per_chunk(make, htmlish))
            runs.setdefault((name, "calls"), []).append(ns_per_chunk(make, calls[name]))
            text = texts[name]
            k = max(1, n_streams // 4)
            start = time.perf_counter_ns()
            for _ in range(k):
                p.extract(text)
            runs.setdefault((name, "extract"), []).append(
                (time.perf_counter_ns() - start) / k / len(CALLS)
            )

    med = {cfg: statistics.median(v) for cfg, v in runs.items()}
    print(
        f"tool parsers, ns per streamed chunk (extract: ns per call), median of {REPEATS} runs, "
        f"python {platform.python_version()}"
    )
    print(f"baseline [{{'content': chunk}}]: {med[('baseline', 'plain')]:.0f} ns; "
          f"<think> split, plain: {med[('reasoning', 'plain')]:.0f} ns")  # fmt: skip
    header = f"{'parser':<12} {'plain':>8} {'plain+<':>9} {'calls':>8} {'extract':>9}  target"
    print(header)
    rows = []
    ok = True
    for name in TOOL_PARSERS:
        p_ns, h_ns, c_ns, e_ns = (med[(name, s)] for s in ("plain", "plain+<", "calls", "extract"))
        verdict = "ok" if p_ns <= TARGET_NS else "OVER"
        ok &= p_ns <= TARGET_NS
        print(f"{name:<12} {p_ns:>8.0f} {h_ns:>9.0f} {c_ns:>8.0f} {e_ns:>9.0f}  {verdict}")
        rows.append(
            {
                "parser": name,
                "median_ns_per_chunk": {"plain": p_ns, "plain+<": h_ns, "calls": c_ns},
                "median_ns_extract_per_call": e_ns,
                "chunks_per_calls_stream": statistics.mean(map(len, calls[name])),
                "plain_within_target": p_ns <= TARGET_NS,
                "runs": {s: runs[(name, s)] for s in ("plain", "plain+<", "calls", "extract")},
            }
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeats": REPEATS,
        "streams_per_run": n_streams,
        "chunks_per_plain_stream": 256,
        "target_ns_per_plain_chunk": TARGET_NS,
        "quick": args.quick,
        "baseline_ns": med[("baseline", "plain")],
        "reasoning_plain_ns": med[("reasoning", "plain")],
    }
    RESULTS.write_text(json.dumps({"benchmark": "tools", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
