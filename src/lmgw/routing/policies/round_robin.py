"""Round robin: each request goes to the next candidate in turn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..policy import Policy, RouteContext

if TYPE_CHECKING:
    from ...config import RoutingConfig


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> RoundRobin:
        return cls()

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        i = self._next
        self._next = i + 1
        return candidates[i % len(candidates)]
