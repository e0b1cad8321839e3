"""The command line as a user runs it: exit codes, `lmgw simulate` end to end, clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import trio
from gateway_support import GatewayFactory

from lmgw.config import AdminConfig

LMGW = [sys.executable, "-m", "lmgw.cli"]


def _pids(marker: bytes, parent: int | None = None) -> set[int]:
    """Processes whose command line holds ``marker`` (children of ``parent`` only, when
    given: other sessions' fleets on the same machine must not count)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker not in f.read():
                        continue
                if parent is not None:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                    if ppid != parent:
                        continue
                pids.add(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def sim_pids(parent: int | None = None) -> set[int]:
    return _pids(b"lmgw.simulators", parent)


def native_worker_pids(parent: int | None = None) -> set[int]:
    return _pids(b"lmgw.worker\x00", parent)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMGW, *args], capture_output=True, text=True, timeout=30)


def test_serve_rejects_bad_input_with_exit_2() -> None:
    r = run("serve", "--worker", "zz=http://127.0.0.1:1")
    assert r.returncode == 2 and "'zz' is not a role" in r.stderr
    r = run("serve", "--worker", "pd=http://127.0.0.1:1", "--policy", "nope")
    assert r.returncode == 2 and "unknown routing policy 'nope'" in r.stderr
    r = run("serve")
    assert r.returncode == 2 and "no workers configured" in r.stderr
    r = run("simulate", "--workers", "2x")
    assert r.returncode == 2
    r = run("simulate", "--workers", "1p1d", "--dialect", "nope")
    assert r.returncode == 2 and "unknown dialect" in r.stderr.lower()
    for speed in ("0", "-1", "nan", "fast"):  # refused before any worker starts
        r = run("simulate", "--workers", "2pd", "--speed", speed)
        assert r.returncode == 2 and "--speed" in r.stderr, r.stderr
        assert "usage: python -m lmgw.simulators" not in r.stderr


