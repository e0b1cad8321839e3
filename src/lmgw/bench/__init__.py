"""`lmgw bench`: a load generator for OpenAI-compatible endpoints (docs/bench.md).

Modules: ``workloads`` (sans-IO request generators), ``loadgen`` (the load loop and its HTTP
client), ``report`` (percentiles, tables, the JSON report, comparisons), ``plot`` (matplotlib,
optional), ``progress`` (the rich progress line), ``api`` (:func:`run_bench`), ``cli``.
Importing this package imports none of rich or matplotlib.
"""

from __future__ import annotations

from .api import BenchOptions, BenchSetupError, run_bench

__all__ = ["BenchOptions", "BenchSetupError", "run_bench"]
