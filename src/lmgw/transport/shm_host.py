"""Which processes can share memory segments, without numpy (the gateway's start-up path).

:mod:`lmgw.transport.shm` holds the segments themselves; a session decides whether to use
them from :func:`host_id` alone, before any tensor is seen.
"""

from __future__ import annotations

import os
import stat

__all__ = ["DEFAULT_DIR", "DEFAULT_THRESHOLD", "host_id"]

DEFAULT_THRESHOLD = 16 << 20
"""Tensors at least this big go through shared memory when both ends share a host."""
DEFAULT_DIR = "/dev/shm"


def host_id(directory: str = DEFAULT_DIR) -> str:
    """Who can open this process's segments: the kernel's boot id and the tmpfs mount of
    `directory` (its device and inode). Two processes with the same id share segments; a
    container with its own ``/dev/shm`` or another machine has another. Empty when there is
    no such directory (then nothing is shared)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        info = os.stat(directory)
    except OSError:
        return ""
    if not stat.S_ISDIR(info.st_mode):
        return ""
    return f"{boot}:{info.st_dev:x}:{info.st_ino:x}"
