"""Data-parallel servers whose ranks are counted at run time (``data_parallel_size = "auto"``).

Why: ``vllm serve --data-parallel-size N`` puts N engines behind one API, and the gateway
routes best to each rank as a worker of its own (``workers[].data_parallel_size``). Writing N
into the gateway's config twice (once for vLLM, once here) goes stale when a deployment
changes its size. With ``"auto"`` the monitor's probe counts the engines the server's
``/metrics`` names (vLLM's ``engine`` label) and this bookkeeping says which rank workers to
add and which to retire; the gateway applies it (:meth:`lmgw.gateway.Gateway.add_worker`,
drain, remove). Until the first count, and for a server without ranks, the entry is the one
worker it names. Sans-IO: no probe, no registry here.
"""

from __future__ import annotations

import logging

from ..config import ConfigError, WorkerConfig

log = logging.getLogger("lmgw")


class AutoRanks:
    """The ``"auto"`` entries, the rank count each was last found with, and their workers."""

    def __init__(self) -> None:
        self._entries: dict[str, WorkerConfig] = {}  #: entry id -> entry
        self._size: dict[str, int] = {}  #: entry id -> ranks in use (absent: one worker)
        self._owner: dict[str, str] = {}  #: worker id -> entry id

    def expand(self, entry: WorkerConfig) -> list[WorkerConfig]:
        """The workers ``entry`` stands for now (and, for an ``"auto"`` one, remember it)."""
        if not entry.auto_ranks:
            return entry.ranks()
        eid = entry.worker_id
        self._entries[eid] = entry
        workers = entry.ranks(self._size.get(eid))
        for wc in workers:
            self._owner[wc.worker_id] = eid
        return workers

    def owns(self, worker_id: str) -> bool:
        """Whether the worker stands for (a rank of) an ``"auto"`` entry."""
        return worker_id in self._owner

    def observe(self, worker_id: str, engines: int) -> tuple[list[WorkerConfig], list[str]]:
        """A probe of ``worker_id`` (one of :meth:`owns`) counted ``engines`` engines in its
        server's ``/metrics`` (0: none named, one engine). Returns the workers to add and the
        ids to retire when the count differs from the one in use, else nothing."""
        eid = self._owner[worker_id]
        size = max(engines, 1)
        if self._size.get(eid, 1) == size:
            return [], []
        entry = self._entries[eid]
        try:
            workers = entry.ranks(size)
        except ConfigError as exc:  # e.g. the ranks' KV event ports would run past 65535
            log.error("worker %s: its %d data-parallel ranks cannot be added: %s", eid, size, exc)
            return [], []
        old = {wid for wid, owner in self._owner.items() if owner == eid}
        new = {wc.worker_id for wc in workers}
        for wid in old - new:
            del self._owner[wid]
        for wid in new:
            self._owner[wid] = eid
        if size > 1:
            self._size[eid] = size
        else:
            self._size.pop(eid, None)
        log.info(
            "worker %s: the server has %s; now %d worker(s)",
            eid, f"{size} data-parallel ranks" if size > 1 else "no ranks", len(workers),
        )  # fmt: skip
        return [wc for wc in workers if wc.worker_id not in old], sorted(old - new)

    def forget(self, worker_id: str) -> None:
        """The worker left the fleet; the entry is forgotten with its last worker."""
        eid = self._owner.pop(worker_id, None)
        if eid is not None and eid not in self._owner.values():
            self._entries.pop(eid, None)
            self._size.pop(eid, None)
