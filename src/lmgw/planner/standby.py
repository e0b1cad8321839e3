"""Follow the planner with standby workers: the closed loop of ``lmgw simulate --autoscale``.

Why: the planner only recommends (an autoscaler acts on ``lmgw_planner_desired_workers``). In a
simulation, and in front of workers that are started already and only need routing to (a warm
pool), the gateway can act on it itself: every plan, a pool below its recommendation gets
standby workers of its role added, and one above it has its newest workers drained and removed
once idle, back to standby. :func:`moves` decides (sans-IO); :class:`StandbyScaler` applies it
to a gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..config import WorkerConfig
from ..workers.worker import WorkerState
from .feed import EVALUATE_S, pool_of

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger("lmgw")


def moves(desired: int, active: Sequence[str], standby: int) -> tuple[int, list[str]]:
    """How many standby workers to add, and which active ones (the newest first) to retire,
    to bring a pool of ``active`` workers (oldest first) to ``desired`` with ``standby``
    available; never below one worker."""
    want = max(1, desired)
    if want > len(active):
        return min(want - len(active), standby), []
    return 0, list(reversed(active[want:]))


class StandbyScaler:
    """Moves workers between a gateway's fleet and a standby list as its planner says."""

    def __init__(self, gateway: Gateway, standby: Sequence[WorkerConfig]) -> None:
        self.gw = gateway
        #: per role, the workers not in the fleet now, in the order they will be added
        self.standby: dict[str, list[WorkerConfig]] = {}
        for wc in standby:
            self.standby.setdefault(wc.role, []).append(wc)
        #: the workers this scaler added (the only ones it retires), by id, oldest first
        self.added: dict[str, WorkerConfig] = {}
        self._leaving: dict[str, WorkerConfig] = {}  # drained, removed once idle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(EVALUATE_S)
            self.step()

    def step(self) -> None:
        """Apply the planner's last plans (and remove the drained workers that are idle)."""
        gw = self.gw
        for wid, wc in list(self._leaving.items()):
            worker = gw.registry.get(wid)
            if worker is None or not worker.in_flight:
                if worker is not None:
                    gw.remove_worker(wid)
                del self._leaving[wid]
                self.standby.setdefault(wc.role, []).insert(0, wc)
        if gw.planner is None:
            return
        for pool, plan in gw.planner.plans.items():
            role = plan.role
            # the pool's workers that serve or are about to (an added one starts unprobed)
            active = [
                w.id for w in gw.registry
                if pool_of(w) == pool and w.state in (WorkerState.STARTING, WorkerState.HEALTHY)
            ]  # fmt: skip
            add, retire = moves(plan.desired, active, len(self.standby.get(role, ())))
            retire = [wid for wid in retire if wid in self.added]  # only what it brought in
            if add or retire:
                log.info(
                    "autoscale: role %s: %d -> %d worker(s) (planner: %s recommended, %s)",
                    role, len(active), len(active) + add - len(retire), plan.desired,
                    plan.status,
                )  # fmt: skip
            for _ in range(add):
                wc = self.standby[role].pop(0)
                gw.add_entry(wc)
                self.added[wc.worker_id] = wc
            for wid in retire:
                gw.drain_worker(wid, "autoscale: fewer workers recommended")
                self._leaving[wid] = self.added.pop(wid)
