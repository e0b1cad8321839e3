"""The simulated P/D workers' KV transfer topology (``zone``, ``kv_bytes_per_token``): a decode
worker taking a prefill worker's KV from another zone sleeps the KV bytes over the cross-zone
bandwidth before its first token, from its own zone over the same-zone one; the prefill worker
announces its zone with each hand-off (``x-sim-zone`` on the side channel, the pool entry's
role). With ``kv_bytes_per_token`` 0 (the default) nothing is slept."""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from gateway_support import RawResponse, http_request, open_stream, request_bytes
from test_sim_disagg import NIXL_PREFILL  # the prefill leg's kv_transfer_params, as on the wire

from lmgw.simulators import SimWorker, WorkerOptions, serve_worker_inprocess
from lmgw.simulators.faults import Faults
from lmgw.simulators.worker import build_parser, options_from_args

MODEL = "sim-model"
PATH = "/v1/chat/completions"
LONG = "Summarise the history of the Roman empire in a few short sentences, please. " * 4
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4}
BYTES_PER_TOKEN = 1_000_000
SAME_GBPS, CROSS_GBPS = 20.0, 2.0
"""About 100 transferred tokens: 5 ms same-zone, 50 ms cross-zone (at speed 1)."""


async def start(nursery: trio.Nursery, role: str, **options: Any) -> tuple[SimWorker, str]:
    options.setdefault("speed", math.inf)
    worker = SimWorker(WorkerOptions(role=role, model=MODEL, **options))
    return worker, await nursery.start(serve_worker_inprocess, worker)


def topology(zone: str | None, **options: Any) -> dict[str, Any]:
    return {
        "zone": zone,
        "kv_bytes_per_token": BYTES_PER_TOKEN,
        "kv_gbps_same_zone": SAME_GBPS,
        "kv_gbps_cross_zone": CROSS_GBPS,
        **options,
    }


async def prefill(p_url: str) -> tuple[dict[str, Any], int]:
    """The NIXL prefill leg: P's kv_transfer_params and the prompt's length."""
    body = {**CHAT, "kv_transfer_params": dict(NIXL_PREFILL), "max_tokens": 1}
    pre = await http_request(p_url, "POST", PATH, body)
    assert pre.status == 200, pre.body
    return pre.json()["kv_transfer_params"], pre.json()["usage"]["prompt_tokens"]


async def decode_ttft(d_url: str, params: dict[str, Any]) -> float:
    """The decode leg, streamed: seconds until the client sees the first SSE event (the rest is
    read to the end and must be a 200)."""
    body = {**CHAT, "stream": True, "kv_transfer_params": params}
    with trio.fail_after(10):
        stream = await open_stream(d_url)
        async with stream:
            t0 = trio.current_time()
            await stream.send_all(request_bytes(d_url, "POST", PATH, body))
            raw = bytearray()
            ttft = None
            while chunk := await stream.receive_some(65536):
                raw += chunk
                if ttft is None and b"data: " in raw:
                    ttft = trio.current_time() - t0
    assert raw.startswith(b"HTTP/1.1 200"), bytes(raw[:300])
    assert ttft is not None
    return ttft


def handoff(worker: SimWorker) -> dict[str, Any]:
    return worker.snapshot()["handoff"]


def modelled_s(tokens: int, gbps: float, slow: float = 1.0, speed: float = 1.0) -> float:
    return tokens * BYTES_PER_TOKEN / (gbps * 1e9) * slow / speed


