"""Power of two choices: two distinct random candidates, the less loaded of them (same load
signal as least_load). Nearly as balanced as least_load, but two concurrent decisions rarely
pick the same idle worker, and it reads only two workers' load."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...workers.worker import Worker
from ..policy import Policy, RouteContext

if TYPE_CHECKING:
    from ...config import RoutingConfig


class PowerOfTwo(Policy):
    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed).random

    @classmethod
    def from_config(cls, cfg: RoutingConfig) -> PowerOfTwo:
        return cls()

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        rnd = self._random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        # ties keep the first draw, itself uniform
        if b.load < a.load:
            return b
        return a
