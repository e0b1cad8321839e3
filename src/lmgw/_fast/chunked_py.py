"""Pure-Python twin of `chunked.pyx`: an incremental decoder for HTTP/1.1 chunked bodies, and
the SSE event count.

Why a decoder of our own: a streamed answer is one HTTP chunk per SSE event, and httptools
calls back into Python for every chunk (a call and a list append per event, then a join), and
the relay then scanned every byte again to count events. The compiled decoder takes a whole
socket read in one call and returns its payload; this twin is the reference the property tests
compare it with, and the fallback when the extension is not built.

Grammar (RFC 9112 §7.1), strict where it protects us and lenient where servers differ:
``chunk-size`` is 1-15 hex digits, then either ``;`` and an extension (skipped, up to the
size-line bound) or CRLF; chunk data is followed by CRLF; the size-0 chunk is followed by
trailer lines (skipped, bounded) and an empty line. As in httptools (llhttp), whitespace
after the size and a bare LF where CRLF belongs are errors. Bytes after the end are not parsed:
``extra`` says some came (the connection is then not reused, as with httptools).
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "MAX_TRAILERS", "ChunkedDecoder", "ChunkedError", "count_events"]

MAX_LINE = 4096
"""Bytes of one chunk-size line (extensions included), at most."""
MAX_TRAILERS = 16384
"""Bytes of trailer fields after the last chunk, at most."""

# states
_SIZE, _EXT, _SIZE_LF, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _TRAILER_LF, _DONE = range(9)
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class ChunkedError(ValueError):
    """The bytes are not a valid chunked body."""


def count_events(data: bytes) -> int:
    """How many SSE events end in ``data``: ``data.count(b"\\n\\n")``, which the compiled twin
    computes with memchr instead of a two-byte search."""
    return data.count(b"\n\n")


class ChunkedDecoder:
    """Feed it the body bytes as they arrive; each :meth:`feed` returns the payload they
    completed. ``done`` once the last chunk and its trailers were read; ``chunks`` counts the
    non-empty chunks so far."""

    __slots__ = ("_digits", "_left", "_line", "_state", "_trailer_bytes", "chunks", "extra")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # chunk-size being read, then chunk bytes still to come
        self._digits = 0  # hex digits of the current size
        self._line = 0  # bytes of the current size line / trailer line
        self._trailer_bytes = 0
        self.chunks = 0
        self.extra = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The payload ``data`` completes (b"" if none). Raises ChunkedError on bad framing."""
        out: list[bytes] = []
        i, n = 0, len(data)
        state = self._state
        while i < n:
            if state == _DATA:
                take = min(self._left, n - i)
                out.append(data[i : i + take])
                i += take
                self._left -= take
                if self._left == 0:
                    state = _DATA_CR
                continue
            c = data[i]
            i += 1
            if state == _SIZE:
                self._line += 1
                if self._line > MAX_LINE:
                    raise ChunkedError("chunk-size line too long")
                digit = _HEX.get(c)
                if digit is not None:
                    if self._digits == 15:
                        raise ChunkedError("chunk size too large")
                    self._left = self._left * 16 + digit
                    self._digits += 1
                elif self._digits == 0:
                    raise ChunkedError("chunk size expected")
                elif c == 0x3B:  # ';'
                    state = _EXT
                elif c == 0x0D:
                    state = _SIZE_LF
                else:
                    raise ChunkedError("invalid character in chunk size")
            elif state == _EXT:
                self._line += 1
                if self._line > MAX_LINE:
                    raise ChunkedError("chunk-size line too long")
                if c == 0x0D:
                    state = _SIZE_LF
                elif c == 0x0A:
                    raise ChunkedError("bare LF in chunk-size line")
            elif state == _SIZE_LF:
                if c != 0x0A:
                    raise ChunkedError("CRLF expected after the chunk size")
                self._line = 0
                self._digits = 0
                if self._left == 0:
                    state = _TRAILER
                else:
                    self.chunks += 1
                    state = _DATA
            elif state == _DATA_CR:
                if c != 0x0D:
                    raise ChunkedError("CRLF expected after chunk data")
                state = _DATA_LF
            elif state == _DATA_LF:
                if c != 0x0A:
                    raise ChunkedError("CRLF expected after chunk data")
                state = _SIZE
            elif state == _TRAILER:
                self._trailer_bytes += 1
                if self._trailer_bytes > MAX_TRAILERS:
                    raise ChunkedError("trailer section too long")
                if c == 0x0D:
                    state = _TRAILER_LF
                elif c == 0x0A:
                    raise ChunkedError("bare LF in the trailer section")
                else:
                    self._line += 1
            elif state == _TRAILER_LF:
                if c != 0x0A:
                    raise ChunkedError("CRLF expected in the trailer section")
                if self._line == 0:  # the empty line: the body ends here
                    state = _DONE
                    if i < n:
                        self.extra = True
                    break
                self._line = 0
                state = _TRAILER
            else:  # _DONE
                self.extra = True
                break
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)
