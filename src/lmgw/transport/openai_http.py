"""Stages over the OpenAI HTTP API as vLLM and SGLang serve it (the merged ``pd`` role for now).

Knows the wire: request paths and headers, JSON error bodies, SSE framing. Knows nothing of
policies or flows; the pipeline calls these functions with a chosen worker.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..errors import GatewayError, parse_error_body, sse_error_event
from ..http.types import Headers, Responder
from ..workers.worker import Worker
from .chunked import count_events
from .pacing import after_write
from .pool import Response, UpstreamError
from .sse import split_complete

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


def worker_error(worker: Worker, status: int, body: bytes) -> GatewayError:
    """Turn a worker's error response into an OpenAI-shaped error for the client.

    4xx errors are the client's (bad parameters, unknown model on the worker): passed on with
    the worker's status and message. 5xx are the gateway's problem to report: 502.
    """
    message, etype, param = parse_error_body(body)
    message = message or f"HTTP {status}"
    if 400 <= status < 500:
        return GatewayError(status, message, param=param, type=etype)
    return GatewayError(502, f"worker {worker.id} failed with HTTP {status}: {message}")


async def read_error(resp: Response, worker: Worker) -> GatewayError:
    try:
        body = await resp.read_all(1 << 20)
    except UpstreamError as exc:
        body = exc.message.encode()
    return worker_error(worker, resp.status, body)


async def relay_json(
    resp: Response,
    responder: Responder,
    headers: Headers,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> None:
    """Relay a complete non-streamed response (``headers``: the gateway's own, e.g. the id).
    ``rewrite`` edits a successful body (a dialect merging hand-off data into the answer)."""
    ctype = resp.content_type  # (before the body: reading it all hands the connection back)
    body = resp.take_complete_body()  # usually all there with the head: no await
    if body is None:
        body = await resp.read_all()
    await send_json(responder, resp.status, ctype, body, headers, rewrite)


async def send_json(
    responder: Responder,
    status: int,
    content_type: bytes,
    body: bytes,
    headers: Headers,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> None:
    """Answer with a worker's whole non-streamed answer, its content type (JSON when it
    named none) and the gateway's ``headers``; ``rewrite`` edits a successful body."""
    if rewrite is not None and status < 300:
        body = rewrite(body)
    ctype = content_type or b"application/json"
    await responder.send_full(status, [(b"content-type", ctype), *headers], body)


async def relay_sse(
    resp: Response,
    responder: Responder,
    headers: Headers,
    on_first_byte: Callable[[], None],
    rewrite: Callable[[bytes], bytes] | None = None,
    journal: list[bytes] | None = None,
    stall_s: float | None = None,
) -> int:
    """Relay an SSE stream as bytes, one client write per group of complete events.

    Returns how many events were relayed (for the per-token latency metric: engines stream one
    token per event). ``rewrite`` edits each group of complete events (a dialect merging
    hand-off data into the stream, or a migrated stream's splice). ``journal``, when given,
    collects every chunk as received (so a broken stream can be continued elsewhere); the
    failure is then the caller's to report. Without it, a worker that fails mid-stream gets an
    error event and ``[DONE]`` in its place, as vLLM itself does for engine errors: the client
    never sees a silently truncated stream. If the client already has the stream's head (a
    continuation), it is not sent again. ``stall_s`` bounds the silence between two chunks:
    a hung worker is an :class:`UpstreamError` (504) instead of a stream that never ends.
    """
    if not responder.started:
        await responder.start(200, [*SSE_HEADERS, *headers])
    if stall_s is None:
        return await _relay_events(resp, responder, on_first_byte, rewrite, journal)
    with trio.CancelScope(deadline=trio.current_time() + stall_s) as scope:
        return await _relay_events(resp, responder, on_first_byte, rewrite, journal, scope, stall_s)
    exc = UpstreamError(f"worker sent nothing for {stall_s:g} s mid-stream", status=504)
    resp.release()
    if journal is None:
        await responder.send(sse_error_event(504, f"worker stream failed: {exc.message}"))
        await responder.end()
    raise exc


async def _relay_events(
    resp: Response,
    responder: Responder,
    on_first_byte: Callable[[], None],
    rewrite: Callable[[bytes], bytes] | None,
    journal: list[bytes] | None,
    scope: trio.CancelScope | None = None,
    stall_s: float = 0.0,
) -> int:
    send = responder.send
    read = resp.read_chunk
    pending = b""
    events = 0
    keep = journal.append if journal is not None else None
    # a migration Journal (lmgw.pipeline.migration) folds its events once they grow long
    fold = getattr(journal, "fold", None)
    fold_at = getattr(journal, "fold_bytes", 0)
    kept = 0
    try:
        chunk = await read()
        if chunk:
            on_first_byte()
        while chunk:
            if keep is not None:
                keep(chunk)
                kept += len(chunk)
                if kept >= fold_at and fold is not None:
                    fold()
                    kept = 0
            if scope is not None:  # push the stall deadline out, rarely (a heap update)
                now = trio.current_time()
                if scope.deadline - now < stall_s / 2:
                    scope.deadline = now + stall_s
            if not pending and chunk.endswith(b"\n\n"):  # the usual case: whole events
                n = count_events(chunk)
                events += n
                if rewrite is not None:
                    chunk = rewrite(chunk)
                if resp.complete:  # the last events: one write with the stream's end
                    await resp.read_chunk()  # b"": hands the connection back to the pool
                    await responder.end(chunk)
                    return events
                if chunk:  # a rewrite may drop every event of a group
                    await send(chunk)
                await after_write(n)  # a burst on a busy loop: let more pile up (pacing.py)
                chunk = await read()
                continue
            data = pending + chunk if pending else chunk
            cut = split_complete(data)
            if cut:
                whole = data[:cut]
                pending = data[cut:]
                events += count_events(whole)
                if rewrite is not None:
                    whole = rewrite(whole)
                if whole:
                    await send(whole)
            else:
                pending = data
            chunk = await read()
    except UpstreamError as exc:
        if journal is None:
            await responder.send(sse_error_event(502, f"worker stream failed: {exc.message}"))
            await responder.end()
        raise
    if pending:
        await responder.send(pending)
    await responder.end()
    return events
