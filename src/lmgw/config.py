"""Typed gateway configuration: a TOML file, then ``LMGW_*`` environment variables, then flags.

Every section is a frozen ``msgspec.Struct`` with ``forbid_unknown_fields=True``, so a typo fails
at startup with the key's path instead of being silently ignored. Values are checked twice: msgspec
checks types while converting, and each struct's ``__post_init__`` checks ranges and shapes (and
normalizes role names and worker URLs). Both kinds of failure surface as one exception type,
`ConfigError`, whose message names the key as a path (``workers[1].role``) and, when known, where
the value came from (a file, an environment variable or a flag).

Layering is done on plain data before a single conversion: the file is parsed into a dict, the
environment and the flags write into that dict (remembering which key came from where), and only
then does msgspec build the structs. A value is therefore validated once, in its final context.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from .cache.config import CacheConfig
from .multimodal.limits import MediaLimits, MediaProfile

__all__ = [
    "FLOWS",
    "FLOW_ROLES",
    "LOG_LEVELS",
    "NATIVE_DIALECT",
    "ROLES",
    "ROLE_NAMES",
    "SERVER_KINDS",
    "AdminConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "ConfigError",
    "DashboardConfig",
    "Flow",
    "GatewayConfig",
    "HealthConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MCPServerConfig",
    "ModelConfig",
    "RoutingConfig",
    "ServerConfig",
    "ServerKind",
    "ToolLoopConfig",
    "ToolsConfig",
    "TracingConfig",
    "UpstreamConfig",
    "WorkerConfig",
    "add_serve_arguments",
    "config_from_args",
    "config_from_mapping",
    "dump_config",
    "infer_flow",
    "is_native_url",
    "load_config",
    "loads_config",
    "native_endpoint",
    "normalize_role",
    "parse_worker_flag",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary: roles, flows, server kinds, log levels.

#: Canonical role names: encode, prefill, decode, merged prefill+decode.
ROLES: tuple[str, ...] = ("e", "p", "d", "pd")
#: Long name of each canonical role (used in messages, logs and docs).
ROLE_NAMES: dict[str, str] = {"e": "encode", "p": "prefill", "d": "decode", "pd": "merged"}
_ROLE_ALIASES: dict[str, str] = {
    **{r: r for r in ROLES},
    **{name: r for r, name in ROLE_NAMES.items()},
}
_ROLE_HELP = "expected pd/merged, e/encode, p/prefill, d/decode"

Flow = Literal["pd", "p/d", "e+pd", "e+p+d"]
#: Every flow (the stage graph of a model), in the order of the docs.
FLOWS: tuple[str, ...] = typing.get_args(Flow)
#: The worker roles each flow dispatches to, in stage order.
FLOW_ROLES: dict[str, tuple[str, ...]] = {
    "pd": ("pd",),
    "p/d": ("p", "d"),
    "e+pd": ("e", "pd"),
    "e+p+d": ("e", "p", "d"),
}

ServerKind = Literal["native", "hypercorn"]
SERVER_KINDS: tuple[str, ...] = typing.get_args(ServerKind)

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

#: The dialect of models whose workers speak lmgw's native ZeroMQ protocol (docs/protocols.md,
#: "Native workers"); their worker URLs are ``zmq+tcp://HOST:PORT`` or ``zmq+ipc://PATH``.
NATIVE_DIALECT = "lmgw-native"
_NATIVE_SCHEMES = ("zmq+tcp://", "zmq+ipc://")

# Policy names come from a registry elsewhere (plus entry points), so only their shape is checked.
_POLICY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


# --------------------------------------------------------------------------------------------------
# The one error type.


class ConfigError(ValueError):
    """Bad configuration input: the only exception the public loaders raise for bad input.

    Attributes:
        reason: what is wrong, in words.
        path: the key as a dotted path (``server.port``, ``workers[1].role``), or None.
        source: where the value came from, as a phrase (``in file `lmgw.toml```,
            ``from environment variable `LMGW_SERVER_PORT```), or None.
    """

    def __init__(self, reason: str, *, path: str | None = None, source: str | None = None):
        self.reason = reason
        self.path = path or None
        self.source = source
        super().__init__(reason)

    def __str__(self) -> str:
        where = f" at `{self.path}`" if self.path else ""
        src = f" {self.source}" if self.source else ""
        return f"config error{where}{src}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only fields survive pickling (errors may cross process boundaries)
        return (_rebuild_config_error, (self.reason, self.path, self.source))

    def within(self, prefix: str | None = None, source: str | None = None) -> ConfigError:
        """The same error seen from an enclosing table (``prefix``) and/or a known source."""
        return ConfigError(
            self.reason,
            path=_join_path(prefix or "", self.path or ""),
            source=self.source or source,
        )


def _rebuild_config_error(reason: str, path: str | None, source: str | None) -> ConfigError:
    return ConfigError(reason, path=path, source=source)


def _join_path(base: str, rel: str) -> str:
    if not base:
        return rel
    if not rel:
        return base
    return base + rel if rel.startswith("[") else f"{base}.{rel}"


def normalize_role(role: str) -> str:
    """The canonical short role (``e``/``p``/``d``/``pd``) for a short or long name, any case.

    Raises:
        ConfigError: when ``role`` names no role.
    """
    if isinstance(role, str):
        short = _ROLE_ALIASES.get(role.strip().lower())
        if short is not None:
            return short
    raise ConfigError(f"{role!r} is not a role ({_ROLE_HELP})")


def infer_flow(roles: Iterable[str]) -> str:
    """The flow a set of worker roles can serve.

    Rule: encode workers only ever add an ``e+`` stage in front; merged (``pd``) workers alone give
    ``pd``; as soon as split roles (``p`` or ``d``) are present the flow is split (``p/d``) and
    needs a worker for each half, where a merged worker can stand in for either half. Hence
    ``{pd}`` -> ``pd``, ``{p,d}`` -> ``p/d``, ``{e,pd}`` -> ``e+pd``, ``{e,p,d}`` -> ``e+p+d``,
    ``{pd,d}`` -> ``p/d``.

    Raises:
        ConfigError: no roles, an unknown role, encode workers alone, or one half of a split
            flow with nobody to do the other half.
    """
    if isinstance(roles, str):  # "pd" would otherwise read as the roles "p" and "d"
        raise TypeError("infer_flow() takes an iterable of roles, not one string")
    found = {normalize_role(r) for r in roles}
    if not found:
        raise ConfigError("no worker roles to infer a flow from")
    encode = "e" in found
    if not found & {"p", "d"}:
        if "pd" not in found:
            raise ConfigError(
                "encode workers alone cannot serve a model: add merged (pd) or prefill+decode"
                " workers"
            )
        return "e+pd" if encode else "pd"
    if not found & {"p", "pd"}:
        raise ConfigError("decode workers need prefill workers (p) or merged workers (pd)")
    if not found & {"d", "pd"}:
        raise ConfigError("prefill workers need decode workers (d) or merged workers (pd)")
    return "e+p+d" if encode else "p/d"


# --------------------------------------------------------------------------------------------------
# Small checks shared by the structs' __post_init__ methods. They raise ConfigError with a path
# relative to the struct; msgspec (or the loader) adds the struct's own path in front.


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"must be a positive finite number, got {value!r}", path=key)


def _non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"must be zero or a positive finite number, got {value!r}", path=key)


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"must be >= {low}, got {value!r}", path=key)


def _unique(names: list[str], what: str, path: str) -> set[str]:
    """The names as a set; ConfigError naming the first repeated one (``path``: its key, with
    ``{}`` for its index)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"duplicate {what} {name!r}", path=path.format(i))
        seen.add(name)
    return seen


def _non_empty(key: str, value: str) -> None:
    if not value.strip():
        raise ConfigError("must not be empty", path=key)