def test_print_config_redacts_secrets() -> None:
    r = run(
        "serve",
        "--worker",
        "prefill=http://127.0.0.1:1",
        "--worker",
        "decode=http://127.0.0.1:2",
        "--model",
        "m",
        "--api-key",
        "sekrit",
        "--print-config",
    )
    assert r.returncode == 0, r.stderr
    assert "sekrit" not in r.stdout
    assert 'flow = "p/d"' in r.stdout and 'role = "p"' in r.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "n", "dialect"),
    [
        ("2pd", 2, None),
        ("1e1p1d", 3, None),
        ("1p1d", 2, "vllm-p2pnccl"),
        ("1p1d", 2, "vllm-lmcache"),
        ("1p1d", 2, "lora"),  # --enable-lora: an adapter loaded through the gateway, then asked
    ],
)
def test_simulate_serves_then_stops_cleanly_on_sigterm(
    spec: str, n: int, dialect: str | None
) -> None:
    lora = dialect == "lora"
    if lora:
        dialect = None
    before = sim_pids()
    proc = subprocess.Popen(
        [
            *LMGW,
            "simulate",
            "--workers",
            spec,
            "--port",
            "0",
            "--speed",
            "inf",
            "--log-level",
            "warning",
            *(["--dialect", dialect] if dialect else []),
            *(["--enable-lora", "--max-loras", "1"] if lora else []),
            *(["--stream-head", "first-token"] if spec == "2pd" else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lmcache_dir = None
    try:
        url = None
        workers_out: dict[str, str] = {}  # role -> the worker line's rest
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if w := re.match(r"\s+worker (\w+)\s+(.*)$", line):
                workers_out[w.group(1)] = w.group(2)
            if d := re.match(r"\s+lmcache dir (\S+)$", line):
                lmcache_dir = d.group(1)
            m = re.search(r"on (http://\S+)", line)
            if m:
                url = m.group(1)
        assert url, proc.stderr.read()
        workers = sim_pids(proc.pid) - before  # the worker processes lmgw simulate started
        assert len(workers) >= n
        model = "sim-llama-8b"
        if lora:  # the simulation's admin API is open to local clients (no token set)
            load = urllib.request.Request(
                url + "/v1/load_lora_adapter",
                data=json.dumps({"lora_name": "sim-lora", "lora_path": "/a"}).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(load, timeout=10) as resp:
                assert len(json.load(resp)["loaded"]) == 2  # prefill and decode
            model = "sim-lora"
            p_url = workers_out["p"].split()[0]
            slots = get_json(p_url + "/sim/stats")["lora_slots"]
            assert slots["max_loras"] == 1  # --max-loras reached the workers
        if spec == "2pd":  # --stream-head reached the workers
            pd_url = workers_out["pd"].split()[0]
            assert get_json(pd_url + "/sim/stats")["stream_head"] == "first_token"
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
        )
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=body.encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] == 4
        if dialect is not None:  # the hand-off really went through the dialect's mechanism
            d_url = workers_out["d"].split()[0]
            handoff = get_json(d_url + "/sim/stats")["handoff"]
            if dialect == "vllm-p2pnccl":
                assert "kv_address=127.0.0.1:" in workers_out["p"]
                assert handoff["p2p_received"] == 1
            else:
                assert lmcache_dir and os.path.isdir(lmcache_dir)
                assert handoff["lmcache_hits"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    assert workers & sim_pids() == set(), "simulated workers outlived lmgw simulate"
    if lmcache_dir is not None:
        assert not os.path.exists(lmcache_dir), "the shared LMCache directory was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("handoff", ["direct", "gateway"])
def test_simulate_over_zmq_serves_a_chat_with_an_image(handoff: str) -> None:
    """`lmgw simulate --transport zmq`: native workers, the image through E as a tensor frame,
    P -> D over the protocol; SIGTERM leaves no worker behind. ``--handoff gateway``: the
    embedding and the KV come back through the gateway (its metrics count them)."""
    before = native_worker_pids()
    proc = subprocess.Popen(
        [*LMGW, "simulate", "--workers", "1e1p1d", "--transport", "zmq", "--port", "0",
         "--speed", "inf", "--log-level", "warning", "--handoff", handoff],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            assert not re.match(r"\s+worker", line) or "zmq+tcp://127.0.0.1:" in line, line
            if m := re.search(r"on (http://\S+)", line):
                url = m.group(1)
        assert url, proc.stderr.read()
        workers = native_worker_pids(proc.pid) - before
        assert len(workers) >= 3
        png = (
            "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEm"
            "R2hJIgAAAABJRU5ErkJggg=="
        )
        content = [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
        ]
        body = {
            "model": "sim-llama-8b",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
        }
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.load(resp)
            timing = resp.headers.get("server-timing", "")
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] == 4
        assert "encode;dur=" in timing and "prefill;dur=" in timing  # E, then P, then D
        # no max_tokens: the gateway fills in the model folder's context length, which the
        # native workers must share (they once defaulted to 8192 and refused it)
        body = {"model": "sim-llama-8b", "messages": [{"role": "user", "content": "hi"}]}
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["choices"][0]["finish_reason"] in ("stop", "length")
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        relayed = re.findall(
            r'^lmgw_handoff_bytes_total\{kind="(\w+)",via="frames"\} (\S+)$', metrics, re.M
        )
        if handoff == "gateway":
            assert dict(relayed)["embeddings"] != "0", metrics
            assert "kv" in dict(relayed)
        else:
            assert not relayed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    assert workers & native_worker_pids() == set(), "native workers outlived lmgw simulate"


def test_simulate_handoff_gateway_needs_native_workers() -> None:
    out = subprocess.run(
        [*LMGW, "simulate", "--workers", "1p1d", "--handoff", "gateway", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--handoff gateway is for native workers (--transport zmq)" in out.stderr


@pytest.mark.parametrize("server", ["native"])
async def test_the_routes_cli(
    gateway: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lmgw routes list|set|delete``: the admin API's client, as ``lmgw lora``; a route set
    here splits the gateway's next requests, a deleted one is an unknown model again."""
    from lmgw import cli

    async def lmgw(*argv: str) -> int:
        with trio.fail_after(15):
            return await trio.to_thread.run_sync(cli.main, list(argv))

    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def served_by(n: int) -> list[str]:
        answers = [await gw.request("POST", "/v1/chat/completions", chat) for _ in range(n)]
        assert all(r.status == 200 for r in answers), [r.body for r in answers]
        return sorted(r.json()["model"] for r in answers)

    token = "admin-secret"
    gw = await gateway(
        per_worker=[{"model": "model-a"}, {"model": "model-b"}], admin=AdminConfig(token=token)
    )
    monkeypatch.setenv("LMGW_ADMIN_TOKEN", token)
    common = ("--gateway", gw.url)
    assert await lmgw("routes", "list", *common) == 0
    assert "no model routes" in capsys.readouterr().out

    set_ab = ("routes", "set", "chat", "model-a=3", "model-b", "--fallback", "model-b")
    assert await lmgw(*set_ab, *common) == 0
    line = "chat  model-a=3 (75%)  model-b=1 (25%)  fallbacks=model-b  split=request"
    assert capsys.readouterr().out == line + "  requests model-a=0 model-b=0\n"
    assert await served_by(4) == ["model-a"] * 3 + ["model-b"]
    assert await lmgw("routes", "list", *common) == 0
    assert capsys.readouterr().out == line + "  requests model-a=3 model-b=1\n"

    assert await lmgw("routes", "set", "chat", "model-b=1", "--split", "session", "--json",
                      *common) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert '"split":"session"' in out and '"fallbacks":[]' in out
    assert await served_by(2) == ["model-b"] * 2
    set_mirror = (
        "routes",
        "set",
        "chat",
        "model-b",
        "--mirror",
        "model-a",
        "--mirror-share",
        "0.5",
    )
    assert await lmgw(*set_mirror, *common) == 0
    assert "split=request  mirror=model-a (50%)  requests" in capsys.readouterr().out

    for bad in ("model-a=lots", "model-a=-1", "model-a=nan"):  # refused before any request
        assert await lmgw("routes", "set", "chat", bad, *common) == 2
        assert f"target '{bad}': the weight must be a number >= 0" in capsys.readouterr().err
    assert await lmgw("routes", "set", "chat", "model-a=0", *common) == 1  # the gateway's rule
    assert "400: invalid model route: at least one target" in capsys.readouterr().err
    assert await served_by(1) == ["model-b"]  # the refused definitions changed nothing

    assert await lmgw("routes", "delete", "chat", *common) == 0
    assert "deleted model route chat" in capsys.readouterr().out
    r = await gw.request("POST", "/v1/chat/completions", chat)
    assert r.status == 404 and "chat" in r.json()["error"]["message"]
    assert await lmgw("routes", "delete", "chat", *common) == 1
    assert "404: no model route `chat`" in capsys.readouterr().err
    assert await lmgw("routes", "list", "--token", "wrong", *common) == 1
    assert "401" in capsys.readouterr().err


async def test_serve_freezes_start_up_and_raises_the_young_gc_threshold() -> None:
    """``lmgw serve`` (the CLI's ``serve``): what start-up built is frozen out of the
    collector's sight and young collections wait for GC_YOUNG_THRESHOLD allocations; the
    process's own settings are put back here, as they are global."""
    import gc

    from lmgw.cli import serve
    from lmgw.config import config_from_mapping
    from lmgw.gateway import Gateway
    from lmgw.gctune import GC_YOUNG_THRESHOLD

    old = gc.get_threshold()
    assert old[0] < GC_YOUNG_THRESHOLD
    try:
        gateway = Gateway(config_from_mapping({"server": {"host": "127.0.0.1", "port": 0}}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, gateway)
            with trio.fail_after(20):
                while gc.get_threshold()[0] < GC_YOUNG_THRESHOLD:
                    await trio.sleep(0.01)
            assert gc.get_threshold()[1:] == old[1:]
            assert gc.get_freeze_count() > 0
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)
