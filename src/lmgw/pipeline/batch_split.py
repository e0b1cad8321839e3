"""A ``/v1/completions`` batch on P/D workers whose hand-off holds one prompt: one pair per prompt.

Why: vLLM's NIXL and P2P NCCL connectors hand off one engine request's KV. A prefill worker
given a batch of P prompts runs P engine requests but answers a single ``kv_transfer_params``
(the first prompt's), and a decode worker applies the one it is given to every prompt of the
batch: prompts 2..P would read prompt 1's blocks (the simulator refuses such a leg with a 400).
vLLM's own proxies pass the batch through. The gateway instead splits it into one child
request per prompt, ids ``<id>:<i>``, each a whole P/D request of its own (routing, so each
prompt's prefix finds its cache; retries; hand-off; load accounting), run concurrently in the
request's scope, and merges their answers into the one answer vLLM writes for a batch:

* choice ``index`` = ``prompt_index * n + sample_index``;
* usage sums every child's (each child counts its prompt once and its ``n`` completions);
* a stream interleaves the children's events as they arrive, each under the first child's
  ``id`` (renamed to the parent's request id), then one usage event when
  ``stream_options.include_usage`` asked for it and one ``[DONE]``; with
  ``continuous_usage_stats`` each event's usage is the batch's so far.

A child that fails after its own retries fails the request: the others are cancelled and the
client gets that failure (its status, or an SSE error event once the stream started).

:class:`BatchMerge` is the sans-IO part (bytes in, bytes out); :func:`run_batch` the I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..errors import GatewayError, parse_error_body
from ..http.types import Headers, Responder
from ..transport.dialects import BodyError, ClientBody
from .fanout import child_request, leaf_of, write_as_they_come
from .request import GatewayRequest

__all__ = ["BatchMerge", "batch_prompts", "run_batch"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"
#: the members of ``usage`` that add up over a batch (``prompt_tokens_details`` apart)
_SUMMED = ("prompt_tokens", "completion_tokens", "total_tokens")


def _first(raw: msgspec.Raw) -> bytes:
    return bytes(memoryview(raw)[:1])


def batch_prompts(body: ClientBody) -> list[msgspec.Raw] | None:
    """The prompts of a completions batch (a list of strings or of token-id lists), each as
    its JSON text; None for one prompt (a string, a list of token ids, or a one-element list)
    or a body the worker should judge."""
    try:
        raw = body.fields.get("prompt")
    except BodyError:
        return None
    if raw is None or _first(raw) != b"[":
        return None
    try:
        items = _decode(raw, type=list[msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    if len(items) < 2 or _first(items[0]) not in (b'"', b"["):
        return None  # one prompt, or token ids (whose first element is a number)
    return items


def _n_of(body: ClientBody) -> int:
    try:
        n = _decode(body.fields.get("n") or b"1")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 1
    return n if type(n) is int and n > 0 else 1


def _sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(int(u.get(k) or 0) for u in usages) for k in _SUMMED}
    details = [u["prompt_tokens_details"] for u in usages if u.get("prompt_tokens_details")]
    if details:
        out["prompt_tokens_details"] = {
            "cached_tokens": sum(int(d.get("cached_tokens") or 0) for d in details)
        }
    return out


class BatchMerge:
    """Merges the answers of ``count`` children (prompt ``i`` is child ``i``, each answering
    ``n`` choices) into one: :meth:`events` for streams, :meth:`whole` for whole answers."""

    def __init__(self, count: int, n: int, request_id: str, include_usage: bool) -> None:
        self.count = count
        self.n = n
        self.request_id = request_id
        self.include_usage = include_usage
        #: the stream's ``id``: the first child's, named for the parent request
        self.id: str | None = None
        #: each child's latest usage (streams)
        self.usages: dict[int, dict[str, Any]] = {}
        #: a usage-only event to build the batch's usage event on
        self._usage_event: dict[str, Any] | None = None
        #: an error event went to the client
        self.error_sent = False

    def _name(self, i: int, child_id: Any) -> Any:
        if self.id is None:
            if not isinstance(child_id, str):
                return child_id
            own = f"{self.request_id}:{i}"
            if child_id.endswith(own):  # the worker named it after the child's request id
                child_id = child_id[: -len(own)] + self.request_id
            self.id = child_id
        return self.id

    def _reindex(self, i: int, choices: list[Any]) -> None:
        base = i * self.n
        for choice in choices:
            if isinstance(choice, dict):
                index = choice.get("index")
                choice["index"] = base + (index if type(index) is int else 0)

    def events(self, i: int, data: bytes) -> bytes:
        """Child ``i``'s group of complete SSE events as the client's stream carries them:
        choices renumbered, ``[DONE]`` and usage-only events held back (:meth:`tail` ends the
        stream), an error event passed on (:attr:`error_sent`)."""
        out: list[bytes] = []
        for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not block:
                continue
            payload = block[5:].strip() if block.startswith(b"data:") else None
            if payload is None or b"\n" in payload:  # a comment or a multi-line event: as is
                out.append(block + b"\n\n")
                continue
            if payload == b"[DONE]":
                continue
            try:
                obj = _decode(payload)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                out.append(block + b"\n\n")
                continue
            if not isinstance(obj, dict):
                out.append(block + b"\n\n")
                continue
            if "error" in obj:
                self.error_sent = True
                out.append(block + b"\n\n")
                continue
            choices = obj.get("choices")
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usages[i] = usage
                if not choices:  # the child's closing usage event: the batch's comes last
                    if self._usage_event is None:
                        self._usage_event = obj
                    continue
                obj["usage"] = _sum_usage(list(self.usages.values()))
            if "id" in obj:
                obj["id"] = self._name(i, obj["id"])
            if isinstance(choices, list):
                self._reindex(i, choices)
            out.append(b"data: " + _encode(obj) + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """The stream's end: the batch's usage event (when asked for and reported), then
        ``[DONE]``; only ``[DONE]`` after an error event."""
        event = self._usage_event
        if self.error_sent or not self.include_usage or event is None:
            return _DONE
        event["usage"] = _sum_usage(list(self.usages.values()))
        if "id" in event and self.id is not None:
            event["id"] = self.id
        return b"data: " + _encode(event) + b"\n\n" + _DONE

    def whole(self, bodies: list[bytes]) -> bytes:
        """The children's whole answers (in prompt order) as one: the first one's envelope,
        every choice renumbered, the usage summed."""
        objs = [_decode(b) for b in bodies]
        out = objs[0]
        if not all(isinstance(o, dict) for o in objs):
            raise GatewayError(502, "a worker answered a batch's prompt with a non-object")
        choices: list[Any] = []
        for i, obj in enumerate(objs):
            own = obj.get("choices")
            if isinstance(own, list):
                self._reindex(i, own)
                choices += own
        out["choices"] = choices
        if "id" in out:
            out["id"] = self._name(0, out["id"])
        usages = [o["usage"] for o in objs if isinstance(o.get("usage"), dict)]
        if usages:
            out["usage"] = _sum_usage(usages)
        return _encode(out)


class _Child:
    """What one prompt's request answers to instead of the client's responder: a stream's
    events go on to the client (merged); a whole answer, or an error answer, is kept."""

    __slots__ = ("_batch", "body", "headers", "i", "started", "status")

    def __init__(self, batch: _Batch, i: int) -> None:
        self._batch = batch
        self.i = i
        self.started = False
        self.status = 0
        self.headers: Headers = []
        self.body: list[bytes] = []

    @property
    def broken(self) -> bool:
        return bool(getattr(self._batch.responder, "broken", False))

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = True
        self.status, self.headers, self.body = status, headers, [body]

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status, self.headers = status, headers

    async def send(self, data: bytes) -> None:
        if not data:
            return
        if self._batch.stream and self.status == 200:
            await self._batch.relay(self, data)
        else:
            self.body.append(data)

    async def end(self, data: bytes = b"") -> None:
        await self.send(data)


class _Batch:
    """The children's shared state: the merge, the first failure, and for streams the one
    writer to the client (:meth:`pump`), so a cancelled child never cuts an event in half."""

    def __init__(self, responder: Responder, merge: BatchMerge, stream: bool) -> None:
        self.responder = responder
        self.merge = merge
        self.stream = stream
        #: the first child that failed: its error, or its error answer (a _Child)
        self.failure: GatewayError | _Child | None = None
        #: the children's scope: cancelled on the first failure
        self.scope = trio.CancelScope()
        self.headers: Headers = []
        self._send, self._recv = trio.open_memory_channel[bytes](max(16, merge.count))

    async def relay(self, child: _Child, data: bytes) -> None:
        out = self.merge.events(child.i, data)
        if not self.headers:
            self.headers = child.headers
        if out:
            await self._send.send(out)
        if self.merge.error_sent:
            self.fail(GatewayError(502, "a prompt of the batch failed mid-stream"))

    def fail(self, failure: GatewayError | _Child) -> None:
        if self.failure is None:
            self.failure = failure
        self.scope.cancel()

    async def pump(self) -> None:
        """Write the children's events as they come (what queued meanwhile in one write)."""
        await write_as_they_come(self._recv, self.responder, lambda: self.headers)

    async def children(self, one: Callable[[int], Awaitable[None]]) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    for i in range(self.merge.count):
                        nursery.start_soon(one, i)
        finally:
            self._send.close()  # the writer drains what is queued, then stops


