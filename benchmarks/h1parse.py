"""Whole small HTTP/1.1 messages in one call: the Cython parser vs httptools vs the pure-Python
twin, for a typical request and a typical response.

Why: nearly every request to the gateway, and every non-streamed answer from a worker, is small
and arrives whole in one read, yet httptools calls back into Python about ten times for it (the
URL, each header, the head's end, the body, the message's end). `lmgw._fast.h1parse` takes such
a message in one call. This measures one message each way: httptools through the real
:class:`H1Connection` (``receive_data`` + ``next_event`` on a kept-alive connection) and
:class:`ResponseReader` (``reset`` + ``feed`` + ``take_body``), against ``parse_request`` /
``parse_response`` of the twin and of the extension (which return the parts, not a
:class:`Request`).

    .venv/bin/python benchmarks/h1parse.py [--quick]

Prints medians of 5 runs (µs per message) with the ratios, and writes
benchmarks/results/h1parse.json. Needs the built extension (``make build``).
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

from lmgw._fast import h1parse_py as twin
from lmgw.http.h1 import H1Connection
from lmgw.transport.h1client import ResponseReader

try:
    from lmgw._fast import h1parse as fast
except ImportError:
    sys.exit("lmgw._fast.h1parse is not built: run `make build` first")

REPEATS = 5
RESULTS = Path(__file__).parent / "results" / "h1parse.json"
MAX_HEAD, MAX_BODY = 65536, 32 << 20

# an OpenAI-style chat request (3 headers) and a uvicorn answer to it (5 headers)
REQUEST_BODY = (
    b'{"model":"bench-model","messages":[{"role":"system","content":"You are a helpful '
    b'assistant."},{"role":"user","content":"Write one short sentence about the sea, '
    b'please."}],"max_tokens":64,"temperature":0.7,"stream":false}'
)
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"host: 127.0.0.1:8000\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"\r\n%b" % (len(REQUEST_BODY), REQUEST_BODY)
)
RESPONSE_BODY = (
    b'{"id":"chatcmpl-42","object":"chat.completion","created":1700000000,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"The sea is wide."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":6}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    b"server: uvicorn\r\n"
    b"content-length: %d\r\n"
    b"content-type: application/json\r\n"
    b"x-request-id: 5f0c6a1e-2b7d-4c1a-9e3f-8d2b6a4c0e11\r\n"
    b"\r\n%b" % (len(RESPONSE_BODY), RESPONSE_BODY)
)


def per_call(fn: Callable[[], object], calls: int) -> float:
    """µs per call of ``calls`` calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def request_cases() -> dict[str, Callable[[], object]]:
    """One request's work each way; checked to give the same request first."""
    conn = H1Connection(MAX_HEAD, MAX_BODY)

    def via_httptools() -> object:
        conn.receive_data(REQUEST)
        return conn.next_event()

    cases: dict[str, Callable[[], object]] = {
        "httptools": via_httptools,
        "python twin": lambda: twin.parse_request(REQUEST, MAX_HEAD, MAX_BODY),
        "cython": lambda: fast.parse_request(REQUEST, MAX_HEAD, MAX_BODY),
    }
    req = via_httptools()
    parts = fast.parse_request(REQUEST, MAX_HEAD, MAX_BODY)
    assert parts is not None and parts == cases["python twin"]()
    assert (req.method, req.path, req.headers, req.body) == (
        parts[0],
        parts[1].decode(),
        parts[2],
        parts[3],
    )
    return cases


def response_cases() -> dict[str, Callable[[], object]]:
    """One response's work each way; checked to give the same response first."""
    reader = ResponseReader()

    def via_httptools() -> object:
        reader.reset()
        reader.feed(RESPONSE)
        return reader.take_body()

    cases: dict[str, Callable[[], object]] = {
        "httptools": via_httptools,
        "python twin": lambda: twin.parse_response(RESPONSE),
        "cython": lambda: fast.parse_response(RESPONSE),
    }
    body = via_httptools()
    parts = fast.parse_response(RESPONSE)
    assert parts is not None and parts == cases["python twin"]()
    assert (reader.status, reader.headers, reader.content_type, body) == (
        parts[0],
        parts[1],
        parts[2],
        parts[4],
    )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per run")
    args = parser.parse_args()
    calls = 20_000 if args.quick else 200_000
    rows = []
    print(f"µs per message, median of {REPEATS} runs of {calls} calls")
    print(
        f"{'message':<10}{'bytes':>6}{'httptools':>11}{'twin':>8}{'cython':>8}"
        f"{'cython vs twin':>16}{'cython vs httptools':>21}"
    )
    for name, data, cases in (
        ("request", REQUEST, request_cases()),
        ("response", RESPONSE, response_cases()),
    ):
        runs: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(REPEATS):
            for case, fn in cases.items():
                runs[case].append(per_call(fn, calls))
        med = {case: statistics.median(v) for case, v in runs.items()}
        vs_twin = med["python twin"] / med["cython"]
        vs_httptools = med["httptools"] / med["cython"]
        rows.append(
            {
                "message": name,
                "bytes": len(data),
                "us_per_message": med,
                "cython_speedup_vs_twin": vs_twin,
                "cython_speedup_vs_httptools": vs_httptools,
                "runs": runs,
            }
        )
        print(
            f"{name:<10}{len(data):>6}{med['httptools']:>11.3f}{med['python twin']:>8.3f}"
            f"{med['cython']:>8.3f}{f'x{vs_twin:.1f}':>16}{f'x{vs_httptools:.1f}':>21}"
        )
    meta = {"python": platform.python_version(), "repeats": REPEATS, "calls": calls}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "h1parse", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