def _one_of(key: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{value!r} is not one of: {', '.join(allowed)}", path=key)


def comma_list(text: str) -> list[str]:
    """A comma-separated flag value as a list (blanks dropped): ``a, b,`` -> ``["a", "b"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _policy_name(key: str, value: str) -> None:
    if not _POLICY_NAME.fullmatch(value):
        raise ConfigError(
            f"{value!r} is not a policy name (letters, digits, '_', '-', '.'; not starting with a"
            " digit)",
            path=key,
        )


def _set(obj: msgspec.Struct, name: str, value: object) -> None:
    # The structs are frozen for their users; normalization in __post_init__ is the one writer.
    msgspec.structs.force_setattr(obj, name, value)


_STRUCT_OPTS = {"forbid_unknown_fields": True, "kw_only": True, "frozen": True}


# --------------------------------------------------------------------------------------------------
# The schema.


class ServerConfig(msgspec.Struct, **_STRUCT_OPTS):
    """The front door: where the gateway listens and which HTTP server runs there."""

    # Loopback by default: exposing a gateway to the network should be a deliberate choice.
    host: str = "127.0.0.1"
    # 0 lets the OS pick a free port (tests, simulations); the bound port is reported at startup.
    port: int = 8000
    # "native" is the trio+httptools data plane (~24x less CPU per request than hypercorn);
    # "hypercorn" serves everything through ASGI when TLS, HTTP/2 or WebSocket is needed.
    server: ServerKind = "native"
    # TLS certificate and key (PEM); only hypercorn terminates TLS, and it needs both.
    certfile: str | None = None
    keyfile: str | None = None
    # listen() backlog: absorbs connection bursts while the accept loop is busy.
    backlog: int = 1024
    # Plain non-streamed requests (the express lane's) on the native server are relayed by the
    # compiled lane: one epoll loop in C for all its connections, Python only for the
    # gateway's decisions (docs/architecture.md, "The compiled lane"). Off: the trio path.
    compiled_lane: bool = True
    # On shutdown, in-flight requests get this long to finish before they are cancelled;
    # 30 s covers most chat completions while keeping deploys quick.
    graceful_shutdown_s: float = 30.0
    # CORS: origins whose browser pages may call the API ("*" for any; vLLM's
    # --allowed-origins). Empty (the default): no CORS headers, OPTIONS is a 405, as before.
    cors_allow_origins: list[str] = msgspec.field(default_factory=list)
    # Request headers and methods a preflight allows ("*": any, the browsers' wildcard).
    cors_allow_headers: list[str] = msgspec.field(default_factory=lambda: ["*"])
    cors_allow_methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "POST"])
    # How long a browser may cache a preflight answer.
    cors_max_age_s: int = 600

    def __post_init__(self) -> None:
        _non_empty("host", self.host)
        for i, origin in enumerate(self.cors_allow_origins):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(
                    f'{origin!r} is not an origin (scheme://host[:port], no path) or "*"',
                    path=f"cors_allow_origins[{i}]",
                )
        _at_least("cors_max_age_s", self.cors_max_age_s, 0)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port!r} is out of range 0..65535", path="port")
        _one_of("server", self.server, SERVER_KINDS)
        _at_least("backlog", self.backlog, 1)
        _non_negative("graceful_shutdown_s", self.graceful_shutdown_s)
        if (self.certfile is None) != (self.keyfile is None):
            missing = "keyfile" if self.keyfile is None else "certfile"
            raise ConfigError("TLS needs both `certfile` and `keyfile`", path=missing)
        if self.certfile is not None:
            _non_empty("certfile", self.certfile)
            _non_empty("keyfile", self.keyfile or "")
            if self.server != "hypercorn":
                raise ConfigError(
                    'TLS is served by hypercorn only: set `server = "hypercorn"`', path="certfile"
                )

    @property
    def tls(self) -> bool:
        """Whether the front door terminates TLS."""
        return self.certfile is not None


class LimitsConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Bounds on what one client connection or request may cost the gateway."""

    # Request head (request line + headers) size; larger gets 431. 64 KiB fits big auth cookies
    # and tracing headers (nginx allows 32 KiB, h11 16 KiB by default).
    max_header_bytes: int = 65536
    # Request body size; larger gets 413. 32 MiB fits long prompts and inline base64 images.
    max_body_bytes: int = 33554432
    # Request bodies the gateway holds at once (being received, or kept by requests in flight
    # for retries); 0 = unlimited. A body whose Content-Length does not fit waits, unread, until
    # others finish, so a burst of large uploads cannot run the gateway out of memory.
    max_buffered_body_bytes: int = 512 << 20
    # After this many bytes of request bodies and large answers were let go, glibc's malloc_trim
    # gives the freed heap back to the OS (once per burst, off the event loop); 0 = never
    # (lmgw.memtrim).
    trim_heap_after_bytes: int = 64 << 20
    # ... and when the resident memory grew this much since the last trim (checked every 30 s:
    # steady small requests free heap too, spread out); 0 = never.
    trim_heap_on_growth_bytes: int = 32 << 20
    # Time to receive a full request head (slowloris defence), counted from the first byte.
    header_timeout_s: float = 10.0
    # Time to receive the body once the head is in; uploads of 32 MiB fit even on slow links.
    body_timeout_s: float = 60.0
    # Idle time allowed between requests on a kept-alive client connection; 75 s is nginx's
    # default and outlives typical client pools' 60 s, so the client closes first.
    keepalive_timeout_s: float = 75.0
    # Whole-request deadline, including the stream; 0 disables. 600 s bounds runaway generations.
    request_timeout_s: float = 600.0
    # A streamed request still waiting for its first event after this long (admission queue,
    # engine queue, a long prefill) commits to its 200 and sends an SSE comment every as long,
    # so proxies that cut idle connections (60-100 s) leave it alone; errors after that are
    # SSE error events. 0 (the default) keeps the status until the answer begins.
    sse_keepalive_s: float = 0.0
    # Open client connections; above it a new connection gets a 503 and is closed, so a flood
    # cannot exhaust file descriptors.
    max_connections: int = 4096
    # Requests the gateway runs at once (admission control); 0 = unlimited. Over it a request
    # waits in the queue below, so an overloaded fleet sheds load with 429s instead of slowing
    # every request down.
    max_concurrent_requests: int = 0
    # Requests in flight on one worker; a worker at the cap is skipped, and a request finding
    # every worker at it gets a 503 with Retry-After. 0 = unlimited.
    max_in_flight_per_worker: int = 0
    # Requests that may wait for a slot under max_concurrent_requests (in queue_policy's
    # order); a full queue is a 429 at once. 100 as in sgl-router; 0 rejects at once whenever
    # the cap is reached.
    queue_size: int = 100
    # Longest wait in that queue before a 429; 60 s as in sgl-router.
    queue_timeout_s: float = 60.0
    # The queue's order: "fair" (by the body's `priority`, lower first, with aging; then fair
    # share between tenants, i.e. API keys, by weight) or "fifo" (arrival order only).
    queue_policy: Literal["fair", "fifo"] = "fair"
    # Aging of the fair queue: a waiter gains one level of priority per this many seconds of
    # wait, so a low level is never starved for good; 0 = strict priority.
    priority_aging_s: float = 10.0
    # What a request costs its tenant in fair sharing: "tokens" (estimated: body bytes / 4 +
    # max_tokens x n), "requests" (1 each) or "kv_seconds" (what it held in the engines' KV
    # cache, token-seconds: estimated when granted, settled with the measured figure when it
    # ends; turns kv_accounting on).
    fair_share_cost: Literal["tokens", "requests", "kv_seconds"] = "tokens"
    # Measure each generation's KV-cache occupancy (token-seconds, from its usage and timing)
    # per tenant: lmgw_tenant_kv_token_seconds_total. Off: no meter on the answers.
    kv_accounting: bool = False
    # Without API keys: the request header naming a request's tenant for fair sharing (e.g.
    # "X-Tenant-Id"); unset: all requests are one tenant. Clients choose it freely, so it is
    # for trusted clients behind a proxy; an error together with API keys (the key is the
    # tenant then).
    tenant_header: str | None = None
    # A response write that makes no progress for this long (a client that stopped reading)
    # drops the connection, so it cannot hold a worker's generation until the deadline.
    write_timeout_s: float = 60.0
    # Open connections from one client address; 0 = no cap. Off by default: behind a load
    # balancer or proxy every client shares its address.
    max_connections_per_client: int = 0
    # Nesting of a JSON body (arrays and objects); deeper gets 400. 64 is far above real
    # requests (OpenAI's structured outputs allow 10 levels) and far below the ~1000 at which
    # Python's own recursion limit would turn a body into an internal error. 0: not checked
    # (saves a pass over the body, ~0.5 ns/byte; ~1000 levels are still refused).
    max_json_depth: int = 64
    # Chat messages in one request (400 above). Long agent traces stay far below it.
    max_messages: int = 4096
    # Content parts (text, image, audio, ...) over all messages of one request.
    max_content_parts: int = 8192
    # Cap on max_tokens / max_completion_tokens / max_new_tokens; 0 = none (a model with a
    # tokenizer has its context checked, else the worker refuses what cannot fit).
    max_output_tokens: int = 0
    # Choices per request (`n`): each is a full generation. 128 is OpenAI's own cap.
    max_n: int = 128
    # Completions' `best_of` (sequences generated server-side); 20 is OpenAI's cap.
    max_best_of: int = 20
    # Choices in one answer: a completions prompt batch's length times `n` (each a generation;
    # native workers get one Generate per choice, so this bounds the gateway's fan-out).
    max_choices: int = 2048
    # Stop sequences (`stop`, strings) per request; OpenAI allows 4, engines check each one
    # against every new token.
    max_stop_sequences: int = 16
    # `logit_bias` entries per request; 300 is OpenAI's cap.
    max_logit_bias: int = 300

    def __post_init__(self) -> None:
        _positive("write_timeout_s", self.write_timeout_s)
        _at_least("max_connections_per_client", self.max_connections_per_client, 0)
        if not 0 <= self.max_json_depth <= 512:
            raise ConfigError(
                f"must be 0..512 (Python's recursion limit bounds it), got {self.max_json_depth!r}",
                path="max_json_depth",
            )
        for key in ("max_messages", "max_content_parts", "max_n", "max_best_of", "max_choices"):
            _at_least(key, getattr(self, key), 1)
        for key in ("max_output_tokens", "max_stop_sequences", "max_logit_bias"):
            _at_least(key, getattr(self, key), 0)
        _at_least("max_concurrent_requests", self.max_concurrent_requests, 0)
        _at_least("max_in_flight_per_worker", self.max_in_flight_per_worker, 0)
        _at_least("queue_size", self.queue_size, 0)
        _positive("queue_timeout_s", self.queue_timeout_s)
        _non_negative("priority_aging_s", self.priority_aging_s)
        if self.tenant_header is not None and not re.fullmatch(
            r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", self.tenant_header
        ):
            raise ConfigError(
                f"must be an HTTP header name, got {self.tenant_header!r}", path="tenant_header"
            )
        _at_least("max_header_bytes", self.max_header_bytes, 1)
        _at_least("max_body_bytes", self.max_body_bytes, 1)
        _non_negative("max_buffered_body_bytes", self.max_buffered_body_bytes)
        _non_negative("trim_heap_after_bytes", self.trim_heap_after_bytes)
        _non_negative("trim_heap_on_growth_bytes", self.trim_heap_on_growth_bytes)
        _positive("header_timeout_s", self.header_timeout_s)
        _positive("body_timeout_s", self.body_timeout_s)
        _positive("keepalive_timeout_s", self.keepalive_timeout_s)
        _non_negative("request_timeout_s", self.request_timeout_s)
        _non_negative("sse_keepalive_s", self.sse_keepalive_s)
        _at_least("max_connections", self.max_connections, 1)


class UpstreamConfig(msgspec.Struct, **_STRUCT_OPTS):
    """How the gateway talks to workers."""

    # TCP connect to a worker; a healthy worker on a LAN answers in milliseconds, so 5 s means down.
    connect_timeout_s: float = 5.0
    # Until the worker's response headers; long prefills of huge prompts can take minutes.
    response_timeout_s: float = 600.0
    # Lifetime of an idle pooled connection. Below the worker's keep-alive so we rarely reuse a
    # connection the worker is closing: vLLM's default is only 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
    # A stale socket found anyway is retried on a fresh connection, invisibly.
    idle_timeout_s: float = 4.0
    # Idle connections kept per worker; 0 disables pooling. 256 covers bursts at high concurrency.
    max_idle_per_worker: int = 256
    # Attempts on connection failure before any byte reached the client (then it's too late);
    # 2 rides over one stale pooled connection or one worker that just died.
    max_attempts: int = 2
    # Sent to workers as "Authorization: Bearer <key>" (vLLM --api-key); None sends nothing.
    api_key: str | None = None
    # Pause before a retry on another worker: base * 2^(attempt-1), with +-50% jitter, so a
    # fleet-wide blip is not hammered in lockstep; 0 retries at once.
    retry_backoff_s: float = 0.01
    # A stream whose worker dies after tokens reached the client is continued on another
    # worker (prompt + the text so far) up to this many times; 0 ends it with an SSE error.
    migrate_streams: int = 1
    # Silence from a worker mid-stream longer than this is a failure (a hung worker), which
    # the stream survives by migration; 0 waits forever. Above any sane inter-token gap.
    stream_stall_timeout_s: float = 60.0
    # Plain non-streamed requests on merged HTTP workers take the express lane (the same
    # answers, a third less gateway CPU); false sends every request the general way.
    express_lane: bool = True

    def __post_init__(self) -> None:
        _positive("connect_timeout_s", self.connect_timeout_s)
        _positive("response_timeout_s", self.response_timeout_s)
        _positive("idle_timeout_s", self.idle_timeout_s)
        _at_least("max_idle_per_worker", self.max_idle_per_worker, 0)
        _at_least("max_attempts", self.max_attempts, 1)
        _at_least("migrate_streams", self.migrate_streams, 0)
        if not 0 <= self.retry_backoff_s <= 60:
            raise ConfigError("must be between 0 and 60", path="retry_backoff_s")
        if not self.stream_stall_timeout_s >= 0:
            raise ConfigError("must be >= 0", path="stream_stall_timeout_s")
        if self.api_key is not None:
            _non_empty("api_key", self.api_key)


class RoutingConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Which load-balancing policy picks the worker at each stage."""

    # Default policy for every role: stateless, fair, and needs no load data to be right.
    policy: str = "round_robin"
    # Per-role overrides, e.g. {p = "cache_aware", d = "least_load"}; keys in any role spelling,
    # stored in the short form. Without one, the encode role uses "consistent_hash" on each
    # media item's hash (an item goes to the encoder that already has it), the others `policy`.
    policies: dict[str, str] = {}
    # Flow of models not listed in [[models]] (e.g. ones only the workers report); None infers
    # it from the roles of the configured workers, so `--worker p=.. --worker d=..` just works.
    flow: Flow | None = None
    # Dialect of those models; "openai" means the engine default for the flow (models[].dialect).
    dialect: str = "openai"
    # Session key for consistent_hash / session_affinity: this request header (case-insensitive),
    # else the body's OpenAI `user` field. X-Session-Id is what Dynamo and LiteLLM users send.
    session_header: str = "x-session-id"
    # Candidate policies asked beside the active one on live traffic and never obeyed, each in
    # its own counterfactual world (docs/routing.md, "Shadow policies"): agreement, predicted
    # cache hits and load skew per policy, to switch with evidence. Costs each one's decision.
    shadow_policies: list[str] = []
    # A LoRA adapter's requests go only to workers where the adapter is active or a LoRA slot
    # is free (vLLM --max-loras, from its /metrics and the gateway's own dispatches), when
    # there are such; the policy chooses among them (docs/routing.md, "LoRA affinity"). Off:
    # it costs every request a wrapper call (~0.5 µs) and matters only for LoRA fleets.
    lora_affinity: bool = False
    # Answer with an `x-lmgw-route` header: policy, worker, predicted cached tokens and any
    # fallback reason (for debugging routing; off by default: it costs a few µs).
    route_header: bool = False
    # session_affinity forgets a session idle this long: about how long an engine keeps an idle
    # conversation's KV blocks under moderate load.
    session_ttl_s: float = 600.0
    # session_affinity's table bound (least recently used dropped first): ~250 B each.
    session_max_entries: int = 100_000
    # Responses API: how long the gateway remembers which worker stored a response (vLLM keeps
    # it in that process's memory; previous_response_id, GET and cancel must reach it), and how
    # many such ids it keeps (least recently used dropped first; ~200 B each). 0 entries: off.
    response_affinity_ttl_s: float = 86400.0
    response_affinity_entries: int = 100_000
    # consistent_hash_bounded / prefix_hash: a worker takes a key only while its load stays
    # within this factor of the mean (consistent hashing with bounded loads; 1.25 as SMG).
    # cache_aware: a worker takes a cache hit only while its recent dispatches do.
    bounded_load_factor: float = 1.25
    # prefix_hash keys on this many leading prompt tokens (x4 bytes without a tokenizer); 256
    # as SMG: covers a system prompt plus the start of the first message.
    prefix_hash_tokens: int = 256
    # cache_aware block size in tokens (x4 bytes without a tokenizer); vLLM's default is 16.
    cache_aware_block_size: int = 16
    # cache_aware's hard memory bound for its prefix index, per role that uses it. 64 MiB hold
    # about 2M blocks (32M tokens of prefixes): 64 workers x 500k cached tokens each.
    cache_aware_budget_bytes: int = 64 * 1024 * 1024
    # Only this many leading prompt tokens are hashed (bounds per-request CPU: ~1 us per 1k).
    cache_aware_max_prefix_tokens: int = 65536
    # cache_aware ignores a worker's predicted cache hit below this fraction of the prompt
    # (SGLang's cache_threshold; 0.3 is its CLI default).
    cache_threshold: float = 0.3
    # Load slack S = max(balance_abs_threshold, (balance_rel_threshold - 1) x least load): a
    # worker more than S requests above the least loaded is never chosen for its cache
    # (SGLang's imbalance test).
    balance_abs_threshold: int = 4
    balance_rel_threshold: float = 1.5
    # cache_aware's credit per cached block by the KV-event medium it is stored in (vLLM: GPU,
    # CPU with its offloading connector): a block the worker holds only in a slower tier counts
    # this fraction of a GPU block (Dynamo's device/host/disk defaults). Media not listed are
    # ignored.
    cache_tier_weights: dict[str, float] = msgspec.field(
        default_factory=lambda: {"GPU": 1.0, "CPU": 0.75, "DISK": 0.25}
    )
    # cache_aware's cost model, in prompt tokens of prefill: the fixed cost of one queued
    # prefill, and what each request in flight on a worker adds to a new request's wait.
    cache_aware_request_tokens: float = 32.0
    cache_aware_load_tokens: float = 64.0
    # cache_aware: holders a hot prefix should have. Above 1, a prefix hit often but held by
    # fewer workers is prefilled on the least busy other one in the background, so requests
    # choose between its holders by their queues. 1: off.
    cache_aware_replicas: int = 1
    # cache_aware: what a prompt token to compute weighs against a token of queued work. Above
    # 1, a miss also pays for the delay its long prefill imposes on the requests queued behind
    # it (a holder's queue is preferred to a new miss). 1: each request's own TTFT only.
    cache_aware_miss_weight: float = 1.0
    # P/D flows: "joint" picks a request's prefill and decode workers as one pair, by its
    # estimated time to first token: the prefill's queue and uncached tokens (the prefill
    # policy's cache prediction), then moving the KV from the prefill's zone to the decode's
    # (workers[].zone); decode workers stay within bounded_load_factor of their mean load. It
    # acts only when the workers name zones (without, both modes choose alike, at no cost).
    # "independent": each stage's policy alone (what SMG, vllm-router and llm-d do).
    placement: Literal["independent", "joint"] = "joint"
    # joint placement's KV transfer model: bandwidth within a zone (NVLink, same node) and
    # across zones (RDMA between nodes), in GB/s, and the KV bytes of one prompt token
    # (2 x layers x KV heads x head size x dtype bytes: 131072 for Llama-3-8B in bf16, 327680
    # for Llama-3-70B; models[].kv_bytes_per_token overrides it per model).
    kv_gbps_same_zone: float = 100.0
    kv_gbps_cross_zone: float = 12.5
    kv_bytes_per_token: int = 131072
    # joint placement's first guess of a prefill worker's speed (uncached prompt tokens per
    # second); it then learns the fleet's from the prefill legs it times.
    prefill_tokens_per_s: float = 20000.0

    def __post_init__(self) -> None:
        _policy_name("policy", self.policy)
        for key in ("kv_gbps_same_zone", "kv_gbps_cross_zone", "prefill_tokens_per_s"):
            value = getattr(self, key)
            if not (0.0 < value <= 1e9):
                raise ConfigError(f"must be > 0 and <= 1e9, got {value!r}", path=key)
        _at_least("kv_bytes_per_token", self.kv_bytes_per_token, 0)
        weights: dict[str, float] = {}
        for medium, weight in self.cache_tier_weights.items():
            if not medium.strip() or not 0.0 <= weight <= 1.0:
                raise ConfigError(
                    f"{medium!r} = {weight!r}: weights are between 0 and 1",
                    path="cache_tier_weights",
                )
            weights[medium.strip().upper()] = float(weight)
        _set(self, "cache_tier_weights", weights)
        header = self.session_header.strip().lower()
        if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", header):
            raise ConfigError(f"not a header name: {self.session_header!r}", path="session_header")
        _set(self, "session_header", header)
        _positive("session_ttl_s", self.session_ttl_s)
        _at_least("session_max_entries", self.session_max_entries, 1)
        _positive("response_affinity_ttl_s", self.response_affinity_ttl_s)
        _at_least("response_affinity_entries", self.response_affinity_entries, 0)
        if not (1.0 < self.bounded_load_factor <= 100.0):
            raise ConfigError(
                f"must be > 1 and <= 100, got {self.bounded_load_factor!r}",
                path="bounded_load_factor",
            )
        _at_least("prefix_hash_tokens", self.prefix_hash_tokens, 1)
        if not 1 <= self.cache_aware_block_size <= 4096:
            raise ConfigError(
                f"must be 1..4096, got {self.cache_aware_block_size!r}",
                path="cache_aware_block_size",
            )
        _at_least("cache_aware_budget_bytes", self.cache_aware_budget_bytes, 64 * 1024)
        _at_least(
            "cache_aware_max_prefix_tokens",
            self.cache_aware_max_prefix_tokens,
            self.cache_aware_block_size,
        )
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(
                f"must be between 0 and 1, got {self.cache_threshold!r}", path="cache_threshold"
            )
        _at_least("balance_abs_threshold", self.balance_abs_threshold, 0)
        if not 1 <= self.cache_aware_replicas <= 16:
            raise ConfigError(
                f"must be 1..16, got {self.cache_aware_replicas!r}", path="cache_aware_replicas"
            )
        if not 1.0 <= self.cache_aware_miss_weight <= 100.0:
            raise ConfigError(
                f"must be 1..100, got {self.cache_aware_miss_weight!r}",
                path="cache_aware_miss_weight",
            )
        for key in ("cache_aware_request_tokens", "cache_aware_load_tokens"):
            value = getattr(self, key)
            if not (0.0 <= value <= 1e9):
                raise ConfigError(f"must be between 0 and 1e9, got {value!r}", path=key)
        if not (self.balance_rel_threshold >= 1.0 and math.isfinite(self.balance_rel_threshold)):
            raise ConfigError(
                f"must be >= 1, got {self.balance_rel_threshold!r}", path="balance_rel_threshold"
            )
        normalized: dict[str, str] = {}
        for key, name in self.policies.items():
            try:
                role = normalize_role(key)
            except ConfigError as e:
                raise e.within(f"policies.{key}") from None
            if role in normalized:
                raise ConfigError(f"role {role!r} is given twice", path=f"policies.{key}")
            _policy_name(f"policies.{key}", name)
            normalized[role] = name
        _set(self, "policies", normalized)
        for i, name in enumerate(self.shadow_policies):
            _policy_name(f"shadow_policies[{i}]", name)
        if len(set(self.shadow_policies)) != len(self.shadow_policies):
            raise ConfigError("a policy is named twice", path="shadow_policies")

    def policy_for(self, role: str) -> str:
        """The policy name for ``role`` (any spelling): the override, else the default
        (``consistent_hash`` for encoders: media affinity)."""
        role = normalize_role(role)
        return self.policies.get(role, "consistent_hash" if role == "e" else self.policy)


class HealthConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Active health probes of workers."""

    # Probe period: 5 s notices a dead worker quickly at one cheap GET per worker.
    interval_s: float = 5.0
    # A probe slower than this counts as a failure; a healthy worker answers /health in ms.
    timeout_s: float = 2.0
    # Consecutive failures before ejection: 2 ignores a single lost probe.
    failure_threshold: int = 2
    # Consecutive successes before a worker (re)joins; 1 brings recovered workers back fast.
    success_threshold: int = 1
    # vLLM and SGLang both serve GET /health.
    path: str = "/health"
    # Passive outlier detection: this many failed requests in a row eject a worker without
    # waiting for a probe (0: off). Refused connections eject at once.
    outlier_failures: int = 5
    # An ejected worker is kept out this long before a probe may bring it back (half-open),
    # doubling with each ejection that follows soon after the last, up to the maximum.
    outlier_base_ejection_s: float = 2.0
    outlier_max_ejection_s: float = 60.0
    # When every worker of a role a model needs is ejected by request failures, route to those
    # whose health probe still passes instead of answering 503 to everyone (Envoy's panic
    # mode): a burst of transient failures must not take a whole role out for the ejection.
    panic_routing: bool = True
    # A worker with requests in flight whose engine processed no token (vLLM's prompt and
    # generation token counters, from the /metrics scrape) for this long is stuck: ejected
    # as a failing one, whatever its /health says (0: off). Chunked prefill moves the counters
    # at every engine step, so half a minute of silence under load is not a long prompt.
    stuck_timeout_s: float = 30.0
    # Scrape each worker's /metrics with every probe (vLLM's running/waiting/KV usage/prefix
    # cache counters): least_load and /admin/workers use them.
    scrape_metrics: bool = True
    # Native (zmq+) workers are not probed over HTTP: their channel sends a heartbeat this often
    # (any message from the worker counts as alive) ...
    native_heartbeat_interval_s: float = 1.0
    # ... and a worker silent this long is lost: its requests fail (retried or continued
    # elsewhere) and it is ejected until it registers again. 5 heartbeats ride over a GC pause.
    native_heartbeat_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("interval_s", self.interval_s)
        _positive("timeout_s", self.timeout_s)
        _at_least("failure_threshold", self.failure_threshold, 1)
        _at_least("success_threshold", self.success_threshold, 1)
        _at_least("outlier_failures", self.outlier_failures, 0)
        _positive("outlier_base_ejection_s", self.outlier_base_ejection_s)
        _positive("outlier_max_ejection_s", self.outlier_max_ejection_s)
        _non_negative("stuck_timeout_s", self.stuck_timeout_s)
        _positive("native_heartbeat_interval_s", self.native_heartbeat_interval_s)
        if not self.native_heartbeat_timeout_s > self.native_heartbeat_interval_s:
            raise ConfigError(
                "must be greater than native_heartbeat_interval_s",
                path="native_heartbeat_timeout_s",
            )
        if not self.path.startswith("/"):
            raise ConfigError(f"must start with '/', got {self.path!r}", path="path")


class DiscoveryConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Workers that announce themselves, besides the static `[[workers]]`."""

    # ZeroMQ address vLLM P2P NCCL instances ping every 3 s (their kv_connector_extra_config's
    # proxy_ip:proxy_port), e.g. "tcp://0.0.0.0:30001"; unset: no listener. Announced workers
    # join with their KV address; they serve whatever models they report.
    p2p_nccl_bind: str | None = None
    # An announced instance that has not pinged for this long is removed (3 missed pings + slack).
    p2p_nccl_expiry_s: float = 10.0
    # A TOML (or .json) file of `[[workers]]`, watched for changes; unset: none. At start-up a
    # bad file is an error; later a bad edit keeps the previous workers (a typo never drops them).
    file: str | None = None
    # How often the file is checked: one stat per second costs nothing.
    file_interval_s: float = 1.0
    # Whether a missing file means "no workers" (else it is an error at start-up and, if it
    # vanishes later, its last workers stay: a file briefly gone during a deploy drops nothing).
    file_missing_ok: bool = False
    # redis://[[user]:password@]host[:port][/db] where workers register with a TTL; unset: none.
    redis_url: str | None = None
    # Keys are `{redis_prefix}:workers:{id}`; separate fleets can share one Redis.
    redis_prefix: str = "lmgw"
    # Poll period (SCAN + MGET); a dead worker leaves after its TTL plus up to this.
    redis_interval_s: float = 2.0
    # Per Redis command (and connect): a Redis on the LAN answers in milliseconds.
    redis_timeout_s: float = 2.0
    # After Redis comes back, workers missing from it are kept this long before they drain, so
    # a restart that lost the keys does not empty the fleet before the workers write them again
    # (the registration helper's default TTL is 10 s, refreshed every TTL/3).
    redis_reconnect_grace_s: float = 10.0
    # Registration endpoint for lmgw native workers (`python -m lmgw.worker --gateway ADDR`),
    # e.g. "tcp://0.0.0.0:7100"; unset: none. Announced workers join as zmq+tcp:// workers and
    # leave when they say so or stay silent for 3 of their announce intervals.
    native_bind: str | None = None
    # Kubernetes: pods in `k8s_namespace` matching a label selector become workers while they
    # are Running, Ready and not terminating (docs/operations.md, "Running on Kubernetes").
    # One selector per role, e.g. "app=vllm,tier=llm"; unset: that role is not watched.
    k8s_selector: str | None = None  # merged (pd) workers
    k8s_prefill_selector: str | None = None
    k8s_decode_selector: str | None = None
    k8s_encode_selector: str | None = None
    # Unset: the service account's namespace (in a pod), else "default".
    k8s_namespace: str | None = None
    # The workers' HTTP port; unset: the container port named `k8s_port_name`.
    k8s_port: int | None = None
    k8s_port_name: str = "http"
    # Pod annotations read per pod ("": not read). SGLang prefill workers' bootstrap port,
    # as SMG reads it; models, comma-separated (unset or absent: learnt from /v1/models); a
    # native worker's ZeroMQ port (present: the worker is zmq+tcp://POD_IP:PORT).
    k8s_bootstrap_port_annotation: str | None = "sglang.ai/bootstrap-port"
    k8s_models_annotation: str | None = None
    k8s_native_port_annotation: str | None = "lmgw.io/native-port"
    # A worker's KV-transfer zone (workers[].zone): this pod annotation, else a pod label of
    # that name ("": not read); with k8s_zone_by_node, else the pod's node (one node's GPUs
    # share NVLink).
    k8s_zone_annotation: str | None = "lmgw.io/zone"
    k8s_zone_by_node: bool = False
    # A pod serving N data-parallel ranks behind one API (workers[].data_parallel_size): this
    # annotation's integer ("": not read); absent: one worker.
    k8s_data_parallel_annotation: str | None = "lmgw.io/data-parallel-size"
    # The API server; unset: in-cluster (KUBERNETES_SERVICE_HOST/_PORT, https).
    k8s_api_url: str | None = None
    # Bearer token (re-read as it rotates) and CA bundle; unset: the service account's files
    # when in-cluster, else no token and the system's trust store.
    k8s_token_file: str | None = None
    k8s_ca_file: str | None = None
    # Skip TLS verification of the API server (dev clusters only; logged as a warning).
    k8s_insecure_skip_verify: bool = False
    # Each watch asks the API server to end it after this long (then it is renewed).
    k8s_watch_timeout_s: float = 300.0
    # Connect, response head and list timeout.
    k8s_timeout_s: float = 10.0

    @property
    def k8s_selectors(self) -> dict[str, str]:
        """The configured selectors by role (``pd``, ``p``, ``d``, ``e``)."""
        by_role = {
            "pd": self.k8s_selector,
            "p": self.k8s_prefill_selector,
            "d": self.k8s_decode_selector,
            "e": self.k8s_encode_selector,
        }
        return {role: sel for role, sel in by_role.items() if sel is not None}

    def __post_init__(self) -> None:
        self._check_k8s()
        _positive("p2p_nccl_expiry_s", self.p2p_nccl_expiry_s)
        bind = self.p2p_nccl_bind
        if bind is not None and not bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(
                f"expected a ZeroMQ address like tcp://0.0.0.0:30001, got {bind!r}",
                path="p2p_nccl_bind",
            )
        native = self.native_bind
        if native is not None:
            scheme, sep, rest = native.partition("://")
            if scheme not in ("tcp", "ipc", "inproc") or not sep or not rest.strip():
                raise ConfigError(
                    f"expected a ZeroMQ address like tcp://0.0.0.0:7100, got {native!r}",
                    path="native_bind",
                )
            if scheme == "tcp" and not rest.rpartition(":")[2].isdigit():
                raise ConfigError(
                    f"a tcp:// address needs a port (0: any free one), got {native!r}",
                    path="native_bind",
                )
            if native == bind:
                raise ConfigError("must differ from p2p_nccl_bind", path="native_bind")
        if self.file is not None:
            _non_empty("file", self.file)
        _positive("file_interval_s", self.file_interval_s)
        if self.redis_url is not None:
            from .workers.discovery.resp import parse_redis_url  # (no cycle: runs after import)

            try:
                parse_redis_url(self.redis_url)
            except ValueError as e:  # its messages never contain the password
                raise ConfigError(str(e), path="redis_url") from None
        _non_empty("redis_prefix", self.redis_prefix)
        _positive("redis_interval_s", self.redis_interval_s)
        _positive("redis_timeout_s", self.redis_timeout_s)
        _non_negative("redis_reconnect_grace_s", self.redis_reconnect_grace_s)

    def _check_k8s(self) -> None:
        for key in ("k8s_selector", "k8s_prefill_selector", "k8s_decode_selector",
                    "k8s_encode_selector"):  # fmt: skip
            sel = getattr(self, key)
            if sel is not None:
                _non_empty(key, sel)
                if not sel.isprintable():
                    raise ConfigError("must be a label selector on one line", path=key)
                _set(self, key, sel.strip())
        ns = self.k8s_namespace
        if ns is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns):
            raise ConfigError(
                f"{ns!r} is not a namespace name (RFC 1123 label)", path="k8s_namespace"
            )
        if self.k8s_port is not None and not 0 < self.k8s_port < 65536:
            raise ConfigError(f"{self.k8s_port} is not a port", path="k8s_port")
        _non_empty("k8s_port_name", self.k8s_port_name)
        for key in ("k8s_bootstrap_port_annotation", "k8s_models_annotation",
                    "k8s_native_port_annotation", "k8s_zone_annotation",
                    "k8s_data_parallel_annotation"):  # fmt: skip
            if not (getattr(self, key) or "").strip():
                _set(self, key, None)  # "" turns a default annotation off (TOML has no null)
        for key in ("k8s_token_file", "k8s_ca_file"):
            if getattr(self, key) is not None:
                _non_empty(key, getattr(self, key))
        url = self.k8s_api_url
        if url is not None:
            try:
                parts = urlsplit(url.strip())
                parts.port  # noqa: B018 (raises ValueError for a bad port)
            except ValueError as e:
                raise ConfigError(f"{url!r}: {e}", path="k8s_api_url") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"expected https://HOST[:PORT][/PATH], got {url!r}", path="k8s_api_url"
                )
            if parts.username is not None or parts.query or parts.fragment:
                raise ConfigError(
                    "no credentials, query or fragment (the token goes in k8s_token_file)",
                    path="k8s_api_url",
                )
            if parts.scheme == "http" and self.k8s_ca_file is not None:
                raise ConfigError("a CA file needs an https:// k8s_api_url", path="k8s_ca_file")
            _set(self, "k8s_api_url", url.strip().rstrip("/"))
        _positive("k8s_watch_timeout_s", self.k8s_watch_timeout_s)
        _positive("k8s_timeout_s", self.k8s_timeout_s)


class ReplicasConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Gateway replicas in front of one fleet, sharing routing hints and health verdicts."""

    # redis://... the replicas share (a stream of events); unset: this gateway shares nothing.
    redis_url: str | None = None
    # The stream is `{prefix}:replicas:events`; the replicas of one deployment use the same.
    prefix: str = "lmgw"
    # This replica's name in the stream; unset: a random one per start.
    id: str | None = None
    # Share cache_aware's dispatch-time predictions (workers without KV events).
    hints: bool = True
    # Share worker ejections (and their remaining time) and recoveries.
    health: bool = True
    # Events the stream keeps (approximately): what a starting replica replays to warm up.
    history: int = 100_000
    # Events are published in batches gathered for at most this long. 0: what queued up while
    # the previous batch was being written goes in the next one (batches still form under load),
    # and a lone hint leaves at once: the other replicas see it ~1 ms sooner, which lifted the
    # two-replica agreement at 0 ms think time from ~80% to ~97% (benchmarks/cachepool.py).
    flush_interval_s: float = 0.0
    # Per Redis command (and connect).
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            from .workers.discovery.resp import parse_redis_url

            try:
                parse_redis_url(self.redis_url)
            except ValueError as e:
                raise ConfigError(str(e), path="redis_url") from None
        _non_empty("prefix", self.prefix)
        if self.id is not None:
            _non_empty("id", self.id)
        _at_least("history", self.history, 1)
        _non_negative("flush_interval_s", self.flush_interval_s)
        _positive("timeout_s", self.timeout_s)


class LoggingConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Log output."""

    # "info" logs lifecycle events (workers joining/leaving) but nothing per request.
    level: str = "info"
    # JSON lines for log shippers; plain text is easier to read in a terminal.
    json: bool = False
    # One line per request costs CPU on the hot path, so it is opt-in.
    access_log: bool = False
    # Share of successful requests the access log writes (errors are always written): a busy
    # gateway's every request is a lot of lines for little news.
    access_log_sample: float = 0.1

    def __post_init__(self) -> None:
        level = self.level.strip().lower()
        _one_of("level", level, LOG_LEVELS)
        _set(self, "level", level)
        if not 0.0 <= self.access_log_sample <= 1.0:
            raise ConfigError("must be between 0 and 1", path="access_log_sample")


TRACE_EXPORTERS = ("otlp", "console", "none")


class TracingConfig(msgspec.Struct, **_STRUCT_OPTS):
    """OpenTelemetry spans per request and per stage (needs the ``opentelemetry-sdk`` extra)."""

    # Off: no OpenTelemetry import and no per-request work at all.
    enabled: bool = False
    # otlp: OTLP over HTTP (opentelemetry-exporter-otlp-proto-http); console: spans printed to
    # stdout; none: the process's global tracer provider (set up by the embedding program).
    exporter: str = "otlp"
    # OTLP/HTTP traces URL; unset: the exporter's default or OTEL_EXPORTER_OTLP_ENDPOINT.
    endpoint: str | None = None
    service_name: str = "lmgw"
    # Share of new traces kept (a client's sampled traceparent is always followed).
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        _one_of("exporter", self.exporter, TRACE_EXPORTERS)
        _non_empty("service_name", self.service_name)
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError("must be between 0 and 1", path="sample_ratio")


class DashboardConfig(msgspec.Struct, **_STRUCT_OPTS):
    """``GET /dashboard``: the live page and its WebSocket feed."""

    # On by default: the page costs nothing until someone opens it (one snapshot task).
    enabled: bool = True
    # How often the feed sends a snapshot.
    interval_s: float = 1.0
    # The sliding window of the rates and percentiles shown.
    window_s: float = 60.0
    # Browsers watching at once; more are turned away (each costs an encode per tick).
    max_subscribers: int = 16
    # Recent errors kept for the page.
    recent_errors: int = 50

    def __post_init__(self) -> None:
        _positive("interval_s", self.interval_s)
        if self.window_s < 2 * self.interval_s:
            raise ConfigError("must be at least twice interval_s", path="window_s")
        _positive("max_subscribers", self.max_subscribers)
        _positive("recent_errors", self.recent_errors)


class BatchesConfig(msgspec.Struct, **_STRUCT_OPTS):
    """OpenAI's Files and Batch APIs run by the gateway (``lmgw.batch``): a JSONL file of
    requests uploaded, run on the fleet in the background at a low priority, the answers
    collected in an output file."""

    # Serve /v1/files and /v1/batches.
    enabled: bool = True
    # Bounds of the in-memory file store (inputs and outputs): one file, and all of them.
    max_file_bytes: int = 32 << 20
    max_total_bytes: int = 512 << 20
    # Requests in one batch file.
    max_lines: int = 50_000
    # Batch requests in flight at once, across batches.
    concurrency: int = 8
    # The admission queue's priority of batch requests (vLLM's meaning: higher runs later),
    # so interactive traffic goes first when the gateway is at its cap.
    priority: int = 10
    # Files and finished batches are forgotten after this long.
    retention_s: float = 86400.0

    def __post_init__(self) -> None:
        _positive("max_file_bytes", self.max_file_bytes)
        _positive("max_total_bytes", self.max_total_bytes)
        _positive("max_lines", self.max_lines)
        _at_least("concurrency", self.concurrency, 1)
        _positive("retention_s", self.retention_s)


class StreamsConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Resumable answers (``lmgw.streams``): a generation request sent with
    ``X-Lmgw-Resumable: 1`` keeps generating when its client's connection drops, and the
    client picks the answer up again at ``GET /v1/streams/{id}`` (``Last-Event-ID``)."""

    # Off by default: a dropped client then costs its worker up to grace_s more of generation.
    resumable: bool = False
    # How long a generation goes on with nobody reading it before it is aborted.
    grace_s: float = 30.0
    # How long a finished answer stays available to a client that comes back.
    retain_s: float = 60.0
    # Resumable answers held at once (running or retained); past it a request is served
    # without resumption (no X-Lmgw-Stream-Id in its answer).
    max_streams: int = 256
    # Bytes of events kept per answer; older events are dropped past it (a resume from before
    # them is a 410).
    max_bytes: int = 4 << 20
    # Identical deterministic requests in flight (same API key, path and body; temperature 0
    # or a seed; one choice) share one generation: the later ones follow the first's answer
    # instead of sending the worker the same work again. Off by default: it costs each such
    # request the follower's buffering (~10% CPU per streamed event).
    coalesce: bool = False

    def __post_init__(self) -> None:
        _positive("grace_s", self.grace_s)
        _non_negative("retain_s", self.retain_s)
        _positive("max_streams", self.max_streams)
        _positive("max_bytes", self.max_bytes)


class PlannerConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Recommended worker counts per pool, a role's workers serving the same models
    (``lmgw.planner``): learned from the latencies and loads the gateway observes, exported as
    ``lmgw_planner_desired_workers{role,models}`` for an autoscaler and on ``GET
    /admin/planner``."""

    enabled: bool = True
    # The p90 targets: time to first token (held by encode and prefill legs, and by merged and
    # decode streams' first tokens) and time between tokens (decode and merged streams).
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.1
    # The load a plan serves: requests in flight averaged over this long.
    window_s: float = 60.0
    # A lower recommendation holds only after every plan of this long allowed it.
    scale_down_delay_s: float = 300.0

    def __post_init__(self) -> None:
        for key in ("ttft_slo_s", "itl_slo_s", "window_s"):
            _positive(key, getattr(self, key))
        _non_negative("scale_down_delay_s", self.scale_down_delay_s)


class HedgingConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Hedged streams (``lmgw.pipeline.hedge``): a merged-flow stream whose first token is
    late goes to a second worker too; the first to answer wins and the other is aborted.
    Cuts the TTFT tail left by a stalled or overloaded worker, at the price of some
    duplicated prefill, bounded by ``max_ratio``."""

    # Off by default: a hedge repeats the request's prefill on a second worker.
    enabled: bool = False
    # Wait this long for the first token before hedging; 0 = adaptive: the `quantile` of
    # the model's recent times to first token at this gateway (no hedge until `min_samples`).
    delay_s: float = 0.0
    quantile: float = 0.95
    # The adaptive delay never goes below this: under it a hedge buys little.
    min_delay_s: float = 0.02
    min_samples: int = 32
    # At most this share of requests is hedged (a token bucket; a burst of 10 hedges).
    max_ratio: float = 0.05
    # Only requests whose body is at most this many bytes: a short prompt's prefill is cheap
    # to repeat, a long one's is not.
    max_body_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        _non_negative("delay_s", self.delay_s)
        if not 0.5 <= self.quantile < 1.0:
            raise ConfigError(f"must be in [0.5, 1), got {self.quantile!r}", path="quantile")
        _non_negative("min_delay_s", self.min_delay_s)
        _at_least("min_samples", self.min_samples, 1)
        if not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.max_ratio!r}", path="max_ratio")
        _positive("max_body_bytes", self.max_body_bytes)


