"""Bounded background work with an owner: the copies a gateway sends on its own (mirrors of
client requests, warm-up prefills) run in a nursery that this object owns and the gateway
runs, at most ``max_in_flight`` at once; beyond that a new one is refused at once (the caller
counts it), never queued, so background work cannot pile up behind a slow worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class Background:
    """A nursery for background tasks (:meth:`run`, started in the gateway's nursery) and their
    bound."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks until the gateway stops (they are cancelled with it)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def has_room(self) -> bool:
        """Whether :meth:`start` would start a task now (to skip preparing one that would not)."""
        return self._nursery is not None and self.in_flight < self.max_in_flight

    def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``fn(*args)`` unless ``max_in_flight`` run or the owner is not running;
        never waits. True when it was started."""
        nursery = self._nursery
        if nursery is None or not self.has_room():
            return False
        self.in_flight += 1
        nursery.start_soon(self._tracked, fn, args)
        return True

    async def _tracked(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self.in_flight -= 1
