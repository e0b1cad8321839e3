"""Consistent-hash ring for the consistent-hash and session-affinity policies.

Prefers the Cython extension (`lmgw._fast.hashring`); when it is not built (an sdist installed
without a compiler) the pure-Python twin gives the same answers, only slower, and a warning says so.
"""

from __future__ import annotations

import logging

try:
    from lmgw._fast.hashring import DEFAULT_VNODES, HashRing, hash64

    IMPLEMENTATION = "cython"
except ImportError:
    logging.getLogger(__name__).warning(
        "lmgw._fast.hashring is not built; using the pure-Python hash ring (slower lookups)"
    )
    from lmgw._fast.hashring_py import DEFAULT_VNODES, HashRing, hash64

    IMPLEMENTATION = "python"

__all__ = ["DEFAULT_VNODES", "IMPLEMENTATION", "HashRing", "hash64"]
