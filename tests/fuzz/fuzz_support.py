"""A live simulated fleet for the fuzz tests: a simulated vLLM worker and a gateway in front of
it, both running in their own trio loop on a background thread, so that plain synchronous
clients (hypothesis, schemathesis, blocking sockets) can hammer them from the test thread.

``LMGW_FUZZ_EXAMPLES`` sets how many examples each fuzz target runs (``make fuzz`` raises it);
``FUZZ_DEADLINE_S`` bounds each exchange, so a hang fails the example instead of the suite.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
from typing import Any

import trio

from lmgw.config import (
    AdminConfig,
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess

MODEL = "sim-model"
API_KEY = "sk-fuzz-0123456789abcdef"
ADMIN_TOKEN = "admin-fuzz-0123456789abcdef"
#: examples per fuzz target: small in `make test`, large in `make fuzz`
EXAMPLES = int(os.environ.get("LMGW_FUZZ_EXAMPLES", "0") or 0)
#: bound of one request/response exchange (a hang is a failure, not a stuck suite)
FUZZ_DEADLINE_S = 10.0


def examples(default: int) -> int:
    """``LMGW_FUZZ_EXAMPLES`` when set, else ``default`` (the `make test` budget)."""
    return EXAMPLES or default


class LiveGateway:
    """``with LiveGateway(server="native") as live: live.url ...``; stops everything on exit."""

    def __init__(
        self, server: str = "native", *, keys: bool = True, dialect: str | None = None,
        **limits: Any,
    ) -> None:  # fmt: skip
        self.server = server
        self.keys = keys
        #: a P/D dialect: a prefill and a decode simulator in that dialect instead of a merged one
        self.dialect = dialect
        self.limits = limits
        self.url = ""
        self.port = 0
        self.gateway: Gateway | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="live-gateway", daemon=True)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the live gateway did not start in 30 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._cancel is not None:
            try:
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(30)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            if self.dialect is None:
                sim = SimWorker(WorkerOptions(speed=math.inf, model=MODEL))
                workers = [WorkerConfig(url=await nursery.start(serve_worker_inprocess, sim),
                                        id="w0")]  # fmt: skip
                models = [ModelConfig(name=MODEL, aliases=["sim-alias"])]
            else:
                workers = []
                for role in ("p", "d"):
                    sim = SimWorker(WorkerOptions(speed=math.inf, model=MODEL, role=role))
                    url = await nursery.start(serve_worker_inprocess, sim)
                    port = int(url.rsplit(":", 1)[1]) if role == "p" else None
                    workers.append(WorkerConfig(url=url, id=f"{role}0", role=role,
                                                bootstrap_port=port))  # fmt: skip
                models = [ModelConfig(name=MODEL, aliases=["sim-alias"], flow="p/d",
                                      dialect=self.dialect)]  # fmt: skip
            cfg = GatewayConfig(
                server=ServerConfig(port=0, server=self.server, graceful_shutdown_s=1.0),  # type: ignore[arg-type]
                limits=LimitsConfig(**{"request_timeout_s": 30.0, **self.limits}),
                health=HealthConfig(interval_s=60.0),
                models=models,
                workers=workers,
                admin=AdminConfig(token=ADMIN_TOKEN),
                auth=AuthConfig(keys=[ApiKeyConfig(key=API_KEY, name="fuzz")] if self.keys else []),
            )
            gw = self.gateway = Gateway(cfg)
            self.port = await nursery.start(gw.run)
            self.url = f"http://127.0.0.1:{self.port}"
            self._ready.set()

    # -- blocking helpers for the test thread --------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=FUZZ_DEADLINE_S)
        try:
            hdrs = {"content-type": "application/json", **(headers or {})}
            if auth and self.keys:
                hdrs.setdefault("authorization", f"Bearer {API_KEY}")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def exchange_raw(self, data: bytes) -> bytes:
        """Send raw bytes on a fresh connection, half-close, and read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=FUZZ_DEADLINE_S) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server already answered and closed
            out = bytearray()
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
            return bytes(out)

    def assert_healthy(self) -> None:
        """The gateway still serves: /health is 200 and a chat completion works."""
        status, _, body = self.request("GET", "/health", auth=False)
        assert status == 200, body
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        status, _, body = self.request("POST", "/v1/chat/completions", json.dumps(chat).encode())
        assert status == 200, body
        gw = self.gateway
        assert gw is not None
        if gw.server is not None:  # native: no request left running (nothing hangs)
            deadline = time.monotonic() + FUZZ_DEADLINE_S
            while gw.server.busy_connections and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gw.server.busy_connections == 0