async def test_cross_zone_decode_pays_the_slower_transfer_in_its_ttft(
    nursery: trio.Nursery,
) -> None:
    _, p_url = await start(nursery, "p", **topology("a"))
    d_same, same_url = await start(nursery, "d", speed=1.0, **topology("a"))
    d_cross, cross_url = await start(nursery, "d", speed=1.0, **topology("b"))
    rounds = 3
    ttfts: dict[str, list[float]] = {"same": [], "cross": []}
    tokens = 0
    for _ in range(rounds):
        for name, url in (("same", same_url), ("cross", cross_url)):
            params, prompt_tokens = await prefill(p_url)
            tokens = prompt_tokens // 16 * 16  # only full blocks move
            ttfts[name].append(await decode_ttft(url, params))
    assert tokens >= 64
    same_s, cross_s = modelled_s(tokens, SAME_GBPS), modelled_s(tokens, CROSS_GBPS)
    assert cross_s > 0.03 and same_s < 0.01

    h_same, h_cross = handoff(d_same), handoff(d_cross)
    assert (h_same["kv_transfers_same_zone"], h_same["kv_transfers_cross_zone"]) == (rounds, 0)
    assert (h_cross["kv_transfers_same_zone"], h_cross["kv_transfers_cross_zone"]) == (0, rounds)
    assert h_same["kv_transfer_seconds_total"] == pytest.approx(rounds * same_s)
    assert h_cross["kv_transfer_seconds_total"] == pytest.approx(rounds * cross_s)
    assert h_cross["zone"] == "b" and h_cross["kv_blocks_verified"] == rounds * tokens // 16

    # The client sees it: best of 3 on each side, generous bounds (no tight timing).
    assert min(ttfts["cross"]) > min(ttfts["same"]) + 0.6 * (cross_s - same_s), ttfts
    assert min(ttfts["cross"]) >= cross_s

    metrics = (await http_request(cross_url, "GET", "/metrics")).body.decode()
    labels = f'{{model_name="{MODEL}",engine="0"}}'
    assert f"lmgw_sim:kv_transfers_cross_zone_total{labels} {float(rounds)}" in metrics
    assert f"lmgw_sim:kv_transfers_same_zone_total{labels} 0.0" in metrics
    assert "lmgw_sim:kv_transfer_seconds_total" in metrics
    stats = (await http_request(cross_url, "GET", "/sim/stats")).json()["handoff"]
    assert stats["kv_transfers_cross_zone"] == rounds


async def test_side_channel_announces_the_zone(nursery: trio.Nursery) -> None:
    _, p_url = await start(nursery, "p", zone="rack-7")
    params, _ = await prefill(p_url)
    r = await http_request(p_url, "GET", f"/sim/kv/{params['remote_request_id']}")
    assert r.status == 200 and r.headers["x-sim-zone"] == "rack-7"
    _, q_url = await start(nursery, "p")
    params, _ = await prefill(q_url)
    r = await http_request(q_url, "GET", f"/sim/kv/{params['remote_request_id']}")
    assert r.status == 200 and "x-sim-zone" not in r.headers


async def test_no_bytes_per_token_or_speed_inf_sleeps_nothing(nursery: trio.Nursery) -> None:
    _, p_url = await start(nursery, "p", zone="a")
    d_zero, zero_url = await start(nursery, "d", speed=1.0, zone="b")  # kv_bytes_per_token 0
    d_inf, inf_url = await start(nursery, "d", **topology("b"))  # speed inf
    d_none, none_url = await start(nursery, "d", speed=1.0)  # no zone, no bytes: today's worker
    for url in (zero_url, inf_url, none_url):
        params, _ = await prefill(p_url)
        await decode_ttft(url, params)
    for d in (d_zero, d_inf, d_none):
        h = handoff(d)
        assert h["kv_transfer_seconds_total"] == 0.0
        assert (h["kv_transfers_same_zone"], h["kv_transfers_cross_zone"]) == (0, 1)
    # zone None on both sides is one zone
    _, q_url = await start(nursery, "p")
    params, _ = await prefill(q_url)
    await decode_ttft(none_url, params)
    assert handoff(d_none)["kv_transfers_same_zone"] == 1


