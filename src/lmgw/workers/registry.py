"""Fleet membership and worker state, with cheap per-request reads.

Readers ask :meth:`Registry.candidates` for the routable workers of a (model, role); the answer
is a tuple cached until membership or state changes, so a request never rebuilds or scans the
fleet (ANCHORS.md complaint 22). Load accounting goes through :meth:`acquire` and
:meth:`release`, called around a dispatch with ``try/finally``, so success, error and
cancellation all release the in-flight count the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from .worker import Worker, WorkerState

log = logging.getLogger("lmgw.workers")


class WorkerExists(LookupError):
    """A worker with this id is registered already."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id


class Candidates(tuple):  # type: ignore[type-arg]
    """The routable workers of one (model, role) as :meth:`Registry.candidates` caches them,
    with their loads kept current: a load-aware policy reads every candidate's load in one
    list instead of touching each worker (at 500 workers, least load spent ~40 µs a request
    on that scan; ``min`` over the list is C code). The list is built on the first
    :meth:`loads` and then written by the workers themselves whenever their in-flight count or
    their engine's queue changes (:meth:`Worker.post_load`), until the fleet changes and the
    registry drops the tuple. A policy given any other sequence (a filtered list) reads the
    workers (:func:`lmgw.routing.policies.least_load.loads_of`)."""

    _loads: list[float] | None = None
    #: no worker of the (model, role) is routable: these are ejected ones whose health probe
    #: passes (panic routing), tried rather than failing every request
    panic = False
    #: whether every candidate is a native worker (:mod:`lmgw.pipeline.native` finds out once)
    native_only: bool | None = None

    def loads(self) -> list[float]:
        """Each candidate's :attr:`Worker.load`, in order (do not modify)."""
        loads = self._loads
        if loads is None:
            loads = self._loads = [w.load for w in self]
            for i, w in enumerate(self):
                w.boards.append((loads, i))
        return loads


