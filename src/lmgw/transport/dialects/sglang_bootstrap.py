"""SGLang PD disaggregation (``--disaggregation-mode prefill|decode``), as sgl-router drives it.

Both legs get the *same* body: the client's plus ``bootstrap_host`` (P's host),
``bootstrap_port`` (P's bootstrap server, or null) and ``bootstrap_room`` (random 63-bit),
one entry per sequence for batches and ``n > 1``. They are sent concurrently: D registers the
room with P's bootstrap server and blocks until P pushes the KV, and P in prefill mode only
prefills, so there is no ``max_tokens`` rewrite. D is streamed back; P is drained. With
``return_logprob``, P's ``meta_info.input_token_logprobs`` go in front of D's (D only saw the
prompt's last token), so P must then be read before D's output is relayed.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

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


def batch_size(path: str, obj: dict[str, Any]) -> int | None:
    """How many sequences the engine will make of the request (None: a single one).

    Chat: ``n > 1``. Completions: a prompt list of strings or of token lists (a flat list of
    ints is one prompt). Native ``/generate``: a list of texts or of token lists.
    """
    if path.endswith("/chat/completions"):
        n = obj.get("n")
        return n if type(n) is int and n > 1 else None
    if path.endswith("/completions"):
        prompt = obj.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return None
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    text = obj.get("text")
    if isinstance(text, list) and text:
        return len(text)
    return None


def _wants_logprobs(obj: dict[str, Any]) -> bool:
    flag = obj.get("return_logprob")
    return flag is True or (isinstance(flag, list) and True in flag)


def _logprobs_of(obj: Any) -> Any:
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    value = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    return value if isinstance(value, list) else None


def _prepend(obj: Any, prefill: Any) -> bool:
    """Put P's list in front of D's, in place; only where both are lists (as sgl-router)."""
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(prefill, list) or not isinstance(meta, dict):
        return False
    decode = meta.get("input_token_logprobs")
    if not isinstance(decode, list):
        return False
    meta["input_token_logprobs"] = prefill + decode
    return True


def _last_event_logprobs(body: bytes) -> Any:
    """P answered with SSE (``stream: true``): its last JSON event that carries logprobs."""
    found = None
    for line in body.splitlines():
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                try:
                    found = _logprobs_of(_decode(data)) or found
                except (msgspec.DecodeError, UnicodeDecodeError):
                    continue
    return found


class SglangBootstrap(Dialect):
    name: ClassVar[str] = "sglang-bootstrap"
    flows: ClassVar[frozenset[str]] = frozenset({"p/d"})
    concurrent_prefill_decode: ClassVar[bool] = True
    #: a room pairs one P request with one D: a retry is a fresh pair with a fresh room
    decode_retry_keeps_handoff: ClassVar[bool] = False

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        """Fixes the room: the decode leg is built from ``.handoff`` of the returned request."""
        peer = ctx.prefill
        if peer is None:
            raise ValueError("sglang-bootstrap needs the chosen prefill worker (host, port)")
        obj = body.obj
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
        payload = _encode({**obj, **fields})
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
        return _wants_logprobs(body.obj)

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        """Check P's answer; keep its input logprobs when the client asked for them. A failed
        P means D will never get its KV: the pipeline must cancel D, not wait for it."""
        boot = self._boot(sent.handoff, prefill_done=False)
        check_status("prefill", status, body)
        if not boot.want_logprobs:
            return HandOff(self.name, boot, prefill_done=True)
        if body.lstrip()[:5] == b"data:":
            logprobs, batched = _last_event_logprobs(body), False
        else:
            try:
                obj = _decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
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
        except (msgspec.DecodeError, UnicodeDecodeError):
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
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            if _prepend(obj, self._for(boot, obj, 0)):
                parts[k] = b"data: " + _encode(obj)
        return b"".join(parts)
