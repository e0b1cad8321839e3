"""`server = "hypercorn"` with TLS: the same API over HTTPS, HTTP/1.1 and HTTP/2 (ALPN)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
import trio

from lmgw.config import GatewayConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.gateway import Gateway

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


def https_chat(port: int, cafile: str) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=cafile)
    body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}/v1/chat/completions",
        data=body.encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return resp.status, json.load(resp)


def h2_alpn(port: int, cafile: str) -> str | None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.selected_alpn_protocol()


async def test_https_through_hypercorn(sim_worker, tmp_path: Path) -> None:
    sim = await sim_worker()
    cert, key = self_signed(tmp_path)
    cfg = GatewayConfig(
        server=ServerConfig(port=0, server="hypercorn", certfile=cert, keyfile=key),
        models=[ModelConfig(name="sim-model")],
        workers=[WorkerConfig(url=sim.url)],
    )
    gateway = Gateway(cfg)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.run)
        with trio.fail_after(20):
            status, answer = await trio.to_thread.run_sync(https_chat, port, cert)
            alpn = await trio.to_thread.run_sync(h2_alpn, port, cert)
        assert status == 200
        assert answer["choices"][0]["message"]["content"]
        assert alpn == "h2"  # HTTP/2 is offered over TLS
        nursery.cancel_scope.cancel()
