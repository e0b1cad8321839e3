"""``lmgw.Client``: an async client for a running gateway (or any OpenAI-compatible server).

Written on anyio, so the same object works under trio and asyncio (anyio on trio runs at
native cost, DESIGN.md §3). HTTP/1.1 with keep-alive: a LIFO stack of idle connections (the
warmest first), the sans-IO :class:`~lmgw.transport.h1client.ResponseReader` (httptools)
parsing answers, no httpx (~1,140 µs of CPU per request under trio, against tens here).

Resource handling: a request owns its connection until its answer is complete; a complete
keep-alive answer puts it back on the stack, anything else (an error, a cancellation, a stream
left early) closes it, which is also how an abandoned stream is aborted on the server. Before
reuse an idle connection is polled (zero timeout): one the server closed is dropped, so a
request is never sent twice. Leaving ``async with`` closes the idle connections.

Error handling: error answers raise :class:`~lmgw.sdk.errors.APIError` subclasses (the same
ones the in-process gateway raises), network failures :class:`APIConnectionError`, the
client's own ``timeout`` :class:`APITimeoutError`.

Batches (OpenAI's Files and Batch APIs): the calls, and :func:`_run_batch` (upload, create,
poll, collect), which the in-process gateway shares with the multipart encoder
:func:`_multipart_form`.
"""

from __future__ import annotations

import secrets
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
import msgspec

from ..model_routes import route_body
from ..transport.h1client import ResponseReader, UpstreamProtocolError, build_request_head
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    _ErrorFields,
    error_from_payload,
    error_from_response,
)
from .types import (
    ChatResult,
    CompletionResult,
    EmbeddingResult,
    ModelInfo,
    SSEDecoder,
    StreamEvent,
    TokenizeResult,
    decode_result,
    encode_request,
    response_path,
)

__all__ = ["Client", "ClientStats"]

_encode = msgspec.json.encode
_now = time.monotonic
#: an idle connection that is readable (EOF or stray bytes) or hung up is not reused
_POLL_CLOSED = select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR
_READ = 65536


@dataclass(slots=True)
class ClientStats:
    """Connection counters (a snapshot from :meth:`Client.statistics`)."""

    connects: int = 0
    reuses: int = 0
    closed: int = 0
    idle: int = 0


