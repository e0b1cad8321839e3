"""``lmgw.Client`` against a running gateway: the OpenAI endpoints, streams, typed errors and the
admin API, on asyncio or trio (the client is anyio code: the same object runs on both).

Self-contained: starts two simulated vLLM workers and ``lmgw serve`` in front of them as
subprocesses (the gateway with an admin token), talks to the gateway, stops everything. Exits 0
when every step did what it says.

    .venv/bin/python examples/sdk_client.py [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

import lmgw
from lmgw.simulators.fleet import worker_command

MODEL = "sim-model"
ADMIN_TOKEN = "example-admin-token"
MESSAGES = [{"role": "user", "content": "Name three parts of a gateway."}]


async def first_line(stream: anyio.abc.ByteReceiveStream, pattern: bytes) -> bytes:
    """Read ``stream`` until a line matches ``pattern``; return that line."""
    buf = b""
    while True:
        chunk = await stream.receive(4096)
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            if re.search(pattern, line):
                return line


@asynccontextmanager
async def started(cmd: list[str], ready: bytes, *, on_stderr: bool = False) -> AsyncIterator[str]:
    """A subprocess, and the URL in the first output line that matches ``ready``."""
    async with await anyio.open_process(cmd, stdin=subprocess.DEVNULL) as proc:
        try:
            stream = proc.stderr if on_stderr else proc.stdout
            assert stream is not None
            with anyio.fail_after(60):
                line = await first_line(stream, ready)
            match = re.search(rb"http://[\w.\-\[\]:]+", line)
            assert match, line
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, stream)  # a full pipe must never block the child
                yield match.group().decode()
                tg.cancel_scope.cancel()
        finally:
            proc.terminate()
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def drain(stream: anyio.abc.ByteReceiveStream) -> None:
    async for _ in stream:
        pass


async def main() -> int:
    sim = [*worker_command("pd", model=MODEL, speed=50)]
    async with started(sim, rb"^READY ") as w1, started(sim, rb"^READY ") as w2:
        gateway_cmd = [sys.executable, "-m", "lmgw.cli", "serve", "--port", "0"]
        gateway_cmd += ["--worker", f"pd={w1}", "--worker", f"pd={w2}"]
        gateway_cmd += ["--admin-token", ADMIN_TOKEN]
        async with started(gateway_cmd, rb"listening on", on_stderr=True) as url:
            print(f"gateway at {url}, workers {w1} {w2}")
            async with lmgw.Client(url, admin_token=ADMIN_TOKEN, timeout=30) as client:
                print("\n== models ==")
                print("  ", [m.id for m in await client.models()])

                print("\n== chat ==")
                result = await client.chat(model=MODEL, messages=MESSAGES, max_tokens=12)
                print(f"   {result.text!r}")
                print(f"   finish={result.choices[0].finish_reason} usage={result.usage}")

                print("\n== streamed chat ==")
                print("   ", end="")
                text = []
                async for event in client.chat_stream(
                    model=MODEL, messages=MESSAGES, max_tokens=12
                ):
                    if isinstance(event, lmgw.ContentDelta):
                        text.append(event.text)
                        print(event.text, end="", flush=True)
                    elif isinstance(event, lmgw.Finish):
                        print(f"  [{event.reason}]")
                assert "".join(text) == result.text

                print("\n== completion and tokenize ==")
                completion = await client.complete(model=MODEL, prompt="In short,", max_tokens=6)
                tokens = await client.tokenize(model=MODEL, prompt="In short,")
                print(f"   {completion.text!r}; the prompt is {tokens.count} tokens")

                print("\n== typed errors ==")
                try:
                    await client.chat(model=MODEL, messages=MESSAGES, max_tokens=-1)
                    return 1
                except lmgw.BadRequest as exc:
                    print(f"   BadRequest on {exc.param}: {exc.message[:70]}")
                async with lmgw.Client(url, admin_token="wrong") as intruder:
                    try:
                        await intruder.workers()
                        return 1
                    except lmgw.AuthenticationError as exc:
                        print(f"   AuthenticationError: {exc.message[:70]}")

                print("\n== admin: drain, remove, add back ==")
                workers = await client.workers()
                print("  ", [(w["id"], w["state"]) for w in workers])
                first = workers[0]["id"]
                print("   drain:", (await client.drain_worker(first))["state"])
                print("   remove:", (await client.remove_worker(first, grace_s=2))["state"])
                back = await client.add_worker(first, "pd")
                print("   add:", back["id"], back["state"])
                for _ in range(100):  # the gateway probes a new worker at once
                    if (await client.worker(first))["state"] == "healthy":
                        break
                    await anyio.sleep(0.02)
                assert (await client.worker(first))["state"] == "healthy"
                print(f"\n{client!r}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    sys.exit(anyio.run(main, backend=parser.parse_args().backend))
