"""The open-files limit: raised to the hard limit at start-up, never lowered, and what
`lmgw serve` does (each case in a child process: the limit is the whole process's)."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)

pytestmark = pytest.mark.skipif(
    HARD != resource.RLIM_INFINITY and HARD < 512, reason="the hard limit leaves no room"
)


def _child(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_a_low_soft_limit_is_raised_to_the_hard_one() -> None:
    got = _child(
        """
        import resource
        from lmgw.fdlimit import raise_open_files_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        before, after = raise_open_files_limit()
        print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        """
    )
    before, after, now, hard = map(int, got.split())
    assert before == 256 and after == now > 256
    assert (
        after == hard
        or hard == resource.RLIM_INFINITY
        or after == int(Path("/proc/sys/fs/nr_open").read_text())
    )


def test_a_limit_at_its_ceiling_is_left_alone_and_never_lowered() -> None:
    got = _child(
        """
        import resource
        from lmgw.fdlimit import raise_open_files_limit
        a = raise_open_files_limit()
        b = raise_open_files_limit()
        print(*a, *b)
        """
    )
    first_before, first_after, second_before, second_after = map(int, got.split())
    assert first_after >= first_before  # never lowered
    assert second_before == second_after == first_after  # nothing left to raise


def test_lmgw_serve_raises_it_and_logs_it() -> None:
    """`lmgw serve` started with a soft limit of 256: it serves with the hard limit, and
    says so in its log."""
    got = _child(
        """
        import resource, subprocess, sys, time
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        def low():
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmgw.cli", "serve", "--port", "0", "--worker",
             "pd=http://127.0.0.1:9", "--log-level", "info"],
            preexec_fn=low, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 10
            soft_now = 256
            while soft_now <= 256 and time.monotonic() < deadline:
                time.sleep(0.05)
                limits = open(f"/proc/{proc.pid}/limits").read()
                line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
                soft_now = int(line.split()[3])
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        print(soft_now)
        print("LOG", "raised from 256" in err)
        """
    )
    soft_now, log_line = got.splitlines()[-2:]
    assert int(soft_now) > 256
    assert log_line == "LOG True"


@pytest.mark.parametrize(
    ("soft", "configured", "allowed"),
    [
        (1024, 4096, 480),  # (1024 - 64) / 2: each client connection has an upstream one
        (1 << 20, 4096, 4096),  # room enough: the configured value
        (80, 4096, 16),  # a tiny limit still serves a few
        (80, 2, 2),  # never above what is configured
        (resource.RLIM_INFINITY, 4096, 4096),
    ],
)
def test_client_connections_fit_the_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, configured: int, allowed: int
) -> None:
    import lmgw.fdlimit as fdlimit

    monkeypatch.setattr(fdlimit.resource, "getrlimit", lambda _: (soft, soft))
    assert fdlimit.client_connections_allowed(configured) == allowed
