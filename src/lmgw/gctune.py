"""The cyclic garbage collector's settings for a process the CLI runs (``lmgw serve`` and
``lmgw simulate``), applied once the gateway has started.

Why: what start-up made (modules, config, routing tables, tokenizers) lives as long as the
process; frozen out of the collector's sight, a full collection under load takes ~0.4 ms
instead of ~14 ms, a pause of every request in flight. And a request in flight holds ~20
tracked objects (its body, exchange, route, answer builder) but leaves no cycles: at the
default young threshold of 700, 64 requests in flight made a young collection every ~40
requests that found nothing to free (~1.7 µs a request; benchmarks/README.md, "GC" and
"Session 26"). An embedding application decides for its own heap: the SDK does not call this.
"""

from __future__ import annotations

import gc

__all__ = ["GC_YOUNG_THRESHOLD", "tune_gc"]

GC_YOUNG_THRESHOLD = 10_000
"""Allocations (net of frees) of tracked objects between two young collections."""


def tune_gc() -> None:
    """Freeze what exists now and raise the young threshold (never lowered)."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_YOUNG_THRESHOLD), gen1, gen2)
