"""The SDK examples run as a user runs them (a fresh interpreter each) and exit 0.

Each example checks its own results (asserts, exit status 1 on a wrong answer) and starts the
simulated workers it needs, in-process or as subprocesses; the bound here only stops a hung one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT_S = 60


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("sdk_trio.py", [], "the same gateway over HTTP"),
        ("sdk_asyncio.py", [], "nothing in flight any more"),
        ("sdk_client.py", ["--backend", "asyncio"], "admin: drain, remove, add back"),
        ("sdk_client.py", ["--backend", "trio"], "admin: drain, remove, add back"),
    ],
)
def test_example_runs(script: str, args: list[str], expect: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert expect in proc.stdout, proc.stdout[-3000:]
