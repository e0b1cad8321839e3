"""What the gateway-side tool loop costs: on requests that do not use it, and per streamed event
of a request that does.

Why: a gateway with tools (registered, entry points, MCP servers) asks every chat request
whether the loop runs (``ToolLoop.plan``). For a model without ``tool_loop`` that is a dict
lookup and a look at the ``lmgw_tool_loop`` field the request's view decode already read (no
search of the body, whatever its size); the target is well under 1 µs, a few percent of the
gateway's ~25 µs per request. A gateway without tools does not even call it. With the
loop on, every SSE event of every round goes through ``RoundStream.feed`` (decode, filter,
re-encode) on top of the tool parser's ``OutputRewriter.events``; that is paid only by requests
that run the loop.

Scenarios (ns per call, medians of 5 runs):

- ``plan, loop off``: ``plan()`` for a model without ``tool_loop``, bodies of 1 KB and 32 KB,
  next to a bare method call (``baseline``);
- ``per event``: one content event (a token) through ``OutputRewriter.events`` (the tool
  parser every tools request already pays) and through ``RoundStream.feed`` (the loop's own
  filter), and their ratio.

    .venv/bin/python benchmarks/tool_loop.py [--quick]

Writes benchmarks/results/tool_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import msgspec

from lmgw.api.openai import ChatView, _Body
from lmgw.config import GatewayConfig, ModelConfig, ToolsConfig
from lmgw.tools import get_tool_parser
from lmgw.tools.caller import ToolCaller
from lmgw.tools.loop import RoundStream, ToolLoop
from lmgw.tools.registry import make_tool
from lmgw.tools.relay import OutputRewriter

REPEATS = 5
RESULTS = Path(__file__).parent / "results" / "tool_loop.json"


def get_weather(city: str, days: int = 1) -> str:
    """The forecast."""
    return "sunny"


def body_of(size: int) -> bytes:
    text = ("the quick brown fox jumps over the lazy dog " * (size // 44 + 1))[:size]
    return msgspec.json.encode(
        {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 64}
    )


def per_call(fn, n: int) -> float:
    """Median ns per call of ``fn()`` over REPEATS runs of ``n`` calls."""
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    n = 20_000 if ap.parse_args().quick else 200_000
    cfg = GatewayConfig(models=[ModelConfig(name="m")], tools=ToolsConfig(entry_points=False))
    caller = ToolCaller(cfg.tools, {"get_weather": make_tool(get_weather)})
    loop = ToolLoop(caller, cfg, pipeline=None)
    view = ChatView(messages=[msgspec.Raw(b"{}")])  # no lmgw_tool_loop in the request
    out: dict[str, float] = {}

    class _Noop:
        def plan(self, model, body, view):
            return None

    noop = _Noop()
    out["baseline (a method call)"] = per_call(lambda: noop.plan("m", None, view), n)
    for size in (1024, 32768):
        raw = body_of(size)
        body = _Body(raw)
        out[f"plan, loop off, {size // 1024} KB body"] = per_call(
            lambda body=body: loop.plan("m", body, view), n
        )

    event = msgspec.json.encode({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None,
                     "logprobs": None}],
    })  # fmt: skip
    data = b"data: " + event + b"\n\n"
    request = {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}
    rewriter = OutputRewriter(request, get_tool_parser("hermes"), None)
    rs = RoundStream(frozenset(), {"id": "chatcmpl-1", "created": 1}, first=False)
    m = n // 4
    out["per event: OutputRewriter.events (hermes)"] = per_call(lambda: rewriter.events(data), m)
    out["per event: RoundStream.feed (the loop)"] = per_call(lambda: rs.feed(data), m)
    ratio = (
        out["per event: RoundStream.feed (the loop)"]
        / out["per event: OutputRewriter.events (hermes)"]
    )
    width = max(map(len, out))
    print(f"tool loop cost, ns per call, median of {REPEATS} (Python {platform.python_version()})")
    for k, v in out.items():
        print(f"  {k:<{width}}  {v:>8.0f}")
    print(f"  RoundStream / OutputRewriter per event: {ratio:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "ns": out,
                "roundstream_over_rewriter": ratio,
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