class RouteTargetConfig(msgspec.Struct, **_STRUCT_OPTS):
    """A model behind a model route and its weight (its share: weight / the route's total)."""

    model: str
    weight: float = 1.0


class ModelRouteConfig(msgspec.Struct, **_STRUCT_OPTS):
    """A name clients send that the gateway splits between models (canary, A/B) and falls
    back from (``lmgw.model_routes``)."""

    # The name clients send as "model". May be a served model's own name: the route then
    # stands in front of it (a target may name that model).
    model: str
    # The models behind it, with weights; a target is a served model, an alias or a LoRA
    # adapter, never another route.
    targets: list[RouteTargetConfig]
    # Tried in order when the chosen target cannot serve a request (no routable worker, its
    # workers failed or are overloaded) before anything reached the client.
    fallbacks: list[str] = []
    # "request": weighted round robin (exact shares); "session": a session (the routing
    # session header, else `user`, else the API key) stays on one target.
    split: Literal["request", "session"] = "request"
    # A model that also gets a copy of `mirror_share` of the requests (shadow traffic: its
    # answers are dropped; lmgw.mirrors). Unset: none.
    mirror: str | None = None
    mirror_share: float = 1.0

    def __post_init__(self) -> None:
        from .model_routes import Target, check_route

        targets = [Target(t.model, t.weight) for t in self.targets]
        problem = check_route(
            self.model, targets, self.fallbacks, self.split, self.mirror, self.mirror_share
        )
        if problem is not None:
            path = (
                "targets" if "target" in problem else "mirror_share" if "share" in problem else None
            )
            raise ConfigError(problem, path=path)


class AdminConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Who may use the admin API (``/admin/*``: add, remove and drain workers)."""

    # Bearer token of the admin API, separate from any API key; unset: the admin API answers
    # 403 (never open by default). Prefer LMGW_ADMIN_TOKEN to a secret in a file.
    token: str | None = None
    # Let clients on a loopback address in without the token (a single-host setup). Off:
    # behind a reverse proxy on the same host every client looks local.
    allow_unauthenticated_localhost: bool = False

    def __post_init__(self) -> None:
        if self.token is not None:
            if self.token != self.token.strip() or not self.token:
                raise ConfigError("must not be empty or start or end with whitespace", path="token")
            if not self.token.isascii() or not self.token.isprintable():
                raise ConfigError("must be printable ASCII (it is sent in a header)", path="token")


#: OpenAI's rule for function names (the tools a model may call)
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolLoopConfig(msgspec.Struct, **_STRUCT_OPTS):
    """The gateway-side tool loop of a model (docs/tools.md, "The tool loop")."""

    # Run the loop on every chat request of the model. False: only requests that ask for it
    # ("lmgw_tool_loop" in the body) run it, within the limits below.
    enabled: bool = True
    # Rounds of tool calls executed before the model must answer (requests may ask for fewer).
    max_rounds: int = 4
    # The gateway tools the model is offered (names); unset: every registered tool.
    tools: list[str] | None = None
    # Bound on one tool call; a call that takes longer becomes an error result the model reads.
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _at_least("max_rounds", self.max_rounds, 1)
        _positive("timeout_s", self.timeout_s)
        for i, name in enumerate(self.tools or ()):
            if not TOOL_NAME.fullmatch(name):
                raise ConfigError(f"{name!r} is not a tool name", path=f"tools[{i}]")


class ApiKeyConfig(msgspec.Struct, **_STRUCT_OPTS):
    """One client API key (``[[auth.keys]]`` or a ``[[keys]]`` table of ``auth.keys_file``)."""

    # The key clients send as `Authorization: Bearer <key>`, or its `sha256:<hex>` digest
    # (then the file holds no secret). Stored as the digest only, here and in memory.
    key: str
    # A label for logs, metrics and error messages; default `key-` + 8 hex of the digest.
    name: str | None = None
    # Models (names or aliases) the key may use; empty: all.
    models: list[str] = []
    # Requests per second (token bucket); unset: `auth.requests_per_s`; 0 = unlimited.
    requests_per_s: float | None = None
    # Requests the bucket allows at once after a pause; unset: one second's worth.
    burst: int | None = None
    # Requests of this key in progress at once; unset: `auth.max_concurrent`; 0 = unlimited.
    max_concurrent: int | None = None
    # Prompt + completion tokens per minute, charged at each request's end; unset:
    # `auth.tokens_per_min`; 0 = unlimited.
    tokens_per_min: int | None = None
    # The key's share of admission slots against other keys waiting at the same priority
    # (limits.queue_policy = "fair"): a key of weight 3 gets three slots to another's one.
    weight: float = 1.0
    # The priority of the key's requests that send none (vLLM's: lower runs first); unset:
    # `auth.priority`.
    priority: int | None = None
    # The most urgent priority the key's requests may ask for: a lower `priority` gets 403
    # (priority_not_allowed); unset: `auth.min_priority`.
    min_priority: int | None = None

    def __post_init__(self) -> None:
        from .auth import check_key_name, hash_key

        try:
            _set(self, "key", hash_key(self.key))
        except ValueError as e:
            raise ConfigError(str(e), path="key") from None
        if self.name is not None:
            try:
                check_key_name(self.name)
            except ValueError as e:
                raise ConfigError(str(e), path="name") from None
        for i, model in enumerate(self.models):
            _non_empty(f"models[{i}]", model)
        if self.requests_per_s is not None:
            _non_negative("requests_per_s", self.requests_per_s)
        for key in ("burst", "max_concurrent", "tokens_per_min"):
            value = getattr(self, key)
            if value is not None:
                _at_least(key, value, 0)
        _positive("weight", self.weight)
        floor = self.min_priority
        if self.priority is not None and floor is not None and self.priority < floor:
            raise ConfigError(
                f"below min_priority ({floor}): the key could not send its own default",
                path="priority",
            )


class AuthConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Client API keys for the OpenAI API (docs/security.md). The admin API has its own token."""

    # Serve the API without keys (anyone who can reach the port may use it); a warning is
    # logged at start. Without keys and without this, the gateway only starts on a loopback
    # address (a warning says it is open to local clients); elsewhere it refuses to start.
    open: bool = False
    # A file of keys: one per line, `KEY [MODEL,MODEL...]` (`#` comments), or, for a `.toml`
    # file, `[[keys]]` tables shaped like `auth.keys`. Re-read when it changes.
    keys_file: str | None = None
    # Keys in the config itself (prefer the file, or LMGW_API_KEYS: `KEY [MODELS]; KEY ...`).
    keys: list[ApiKeyConfig] = []
    # Limits of keys that do not set their own; 0 = unlimited.
    requests_per_s: float = 0.0
    max_concurrent: int = 0
    tokens_per_min: int = 0
    # Default `priority` and `min_priority` of keys (the admission queue); min_priority unset:
    # a key may ask for any priority.
    priority: int = 0
    min_priority: int | None = None
    # Paths answered without a key: health probes, Prometheus and the API description.
    open_paths: list[str] = msgspec.field(
        default_factory=lambda: ["/health", "/metrics", "/openapi.json"]
    )
    # How often `keys_file` is checked for changes (a stat per check).
    reload_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.keys_file is not None:
            _non_empty("keys_file", self.keys_file)
        if self.open and (self.keys or self.keys_file):
            raise ConfigError(
                "`open = true` with API keys configured: remove one of them", path="open"
            )
        _non_negative("requests_per_s", self.requests_per_s)
        _at_least("max_concurrent", self.max_concurrent, 0)
        _at_least("tokens_per_min", self.tokens_per_min, 0)
        _positive("reload_interval_s", self.reload_interval_s)
        for i, path in enumerate(self.open_paths):
            if not path.startswith("/"):
                raise ConfigError(f"must start with '/', got {path!r}", path=f"open_paths[{i}]")
        seen: dict[str, int] = {}
        for i, k in enumerate(self.keys):
            if k.key in seen:
                raise ConfigError(f"the same key as `keys[{seen[k.key]}]`", path=f"keys[{i}].key")
            seen[k.key] = i

    @property
    def has_keys(self) -> bool:
        """Whether keys are configured (a keys file counts, whatever it holds)."""
        return bool(self.keys) or self.keys_file is not None


class ModelConfig(msgspec.Struct, **_STRUCT_OPTS):
    """A model the gateway serves, and how its requests flow through the worker roles."""

    # The name clients send as "model"; required because it is the routing key.
    name: str
    # Stage graph: "pd" (merged workers), "p/d", "e+pd", "e+p+d"; "pd" needs nothing special.
    flow: Flow = "pd"
    # The engine protocol used to build stage requests; plain OpenAI works for merged workers.
    dialect: str = "openai"
    # Other names clients may use for this model (e.g. a short name for a long HF id).
    aliases: list[str] = []
    # Local folder with the model's tokenizer.json (+ tokenizer_config.json, ...), or a hub id
    # already in the local HF cache; never downloaded. Unset: no gateway-side tokenization
    # (/tokenize is relayed to a worker; no context-length check; no parity self-test).
    tokenizer: str | None = None
    # Chat template override: a file path or a literal template (vLLM's --chat-template).
    chat_template: str | None = None
    # How message content reaches the template: "string", "openai" or "auto" (vLLM's rule).
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    # Defaults for the template's variables (e.g. {enable_thinking = false}); requests'
    # chat_template_kwargs win.
    chat_template_kwargs: dict[str, Any] = {}
    # Render plain conversations (roles and string contents) by shape: each shape's prompt is
    # learned from the template once and then joined around the contents, exactly where the
    # template's use of contents allows it (docs/text.md). false: every prompt through jinja.
    chat_template_shapes: bool = True
    # Context length; unset: the tokenizer folder's (config.json / tokenizer_config.json).
    max_model_len: int | None = None
    # The tokenizer's segment cache, in characters: the token ids of chat prompts' stretches
    # (system prompts, earlier turns, chunks of long documents), so that only what is new in a
    # request is encoded (docs/text.md). Each entry counts 200 more for its objects; RSS grows
    # by about 3 bytes per character at most. 0: off. Watch
    # lmgw_tokenizer_segment_cache_misses_total against _hits_total to size it.
    tokenizer_cache_chars: int = 4 * 2**20
    # Text the "string" content format puts for media parts, e.g. {image = "<|image|>"}.
    media_placeholders: dict[str, str] = {}
    # Check prompt + max_tokens against max_model_len in the gateway (a 400 before any worker
    # is busy, and max_tokens filled in like vLLM when absent); costs a render and an encode
    # per request, so it is on only with a tokenizer.
    validate_context: bool = True
    # Parse the model's raw text into OpenAI tool_calls in the gateway (requests that offer
    # tools): "hermes", "llama3_json", "mistral", "qwen3_coder", "pythonic", "deepseek_v3"
    # (docs/tools.md). Unset: the worker's answer is relayed as it is.
    tool_parser: str | None = None
    # Split <think>...</think> into reasoning_content: "think" (the model writes both tags) or
    # "think_opened" (the template opens the block, the model only closes it). Unset: off.
    reasoning_parser: Literal["think", "think_opened"] | None = None
    # With tool_parser: what the worker gets for tool_choice "auto" (or none given). "forward"
    # sends it as is (vLLM with --enable-auto-tool-choice, the simulator); "none" suits a vLLM
    # without that flag, which refuses "auto" — the tools are still rendered into the prompt
    # unless the worker runs with --exclude-tools-when-tool-choice-none.
    worker_tool_choice: Literal["forward", "none"] = "forward"
    # How media pixels are resized/normalised for this model's native (ZeroMQ) encoders:
    # [models.media_profile.image] max_pixels, min_pixels, multiple_of, resample, ... (see
    # docs/multimodal.md). Unset: original size, uint8. The HTTP path sends original bytes.
    media_profile: MediaProfile | None = None
    # Execute calls of the gateway's tools (native and MCP) in the gateway and generate again,
    # e.g. {max_rounds = 3, tools = ["get_weather"], timeout_s = 10}. Unset: the loop runs only
    # for requests that ask for it (tools.per_request), with ToolLoopConfig's defaults.
    tool_loop: ToolLoopConfig | None = None
    # KV bytes of one prompt token for joint P/D placement's transfer estimate (see
    # routing.kv_bytes_per_token, the default for models without it).
    kv_bytes_per_token: int | None = None
    # Conditional disaggregation (p/d flows whose decode workers are whole engines: vllm-nixl,
    # vllm-lmcache; e+p+d with vllm-epd, requests without media): a request with at most this
    # many prompt tokens to prefill (its prompt, less what the decode worker's policy predicts
    # cached there) skips the prefill leg and is prefilled on its decode worker, with no KV
    # transfer (Dynamo's max_local_prefill_length). 0: every request is disaggregated.
    local_prefill_tokens: int = 0
    # Conditional disaggregation under load (same flows): a request of any length is also
    # prefilled on its decode worker when the prefill worker picked for it already has at least
    # this many requests (in flight through the gateway plus queued at its engine) and more than
    # the decode worker's unfinished local prefills, and the decode engine queues none and has
    # room in its KV cache (Dynamo's prefill_load; with local_prefill_tokens too, its
    # isl_or_load). 0: off.
    local_prefill_busy: int = 0

    def __post_init__(self) -> None:
        _non_empty("name", self.name)
        _one_of("flow", self.flow, FLOWS)
        if not 0 <= self.local_prefill_tokens <= 1 << 20:
            raise ConfigError("must be 0..1048576", path="local_prefill_tokens")
        if not 0 <= self.local_prefill_busy <= 1 << 20:
            raise ConfigError("must be 0..1048576", path="local_prefill_busy")
        if self.kv_bytes_per_token is not None:
            _at_least("kv_bytes_per_token", self.kv_bytes_per_token, 0)
        _non_empty("dialect", self.dialect)
        if self.tokenizer is not None:
            _non_empty("tokenizer", self.tokenizer)
        if self.max_model_len is not None:
            _at_least("max_model_len", self.max_model_len, 1)
        _at_least("tokenizer_cache_chars", self.tokenizer_cache_chars, 0)
        seen = {self.name}
        for i, alias in enumerate(self.aliases):
            key = f"aliases[{i}]"
            _non_empty(key, alias)
            if alias in seen:
                raise ConfigError(f"{alias!r} is already a name of this model", path=key)
            seen.add(alias)

    @property
    def names(self) -> tuple[str, ...]:
        """The name and then the aliases: every name that routes to this model."""
        return (self.name, *self.aliases)


def check_kv_address(text: str) -> str:
    """``host:port`` as vLLM's P2P NCCL connector parses it out of the request id."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or "_" in host or " " in host or not port.isdigit():
        raise ConfigError(f"{text!r} is not 'host:port'", path="kv_address")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"{port} is not a port", path="kv_address")
    return f"{host}:{int(port)}"


def check_kv_events_endpoint(text: str) -> str:
    """A ZeroMQ endpoint to connect a SUB to: ``tcp://HOST:PORT`` (a real port) or
    ``ipc://PATH``."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    bad = f"expected a ZeroMQ endpoint like tcp://10.0.0.5:5557 or ipc://PATH, got {text!r}"
    if scheme not in ("tcp", "ipc") or not sep or not rest:
        raise ConfigError(bad, path="kv_events")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(bad + " (a tcp:// endpoint needs its port)", path="kv_events")
    return text


class WorkerConfig(msgspec.Struct, **_STRUCT_OPTS):
    """A statically configured worker (discovery backends can add more at runtime)."""

    # Base URL of the worker's HTTP API, e.g. "http://10.0.0.5:8000" (stored without trailing
    # "/"), or a native worker's ZeroMQ endpoint: "zmq+tcp://HOST:PORT" or "zmq+ipc://PATH".
    url: str
    # Which stages it serves; any role spelling, stored short. Merged ("pd") is the plain vLLM case.
    role: str = "pd"
    # Models it serves; empty means whatever the worker reports on /v1/models.
    models: list[str] = []
    # Stable name in logs, metrics and the admin API; defaults to the URL (see `worker_id`).
    id: str | None = None
    # SGLang prefill workers: the port of their bootstrap server (sent as `bootstrap_port`);
    # unset sends null, which SGLang resolves itself.
    bootstrap_port: int | None = None
    # vLLM P2P NCCL workers: their KV address "ip:kv_port" (the connector's ZMQ address, not the
    # HTTP one); the gateway writes it into the request id that pairs P with D.
    kv_address: str | None = None
    # Native workers with CURVE (`--curve-secret-key`): the worker's public key file (its `.key`
    # certificate). The link is then encrypted and the worker authenticated; the gateway's own
    # key pair is `native.curve_secret_key_file`. Unset: plaintext.
    curve_server_key: str | None = None
    # The worker engine's KV-event publisher (vLLM `--kv-events-config` endpoint), e.g.
    # "tcp://10.0.0.5:5557": policies that use engine events (cache_aware's exact mode) subscribe
    # to it. Unset: the policy predicts the worker's cache from what it routed there.
    kv_events: str | None = None
    # The worker's KV-transfer domain (a node, an NVLink island, a rack): KV moves fast between
    # workers of one zone, slower across zones (routing.placement = "joint" weighs it). Unset:
    # no zone (all unset workers count as one).
    zone: str | None = None
    # vLLM data parallelism behind one API server (`vllm serve --data-parallel-size N`): each
    # of its N ranks has its own engine and prefix cache. N > 1 makes each rank a worker of its
    # own (ids "<id>#dp<r>", same URL), every request pinned to its rank with the
    # `X-data-parallel-rank` header, so cache-aware routing and load balancing see each
    # rank's cache and queue (`kv_events`: rank r subscribes to port + r, as vLLM publishes).
    # 1: the server is one worker and vLLM balances its ranks itself. "auto": the gateway
    # counts the ranks in the server's /metrics (vLLM's `engine` label) at each probe and makes
    # each a worker, following the server when it restarts with another size (until the first
    # probe, and for a server without ranks, the server is one worker).
    data_parallel_size: int | Literal["auto"] = 1
    # This entry is one rank of such a server (the expansion sets it; set it to list ranks one
    # by one). Unset: the whole server, or every rank when data_parallel_size > 1.
    data_parallel_rank: int | None = None

    def __post_init__(self) -> None:
        if self.zone is not None and not re.fullmatch(r"[A-Za-z0-9._:/-]{1,64}", self.zone):
            raise ConfigError(f"{self.zone!r}: 1-64 letters, digits or . _ : / -", path="zone")
        size = self.data_parallel_size
        auto = size == "auto"
        if not auto and not 1 <= size <= MAX_DP_RANKS:
            raise ConfigError(f'must be 1..{MAX_DP_RANKS} or "auto"', path="data_parallel_size")
        size = 1 if auto else size
        rank = self.data_parallel_rank
        if rank is not None:
            if auto:
                raise ConfigError(
                    'a rank is given by the server\'s size, not with data_parallel_size = "auto"',
                    path="data_parallel_rank",
                )
            top = size if size > 1 else MAX_DP_RANKS
            if not 0 <= rank < top:
                raise ConfigError(f"must be 0..{top - 1}", path="data_parallel_rank")
        if (rank is not None or size > 1 or auto) and is_native_url(self.url):
            raise ConfigError(
                "data-parallel ranks are addressed over HTTP (X-data-parallel-rank); a native"
                " worker registers each rank itself",
                path="data_parallel_size",
            )
        if self.bootstrap_port is not None and not 0 < self.bootstrap_port < 65536:
            raise ConfigError(f"{self.bootstrap_port} is not a port", path="bootstrap_port")
        if self.kv_events is not None:
            _set(self, "kv_events", check_kv_events_endpoint(self.kv_events))
        if rank is None:
            self._check_rank_ports(size)
        if self.kv_address is not None:
            _set(self, "kv_address", check_kv_address(self.kv_address))
        try:
            role = normalize_role(self.role)
        except ConfigError as e:
            raise e.within("role") from None
        _set(self, "role", role)
        _set(self, "url", _check_worker_url(self.url))
        for i, model in enumerate(self.models):
            _non_empty(f"models[{i}]", model)
        if self.id is not None:
            _non_empty("id", self.id)
        if self.curve_server_key is not None:
            _non_empty("curve_server_key", self.curve_server_key)
            if self.url.lower().startswith(("http://", "https://")):
                raise ConfigError(
                    "CURVE is for native (zmq+tcp://) workers; use https:// for HTTP workers",
                    path="curve_server_key",
                )

    @property
    def worker_id(self) -> str:
        """The worker's stable id: ``id`` if given, else the URL (with ``#dp<r>`` for a
        data-parallel rank)."""
        if self.id is not None:
            return self.id
        if self.data_parallel_rank is not None:
            return f"{self.url}#dp{self.data_parallel_rank}"
        return self.url

    def _check_rank_ports(self, size: int) -> None:
        """Rank r publishes KV events at the tcp port + r: the last one must be a port."""
        if self.kv_events and self.kv_events.startswith("tcp://"):
            last = int(self.kv_events.rpartition(":")[2]) + size - 1
            if last > 65535:
                raise ConfigError(
                    f"rank {size - 1}'s KV events would be on port {last}", path="kv_events"
                )

    @property
    def auto_ranks(self) -> bool:
        """Whether the server's ranks are counted at run time (``data_parallel_size = "auto"``)."""
        return self.data_parallel_size == "auto"

    def ranks(self, size: int | None = None) -> list[WorkerConfig]:
        """The workers this entry stands for: itself, or one per data-parallel rank (ids
        ``<id>#dp<r>``, KV events on the rank's endpoint) when ``data_parallel_size`` > 1.
        ``size``: the ranks an ``"auto"`` entry's server was found to have (None or 1: the
        server is one worker).

        Raises:
            ConfigError: the last rank's KV events would be on a port past 65535.
        """
        n = (size or 1) if self.auto_ranks else self.data_parallel_size
        assert isinstance(n, int)
        if n <= 1 or self.data_parallel_rank is not None:
            return [self]
        self._check_rank_ports(n)
        base = self.worker_id
        return [
            msgspec.structs.replace(
                self,
                id=f"{base}#dp{r}",
                data_parallel_size=n,
                data_parallel_rank=r,
                kv_events=None if self.kv_events is None else rank_endpoint(self.kv_events, r),
            )
            for r in range(n)
        ]


#: the most data-parallel ranks one worker entry may have
MAX_DP_RANKS = 1024


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Where data-parallel rank ``rank`` of a vLLM server publishes its KV events, given the
    configured endpoint: vLLM offsets a tcp port by the rank and suffixes an ipc path with
    ``_dp<rank>`` (rank 0 as configured)."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def is_native_url(url: str) -> bool:
    """Whether a worker URL names a native (ZeroMQ) worker rather than an HTTP one."""
    return url[:10].lower() in _NATIVE_SCHEMES


def native_endpoint(url: str) -> str:
    """The ZeroMQ endpoint of a native worker URL: ``zmq+tcp://h:1`` -> ``tcp://h:1``."""
    return url[4:]


def _check_native_url(text: str, bad: Any) -> str:
    scheme, rest = text[:7].lower(), text[10:]
    if "?" in rest or "#" in rest:
        raise bad("no query or fragment allowed")
    if scheme == "zmq+ipc":
        if not rest.strip("/"):
            raise bad("expected zmq+ipc://PATH")
        return "zmq+ipc://" + rest
    try:
        parts = urlsplit("tcp://" + rest)
        port = parts.port
    except ValueError as e:
        raise bad(str(e)) from None
    if not parts.hostname:
        raise bad("no host")
    if port is None or port == 0:
        raise bad("expected zmq+tcp://HOST:PORT (a ZeroMQ endpoint needs its port)")
    if parts.username is not None or parts.password is not None:
        hidden = "zmq+tcp://...@" + parts.netloc.rpartition("@")[2]
        raise bad("credentials in URLs leak into logs", hidden)
    if parts.path.strip("/"):
        raise bad("expected zmq+tcp://HOST:PORT and nothing else")
    return "zmq+tcp://" + parts.netloc


def _check_worker_url(url: str) -> str:
    def bad(why: str, shown: str = url) -> ConfigError:
        return ConfigError(f"{shown!r} is not a worker URL: {why}", path="url")

    text = url.strip()
    if is_native_url(text):
        return _check_native_url(text, bad)
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as e:
        raise bad(str(e)) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("expected http(s)://HOST[:PORT], zmq+tcp://HOST:PORT or zmq+ipc://PATH")
    if not parts.hostname:
        raise bad("no host")
    if port == 0:
        raise bad("port 0")
    if parts.username is not None or parts.password is not None:
        hidden = parts._replace(netloc="...@" + parts.netloc.rpartition("@")[2]).geturl()
        raise bad("credentials in URLs leak into logs; use `upstream.api_key`", hidden)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise bad("no query or fragment allowed")
    return text.rstrip("/")


class NativeConfig(msgspec.Struct, **_STRUCT_OPTS):
    """The gateway's side of native (ZeroMQ) worker links (docs/native-protocol.md)."""

    # CURVE: this gateway's key pair, a ZeroMQ certificate `.key_secret` file (from
    # `lmgw.transport.zmq.curve.generate_keys(DIR, NAME)`; its `.key` twin goes into each
    # worker's `--curve-allow` directory). Needed by workers with `curve_server_key`.
    curve_secret_key_file: str | None = None
    # With a worker on this host (same boot and /dev/shm), tensors of at least this many
    # bytes (media, hand-offs) go by shared memory: one memcpy and a handle instead of the bytes
    # through two sockets. 0: never, and workers send none either (tensor_shm not offered).
    shm_threshold_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if self.curve_secret_key_file is not None:
            _non_empty("curve_secret_key_file", self.curve_secret_key_file)
        _at_least("shm_threshold_bytes", self.shm_threshold_bytes, 0)


class MCPServerConfig(msgspec.Struct, **_STRUCT_OPTS):
    """An MCP server whose tools the gateway calls: a command (stdio) or a URL (streamable
    HTTP)."""

    # Names the server in logs, metrics and errors; unique among [[tools.mcp]].
    name: str
    # stdio: the program and its arguments, started by the gateway and stopped with it.
    command: list[str] = []
    # stdio: extra environment variables (the child gets a minimal environment plus these).
    env: dict[str, str] = {}
    # stdio: the working directory of the command; unset: the gateway's.
    cwd: str | None = None
    # streamable HTTP: the server's endpoint, e.g. "http://127.0.0.1:8931/mcp".
    url: str | None = None
    # streamable HTTP: headers on every request (e.g. an Authorization bearer token).
    headers: dict[str, str] = {}
    # Bound on connecting and listing the tools; a server that misses it is retried later.
    timeout_s: float = 20.0
    # Prepended to the server's tool names (e.g. "fs_"), to keep names of servers apart.
    prefix: str = ""

    def __post_init__(self) -> None:
        _non_empty("name", self.name)
        if bool(self.command) == (self.url is not None):
            raise ConfigError("set exactly one of `command` (stdio) or `url` (HTTP)", path="url")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"{self.url!r} is not an http(s) URL", path="url")
        if self.command:
            _non_empty("command[0]", self.command[0])
        _positive("timeout_s", self.timeout_s)
        if self.prefix and not TOOL_NAME.fullmatch(self.prefix):
            raise ConfigError(f"{self.prefix!r} cannot start a tool name", path="prefix")


class ToolsConfig(msgspec.Struct, **_STRUCT_OPTS):
    """Tools the gateway executes itself (docs/tools.md): native Python tools come from the SDK
    and the ``lmgw.tools`` entry points, MCP servers from ``[[tools.mcp]]``."""

    # Load the tools that installed packages declare under the `lmgw.tools` entry-point group.
    entry_points: bool = True
    # Let a request turn the tool loop on ("lmgw_tool_loop": true or {...}) for a model whose
    # models[].tool_loop does not enable it. Off: only models[].tool_loop.enabled runs tools.
    per_request: bool = True
    # While tools run, a streamed answer gets an SSE comment this often, so proxies with idle
    # timeouts (often 60-100 s) keep the connection.
    keepalive_s: float = 10.0
    # Threads for synchronous (blocking) native tools, shared by all requests.
    threads: int = 8
    # MCP servers, [[tools.mcp]] tables.
    mcp: list[MCPServerConfig] = []

    def __post_init__(self) -> None:
        _positive("keepalive_s", self.keepalive_s)
        _at_least("threads", self.threads, 1)
        _unique([server.name for server in self.mcp], "MCP server name", "mcp[{}].name")


class GatewayConfig(msgspec.Struct, **_STRUCT_OPTS):
    """The whole gateway configuration (the root of the TOML file)."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    # Limits on request media and where it may come from (docs/multimodal.md).
    media: MediaLimits = msgspec.field(default_factory=MediaLimits)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    # OpenTelemetry tracing (docs/observability.md).
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    # The live dashboard (docs/observability.md).
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    # The admin API's token (docs/operations.md, "Admin API").
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    # Resumable answers (X-Lmgw-Resumable, GET /v1/streams/{id}).
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    # OpenAI's Files and Batch APIs (/v1/files, /v1/batches), run on the fleet.
    batches: BatchesConfig = msgspec.field(default_factory=BatchesConfig)
    # Hedged streams: a late first token sends the request to a second worker too.
    hedging: HedgingConfig = msgspec.field(default_factory=HedgingConfig)
    # Recommended worker counts per role, for an autoscaler (docs/operations.md, "Planner").
    planner: PlannerConfig = msgspec.field(default_factory=PlannerConfig)
    # Client API keys and their limits (docs/security.md).
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    # Native (ZeroMQ) worker links: the gateway's CURVE key pair.
    native: NativeConfig = msgspec.field(default_factory=NativeConfig)
    # Tools the gateway runs itself: entry points, MCP servers, the tool loop's keep-alives.
    tools: ToolsConfig = msgspec.field(default_factory=ToolsConfig)
    # The distributed cache pool: tiers, budgets, Redis (docs/cache.md).
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    # Gateway replicas sharing routing hints and health verdicts through Redis.
    replicas: ReplicasConfig = msgspec.field(default_factory=ReplicasConfig)
    # Empty: serve whatever models the workers report, each with the default flow.
    models: list[ModelConfig] = []
    # Names clients send that are split between models and fall back to others.
    model_routes: list[ModelRouteConfig] = []
    # Empty: workers come from discovery or the admin API.
    workers: list[WorkerConfig] = []

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}  # every model name and alias -> the key that claimed it first
        for i, model in enumerate(self.models):
            key = f"models[{i}].name"
            if model.name in owner:
                raise ConfigError(
                    f"duplicate model name {model.name!r} (already `{owner[model.name]}`)", path=key
                )
            owner[model.name] = key
        for i, model in enumerate(self.models):
            for j, alias in enumerate(model.aliases):
                key = f"models[{i}].aliases[{j}]"
                if alias in owner:
                    raise ConfigError(f"alias {alias!r} collides with `{owner[alias]}`", path=key)
                owner[alias] = key
        routes = _unique(
            [route.model for route in self.model_routes], "model route", "model_routes[{}].model"
        )
        for i, route in enumerate(self.model_routes):
            for j, t in enumerate(route.targets):
                if t.model in routes and t.model != route.model:
                    raise ConfigError(
                        f"target {t.model!r} is a model route: a route's targets are models",
                        path=f"model_routes[{i}].targets[{j}].model",
                    )
            for j, f in enumerate(route.fallbacks):
                if f in routes and f != route.model:
                    raise ConfigError(
                        f"fallback {f!r} is a model route: a route's fallbacks are models",
                        path=f"model_routes[{i}].fallbacks[{j}]",
                    )
            if route.mirror in routes and route.mirror != route.model:
                raise ConfigError(
                    f"mirror {route.mirror!r} is a model route: a route's mirror is a model",
                    path=f"model_routes[{i}].mirror",
                )
        if self.limits.tenant_header is not None and self.auth.has_keys:
            raise ConfigError(
                "with API keys the key is a request's tenant: remove `limits.tenant_header`"
                " (clients could pick any tenant with it)",
                path="limits.tenant_header",
            )
        ids: dict[str, int] = {}
        for i, entry in enumerate(self.workers):
            for worker in entry.ranks():  # a data-parallel server's ranks are workers too
                wid = worker.worker_id
                if wid in ids:
                    hint = "ids must be unique" if entry.id is not None else "give each an `id`"
                    raise ConfigError(
                        f"duplicate worker {wid!r} (also `workers[{ids[wid]}]`); {hint}",
                        path=f"workers[{i}].{'id' if entry.id is not None else 'url'}",
                    )
                ids[wid] = i
        for i, worker in enumerate(self.workers):
            if worker.curve_server_key is not None and self.native.curve_secret_key_file is None:
                raise ConfigError(
                    "a CURVE worker needs the gateway's key pair: set "
                    "`native.curve_secret_key_file`",
                    path=f"workers[{i}].curve_server_key",
                )

    def model(self, name: str) -> ModelConfig | None:
        """The configured model that ``name`` (a name or an alias) refers to, if any."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model
        return None


#: every section of the root table, for LMGW_<SECTION>_<KEY> overrides (all of them: a
#: section missing here made its variables silently ignored)
_SECTIONS: dict[str, type[msgspec.Struct]] = {
    f.name: f.type
    for f in msgspec.structs.fields(GatewayConfig)
    if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
}


# --------------------------------------------------------------------------------------------------
# Turning msgspec's messages into ConfigError.

_AT_KEY = re.compile(r"^(?P<msg>.*) - at `key` in `\$(?P<path>[^`]*)`$", re.S)
_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_PATH_TOKEN = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _split_path(path: str) -> list[str | int]:
    """``workers[1].role`` -> ["workers", 1, "role"]."""
    out: list[str | int] = []
    for m in _PATH_TOKEN.finditer("." + path if path and not path.startswith("[") else path):
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return out


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _type_at(tokens: list[str | int]) -> Any:
    """The declared type at a path below GatewayConfig, or None when unknown."""
    tp: Any = GatewayConfig
    for tok in tokens:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and isinstance(tok, str):
            fields = {f.name: f.type for f in msgspec.structs.fields(tp)}
            if tok not in fields:
                return None
            tp = fields[tok]
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return tp


def _value_at(data: Any, tokens: list[str | int]) -> Any:
    """The raw value at a path, or UNSET (used to quote the bad value in messages)."""
    for tok in tokens:
        if not isinstance(data, list | dict):
            return msgspec.UNSET
        try:
            data = data[tok]  # type: ignore[index]
        except (IndexError, KeyError, TypeError):
            return msgspec.UNSET
    return data


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "object": "a table",
    "array": "an array",
}
_TOML_KINDS = {
    **_TYPE_WORDS,
    "float": "a float",
    "null": "nothing",
    "date": "a date",
    "datetime": "a date-time",
    "time": "a time",
}


def _describe_expected(expected: str) -> str:
    words = [w.strip() for w in expected.split("|")]
    words = [_TYPE_WORDS.get(w, w) for w in words if w != "null"]
    return " or ".join(words) or expected


def _from_validation_error(
    err: msgspec.ValidationError,
    data: Any,
    origins: Mapping[str, str],
    default_source: str | None,
) -> ConfigError:
    msg = str(err)
    m = _AT_KEY.match(msg)
    key_error = m is not None
    m = m or _AT.match(msg)
    if m:
        msg, path = m.group("msg"), m.group("path").lstrip(".")
    else:
        path = ""
    # msgspec writes dict values as `[...]`; name the table instead.
    path = path.replace("[...]", "")
    cause = err.__cause__
    if isinstance(cause, ConfigError):
        full = _join_path(path, cause.path or "")
        return ConfigError(
            cause.reason, path=full, source=_source_of(full, origins, default_source)
        )
    tokens = _split_path(path)
    reason = msg
    if key_error:
        reason = f"bad key: {msg[0].lower()}{msg[1:]}"
    elif um := re.fullmatch(r"Object contains unknown field `(.*)`", msg):
        reason = _unknown_key_reason(um.group(1), _type_at(tokens), top=not path)
    elif mm := re.fullmatch(r"Object missing required field `(.*)`", msg):
        reason = f"missing required key `{mm.group(1)}`"
    elif em := re.fullmatch(r"Expected `(.*)`, got `(.*)`", msg):
        value = _value_at(data, tokens)
        got = _TOML_KINDS.get(em.group(2), em.group(2))
        shown = f" {value!r}" if isinstance(value, str | int | float) else ""
        reason = f"expected {_describe_expected(em.group(1))}, got {got}{shown}"
    elif vm := re.fullmatch(r"Invalid enum value (.*)", msg):
        allowed = typing.get_args(_unwrap(_type_at(tokens)))
        reason = f"{vm.group(1)} is not one of: {', '.join(map(str, allowed))}"
    else:
        reason = msg[:1].lower() + msg[1:]
    return ConfigError(reason, path=path, source=_source_of(path, origins, default_source))


def _unknown_key_reason(key: str, table: Any, *, top: bool) -> str:
    reason = f"unknown {'top-level ' if top else ''}key `{key}`"
    table = _unwrap(table)
    if isinstance(table, type) and issubclass(table, msgspec.Struct):
        known = [f.name for f in msgspec.structs.fields(table)]
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            reason += f" (did you mean `{close[0]}`?)"
        else:
            reason += f" (known keys: {', '.join(known)})"
    return reason


def _source_of(path: str, origins: Mapping[str, str], default: str | None) -> str | None:
    """The origin recorded for ``path`` or the nearest enclosing key, else ``default``."""
    best, best_len = default, -1
    for key, source in origins.items():
        if (path == key or path.startswith((key + ".", key + "["))) and len(key) > best_len:
            best, best_len = source, len(key)
    return best


# --------------------------------------------------------------------------------------------------
# Loading: file -> dict -> env -> (flags) -> structs.


def _read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    source = f"in file `{os.fspath(path)}`"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read the config file: {e.strerror or e}", source=source
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", source=source) from None
    return _parse_toml(text, source), source


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", msg)
        if m:
            msg = f"TOML syntax error at {m.group(2)}: {m.group(1)[:1].lower()}{m.group(1)[1:]}"
        else:
            msg = f"TOML syntax error: {msg}"
        raise ConfigError(msg, source=source) from None


class _Layers:
    """Raw config data plus where each overridden key came from."""

    def __init__(self, data: dict[str, Any], source: str | None) -> None:
        self.data = data
        self.source = source
        self.origins: dict[str, str] = {}

    def section(self, name: str) -> dict[str, Any]:
        table = self.data.setdefault(name, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table, got {_TOML_KINDS.get(type(table).__name__, 'a value')}",
                path=name,
                source=self.source,
            )
        return table

    def set(self, section: str, key: str, value: Any, origin: str) -> None:
        self.section(section)[key] = value
        self.origins[f"{section}.{key}"] = origin

    def append(self, key: str, item: dict[str, Any], origin: str) -> int:
        items = self.data.setdefault(key, [])
        if not isinstance(items, list):
            raise ConfigError("expected an array of tables", path=key, source=self.source)
        items.append(item)
        self.origins[f"{key}[{len(items) - 1}]"] = origin
        return len(items) - 1

    def build(self) -> GatewayConfig:
        return _convert(self.data, self.origins, self.source)


def _convert(
    data: Any, origins: Mapping[str, str] | None = None, source: str | None = None
) -> GatewayConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table at the top level, got {type(data).__name__}")
    try:
        return msgspec.convert(data, GatewayConfig, str_keys=True)
    except msgspec.ValidationError as e:
        raise _from_validation_error(e, data, origins or {}, source) from None
    except ConfigError as e:  # raised outside msgspec's wrapping (should not happen)
        raise e.within(source=source) from None


def config_from_mapping(data: Mapping[str, Any], *, source: str | None = None) -> GatewayConfig:
    """Build a config from already-parsed data (a dict shaped like the TOML file).

    ``source`` (a phrase such as ``in file `x.toml```) is added to error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table at the top level, got {type(data).__name__}")
    return _convert(dict(data), source=source)


def loads_config(text: str, *, source: str | None = None) -> GatewayConfig:
    """Build a config from TOML text, without looking at the environment."""
    return _convert(_parse_toml(text, source or "in TOML text"), source=source)


#: client API keys from the environment: `KEY [MODEL,...]` entries separated by ';' or newlines
API_KEYS_ENV = "LMGW_API_KEYS"


def _env_api_keys(layers: _Layers, text: str) -> None:
    from .auth import parse_key_lines

    origin = f"from environment variable `{API_KEYS_ENV}`"
    try:
        entries = parse_key_lines(text, separators="\n;")
    except ValueError as e:
        raise ConfigError(str(e), source=origin) from None
    auth = layers.section("auth")
    keys = auth.setdefault("keys", [])
    if not isinstance(keys, list):
        raise ConfigError("expected an array of tables", path="auth.keys", source=layers.source)
    start = len(keys)
    keys.extend(entries)
    for i in range(start, len(keys)):
        layers.origins[f"auth.keys[{i}]"] = origin


def _env_overrides(layers: _Layers, env: Mapping[str, str]) -> None:
    if env.get(API_KEYS_ENV, "").strip():
        _env_api_keys(layers, env[API_KEYS_ENV])
    for name in sorted(env):
        if not name.startswith("LMGW_"):
            continue
        section, _, key = name[5:].partition("_")
        section = section.lower()
        if section not in _SECTIONS:
            continue  # LMGW_CONFIG and variables of other tools
        origin = f"from environment variable `{name}`"
        key = key.lower()
        fields = {f.name: f.type for f in msgspec.structs.fields(_SECTIONS[section])}
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean `LMGW_{section.upper()}_{close[0].upper()}`?)" if close else ""
            raise ConfigError(f"`{section}` has no key `{key}`{hint}", source=origin)
        path = f"{section}.{key}"
        try:
            value = _parse_env_value(env[name], fields[key])
        except ConfigError as e:
            raise ConfigError(e.reason, path=path, source=origin) from None
        layers.set(section, key, value, origin)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_env_value(text: str, tp: Any) -> Any:
    """Parse an environment string to a field's type (msgspec checks ranges and literals)."""
    optional = _unwrap(tp) is not tp
    tp = _unwrap(tp)
    raw = text.strip()
    if optional and raw == "":
        return None
    if tp is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"expected a boolean (true/false/1/0/yes/no/on/off), got {text!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if typing.get_origin(tp) is list:  # comma-separated, e.g. LMGW_CACHE_TIERS=memory,redis
        return [part.strip() for part in raw.split(",") if part.strip()]
    if typing.get_origin(tp) is dict:
        # ROLE=NAME pairs separated by commas, e.g. "p=cache_aware,d=least_load".
        out: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            k, sep, v = item.partition("=")
            if not sep or not k.strip() or not v.strip():
                raise ConfigError(f"expected KEY=VALUE pairs separated by commas, got {text!r}")
            out[k.strip()] = v.strip()
        return out
    return text  # str and Literal fields: msgspec validates the literal


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Load the configuration: the TOML file (or defaults), then ``LMGW_<SECTION>_<KEY>`` variables.

    Args:
        path: the TOML file; when None, ``LMGW_CONFIG`` names it, and when that is unset too the
            defaults are used.
        env: the environment to read (default ``os.environ``); tests pass a dict.

    Raises:
        ConfigError: unreadable file, TOML syntax, unknown keys, bad values, unknown ``LMGW_``
            variables of a config section or values that do not parse; the message names the key
            and where it came from.
    """
    return _load_layers(path, env).build()


def _load_layers(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None) -> _Layers:
    env = os.environ if env is None else env
    if path is None and env.get("LMGW_CONFIG", "").strip():
        path = env["LMGW_CONFIG"].strip()
    if path is None:
        layers = _Layers({}, None)
    else:
        data, source = _read_toml(path)
        layers = _Layers(data, source)
    _env_overrides(layers, env)
    return layers


# --------------------------------------------------------------------------------------------------
# Command-line flags.


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lmgw serve`` configuration flags. Every default is None, meaning "not given"."""
    g = parser.add_argument_group("configuration (flags override LMGW_* variables and the file)")
    g.add_argument("--config", metavar="PATH", default=None, help="TOML config file ($LMGW_CONFIG)")
    g.add_argument("--host", default=None, metavar="HOST", help="listen address (server.host)")
    g.add_argument("--port", type=int, default=None, help="listen port, 0 = any (server.port)")
    g.add_argument(
        "--worker",
        action="append",
        default=None,
        metavar="ROLE=URL",
        help="add a worker, e.g. pd=http://127.0.0.1:9001, prefill=http://h:8000,kv_address="
        "h:21001 or pd=http://h:8000,dp=8 (repeatable; options: id, bootstrap_port, "
        "kv_address, zone, kv_events, dp / data_parallel_size (N or auto), data_parallel_rank)",
    )
    g.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="serve this model (repeatable); its flow is inferred from the workers' roles",
    )
    g.add_argument(
        "--policy",
        default=None,
        metavar="NAME",
        help="routing policy for every role (routing.policy)",
    )
    g.add_argument(
        "--shadow-policies",
        default=None,
        metavar="LIST",
        type=comma_list,
        help="policies asked beside the active one on live traffic and never obeyed, e.g."
        " cache_aware,prefix_hash (routing.shadow_policies; see /metrics lmgw_shadow_*)",
    )
    g.add_argument(
        "--server", choices=SERVER_KINDS, default=None, help="HTTP server (server.server)"
    )
    g.add_argument("--flow", choices=FLOWS, default=None, help="flow of the --model models")
    g.add_argument("--dialect", default=None, metavar="NAME", help="dialect of the --model models")
    g.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="per-request deadline, 0 = none (limits.request_timeout_s)",
    )
    g.add_argument(
        "--sse-keepalive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="SSE keep-alive comments while a stream waits for its first event, e.g. 15"
        " (limits.sse_keepalive_s; 0 = off)",
    )
    g.add_argument(
        "--certfile",
        default=None,
        metavar="PATH",
        help="TLS certificate, hypercorn (server.certfile)",
    )
    g.add_argument(
        "--keyfile",
        default=None,
        metavar="PATH",
        help="TLS private key, hypercorn (server.keyfile)",
    )
    g.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,
        help="log level (logging.level)",
    )
    g.add_argument(
        "--log-json",
        action="store_const",
        const=True,
        default=None,
        help="log JSON lines (logging.json)",
    )
    g.add_argument(
        "--access-log",
        action="store_const",
        const=True,
        default=None,
        help="log requests, sampled (logging.access_log)",
    )
    g.add_argument(
        "--tracing",
        action="store_const",
        const=True,
        default=None,
        help="OpenTelemetry spans per request and stage (tracing.enabled)",
    )
    g.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_const",
        const=False,
        default=None,
        help="turn GET /dashboard off (dashboard.enabled)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="bearer key sent to workers (upstream.api_key)",
    )
    g.add_argument(
        "--p2p-discovery",
        default=None,
        metavar="ZMQ_ADDR",
        help="listen for vLLM P2P NCCL worker pings, e.g. tcp://0.0.0.0:30001"
        " (discovery.p2p_nccl_bind)",
    )
    g.add_argument(
        "--discovery-file",
        default=None,
        metavar="PATH",
        help="watch a TOML/JSON file of [[workers]] (discovery.file)",
    )
    g.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="discover workers registered in Redis, redis://[:password@]host:port/db"
        " (discovery.redis_url)",
    )
    for role, flag in (
        ("pd", "--k8s-selector"),
        ("prefill", "--k8s-prefill-selector"),
        ("decode", "--k8s-decode-selector"),
        ("encode", "--k8s-encode-selector"),
    ):
        key = "k8s_selector" if role == "pd" else f"k8s_{role}_selector"
        g.add_argument(
            flag,
            default=None,
            dest=key,
            metavar="SELECTOR",
            help=f"Kubernetes label selector of {role} worker pods, e.g. app=vllm"
            f" (discovery.{key})",
        )
    g.add_argument(
        "--k8s-namespace",
        default=None,
        metavar="NAME",
        help="namespace of the worker pods (discovery.k8s_namespace)",
    )
    g.add_argument(
        "--api-keys-file",
        default=None,
        metavar="PATH",
        help="client API keys, one `KEY [MODEL,...]` per line or [[keys]] in a .toml file"
        " (auth.keys_file); also $LMGW_API_KEYS",
    )
    g.add_argument(
        "--open",
        action="store_const",
        const=True,
        default=None,
        help="serve the API without API keys, to anyone who can reach it (auth.open)",
    )
    g.add_argument(
        "--resumable-streams",
        action="store_const",
        const=True,
        default=None,
        help="keep generating for clients whose connection drops, resumable at"
        " GET /v1/streams/{id} (streams.resumable; requests opt in with X-Lmgw-Resumable: 1)",
    )
    g.add_argument(
        "--lora-affinity",
        action="store_const",
        const=True,
        default=None,
        help="route a LoRA adapter's requests where it is active or a slot is free"
        " (routing.lora_affinity)",
    )
    g.add_argument(
        "--coalesce",
        action="store_const",
        const=True,
        default=None,
        help="identical deterministic requests in flight share one generation (streams.coalesce)",
    )
    g.add_argument(
        "--hedge",
        action="store_const",
        const=True,
        default=None,
        help="send a stream whose first token is late to a second worker too; the first to"
        " answer wins (hedging.enabled; the delay adapts unless hedging.delay_s is set)",
    )
    g.add_argument(
        "--cors-allow-origins",
        default=None,
        metavar="LIST",
        type=comma_list,
        help='browser origins allowed to call the API, e.g. https://ui.example.com or "*" '
        "(server.cors_allow_origins)",
    )
    g.add_argument(
        "--cache-tiers",
        default=None,
        metavar="LIST",
        type=comma_list,
        help="cache pool tiers, fastest first, e.g. memory,shm,redis (cache.tiers)",
    )
    g.add_argument(
        "--cache-redis-url",
        default=None,
        metavar="URL",
        help="Redis of the cache pool's redis tier (cache.redis_url)",
    )
    g.add_argument(
        "--admin-token",
        default=None,
        metavar="TOKEN",
        help="bearer token of the admin API (admin.token); prefer $LMGW_ADMIN_TOKEN",
    )


# Keys whose values must not appear in messages or in a redacted dump: a redis URL may hold a
# password; `key` is auth.keys[].key (kept hashed, and redacted all the same).
_SECRET_KEYS = frozenset({"api_key", "token", "redis_url", "key"})
# Tables whose values may be secrets (tools.mcp[].headers: tokens; .env: credentials).
_SECRET_TABLES = frozenset({"headers", "env"})

# flag attribute -> (section, key, flag text)
_SCALAR_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("host", "server", "host", "--host"),
    ("port", "server", "port", "--port"),
    ("server", "server", "server", "--server"),
    ("certfile", "server", "certfile", "--certfile"),
    ("keyfile", "server", "keyfile", "--keyfile"),
    ("policy", "routing", "policy", "--policy"),
    ("shadow_policies", "routing", "shadow_policies", "--shadow-policies"),
    ("request_timeout", "limits", "request_timeout_s", "--request-timeout"),
    ("sse_keepalive", "limits", "sse_keepalive_s", "--sse-keepalive"),
    ("log_level", "logging", "level", "--log-level"),
    ("log_json", "logging", "json", "--log-json"),
    ("access_log", "logging", "access_log", "--access-log"),
    ("tracing", "tracing", "enabled", "--tracing"),
    ("dashboard", "dashboard", "enabled", "--no-dashboard"),
    ("api_key", "upstream", "api_key", "--api-key"),
    ("p2p_discovery", "discovery", "p2p_nccl_bind", "--p2p-discovery"),
    ("discovery_file", "discovery", "file", "--discovery-file"),
    ("redis_url", "discovery", "redis_url", "--redis-url"),
    ("k8s_selector", "discovery", "k8s_selector", "--k8s-selector"),
    ("k8s_prefill_selector", "discovery", "k8s_prefill_selector", "--k8s-prefill-selector"),
    ("k8s_decode_selector", "discovery", "k8s_decode_selector", "--k8s-decode-selector"),
    ("k8s_encode_selector", "discovery", "k8s_encode_selector", "--k8s-encode-selector"),
    ("k8s_namespace", "discovery", "k8s_namespace", "--k8s-namespace"),
    ("admin_token", "admin", "token", "--admin-token"),
    ("api_keys_file", "auth", "keys_file", "--api-keys-file"),
    ("open", "auth", "open", "--open"),
    ("resumable_streams", "streams", "resumable", "--resumable-streams"),
    ("hedge", "hedging", "enabled", "--hedge"),
    ("coalesce", "streams", "coalesce", "--coalesce"),
    ("lora_affinity", "routing", "lora_affinity", "--lora-affinity"),
    ("cache_tiers", "cache", "tiers", "--cache-tiers"),
    ("cors_allow_origins", "server", "cors_allow_origins", "--cors-allow-origins"),
    ("cache_redis_url", "cache", "redis_url", "--cache-redis-url"),
)


_WORKER_FLAG_KEYS = {
    "id": str,
    "bootstrap_port": int,
    "kv_address": str,
    "zone": str,
    "kv_events": str,
    "dp": int,
    "data_parallel_size": int,
    "data_parallel_rank": int,
}
#: flag keys that are short for a field
_WORKER_FLAG_FIELDS = {"dp": "data_parallel_size"}


def parse_worker_flag(text: str) -> WorkerConfig:
    """Parse a ``--worker ROLE=URL[,KEY=VALUE...]`` value, e.g. ``pd=http://127.0.0.1:9001`` or
    ``p=http://10.0.0.1:8100,kv_address=10.0.0.1:21001,zone=node-a`` (keys: id, bootstrap_port,
    kv_address, zone, kv_events, dp / data_parallel_size (N or auto), data_parallel_rank).

    Raises:
        ConfigError: naming the flag text, when it is not ROLE=URL with a known role and a
            valid http(s) URL, or an option is unknown or malformed.
    """
    source = f"from flag `--worker {text}`"
    role, sep, rest = text.partition("=")
    url, *options = rest.split(",")
    if not sep or not role.strip() or not url.strip():
        raise ConfigError(
            "expected ROLE=URL[,KEY=VALUE...], e.g. pd=http://127.0.0.1:9001 (roles: pd/merged,"
            " e/encode, p/prefill, d/decode; keys: " + ", ".join(_WORKER_FLAG_KEYS) + ")",
            source=source,
        )
    extra: dict[str, Any] = {}
    for opt in options:
        key, eq, value = (x.strip() for x in opt.partition("="))
        kind = _WORKER_FLAG_KEYS.get(key)
        if kind is None or not eq or not value:
            raise ConfigError(
                f"bad option {opt!r}: expected KEY=VALUE with KEY one of "
                + ", ".join(_WORKER_FLAG_KEYS),
                source=source,
            )
        field = _WORKER_FLAG_FIELDS.get(key, key)
        if field == "data_parallel_size" and value == "auto":
            extra[field] = value
            continue
        if kind is int and not value.isdigit():
            raise ConfigError(f"{key} must be an integer, got {value!r}", source=source)
        extra[field] = kind(value)
    try:
        return WorkerConfig(url=url.strip(), role=role.strip(), **extra)
    except ConfigError as e:
        raise ConfigError(e.reason, path=e.path, source=source) from None


def _flow_for(name: str, workers: Iterable[WorkerConfig]) -> str:
    roles = {w.role for w in workers if not w.models or name in w.models}
    if not roles:
        return "pd"  # no static workers serve it (discovery may add them): the plain default
    try:
        return infer_flow(roles)
    except ConfigError as e:
        raise ConfigError(
            f"cannot infer the flow of model {name!r} from its workers' roles"
            f" ({', '.join(sorted(roles))}): {e.reason}; give --flow",
            source=f"from flag `--model {name}`",
        ) from None


def config_from_args(
    ns: argparse.Namespace, *, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """The effective config of ``lmgw serve``: file, then environment, then the flags.

    Scalar flags replace their key. Each ``--worker`` appends a worker that serves every model.
    Each ``--model`` name not yet configured is appended with ``--flow``/``--dialect`` (or, without
    ``--flow``, the flow inferred from the roles of the workers that serve it); for a name that is
    already configured, ``--flow``/``--dialect`` override its values.

    Raises:
        ConfigError: for any bad input, naming the flag, variable or file key.
    """
    layers = _load_layers(getattr(ns, "config", None), env)
    for attr, section, key, flag in _SCALAR_FLAGS:
        value = getattr(ns, attr, None)
        if value is not None:
            shown = "..." if key in _SECRET_KEYS else value  # never echo a secret
            layers.set(section, key, value, f"from flag `{flag} {shown}`")
    for text in getattr(ns, "worker", None) or ():
        worker = parse_worker_flag(text)
        item = {"url": worker.url, "role": worker.role}
        fields = {_WORKER_FLAG_FIELDS.get(key, key) for key in _WORKER_FLAG_KEYS}
        item.update(
            (field, value)
            for field in sorted(fields)
            if (value := getattr(worker, field)) is not None
            and not (field == "data_parallel_size" and value == 1)
        )
        layers.append("workers", item, f"from flag `--worker {text}`")
    cfg = layers.build()

    names: list[str] = getattr(ns, "model", None) or []
    flow: str | None = getattr(ns, "flow", None)
    dialect: str | None = getattr(ns, "dialect", None)
    if not names:  # then --flow/--dialect set the defaults for every model the workers serve
        changes = {k: v for k, v in (("flow", flow), ("dialect", dialect)) if v is not None}
        if not changes:
            return cfg
        try:
            routing = msgspec.structs.replace(cfg.routing, **changes)
        except ConfigError as e:
            raise e.within("routing", "from flags") from None
        return msgspec.structs.replace(cfg, routing=routing)
    models = list(cfg.models)
    for name in dict.fromkeys(names):
        source = f"from flag `--model {name}`"
        try:
            existing = cfg.model(name)
            if existing is not None:
                changes = {k: v for k, v in (("flow", flow), ("dialect", dialect)) if v is not None}
                if changes:
                    models[models.index(existing)] = msgspec.structs.replace(existing, **changes)
                continue
            model = ModelConfig(
                name=name,
                flow=flow if flow is not None else _flow_for(name, cfg.workers),
                dialect=dialect if dialect is not None else "openai",
            )
        except ConfigError as e:
            raise e.within(f"models[{len(models)}]", source) from None
        models.append(model)
    try:
        return msgspec.structs.replace(cfg, models=models)
    except ConfigError as e:
        raise e.within(source="from flag `--model`") from None


# --------------------------------------------------------------------------------------------------
# Writing TOML back (tomllib only reads).

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # "30.0", "1e-05", "inf", "-inf" are all TOML floats
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(lines: list[str], header: str | None, struct: msgspec.Struct, redact: bool) -> None:
    scalars: list[tuple[str, Any]] = []
    tables: list[tuple[str, msgspec.Struct]] = []
    arrays: list[tuple[str, list[msgspec.Struct]]] = []
    for f in msgspec.structs.fields(struct):
        value = getattr(struct, f.name)
        if value is None:
            continue  # TOML has no null; a missing key loads as the default None
        if redact and f.name in _SECRET_KEYS:
            value = "<redacted>"
        elif redact and f.name in _SECRET_TABLES and isinstance(value, dict):
            value = dict.fromkeys(value, "<redacted>")
        if isinstance(value, msgspec.Struct):
            tables.append((f.name, value))
        elif isinstance(value, list) and value and isinstance(value[0], msgspec.Struct):
            arrays.append((f.name, value))
        elif isinstance(value, list) and _struct_list(type(struct), f.name):
            continue  # an empty array of tables: leave it out
        else:
            scalars.append((f.name, value))
    if header is not None:
        lines.append(header)
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
    # a table inside an array item is [models.tool_loop]: TOML puts it in the last [[models]]
    prefix = header.strip("[]") + "." if header else ""
    for name, sub in tables:
        if lines:
            lines.append("")
        _toml_table(lines, f"[{prefix}{_toml_key(name)}]", sub, redact)
    for name, items in arrays:
        for item in items:
            lines.append("")
            _toml_table(lines, f"[[{prefix}{_toml_key(name)}]]", item, redact)


def _struct_list(cls: type[msgspec.Struct], name: str) -> bool:
    tp = {f.name: f.type for f in msgspec.structs.fields(cls)}[name]
    args = typing.get_args(tp)
    return bool(args) and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct)


def dump_config(cfg: GatewayConfig, *, redact: bool = False) -> str:
    """The effective config as TOML text (``lmgw serve --print-config``); loads back equal.

    Args:
        redact: replace secrets (``upstream.api_key``, ``admin.token``, the values of
            ``tools.mcp[].headers`` and ``.env``) with ``"<redacted>"``,
            for output that may end up in a terminal log or a bug report.
    """
    lines: list[str] = []
    _toml_table(lines, None, cfg, redact)
    return "\n".join(lines).lstrip("\n") + "\n"
