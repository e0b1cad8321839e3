"""One task sleeping until another has work for it: the flushers' doorbell.

Lighter than a ``trio.Event`` per round or a ``ParkingLot`` (one attribute, no allocation):
:meth:`Wakeup.wake` is called for every message queued, and costs a comparison when the
sleeper is already awake (or already woken in this scheduler pass).
"""

from __future__ import annotations

from typing import Any

from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

__all__ = ["Wakeup"]


class Wakeup:
    """At most one sleeper; :meth:`wake` with nobody asleep does nothing (the owner checks
    for work before it sleeps, so no wake-up is ever lost)."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: Task | None = None

    async def sleep(self) -> None:
        """Sleep until :meth:`wake` (a checkpoint: cancellable)."""
        if self._task is not None:
            raise RuntimeError("another task is already sleeping here")
        self._task = current_task()
        await wait_task_rescheduled(self._abort)

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            reschedule(task)

    def _abort(self, _: Any) -> Abort:
        self._task = None
        return Abort.SUCCEEDED
