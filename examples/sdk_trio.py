"""The whole gateway inside a trio program: ``lmgw.Gateway``, no HTTP hop.

Starts two simulated vLLM workers in this process (``lmgw.simulators``), then a gateway in front
of them with a custom routing policy, a middleware and lifecycle hooks, and shows: a chat, a
streamed chat printed as it arrives, a completion, a typed error, draining a worker, and the
same gateway served over HTTP to ``lmgw.Client``. Exits 0 when every step did what it says.

    .venv/bin/python examples/sdk_trio.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

import lmgw
from lmgw.simulators import WorkerOptions, serve_worker_inprocess

MODEL = "sim-model"


class FewestRequests(lmgw.Policy):
    """A custom policy: the worker that has served the fewest requests so far."""

    name = "fewest_requests"

    def choose(self, candidates: Sequence[Any], ctx: lmgw.RouteContext) -> Any:
        return min(candidates, key=lambda w: w.total_requests)


async def timing(request: Any, responder: Any, call_next: Any) -> None:
    """A middleware: time every generation request (in-process and over HTTP alike)."""
    t0 = time.perf_counter()
    try:
        await call_next(request, responder)
    finally:
        print(f"   [middleware] {request.path} took {1000 * (time.perf_counter() - t0):.1f} ms")


async def main() -> int:
    async with trio.open_nursery() as nursery:
        # two simulated workers (speed 100: a 7-8B model's timings, 100x faster)
        urls = [
            await nursery.start(serve_worker_inprocess, WorkerOptions(model=MODEL, speed=100))
            for _ in range(2)
        ]
        changes: list[str] = []

        async def started(gw: lmgw.Gateway) -> None:
            print(f"gateway up with {len(gw.workers)} workers")

        async with lmgw.Gateway(
            workers=[{"url": url, "id": f"w{i}"} for i, url in enumerate(urls)],
            policies=FewestRequests(),
            middleware=[timing],
            on_startup=[started],
            on_worker_change=[lambda w: changes.append(f"{w['id']}:{w['state']}")],
        ) as gw:
            messages = [{"role": "user", "content": "What does a gateway do?"}]

            print("\n== chat ==")
            result = await gw.chat(model=MODEL, messages=messages, max_tokens=16)
            print(f"   {result.text!r}  ({result.usage.completion_tokens} tokens)")

            print("\n== streamed chat ==")
            print("   ", end="")
            pieces = []
            async for event in gw.chat_stream(
                model=MODEL,
                messages=messages,
                max_tokens=16,
                stream_options={"include_usage": True},
            ):
                if isinstance(event, lmgw.ContentDelta):
                    pieces.append(event.text)
                    print(event.text, end="", flush=True)
                elif isinstance(event, lmgw.Finish):
                    print(f"  [finish: {event.reason}]")
                elif isinstance(event, lmgw.UsageEvent):
                    print(f"   usage: {event.usage.total_tokens} tokens")
            assert "".join(pieces) == result.text, "a stream says what the whole answer says"

            print("\n== completion ==")
            completion = await gw.complete(model=MODEL, prompt="Once upon a time", max_tokens=8)
            print(f"   {completion.text!r}")

            print("\n== a typed error ==")
            try:
                await gw.chat(model="no-such-model", messages=messages)
                return 1
            except lmgw.NotFound as exc:
                print(f"   NotFound: {exc.message} (param {exc.param})")

            print("\n== fleet: drain w0, everything goes to w1 ==")
            await gw.drain("w0")
            before = {w["id"]: w["total_requests"] for w in gw.workers}
            for _ in range(3):
                await gw.chat(model=MODEL, messages=messages, max_tokens=2)
            after = {w["id"]: w["total_requests"] for w in gw.workers}
            print(f"   requests served: {before} -> {after}")
            assert after["w0"] == before["w0"] and after["w1"] == before["w1"] + 3
            await gw.undrain("w0")

            print("\n== the same gateway over HTTP ==")
            await gw.serve(port=0)
            async with lmgw.Client(gw.url) as client:
                models = await client.models()
                over_http = await client.chat(model=MODEL, messages=messages, max_tokens=16)
                print(f"   {gw.url}: models {[m.id for m in models]}, {over_http.text!r}")
                assert over_http.text == result.text

            print(f"\nworker changes seen by the hook: {changes}")
        nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
