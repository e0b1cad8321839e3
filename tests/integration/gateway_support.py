"""Helpers for the gateway integration tests (the fixtures are in ``conftest.py``): a raw HTTP/1.1
client on trio sockets (tests see the exact bytes), handles on in-process simulated workers and
on a running gateway. A uniquely named module, so test files can import it whatever other
``conftest.py`` files exist.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from lmgw.config import ServerConfig
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, serve_worker_inprocess

MODEL = "sim-model"
REQUEST_TIMEOUT_S = 10.0
"""Default bound of one raw HTTP exchange."""


# -- raw HTTP ------------------------------------------------------------------------------------


def server_config(server: str, **options: Any) -> ServerConfig:
    """The front door a test's ``server`` parameter names: "native" (its trio path), "lane"
    (the native server with the compiled lane) or "hypercorn"."""
    return ServerConfig(
        server="native" if server == "lane" else server,  # type: ignore[arg-type]
        **{"compiled_lane": server == "lane", **options},
    )


@dataclass
class RawResponse:
    status: int
    #: header name (lower case) -> value; ``header_list`` keeps every line in order
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    #: False when the body was cut short (chunked without its last-chunk, short content-length)
    complete: bool = True

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    def events(self) -> list[Any]:
        """SSE events, asserting the exact framing: each is ``data: <payload>\\n\\n``; payloads
        are decoded JSON, or the string ``"[DONE]"``."""
        assert self.headers["content-type"].startswith("text/event-stream"), self.headers
        return parse_sse(self.body)


def parse_sse(body: bytes) -> list[Any]:
    assert body.endswith(b"\n\n"), body[-200:]
    out: list[Any] = []
    for raw in body[:-2].split(b"\n\n"):
        assert raw.startswith(b"data: ") and b"\n" not in raw and b"\r" not in raw, raw
        payload = raw[6:]
        out.append("[DONE]" if payload == b"[DONE]" else msgspec.json.decode(payload))
    return out


def request_bytes(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    close: bool = True,
) -> bytes:
    data = b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
    lines = [f"{method} {path} HTTP/1.1", f"host: {urlsplit(url).netloc}"]
    if close:
        lines.append("connection: close")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded, and whether it ended with the last-chunk."""
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep or not size_line:
            return bytes(out), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out), True
        out += rest[:size]
        if len(rest) < size + 2:
            return bytes(out), False
        data = rest[size + 2 :]


def parse_response(raw: bytes) -> RawResponse:
    head, sep, payload = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    header_list = [
        (k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])
    ]
    headers = dict(header_list)
    complete = True
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload, complete = dechunk(payload)
    elif "content-length" in headers:
        complete = len(payload) == int(headers["content-length"])
    return RawResponse(status, headers, header_list, payload, complete)


async def open_stream(url: str) -> trio.SocketStream:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


async def http_request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = REQUEST_TIMEOUT_S,
) -> RawResponse:
    """One request on a fresh connection (``connection: close``); reads to EOF."""
    with trio.fail_after(timeout):
        stream = await open_stream(url)
        async with stream:
            await stream.send_all(request_bytes(url, method, path, body, headers))
            raw = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    raw += chunk
            except trio.BrokenResourceError:  # a reset after the response: keep what came
                pass
    return parse_response(bytes(raw))


# -- simulated workers ---------------------------------------------------------------------------


@dataclass
class SimHandle:
    """An in-process simulated worker: its URL, its handler (engine, stats, faults)."""

    url: str
    sim: SimWorker
    _scope: trio.CancelScope
    _stopped: trio.Event

    async def stop(self) -> None:
        """Stop serving: the port closes, open connections are closed."""
        self._scope.cancel()
        with trio.fail_after(5):
            await self._stopped.wait()

    async def stats(self) -> dict[str, Any]:
        """``GET /sim/stats`` over HTTP (what an out-of-process worker would answer)."""
        r = await http_request(self.url, "GET", "/sim/stats")
        assert r.status == 200, r
        return r.json()

    async def set_faults(self, **faults: Any) -> None:
        r = await http_request(self.url, "POST", "/sim/faults", faults)
        assert r.status == 200, r.body


async def serve_sim(
    sim: SimWorker, stopped: trio.Event, *, task_status: trio.TaskStatus[tuple[str, Any]]
) -> None:
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_worker_inprocess, sim)
                task_status.started((url, scope))
    finally:
        stopped.set()


def free_port_url() -> str:
    """A 127.0.0.1 URL with nothing listening (bound to port 0, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- the gateway ---------------------------------------------------------------------------------


@dataclass
class GatewayHandle:
    gateway: Gateway
    url: str
    server: str
    #: the simulated workers behind the gateway, in config order
    sims: list[SimHandle] = field(default_factory=list)
    #: every worker URL in the config (simulated ones first, then ``extra_urls``)
    workers: list[str] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> RawResponse:
        return await http_request(self.url, method, path, body, headers, **kw)

    async def metrics(self) -> str:
        r = await self.request("GET", "/metrics")
        assert r.status == 200
        return r.body.decode()


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]
"""The ``gateway`` fixture: ``await gateway(n, **options)`` -> :class:`GatewayHandle`."""


def metric_value(text: str, sample: str, default: float | None = 0.0) -> float:
    """The value of one exact Prometheus sample (``name{labels}``) in ``text``; ``default``
    when absent (None: absence is a test failure)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise AssertionError(f"no sample {sample!r} in /metrics")
    return default


async def start_tokenized_gateway(
    nursery: trio.Nursery, workers: list[Any], **routing: Any
) -> Gateway:
    """A gateway on port 0 in front of ``workers`` (``WorkerConfig`` entries) for ``MODEL``
    with the simulators' tokenizer (chat-templated token ids, as the engines cache them),
    ``routing`` the ``RoutingConfig`` fields (policy cache_aware unless given), rare probes."""
    from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, RoutingConfig
    from lmgw.simulators.model_files import default_model_dir

    routing.setdefault("policy", "cache_aware")
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30, timeout_s=2.0),
        routing=RoutingConfig(**routing),
        models=[ModelConfig(name=MODEL, tokenizer=str(default_model_dir()))],
        workers=workers,
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    return gw


def conversation(
    user: str, turns: int, answers: list[str], words: int = 40
) -> list[dict[str, str]]:
    """A chat of ``turns`` user messages (``words`` repeated words each, after a shared system
    prompt) with the answers received so far: multi-turn traffic whose prefixes grow."""
    messages = [{"role": "system", "content": "You answer questions about the shared report."}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"{user} asks question {t}: " + "why " * words})
        if t < len(answers):
            messages.append({"role": "assistant", "content": answers[t]})
    return messages
