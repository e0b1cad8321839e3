"""The live progress line of `lmgw bench` (rich, on stderr): done out of the plan, live request
and token rates, errors, requests in flight. Off when stderr is not a terminal or with
``--quiet``. It is redrawn by a trio task four times a second (rich's own refresh thread is
off), which costs the generator well under 1% of a core."""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import trio

from .loadgen import LoadGenerator

REFRESH_S = 0.25
RATE_WINDOW_S = 2.0


class LiveProgress:
    """Call :meth:`run` in a nursery next to the load; it stops when cancelled."""

    def __init__(self, gen: LoadGenerator) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._gen = gen
        plan = gen.plan
        self._by_time = plan.requests is None
        self._total = plan.duration_s if self._by_time else float(plan.requests or 0)
        self._progress = Progress(
            TextColumn("[bold]bench"),
            BarColumn(),
            TextColumn("{task.fields[done]}"),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            auto_refresh=False,
            transient=False,
        )
        self._task = self._progress.add_task("bench", total=self._total, done="", rates="")
        self._window: deque[tuple[float, int, int]] = deque()

    def _update(self) -> None:
        gen = self._gen
        c = gen.counters
        now = gen.elapsed
        self._window.append((now, c.completed, c.output_tokens))
        while len(self._window) > 2 and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.popleft()
        t0, n0, k0 = self._window[0]
        span = now - t0
        rps = (c.completed - n0) / span if span > 0 else 0.0
        tps = (c.output_tokens - k0) / span if span > 0 else 0.0
        completed = min(now, self._total) if self._by_time else c.completed
        errors = f"  [red]{c.errors:,} errors[/red]" if c.errors else ""
        self._progress.update(
            self._task,
            completed=completed,
            done=f"{c.completed:,} done, {c.in_flight} in flight",
            rates=f"{rps:,.1f} req/s  {tps:,.0f} tok/s{errors}",
        )
        self._progress.refresh()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._progress.start()
        task_status.started()
        try:
            while True:
                self._update()
                await trio.sleep(REFRESH_S)
        finally:
            self._update()
            self._progress.stop()
