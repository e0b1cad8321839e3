"""Chained block hashes and the bounded prefix index for the cache-aware policy.

Prefers the Cython extension (`lmgw._fast.prefix`); when it is not built the pure-Python twin
gives the same answers, only slower (hashing an 8k-token prompt: ~8 us vs ~115 us) and with a
larger per-node memory estimate (so fewer nodes fit the same budget), and a warning says so.
"""

from __future__ import annotations

import logging

try:
    from lmgw._fast.prefix import (
        MAX_SLOTS,
        TEXT_SEED,
        TOKEN_SEED,
        PrefixIndex,
        best_holder,
        block_hashes,
        least_wait,
        nodes_for_budget,
        slot_mask,
        text_block_hashes,
    )

    IMPLEMENTATION = "cython"
except ImportError:
    logging.getLogger(__name__).warning(
        "lmgw._fast.prefix is not built; using the pure-Python prefix index (slower hashing)"
    )
    from lmgw._fast.prefix_py import (
        MAX_SLOTS,
        TEXT_SEED,
        TOKEN_SEED,
        PrefixIndex,
        best_holder,
        block_hashes,
        least_wait,
        nodes_for_budget,
        slot_mask,
        text_block_hashes,
    )

    IMPLEMENTATION = "python"

__all__ = [
    "IMPLEMENTATION",
    "MAX_SLOTS",
    "TEXT_SEED",
    "TOKEN_SEED",
    "PrefixIndex",
    "best_holder",
    "block_hashes",
    "least_wait",
    "nodes_for_budget",
    "slot_mask",
    "text_block_hashes",
]
