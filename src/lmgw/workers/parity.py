"""The tokenization parity self-test, run against each worker as it becomes healthy.

For every model the worker serves that has a gateway-side tokenizer, the gateway renders and
tokenizes the probes of :mod:`lmgw.text.parity` itself and asks the worker's ``/tokenize`` for
the same; any difference marks the model's token-level routing unsafe (routing then falls back
to byte-level keys), logs the first differing position, and shows in
``lmgw_tokenizer_parity{model,worker}`` (1 match, 0 mismatch). A worker without ``/tokenize``
(404) or a probe the template refuses is "skipped" and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
import trio

from ..config import is_native_url
from ..text.parity import (
    ParityVerdict,
    build_probes,
    compare_tokens,
    parse_tokenize_response,
    skipped,
    summarize,
)
from ..text.service import ModelText
from .worker import Worker, WorkerState

if TYPE_CHECKING:
    from ..metrics import Gauge
    from ..transport.pool import ConnectionPool
    from .registry import Registry

log = logging.getLogger("lmgw.parity")
_JSON = [(b"content-type", b"application/json")]


def _native(worker: Worker) -> bool:
    return is_native_url(worker.url)


class ParityChecker:
    """Checks each worker once per (worker, model) when it turns healthy; owned by the Gateway."""

    def __init__(
        self,
        registry: Registry,
        pool: ConnectionPool,
        texts: Mapping[str, ModelText],
        gauge: Gauge,
        timeout_s: float = 10.0,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.texts = texts
        self.gauge = gauge
        self.timeout_s = timeout_s
        #: model -> False once any worker's tokenization differed from the gateway's
        self.token_routing_safe: dict[str, bool] = {name: True for name in texts}
        self.reports: dict[tuple[str, str], str] = {}  # (model, worker) -> reason, for admin
        self._done: set[tuple[str, str]] = set()
        self._queue: list[Worker] = []
        self._wake = trio.Event()

    def _on_change(self, worker: Worker) -> None:
        # native workers take token ids from the gateway: there is nothing to compare
        if worker.state is WorkerState.HEALTHY and worker.role != "e" and not _native(worker):
            self._queue.append(worker)
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.registry.subscribe(self._on_change)
        for worker in self.registry:
            self._on_change(worker)
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            queue, self._queue = self._queue, []
            async with trio.open_nursery() as nursery:
                for worker in dict.fromkeys(queue):  # each once, in order
                    nursery.start_soon(self.check_worker, worker)

    async def check_worker(self, worker: Worker) -> None:
        for name, text in self.texts.items():
            key = (name, worker.id)
            if key in self._done or not worker.serves(name):
                continue
            if worker.models is None:
                continue  # not discovered yet: checked when its models are known
            self._done.add(key)
            verdicts = []
            for probe in build_probes(text.tokenizer):
                verdicts.append(await self._probe(worker, name, text, probe))
            report = summarize(verdicts)
            checked = [v for v in verdicts if v.status != "skipped"]
            if not checked:
                log.info("parity %s on %s: skipped (%s)", name, worker.id, report.reason)
                continue
            self.gauge.set((name, worker.id), 1.0 if report.safe else 0.0)
            self.reports[key] = report.reason
            if report.safe:
                log.info("parity %s on %s: tokens match", name, worker.id)
            else:
                self.token_routing_safe[name] = False
                log.warning(
                    "parity %s on %s: the gateway tokenizes differently from the worker; token-"
                    "level routing for this model falls back to byte-level keys: %s",
                    name, worker.id, report.reason,
                )  # fmt: skip

    async def _probe(self, worker: Worker, model: str, text: ModelText, probe) -> ParityVerdict:
        try:
            ours = probe.gateway_tokens(text.tokenizer, text.template)
        except Exception as exc:  # the template refuses the probe (e.g. no system role)
            return skipped(probe.name, f"gateway: {exc}")
        body = msgspec.json.encode(probe.tokenize_body(model))
        try:
            with trio.fail_after(self.timeout_s):
                resp = await self.pool.request(worker.origin, "POST", "/tokenize", _JSON, body)
                try:
                    answer = await resp.read_all(8 << 20)
                finally:
                    resp.release()
        except Exception as exc:  # unreachable, timed out: nothing learned
            return skipped(probe.name, f"worker /tokenize failed: {exc}")
        if resp.status != 200:
            return skipped(probe.name, f"worker /tokenize answered {resp.status}")
        try:
            theirs = parse_tokenize_response(answer)
        except ValueError as exc:
            return skipped(probe.name, f"worker /tokenize answer unreadable: {exc}")
        return compare_tokens(
            probe.name, ours, theirs, token_strs=text.tokenizer.convert_ids_to_tokens
        )
