"""Gateway memory after bursts of large bodies: the heap trim on (default) against off.

Why: glibc keeps the pages a burst of large request bodies or answers used inside its heap,
so without ``limits.trim_heap_after_bytes`` a gateway's RSS stays hundreds of MB above what
Python holds (docs/operations.md, "Memory under large uploads"). This runs, against one
simulated worker and in the same run for both settings (alternating rounds):

* ``uploads``: N concurrent chat requests of 30 MB each (``max_tokens`` 1);
* ``answers``: N concurrent ``/v1/embeddings`` requests of 2,048 inputs (~11 MB answers);

and reports the gateway's RSS before, at the peak, and 1.5 s after each burst (the trim
waits 1 s for a burst to end), as a table and as JSON.

    .venv/bin/python benchmarks/memory.py [--rounds 2] [--uploads 40] [--answers 30]

Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-model"
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def start_worker() -> tuple[subprocess.Popen[bytes], str]:
    argv = [sys.executable, "-m", "lmgw.simulators", "--role", "pd", "--port", "0",
            "--model", MODEL, "--speed", "inf", "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(b"READY "):
            return proc, line.split()[1].decode()
    raise RuntimeError("the simulated worker printed no READY line")


def start_gateway(worker: str, trim: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, LMGW_API_KEYS="")
    if not trim:
        env["LMGW_LIMITS_TRIM_HEAP_AFTER_BYTES"] = "0"
    argv = [str(REPO / ".venv" / "bin" / "lmgw"), "serve", "--host", "127.0.0.1",
            "--port", str(port), "--worker", f"pd={worker}", "--model", MODEL,
            "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if post(port, "/v1/chat/completions", small_chat())[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the gateway did not answer within 30 s")


def small_chat() -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()


def post(port: int, path: str, body: bytes) -> tuple[int, int]:
    """(status, answer bytes) of one request on its own connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        s.sendall(head.encode() + body)
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
    status = int(data[9:12]) if data[:5] == b"HTTP/" else 0
    return status, len(data)


def burst(pid: int, port: int, path: str, body: bytes, n: int) -> dict[str, Any]:
    statuses: list[int] = []

    def one() -> None:
        statuses.append(post(port, path, body)[0])

    before = rss_kb(pid)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_kb(pid))
        time.sleep(0.02)
    time.sleep(1.5)
    return {
        "before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "after_mb": rss_kb(pid) / 1024,
        "ok": sum(1 for s in statuses if s == 200),
        "n": n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--uploads", type=int, default=40, help="concurrent 30 MB uploads")
    ap.add_argument("--answers", type=int, default=30, help="concurrent ~11 MB answers")
    args = ap.parse_args()
    # the 30 MB go in a member the worker ignores: the gateway holds and forwards them, and the
    # simulator does not spend seconds tokenizing a prompt it would refuse as too long anyway
    hi = [{"role": "user", "content": "hi"}]
    upload = json.dumps(
        {"model": MODEL, "max_tokens": 1, "messages": hi, "x_upload": "x" * 30_000_000}
    ).encode()
    embed = json.dumps({"model": MODEL, "input": [f"hello world {i}" for i in range(2048)]})
    scenarios = {
        "uploads": ("/v1/chat/completions", upload, args.uploads),
        "answers": ("/v1/embeddings", embed.encode(), args.answers),
    }
    worker, url = start_worker()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"on": {}, "off": {}}
    try:
        for r in range(args.rounds):
            for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
                for name, (path, body, n) in scenarios.items():  # a fresh gateway for each
                    gw, port = start_gateway(url, setting == "on")
                    try:
                        res = burst(gw.pid, port, path, body, n)
                    finally:
                        gw.terminate()
                        gw.wait(10)
                    runs[setting].setdefault(name, []).append(res)
                    print(f"round {r + 1} trim {setting:3} {name:8} before"
                          f" {res['before_mb']:6.0f} MB  peak {res['peak_mb']:6.0f} MB"
                          f"  after {res['after_mb']:6.0f} MB  ok {res['ok']}/{n}",
                          flush=True)  # fmt: skip
    finally:
        worker.terminate()
        worker.wait(10)
    print("\nmedians over rounds (RSS of the gateway, MB):")
    print(f"{'burst':8} | {'trim on: peak':>13} | {'after':>6} | {'trim off: peak':>14} |"
          f" {'after':>6} | after on/off")  # fmt: skip
    summary: dict[str, Any] = {}
    for name in scenarios:
        med = {
            s: {k: statistics.median(x[k] for x in runs[s][name]) for k in ("peak_mb", "after_mb")}
            for s in ("on", "off")
        }
        ratio = med["on"]["after_mb"] / med["off"]["after_mb"]
        summary[name] = {**{f"{s}_{k}": v for s in med for k, v in med[s].items()},
                         "after_ratio": ratio}  # fmt: skip
        print(
            f"{name:8} | {med['on']['peak_mb']:13.0f} | {med['on']['after_mb']:6.0f} |"
            f" {med['off']['peak_mb']:14.0f} | {med['off']['after_mb']:6.0f} | {ratio:.2f}x"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "memory.json"
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
