"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, installed by
``make test`` when missing) loads ``/dashboard`` from a gateway in front of a simulated
prefill/decode fleet while traffic runs, over the admin-token cookie flow. The worker table
must list the fleet, the numbers must move within 2 s, and a screenshot is saved to
``tests/artifacts/dashboard.png`` (git-ignored) for a person to look at.

Chromium is driven through the DevTools protocol (``--remote-debugging-port``) with the test's
own WebSocket client, so no chromedriver or selenium is needed. Without a Chromium binary the
test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from gateway_support import MODEL, http_request
from ws_support import CDP, WSClient

from lmgw.config import (
    AdminConfig,
    DashboardConfig,
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
TOKEN = "dash-test-token"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


async def start_chromium(
    binary: str, url: str, nursery: trio.Nursery, profile: str
) -> tuple[trio.Process, int]:
    """Chromium headless on ``url``; returns the process and its DevTools port."""
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--hide-scrollbars",
        "--window-size=1440,1280",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        url,
    ]
    proc = await trio.lowlevel.open_process(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    buf = b""
    with trio.fail_after(30):
        while b"DevTools listening on ws://" not in buf:
            chunk = await proc.stderr.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"chromium exited: {buf.decode(errors='replace')[-2000:]}")
            buf += chunk
    line = buf.split(b"DevTools listening on ws://", 1)[1].split(b"\n", 1)[0]
    port = int(line.split(b"/", 1)[0].rsplit(b":", 1)[1])

    async def drain_stderr() -> None:  # keep the pipe from filling up
        while await proc.stderr.receive_some(65536):
            pass

    nursery.start_soon(drain_stderr)
    return proc, port


async def devtools_json(port: int, path: str) -> object:
    """GET a DevTools HTTP endpoint (it keeps the connection open: read by Content-Length)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        raw = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            raw += chunk
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(body) >= length:
                    return json.loads(body[:length])
    raise ConnectionError(f"no answer from DevTools {path}")


async def page_target(port: int, url_part: str) -> str:
    """The DevTools WebSocket URL of the page showing ``url_part``."""
    with trio.fail_after(10):
        while True:
            targets = await devtools_json(port, "/json/list")
            pages = [t for t in targets if t.get("type") == "page" and url_part in t.get("url", "")]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            await trio.sleep(0.1)


async def traffic(url: str, stop: trio.Event) -> None:
    """Streamed chats one after another until ``stop`` (at most 2000)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "watch the dashboard move " * 4}],
        "max_tokens": 8,
        "stream": True,
    }
    for _ in range(2000):
        if stop.is_set():
            return
        r = await http_request(url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        await trio.sleep(0.02)


@pytest.mark.slow
async def test_dashboard_in_headless_chromium(nursery: trio.Nursery, sim_worker) -> None:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("no chromium binary (apt-get install chromium chromium-driver, or make test)")

    prefill = await sim_worker(role="p", speed=400.0)
    decodes = [await sim_worker(role="d", speed=400.0) for _ in range(2)]
    workers = [
        WorkerConfig(
            url=prefill.url,
            role="p",
            id="prefill-0",
            kv_address=prefill.sim.kv_address,
            bootstrap_port=int(prefill.url.rsplit(":", 1)[1]),
        ),
        *(
            WorkerConfig(url=d.url, role="d", id=f"decode-{i}", kv_address=d.sim.kv_address)
            for i, d in enumerate(decodes)
        ),
    ]
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=1.0),
        admin=AdminConfig(token=TOKEN),
        dashboard=DashboardConfig(interval_s=0.5, window_s=30.0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-nixl")],
        workers=workers,
    )
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    base = f"http://127.0.0.1:{port}"
    # without the token the page is refused
    assert (await http_request(base, "GET", "/dashboard")).status == 401

    stop = trio.Event()
    nursery.start_soon(traffic, base, stop)
    profile = tempfile.mkdtemp(prefix="lmgw-chromium-")
    proc = None
    try:
        async with trio.open_nursery() as browser:
            # the token in the query string becomes a cookie (303 to the bare URL)
            proc, devtools = await start_chromium(
                binary, f"{base}/dashboard?token={TOKEN}", browser, profile
            )
            async with await WSClient.connect(await page_target(devtools, "/dashboard")) as ws:
                cdp = CDP(ws)

                async def value(expr: str):
                    return await cdp.evaluate(expr)

                # (the page may still be loading, after the redirect: no body yet)
                shown = "Number((document.body && document.body.dataset.snapshots) || 0)"
                with trio.fail_after(15):  # the page loaded and got its first snapshots
                    while (await value(shown)) < 2:
                        await trio.sleep(0.1)
                assert await value("location.pathname + location.search") == "/dashboard"
                ids = await value(
                    "Array.from(document.querySelectorAll('#workers tr[data-worker-id]'))"
                    ".map(r => r.dataset.workerId + ':' + r.dataset.role)"
                )
                assert sorted(ids) == ["decode-0:d", "decode-1:d", "prefill-0:p"]
                states = await value(
                    "Array.from(document.querySelectorAll('#workers .badge'))"
                    ".map(b => b.textContent)"
                )
                assert states == ["healthy"] * 3
                assert await value("document.getElementById('conn').textContent") == "live"

                # the numbers move within 2 s while traffic runs
                read = (
                    "[document.body.dataset.snapshots, document.getElementById('kpi-total')"
                    ".textContent, Array.from(document.querySelectorAll('#workers .wreq'))"
                    ".map(c => c.textContent).join(',')]"
                )
                before = await value(read)
                changed = None
                with trio.move_on_after(2.0):
                    while True:
                        now = await value(read)
                        if now[0] != before[0] and now[1:] != before[1:]:
                            changed = now
                            break
                        await trio.sleep(0.05)
                assert changed is not None, f"nothing moved in 2 s: {before}"
                assert int(changed[0]) > int(before[0])

                # a few more snapshots so the charts have lines, then the screenshot
                target = int(changed[0]) + 4
                with trio.fail_after(10):
                    while int(await value("document.body.dataset.snapshots")) < target:
                        await trio.sleep(0.1)
                stages = await value(
                    "Array.from(document.querySelectorAll('#stages tr[data-stage]'))"
                    ".map(r => r.dataset.stage)"
                )
                assert "p" in stages and "d" in stages
                routing = await value("document.querySelectorAll('#routing tbody tr').length")
                assert routing >= 2
                shot = await cdp.call(
                    "Page.captureScreenshot", format="png", captureBeyondViewport=True
                )
                ARTIFACTS.mkdir(exist_ok=True)
                png = base64.b64decode(shot["data"])
                assert png.startswith(b"\x89PNG")
                (ARTIFACTS / "dashboard.png").write_bytes(png)
                try:
                    await cdp.call("Browser.close")
                except (ConnectionError, RuntimeError):
                    pass
            browser.cancel_scope.cancel()
    finally:
        stop.set()
        if proc is not None and proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
