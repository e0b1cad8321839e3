"""LoRA adapters across the fleet: load and unload on every worker at once, and keep them loaded.

Why: vLLM loads a LoRA adapter at run time into one engine (``POST /v1/load_lora_adapter``, with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). Behind a gateway that is one call per replica, and a
replica that restarts, or joins later, silently lacks the adapter: requests for it then fail
or pile onto the replicas that have it. The gateway knows the fleet, so it does the fan-out
and remembers what should be loaded where:

* :meth:`AdapterManager.load` sends the load to every healthy worker of the adapter's base
  model (both sides of a P/D pair: the KV cache is computed with the adapter), concurrently,
  and marks it served by those that answered (routing sends the adapter's requests to them
  only, at once: no wait for the next ``/v1/models`` probe);
* :meth:`AdapterManager.run` (a service task of the gateway) reconciles: a healthy worker that
  should have an adapter and whose ``/v1/models`` does not list it (restarted, or new) gets it
  loaded again; a failed load is retried after a backoff, never in a tight loop;
* :meth:`AdapterManager.unload` unloads it everywhere and forgets it.

State lives in this process (a restarted gateway forgets its adapters; the workers keep them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import msgspec
import trio

from ..config import is_native_url
from ..errors import DECODE_ERRORS, GatewayError
from ..metrics import Gauge, Metrics
from ..transport.pool import ConnectionPool, UpstreamError
from .registry import Registry
from .worker import Worker, WorkerState

log = logging.getLogger("lmgw.lora")

#: roles that generate (and so apply the adapter); encoders do not
ROLES = ("pd", "p", "d")
#: one load may read the adapter from disk or a hub: seconds, not milliseconds
LOAD_TIMEOUT_S = 120.0
#: a worker that refused a load is asked again after this long
RETRY_S = 30.0


class Adapter(msgspec.Struct):
    """An adapter the gateway manages: where to load it from and where it is loaded."""

    name: str
    path: str
    #: the base model it applies to (only workers serving it get it); None: every worker
    base: str | None = None
    #: worker id -> monotonic time of the last failed attempt, and why
    failed: dict[str, tuple[float, str]] = {}


class AdapterManager:
    """See the module docstring. ``auth``: the workers' bearer header value (upstream.api_key)."""

    def __init__(
        self,
        registry: Registry,
        pool: ConnectionPool,
        auth: bytes | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        if metrics is not None:  # read at scrape time: nothing per request
            metrics.add(
                Gauge(
                    "lmgw_lora_adapter_workers",
                    "Workers holding each LoRA adapter loaded through the gateway (fewer than"
                    " the fleet: some load failed, see GET /admin/lora_adapters).",
                    ("adapter",),
                    collect=self._holder_samples,
                )
            )
        self._headers = [(b"content-type", b"application/json")]
        if auth:
            self._headers.append((b"authorization", auth))
        self.adapters: dict[str, Adapter] = {}
        #: (worker id, adapter) loads in flight: reconciliation does not start a second one
        self._pending: set[tuple[str, str]] = set()
        self._wake = trio.Event()

    # -- where an adapter belongs ---------------------------------------------------------------
    @staticmethod
    def _eligible(worker: Worker, adapter: Adapter) -> bool:
        if worker.role not in ROLES or is_native_url(worker.url):
            return False
        if adapter.base is None or worker.models is None:
            return True
        return adapter.base in worker.models

    def targets(self, adapter: Adapter) -> list[Worker]:
        """The healthy workers that should hold ``adapter``."""
        return [
            w
            for w in self.registry
            if w.state is WorkerState.HEALTHY and self._eligible(w, adapter)
        ]

    def holders(self, name: str) -> list[Worker]:
        return [w for w in self.registry if name in w.adapters]

    def _holder_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for name in self.adapters:
            yield (name,), float(len(self.holders(name)))

    # -- the operations (admin API) ------------------------------------------------------------
    async def load(
        self, name: str, path: str, base: str | None = None, inplace: bool = False
    ) -> dict:
        """Load ``name`` from ``path`` on every target worker; the outcome per worker.

        Raises GatewayError: 409 for a name loaded from another path (unless ``inplace``:
        vLLM's reload), 503 with no target worker, 502 when no worker took it (the adapter is
        then forgotten: a bad path is not retried forever).
        """
        known = self.adapters.get(name)
        if known is not None and (known.path != path or known.base != base) and not inplace:
            raise GatewayError(
                409,
                f"adapter `{name}` is loaded from {known.path!r}; unload it first or load it"
                " with load_inplace",
                param="lora_path",
            )
        adapter = Adapter(name, path, base)
        targets = self.targets(adapter)
        if not targets:
            what = f"serving `{base}`" if base else "that can take an adapter"
            raise GatewayError(503, f"no healthy worker {what}", param="model")
        self.adapters[name] = adapter
        results = await self._on_all(targets, adapter, inplace)
        loaded = [w.id for w, error in results if error is None]
        failed = {w.id: error for w, error in results if error is not None}
        if not loaded:
            del self.adapters[name]
            reasons = "; ".join(f"{wid}: {why}" for wid, why in sorted(failed.items()))
            raise GatewayError(502, f"no worker loaded adapter `{name}`: {reasons}")
        log.info("LoRA adapter %s loaded on %s%s", name, ", ".join(loaded),
                 f" (failed on {', '.join(sorted(failed))})" if failed else "")  # fmt: skip
        return self._summary(adapter, failed)

    async def unload(self, name: str) -> dict:
        """Unload ``name`` wherever it is loaded and forget it: where the gateway loaded it,
        and on workers that list it as an adapter of their own (started with it); 404 when
        no worker has it."""
        self.adapters.pop(name, None)
        holders = [
            w
            for w in self.registry
            if name in w.adapters
            or (name in self.registry.lora_models and w.models is not None and name in w.models)
        ]
        if not holders:
            raise GatewayError(404, f"no worker holds a LoRA adapter `{name}`")
        failed: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            for worker in holders:
                nursery.start_soon(self._unload_one, worker, name, failed)
        return {"object": "lora_adapter", "lora_name": name, "unloaded": sorted(
            w.id for w in holders if w.id not in failed), "failed": failed}  # fmt: skip

    def describe(self) -> list[dict]:
        return [self._summary(a) for a in sorted(self.adapters.values(), key=lambda a: a.name)]

    def _summary(self, adapter: Adapter, failed: dict[str, str] | None = None) -> dict:
        if failed is None:
            failed = {wid: why for wid, (_, why) in adapter.failed.items()}
        return {
            "object": "lora_adapter",
            "lora_name": adapter.name,
            "lora_path": adapter.path,
            "model": adapter.base,
            "loaded": sorted(w.id for w in self.holders(adapter.name)),
            "failed": failed,
        }

    # -- the wire ------------------------------------------------------------------------------
    async def _on_all(
        self, workers: Iterable[Worker], adapter: Adapter, inplace: bool = False
    ) -> list[tuple[Worker, str | None]]:
        results: list[tuple[Worker, str | None]] = []

        async def one(worker: Worker) -> None:
            results.append((worker, await self._load_one(worker, adapter, inplace)))

        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(one, worker)
        return results

    async def _post(self, worker: Worker, path: str, payload: dict) -> tuple[int, bytes]:
        with trio.fail_after(LOAD_TIMEOUT_S):
            resp = await self.pool.request(
                worker.origin, "POST", path, self._headers, msgspec.json.encode(payload)
            )
            try:
                body = await resp.read_all(1 << 20)
            finally:
                resp.release()
        return resp.status, body

    async def _load_one(self, worker: Worker, adapter: Adapter, inplace: bool) -> str | None:
        """Load on one worker; None on success (or when it already had it), else why not."""
        key = (worker.id, adapter.name)
        self._pending.add(key)
        try:
            return await self._load(worker, adapter, inplace)
        finally:
            self._pending.discard(key)

    async def _load(self, worker: Worker, adapter: Adapter, inplace: bool) -> str | None:
        payload: dict = {"lora_name": adapter.name, "lora_path": adapter.path}
        if inplace:
            payload["load_inplace"] = True
        try:
            status, body = await self._post(worker, "/v1/load_lora_adapter", payload)
        except (UpstreamError, trio.TooSlowError) as exc:
            error = getattr(exc, "message", None) or f"no answer within {LOAD_TIMEOUT_S:g} s"
        else:
            if status == 200 or (status == 400 and b"already been loaded" in body):
                adapter.failed.pop(worker.id, None)
                self._mark(worker, adapter.name, True)
                return None
            error = f"{status}: {_message(body)}"
        adapter.failed[worker.id] = (time.monotonic(), error)
        log.warning("LoRA adapter %s: load on %s failed: %s", adapter.name, worker.id, error)
        return error

    async def _unload_one(self, worker: Worker, name: str, failed: dict[str, str]) -> None:
        self._mark(worker, name, False)  # no new requests for it there, whatever comes back
        try:
            status, body = await self._post(worker, "/v1/unload_lora_adapter", {"lora_name": name})
        except (UpstreamError, trio.TooSlowError) as exc:
            failed[worker.id] = getattr(exc, "message", None) or "no answer"
            return
        if status not in (200, 404):  # 404: it was gone already
            failed[worker.id] = f"{status}: {_message(body)}"

    def _mark(self, worker: Worker, name: str, loaded: bool) -> None:
        """Route ``name`` to ``worker`` (or stop) now, without waiting for its next probe.
        A worker whose models are discovered lists it (or not) at once too: its next
        ``/v1/models`` then tells whether it still has it."""
        adapters = worker.adapters | {name} if loaded else worker.adapters - {name}
        self.registry.set_adapters(worker, adapters)
        if worker.static_models is None and worker.models is not None:
            models = worker.models | {name} if loaded else worker.models - {name}
            self.registry.set_models(worker, models)

    # -- reconciliation ------------------------------------------------------------------------
    def _on_change(self, worker: Worker) -> None:
        if self.adapters:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile whenever the fleet changes (a worker joins, turns healthy, reports its
        models), and every RETRY_S for loads that failed."""
        self.registry.subscribe(self._on_change)
        task_status.started()
        while True:
            with trio.move_on_after(RETRY_S):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.reconcile()

    async def reconcile(self) -> None:
        """Load each managed adapter on the healthy workers that should have it and do not."""
        now = time.monotonic()
        work: list[tuple[Worker, Adapter]] = []
        for adapter in list(self.adapters.values()):
            name = adapter.name
            for worker in self.targets(adapter):
                if name in worker.adapters:
                    # listed by its /v1/models, or not knowable (models fixed by config)
                    if worker.static_models is not None or worker.models is None:
                        continue
                    if name in worker.models:
                        continue
                    self._mark(worker, name, False)  # it lost it (restarted): stop routing
                last = adapter.failed.get(worker.id)
                if last is not None and now - last[0] < RETRY_S:
                    continue
                if (worker.id, name) in self._pending:
                    continue
                work.append((worker, adapter))
        if not work:
            return
        async with trio.open_nursery() as nursery:
            for worker, adapter in work:
                log.info("LoRA adapter %s: loading on %s (reconciling)", adapter.name, worker.id)
                nursery.start_soon(self._load_one, worker, adapter, False)


def _message(body: bytes) -> str:
    """A worker's error body, shortened: vLLM's {"error": {"message"}} or its text."""
    try:
        obj = msgspec.json.decode(body)
    except DECODE_ERRORS:
        return body[:200].decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:200]
        if isinstance(obj.get("message"), str):
            return obj["message"][:200]
    return body[:200].decode("utf-8", "replace")
