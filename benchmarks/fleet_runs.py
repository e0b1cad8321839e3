"""What the fleet benchmarks share (hedging.py, lora_affinity.py, placement.py): a gateway
process in front of a simulated fleet, a bare HTTP call, medians over rounds."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from lmgw.config import GatewayConfig, dump_config
from lmgw.simulators.fleet import Fleet

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "sim-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body with chunked framing removed)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    async with stream:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
            f"content-type: application/json\r\n{extra}connection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    return status, payload


async def reset_workers(fleet: Fleet) -> None:
    """Counters, caches and faults back to their start (``POST /sim/reset``)."""
    for m in fleet.members:
        status, _ = await http(m.url, "POST", "/sim/reset")
        assert status == 200


async def worker_requests(fleet: Fleet) -> int:
    """Generation requests the workers received (``/sim/stats``), summed."""
    total = 0
    for m in fleet.members:
        total += json.loads((await http(m.url, "GET", "/sim/stats"))[1])["requests_total"]
    return total


async def start_gateway(
    name: str,
    flags: Sequence[str],
    fleet: Fleet,
    log_dir: Path,
    env_extra: Mapping[str, str] | None = None,
    model: str = MODEL,
    config: Callable[[int], GatewayConfig] | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[trio.Process, str]:
    """``lmgw serve`` in front of ``fleet`` (merged workers) with ``flags``, or with the
    configuration ``config(port)`` (written to ``log_dir/<name>.toml``), once it answers a
    chat (sent with ``headers``: an API key); (process, URL). Its output goes to
    ``log_dir/<name>.log``. No PR_SET_PDEATHSIG: trio forks from a worker thread, whose
    retirement (idle 10 s) would kill the child."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", "import sys; from lmgw.cli import main; sys.exit(main())"]
    if config is not None:
        path = log_dir / f"{name}.toml"
        path.write_text(dump_config(config(port)))
        argv += ["serve", "--config", str(path), *flags]
    else:
        argv += ["serve", "--host", "127.0.0.1", "--port", str(port)]
        for m in fleet.members:
            argv += ["--worker", f"pd={m.url}"]
        argv += ["--log-level", "warning", "--open", *flags]
    env = {**os.environ, **(env_extra or {})}
    logf = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True
    )
    logf.close()
    url = f"http://127.0.0.1:{port}"
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()
    with trio.fail_after(60):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_dir}")
            try:
                if (await http(url, "POST", "/v1/chat/completions", body, headers))[0] == 200:
                    return proc, url
            except OSError:
                pass
            await trio.sleep(0.2)


def med(runs: list[dict[str, Any]], *path: str) -> float | None:
    """The median over ``runs`` of the number at ``path`` (None when no run has one)."""
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(float(v))
    return statistics.median(values) if values else None


def result(name: str, args: Any, **fields: Any) -> dict[str, Any]:
    """A benchmark's JSON result: what ran where and with which arguments, then ``fields``."""
    import datetime
    import platform

    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        **fields,
    }


def save(name: str, data: dict[str, Any]) -> None:
    """Print the table and write ``results/<name>.json``."""
    print()
    print(data["table"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
