"""The simulated worker's routes beyond chat and completions (vLLM's pooling, Responses,
Anthropic, batched chat and audio APIs), registered into a :class:`~.app.SimWorker` by
:func:`install`. The handlers live in :mod:`.pooling`, :mod:`.responses` and :mod:`.textgen`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import pooling, responses, textgen
from .apikit import bound

if TYPE_CHECKING:
    from .app import SimWorker

_POST = frozenset({"POST"})


def install(sim: SimWorker) -> None:
    """Add the routes to ``sim``'s table, and its prefix routes (``/v1/responses/{id}``)."""
    for table in (pooling.ROUTES, textgen.ROUTES):
        for path, handler in table.items():
            sim._routes[path] = (_POST, bound(sim, handler))
    sim._routes["/v1/responses"] = (_POST, bound(sim, responses.create))
    sim.response_store = responses.ResponseStore()  # type: ignore[attr-defined]
    sim._prefix_routes = [
        (responses.PREFIX, (frozenset({"GET", "POST"}), bound(sim, responses.stored_route)))
    ]