async def run_batch(
    greq: GatewayRequest,
    responder: Responder,
    prompts: list[msgspec.Raw],
    run: Callable[[GatewayRequest, Any], Awaitable[None]],
) -> None:
    """Serve the batch ``prompts`` of ``greq`` as one request per prompt, each through ``run``
    (the disaggregated flow), merged onto ``responder`` (see the module doc)."""
    body = ClientBody(greq.body)
    fields = body.fields
    include_usage = False
    if greq.stream and "stream_options" in fields:
        try:
            options = _decode(fields["stream_options"])
        except (msgspec.DecodeError, UnicodeDecodeError):
            options = None
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    merge = BatchMerge(len(prompts), _n_of(body), greq.request_id, include_usage)
    batch = _Batch(responder, merge, greq.stream)
    sinks = [_Child(batch, i) for i in range(len(prompts))]

    async def one(i: int) -> None:
        child = child_request(greq, i)
        child.body = body.encode({**fields, "prompt": prompts[i]})
        child.obj = child.route = child.prompt_ids = None
        sink = sinks[i]
        try:
            await run(child, sink)
        except GatewayError as exc:
            batch.fail(exc)
            return
        if sink.status >= 400 or not sink.started:
            batch.fail(sink)

    try:
        if greq.stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(batch.children, one)
                await batch.pump()
        else:
            await batch.children(one)
    except BaseExceptionGroup as group:
        raise leaf_of(group) from None
    failure = batch.failure
    if failure is None:
        if not greq.stream:
            try:
                merged = merge.whole([b"".join(s.body) for s in sinks])
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise GatewayError(502, f"a worker's answer to a batch's prompt: {exc}") from None
            await responder.send_full(200, sinks[0].headers, merged)
            return
        if not responder.started:
            await responder.start(200, sinks[0].headers)
        await responder.end(merge.tail())
        return
    if isinstance(failure, _Child):  # an error answer (a 4xx of the worker's, as it came)
        if failure.status >= 400 and not responder.started:
            await responder.send_full(failure.status, failure.headers, b"".join(failure.body))
            return
        message = parse_error_body(b"".join(failure.body))[0]
        failure = GatewayError(
            failure.status if failure.status >= 400 else 502,
            message or "a prompt of the batch ended without an answer",
        )
    if merge.error_sent:  # a child's error event reached the client: only the end is missing
        await responder.end(_DONE)
        return
    raise failure  # the API answers it (an SSE error event once the stream started)
