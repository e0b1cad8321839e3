"""Fault injection for one simulated worker, settable from CLI flags and at run time
(``POST /sim/faults``). Sans-IO: this module decides; ``app.py`` acts.

What each fault does to the worker:

- ``error_rate``: that fraction of generation requests gets a 500 with a vLLM error body. The
  draws come from an RNG seeded with the worker seed, so a run is reproducible.
- ``hang``: generation requests are accepted and never answered, until the client goes away.
- ``slow``: every prefill and decode delay is multiplied by this factor (no effect at speed=inf).
- ``crash_at_token``: the worker process exits (``os._exit(1)``) after emitting k tokens of a
  request. Only a worker running as its own process exits; in-process it drops the connection.
- ``drop_at_token``: after k tokens the handler raises :class:`DropConnection`; the server treats
  any exception a handler raises after ``start()`` as a broken response and closes the connection
  without finishing the body (the client sees a truncated stream).
- ``refuse``: every route answers 503 (except ``/sim/*``, so a test can lift the fault).
- ``flap_health``: ``/health`` alternates between 200 and 503 on every probe.
- ``stall_rate`` / ``stall_s``: that fraction of generation requests waits ``stall_s`` before
  its prefill (a preempted or swapping engine, a GC pause): the late first tokens that a
  gateway's hedging exists for. Seeded draws, as ``error_rate``.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec

from lmgw.http.types import AbortResponse


class DropConnection(AbortResponse):
    """Raised by a handler to make the server close the connection mid-response (quietly)."""


class Faults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fault settings of one worker (all off by default)."""

    error_rate: float = 0.0
    hang: bool = False
    slow: float = 1.0
    crash_at_token: int | None = None
    drop_at_token: int | None = None
    refuse: bool = False
    flap_health: bool = False
    stall_rate: float = 0.0
    stall_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("error_rate", "stall_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if not self.stall_s >= 0.0:
            raise ValueError("stall_s must be >= 0")
        if not self.slow > 0.0:
            raise ValueError("slow must be > 0")
        for name in ("crash_at_token", "drop_at_token"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")


class FaultInjector:
    """Holds the current faults, the seeded RNG behind ``error_rate`` and the health flap state.

    ``reset`` goes back to the faults the worker was started with (its CLI flags), so a test that
    changed faults at run time can undo them without knowing the start-up configuration.
    """

    def __init__(self, faults: Faults | None = None, *, seed: int = 0) -> None:
        self.initial = faults or Faults()
        self.faults = self.initial
        self._seed = seed
        self._rng = random.Random(seed)
        self._health_calls = 0

    def update(self, patch: dict[str, Any]) -> Faults:
        """Apply a partial update (unknown names or bad values raise ``ValueError``)."""
        merged = {**msgspec.structs.asdict(self.faults), **patch}
        try:
            self.faults = msgspec.convert(merged, Faults)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        return self.faults

    def reset(self) -> None:
        self.faults = self.initial
        self._rng = random.Random(self._seed)
        self._health_calls = 0

    def should_error(self) -> bool:
        """Whether this generation request fails (one seeded draw per call when enabled)."""
        rate = self.faults.error_rate
        return rate > 0.0 and self._rng.random() < rate

    def stall_s(self) -> float:
        """How long this generation request stalls before its prefill (0.0: not at all)."""
        rate = self.faults.stall_rate
        return self.faults.stall_s if rate > 0.0 and self._rng.random() < rate else 0.0

    def health_ok(self) -> bool:
        """Health verdict for one probe: flapping alternates ok, failing, ok, ..."""
        if self.faults.refuse:
            return False
        if not self.faults.flap_health:
            return True
        self._health_calls += 1
        return self._health_calls % 2 == 1

    def as_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self.faults)
