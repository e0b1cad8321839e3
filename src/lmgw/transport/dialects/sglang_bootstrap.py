"""SGLang PD disaggregation (``--disaggregation-mode prefill|decode``), as sgl-router drives it.

Both legs get the *same* body: the client's plus ``bootstrap_host`` (P's host),
``bootstrap_port`` (P's bootstrap server, or null) and ``bootstrap_room`` (random 63-bit),
one entry per sequence for batches and ``n > 1``: a batch of P prompts sampled n times is
P * n sequences, one room each (SGLang reads such a list in its expanded order; a list of P
rooms would have a prompt's samples share a room, and a room serves one transfer). A single
prompt with ``n > 1`` outside chat keeps one room, which SGLang expands to ``room + k``. The
legs are sent concurrently: D registers the room with P's bootstrap server and blocks until P
pushes the KV, and P in prefill mode only prefills, so there is no ``max_tokens`` rewrite. D is
streamed back; P is drained. With ``return_logprob``, P's ``meta_info.input_token_logprobs``
(and ``input_top_logprobs``) go in front of D's (D computed no prompt position), so P must then
be read before D's output is relayed.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

from ...errors import DECODE_ERRORS
from .base import (
    ClientBody,
    Dialect,
    HandOff,
    HandOffError,
    StageContext,
    StageError,
    StageRequest,
    check_status,
    leg_headers,
    random_bits,
)

_encode = msgspec.json.encode
_decode = msgspec.json.decode
_EVENT_SPLIT = re.compile(rb"(\r\n\r\n|\n\n)")


class _Bootstrap(msgspec.Struct, frozen=True):
    fields: dict[str, Any]  #: the three injected fields, as sent
    body: bytes  #: the body both legs carry (built once, so they cannot differ)
    want_logprobs: bool
    #: P's ``input_token_logprobs``: one list, or one per batch element (``batched``)
    prefill_logprobs: Any = None
    batched: bool = False


def _samples(n: Any) -> int:
    return n if type(n) is int and n > 1 else 1


def batch_size(path: str, obj: dict[str, Any]) -> int | None:
    """How many sequences the engine will make of the request (None: a single one, or one
    prompt sampled ``n`` times outside chat: one room, which SGLang expands itself).

    Chat: ``n > 1``. Completions: a prompt list of strings or of token lists (a flat list of
    ints is one prompt), times ``n``. Native ``/generate``: a list of texts or of token lists,
    times ``sampling_params.n``.
    """
    if path.endswith("/chat/completions"):
        n = obj.get("n")
        return n if type(n) is int and n > 1 else None
    if path.endswith("/completions"):
        prompt = obj.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt) * _samples(obj.get("n"))
        return None
    params = obj.get("sampling_params")
    if isinstance(params, list):
        params = params[0] if params else None
    n = _samples(params.get("n") if isinstance(params, dict) else None)
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids) * n
    text = obj.get("text")
    if isinstance(text, list) and text:
        return len(text) * n
    return None


#: the members :func:`batch_size` and :func:`_wants_logprobs` read
_READ = ("n", "prompt", "sampling_params", "input_ids", "text", "return_logprob")


def _members(body: ClientBody) -> dict[str, Any]:
    """The members the legs' shape depends on, decoded; a chat's messages stay bytes."""
    fields = body.fields
    return {k: _decode(fields[k]) for k in _READ if k in fields}


def _wants_logprobs(obj: dict[str, Any]) -> bool:
    flag = obj.get("return_logprob")
    return flag is True or (isinstance(flag, list) and True in flag)


#: the per-prompt-position lists P computes and D does not (D got the prompt's KV)
_INPUT_FIELDS = ("input_token_logprobs", "input_top_logprobs")


def _logprobs_of(obj: Any) -> dict[str, list[Any]] | None:
    """P's input lists of one answer (None without ``input_token_logprobs``)."""
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("input_token_logprobs"), list):
        return None
    return {k: meta[k] for k in _INPUT_FIELDS if isinstance(meta.get(k), list)}


def _prepend(obj: Any, prefill: Any) -> bool:
    """Put P's lists in front of D's, in place; only where both are lists (as sgl-router
    does for ``input_token_logprobs``; ``input_top_logprobs`` go the same way, so a client
    asking ``top_logprobs_num`` gets the prompt's alternatives too)."""
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(prefill, dict) or not isinstance(meta, dict):
        return False
    changed = False
    for key, lists in prefill.items():
        decode = meta.get(key)
        if isinstance(decode, list):
            meta[key] = lists + decode
            changed = True
    return changed


def _last_event_logprobs(body: bytes) -> tuple[Any, bool]:
    """P answered with SSE (``stream: true``): the last JSON event that carries logprobs, or
    for a batch (events with an ``index``) the last one of each element: (lists, batched)."""
    found: dict[int, Any] = {}
    batched = False
    for line in body.splitlines():
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                try:
                    obj = _decode(data)
                except DECODE_ERRORS:
                    continue
                index = obj.get("index") if isinstance(obj, dict) else None
                batched |= type(index) is int
                lists = _logprobs_of(obj)
                if lists is not None:
                    found[index if type(index) is int and index >= 0 else 0] = lists
    if not batched:
        return found.get(0), False
    return [found.get(i) for i in range(max(found, default=-1) + 1)], True


