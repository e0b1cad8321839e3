"""The whole gateway inside an asyncio program: ``lmgw.aio.Gateway``.

The gateway is trio code; ``lmgw.aio`` runs it on one dedicated thread and hands requests and
stream events across (docs/sdk.md, "The asyncio bridge"). This example starts two simulated
vLLM workers as subprocesses, then shows: concurrent chats with ``asyncio.gather``, a stream,
cancelling a stream with ``asyncio.timeout`` (the worker sees the abort), adding and removing a
worker at run time, and ``lmgw.Client`` on asyncio against the same gateway served over HTTP.
Exits 0 when every step did what it says.

    .venv/bin/python examples/sdk_asyncio.py
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import lmgw
import lmgw.aio
from lmgw.simulators.fleet import worker_command

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "Why split prefill from decode?"}]


@contextlib.asynccontextmanager
async def simulated_workers(n: int, speed: float) -> AsyncIterator[list[str]]:
    """``n`` simulated workers as subprocesses; their URLs once they print READY."""
    procs = []
    try:
        urls = []
        for _ in range(n):
            cmd = worker_command("pd", model=MODEL, speed=speed)
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line.startswith(b"READY "):
                raise RuntimeError(f"a worker failed to start: {line!r}")
            urls.append(line.split()[1].decode())
        yield urls
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def main() -> int:
    # speed 20: about 0.5 ms per token, so a long stream is still running when we cancel it
    async with simulated_workers(2, speed=20) as urls:
        changes: list[str] = []
        async with lmgw.aio.Gateway(
            workers=urls, on_worker_change=[lambda w: changes.append(f"{w['id']}:{w['state']}")]
        ) as gw:
            print(f"gateway up: {[w['state'] for w in gw.workers]}")

            print("\n== 8 chats at once ==")
            results = await asyncio.gather(
                *(gw.chat(model=MODEL, messages=MESSAGES, max_tokens=8) for _ in range(8))
            )
            print(f"   {len(results)} answers, first: {results[0].text!r}")
            assert all(r.text == results[0].text for r in results)  # deterministic simulator

            print("\n== a stream ==")
            print("   ", end="")
            async for event in gw.chat_stream(model=MODEL, messages=MESSAGES, max_tokens=12):
                if isinstance(event, lmgw.ContentDelta):
                    print(event.text, end="", flush=True)
            print()

            print("\n== cancelling a stream from asyncio ==")
            received = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    async for _ in gw.chat_stream(
                        model=MODEL, messages=MESSAGES, max_tokens=5000, ignore_eos=True
                    ):
                        received += 1
            print(f"   stopped after {received} events")
            for _ in range(200):  # the abort reaches the worker on the trio thread
                if all(w["in_flight"] == 0 for w in gw.workers):
                    break
                await asyncio.sleep(0.01)
            assert all(w["in_flight"] == 0 for w in gw.workers), gw.workers
            print("   nothing in flight any more")

            print("\n== fleet changes at run time ==")
            extra = await gw.add_worker(urls[0], id="same-worker-again")
            print(f"   added {extra['id']} ({extra['state']})")
            removed = await gw.remove_worker("same-worker-again", grace_s=1.0)
            print(f"   removed it ({removed['state']})")

            print("\n== lmgw.Client on asyncio, against the same gateway over HTTP ==")
            port = await gw.serve(port=0)
            async with lmgw.Client(f"http://127.0.0.1:{port}") as client:
                over_http = await client.chat(model=MODEL, messages=MESSAGES, max_tokens=8)
                print(f"   {over_http.text!r}")
                assert over_http.text == results[0].text
                try:
                    await client.chat(model=MODEL, messages=MESSAGES, temperature="hot")
                    return 1
                except lmgw.BadRequest as exc:
                    print(f"   BadRequest ({exc.param}): {exc.message[:60]}...")

        await asyncio.sleep(0)  # let the last worker-change callbacks run
        print(f"\nworker changes seen by the hook: {changes}")
        assert "same-worker-again:gone" in changes
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
