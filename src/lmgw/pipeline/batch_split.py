"""Requests that a one-prompt hand-off cannot carry, split into one P/D pair per sequence.

Why: vLLM's NIXL and P2P NCCL connectors hand off one engine request's KV, and a response
carries one ``kv_transfer_params``. Two kinds of request make the prefill engine run several:

* a ``/v1/completions`` batch of P prompts: P answers the first prompt's params only, and the
  decode worker applies them to every prompt, so prompts 2..P would read prompt 1's blocks
  (the simulators refuse such a leg with a 400);
* ``n > 1``: P's engine splits the request into n children, each holding its own blocks, and
  hands off one; the others stay held until the connector's abort timeout, and the decode
  worker's n children all read (and release) that one request's blocks (vLLM's open PR #38900
  describes it; its proxies pass such requests through).

The gateway instead runs one child request per prompt and sample (``prompts x n``, ids
``<id>:<k>``), each a whole P/D request with one prompt and ``n = 1`` (routing, so each prompt's
prefix finds its cache; retries; hand-off; load accounting), concurrently in the request's
scope, and merges their answers into the one answer vLLM writes:

* choice ``index`` = ``prompt_index * n + sample_index`` (child ``k`` is that choice);
* seeds follow vLLM's parallel sampling: with a ``seed``, sample ``j`` is drawn with
  ``seed + j`` (so it is what ``n = 1`` gives for that seed); without one each is independent;
* usage counts every completion and each prompt once (its first sample's), as vLLM does;
* a stream interleaves the children's events as they arrive, each under the first child's
  ``id`` (renamed to the parent's request id), then one usage event when
  ``stream_options.include_usage`` asked for it and one ``[DONE]``; with
  ``continuous_usage_stats`` each event's usage is the request's so far.

A child that fails after its own retries fails the request: the others are cancelled and the
client gets that failure (its status, or an SSE error event once the stream started).

:class:`BatchMerge` is the sans-IO part (bytes in, bytes out); :func:`run_batch` the I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..errors import DECODE_ERRORS, GatewayError, parse_error_body
from ..http.types import Headers, Responder
from ..transport.dialects import BodyError, ClientBody
from .fanout import child_request, leaf_of, write_as_they_come
from .request import GatewayRequest

__all__ = ["BatchMerge", "batch_prompts", "run_batch", "split_of"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"


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
    except DECODE_ERRORS:
        return None
    if len(items) < 2 or _first(items[0]) not in (b'"', b"["):
        return None  # one prompt, or token ids (whose first element is a number)
    return items


def _int_field(body: ClientBody, name: str) -> int | None:
    try:
        raw = body.fields.get(name)
        value = _decode(raw) if raw is not None else None
    except (BodyError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return value if type(value) is int else None


def split_of(endpoint: str, body: ClientBody) -> tuple[list[msgspec.Raw] | None, int] | None:
    """How a request splits for a one-prompt hand-off: (a completions batch's prompts, or None
    for one prompt; ``n``), or None when it is one sequence already."""
    prompts = batch_prompts(body) if endpoint == "completions" else None
    n = _int_field(body, "n") or 1
    if prompts is None and n <= 1:
        return None
    return prompts, max(n, 1)


def _count(value: Any) -> int:
    return value if type(value) is int else 0


def _sum_usage(usages: dict[int, dict[str, Any]], samples: int) -> dict[str, Any]:
    """Every child's completion tokens; the prompt (and its cached tokens) of each prompt's
    first sample only."""
    prompt = completion = cached = 0
    details = False
    for k, u in usages.items():
        completion += _count(u.get("completion_tokens"))
        if k % samples == 0:
            prompt += _count(u.get("prompt_tokens"))
            d = u.get("prompt_tokens_details")
            if isinstance(d, dict):
                details = True
                cached += _count(d.get("cached_tokens"))
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


class BatchMerge:
    """Merges the answers of ``count`` children into one: child ``k`` is choice ``k``
    (``prompt_index * samples + sample_index``), and each answers one choice.
    :meth:`events` for streams, :meth:`whole` for whole answers."""

    def __init__(self, count: int, samples: int, request_id: str, include_usage: bool) -> None:
        self.count = count
        self.samples = samples
        self.request_id = request_id
        self.include_usage = include_usage
        #: the stream's ``id``: the first child's, named for the parent request
        self.id: str | None = None
        #: the stream's ``created``: the first event's
        self.created: Any = None
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

    def _reindex(self, k: int, choices: list[Any]) -> None:
        for choice in choices:
            if isinstance(choice, dict):
                index = choice.get("index")
                choice["index"] = k + (index if type(index) is int else 0)

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
            except DECODE_ERRORS:
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
                obj["usage"] = _sum_usage(self.usages, self.samples)
            if "id" in obj:
                obj["id"] = self._name(i, obj["id"])
            if "created" in obj:  # one answer, one time (children may cross a second)
                if self.created is None:
                    self.created = obj["created"]
                obj["created"] = self.created
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
        event["usage"] = _sum_usage(self.usages, self.samples)
        if "id" in event and self.id is not None:
            event["id"] = self.id
        if "created" in event and self.created is not None:
            event["created"] = self.created
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
        usages = {k: o["usage"] for k, o in enumerate(objs) if isinstance(o.get("usage"), dict)}
        if usages:
            out["usage"] = _sum_usage(usages, self.samples)
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
    body: ClientBody,
    split: tuple[list[msgspec.Raw] | None, int],
    run: Callable[[GatewayRequest, Any], Awaitable[None]],
) -> None:
    """Serve ``greq`` (its ``body``, decoded by :func:`split_of` already) as one request per
    prompt and sample (``split``), each through ``run`` (the disaggregated flow), merged onto
    ``responder`` (see the module doc)."""
    prompts, samples = split
    fields = body.fields
    seed = _int_field(body, "seed")
    count = (len(prompts) if prompts is not None else 1) * samples
    include_usage = False
    if greq.stream and "stream_options" in fields:
        try:
            options = _decode(fields["stream_options"])
        except DECODE_ERRORS:
            options = None
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    merge = BatchMerge(count, samples, greq.request_id, include_usage)
    batch = _Batch(responder, merge, greq.stream)
    sinks = [_Child(batch, k) for k in range(count)]

    async def one(k: int) -> None:
        i, j = divmod(k, samples)
        members = dict(fields)
        if prompts is not None:
            members["prompt"] = prompts[i]
        if samples > 1:
            members["n"] = 1
            if seed is not None:
                members["seed"] = seed + j
        child = child_request(greq, k)
        child.body = body.encode(members)
        child.obj = child.route = child.prompt_ids = None
        if greq.output is not None:  # each child's answer is parsed on its own (index 0)
            child.output = greq.output.fresh()
        sink = sinks[k]
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
            except DECODE_ERRORS as exc:
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