class SglangBootstrap(Dialect):
    name: ClassVar[str] = "sglang-bootstrap"
    flows: ClassVar[frozenset[str]] = frozenset({"p/d"})
    concurrent_prefill_decode: ClassVar[bool] = True
    serves_generate: ClassVar[bool] = True
    names_bootstrap_port: ClassVar[bool] = True
    #: a room pairs one P request with one D: a retry is a fresh pair with a fresh room
    decode_retry_keeps_handoff: ClassVar[bool] = False

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        """Fixes the room: the decode leg is built from ``.handoff`` of the returned request."""
        peer = ctx.prefill
        if peer is None:
            raise ValueError("sglang-bootstrap needs the chosen prefill worker (host, port)")
        obj = _members(body)
        host = peer.host[1:-1] if peer.host.startswith("[") else peer.host
        port = peer.bootstrap_port
        n = batch_size(ctx.path, obj)
        if n is None:
            fields: dict[str, Any] = {
                "bootstrap_host": host,
                "bootstrap_port": port,
                "bootstrap_room": random_bits(ctx.rng, 63),
            }
        else:
            fields = {
                "bootstrap_host": [host] * n,
                "bootstrap_port": [port] * n,
                "bootstrap_room": [random_bits(ctx.rng, 63) for _ in range(n)],
            }
        payload = body.encode({**body.fields, **fields})
        boot = _Bootstrap(fields, payload, _wants_logprobs(obj))
        headers = leg_headers(ctx.headers, ctx.request_id)
        return StageRequest(ctx.path, headers, payload, "prefill", HandOff(self.name, boot))

    def _boot(self, handoff: HandOff | None, *, prefill_done: bool) -> _Bootstrap:
        boot = self._require(handoff, prefill_done=prefill_done).data
        if not isinstance(boot, _Bootstrap):
            raise HandOffError("sglang-bootstrap: the hand-off carries no bootstrap fields")
        return boot

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        """The prefill leg's body, unchanged (same room): the hand-off is ``pre.handoff``."""
        boot = self._boot(handoff, prefill_done=False)
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), boot.body, "decode")

    def needs_prefill_response(self, body: ClientBody) -> bool:
        return _wants_logprobs(_members(body))

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        """Check P's answer; keep its input logprobs when the client asked for them. A failed
        P means D will never get its KV: the pipeline must cancel D, not wait for it."""
        boot = self._boot(sent.handoff, prefill_done=False)
        check_status("prefill", status, body)
        if not boot.want_logprobs:
            return HandOff(self.name, boot, prefill_done=True)
        if body.lstrip()[:5] == b"data:":
            logprobs, batched = _last_event_logprobs(body)
        else:
            try:
                obj = _decode(body)
            except DECODE_ERRORS:
                raise StageError("prefill", status, "answer is not JSON") from None
            batched = isinstance(obj, list)
            logprobs = [_logprobs_of(o) for o in obj] if batched else _logprobs_of(obj)
        merged = msgspec.structs.replace(boot, prefill_logprobs=logprobs, batched=batched)
        return HandOff(self.name, merged, prefill_done=True)

    def rewrites_decode(self, handoff: HandOff | None) -> bool:
        data = handoff.data if handoff is not None else None
        return isinstance(data, _Bootstrap) and data.prefill_logprobs is not None

    def _for(self, boot: _Bootstrap, obj: Any, position: int) -> Any:
        if not boot.batched:
            return boot.prefill_logprobs
        index = obj.get("index", position) if isinstance(obj, dict) else position
        lists = boot.prefill_logprobs
        return lists[index] if type(index) is int and 0 <= index < len(lists) else None

    def merge_decode_body(self, handoff: HandOff, body: bytes) -> bytes:
        boot = self._boot(handoff, prefill_done=True)
        if boot.prefill_logprobs is None:
            return body
        try:
            obj = _decode(body)
        except DECODE_ERRORS:
            return body
        items = obj if isinstance(obj, list) else [obj]
        changed = False
        for pos, item in enumerate(items):
            changed |= _prepend(item, self._for(boot, item, pos))
        return _encode(obj) if changed else body

    def merge_decode_events(self, handoff: HandOff, events: bytes) -> bytes:
        """Rewrite each ``data: {json}`` event; other events and ``[DONE]`` pass as they are."""
        boot = self._boot(handoff, prefill_done=True)
        if boot.prefill_logprobs is None:
            return events
        parts = _EVENT_SPLIT.split(events)
        for k in range(0, len(parts), 2):
            event = parts[k]
            if not event.startswith(b"data:"):
                continue
            data = event[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                obj = _decode(data)
            except DECODE_ERRORS:
                continue
            if _prepend(obj, self._for(boot, obj, 0)):
                parts[k] = b"data: " + _encode(obj)
        return b"".join(parts)
