"""Policy names to factories, including third-party policies from the ``lmgw.policies``
entry-point group (each entry point names a :class:`~lmgw.routing.policy.Policy` subclass or a
zero-argument factory)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from .policies.consistent_hash import ConsistentHash
from .policies.least_load import LeastLoad
from .policies.round_robin import RoundRobin
from .policy import Policy

BUILTIN: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_load": LeastLoad,
    "consistent_hash": ConsistentHash,
}


class UnknownPolicy(ValueError):
    pass


def available() -> dict[str, Callable[[], Policy]]:
    """Built-in policies plus those installed as ``lmgw.policies`` entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group="lmgw.policies"):
        found.setdefault(ep.name, ep.load)
    return found


def make_policy(name: str) -> Policy:
    factories = available()
    factory = factories.get(name)
    if factory is None:
        raise UnknownPolicy(
            f"unknown routing policy {name!r}; available: {', '.join(sorted(factories))}"
        )
    if factory in BUILTIN.values():
        return factory()
    obj = factory()  # entry point: load() gives the class or factory
    return obj() if not isinstance(obj, Policy) else obj
