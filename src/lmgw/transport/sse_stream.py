"""A streamed answer's relay state for the compiled lane (see `lmgw._fast.ssestream_py`).

Prefers the Cython extension (`lmgw._fast.ssestream`); without it the pure-Python twin gives
the same bytes, only slower.
"""

from __future__ import annotations

try:
    from lmgw._fast.ssestream import SseStream

    IMPLEMENTATION = "cython"
except ImportError:  # pragma: no cover - the extension is built by `make build`
    from lmgw._fast.ssestream_py import SseStream  # type: ignore[assignment]

    IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "SseStream"]
