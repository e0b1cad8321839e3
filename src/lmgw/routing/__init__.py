"""The load balancer: policies pick a worker per stage from a snapshot of the fleet.

See docs/routing.md. Third-party policies subclass :class:`Policy` and register under the
``lmgw.policies`` entry-point group.
"""

from .policy import Policy, RouteContext, RouteInfo, route_header, session_key_of
from .registry import UnknownPolicy, available, make_policy

__all__ = [
    "Policy",
    "RouteContext",
    "RouteInfo",
    "UnknownPolicy",
    "available",
    "make_policy",
    "route_header",
    "session_key_of",
]
