"""API keys: who may use the API, which models, and how fast. Sans-IO: the clock is passed in.

A client sends ``Authorization: Bearer <key>``. The gateway keeps no key, only its SHA-256
digest: a request's key is hashed once (~0.5 µs) and looked up in a dict of digests, then
compared again with :func:`hmac.compare_digest`. The lookup compares digests, never keys, so
its timing tells an attacker nothing about a stored key (finding a digest prefix means finding
SHA-256 pre-images). Keys are high-entropy random strings, so an unsalted digest is the usual
choice (it is what GitHub and Stripe store for tokens).

Each key may carry:

* a model allow-list (403 for another model; ``/v1/models`` lists only those);
* ``requests_per_s`` with a ``burst``: a token bucket checked when a request arrives (429);
* ``max_concurrent``: requests of the key in progress at once (429);
* ``tokens_per_min``: a bucket refilled continuously, charged with each request's usage at
  its end; a key whose bucket is empty gets a 429 on its *next* request (the one that spent
  the tokens is never cut short);
* for the admission queue (:mod:`lmgw.fairqueue`): a ``weight`` (its share of the slots when
  tenants compete), a default ``priority`` and a ``min_priority``: the most urgent priority
  (lowest number) its requests may ask for; a request asking for more gets a 403.

Errors are OpenAI's: ``invalid_api_key`` (401), ``model_not_allowed`` (403),
``rate_limit_exceeded`` (429, with ``Retry-After``), ``priority_not_allowed`` (403). Nothing
here logs or echoes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, error_body

__all__ = [
    "HASH_PREFIX",
    "AuthError",
    "KeyEntry",
    "KeySpec",
    "KeyTable",
    "hash_key",
    "parse_key_lines",
    "rate_limit_headers",
]

#: the stored form of a key: ``sha256:`` and 64 lowercase hex digits
HASH_PREFIX = "sha256:"
#: RFC 6750 ``b64token`` characters (what a Bearer credential may hold), at least 16 of them:
#: shorter keys are guessable. No ``:``, ``,`` or ``;``, so the hashed form and the list
#: separators are unambiguous.
_KEY_RE = re.compile(r"[A-Za-z0-9\-._~+/]{16,512}=*")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-@]{1,64}")
#: Retry-After bounds (seconds): at least HTTP's unit, at most an hour
_RETRY_MIN_S = 1
_RETRY_MAX_S = 3600


def hash_key(key: str) -> str:
    """The stored form of ``key`` (``sha256:<hex>``); a key already in that form is kept.

    Raises:
        ValueError: not a usable key (the message never contains the key).
    """
    if key.startswith(HASH_PREFIX):
        if not _HASH_RE.fullmatch(key):
            raise ValueError("a hashed key must be `sha256:` and 64 lowercase hex digits")
        return key
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            "an API key must be 16 to 512 characters of A-Z a-z 0-9 - . _ ~ + / (then any '='),"
            " e.g. from `openssl rand -hex 32`; or `sha256:<hex digest>`"
        )
    return HASH_PREFIX + hashlib.sha256(key.encode("ascii")).hexdigest()


def check_key_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a label fit for logs and metrics."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError("a key name must be 1 to 64 characters of A-Z a-z 0-9 _ . - @")


def parse_key_lines(text: str, *, separators: str = "\n") -> list[dict[str, Any]]:
    """Parse the plain key list: one entry per line (or per ``separators`` character),
    ``KEY [MODEL,MODEL...]``; ``#`` starts a comment; blank entries are skipped.

    Returns ``[{"key": ..., "models": [...]}, ...]`` (``models`` absent when none is given).

    Raises:
        ValueError: naming the entry's number, never its key.
    """
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    out: list[dict[str, Any]] = []
    for n, raw in enumerate(text.split(separators[0]), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"entry {n}: expected `KEY [MODEL,MODEL...]`")
        key = parts[0]
        if "," in key:
            raise ValueError(
                f"entry {n}: a key cannot contain ','; put one key per line (in LMGW_API_KEYS,"
                " separate keys with ';')"
            )
        entry: dict[str, Any] = {"key": key}
        if len(parts) == 2:
            models = [m.strip() for m in parts[1].split(",") if m.strip()]
            if not models:
                raise ValueError(f"entry {n}: an empty model list")
            entry["models"] = models
        out.append(entry)
    return out


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key as configured (already hashed), with its limits resolved (0: unlimited)."""

    digest: str  # "sha256:<hex>"
    name: str
    models: frozenset[str] | None = None
    requests_per_s: float = 0.0
    burst: int = 0
    max_concurrent: int = 0
    tokens_per_min: int = 0
    #: the admission queue: share of slots, default priority, most urgent priority allowed
    weight: float = 1.0
    priority: int = 0
    min_priority: int | None = None


