"""Decoder of chunked response bodies and the SSE event count, for the upstream client.

Prefers the Cython extension (`lmgw._fast.chunked`); without it (an sdist installed without a
compiler) the pure-Python twin gives the same answers, only slower.
"""

from __future__ import annotations

try:
    from lmgw._fast.chunked import ChunkedDecoder, ChunkedError, count_events

    IMPLEMENTATION = "cython"
except ImportError:  # pragma: no cover - the extension is built by `make build`
    from lmgw._fast.chunked_py import ChunkedDecoder, ChunkedError, count_events

    IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "ChunkedDecoder", "ChunkedError", "count_events"]
