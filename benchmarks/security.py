"""What the security controls cost per request, in process (no sockets): the API-key check
(hash, lookup, buckets) and the body bounds of ``limits.*``, side by side with what a request
costs without them.

Why: every request pays these, so they must stay a small fraction of the ~25-50 us of CPU the
gateway spends per request (DESIGN.md §3). Measured:

* ``decode_view`` of a typical chat body: msgspec's view decode alone vs with the body bounds
  (depth, messages, parts, n, stop, ...), and a long 200-message conversation (the path where
  the bracket count exceeds the depth limit and the depth is computed);
* the key check: ``Guarded`` in front of a no-op App vs the bare App (header scan, SHA-256,
  dict lookup, rate bucket, concurrency counter, release).

    .venv/bin/python benchmarks/security.py [--quick]

Prints medians of 5 runs (ns per call) and writes benchmarks/results/security.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from lmgw.api.keys import ApiKeys, AuthMetrics, Guarded
from lmgw.api.limits import RequestLimits
from lmgw.api.openai import _decoders, decode_view
from lmgw.config import ApiKeyConfig, AuthConfig
from lmgw.http.types import Request
from lmgw.metrics import Metrics

REPEATS = 5
RESULTS = Path(__file__).parent / "results" / "security.json"
KEY = "sk-bench-0123456789abcdef0123456789abcdef"

CHAT = msgspec.json.encode(
    {
        "model": "llama",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant." * 4},
            {"role": "user", "content": "Tell me about the sea. " * 20},
        ],
        "max_tokens": 256,
        "temperature": 0.7,
        "stream": True,
    }
)
LONG = msgspec.json.encode(
    {
        "model": "llama",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"turn {i}"}]} for i in range(200)
        ],
    }
)


def per_call(fn: Callable[[], object], n: int) -> float:
    """Median ns per call over REPEATS runs of n calls."""
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


class _Responder:
    started = False

    async def send_full(self, status: int, headers: list, body: bytes) -> None:
        pass


async def _noop_app(req: Request, responder: object) -> None:
    pass


def _drive(handler: Callable, req: Request, responder: object) -> None:
    coro = handler(req, responder)
    try:
        coro.send(None)
    except StopIteration:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 20_000 if args.quick else 200_000
    limits = RequestLimits()
    chat_decoder = _decoders["chat"]
    results: dict[str, float] = {}
    results["chat view decode only"] = per_call(lambda: chat_decoder.decode(CHAT), n)
    results["chat decode_view with limits"] = per_call(lambda: decode_view("chat", CHAT, limits), n)
    results["200-message chat decode only"] = per_call(lambda: chat_decoder.decode(LONG), n // 20)
    results["200-message chat decode_view with limits"] = per_call(
        lambda: decode_view("chat", LONG, limits), n // 20
    )

    keys = ApiKeys(
        AuthConfig(keys=[ApiKeyConfig(key=KEY, requests_per_s=1e9, max_concurrent=10**6)]),
        AuthMetrics(Metrics()),
    )
    guarded = Guarded(_noop_app, keys)  # type: ignore[arg-type]
    headers = [(b"host", b"x"), (b"content-type", b"application/json"),
               (b"authorization", b"Bearer " + KEY.encode())]  # fmt: skip
    req = Request("POST", "/v1/chat/completions", "", headers, CHAT)
    responder = _Responder()
    results["bare app call"] = per_call(lambda: _drive(_noop_app, req, responder), n)
    results["app behind the key check"] = per_call(lambda: _drive(guarded, req, responder), n)

    limit_cost = results["chat decode_view with limits"] - results["chat view decode only"]
    key_cost = results["app behind the key check"] - results["bare app call"]
    print(f"{'case':45} {'ns/call':>10}")
    for name, ns in results.items():
        print(f"{name:45} {ns:10.0f}")
    print(f"\nbody bounds add {limit_cost:.0f} ns to a chat request's decode")
    print(f"the API-key check adds {key_cost:.0f} ns per request")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "ns_per_call": results,
                "limits_added_ns": limit_cost,
                "key_check_added_ns": key_cost,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