class AuthError(GatewayError):
    """A 401/403/429 in OpenAI's shape: a string ``code`` and, for 429, ``Retry-After``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        reason: str,
        *,
        type: str = "invalid_request_error",
        retry_after: int = 0,
        param: str | None = None,
    ) -> None:
        super().__init__(status, message, param=param, type=type)
        self.code = code
        #: the ``reason`` label of ``lmgw_auth_rejected_total``
        self.reason = reason
        self.retry_after = retry_after
        #: the key's ``x-ratelimit-*`` headers (a 429 of its rate or token limit)
        self.limits: list[tuple[bytes, bytes]] = []

    def body(self) -> bytes:
        return error_body(
            self.status, self.message, param=self.param, type=self.type, code=self.code
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", b"application/json")]
        if self.status == 401:
            out.append((b"www-authenticate", b'Bearer realm="lmgw"'))
        if self.retry_after:
            out.append((b"retry-after", str(self.retry_after).encode()))
        out.extend(self.limits)
        return out


def _retry_after(seconds: float) -> int:
    return min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(seconds)))


def _duration(seconds: float) -> bytes:
    """A reset time as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms".encode()
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s".encode()
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{round(rest):d}s".encode()


def rate_limit_headers(entry: KeyEntry, now: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for a key with limits, as its buckets stand at
    ``now`` (read, not spent): per limit, its size (``requests_per_s``' burst, or
    ``tokens_per_min``), what is left, and the time until the bucket is full again. Clients
    and agent frameworks throttle themselves on them before they meet a 429."""
    out: list[tuple[bytes, bytes]] = []
    if entry.rate:
        level = min(float(entry.burst), entry.rate_level + (now - entry.rate_stamp) * entry.rate)
        out += [
            (b"x-ratelimit-limit-requests", str(entry.burst).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, math.floor(level))).encode()),
            (b"x-ratelimit-reset-requests", _duration((entry.burst - level) / entry.rate)),
        ]
    if entry.tpm:
        tpm = float(entry.tpm)
        level = min(tpm, entry.tpm_level + (now - entry.tpm_stamp) * tpm / 60.0)
        out += [
            (b"x-ratelimit-limit-tokens", str(entry.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, math.floor(level))).encode()),
            (b"x-ratelimit-reset-tokens", _duration((tpm - level) * 60.0 / tpm)),
        ]
    return out


class KeyEntry:
    """A key's live state: its buckets and counters. Mutated only by :class:`KeyTable`."""

    __slots__ = (
        "burst",
        "digest",
        "in_flight",
        "max_concurrent",
        "min_priority",
        "models",
        "name",
        "priority",
        "rate",
        "rate_level",
        "rate_stamp",
        "requests",
        "tokens",
        "tpm",
        "tpm_level",
        "tpm_stamp",
        "weight",
    )

    def __init__(self, spec: KeySpec, now: float) -> None:
        self.digest = bytes.fromhex(spec.digest[len(HASH_PREFIX) :])
        self.in_flight = 0
        self.requests = 0  # admitted requests, for lmgw_api_key_requests_total
        self.tokens = 0  # tokens charged, for lmgw_api_key_tokens_total
        self.rate_stamp = self.tpm_stamp = now
        self.apply(spec)
        self.rate_level = float(self.burst)
        self.tpm_level = float(self.tpm)

    def apply(self, spec: KeySpec) -> None:
        """Take new limits (a reloaded keys file), keeping the buckets' levels within them."""
        self.name = spec.name
        self.models = spec.models
        self.rate = spec.requests_per_s
        self.burst = spec.burst or max(1, math.ceil(spec.requests_per_s))
        self.max_concurrent = spec.max_concurrent
        self.tpm = spec.tokens_per_min
        self.weight = spec.weight
        self.priority = spec.priority
        self.min_priority = spec.min_priority
        if hasattr(self, "rate_level"):
            self.rate_level = min(self.rate_level, float(self.burst))
            self.tpm_level = min(self.tpm_level, float(self.tpm))

    def allows(self, model: str) -> bool:
        models = self.models
        return models is None or model in models


class KeyTable:
    """The keys, by digest. ``authenticate`` + ``admit`` when a request arrives, ``release``
    when it ends (in a ``finally``), ``charge`` with its tokens when they are known."""

    def __init__(self, specs: Iterable[KeySpec] = (), now: float = 0.0) -> None:
        self._by_digest: dict[bytes, KeyEntry] = {}
        self.replace(specs, now)

    def __len__(self) -> int:
        return len(self._by_digest)

    def __iter__(self):
        return iter(self._by_digest.values())

    def replace(self, specs: Iterable[KeySpec], now: float) -> None:
        """Swap in a new set of keys. A key that stays keeps its buckets and counters (a
        reload cannot reset a client's rate limit); one that goes is refused from now on."""
        old = self._by_digest
        new: dict[bytes, KeyEntry] = {}
        for spec in specs:
            digest = bytes.fromhex(spec.digest[len(HASH_PREFIX) :])
            if digest in new:
                raise ValueError(f"key {spec.name!r} is listed twice")
            entry = old.get(digest)
            if entry is None:
                entry = KeyEntry(spec, now)
            else:
                entry.apply(spec)
            new[digest] = entry
        self._by_digest = new

    # -- per request ------------------------------------------------------------------------
    def authenticate(self, authorization: bytes | None) -> KeyEntry:
        """The key of an ``Authorization`` header value, or a 401."""
        if not authorization:
            raise AuthError(
                401,
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                "invalid_api_key",
                "missing_key",
            )
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise AuthError(
                401,
                "Unsupported authorization scheme: send `Authorization: Bearer <key>`.",
                "invalid_api_key",
                "invalid_key",
            )
        digest = hashlib.sha256(credentials.strip()).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise AuthError(401, "Incorrect API key provided.", "invalid_api_key", "invalid_key")
        return entry

    def admit(self, entry: KeyEntry, now: float) -> None:
        """Count the request in, or raise a 429 (rate, concurrency or tokens per minute)."""
        if entry.max_concurrent and entry.in_flight >= entry.max_concurrent:
            raise AuthError(
                429,
                f"Rate limit reached for key {entry.name}: at most {entry.max_concurrent}"
                " concurrent requests.",
                "rate_limit_exceeded",
                "concurrency",
                type="requests",
                retry_after=1,
            )
        if entry.tpm:
            level = min(
                float(entry.tpm), entry.tpm_level + (now - entry.tpm_stamp) * entry.tpm / 60.0
            )
            entry.tpm_level, entry.tpm_stamp = level, now
            if level <= 0:
                exc = AuthError(
                    429,
                    f"Rate limit reached for key {entry.name}: {entry.tpm} tokens per minute.",
                    "rate_limit_exceeded",
                    "tokens",
                    type="tokens",
                    retry_after=_retry_after((1.0 - level) * 60.0 / entry.tpm),
                )
                exc.limits = rate_limit_headers(entry, now)
                raise exc
        if entry.rate:
            level = min(
                float(entry.burst), entry.rate_level + (now - entry.rate_stamp) * entry.rate
            )
            entry.rate_stamp = now
            if level < 1.0:
                entry.rate_level = level
                exc = AuthError(
                    429,
                    f"Rate limit reached for key {entry.name}: {entry.rate:g} requests per second.",
                    "rate_limit_exceeded",
                    "rate",
                    type="requests",
                    retry_after=_retry_after((1.0 - level) / entry.rate),
                )
                exc.limits = rate_limit_headers(entry, now)
                raise exc
            entry.rate_level = level - 1.0
        entry.in_flight += 1
        entry.requests += 1

    @staticmethod
    def release(entry: KeyEntry) -> None:
        """The request of an admitted key ended (call exactly once, in a ``finally``)."""
        entry.in_flight -= 1

    @staticmethod
    def refund(entry: KeyEntry) -> None:
        """Undo :meth:`admit` for a request handed on before it started (the compiled lane's,
        to the server, which admits it again): its request token back, not counted."""
        entry.in_flight -= 1
        entry.requests -= 1
        if entry.rate:
            entry.rate_level = min(float(entry.burst), entry.rate_level + 1.0)

    @staticmethod
    def charge(entry: KeyEntry, tokens: int, now: float) -> None:
        """Spend ``tokens`` from the key's tokens-per-minute bucket (it may go below zero:
        the next request then waits for the refill)."""
        if tokens <= 0:
            return
        entry.tokens += tokens
        if entry.tpm:
            level = min(
                float(entry.tpm), entry.tpm_level + (now - entry.tpm_stamp) * entry.tpm / 60.0
            )
            entry.tpm_level, entry.tpm_stamp = level - tokens, now

    @staticmethod
    def check_priority(entry: KeyEntry, priority: int) -> None:
        """A 403 when a request asks for more urgency (a lower ``priority``) than its key's
        ``min_priority`` allows."""
        floor = entry.min_priority
        if floor is not None and priority < floor:
            raise AuthError(
                403,
                f"The API key {entry.name} may not send a priority below {floor} (lower runs"
                f" first); got {priority}.",
                "priority_not_allowed",
                "priority",
                param="priority",
            )

    @staticmethod
    def check_model(entry: KeyEntry, model: str, asked: str | None = None) -> None:
        """A 403 unless the key may use ``model`` (the canonical name, or ``asked``, the name
        or alias the client sent)."""
        models = entry.models
        if models is None or model in models or (asked is not None and asked in models):
            return
        raise AuthError(
            403,
            f"The API key {entry.name} is not allowed to use the model `{asked or model}`.",
            "model_not_allowed",
            "model",
            param="model",
        )


def specs_from_entries(
    entries: Sequence[Mapping[str, Any]] | Sequence[Any], defaults: Any
) -> list[KeySpec]:
    """KeySpecs from config entries (``ApiKeyConfig`` structs or dicts of the same keys) with
    ``defaults`` (an ``AuthConfig``) for the limits an entry leaves unset."""
    out: list[KeySpec] = []
    for e in entries:
        get = e.get if isinstance(e, Mapping) else lambda k, d=None, _e=e: getattr(_e, k, d)
        digest = get("key")
        name = get("name") or "key-" + digest[len(HASH_PREFIX) : len(HASH_PREFIX) + 8]
        models = get("models") or None
        rps = get("requests_per_s")
        conc = get("max_concurrent")
        tpm = get("tokens_per_min")
        priority = get("priority")
        floor = get("min_priority")
        if floor is None:
            floor = getattr(defaults, "min_priority", None)
        if priority is None:
            priority = getattr(defaults, "priority", 0)
        if floor is not None and priority < floor:
            raise ValueError(
                f"key {name!r}: its priority {priority} is below its min_priority {floor}"
            )
        out.append(
            KeySpec(
                digest=digest,
                name=name,
                models=frozenset(models) if models else None,
                requests_per_s=defaults.requests_per_s if rps is None else rps,
                burst=get("burst") or 0,
                max_concurrent=defaults.max_concurrent if conc is None else conc,
                tokens_per_min=defaults.tokens_per_min if tpm is None else tpm,
                weight=get("weight") or 1.0,
                priority=priority,
                min_priority=floor,
            )
        )
    return out


def read_keys_file(path: str) -> list[dict[str, Any]]:
    """The entries of a keys file (blocking: call it off the event loop). A ``.toml`` file holds
    ``[[keys]]`` tables (the fields of ``auth.keys``); any other is the plain list of
    :func:`parse_key_lines`.

    Raises:
        ValueError: unreadable, not UTF-8, bad TOML or a bad entry; never with a key in it.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the keys file {path!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the keys file {path!r} is not UTF-8 text") from None
    if not path.endswith(".toml"):
        try:
            return parse_key_lines(text)
        except ValueError as e:
            raise ValueError(f"keys file {path!r}: {e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # the parser's message may quote the line, and so a key: say where only
        raise ValueError(f"keys file {path!r}: not valid TOML") from None
    unknown = set(doc) - {"keys"}
    if unknown:
        raise ValueError(f"keys file {path!r}: unknown top-level key(s) {sorted(unknown)}")
    keys = doc.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ValueError(f"keys file {path!r}: `keys` must be an array of tables ([[keys]])")
    return keys
