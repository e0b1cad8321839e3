"""``lmgw simulate --gateways 2 --redis --handoff pool``: two gateway replicas, a redis-server
and the fleet, all started and stopped by one command; an image encoded through one replica
skips E on the other (its output is in Redis), and nothing is left listening afterwards."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from redis_support import redis_binary

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAx"
    "MDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def listening(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_two_replicas_and_redis_from_one_command() -> None:
    redis_binary()  # skipped (or failed under CI) without it
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmgw.cli", "simulate", "--workers", "1e1pd", "--gateways", "2",
         "--redis", "--handoff", "pool", "--port", "0", "--speed", "inf", "--dialect",
         "vllm-epd", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    urls: list[str] = []
    others: list[str] = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while len(urls) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"on (http://\S+)", line):
                urls.append(m.group(1))
            elif m := re.search(r"(?:worker \w+|redis)\s+(\S+://\S+)", line):
                others.append(m.group(1))
        assert len(urls) == 2, proc.stderr.read() if proc.stderr else ""
        content = [{"type": "text", "text": "What is it?"},
                   {"type": "image_url", "image_url": {"url": PNG}}]  # fmt: skip
        body = {"model": "sim-llama-8b", "messages": [{"role": "user", "content": content}],
                "max_tokens": 4}  # fmt: skip
        first = post(urls[0] + "/v1/chat/completions", body)
        second = post(urls[1] + "/v1/chat/completions", body)
        assert first["choices"][0]["message"]["content"]
        assert (
            second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        )
        name = 'lmgw_encoder_cache_hits_total{model="sim-llama-8b"}'
        assert metric(urls[0], name) == 0 and metric(urls[1], name) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.3)
    assert len(others) == 3  # two workers and redis
    assert not [u for u in urls + others if listening(u.replace("redis://", "http://"))]
