"""`lmgw serve` and API keys: no keys on a non-loopback address is refused unless `--open`;
keys from `LMGW_API_KEYS` or `--api-keys-file` never show in `--print-config` or errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KEY = "sk-cli-0123456789abcdef"
LMGW = [sys.executable, "-m", "lmgw.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMGW, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_no_keys_on_a_public_address_needs_open() -> None:
    r = run("serve", "--host", "0.0.0.0", "--port", "0", "--worker", "pd=http://127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert "no API keys configured" in r.stderr and "--open" in r.stderr
    r = run(
        "serve",
        "--host",
        "0.0.0.0",
        "--open",
        "--worker",
        "pd=http://127.0.0.1:1",
        "--print-config",
    )
    assert r.returncode == 0 and "open = true" in r.stdout


def test_keys_never_show(tmp_path: Path) -> None:
    r = run(
        "serve", "--worker", "pd=http://127.0.0.1:1", "--print-config",
        env={"LMGW_API_KEYS": f"{KEY} m1,m2"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout and "<redacted>" in r.stdout and 'models = ["m1", "m2"]' in r.stdout
    bad = tmp_path / "keys.txt"
    bad.write_text(f"{KEY} a b\n")
    r = run("serve", "--worker", "pd=http://127.0.0.1:1", "--api-keys-file", str(bad))
    assert r.returncode == 2 and "keys file" in r.stderr and KEY not in r.stderr
    r = run("serve", "--worker", "pd=http://127.0.0.1:1", "--open", "--api-keys-file", str(bad))
    assert r.returncode == 2 and "open" in r.stderr