class Registry:
    """The only writer of worker state."""

    def __init__(
        self,
        outlier_failures: int = 5,
        base_ejection_s: float = 2.0,
        max_ejection_s: float = 60.0,
        panic_routing: bool = True,
    ) -> None:
        self.outlier_failures = outlier_failures
        self.panic_routing = panic_routing
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self._workers: dict[str, Worker] = {}
        self._cache: dict[tuple[str, str], tuple[Worker, ...]] = {}  # Candidates, or has_model's
        self._listeners: list[Callable[[Worker], None]] = []
        self.generation = 0
        #: LoRA adapters some worker listed (name -> its parent, the base model); kept: a
        #: name stays an adapter
        self.lora_models: dict[str, str] = {}

    # -- membership ---------------------------------------------------------------------------
    def add(self, worker: Worker) -> Worker:
        if worker.id in self._workers:
            raise ValueError(f"worker {worker.id!r} is already registered")
        self._workers[worker.id] = worker
        self._changed(worker)
        return worker

    def remove(self, worker_id: str) -> Worker:
        worker = self._workers.pop(worker_id)
        worker.state = WorkerState.GONE
        self._changed(worker)
        return worker

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def subscribe(self, listener: Callable[[Worker], None]) -> None:
        """Call ``listener(worker)`` after every membership or state change."""
        self._listeners.append(listener)

    # -- state (written only here) ----------------------------------------------------------
    def set_state(self, worker: Worker, state: WorkerState, reason: str = "") -> None:
        if worker.state is state or worker.state is WorkerState.GONE:
            return
        log.info(
            "worker %s: %s -> %s%s",
            worker.id,
            worker.state.value,
            state.value,
            f" ({reason})" if reason else "",
        )
        worker.state = state
        if state is WorkerState.HEALTHY:
            worker.stuck = False
        if reason:
            worker.last_error = reason
        self._changed(worker)

    def set_models(self, worker: Worker, models: frozenset[str] | None) -> None:
        if worker.static_models is not None or worker.models == models:
            return
        worker.models = models
        self._changed(worker)

    def note_lora(self, adapters: Iterable[tuple[str, str]]) -> None:
        """(name, parent) of models some worker lists as LoRA adapters (``parent`` set in its
        /v1/models)."""
        self.lora_models.update(adapters)

    def set_adapters(self, worker: Worker, adapters: frozenset[str]) -> None:
        """The LoRA adapters the gateway loaded on ``worker`` (routing follows at once)."""
        if worker.adapters == adapters:
            return
        worker.adapters = adapters
        self._changed(worker)

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0

    def record_failure(self, worker: Worker, reason: str, *, eject: bool) -> None:
        """A request to ``worker`` failed. ``eject`` for failures that make it unroutable at once
        (refused connections); ``outlier_failures`` failures in a row eject it too (passive
        outlier detection). An ejected worker stays out for a backoff that doubles with each
        ejection in quick succession; then the monitor's probe may bring it back (half-open)."""
        worker.consecutive_failures += 1
        worker.last_error = reason
        if worker.state is not WorkerState.HEALTHY:
            return
        limit = self.outlier_failures
        if eject or (limit and worker.consecutive_failures >= limit):
            now = time.monotonic()
            if now - worker.ejected_at > self.max_ejection_s:
                worker.ejections = 0  # the last ejection is long past: start over
            worker.ejections += 1
            worker.ejected_at = now
            worker.ejected_until = now + min(
                self.max_ejection_s, self.base_ejection_s * 2 ** (worker.ejections - 1)
            )
            self.set_state(worker, WorkerState.EJECTED, reason)

    @staticmethod
    def acquire(worker: Worker) -> None:
        """Count a request in flight on ``worker``; pair with :meth:`release` in a ``finally``.

        (Not a context manager: a generator-based one costs ~2 us per request on the hot path.)
        """
        worker.in_flight += 1
        worker.total_requests += 1

    @staticmethod
    def release(worker: Worker) -> None:
        worker.in_flight -= 1

    # -- reads ------------------------------------------------------------------------------
    def candidates(self, model: str, role: str) -> Candidates:
        """The routable workers of ``model`` for ``role``; with none, and ``panic_routing``,
        the ejected ones whose health probe passes and that were not found stuck (``panic``
        set). Cached until the fleet changes."""
        key = (model, role)
        found = self._cache.get(key)
        if found is None:
            found = Candidates(
                w
                for w in self._workers.values()
                if w.role == role and w.routable and w.serves(model)
            )
            if not found and self.panic_routing:
                found = Candidates(
                    w
                    for w in self._workers.values()
                    if w.role == role
                    and w.state is WorkerState.EJECTED
                    and w.probe_ok
                    and not w.stuck
                    and w.serves(model)
                )
                found.panic = bool(found)
            self._cache[key] = found
        return found  # type: ignore[return-value]

    def probed(self, worker: Worker, ok: bool) -> None:
        """The monitor's verdict on ``worker``'s health probe. An ejected worker's verdict
        changes the panic sets (:meth:`candidates`); its state stays (no listener hears)."""
        if worker.probe_ok is not ok:
            worker.probe_ok = ok
            if worker.state is WorkerState.EJECTED:
                self._invalidate()

    def _invalidate(self) -> None:
        """Drop the cached candidate tuples (and their boards): the fleet changed."""
        self.generation += 1
        for cached in self._cache.values():  # every cached tuple goes: so do their boards
            if type(cached) is Candidates and cached._loads is not None:
                for w in cached:
                    w.boards.clear()
        self._cache.clear()

    def has_model(self, model: str) -> bool:
        """True when some registered worker (in any state) serves or may serve ``model``.
        Cached per (model) until the fleet changes: asked on every request."""
        key = (model, "")
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = tuple(w for w in self._workers.values() if w.serves(model))
        return bool(found)

    def known_models(self) -> set[str]:
        out: set[str] = set()
        for w in self._workers.values():
            if w.models is not None:
                out |= w.models
            out |= w.adapters
        return out

    def _changed(self, worker: Worker) -> None:
        self._invalidate()
        for listener in self._listeners:
            listener(worker)