class _Conn:
    __slots__ = ("idle_since", "poller", "reader", "requests", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = ResponseReader()
        self.idle_since = 0.0
        self.requests = 0
        self.poller: select.poll | None = None
        try:
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        except anyio.TypedAttributeLookupError:
            return
        self.poller = select.poll()
        self.poller.register(sock, _POLL_CLOSED)

    def peer_closed(self) -> bool:
        """Whether the server closed this idle connection (~0.3 µs: a zero-timeout poll)."""
        return self.poller is not None and bool(self.poller.poll(0))


def _split_base_url(base_url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got {base_url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):  # an OpenAI-style base URL: our paths carry /v1 themselves
        prefix = prefix[:-3]
    return scheme, parts.hostname, port, prefix


class Client:
    """Async client of the gateway's HTTP API.

    Args:
        base_url: ``http://host:port`` (a trailing ``/v1`` is accepted and ignored).
        api_key: sent as ``Authorization: Bearer`` on the OpenAI endpoints.
        admin_token: sent as ``Authorization: Bearer`` on ``/admin/*`` (``admin.token``).
        timeout: seconds for a whole non-streamed request; for a stream, until its head and
            then the longest silence between two reads. None waits forever.
        connect_timeout: seconds per connection attempt.
        max_idle: idle keep-alive connections kept (more are closed on release).
        idle_timeout_s: an idle connection older than this is closed instead of reused; below
            the gateway's ``limits.keepalive_timeout_s`` (75 s), so the client closes first.
        headers: extra headers sent with every request.
        ssl_context: for ``https://`` base URLs (default: the system's trust store).

    Use as ``async with Client(url) as c:``; the methods may be called concurrently (each
    request takes its own connection).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float | None = 600.0,
        connect_timeout: float = 10.0,
        max_idle: int = 32,
        idle_timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: Any = None,
    ) -> None:
        self.base_url = base_url
        scheme, self._host, self._port, self._prefix = _split_base_url(base_url)
        self._tls = scheme == "https"
        self._ssl_context = ssl_context
        self._host_header = (
            f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        ).encode()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        common = [(b"user-agent", b"lmgw-sdk")]
        common += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        json_ct = (b"content-type", b"application/json")
        self._headers = [json_ct, *common]
        if api_key:
            self._headers.append((b"authorization", b"Bearer " + api_key.encode()))
        self._admin_headers = [json_ct, *common]
        if admin_token:
            self._admin_headers.append((b"authorization", b"Bearer " + admin_token.encode()))
        self._idle: list[_Conn] = []
        self._closed = False
        self._stats = ClientStats()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections; requests in flight keep theirs until they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn)

    def statistics(self) -> ClientStats:
        """Connections opened, reused and closed so far, and idle now."""
        return replace(self._stats, idle=len(self._idle))

    def __repr__(self) -> str:
        s = self._stats
        return (
            f"<Client {self.base_url} idle={len(self._idle)} connects={s.connects}"
            f" reuses={s.reuses}>"
        )

    # -- the OpenAI API ---------------------------------------------------------------------
    async def chat(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> ChatResult:
        """``POST /v1/chat/completions``; ``params`` are the body's other fields as-is."""
        body = encode_request(model, params, messages=messages)
        return await self._call("POST", "/v1/chat/completions", body, "chat", request_id, headers)

    def chat_stream(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        resumable: bool = False,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        """``POST /v1/chat/completions`` with ``stream: true``: ``async for event in ...``.

        ``resumable``: ask the gateway to keep the answer (``streams.resumable``); a connection
        that breaks mid-stream is then replaced and the stream goes on from the last event
        received, without a gap or a repeat. Leaving the loop early closes the connection (at
        once under ``contextlib.aclosing``, else when the generator is collected)."""
        body = encode_request(model, params, messages=messages, stream=True)
        return self._stream("/v1/chat/completions", body, request_id, headers, resumable)

    async def complete(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> CompletionResult:
        """``POST /v1/completions``."""
        body = encode_request(model, params, prompt=prompt)
        return await self._call("POST", "/v1/completions", body, "completions", request_id, headers)

    def complete_stream(
        self,
        *,
        prompt: Any,
        model: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        resumable: bool = False,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        """``POST /v1/completions`` with ``stream: true`` (``resumable``: as chat_stream)."""
        body = encode_request(model, params, prompt=prompt, stream=True)
        return self._stream("/v1/completions", body, request_id, headers, resumable)

    async def models(self) -> list[ModelInfo]:
        """``GET /v1/models``."""
        return await self._call("GET", "/v1/models", None, "models")

    async def tokenize(self, *, model: str | None = None, **params: Any) -> TokenizeResult:
        """``POST /tokenize`` (vLLM's shape): ``prompt=`` or ``messages=``, plus its options."""
        return await self._call("POST", "/tokenize", encode_request(model, params), "tokenize")

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        """``POST /detokenize``: the text of ``tokens``."""
        answer = await self._call(
            "POST", "/detokenize", encode_request(model, {"tokens": list(tokens)}), "json"
        )
        return answer["prompt"]

    async def embeddings(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> EmbeddingResult:
        """``POST /v1/embeddings``: ``input`` a string, strings, or token ids."""
        body = encode_request(model, params, input=input)
        return await self._call("POST", "/v1/embeddings", body, "embeddings")

    async def create_response(
        self, *, input: Any, model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """``POST /v1/responses`` (``previous_response_id=`` continues a stored response on the
        worker that holds it)."""
        body = encode_request(model, params, input=input)
        return await self._call("POST", "/v1/responses", body, "json")

    async def retrieve_response(self, response_id: str) -> dict[str, Any]:
        """``GET /v1/responses/{id}``."""
        return await self._call("GET", response_path(response_id), None, "json")

    async def cancel_response(self, response_id: str) -> dict[str, Any]:
        """``POST /v1/responses/{id}/cancel`` (a background response)."""
        return await self._call("POST", response_path(response_id) + "/cancel", b"", "json")

    # -- files and batches ------------------------------------------------------------------
    async def upload_batch_file(self, data: bytes, filename: str = "batch.jsonl") -> dict[str, Any]:
        """``POST /v1/files`` (a multipart form, ``purpose`` batch): the file object."""
        body, content_type = _multipart_form({"purpose": "batch"}, {"file": (filename, data)})
        return await self._call("POST", FILES, body, "json", content_type=content_type)

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/chat/completions",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/batches``: run an uploaded file's requests (window 24h); the batch."""
        body = _batch_body(input_file_id, endpoint, metadata)
        return await self._call("POST", BATCHES, body, "json")

    async def batch(self, batch_id: str) -> dict[str, Any]:
        """``GET /v1/batches/{id}``: status, ``request_counts``, output and error files."""
        return await self._call("GET", _batch_path(batch_id), None, "json")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """``POST /v1/batches/{id}/cancel``: requests in flight are aborted, answers kept."""
        return await self._call("POST", _batch_path(batch_id) + "/cancel", b"", "json")

    async def file_content(self, file_id: str) -> bytes:
        """``GET /v1/files/{id}/content``: the file's bytes (an output file: JSONL)."""
        return await self._call("GET", _file_path(file_id) + "/content", None, "bytes")

    async def run_batch(
        self,
        requests: Sequence[Mapping[str, Any]],
        endpoint: str = "/v1/chat/completions",
        *,
        poll_s: float = 0.2,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Run request bodies as one batch and wait: one output record per request, in order
        (see :func:`_run_batch`)."""
        return await _run_batch(self, requests, endpoint, poll_s, timeout_s, anyio.sleep)

    async def _delete_file(self, file_id: str) -> dict[str, Any]:
        return await self._call("DELETE", _file_path(file_id), None, "json")

    # -- the admin API (needs admin_token) --------------------------------------------------
    async def workers(self) -> list[dict[str, Any]]:
        """``GET /admin/workers``: every worker's description."""
        answer = await self._call("GET", "/admin/workers", None, "json", admin=True)
        return answer["data"]

    async def planner(self) -> dict[str, Any]:
        """``GET /admin/planner``: the recommended worker count of each role, and why."""
        return await self._call("GET", "/admin/planner", None, "json", admin=True)

    async def worker(self, worker_id: str) -> dict[str, Any]:
        """``GET /admin/workers/{id}``."""
        return await self._call("GET", _worker_path(worker_id), None, "json", admin=True)

    async def add_worker(
        self, url: str, role: str = "pd", *, id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """``POST /admin/workers`` with a ``[[workers]]`` table (``models``, ``kv_address``...)."""
        table = {"url": url, "role": role, **fields}
        if id is not None:
            table["id"] = id
        return await self._call("POST", "/admin/workers", _encode(table), "json", admin=True)

    async def drain_worker(self, worker_id: str) -> dict[str, Any]:
        """No new requests for the worker; those in flight finish."""
        path = _worker_path(worker_id) + "/drain"
        return await self._call("POST", path, b"", "json", admin=True)

    async def undrain_worker(self, worker_id: str) -> dict[str, Any]:
        """Back into rotation (probed once first)."""
        path = _worker_path(worker_id) + "/undrain"
        return await self._call("POST", path, b"", "json", admin=True)

    async def remove_worker(self, worker_id: str, grace_s: float | None = None) -> dict[str, Any]:
        """Remove at once, or drain first and wait up to ``grace_s`` for it to be idle."""
        path = _worker_path(worker_id)
        if grace_s is not None:
            path += f"?grace_s={grace_s:g}"
        return await self._call("DELETE", path, None, "json", admin=True)

    async def lora_adapters(self) -> list[dict[str, Any]]:
        """``GET /admin/lora_adapters``: the adapters loaded through the gateway, and where."""
        answer = await self._call("GET", "/admin/lora_adapters", None, "json", admin=True)
        return answer["data"]

    async def load_lora_adapter(
        self, name: str, path: str, *, model: str | None = None, inplace: bool = False
    ) -> dict[str, Any]:
        """Load a LoRA adapter on every worker (of base ``model`` when given) and keep it
        loaded; the outcome per worker (``loaded``, ``failed``)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if model is not None:
            body["model"] = model
        if inplace:
            body["load_inplace"] = True
        return await self._call("POST", "/admin/lora_adapters", _encode(body), "json", admin=True)

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        """Unload it everywhere and forget it."""
        path = "/admin/lora_adapters/" + quote(name, safe="")
        return await self._call("DELETE", path, None, "json", admin=True)

    async def model_routes(self) -> list[dict[str, Any]]:
        """``GET /admin/model_routes``: every route, its targets' weights and shares, fallbacks,
        split and the requests each target was given."""
        answer = await self._call("GET", "/admin/model_routes", None, "json", admin=True)
        return answer["data"]

    async def set_model_route(
        self,
        name: str,
        targets: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        fallbacks: Sequence[str] = (),
        split: str = "request",
        mirror: str | None = None,
        mirror_share: float = 1.0,
    ) -> dict[str, Any]:
        """Add or replace the route ``name`` (``{model: weight}``): the next request is split
        the new way, so a canary's share moves without a restart; ``mirror`` also gets a copy
        of ``mirror_share`` of the requests (answers dropped). The route as set."""
        body = route_body(targets, fallbacks, split, mirror, mirror_share)
        return await self._call("PUT", _route_path(name), _encode(body), "json", admin=True)

    async def delete_model_route(self, name: str) -> dict[str, Any]:
        """The name stops being a route (a served model of that name is reached again)."""
        return await self._call("DELETE", _route_path(name), None, "json", admin=True)

    # -- HTTP -------------------------------------------------------------------------------
    def _request_headers(
        self,
        admin: bool,
        request_id: str | None,
        extra: Mapping[str, str] | None,
        content_type: bytes | None = None,
    ) -> list[tuple[bytes, bytes]]:
        headers = self._admin_headers if admin else self._headers
        if content_type is not None:  # in place of JSON's (a server reads the first one)
            ct = (b"content-type", content_type)
            headers = [ct if k == b"content-type" else (k, v) for k, v in headers]
        if request_id is None and not extra:
            return headers
        headers = list(headers)
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode()))
        for k, v in (extra or {}).items():
            headers.append((k.lower().encode(), v.encode()))
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        kind: str,
        request_id: str | None = None,
        extra: Mapping[str, str] | None = None,
        *,
        admin: bool = False,
        content_type: bytes | None = None,
    ) -> Any:
        headers = self._request_headers(admin, request_id, extra, content_type)
        try:
            with anyio.fail_after(self.timeout):
                conn = await self._exchange(method, self._prefix + path, body, headers)
                reader = conn.reader
                try:
                    while not reader.complete:
                        await self._receive(conn)
                except BaseException:
                    await self._discard(conn)
                    raise
        except TimeoutError:
            raise APITimeoutError(f"{method} {path}: no answer within {self.timeout:g} s") from None
        status, rheaders, data = reader.status, reader.headers, reader.take_body()
        if reader.keep_alive:
            await self._release(conn)
        else:
            await self._discard(conn)
        return _decode(kind, status, data, rheaders)

    async def _stream(
        self,
        path: str,
        body: bytes,
        request_id: str | None,
        extra: Mapping[str, str] | None,
        resumable: bool = False,
    ) -> AsyncIterator[StreamEvent]:
        headers = self._request_headers(False, request_id, extra)
        if resumable:  # the key makes sending the request again safe: the gateway answers once
            idem = secrets.token_hex(16).encode()
            headers = [*headers, _RESUMABLE, (b"idempotency-key", idem)]
        timeout = self.timeout
        for attempt in range(_RESUMES if resumable else 1):
            try:
                with anyio.fail_after(timeout):
                    conn = await self._exchange("POST", self._prefix + path, body, headers)
                break
            except TimeoutError:
                raise APITimeoutError(f"POST {path}: no answer within {timeout:g} s") from None
            except APIConnectionError:  # before the answer's head: send it again (same key)
                if attempt == _RESUMES - 1 or not resumable:
                    raise
                await anyio.sleep(0.1 * 3**attempt)
        reader = conn.reader
        token = _header(reader.headers, b"x-lmgw-stream-id") if resumable else None
        resumes = 0
        clean = False
        try:
            await self._expect_events(conn)
            decoder = SSEDecoder()
            while True:
                data = reader.take_body()
                if data:
                    for event in decoder.feed(data):
                        yield event
                    if decoder.error is not None:
                        raise decoder.error
                if reader.complete:
                    break
                try:
                    with anyio.fail_after(timeout):
                        await self._receive(conn)
                except TimeoutError:
                    raise APITimeoutError(f"stream silent for {timeout:g} s") from None
                except APIConnectionError:
                    if token is None or decoder.done or resumes >= _RESUMES:
                        raise
                    resumes += 1
                    await self._discard(conn)
                    decoder.drop_partial()
                    conn = await self._resume(token, decoder.last_id)
                    reader = conn.reader
            for event in decoder.feed_eof():
                yield event
            if decoder.error is not None:
                raise decoder.error
            clean = reader.keep_alive
        finally:
            if clean:
                await self._release(conn)
            else:
                await self._discard(conn)

    async def _expect_events(self, conn: _Conn) -> None:
        """Raise the error an answer that is not an event stream carries."""
        reader = conn.reader
        if reader.status >= 400 or not reader.content_type.startswith(b"text/event-stream"):
            with anyio.fail_after(self.timeout):
                while not reader.complete:
                    await self._receive(conn)
            data = reader.take_body()
            decode_result("json", reader.status, data, reader.headers)  # raises on errors
            raise APIError(reader.status, f"expected an event stream, got {data[:200]!r}")

    async def _resume(self, token: str, last_id: bytes | None) -> _Conn:
        """A broken resumable stream's next connection: ``GET /v1/streams/{token}`` after the
        last event received, tried a few times with a growing pause (a gateway restarting its
        listener, a flapping network)."""
        headers = self._request_headers(False, None, None)
        if last_id is not None:
            headers = [*headers, (b"last-event-id", last_id)]
        path = self._prefix + "/v1/streams/" + quote(token, safe="")
        for attempt in range(_RESUMES):
            try:
                with anyio.fail_after(self.timeout):
                    conn = await self._exchange("GET", path, None, headers)
                break
            except (APIConnectionError, TimeoutError):
                if attempt == _RESUMES - 1:
                    raise APIConnectionError(f"could not resume stream {token}") from None
                await anyio.sleep(0.1 * 3**attempt)
        try:
            await self._expect_events(conn)
        except BaseException:
            await self._discard(conn)
            raise
        return conn

    async def _exchange(
        self, method: str, path: str, body: bytes | None, headers: list[tuple[bytes, bytes]]
    ) -> _Conn:
        """Send the request on a pooled (or new) connection and read the answer's head."""
        conn = await self._checkout()
        reader = conn.reader
        reader.reset()
        head = build_request_head(
            method, path, self._host_header, headers, len(body) if body is not None else None
        )
        try:
            try:
                await conn.stream.send(head + body if body else head)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise APIConnectionError(f"{method} {path}: could not send: {exc!r}") from exc
            while not reader.headers_complete:
                await self._receive(conn)
        except BaseException:
            await self._discard(conn)
            raise
        return conn

    async def _receive(self, conn: _Conn) -> None:
        """One read into the connection's reader; EOF completes a close-delimited body."""
        reader = conn.reader
        try:
            data = await conn.stream.receive(_READ)
        except anyio.EndOfStream:
            reader.feed_eof()
            if not reader.complete:
                raise APIConnectionError("the server closed the connection mid-answer") from None
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise APIConnectionError(f"connection broken: {exc!r}") from exc
        try:
            reader.feed(data)
        except UpstreamProtocolError as exc:
            raise APIConnectionError(str(exc).replace("worker", "server")) from None

    # -- the pool ---------------------------------------------------------------------------
    async def _checkout(self) -> _Conn:
        if self._closed:
            raise RuntimeError("the client is closed")
        idle = self._idle
        now = _now()
        while idle:
            conn = idle.pop()  # LIFO: the warmest socket
            if now - conn.idle_since < self.idle_timeout_s and not conn.peer_closed():
                self._stats.reuses += 1
                return conn
            await self._discard(conn)
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await anyio.connect_tcp(
                    self._host, self._port, tls=self._tls, ssl_context=self._ssl_context
                )
        except TimeoutError:
            raise APITimeoutError(
                f"connect to {self._host}:{self._port}: no answer in {self.connect_timeout:g} s"
            ) from None
        except (OSError, ExceptionGroup) as exc:  # several addresses: a group of OSErrors
            raise APIConnectionError(f"cannot connect to {self.base_url}: {exc}") from exc
        self._stats.connects += 1
        return _Conn(stream)

    async def _release(self, conn: _Conn) -> None:
        """A complete keep-alive exchange: back on the stack (or closed if the stack is full)."""
        conn.requests += 1
        if self._closed or len(self._idle) >= self.max_idle:
            await self._discard(conn)
            return
        conn.idle_since = _now()
        self._idle.append(conn)

    async def _discard(self, conn: _Conn) -> None:
        self._stats.closed += 1
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(conn.stream)


_RESUMABLE = (b"x-lmgw-resumable", b"1")
_RESUMES = 3
"""Connections a resumable stream may break (and attempts per resume) before it gives up."""


def _header(headers: Any, name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _worker_path(worker_id: str) -> str:
    return "/admin/workers/" + quote(worker_id, safe="")


def _route_path(name: str) -> str:
    return "/admin/model_routes/" + quote(name, safe="")


def _decode(kind: str, status: int, data: bytes, headers: Any) -> Any:
    """:func:`decode_result`, plus ``bytes``: a non-JSON answer's raw body (a file's content),
    the typed error for an error status as for the others."""
    if kind != "bytes":
        return decode_result(kind, status, data, headers)
    if status >= 400:
        raise error_from_response(status, data, headers)
    return data


# -- files and batches ----------------------------------------------------------------------------

FILES = "/v1/files"
BATCHES = "/v1/batches"
#: a batch's final states
BATCH_DONE = frozenset(("completed", "failed", "cancelled", "expired"))
#: seconds the clean-up after run_batch (cancel, delete files) may take, even when cancelled
_CLEANUP_S = 5.0


def _file_path(file_id: str) -> str:
    return f"{FILES}/" + quote(file_id, safe="")


def _batch_path(batch_id: str) -> str:
    return f"{BATCHES}/" + quote(batch_id, safe="")


def _batch_body(input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None) -> bytes:
    body: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": "24h",
    }
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return _encode(body)


def _form_quote(value: str) -> str:
    """A form field's name or file name inside ``"..."`` (the HTML spec's escapes)."""
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _multipart_form(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes]]
) -> tuple[bytes, bytes]:
    """A ``multipart/form-data`` body of text ``fields`` and ``files`` (``name: (filename,
    data)``), and its content type; the boundary is random and appears in no value."""
    values = [v.encode() for v in fields.values()] + [data for _, data in files.values()]
    boundary = secrets.token_hex(16).encode()
    while any(boundary in v for v in values):  # 2**-128 a try; cheap to be sure
        boundary = secrets.token_hex(16).encode()
    parts: list[bytes] = []
    for name, value in fields.items():
        head = f'Content-Disposition: form-data; name="{_form_quote(name)}"\r\n'
        parts += [b"--", boundary, b"\r\n", head.encode(), b"\r\n", value.encode(), b"\r\n"]
    for name, (filename, data) in files.items():
        head = (
            f'Content-Disposition: form-data; name="{_form_quote(name)}";'
            f' filename="{_form_quote(filename)}"\r\n'
            "Content-Type: application/octet-stream\r\n"
        )
        parts += [b"--", boundary, b"\r\n", head.encode(), b"\r\n", data, b"\r\n"]
    parts += [b"--", boundary, b"--\r\n"]
    return b"".join(parts), b"multipart/form-data; boundary=" + boundary


async def _run_batch(
    face: Any,
    requests: Sequence[Mapping[str, Any]],
    endpoint: str,
    poll_s: float,
    timeout_s: float | None,
    sleep: Callable[[float], Awaitable[Any]],
) -> list[dict[str, Any]]:
    """``run_batch`` of every face (``face``: its batch calls; ``sleep``: its sleep).

    The bodies become a JSONL file (``custom_id`` "0".."n-1"), uploaded and run as a batch,
    polled every ``poll_s`` until it ends. The answer: each request's output record
    (``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``), from
    the output file or, for an error status, the error file; a request a cancelled or expired
    batch never ran gets ``response`` None and ``error`` ``{"code": "batch_cancelled" or
    "batch_expired", ...}``. The files are deleted once read (best effort).

    Raises the batch's errors as an APIError (BadRequest for invalid lines: ``.errors`` lists
    them, ``.batch`` is the batch); :class:`APITimeoutError` once ``timeout_s`` passed, after
    cancelling the batch (cancelling the caller cancels it too)."""
    if not requests:
        return []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    data = b"".join(
        _encode({"custom_id": str(i), "method": "POST", "url": endpoint, "body": dict(body)})
        + b"\n"
        for i, body in enumerate(requests)
    )
    upload = await face.upload_batch_file(data)
    files = [upload["id"]]
    try:
        job = await face.create_batch(upload["id"], endpoint)
        try:
            while job["status"] not in BATCH_DONE:
                pause = poll_s
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise APITimeoutError(
                            f"batch {job['id']} not done within {timeout_s:g} s (cancelled)"
                        )
                    pause = min(poll_s, left)
                await sleep(pause)
                job = await face.batch(job["id"])
        except BaseException:
            with anyio.move_on_after(_CLEANUP_S, shield=True):
                try:
                    await face.cancel_batch(job["id"])
                except (APIError, APIConnectionError):
                    pass  # the error to raise is the one that stopped the wait
            raise
        if job["status"] == "failed":
            raise _batch_failed(job)
        records: dict[str, dict[str, Any]] = {}
        for file_id in (job["output_file_id"], job["error_file_id"]):
            if file_id is None:
                continue
            files.append(file_id)
            for line in (await face.file_content(file_id)).splitlines():
                if line.strip():
                    record = msgspec.json.decode(line)
                    records[record["custom_id"]] = record
        return [
            records.get(str(i)) or _unanswered(str(i), job["status"]) for i in range(len(requests))
        ]
    finally:
        with anyio.move_on_after(_CLEANUP_S, shield=True):
            for file_id in files:
                try:
                    await face._delete_file(file_id)
                except (APIError, APIConnectionError):
                    pass  # the gateway forgets it after batches.retention_s anyway


def _unanswered(custom_id: str, status: str) -> dict[str, Any]:
    """The record of a request that a cancelled or expired batch never ran (OpenAI's shape)."""
    why = "expired" if status == "expired" else "cancelled"
    return {
        "id": None,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": f"batch_{why}", "message": f"the batch {why} before the request ran"},
    }


def _batch_failed(job: dict[str, Any]) -> APIError:
    """A failed batch as an error: BadRequest for invalid lines (the usual cause), the status
    the error's code means otherwise; ``.errors`` lists the batch's errors, ``.batch`` is it."""
    errors: list[dict[str, Any]] = (job.get("errors") or {}).get("data") or []
    said = []
    for e in errors[:5]:
        where = f"request {e['line'] - 1}: " if e.get("line") else ""
        said.append(f"{where}{e.get('message')} ({e.get('code')})")
    if len(errors) > 5:
        said.append(f"{len(errors) - 5} more")
    message = f"batch {job['id']} failed: " + ("; ".join(said) or "no reason given")
    code = errors[0].get("code") if errors else None
    status = 507 if code == "file_store_full" else 400
    exc = error_from_payload(status, _ErrorFields(message, "batch_failed", None, code))
    exc.errors = errors  # type: ignore[attr-defined]
    exc.batch = job  # type: ignore[attr-defined]
    return exc
