"""The dialect contract: sans-IO builders and readers of one engine protocol's stage requests.

A dialect never touches a socket and never awaits. The pipeline owns I/O, worker choice,
retries and cancellation; it asks the dialect *what* to send on each leg and *what the answer
means*, and carries the :class:`HandOff` from one leg into the next. Keeping this pure means
every byte a real engine sees can be asserted in unit tests, without a fleet.

The pipeline's walk (see ``docs/protocols.md`` for the per-dialect details)::

    body = ClientBody(raw)                        # JSON decoded at most once, lazily
    for sent in d.encode_requests(body, ctx):     # [] unless the dialect has an encode stage
        d.read_encode(sent, status, resp)         # raises StageError
    pre = d.prefill_request(body, ctx)            # flows with a prefill stage only
    if d.concurrent_prefill_decode:               # SGLang: both legs at once
        dec = d.decode_request(body, pre.handoff, ctx)
        ...                                       # read_prefill(pre, ...) when P answers
    else:                                         # vLLM: D's request depends on P's answer
        handoff = d.read_prefill(pre, status, resp)
        dec = d.decode_request(body, handoff, ctx)
"""

from __future__ import annotations

import random
import secrets
from typing import Any, ClassVar

import msgspec

from ...errors import DECODE_ERRORS, parse_error_body

Headers = list[tuple[bytes, bytes]]

_encode = msgspec.json.encode
_decode = msgspec.json.decode
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
#: bodies longer than this are encoded by joining their members (ClientBody.encode)
_JOIN_ABOVE = 65536

#: headers a leg never inherits from the forward set: the pool writes its own framing, and the
#: request id is per leg (P2P NCCL encodes the pair in it, encoder fan-out uses child ids)
_NOT_FORWARDED = frozenset(
    {b"x-request-id", b"content-length", b"content-type", b"transfer-encoding", b"host",
     b"connection"}
)  # fmt: skip
_JSON_CT = (b"content-type", b"application/json")


class BodyError(ValueError):
    """The client's body cannot be used by this dialect (not a JSON object): a 400."""

    status = 400


class PeerError(ValueError):
    """A chosen worker lacks what this dialect must name on the wire (a P2P NCCL worker
    without its KV address): the fleet's configuration, not the request, is at fault."""


class HandOffError(ValueError):
    """A leg was asked for without the hand-off its protocol requires (a pipeline bug).

    Raised instead of sending a decode that would wait forever for KV that never comes.
    """


