"""Whole simple HTTP/1.1 messages in one call, before httptools (which takes everything else).

Prefers the Cython extension (`lmgw._fast.h1parse`); without it (an sdist installed without a
compiler) the pure-Python twin gives the same answers, only slower.
"""

from __future__ import annotations

from lmgw._fast.h1parse_py import RequestParts, ResponseParts

try:
    from lmgw._fast.h1parse import parse_request, parse_response

    IMPLEMENTATION = "cython"
except ImportError:  # pragma: no cover - the extension is built by `make build`
    from lmgw._fast.h1parse_py import parse_request, parse_response

    IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "RequestParts", "ResponseParts", "parse_request", "parse_response"]
