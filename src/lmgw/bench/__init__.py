"""`lmgw bench`: a load generator for OpenAI-compatible endpoints (docs/bench.md).

Modules: ``workloads`` (sans-IO request generators), ``loadgen`` (the load loop and its HTTP
client), ``report`` (percentiles, tables, the JSON report, comparisons), ``plot`` (matplotlib,
optional), ``progress`` (the rich progress line), ``api`` (:func:`run_bench`), ``cli``.
Importing this package imports none of rich or matplotlib, nor the load generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import BenchOptions, BenchSetupError, run_bench

__all__ = ["BenchOptions", "BenchSetupError", "run_bench"]


def __getattr__(name: str) -> Any:
    """The API loads on first use: `lmgw serve` builds the `bench` sub-parser (``bench.cli``)
    without importing the load generator."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
