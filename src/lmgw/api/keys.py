"""Client API keys at the API's edge: the check every request passes once, the usage meter of
keys with a tokens-per-minute limit, and the keys file watcher (the key table itself is the
sans-IO :mod:`lmgw.auth`).

With no keys configured nothing here runs: the servers get the plain :class:`~lmgw.api.app.App`.
With keys, they get :class:`Guarded`, which costs one header scan, one SHA-256 and one dict
lookup per request, plus two bucket updates for keys with rate limits.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..auth import (
    AuthError,
    KeyEntry,
    KeySpec,
    KeyTable,
    rate_limit_headers,
    read_keys_file,
    specs_from_entries,
)
from ..config import ApiKeyConfig, AuthConfig, ConfigError
from ..http.types import Headers, Request, Responder
from ..metrics import Counter, Gauge, Metrics

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("lmgw.auth")
_now = time.monotonic
#: the last `"total_tokens": N` of an answer (the usage object; non-streams end with it)
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
#: a prompt's tokens when the answer reports no usage: ~4 bytes of JSON per token
_BYTES_PER_TOKEN = 4
#: routes with their own credential (admin.token) instead of an API key
_OWN_TOKEN_PREFIXES = ("/admin/", "/dashboard", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _validated(entries: Iterable[Any], path: str) -> list[ApiKeyConfig]:
    out = []
    for i, entry in enumerate(entries, 1):
        try:
            out.append(msgspec.convert(entry, ApiKeyConfig))
        except msgspec.ValidationError as e:
            cause = e.__cause__
            if isinstance(cause, ConfigError):
                field = f"`{cause.path}`: " if cause.path else ""
                reason = f"{field}{cause.reason}"
            else:
                reason = str(e)
            raise ConfigError(f"keys file {path!r}, entry {i}: {reason}", path="auth.keys_file")
    return out


def load_specs(cfg: AuthConfig) -> list[KeySpec]:
    """Every configured key (``auth.keys``, LMGW_API_KEYS and ``auth.keys_file``), hashed, with
    the section's default limits filled in (blocking: reads the keys file).

    Raises:
        ConfigError: a bad keys file or entry (the message never holds a key).
    """
    entries: list[ApiKeyConfig] = list(cfg.keys)
    if cfg.keys_file is not None:
        try:
            raw = read_keys_file(cfg.keys_file)
        except ValueError as e:
            raise ConfigError(str(e), path="auth.keys_file") from None
        entries += _validated(raw, cfg.keys_file)
    try:
        specs = specs_from_entries(entries, cfg)
    except ValueError as e:
        raise ConfigError(str(e), path="auth") from None
    seen: set[str] = set()
    for spec in specs:
        if spec.digest in seen:
            raise ConfigError(f"key {spec.name!r} is configured twice", path="auth")
        seen.add(spec.digest)
    return specs


class AuthMetrics:
    """The API-key metrics, registered whether or not keys are configured (so every gateway
    exports the same names; without keys they stay empty)."""

    def __init__(self, metrics: Metrics) -> None:
        self.table: KeyTable | None = None
        self.rejected = Counter(
            "lmgw_auth_rejected_total",
            "Requests refused by the API key check, by reason (missing_key, invalid_key,"
            " model, rate, concurrency, tokens, priority).",
            ("reason",),
        )
        metrics.add(self.rejected)
        metrics.add(
            Counter(
                "lmgw_api_key_requests_total",
                "Requests admitted per API key (by the key's name, never the key).",
                ("key",),
                collect=lambda: (((e.name,), e.requests) for e in self._entries()),
            )
        )
        metrics.add(
            Counter(
                "lmgw_api_key_tokens_total",
                "Tokens charged per API key (usage of finished requests; keys with"
                " tokens_per_min only).",
                ("key",),
                collect=lambda: (((e.name,), e.tokens) for e in self._entries() if e.tpm),
            )
        )
        metrics.add(
            Gauge(
                "lmgw_api_key_in_flight",
                "Requests in progress per API key.",
                ("key",),
                collect=lambda: (((e.name,), e.in_flight) for e in self._entries()),
            )
        )

    def _entries(self) -> Iterable[KeyEntry]:
        return iter(self.table) if self.table is not None else iter(())


class ApiKeys:
    """The gateway's key table with its configuration, metrics and file watcher."""

    def __init__(self, cfg: AuthConfig, metrics: AuthMetrics) -> None:
        self.cfg = cfg
        self.table = KeyTable(load_specs(cfg), _now())
        self.open_paths = frozenset(cfg.open_paths)
        self.rejected = metrics.rejected
        metrics.table = self.table
        self._stamp = self._file_stamp()

    @classmethod
    def from_config(cls, cfg: AuthConfig, metrics: AuthMetrics) -> ApiKeys | None:
        """The key table, or None when no key is configured (the API is then open)."""
        return cls(cfg, metrics) if cfg.has_keys else None

    def __len__(self) -> int:
        return len(self.table)

    # -- per request ------------------------------------------------------------------------
    def admit(self, req: Request) -> KeyEntry:
        """The request's key, counted in; raises :class:`AuthError` (401/429)."""
        table = self.table
        authorization = req.header(b"authorization")
        if authorization is None:  # Anthropic's clients send the key as X-Api-Key
            key = req.header(b"x-api-key")
            if key is not None:
                authorization = b"Bearer " + key
        try:
            entry = table.authenticate(authorization)
            table.admit(entry, _now())
        except AuthError as exc:
            self.rejected.inc((exc.reason,))
            raise
        return entry

    def check_priority(self, entry: KeyEntry, priority: int) -> None:
        """A 403 unless the key may ask for that priority (``min_priority``)."""
        try:
            KeyTable.check_priority(entry, priority)
        except AuthError as exc:
            self.rejected.inc((exc.reason,))
            raise

    def check_model(self, entry: KeyEntry, model: str, asked: str | None = None) -> None:
        """A 403 unless the key may use the model."""
        try:
            KeyTable.check_model(entry, model, asked)
        except AuthError as exc:
            self.rejected.inc((exc.reason,))
            raise

    # -- the keys file ------------------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int, int] | None:
        path = self.cfg.keys_file
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-read ``auth.keys_file`` when it changes. A file that fails to load keeps the
        keys in force (a bad edit never opens or empties the gateway); the error is logged."""
        task_status.started()
        while True:
            await trio.sleep(self.cfg.reload_interval_s)
            stamp = await trio.to_thread.run_sync(self._file_stamp)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                specs = await trio.to_thread.run_sync(load_specs, self.cfg)
                self.table.replace(specs, _now())
            except (ConfigError, ValueError) as e:
                log.error("keys file not reloaded, the previous keys stay in force: %s", e)
                continue
            log.info("keys file reloaded: %d keys", len(self.table))


class Guarded:
    """The App behind the key check: what the servers run when keys are configured. Paths in
    ``auth.open_paths``, the admin API and the dashboard (both guarded by ``admin.token``)
    pass without a key."""

    __slots__ = ("app", "keys", "open_paths")

    def __init__(self, app: App, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = keys.open_paths

    async def on_timeout(self, req: Request, responder: Responder) -> None:
        await self.app.on_timeout(req, responder)

    async def upgrade(self, req: Request, upgrade: Any) -> None:
        """WebSocket requests (the dashboard's feed, guarded by ``admin.token``)."""
        await self.app.upgrade(req, upgrade)

    async def __call__(self, req: Request, responder: Responder) -> None:
        path = req.path
        if path in self.open_paths or path.startswith(_OWN_TOKEN_PREFIXES):
            await self.app(req, responder)
            return
        keys = self.keys
        try:
            entry = keys.admit(req)
        except AuthError as exc:
            await responder.send_full(exc.status, exc.headers(), exc.body())
            return
        req.principal = entry
        if entry.rate or entry.tpm:  # what is left of its limits, on every answer
            responder = RateLimitHeaders(responder, entry)
        try:
            await self.app(req, responder)
        finally:
            KeyTable.release(entry)


class RateLimitHeaders:
    """The client's responder, adding OpenAI's ``x-ratelimit-*`` headers (the key's limits as
    they stand when the answer starts) to the answer's head."""

    __slots__ = ("_entry", "_inner")

    def __init__(self, inner: Responder, entry: KeyEntry) -> None:
        self._inner = inner
        self._entry = entry

    def __getattr__(self, name: str) -> Any:  # broken, head_sent, ... of the server's responder
        return getattr(self._inner, name)

    @property
    def started(self) -> bool:
        return self._inner.started

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        limits = rate_limit_headers(self._entry, _now())
        await self._inner.send_full(status, [*headers, *limits], body)

    async def start(self, status: int, headers: Headers) -> None:
        await self._inner.start(status, [*headers, *rate_limit_headers(self._entry, _now())])

    async def send(self, data: bytes) -> None:
        await self._inner.send(data)

    async def end(self, data: bytes = b"") -> None:
        await self._inner.end(data)


class UsageMeter:
    """A responder that passes everything on and notes the answer's token usage and timing:
    for keys with a tokens-per-minute limit, and for KV accounting (``limits.kv_accounting``).
    Reads only: a bytes search per write, a regex on the one that carries usage. A stream
    without usage counts one token per event, and the prompt's estimate (its bytes / 4)."""

    __slots__ = ("_inner", "completion", "events", "prompt", "status", "t_end", "t_first",
                 "t_start", "usage")  # fmt: skip

    def __init__(self, inner: Responder | None) -> None:
        """``inner`` None: a meter of answers sent elsewhere (:meth:`whole`)."""
        self._inner = inner
        self.usage: int | None = None
        self.prompt: int | None = None
        self.completion: int | None = None
        self.events = 0
        self.status = 0
        self.t_start = _now()
        self.t_first = 0.0  # a stream's first event (0: a whole answer, or none yet)
        self.t_end = 0.0

    def __getattr__(self, name: str) -> Any:  # broken, head_sent, ... of the server's responder
        return getattr(self._inner, name)

    @property
    def started(self) -> bool:
        return self._inner.started

    def _scan(self, data: bytes) -> None:
        if b'"total_tokens"' in data:
            found = _TOTAL_TOKENS.findall(data)
            if found:
                self.usage = int(found[-1])
                prompt = _PROMPT_TOKENS.findall(data)
                completion = _COMPLETION_TOKENS.findall(data)
                if prompt and completion:
                    self.prompt, self.completion = int(prompt[-1]), int(completion[-1])
                return
        self.events += data.count(b"data: ")

    def events_of(self, data: bytes) -> bytes:
        """Note a group of a stream's events (the compiled lane's streams; a tap: returns
        ``data`` as it came)."""
        if not self.t_first:
            self.t_first = _now()
        self._scan(data)
        return data

    def carry(self, before: UsageMeter) -> None:
        """Take on what ``before`` noted (a stream the lane began, continued on the server)."""
        self.status, self.events, self.t_first = before.status, before.events, before.t_first
        self.usage, self.prompt, self.completion = before.usage, before.prompt, before.completion

    def whole(self, status: int, body: bytes) -> None:
        """Note a whole answer (what :meth:`send_full` sends; the compiled lane's answers)."""
        self.status = status
        if status < 400:
            self._scan(body)
        self.t_end = _now()

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.whole(status, body)
        await self._inner.send_full(status, headers, body)

    async def start(self, status: int, headers: Headers) -> None:
        self.status = status
        await self._inner.start(status, headers)

    async def send(self, data: bytes) -> None:
        if not self.t_first:
            self.t_first = _now()
        self._scan(data)
        await self._inner.send(data)

    async def end(self, data: bytes = b"") -> None:
        if data:
            if not self.t_first:
                self.t_first = _now()
            self._scan(data)
        self.t_end = _now()
        await self._inner.end(data)

    def tokens(self, request_bytes: int) -> int:
        """The tokens to charge: the reported usage, else the estimate; 0 for an error."""
        if self.status >= 400 or self.status == 0:
            return 0
        if self.usage is not None:
            return self.usage
        return max(0, self.events - 1) + request_bytes // _BYTES_PER_TOKEN  # minus [DONE]

    def kv_token_seconds(self, request_bytes: int) -> float:
        """What the answer held in an engine's KV cache, in token-seconds (an estimate from
        what the gateway sees; 0 for an error): the prompt's tokens from the first byte of the
        answer to its end, plus the output growing from none to all meanwhile (half of it,
        on average); before the first byte, the prompt filling in (half of it, on average).
        A whole (non-streamed) answer's first byte is its end: prompt and output all count
        half from the start. ``prompt``/``completion`` from the answer's usage, else the
        prompt's estimate (bytes / 4) and one token per streamed event."""
        if self.status >= 400 or self.status == 0 or not self.t_end:
            return 0.0
        prompt = self.prompt if self.prompt is not None else request_bytes // _BYTES_PER_TOKEN
        completion = self.completion
        if completion is None:
            completion = max(0, self.events - 1)  # minus [DONE]
        first = self.t_first or self.t_end
        filling = max(0.0, first - self.t_start)
        holding = max(0.0, self.t_end - first)
        if holding == 0.0:  # one write: no way to tell prefill from decode
            return (prompt + completion) / 2 * filling
        return prompt / 2 * filling + (prompt + completion / 2) * holding

    def charge(self, entry: KeyEntry, request_bytes: int) -> None:
        KeyTable.charge(entry, self.tokens(request_bytes), _now())
