"""Batches: an input file's requests checked, run on the fleet in the background, their answers
collected in an output file (and the failed ones in an error file), as OpenAI's Batch API does.

A batch is checked first (``validating``): every line a JSON object with a unique
``custom_id``, ``"method": "POST"``, the batch's ``url`` and a JSON object ``body`` that does
not ask for a stream; any bad line fails the whole batch with the lines' errors, as OpenAI
does. Then (``in_progress``) its requests run through the gateway's own handlers (the same
model routes, keys' model lists, admission, routing, retries and failover as a client's
request), at most ``batches.concurrency`` at once across all batches, queued at the
admission priority ``batches.priority`` (vLLM's meaning: higher runs later) so that while the
gateway is at its cap interactive requests go first; the body the worker gets is the line's
own. Each answer becomes an output line (``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}``); an answer with an error status goes to the error
file instead. ``finalizing`` writes the files (in input order), then ``completed``.

A batch can be cancelled (``cancelling``: its requests in flight are cancelled, aborting them
on their workers; then ``cancelled`` with the answers so far); one still running after its
``completion_window`` (24 h) ends ``expired`` the same way. The batch belongs to the API key
that made it, and its requests run as that key (its model list applies), without spending the
key's per-request rate limit: the upload was the client's request.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from ..config import BatchesConfig
from ..errors import DECODE_ERRORS, error_body
from ..http.local import Collector, LocalRequest
from ..metrics import Counter, Gauge, Metrics
from .files import FileError, FileStore

_log = logging.getLogger("lmgw.batch")

#: what a batch may run: the endpoints OpenAI's Batch API takes that the gateway serves
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: the one completion window OpenAI accepts
WINDOWS = {"24h": 86400.0}
#: errors reported per failed check, at most (a file of 50,000 bad lines says the first ones)
_MAX_ERRORS = 100
_JSON_CT = (b"content-type", b"application/json")

App = Callable[[Any, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch input file."""

    custom_id: str
    body: bytes
    number: int  # 1-based line of the file


