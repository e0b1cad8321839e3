"""The process's open-files limit, raised at start-up to what the system allows.

Why: every client connection and every pooled upstream connection is a file descriptor, and a
streamed request holds two for as long as it streams. The soft limit many systems start a
process with (1024) caps a gateway at about 500 concurrent streams. Past that, ``accept`` fails
with EMFILE (the server backs off and retries) and new upstream connections fail (502). The
hard limit is what the administrator allows. Go's runtime raises the soft limit to it at the
start of every program, and nginx has ``worker_rlimit_nofile``; ``lmgw serve`` and ``lmgw
simulate`` do the same. The limit is never lowered. An embedding application keeps its own
limit: the SDK does not call this.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

__all__ = ["client_connections_allowed", "ensure_open_files", "raise_open_files_limit"]

log = logging.getLogger("lmgw")

NR_OPEN_DEFAULT = 1 << 20
"""Linux's default ``fs.nr_open``: no soft limit above the system's ceiling is accepted."""
LOW = 4096
"""Below this many descriptors (about 2,000 concurrent streams), start-up warns."""
RESERVE = 64
"""Descriptors kept for everything but client connections and their upstream ones: the
listeners, epoll, ZeroMQ, Redis, health probes, log files."""


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return NR_OPEN_DEFAULT


def raise_open_files_limit() -> tuple[int, int]:
    """Raise ``RLIMIT_NOFILE``'s soft limit to its hard limit (at most ``fs.nr_open``).
    Returns the soft limit before and after (equal when there was nothing to raise, or the
    system refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open()
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def ensure_open_files() -> int:
    """:func:`raise_open_files_limit`, logged; a warning when the limit stays low. Returns it."""
    before, after = raise_open_files_limit()
    if after > before:
        log.info("open files limit raised from %d to %d (the hard limit)", before, after)
    if after != resource.RLIM_INFINITY and after < LOW:
        log.warning(
            "open files limit is %d: about %d concurrent streams before connections fail;"
            " raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=)",
            after,
            after // 2,
        )
    return after


def client_connections_allowed(configured: int) -> int:
    """``configured`` (``limits.max_connections``), or fewer when the open-files limit cannot
    hold that many client connections with an upstream connection each (two descriptors)
    beside :data:`RESERVE`. Past the cap a new client gets a quick 503 instead of taking the
    descriptor that the requests already accepted need for their upstream connections."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(16, (soft - RESERVE) // 2))