async def test_slow_fault_and_speed_scale_the_transfer(nursery: trio.Nursery) -> None:
    _, p_url = await start(nursery, "p", zone="a")
    d, d_url = await start(nursery, "d", speed=100.0, faults=Faults(slow=3.0), **topology("b"))
    params, prompt_tokens = await prefill(p_url)
    await decode_ttft(d_url, params)
    tokens = prompt_tokens // 16 * 16
    expected = modelled_s(tokens, CROSS_GBPS, slow=3.0, speed=100.0)
    assert handoff(d)["kv_transfer_seconds_total"] == pytest.approx(expected)


async def test_sglang_and_p2pnccl_handoffs_carry_the_zone(nursery: trio.Nursery) -> None:
    p, p_url = await start(nursery, "p", zone="a", kv_port=0)
    d, d_url = await start(nursery, "d", zone="b", kv_port=0, speed=1000.0, **_bytes())
    port = int(p_url.rsplit(":", 1)[1])
    sglang = {**CHAT, "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 77}
    results: dict[str, RawResponse] = {}

    async def leg(name: str, url: str) -> None:
        results[name] = await http_request(url, "POST", PATH, sglang)

    with trio.fail_after(10):
        async with trio.open_nursery() as legs:
            legs.start_soon(leg, "d", d_url)
            legs.start_soon(leg, "p", p_url)
    assert results["d"].status == 200 and results["p"].status == 200, results["d"].body
    assert handoff(d)["kv_transfers_cross_zone"] == 1

    rid = f"___prefill_addr_{p.kv_address}___decode_addr_{d.kv_address}_{uuid.uuid4().hex}"
    pre = await http_request(p_url, "POST", PATH, {**CHAT, "max_tokens": 1}, {"x-request-id": rid})
    assert pre.status == 200, pre.body
    dec = await http_request(d_url, "POST", PATH, CHAT, {"x-request-id": rid})
    assert dec.status == 200, dec.body
    h = handoff(d)
    assert h["p2p_received"] == 1 and h["kv_transfers_cross_zone"] == 2
    assert h["kv_transfer_seconds_total"] > 0


def _bytes() -> dict[str, Any]:
    return {"kv_bytes_per_token": BYTES_PER_TOKEN, "kv_gbps_cross_zone": CROSS_GBPS}


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"lmgwtest-{uuid.uuid4().hex[:12]}"
    yield name
    shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)


async def test_pool_handoff_keeps_the_producer_zone(nursery: trio.Nursery, shm_name: str) -> None:
    pool = {"handoff": "pool", "pool_shm_name": shm_name}
    _, p_url = await start(nursery, "p", zone="a", **pool)
    d_same, same_url = await start(nursery, "d", zone="a", **pool)
    d_cross, cross_url = await start(nursery, "d", zone="b", **pool)
    for url in (same_url, cross_url):
        params, _ = await prefill(p_url)
        await decode_ttft(url, params)
    assert handoff(d_same)["pool_kv_taken"] == handoff(d_cross)["pool_kv_taken"] == 1
    assert handoff(d_same)["kv_transfers_same_zone"] == 1
    assert handoff(d_cross)["kv_transfers_cross_zone"] == 1


def test_cli_flags_and_validation() -> None:
    parser = build_parser()
    args = ["--role", "d", "--zone", "rack-1", "--kv-bytes-per-token", "131072"]
    opts = options_from_args(parser.parse_args([*args, "--kv-gbps-cross-zone", "25"]))
    assert (opts.zone, opts.kv_bytes_per_token) == ("rack-1", 131072)
    assert (opts.kv_gbps_same_zone, opts.kv_gbps_cross_zone) == (100.0, 25.0)
    default = options_from_args(parser.parse_args([]))
    assert (default.zone, default.kv_bytes_per_token) == (None, 0)
    for bad in (
        ["--kv-bytes-per-token", "-1"],
        ["--kv-gbps-same-zone", "0"],
        ["--kv-gbps-cross-zone", "nan"],
        ["--zone", ""],
        ["--zone", "a b"],
    ):
        with pytest.raises(ValueError):
            options_from_args(parser.parse_args(bad))
