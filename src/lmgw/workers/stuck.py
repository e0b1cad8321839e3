"""Which workers are stuck: requests in flight, and their engine processing no token at all.

Why: an engine that hangs (a deadlocked collective, a wedged scheduler) usually keeps its API
server up, so ``/health`` still passes; requests sent to it wait for the whole request
deadline, and since nothing fails, outlier ejection never takes it out (the "requests hang
silently after worker selection" that operators report against other routers). A healthy vLLM
engine with work counts prompt and generated tokens at every step (``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, chunked prefill included), so a worker whose counters stand
still for ``health.stuck_timeout_s`` while this gateway has requests on it is stuck, however
its probe answers. Engines whose ``/metrics`` has no such counters are never judged, nor are
those whose counters were never seen to move (a vLLM started with ``--disable-log-stats`` may
list them and never count).

Sans-IO: the monitor feeds one observation per scrape and ejects on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Seen:
    tokens: float
    since: float  #: when the counters last moved, or the worker last had nothing in flight
    moved: bool = False  #: the counters were seen to change: the engine does count


class ProgressWatch:
    """Per worker: since when it has had requests in flight and no token processed."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s  #: 0: off
        self._seen: dict[str, _Seen] = {}

    def observe(self, worker_id: str, now: float, in_flight: int, tokens: float | None) -> float:
        """One scrape's figures: the requests in flight through this gateway and the engine's
        processed-token count (None: it reports none). Returns how long the worker has been
        stuck when that reaches ``timeout_s`` (the clock then starts over: one verdict per
        timeout), else 0."""
        if not self.timeout_s or tokens is None:
            self._seen.pop(worker_id, None)
            return 0.0
        seen = self._seen.get(worker_id)
        if seen is None:
            self._seen[worker_id] = _Seen(tokens, now)
            return 0.0
        if tokens != seen.tokens:
            seen.tokens, seen.since, seen.moved = tokens, now, True
            return 0.0
        if in_flight <= 0:
            seen.since = now
            return 0.0
        stalled = now - seen.since
        if stalled < self.timeout_s or not seen.moved:
            return 0.0
        seen.since = now
        return stalled

    def reset(self, worker_id: str) -> None:
        """Forget ``worker_id`` (removed, or ejected: it starts over when it is back)."""
        self._seen.pop(worker_id, None)
