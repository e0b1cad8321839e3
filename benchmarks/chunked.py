"""Streamed-answer body decoding per SSE event: the Cython chunked decoder vs httptools vs the
pure-Python twin, and the event count (memchr vs ``bytes.count``), in one run.

Why: every token of a streamed answer is one HTTP chunk from the worker. With httptools the
upstream reader called back into Python once per chunk (a call and a list append, then a
join), and the relay scanned every byte again to count events. This measures what one socket
read of K events costs each way, through the real :class:`ResponseReader` (``feed`` +
``take_body``), for K = 1 (paced tokens: one event per read), 4 and 16 (a busy worker).

    .venv/bin/python benchmarks/chunked.py [--quick]

Prints medians of 5 runs (µs per event) with the ratios, and writes
benchmarks/results/chunked.json. Needs the built extension (``make build``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmgw._fast import chunked_py as twin
from lmgw.transport import h1client
from lmgw.transport.h1client import ResponseReader

try:
    from lmgw._fast import chunked as fast
except ImportError:
    sys.exit("lmgw._fast.chunked is not built: run `make build` first")

REPEATS = 5
GROUPS = (1, 4, 16)
RESULTS = Path(__file__).parent / "results" / "chunked.json"
EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{"content":" tok"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def per_event(fn: Callable[[], object], reads: int, k: int) -> float:
    """µs per event of ``reads`` calls of ``fn`` (each one read of ``k`` events)."""
    t0 = time.perf_counter()
    for _ in range(reads):
        fn()
    return (time.perf_counter() - t0) / (reads * k) * 1e6


def reader(fast_path: bool) -> ResponseReader:
    saved = h1client._FAST_CHUNKED
    h1client._FAST_CHUNKED = fast_path
    try:
        r = ResponseReader()
        r.feed(HEAD)
    finally:
        h1client._FAST_CHUNKED = saved
    assert (r._chunked is not None) is fast_path
    return r


def cases_for(data: bytes, body: bytes) -> dict[str, Callable[[], object]]:
    """One read's work each way; checked to give the same payload first."""
    httptools_r, fast_r, decoder = reader(False), reader(True), twin.ChunkedDecoder()

    def via(r: ResponseReader) -> Callable[[], object]:
        def step() -> object:
            r.feed(data)
            return r.take_body()

        return step

    cases: dict[str, Callable[[], object]] = {
        "decode: httptools": via(httptools_r),
        "decode: cython": via(fast_r),
        "decode: python twin": lambda: decoder.feed(data),
        "count: bytes.count": lambda: body.count(b"\n\n"),
        "count: cython": lambda: fast.count_events(body),
    }
    assert all(cases[name]() == body for name in list(cases)[:3])
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer reads per run")
    args = parser.parse_args()
    events = 40_000 if args.quick else 200_000
    rows = []
    for k in GROUPS:
        data = b"%x\r\n%b\r\n" % (len(EVENT), EVENT) * k
        body = EVENT * k
        reads = events // k
        cases = cases_for(data, body)
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(REPEATS):
            for name, fn in cases.items():
                runs[name].append(per_event(fn, reads, k))
        med = {name: statistics.median(v) for name, v in runs.items()}
        rows.append({"events_per_read": k, "us_per_event": med, "runs": runs})
        print(f"K={k:>2} events per read (µs per event, median of {REPEATS}):")
        print(
            f"  decode: httptools {med['decode: httptools']:.3f}  cython "
            f"{med['decode: cython']:.3f}  (x{med['decode: httptools'] / med['decode: cython']:.1f}"
            f" faster)  python twin {med['decode: python twin']:.3f}"
        )
        print(
            f"  count:  bytes.count {med['count: bytes.count']:.3f}  cython "
            f"{med['count: cython']:.3f}  (x{med['count: bytes.count'] / med['count: cython']:.1f})"
        )
        before = med["decode: httptools"] + med["count: bytes.count"]
        after = med["decode: cython"] + med["count: cython"]
        print(f"  per event, reader + count: {before:.3f} -> {after:.3f} µs")
    meta = {"python": platform.python_version(), "repeats": REPEATS, "events": events}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "chunked", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
