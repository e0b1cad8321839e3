"""The decode retry of :meth:`DisaggRunner._final` against a scripted pipeline: which worker
each attempt goes to, decided without a fleet (the policies here always take the first
candidate, so a retry that may reach a worker will)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from lmgw.errors import GatewayError
from lmgw.pipeline.disagg import DisaggRunner
from lmgw.transport.dialects import (
    ClientBody,
    HandOff,
    Peer,
    StageContext,
    StageRequest,
    get_dialect,
)
from lmgw.transport.pool import Origin


@dataclass(eq=False)
class _Worker:
    id: str
    origin: Any = field(default_factory=lambda: Origin("10.0.0.9", 8000))
    kv_address: str | None = None
    bootstrap_port: int | None = None


@dataclass
class _Registry:
    workers: list[_Worker]

    def candidates(self, model: str, role: str) -> list[_Worker]:
        return list(self.workers)


class _First:
    def choose(self, candidates: list[_Worker], ctx: Any) -> _Worker:
        return candidates[0]


@dataclass
class _Metrics:
    retries: Any = field(default_factory=lambda: _Count())


class _Count:
    def inc(self, labels: tuple) -> None:
        pass


@dataclass
class _Pipeline:
    """Answers each decode attempt from ``outcomes`` (worker id -> failure or None)."""

    registry: _Registry
    outcomes: dict[str, GatewayError | None]
    sent_to: list[str] = field(default_factory=list)
    policies: dict[str, Any] = field(default_factory=lambda: {"d": _First()})
    metrics: _Metrics = field(default_factory=_Metrics)

    async def dispatch(self, greq: Any, responder: Any, role: str, worker: _Worker, *a: Any,
                       **kw: Any) -> GatewayError | None:  # fmt: skip
        self.sent_to.append(worker.id)
        return self.outcomes[worker.id]

    async def backoff(self, attempt: int) -> None:
        await trio.lowlevel.checkpoint()


@dataclass
class _Request:
    request_id: str = "r1"
    model: str = "m"


def _not_delivered() -> GatewayError:
    failure = GatewayError(502, "cannot connect")
    failure.delivered = False
    return failure


@pytest.mark.parametrize("avoid", [(), ("d-bad",)])
async def test_a_same_handoff_retry_avoids_the_decode_workers_that_failed_already(
    avoid: tuple[str, ...],
) -> None:
    """d-dead could not be reached: the hand-off is intact, so the retry keeps it, on another
    decode worker; one that failed this request before (a restarted pair's first decode) is
    skipped when the caller names it."""
    bad, dead, good = _Worker("d-bad"), _Worker("d-dead"), _Worker("d-good")
    pipe = _Pipeline(
        _Registry([bad, dead, good]),
        {"d-dead": _not_delivered(), "d-bad": GatewayError(500, "oom"), "d-good": None},
    )
    runner = DisaggRunner(pipe)  # type: ignore[arg-type]
    leg = StageRequest("/v1/chat/completions", [], b"{}", "decode")
    handoff = HandOff("vllm-nixl", None, prefill_done=True)
    named = tuple(w for w in (bad, dead, good) if w.id in avoid)
    failed = False
    try:
        await runner._final(
            _Request(), None, leg, dead, "d", get_dialect("vllm-nixl"), handoff, None,
            avoid=named,
        )  # fmt: skip
    except GatewayError:
        failed = True
    if avoid:
        assert pipe.sent_to == ["d-dead", "d-good"] and not failed
    else:  # without the caller's word, the first other candidate: the one that failed before
        assert pipe.sent_to == ["d-dead", "d-bad"] and failed


class _Runner(DisaggRunner):
    """The prefill leg answered at once (what is tested here is the decode side)."""

    prefills = 0

    async def _prefill(self, greq: Any, body: Any, ctx: Any, dialect: Any, prefill: Any,
                       route: Any) -> Any:  # fmt: skip
        self.prefills += 1
        pre = dialect.prefill_request(body, ctx)
        return pre, 200, b'{"kv_transfer_params": {"remote_block_ids": [1]}}', ctx


async def test_a_restarted_pair_passes_on_the_decode_that_failed() -> None:
    """d-bad failed after getting the request (a NIXL decode may have pulled the blocks): a
    fresh pair with d-dead, which cannot be reached; its retry keeps the new hand-off and goes
    to d-good, never back to d-bad."""
    bad, dead, good = _Worker("d-bad"), _Worker("d-dead"), _Worker("d-good")
    pipe = _Pipeline(
        _Registry([bad, dead, good]),
        {"d-dead": _not_delivered(), "d-bad": GatewayError(500, "oom"), "d-good": None},
    )
    runner = _Runner(pipe)  # type: ignore[arg-type]
    ctx = StageContext(
        request_id="r1", path="/v1/chat/completions", headers=[],
        prefill=Peer("10.0.0.1", 8100), decode=Peer("10.0.0.2", 8200),
    )  # fmt: skip
    body = ClientBody(b'{"model": "m", "messages": [], "max_tokens": 4}')
    await runner._prefill_decode(
        _Request(), None, body, ctx, get_dialect("vllm-nixl"), _Worker("p0"), bad, None
    )
    assert pipe.sent_to == ["d-bad", "d-dead", "d-good"]
    assert runner.prefills == 2  # the restarted pair's own prefill
