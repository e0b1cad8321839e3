"""The worker-fleet spec of ``lmgw simulate --workers 3e2p4d``.

Grammar (case-insensitive, surrounding whitespace ignored)::

    spec  := item+
    item  := count role
    count := [0-9]+            (at least 1)
    role  := "pd" | "e" | "p" | "d"    ("pd" is matched first: "2pd" is 2 merged workers)

Each role appears at most once, and the roles together must form a flow (see
`lmgw.config.infer_flow`): ``4pd`` is a merged fleet, ``2p4d`` a split one, ``1e2pd`` and
``3e2p4d`` add encoders. The canonical text lists roles in the order e, pd, p, d.
"""

from __future__ import annotations

import msgspec

from lmgw.config import ROLE_NAMES, ConfigError, infer_flow

__all__ = ["FLEET_ORDER", "IMPLEMENTED_ROLES", "FleetSpec", "parse_fleet_spec"]

#: Roles the simulator can run today; the CLI reports the others as not implemented yet.
IMPLEMENTED_ROLES: frozenset[str] = frozenset({"e", "p", "d", "pd"})
#: Order of roles in the canonical spec text.
FLEET_ORDER: tuple[str, ...] = ("e", "pd", "p", "d")


class FleetSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How many simulated workers of each role to start."""

    e: int = 0
    p: int = 0
    d: int = 0
    pd: int = 0

    def __post_init__(self) -> None:
        for role in FLEET_ORDER:
            n = getattr(self, role)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"worker count for role {role!r} must be >= 0, got {n!r}")
        infer_flow(self.roles())  # raises for an empty fleet or one that forms no flow

    def roles(self) -> tuple[str, ...]:
        """The roles present, in canonical order."""
        return tuple(r for r in FLEET_ORDER if getattr(self, r))

    def counts(self) -> dict[str, int]:
        """Role -> count for the roles present, in canonical order."""
        return {r: getattr(self, r) for r in self.roles()}

    @property
    def total(self) -> int:
        """How many workers in all."""
        return self.e + self.p + self.d + self.pd

    @property
    def flow(self) -> str:
        """The flow these roles serve (``pd``, ``p/d``, ``e+pd`` or ``e+p+d``)."""
        return infer_flow(self.roles())

    def unimplemented(self) -> list[str]:
        """Roles in this spec that the simulator cannot run yet, in canonical order."""
        return [r for r in self.roles() if r not in IMPLEMENTED_ROLES]

    def __str__(self) -> str:
        return "".join(f"{n}{r}" for r, n in self.counts().items())


def _error(text: str, pos: int, why: str) -> ConfigError:
    caret = " " * pos + "^"
    return ConfigError(
        f"bad worker spec {text!r} at column {pos + 1}: {why}\n    {text}\n    {caret}\n"
        "  expected <count><role>... with roles e, p, d, pd, e.g. 4pd, 2p4d, 1e2pd, 3e2p4d"
    )


def parse_fleet_spec(text: str) -> FleetSpec:
    """Parse a fleet spec such as ``3e2p4d`` (3 encode, 2 prefill, 4 decode workers).

    Raises:
        ConfigError: empty text, a missing or zero count, an unknown role letter, a repeated role,
            or roles that form no flow; the message points at the offending column.
    """
    spec = text.strip()
    if not spec:
        raise ConfigError(
            "empty worker spec: expected <count><role>... with roles e, p, d, pd, e.g. 4pd"
        )
    low = "".join(c.lower() if c.isascii() else c for c in spec)  # keeps columns aligned
    counts: dict[str, int] = {}
    i = 0
    while i < len(low):
        start = i
        while i < len(low) and low[i].isascii() and low[i].isdigit():
            i += 1
        if i == start:
            if low[i] in "epd":
                raise _error(spec, i, f"expected a count before the role {spec[i]!r}")
            raise _error(spec, i, f"unexpected {spec[i]!r}: expected a count")
        count = int(low[start:i])
        if i == len(low):
            raise _error(spec, i, f"expected a role after the count {count}")
        if low.startswith("pd", i):
            role, width = "pd", 2
        elif low[i] in "epd":
            role, width = low[i], 1
        else:
            raise _error(spec, i, f"unknown role {spec[i]!r}")
        if count == 0:
            raise _error(spec, start, f"zero {ROLE_NAMES[role]} workers: leave the role out")
        if role in counts:
            raise _error(spec, i, f"role {role!r} ({ROLE_NAMES[role]}) is given twice")
        counts[role] = count
        i += width
    try:
        return FleetSpec(**counts)
    except ConfigError as e:
        raise ConfigError(f"worker spec {spec!r} forms no flow: {e.reason}") from None
