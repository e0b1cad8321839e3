"""`lmgw serve` with discovery sources and no static workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LMGW = [sys.executable, "-m", "lmgw.cli"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMGW, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_without_any_worker_source_is_refused() -> None:
    r = run("serve", "--port", "0")
    assert r.returncode == 2 and "no workers configured" in r.stderr


def test_serve_with_a_bad_discovery_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "workers.toml"
    bad.write_text("[[workers]]\nurl = 'http://127.0.0.1:1'\nrole = 'nope'\n")
    r = run("serve", "--port", "0", "--discovery-file", str(bad))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lmgw:")]
    assert len(lines) == 1 and "role" in lines[0]
    assert "Traceback" not in r.stderr


def test_redis_url_is_redacted_in_print_config() -> None:
    r = run("serve", "--redis-url", "redis://:s3cret@127.0.0.1:6379/0", "--print-config")
    assert r.returncode == 0 and "s3cret" not in r.stdout and "redis_url" in r.stdout


def test_serve_with_k8s_outside_a_cluster_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    r = subprocess.run(
        [*LMGW, "serve", "--port", "0", "--k8s-selector", "app=vllm", "--k8s-namespace", "llm"],
        capture_output=True, text=True, timeout=20, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lmgw:")]
    assert len(lines) == 1 and "discovery.k8s_api_url" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
