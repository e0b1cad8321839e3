"""SSE relay helpers: cut a byte stream at event boundaries without decoding events.

The relay forwards everything up to the last complete event in each group of bytes read from
the worker, so a client never sees half an event, and a gateway-made error event appended after
a worker failure always starts on an event boundary.
"""

from __future__ import annotations

KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment (clients ignore it) that keeps a silent stream's connection in use."""


def split_complete(data: bytes) -> int:
    """Index just past the last complete SSE event in ``data`` (0 if there is none).

    Events end with a blank line: ``\\n\\n`` (what vLLM and SGLang send) or ``\\r\\n\\r\\n``.
    """
    cut = data.rfind(b"\n\n")
    if cut >= 0:
        crlf = data.rfind(b"\n\r\n", cut)
        return crlf + 3 if crlf > cut else cut + 2
    crlf = data.rfind(b"\n\r\n")
    return crlf + 3 if crlf >= 0 else 0