def parse_input(data: bytes, url: str, max_lines: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """A batch input file's requests, or the errors that fail the batch (OpenAI's ``errors``
    data: ``code``, ``message``, ``line``). Sans-IO."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(code: str, message: str, number: int | None) -> None:
        if len(errors) < _MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": None, "line": number})

    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            bad("too_many_requests", f"a batch takes at most {max_lines} requests", number)
            break
        try:
            obj = msgspec.json.decode(raw)
        except DECODE_ERRORS:
            bad("invalid_json", "the line is not valid JSON", number)
            continue
        if not isinstance(obj, dict):
            bad("invalid_request", "the line is not a JSON object", number)
            continue
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad("missing_custom_id", "`custom_id` must be a non-empty string", number)
            continue
        if custom_id in seen:
            bad("duplicate_custom_id", f"`custom_id` {custom_id!r} is used twice", number)
            continue
        seen.add(custom_id)
        if obj.get("method") != "POST":
            bad("invalid_method", "`method` must be POST", number)
            continue
        if obj.get("url") != url:
            bad("invalid_url", f"`url` must be the batch's endpoint, {url}", number)
            continue
        body = obj.get("body")
        if not isinstance(body, dict):
            bad("invalid_body", "`body` must be a JSON object", number)
            continue
        if body.get("stream"):
            bad("invalid_body", "a batch request cannot stream", number)
            continue
        lines.append(Line(custom_id, msgspec.json.encode(body), number))
    if not lines and not errors:
        bad("empty_file", "the input file holds no request", None)
    return lines, errors


@dataclass(slots=True)
class BatchJob:
    """One batch: its definition, state, counts, files and the cancel scope of its run."""

    id: str
    owner: str | None
    principal: Any  # the owner's lmgw.auth.KeyEntry (None without keys)
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: float
    expires_at: float
    status: str = "validating"
    times: dict[str, float] = field(default_factory=dict)  # in_progress_at, ... -> when
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def describe(self) -> dict[str, Any]:
        """The OpenAI batch object."""
        at = {k: int(v) for k, v in self.times.items()}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": at.get("in_progress_at"),
            "expires_at": int(self.expires_at),
            "finalizing_at": at.get("finalizing_at"),
            "completed_at": at.get("completed_at"),
            "failed_at": at.get("failed_at"),
            "expired_at": at.get("expired_at"),
            "cancelling_at": at.get("cancelling_at"),
            "cancelled_at": at.get("cancelled_at"),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")


class BatchService:
    """The gateway's batches and the nursery they run in (owned by the gateway)."""

    def __init__(
        self,
        cfg: BatchesConfig,
        app: App,
        request_timeout_s: float | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        #: batch requests that ended, by outcome (ok: a 2xx/3xx answer; error: any other)
        self.request_outcomes = Counter(
            "lmgw_batch_requests_total",
            "Requests of batches (/v1/batches) that ended, by outcome: ok (a 2xx or 3xx"
            " answer, in the output file) or error (in the error file).",
            ("outcome",),
        )
        if metrics is not None:
            metrics.add(self.request_outcomes)
            metrics.add(
                Gauge(
                    "lmgw_batches",
                    "Batches the gateway knows, by status (validating, in_progress, finalizing,"
                    " completed, failed, expired, cancelling, cancelled).",
                    ("status",),
                    collect=self._by_status,
                )
            )
            metrics.add(
                Gauge(
                    "lmgw_batch_file_bytes",
                    "Bytes held by the Files API's store (inputs and outputs), against"
                    " batches.max_total_bytes.",
                    collect=lambda: [((), float(self.files.total_bytes))],
                )
            )
        #: limits.request_timeout_s: a batch request's deadline, as a client's
        self.request_timeout_s = request_timeout_s
        self.files = FileStore(cfg.max_file_bytes, cfg.max_total_bytes, cfg.retention_s)
        self._app = app  # the gateway's handler behind the key check
        self._clock = clock
        self._limiter = trio.CapacityLimiter(cfg.concurrency)
        self._nursery: trio.Nursery | None = None
        self.jobs: dict[str, BatchJob] = {}

    def now(self) -> float:
        return self._clock()

    def _by_status(self) -> list[tuple[tuple[str, ...], float]]:
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.status] = counts.get(job.status, 0) + 1
        return [((status,), float(n)) for status, n in sorted(counts.items())]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the batches' runs; forget old files and finished batches now and then."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(60.0)
                    self.expire(self.now())
            finally:
                self._nursery = None

    def expire(self, now: float) -> None:
        self.files.expire(now)
        for job in [j for j in self.jobs.values() if j.done]:
            if now - job.created_at > self.cfg.retention_s:
                del self.jobs[job.id]

    # -- the API's operations -----------------------------------------------------------------
    def create(
        self,
        principal: Any,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> BatchJob:
        """Start a batch; ValueError (a 400) for an unknown file, endpoint or window;
        RuntimeError when the service is not running."""
        owner = principal.name if principal is not None else None
        source = self.files.get(input_file_id, owner)
        if source is None:
            raise LookupError(f"no file {input_file_id!r}")
        if source.purpose != "batch":
            raise ValueError(f"file {input_file_id!r} has purpose {source.purpose!r}, not batch")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        window = WINDOWS.get(completion_window)
        if window is None:
            raise ValueError(f"completion_window must be 24h, got {completion_window!r}")
        if self._nursery is None:
            raise RuntimeError("the batch service is not running")
        now = self.now()
        job = BatchJob(
            "batch_" + secrets.token_hex(12), owner, principal, endpoint, input_file_id,
            completion_window, metadata, now, now + window,
        )  # fmt: skip
        self.jobs[job.id] = job
        self._nursery.start_soon(self._execute, job, source.data, window)
        return job

    def get(self, batch_id: str, owner: str | None) -> BatchJob | None:
        job = self.jobs.get(batch_id)
        return job if job is not None and job.owner == owner else None

    def owned(self, owner: str | None) -> list[BatchJob]:
        """``owner``'s batches, newest first."""
        mine = [j for j in self.jobs.values() if j.owner == owner]
        return sorted(mine, key=lambda j: j.created_at, reverse=True)

    def cancel(self, job: BatchJob) -> None:
        """Stop a batch: its requests in flight are cancelled, the answers so far kept."""
        if job.done or job.status == "cancelling":
            return
        job.status = "cancelling"
        job.times["cancelling_at"] = self.now()
        job.scope.cancel()

    # -- running a batch ----------------------------------------------------------------------
    async def _execute(self, job: BatchJob, data: bytes, window: float) -> None:
        lines, errors = parse_input(data, job.endpoint, self.cfg.max_lines)
        if errors or job.status == "cancelling":
            self._finish(job, "failed" if errors else "cancelled", {}, lines)
            job.errors = errors or None
            return
        job.total = len(lines)
        job.status = "in_progress"
        job.times["in_progress_at"] = self.now()
        results: dict[int, tuple[bool, bytes]] = {}  # line index -> (ok, output line)
        job.scope.deadline = trio.current_time() + window
        with job.scope:
            async with trio.open_nursery() as nursery:
                for i, line in enumerate(lines):
                    await self._limiter.acquire_on_behalf_of((job.id, i))
                    nursery.start_soon(self._one, job, i, line, results)
        if job.status == "cancelling":
            state = "cancelled"
        elif job.scope.cancelled_caught:
            state = "expired"
        else:
            state = "completed"
        self._finish(job, state, results, lines)

    async def _one(
        self, job: BatchJob, i: int, line: Line, results: dict[int, tuple[bool, bytes]]
    ) -> None:
        try:
            rid = f"{job.id}-{line.number}"
            req = LocalRequest(job.endpoint, [_JSON_CT, (b"x-request-id", rid.encode())], line.body)
            req.principal = job.principal
            req.priority = self.cfg.priority
            out = Collector()
            with trio.CancelScope() as deadline:
                if self.request_timeout_s:
                    deadline.deadline = req.deadline = trio.current_time() + self.request_timeout_s
                await self._app(req, out)
            status, body = out.status, out.body()
            if deadline.cancelled_caught:
                status = 504
                body = error_body(504, f"request {rid} exceeded the gateway deadline")
            elif not out.finished:
                status = 500
                body = error_body(500, f"request {rid} got no answer")
            try:
                answer: Any = msgspec.json.decode(body)
            except DECODE_ERRORS:
                answer = body.decode(errors="replace")
            ok = 200 <= status < 400
            record = {
                "id": "batch_req_" + secrets.token_hex(12),
                "custom_id": line.custom_id,
                "response": {"status_code": status, "request_id": rid, "body": answer},
                "error": None,
            }
            results[i] = (ok, msgspec.json.encode(record))
            if ok:
                job.completed += 1
            else:
                job.failed += 1
            self.request_outcomes.inc(("ok" if ok else "error",))
        except Exception as exc:  # a line's failure is the line's, never the batch's
            _log.warning("batch %s line %d failed: %r", job.id, line.number, exc)
            job.failed += 1
            self.request_outcomes.inc(("error",))
            record = {
                "id": "batch_req_" + secrets.token_hex(12),
                "custom_id": line.custom_id,
                "response": None,
                "error": {"code": "internal_error", "message": "the gateway failed the request"},
            }
            results[i] = (False, msgspec.json.encode(record))
        finally:
            self._limiter.release_on_behalf_of((job.id, i))

    def _finish(
        self, job: BatchJob, state: str, results: dict[int, tuple[bool, bytes]], lines: list[Line]
    ) -> None:
        """Write the output and error files (input order) and end the batch in ``state``."""
        now = self.now()
        if state in ("completed", "cancelled", "expired") and results:
            job.status = "finalizing"
            job.times["finalizing_at"] = now
            done = [results[i] for i in range(len(lines)) if i in results]
            for ok, name in ((True, "output"), (False, "error")):
                chunk = b"".join(rec + b"\n" for good, rec in done if good is ok)
                if not chunk:
                    continue
                try:
                    f = self.files.add(
                        job.owner, f"{job.id}_{name}.jsonl", "batch_output", chunk, now,
                        upload=False,
                    )  # fmt: skip
                except FileError as exc:
                    _log.error("batch %s: its %s file was not kept: %s", job.id, name, exc)
                    state = "failed"
                    job.errors = [{"code": "file_store_full", "message": str(exc),
                                   "param": None, "line": None}]  # fmt: skip
                    continue
                if ok:
                    job.output_file_id = f.id
                else:
                    job.error_file_id = f.id
        job.status = state
        job.times[f"{state}_at"] = self.now()
