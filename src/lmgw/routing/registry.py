"""Policy names to factories, including third-party policies from the ``lmgw.policies``
entry-point group.

An entry point names a :class:`~lmgw.routing.policy.Policy` subclass or a factory. It is built
with ``obj.from_config(routing_config)`` when it has that classmethod (every built-in does),
else with ``obj()`` (the original zero-argument contract); a factory may also return a class,
which is then instantiated the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..config import RoutingConfig
from .policies.cache_aware import CacheAware
from .policies.consistent_hash import ConsistentHash, ConsistentHashBounded
from .policies.least_load import LeastLoad
from .policies.power_of_two import PowerOfTwo
from .policies.prefix_hash import PrefixHash
from .policies.random import RandomPolicy
from .policies.round_robin import RoundRobin
from .policies.session_affinity import SessionAffinity
from .policy import Policy

BUILTIN: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        RandomPolicy,
        LeastLoad,
        PowerOfTwo,
        ConsistentHash,
        ConsistentHashBounded,
        SessionAffinity,
        PrefixHash,
        CacheAware,
    )
}


class UnknownPolicy(ValueError):
    pass


def available() -> dict[str, Callable[[], Any]]:
    """Policy names to loaders: built-ins (the class) plus ``lmgw.policies`` entry points
    (``EntryPoint.load``, which returns the class or factory). Built-ins win a name clash."""
    found: dict[str, Callable[[], Any]] = {name: (lambda c=cls: c) for name, cls in BUILTIN.items()}
    for ep in entry_points(group="lmgw.policies"):
        found.setdefault(ep.name, ep.load)
    return found


def _build(obj: Any, cfg: RoutingConfig) -> Any:
    from_config = getattr(obj, "from_config", None)
    return from_config(cfg) if callable(from_config) else obj()


def make_policy(name: str, routing_cfg: RoutingConfig | None = None) -> Policy:
    """A fresh policy instance for one role, configured from ``routing_cfg`` (defaults when
    None). Raises :class:`UnknownPolicy` for a name nobody provides, TypeError when an entry
    point does not give a Policy."""
    cfg = routing_cfg if routing_cfg is not None else RoutingConfig()
    loader = available().get(name)
    if loader is None:
        raise UnknownPolicy(
            f"unknown routing policy {name!r}; available: {', '.join(sorted(available()))}"
        )
    obj = _build(loader(), cfg)
    if not isinstance(obj, Policy) and callable(obj):  # a factory that returned a class
        obj = _build(obj, cfg)
    if not isinstance(obj, Policy):
        raise TypeError(f"routing policy {name!r} is not a lmgw.routing.Policy: {obj!r}")
    return obj
