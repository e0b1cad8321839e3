"""One fast result in N compared with its reference; the first difference turns the fast path
off for good.

Why: the chat template's shapes and the tokenizer's pre-token ids are exact by construction
and checked at load, but a fast path that is wrong would be wrong silently (a prompt the model
never sees as the client meant). A sampled comparison costs ~1/N of the slow path and bounds
how long such a bug could last; its count is a metric to alert on.
"""

from __future__ import annotations

import logging

__all__ = ["EVERY", "SampledCheck"]

log = logging.getLogger("lmgw.text")

EVERY = 256


class SampledCheck:
    """``due()`` is true once in ``every`` calls; ``failed()`` records a difference.

    Args:
        what: the fast path, for the log line ("chat template X: rendering by shape").
        every: how many results per comparison.
    """

    __slots__ = ("_countdown", "every", "mismatches", "off", "what")

    def __init__(self, what: str, every: int = EVERY) -> None:
        self.what = what
        self.every = every
        self._countdown = every
        self.mismatches = 0
        self.off: str | None = None
        """Why the fast path is off (its first difference), or None."""

    def due(self) -> bool:
        """Whether this result is the one to compare."""
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self.every
        return True

    def failed(self, difference: str) -> None:
        """The compared result differed: off from now on, logged and counted."""
        self.mismatches += 1
        if self.off is None:
            self.off = difference
            log.warning("%s turned off: %s", self.what, difference)
