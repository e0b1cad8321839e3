"""The process's own resources, as every Prometheus client exports them (``process_*``,
``python_gc_*``), plus the gateway's trio tasks and client connections.

Why: a gateway that runs for weeks must show its memory, open files and tasks staying flat;
the usual leak alerts and Grafana panels are written against the ``process_*`` names of the
official clients, so these use the same names and meanings. Everything is read at scrape time
from ``/proc`` (Linux) or the trio run: nothing is added to a request. The parsing is sans-IO
(pure functions over the files' text) so it is tested without a process to read.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from .metrics import Counter, Gauge, Metrics

#: fields of /proc/PID/stat after the command name (field 3 of proc(5) is index 0 here)
_UTIME, _STIME, _STARTTIME, _VSIZE, _RSS = 11, 12, 19, 20, 21


@dataclass(frozen=True, slots=True)
class ProcessStats:
    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time_s: float
    threads: int


def parse_stat(text: str, *, ticks: int, page_size: int, boot_time_s: float) -> ProcessStats:
    """``/proc/PID/stat``: the command name may hold spaces and parentheses, so the fields are
    counted from the last ``)``."""
    fields = text[text.rindex(")") + 2 :].split()
    return ProcessStats(
        cpu_seconds=(int(fields[_UTIME]) + int(fields[_STIME])) / ticks,
        resident_bytes=int(fields[_RSS]) * page_size,
        virtual_bytes=int(fields[_VSIZE]),
        start_time_s=boot_time_s + int(fields[_STARTTIME]) / ticks,
        threads=int(fields[17]),
    )


def parse_boot_time(text: str) -> float:
    """The ``btime`` line of ``/proc/stat`` (seconds since the epoch)."""
    for line in text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def parse_max_fds(text: str) -> float:
    """The soft limit of ``Max open files`` in ``/proc/PID/limits`` (inf when unlimited)."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return float("inf") if soft == "unlimited" else float(soft)
    raise ValueError("no 'Max open files' line")


def count_tasks(root: trio.lowlevel.Task) -> int:
    """Tasks alive in the trio run below ``root`` (itself included)."""
    n, stack = 0, [root]
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def current_tasks() -> int:
    """Tasks alive in the current trio run (0 outside one)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    return count_tasks(root) if root is not None else 0


class ProcessReader:
    """Reads this process's figures from ``proc`` (``/proc/self``); ``available`` is False
    where there is no procfs (the ``process_*`` series are then left out, as the official
    clients do)."""

    def __init__(self, proc: str | os.PathLike[str] = "/proc/self") -> None:
        self.proc = Path(proc)
        self.available = (self.proc / "stat").exists()
        self._ticks = os.sysconf("SC_CLK_TCK") if self.available else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if self.available else 4096
        self._boot: float | None = None

    def stats(self) -> ProcessStats | None:
        """Fresh figures (None without procfs): one small read, so each series of a scrape
        reads its own."""
        if not self.available:
            return None
        if self._boot is None:
            self._boot = parse_boot_time((self.proc.parent / "stat").read_text())
        text = (self.proc / "stat").read_text()
        return parse_stat(text, ticks=self._ticks, page_size=self._page, boot_time_s=self._boot)

    def open_fds(self) -> int:
        return len(os.listdir(self.proc / "fd"))

    def max_fds(self) -> float:
        return parse_max_fds((self.proc / "limits").read_text())


Samples = Iterable[tuple[tuple[str, ...], float]]


def gc_samples(key: str) -> Samples:
    """``gc.get_stats()``'s ``key`` (collections, collected, uncollectable) per generation,
    labelled as the official client labels them ("0", "1", "2")."""
    return [((str(i),), float(g[key])) for i, g in enumerate(gc.get_stats())]


def register_process_metrics(
    metrics: Metrics,
    *,
    connections: Callable[[], int | None],
    reader: ProcessReader | None = None,
) -> ProcessReader:
    """Add the ``process_*`` series (read at scrape time), ``lmgw_tasks`` and
    ``lmgw_client_connections`` to ``metrics``. ``connections`` counts the front door's open
    client connections (None: not known, e.g. under hypercorn; the series is left out)."""
    reader = reader or ProcessReader()

    def one(value: Callable[[], float]) -> Callable[[], Samples]:
        def collect() -> Samples:
            return [((), float(value()))] if reader.available else []

        return collect

    def stat(field: str) -> Callable[[], Samples]:
        def collect() -> Samples:
            s = reader.stats()
            return [((), float(getattr(s, field)))] if s is not None else []

        return collect

    def open_connections() -> Samples:
        n = connections()
        return [((), float(n))] if n is not None else []

    series: list[Counter | Gauge] = [
        Counter(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            collect=stat("cpu_seconds"),
        ),
        Gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            collect=stat("resident_bytes"),
        ),
        Gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            collect=stat("virtual_bytes"),
        ),
        Gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            collect=stat("start_time_s"),
        ),
        Gauge("process_open_fds", "Number of open file descriptors.", collect=one(reader.open_fds)),
        Gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            collect=one(reader.max_fds),
        ),
        Gauge(
            "process_threads",
            "OS threads of the process (trio's thread cache, the asyncio bridge, ZeroMQ's I/O"
            " thread, tokenizer pools).",
            collect=stat("threads"),
        ),
        Counter(
            "python_gc_collections_total",
            "Number of times this generation was collected.",
            ("generation",),
            collect=lambda: gc_samples("collections"),
        ),
        Counter(
            "python_gc_objects_collected_total",
            "Objects collected during gc.",
            ("generation",),
            collect=lambda: gc_samples("collected"),
        ),
        Counter(
            "python_gc_objects_uncollectable_total",
            "Uncollectable objects found during GC.",
            ("generation",),
            collect=lambda: gc_samples("uncollectable"),
        ),
        Gauge(
            "lmgw_tasks",
            "trio tasks alive in the gateway's run: steady under steady traffic; a count that"
            " keeps growing is a leak.",
            collect=lambda: [((), float(current_tasks()))],
        ),
        Gauge(
            "lmgw_client_connections",
            "Client connections open at the front door (keep-alive ones included).",
            collect=open_connections,
        ),
    ]
    for metric in series:
        metrics.add(metric)
    return reader
