"""The routing interface: a policy picks one worker from a snapshot of candidates.

Policies are pure and synchronous: no I/O, no awaits. They see the candidate tuple (already
filtered to routable workers of the right model and role) and a :class:`RouteContext`, and may
keep their own state, updated through the ``on_*`` hooks that the pipeline calls from ``finally``
blocks. One instance serves one role (encode, prefill, decode or merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..workers.worker import Worker


class RouteContext:
    """What a policy may look at for one request. Cheap to build: fields are filled lazily by
    the pipeline only when a policy declares it needs them (``needs_tokens``)."""

    __slots__ = ("headers", "model", "request_id", "session_key", "tokens")

    def __init__(
        self,
        model: str,
        request_id: str = "",
        session_key: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.model = model
        self.request_id = request_id
        self.session_key = session_key
        self.headers = headers or []
        self.tokens: list[int] | None = None


class Policy:
    """Base class for routing policies. Subclasses implement :meth:`choose`."""

    #: registry name and metrics label
    name: str = "policy"
    #: set True if ``choose`` needs ``ctx.tokens`` (the pipeline tokenizes only then)
    needs_tokens: bool = False

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        """Pick one of ``candidates`` (never empty)."""
        raise NotImplementedError

    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        """The request was sent to ``worker``."""

    def on_finish(self, worker: Worker, ctx: RouteContext, ok: bool) -> None:
        """The request on ``worker`` ended (success, error or cancellation)."""

    def on_worker_removed(self, worker: Worker) -> None:
        """``worker`` left the fleet: forget any state about it."""