class StageError(Exception):
    """A stage answered with a failure. ``status`` is the worker's HTTP status (200 when the
    answer was a success status with an unusable body)."""

    def __init__(self, stage: str, status: int, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{stage} stage failed (HTTP {status}): {message}")
        self.stage = stage
        self.status = status
        self.message = message
        #: the worker cannot have started on it (e.g. connection refused): another may serve it
        self.retryable = retryable

    @property
    def client_status(self) -> int:
        """The status the client gets: the worker's 4xx when the request itself was refused
        (the client's to fix; another worker would refuse it too), else 502 Bad Gateway.
        408 and 429 are the worker's state, not the request's fault: 502 as well."""
        if 400 <= self.status < 500 and self.status not in (408, 429):
            return self.status
        return 502


class ClientBody:
    """The client's body: original bytes plus its JSON object, decoded on first use only.

    Legs that forward the request unmodified send ``raw`` (byte-identical, no re-encode);
    legs that edit top-level members copy ``fields`` shallowly and re-encode (the members'
    values are copied as their raw bytes); legs that read values use ``obj``. Neither may be
    mutated.
    """

    __slots__ = ("_fields", "_obj", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._obj: dict[str, Any] | None = None
        self._fields: dict[str, msgspec.Raw] | None = None

    @property
    def fields(self) -> dict[str, msgspec.Raw]:
        """The top-level members, each value still its JSON text: a leg that sets a few
        members re-encodes only those, and a long prompt's messages are copied as bytes
        instead of being decoded and encoded again (a 54 kB chat body: 1.5 µs against 10)."""
        fields = self._fields
        if fields is None:
            try:
                fields = self._fields = _decode_fields(self.raw)
            except msgspec.ValidationError:
                raise BodyError("request body must be a JSON object") from None
            except DECODE_ERRORS as exc:
                raise BodyError(f"request body is not valid JSON: {exc}") from None
        return fields

    def encode(self, members: dict[str, Any]) -> bytes:
        """A leg's body: a JSON object of ``members`` (values from :attr:`fields`, raw, or
        Python values). msgspec encodes a small one fastest; a long one is joined in a single
        allocation instead, as the encoder's growing buffer makes glibc map and fault in
        fresh pages past 128 kB (a 629 kB chat body: 0.6 ms against 0.14;
        benchmarks/dialect_legs.py)."""
        if len(self.raw) < _JOIN_ABOVE:
            return _encode(members)
        out = [b"{"]
        for key, value in members.items():
            out += (
                _encode(key),
                b":",
                value if type(value) is msgspec.Raw else _encode(value),
                b",",
            )
        if len(out) == 1:
            return b"{}"
        out[-1] = b"}"
        return b"".join(out)

    @property
    def obj(self) -> dict[str, Any]:
        obj = self._obj
        if obj is None:
            try:
                obj = _decode(self.raw)
            except DECODE_ERRORS as exc:
                raise BodyError(f"request body is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise BodyError("request body must be a JSON object")
            self._obj = obj
        return obj


class Peer(msgspec.Struct, frozen=True):
    """A chosen worker as a dialect needs to name it (not its connection: that is the pool's)."""

    host: str
    port: int
    #: P2P NCCL: the worker's ZMQ ``ip:kv_port`` (from config/discovery), encoded in request ids
    kv_address: str | None = None
    #: SGLang prefill: the bootstrap server's port (``null`` on the wire when unknown)
    bootstrap_port: int | None = None


class StageContext(msgspec.Struct, frozen=True):
    """Per-request facts from the pipeline: id, path, forward headers and the chosen peers."""

    request_id: str
    #: the endpoint path, e.g. ``/v1/chat/completions``; every leg goes to the same path
    path: str
    #: headers every leg carries (authorization, tracing); per-leg ones are replaced
    headers: Headers = []
    prefill: Peer | None = None
    decode: Peer | None = None
    #: randomness for ids and rooms; ``secrets`` when None (tests pass a seeded Random)
    rng: random.Random | None = None


class HandOff(msgspec.Struct, frozen=True):
    """Opaque data carried from one leg into the next (vLLM ``kv_transfer_params``, the P2P
    NCCL pair id, SGLang's bootstrap fields). ``prefill_done`` tells a hand-off that P has
    answered (from :meth:`Dialect.read_prefill`) from one fixed when P's request was built."""

    dialect: str
    data: Any = None
    prefill_done: bool = False


class StageRequest(msgspec.Struct, frozen=True):
    """One HTTP POST for one leg. ``handoff`` is set when building the request already fixed
    data the next legs need (the P2P NCCL id, SGLang's room): see ``concurrent_prefill_decode``."""

    path: str
    headers: Headers
    body: bytes
    role: str
    handoff: HandOff | None = None
    #: encoder legs: the media item's key (its uuid, else a hash of its URL): encoder affinity
    #: and the gateway's record of what is in the encoder cache
    key: str | None = None


def leg_headers(forward: Headers, request_id: str) -> Headers:
    """The forward headers with this leg's ``x-request-id`` and a JSON content type."""
    out = [_JSON_CT]
    out.extend(h for h in forward if h[0].lower() not in _NOT_FORWARDED)
    out.append((b"x-request-id", request_id.encode()))
    return out


def random_bits(rng: random.Random | None, bits: int) -> int:
    return rng.getrandbits(bits) if rng is not None else secrets.randbits(bits)


def random_hex(rng: random.Random | None, chars: int) -> str:
    return format(random_bits(rng, chars * 4), f"0{chars}x")


def error_message(body: bytes) -> str:
    """The message of an engine error body (see :func:`lmgw.errors.parse_error_body`)."""
    return parse_error_body(body)[0] or "no response body"


def check_status(stage: str, status: int, body: bytes) -> None:
    """Raise :class:`StageError` unless ``status`` is a success."""
    if not 200 <= status < 300:
        raise StageError(stage, status, error_message(body))


class Dialect:
    """Builds the stage requests and reads the stage results of one engine protocol.

    Class flags tell the pipeline how to run the legs:

    - ``flows``: the flows (``pd``, ``p/d``, ``e+pd``, ``e+p+d``) this protocol can run,
      so a config naming another is rejected at start, not on the first request.
    - ``concurrent_prefill_decode``: True when P and D must be sent *at the same time*
      with hand-off data fixed up front (SGLang: D blocks on the bootstrap room until P
      pushes the KV, so sequencing them would deadlock until a timeout). False when D's
      request is built from P's answer (vLLM), so P must be read first.
    - ``decode_retry_keeps_handoff``: True when a decode that failed before its first token
      may be re-sent to *another* decode worker with the same hand-off. False when the
      hand-off is bound to the first decode peer (P2P NCCL pushes KV to the address in the
      id; an SGLang room is consumed by one decode): the pipeline must restart from prefill
      with a fresh pair, or fail.
    - ``decode_consumes_handoff``: True when a decode that received its request may have
      used the hand-off up before failing (NIXL: D pulls the blocks, and P frees them once
      read; the same ids sent again would read freed, possibly reused, blocks). Then only a
      decode leg that never reached its worker is re-sent with the same hand-off; one that
      did restarts from prefill with a fresh pair.
    - ``serves_generate``: True when the protocol's workers serve SGLang's native
      ``/generate`` (SGLang); vLLM's do not, so such a request is a 400 before any leg.
    - ``one_prompt``: True when a P/D hand-off holds one sequence's KV (NIXL, P2P NCCL: vLLM's
      prefill answers one ``kv_transfer_params`` for a whole batch, or for ``n`` samples), so
      a ``/v1/completions`` batch or ``n > 1`` is split into one pair per prompt and sample
      (:mod:`lmgw.pipeline.batch_split`).
    - ``names_bootstrap_port``: True when the prefill worker's bootstrap port goes on the wire
      (SGLang): the gateway then asks a prefill worker configured without one for it
      (``/get_server_info``'s ``disaggregation_bootstrap_port``).
    - ``local_prefill``: True when a decode worker serves a request that carries no hand-off
      by prefilling it itself (vLLM's decode instances are whole engines; SGLang's decode
      servers only take transferred KV), so a short prompt may skip the prefill leg
      (``models[].local_prefill_tokens``, :meth:`local_request`).
    """

    name: ClassVar[str]
    flows: ClassVar[frozenset[str]]
    concurrent_prefill_decode: ClassVar[bool] = False
    decode_retry_keeps_handoff: ClassVar[bool] = True
    decode_consumes_handoff: ClassVar[bool] = False
    one_prompt: ClassVar[bool] = False
    serves_generate: ClassVar[bool] = False
    local_prefill: ClassVar[bool] = False
    names_bootstrap_port: ClassVar[bool] = False

    def peer_problem(self, role: str, peer: Peer) -> str | None:
        """Why a worker of ``role`` cannot take part in this dialect's legs (None: it can).
        Checked at start for configured workers, and on every leg through the errors the
        builders raise."""
        return None

    # -- encode stage (EPD) -------------------------------------------------------------
    def encode_requests(self, body: ClientBody, ctx: StageContext) -> list[StageRequest]:
        """One request per media item, sent concurrently; [] when there is nothing to encode."""
        return []

    def read_encode(self, sent: StageRequest, status: int, body: bytes) -> None:
        """Check an encoder's answer; raises :class:`StageError` on failure."""
        check_status("encode", status, body)

    # -- prefill stage ------------------------------------------------------------------
    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        raise ValueError(f"dialect {self.name!r} has no prefill stage")

    def read_prefill(self, sent: StageRequest, status: int, body: bytes) -> HandOff:
        """Read P's whole answer into the hand-off for D; raises :class:`StageError`."""
        raise ValueError(f"dialect {self.name!r} has no prefill stage")

    def needs_prefill_response(self, body: ClientBody) -> bool:
        """Whether P's answer must be read before D's output is relayed. Always so when D's
        request is built from it; for concurrent dialects only when D's output is merged with
        it (then :meth:`merge_decode_body` / :meth:`merge_decode_events` apply). When False,
        the pipeline relays D at once and drains P in the background (never leave it unread:
        the engine would see a disconnect and abort the prefill)."""
        return not self.concurrent_prefill_decode

    # -- decode stage (or the merged pd stage) ------------------------------------------
    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        raise NotImplementedError

    def local_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        """A request for a decode worker to serve whole, prefill included (``local_prefill``
        dialects): the client's body as it came."""
        if not self.local_prefill:
            raise ValueError(f"dialect {self.name!r}: decode workers do not prefill on their own")
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), body.raw, "decode")

    def rewrites_decode(self, handoff: HandOff | None) -> bool:
        """Whether D's output must go through the merge methods (else relay bytes as-is)."""
        return False

    def merge_decode_body(self, handoff: HandOff, body: bytes) -> bytes:
        """D's complete (non-streamed) body as the client should get it."""
        return body

    def merge_decode_events(self, handoff: HandOff, events: bytes) -> bytes:
        """Complete SSE events of D's stream as the client should get them."""
        return events

    # -- helpers ------------------------------------------------------------------------
    def _require(self, handoff: HandOff | None, *, prefill_done: bool = True) -> HandOff:
        if handoff is None:
            raise HandOffError(f"{self.name}: the decode leg needs the prefill stage's hand-off")
        if handoff.dialect != self.name:
            raise HandOffError(
                f"{self.name}: got a hand-off made by {handoff.dialect!r}, not by this dialect"
            )
        if prefill_done and not handoff.prefill_done:
            raise HandOffError(
                f"{self.name}: the decode leg must wait for the prefill stage's answer"
            )
        return handoff

    def __repr__(self) -> str:
        return f"<Dialect {self.name}>"
