"""`lmgw bench` as a user runs it: `lmgw simulate --workers 2pd` and `lmgw bench` processes.
The JSON report's counts match the fleet's own counters (/sim/stats), the PNG is written, a
wrong model's 404s are counted by type, --compare prints its table; flag errors exit 2."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

LMGW = [sys.executable, "-m", "lmgw.cli"]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def fleet() -> Any:
    """`lmgw simulate --workers 2pd`: (gateway URL, worker URLs)."""
    proc = subprocess.Popen(
        [
            *LMGW,
            "simulate",
            "--workers",
            "2pd",
            "--port",
            "0",
            "--speed",
            "50",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        workers: list[str] = []
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if w := re.match(r"\s+worker pd\s+(\S+)", line):
                workers.append(w.group(1))
            if m := re.search(r"on (http://\S+)", line):
                url = m.group(1)
        assert url and len(workers) == 2, proc.stderr.read() if proc.stderr else ""
        yield url, workers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fleet_counters(workers: list[str]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for w in workers:
        stats = get_json(w + "/sim/stats")
        for key in ("requests_total", "prompt_tokens_total", "generation_tokens_total"):
            total[key] += stats[key]
    return dict(total)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMGW, "bench", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_cli_report_counts_match_the_fleet_and_plot_and_compare(fleet: Any, tmp_path: Path) -> None:
    url, workers = fleet
    before = fleet_counters(workers)
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    r = bench("--url", url, "--concurrency", "4", "--requests", "50", "--input-len", "32",
              "--output-len", "12", "--len-dist", "uniform", "--json", str(out),
              "--plot", str(png))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stdout and "requests ok / errors" in r.stdout
    rep = json.loads(out.read_text())
    after = fleet_counters(workers)
    s = rep["summary"]
    assert s["requests"] == {"completed": 50, "ok": 50, "errors": 0}
    assert after["requests_total"] - before["requests_total"] == 50
    assert (
        after["generation_tokens_total"] - before["generation_tokens_total"]
        == (s["tokens"]["completion"])
    )
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == s["tokens"]["prompt"]
    assert rep["config"]["model"] == "sim-llama-8b"  # asked from the gateway's /v1/models
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

    # a wrong model: the gateway's 404s, counted as such; the workers see nothing
    bad = tmp_path / "b.json"
    r = bench("--url", url, "--model", "nope", "--concurrency", "2", "--requests", "10",
              "--json", str(bad), "--quiet")  # fmt: skip
    assert r.returncode == 1, r.stderr  # no request succeeded
    rep_b = json.loads(bad.read_text())
    assert rep_b["summary"]["errors_by_type"] == {"http_404": 10}
    assert rep_b["summary"]["status_counts"] == {"404": 10}
    assert fleet_counters(workers) == after
    assert "http_404" in r.stdout

    r = bench("--compare", str(out), str(bad))
    assert r.returncode == 0, r.stderr
    assert "a.json" in r.stdout and "b.json" in r.stdout and "requests/s" in r.stdout
    assert "0.00x" in r.stdout  # b's requests/s against a's
    r = bench("--compare", str(out))
    assert r.returncode == 2 and "two or more" in r.stderr
    r = bench("--compare", str(out), str(png))
    assert r.returncode == 2 and "not JSON" in r.stderr


def test_cli_flag_errors_exit_2(tmp_path: Path) -> None:
    r = bench("--concurrency", "2", "--requests", "3")
    assert r.returncode == 2 and "give --url" in r.stderr
    r = bench("--url", "ftp://x", "--concurrency", "2", "--requests", "3")
    assert r.returncode == 2 and "http(s)" in r.stderr
    r = bench("--url", "http://127.0.0.1:1", "--concurrency", "2", "--rate", "3")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    missing = tmp_path / "missing.jsonl"
    r = bench("--url", "http://127.0.0.1:1", "--concurrency", "1", "--requests", "1",
              "--dataset", str(missing), "--model", "m")  # fmt: skip
    assert r.returncode == 2 and "cannot read --dataset" in r.stderr


@pytest.mark.slow
def test_cli_ctrl_c_reports_what_completed(fleet: Any, tmp_path: Path) -> None:
    url, workers = fleet
    before = fleet_counters(workers)["requests_total"]
    out = tmp_path / "i.json"
    proc = subprocess.Popen(
        [
            *LMGW,
            "bench",
            "--url",
            url,
            "--concurrency",
            "2",
            "--duration",
            "60",
            "--json",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while fleet_counters(workers)["requests_total"] < before + 5:
            if proc.poll() is not None:
                raise AssertionError(f"lmgw bench ended early: {proc.communicate()}")
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "interrupted" in stdout and "stopping" in stderr
    rep = json.loads(out.read_text())
    # the workers had started 5 or more; up to 2 (the concurrency) were abandoned in flight
    assert rep["interrupted"] is True and rep["summary"]["requests"]["ok"] >= 3
