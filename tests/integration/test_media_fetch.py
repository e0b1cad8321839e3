"""Fetching media over http(s) against a local server on 127.0.0.1 (port 0): the SSRF guard
(refused unless 127.0.0.1 is allow-listed, redirects vetted hop by hop), the byte cap (the body
stops being read), the deadline, and https with SNI and certificate checks.

The server is a small trio handler scripted per path; it records what it saw (request heads,
connections, bytes sent) so that "refused" can be checked as "never connected".
"""

from __future__ import annotations

import base64
import io
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
from PIL import Image

from lmgw.multimodal import MediaError, MediaLimits, preprocess
from lmgw.multimodal.fetch import fetch_url


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
LOCAL = MediaLimits(allowed_networks=("127.0.0.1/32",), fetch_timeout_s=5.0)
TEST_BOUND_S = 10.0


@dataclass
class Seen:
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    big_sent: int = 0
    big_broken: bool = False
    sni: list[str | None] = field(default_factory=list)


def response(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = f"HTTP/1.1 {status}\r\n"
    for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
        if v:
            head += f"{k}: {v}\r\n"
    return head.encode() + b"\r\n" + body


async def handle(stream: trio.abc.Stream, seen: Seen) -> None:
    seen.connections += 1
    try:
        await answer(stream, seen)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client hung up (the point of several tests) or failed its TLS handshake
    finally:
        await trio.aclose_forcefully(stream)


async def answer(stream: trio.abc.Stream, seen: Seen) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
    head = buf.split(b"\r\n\r\n")[0]
    seen.heads.append(head)
    path = head.split(b" ")[1].decode()
    if path.startswith("/img.png"):
        await stream.send_all(response("200 OK", PNG, {"Content-Type": "image/png"}))
    elif path == "/chunked":
        chunks = (PNG[:10], PNG[10:], b"")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        te = {"Content-Length": "", "Transfer-Encoding": "chunked"}
        await stream.send_all(response("200 OK", headers=te) + body)
    elif path.startswith("/redirect/"):
        target = path[len("/redirect/") :].replace("~", "/")
        await stream.send_all(response("302 Found", headers={"Location": target}))
    elif path == "/loop":
        await stream.send_all(response("301 Moved", headers={"Location": "/loop"}))
    elif path == "/big":
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        chunk = b"\x00" * 65536
        try:
            while seen.big_sent < 256 * 1024 * 1024:
                await stream.send_all(chunk)
                seen.big_sent += len(chunk)
        except trio.BrokenResourceError:
            seen.big_broken = True
    elif path == "/big-declared":
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        await trio.sleep_forever()
    elif path == "/slow":
        await trio.sleep_forever()
    elif path == "/gzip":
        await stream.send_all(response("200 OK", PNG, {"Content-Encoding": "gzip"}))
    else:
        await stream.send_all(response("404 Not Found", b"no"))


@asynccontextmanager
async def media_server(
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[int, Seen]]:
    seen = Seen()

    async def handler(stream: trio.abc.Stream) -> None:
        await handle(stream, seen)

    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            serve = partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        else:
            serve = partial(trio.serve_ssl_over_tcp, handler, 0, ssl_context, host="127.0.0.1")
        listeners = await nursery.start(serve)
        sock = getattr(listeners[0], "socket", None) or listeners[0].transport_listener.socket
        with trio.fail_after(TEST_BOUND_S):
            yield sock.getsockname()[1], seen
        nursery.cancel_scope.cancel()


def image_body(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": "m", "messages": [{"role": "user", "content": [part]}]}


async def refusal(url: str, limits: MediaLimits, **kw: object) -> MediaError:
    with pytest.raises(MediaError) as info:
        await fetch_url(url, limits, **kw)
    return info.value


async def test_fetch_allowed_when_loopback_is_allow_listed() -> None:
    async with media_server() as (port, seen):
        (item,) = await preprocess(image_body(f"http://127.0.0.1:{port}/img.png?v=1 2"), LOCAL)
        (inline,) = await preprocess(
            image_body("data:image/png;base64," + base64.b64encode(PNG).decode()),
            LOCAL,
        )
        assert (item.source, item.nbytes, item.media_type) == ("http", len(PNG), "image/png")
        assert item.hash == inline.hash
        head = seen.heads[0]
        assert head.startswith(b"GET /img.png?v=1%202 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{port}".encode() in head
        loaded = await fetch_url(f"http://127.0.0.1:{port}/chunked", LOCAL)
        assert loaded.data == PNG


async def test_fetch_refused_without_allow_list_and_nothing_connects() -> None:
    async with media_server() as (port, seen):
        with pytest.raises(MediaError) as info:
            await preprocess(image_body(f"http://127.0.0.1:{port}/img.png"), MediaLimits())
        assert info.value.reason == "blocked_address"
        assert info.value.param == "messages[0].content[0]"
        # a name that resolves to loopback, through the system resolver
        err = await refusal(f"http://localhost:{port}/img.png", MediaLimits())
        assert err.reason == "blocked_address"
        assert seen.connections == 0
        loopback = MediaLimits(allowed_networks=("127.0.0.0/8", "::1/128"))
        loaded = await fetch_url(f"http://localhost:{port}/img.png", loopback)
        assert loaded.data == PNG


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http:~~10.255.255.1~x.png", "blocked_address"),
        ("http:~~169.254.169.254~latest~meta-data", "blocked_address"),
        ("http:~~[fd00:ec2::254]~latest", "blocked_address"),
        ("file:~~~etc~passwd", "unsupported_scheme"),
    ],
)
async def test_redirects_are_vetted_again(target: str, reason: str) -> None:
    async with media_server() as (port, seen):
        err = await refusal(f"http://127.0.0.1:{port}/redirect/{target}", LOCAL)
        assert err.reason == reason
        assert seen.connections == 1  # only the first hop connected


async def test_redirects_followed_then_bounded() -> None:
    async with media_server() as (port, seen):
        loaded = await fetch_url(f"http://127.0.0.1:{port}/redirect/~img.png", LOCAL)
        assert loaded.data == PNG
        err = await refusal(f"http://127.0.0.1:{port}/loop", LOCAL)
        assert err.reason == "too_many_redirects"
        assert seen.connections == 2 + LOCAL.max_redirects + 1


async def test_oversize_body_is_cut() -> None:
    limits = MediaLimits(allowed_networks=("127.0.0.1/32",), max_item_bytes=1024 * 1024)
    async with media_server() as (port, seen):
        err = await refusal(f"http://127.0.0.1:{port}/big", limits)
        assert err.reason == "item_too_large"
        with trio.fail_after(5):
            while not seen.big_broken:  # the server notices we hung up...
                await trio.sleep(0.01)
        assert seen.big_sent < 64 * 1024 * 1024  # ...long before it sent its 256 MiB
        err = await refusal(f"http://127.0.0.1:{port}/big-declared", limits)
        assert err.reason == "item_too_large"


async def test_slow_server_times_out() -> None:
    limits = MediaLimits(allowed_networks=("127.0.0.1/32",), fetch_timeout_s=0.3)
    async with media_server() as (port, _seen):
        err = await refusal(f"http://127.0.0.1:{port}/slow", limits)
        assert err.reason == "fetch_timeout"
        assert "fetch_timeout_s" in err.message


async def test_bad_answers() -> None:
    async with media_server() as (port, _seen):
        err = await refusal(f"http://127.0.0.1:{port}/nothing-here", LOCAL)
        assert err.reason == "fetch_failed" and "404" in err.message
        err = await refusal(f"http://127.0.0.1:{port}/gzip", LOCAL)
        assert err.reason == "fetch_failed"
    # nothing listens on the port any more
    err = await refusal(f"http://127.0.0.1:{port}/img.png", LOCAL)
    assert err.reason == "fetch_failed"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_https_checks_the_certificate_and_sends_sni(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def resolve(host: str, port: int) -> list:
        assert host == "media.test"
        return [(2, ("127.0.0.1", port))]

    async with media_server(server_ctx) as (port, _seen):
        url = f"https://media.test:{port}/img.png"
        loaded = await fetch_url(url, LOCAL, ssl_context=client_ctx, resolver=resolve)
        assert (loaded.data, loaded.source) == (PNG, "https")
        assert sni == ["media.test"]
        err = await refusal(url, LOCAL, resolver=resolve)  # system trust store: not trusted
        assert err.reason == "fetch_failed" and "TLS" in err.message
        err = await refusal(f"https://127.0.0.1:{port}/img.png", LOCAL, ssl_context=client_ctx)
        assert err.reason == "fetch_failed"  # the certificate does not name 127.0.0.1
