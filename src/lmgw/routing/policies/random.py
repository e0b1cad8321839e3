"""Random: a uniformly random candidate. Stateless, and immune to the lock-step effects a
shared cursor can have when several gateways start together."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..policy import Policy, RouteContext

if TYPE_CHECKING:
    from ...config import RoutingConfig


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed).random

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> RandomPolicy:
        return cls()

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        return candidates[int(self._random() * len(candidates))]
