"""Disaggregated simulator roles over real HTTP, driven the way the gateway will drive them: vLLM
NIXL (prefill leg with ``kv_transfer_params``, then the decode leg with P's params copied in),
vLLM P2P NCCL (a pair id in ``X-Request-Id`` on both legs), vLLM LMCache (prefill, then the
unmodified body), SGLang bootstrap (both legs at once), and vLLM EPD (encode legs, then P/D or
PD). Every route must produce the merged worker's exact text, and every broken hand-off must
fail loudly."""

from __future__ import annotations

import copy
import math
import secrets
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import RawResponse, http_request

from lmgw.simulators import Fleet, SimWorker, WorkerOptions, run_fleet, serve_worker_inprocess
from lmgw.simulators.disagg import EC_FILE_NAME, KV_BLOCK_BYTES

MODEL = "sim-model"
LONG = "Summarise the history of the Roman empire in a few short sentences, please. " * 4
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 20}
COMPLETION = {"model": MODEL, "prompt": LONG, "max_tokens": 12, "seed": 7}
IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4"
MM_CHAT = {
    "model": MODEL,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": IMAGE}},
            ],
        }
    ],
    "max_tokens": 16,
}
NIXL_PREFILL = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


async def http(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> RawResponse:
    return await http_request(url, "POST", path, body, headers)


async def start(nursery: trio.Nursery, role: str, **options: Any) -> tuple[SimWorker, str]:
    options.setdefault("speed", math.inf)
    worker = SimWorker(WorkerOptions(role=role, model=MODEL, **options))
    return worker, await nursery.start(serve_worker_inprocess, worker)


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The toy proxy's prefill leg (PROTOCOLS.md §2.2)."""
    out = {
        k: v for k, v in copy.deepcopy(body).items() if k not in ("stream_options", "min_tokens")
    }
    out.update(kv_transfer_params=dict(NIXL_PREFILL), stream=False, max_tokens=1)
    return out


async def nixl(p_url: str, d_url: str, path: str, body: dict[str, Any]) -> RawResponse:
    """Prefill leg, then the original body plus P's kv_transfer_params to D."""
    pre = await http(p_url, path, prefill_body(body), {"x-request-id": "nixl-1"})
    assert pre.status == 200, pre.body
    params = pre.json()["kv_transfer_params"]
    return await http(d_url, path, {**body, "kv_transfer_params": params})


def text_of(r: RawResponse) -> str:
    if r.headers["content-type"].startswith("text/event-stream"):
        parts = []
        for e in r.events()[:-1]:
            for c in e["choices"]:
                parts.append(c["delta"].get("content", "") if "delta" in c else c["text"])
        return "".join(parts)
    (choice,) = r.json()["choices"]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def error_of(r: RawResponse, status: int) -> str:
    assert r.status == status, (r.status, r.body)
    err = r.json()["error"]
    assert err["code"] == status
    return err["message"]


@pytest.fixture
async def pd_url(nursery: trio.Nursery) -> str:
    return (await start(nursery, "pd"))[1]


# -- vLLM NIXL P/D --------------------------------------------------------------------------------


async def test_nixl_prefill_returns_params_and_decode_matches_pd(
    nursery: trio.Nursery, pd_url: str
) -> None:
    p, p_url = await start(nursery, "p", engine_id="prefill-0")
    _, d_url = await start(nursery, "d")
    pre = await http(p_url, "/v1/chat/completions", prefill_body(CHAT), {"x-request-id": "r1"})
    body = pre.json()
    assert body["usage"]["completion_tokens"] == 1
    assert body["choices"][0]["finish_reason"] == "length"
    params = body["kv_transfer_params"]
    prompt_tokens = body["usage"]["prompt_tokens"]
    nblocks = prompt_tokens // 16
    assert params == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "prefill-0",
        "remote_block_ids": params["remote_block_ids"],
        "remote_host": "127.0.0.1",
        "remote_port": int(p_url.rsplit(":", 1)[1]),
        "remote_request_id": params["remote_request_id"],
        "tp_size": 1,
    }
    assert len(params["remote_block_ids"]) == nblocks > 0
    assert params["remote_request_id"].startswith("r1-")
    assert len(p.kv_store) == 1

    dec = await http(d_url, "/v1/chat/completions", {**CHAT, "kv_transfer_params": params})
    ref = await http(pd_url, "/v1/chat/completions", CHAT)
    assert dec.status == 200 and text_of(dec) == text_of(ref)
    usage = dec.json()["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // 16 * 16
    assert dec.json()["kv_transfer_params"] is None
    assert len(p.kv_store) == 0  # released once fetched

    p_stats = (await http_request(p_url, "GET", "/sim/stats")).json()["handoff"]
    d_stats = (await http_request(d_url, "GET", "/sim/stats")).json()["handoff"]
    assert p_stats["kv_blocks_served"] == nblocks and p_stats["kv_entries_held"] == 0
    assert d_stats["kv_blocks_fetched"] == d_stats["kv_blocks_verified"] == nblocks
    metrics = (await http_request(d_url, "GET", "/metrics")).body.decode()
    assert f'lmgw_sim:kv_blocks_verified_total{{model_name="{MODEL}",engine="0"}} {nblocks}.0' in (
        metrics
    )

    # The same hand-off replayed: P released the blocks, so D must fail, not generate.
    again = await http(d_url, "/v1/chat/completions", {**CHAT, "kv_transfer_params": params})
    assert "holds no KV" in error_of(again, 500)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_nixl_stream_decode_matches_pd_stream(
    nursery: trio.Nursery, pd_url: str, path: str
) -> None:
    _, p_url = await start(nursery, "p")
    _, d_url = await start(nursery, "d")
    base = CHAT if path.endswith("chat/completions") else COMPLETION
    body = {**base, "stream": True, "stream_options": {"include_usage": True}}
    dec = await nixl(p_url, d_url, path, body)
    ref = await http(pd_url, path, body)
    assert dec.status == 200 and text_of(dec) == text_of(ref) != ""
    usage = dec.events()[-2]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert usage["completion_tokens"] == ref.events()[-2]["usage"]["completion_tokens"]


async def test_corrupted_or_misrouted_kv_fails_the_decode(nursery: trio.Nursery) -> None:
    p, p_url = await start(nursery, "p", engine_id="pe")
    _, d_url = await start(nursery, "d")
    path = "/v1/chat/completions"

    async def params_for(body: dict[str, Any]) -> dict[str, Any]:
        return (await http(p_url, path, prefill_body(body))).json()["kv_transfer_params"]

    # A flipped byte in P's memory.
    params = await params_for(CHAT)
    entry = p.kv_store.get(params["remote_request_id"], trio.current_time())
    assert entry is not None
    bid = params["remote_block_ids"][1]
    entry.payloads[bid] = bytes(KV_BLOCK_BYTES)
    r = await http(d_url, path, {**CHAT, "kv_transfer_params": params})
    assert "block 1 of" in error_of(r, 500) and "verification" in error_of(r, 500)

    # Block ids in the wrong order.
    params = await params_for(CHAT)
    params["remote_block_ids"] = params["remote_block_ids"][::-1]
    assert "block 0 of" in error_of(
        await http(d_url, path, {**CHAT, "kv_transfer_params": params}), 500
    )

    # The hand-off of another prompt.
    params = await params_for({**CHAT, "messages": [{"role": "user", "content": LONG + "!"}]})
    msg = error_of(await http(d_url, path, {**CHAT, "kv_transfer_params": params}), 500)
    assert "different prompt" in msg

    # Params that point at the right port but claim another engine.
    params = {**(await params_for(CHAT)), "remote_engine_id": "someone-else"}
    msg = error_of(await http(d_url, path, {**CHAT, "kv_transfer_params": params}), 500)
    assert "'pe'" in msg and "someone-else" in msg

    # Unknown block ids.
    params = await params_for(CHAT)
    params["remote_block_ids"] = [10**9]
    assert "not held" in error_of(
        await http(d_url, path, {**CHAT, "kv_transfer_params": params}), 500
    )
    d_stats = (await http_request(d_url, "GET", "/sim/stats")).json()["handoff"]
    assert d_stats["kv_verify_failures"] == 4 and d_stats["kv_fetch_failures"] == 1


async def test_missing_or_unreachable_handoff_fails_the_decode(nursery: trio.Nursery) -> None:
    _, p_url = await start(nursery, "p")
    _, d_url = await start(nursery, "d", kv_fetch_timeout_s=2.0)
    path = "/v1/chat/completions"
    assert "decode-only" in error_of(await http(d_url, path, CHAT), 400)
    bad = {**CHAT, "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "127.0.0.1"}}
    assert "remote_port" in error_of(await http(d_url, path, bad), 400)

    params = (await http(p_url, path, prefill_body(CHAT))).json()["kv_transfer_params"]
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gone = {**params, "remote_port": dead_port}
    msg = error_of(await http(d_url, path, {**CHAT, "kv_transfer_params": gone}), 500)
    assert f"127.0.0.1:{dead_port}" in msg and "cannot connect" in msg
    ghost = {**params, "remote_request_id": "never-published"}
    msg = error_of(await http(d_url, path, {**CHAT, "kv_transfer_params": ghost}), 500)
    assert "never-published" in msg and "holds no KV" in msg
    # Batched prompts cannot share one hand-off.
    batch = {**COMPLETION, "prompt": [LONG, LONG], "kv_transfer_params": params}
    assert "one prompt" in error_of(await http(d_url, "/v1/completions", batch), 400)


async def test_prefill_without_handoff_fields_serves_like_pd(
    nursery: trio.Nursery, pd_url: str
) -> None:
    p, p_url = await start(nursery, "p")
    r = await http(p_url, "/v1/chat/completions", CHAT)
    assert r.json()["kv_transfer_params"] is None and len(p.kv_store) == 0
    assert text_of(r) == text_of(await http(pd_url, "/v1/chat/completions", CHAT))


async def test_kv_ttl_releases_unfetched_blocks(nursery: trio.Nursery) -> None:
    p, p_url = await start(nursery, "p", kv_ttl_s=0.05)
    _, d_url = await start(nursery, "d")
    pre = await http(p_url, "/v1/completions", prefill_body(COMPLETION))
    params = pre.json()["kv_transfer_params"]
    await trio.sleep(0.1)
    r = await http(d_url, "/v1/completions", {**COMPLETION, "kv_transfer_params": params})
    assert "expired after 0.05 s" in error_of(r, 500)
    assert p.kv_store.expired == 1


# -- vLLM P2P NCCL --------------------------------------------------------------------------------


def pair_id(prefill: SimWorker, decode: SimWorker | str) -> str:
    """The id the gateway writes (PROTOCOLS.md §2.3), with the workers' KV addresses."""
    d_addr = decode if isinstance(decode, str) else decode.kv_address
    return f"___prefill_addr_{prefill.kv_address}___decode_addr_{d_addr}_{secrets.token_hex(16)}"


def p2p_prefill(body: dict[str, Any]) -> dict[str, Any]:
    """The P2P NCCL / LMCache proxies' prefill leg: the body with max_tokens=1, not streamed."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out.update(stream=False, max_tokens=1)
    return out


async def test_p2pnccl_pair_id_hands_kv_to_the_named_decode(
    nursery: trio.Nursery, pd_url: str
) -> None:
    p, p_url = await start(nursery, "p", kv_port=0)
    d, d_url = await start(nursery, "d", kv_port=0)
    assert p.kv_bound_port not in (None, p.bound_port)
    stats = (await http_request(p_url, "GET", "/sim/stats")).json()
    assert stats["kv_address"] == p.kv_address == f"127.0.0.1:{p.kv_bound_port}"
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        for stream in (False, True):
            body = {**base, "stream": stream}
            rid = pair_id(p, d)
            pre = await http(p_url, path, p2p_prefill(body), {"x-request-id": rid})
            assert pre.status == 200, pre.body
            assert len(p.kv_store) == 1  # published under the pair id, waiting for D
            dec = await http(d_url, path, body, {"x-request-id": rid})
            ref = await http(pd_url, path, body)
            assert dec.status == 200, dec.body
            assert text_of(dec) == text_of(ref) != ""
            assert len(p.kv_store) == 0  # D pulled it from P's KV port
    d_stats = (await http_request(d_url, "GET", "/sim/stats")).json()["handoff"]
    assert d_stats["p2p_received"] == 4 and d_stats["kv_blocks_verified"] > 0
    assert d_stats["kv_blocks_verified"] == d_stats["kv_blocks_fetched"]
    assert p.snapshot()["handoff"]["p2p_published"] == 4


async def test_p2pnccl_misrouted_or_mismatched_pair_fails(nursery: trio.Nursery) -> None:
    p, p_url = await start(nursery, "p", kv_port=0)
    d1, d1_url = await start(nursery, "d", kv_port=0)
    d2, d2_url = await start(nursery, "d", kv_port=0, bootstrap_timeout_s=0.2)
    _, plain_d_url = await start(nursery, "d")
    path = "/v1/chat/completions"

    # D's leg sent to a decode worker the id does not name: the gateway's bug, caught by D.
    rid = pair_id(p, d2)
    assert (await http(p_url, path, p2p_prefill(CHAT), {"x-request-id": rid})).status == 200
    msg = error_of(await http(d1_url, path, CHAT, {"x-request-id": rid}), 500)
    assert f"KV was pushed to {d2.kv_address}, this worker is {d1.kv_address}" in msg
    assert "without a KV address" in error_of(
        await http(plain_d_url, path, CHAT, {"x-request-id": rid}), 500
    )
    assert len(p.kv_store) == 1  # not taken by the wrong worker: the named one still gets it
    assert (await http(d2_url, path, CHAT, {"x-request-id": rid})).status == 200
    assert d1.snapshot()["handoff"]["p2p_misrouted"] == 1

    # P's leg sent to a prefill worker the id does not name.
    wrong = pair_id(d2, d1)  # d2's address in the prefill slot
    msg = error_of(await http(p_url, path, p2p_prefill(CHAT), {"x-request-id": wrong}), 500)
    assert f"names prefill {d2.kv_address}" in msg and str(p.kv_address) in msg
    assert len(p.kv_store) == 0

    # The same pair id on two different prompts: D's verification names it.
    rid = pair_id(p, d1)
    other = {**CHAT, "messages": [{"role": "user", "content": LONG + "!"}]}
    assert (await http(p_url, path, p2p_prefill(other), {"x-request-id": rid})).status == 200
    msg = error_of(await http(d1_url, path, CHAT, {"x-request-id": rid}), 500)
    assert "failed verification" in msg and "different prompt" in msg
    assert d1.snapshot()["handoff"]["kv_verify_failures"] == 1

    # A decode leg whose prefill never ran: a bounded wait, then a 500 naming the key.
    rid = pair_id(p, d2)
    with trio.fail_after(5):
        msg = error_of(await http(d2_url, path, CHAT, {"x-request-id": rid}), 500)
    assert "holds no KV" in msg and rid in msg

    # Without a pair id (or any other hand-off) a decode worker still refuses.
    r = await http(d1_url, path, CHAT, {"x-request-id": "___prefill_addr_x:1___decode_addr_y"})
    assert "decode-only" in error_of(r, 400)


# -- vLLM LMCache ---------------------------------------------------------------------------------


async def test_lmcache_prefill_then_decode_matches_pd(
    nursery: trio.Nursery, tmp_path: Path, pd_url: str
) -> None:
    lm = {"kv_connector": "lmcache", "lmcache_dir": str(tmp_path), "lmcache_chunk_size": 32}
    p, p_url = await start(nursery, "p", **lm)
    d, d_url = await start(nursery, "d", **lm)
    path = "/v1/chat/completions"

    # The decode leg before the prefill leg: strict on purpose (real LMCache would recompute).
    msg = error_of(await http(d_url, path, CHAT), 500)
    assert "prefill leg did not run first" in msg and str(tmp_path) in msg

    pre = await http(p_url, path, p2p_prefill(CHAT))
    assert pre.status == 200 and pre.json()["usage"]["completion_tokens"] == 1
    prompt_tokens = pre.json()["usage"]["prompt_tokens"]
    nchunks = -(-prompt_tokens // 32)
    assert len(list(tmp_path.glob("*.kv"))) == nchunks > 1
    for stream in (False, True):
        body = {**CHAT, "stream": stream, "stream_options": {"include_usage": True}}
        if not stream:
            del body["stream_options"]
        dec = await http(d_url, path, body)
        ref = await http(pd_url, path, body)
        assert dec.status == 200 and text_of(dec) == text_of(ref)
        usage = dec.events()[-2]["usage"] if stream else dec.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
    h = d.snapshot()["handoff"]
    assert (h["lmcache_hits"], h["lmcache_misses"]) == (2, 1)
    assert h["lmcache_hit_tokens"] == 2 * prompt_tokens
    assert p.snapshot()["handoff"]["lmcache_chunks_stored"] == nchunks
    metrics = (await http_request(d_url, "GET", "/metrics")).body.decode()
    assert f'lmgw_sim:lmcache_hits_total{{model_name="{MODEL}",engine="0"}} 2.0' in metrics
    assert f'lmgw_sim:lmcache_misses_total{{model_name="{MODEL}",engine="0"}} 1.0' in metrics

    # Another prompt sharing only a prefix: a partial hit is still a missing prefill.
    longer = {**CHAT, "messages": [{"role": "user", "content": LONG + " And Carthage?"}]}
    assert "did not run first" in error_of(await http(d_url, path, longer), 500)

    # A corrupted chunk fails verification instead of producing text.
    victim = sorted(tmp_path.glob("*.kv"))[0]
    victim.write_bytes(bytes(len(victim.read_bytes())))
    msg = error_of(await http(d_url, path, CHAT), 500)
    assert "failed verification" in msg and "corrupted" in msg
    assert d.snapshot()["handoff"]["kv_verify_failures"] == 1


async def test_lmcache_not_strict_recomputes_like_real_lmcache(
    nursery: trio.Nursery, tmp_path: Path, pd_url: str
) -> None:
    lm = {"kv_connector": "lmcache", "lmcache_dir": str(tmp_path), "lmcache_strict": False}
    d, d_url = await start(nursery, "d", **lm)
    dec = await http(d_url, "/v1/chat/completions", CHAT)
    ref = await http(pd_url, "/v1/chat/completions", CHAT)
    assert dec.status == 200 and text_of(dec) == text_of(ref)
    assert dec.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert d.snapshot()["handoff"]["lmcache_misses"] == 1
    with pytest.raises(ValueError, match="lmcache_dir"):
        SimWorker(WorkerOptions(role="p", kv_connector="lmcache"))


# -- SGLang bootstrap -----------------------------------------------------------------------------


async def test_sglang_concurrent_legs(nursery: trio.Nursery, pd_url: str) -> None:
    p, p_url = await start(nursery, "p", speed=20.0)
    _, d_url = await start(nursery, "d")
    port = int(p_url.rsplit(":", 1)[1])
    for room, stream in ((12345, False), (2**63 - 1, True)):
        body = {
            **CHAT,
            "stream": stream,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": port,
            "bootstrap_room": room,
        }
        results: dict[str, RawResponse] = {}

        async def leg(
            name: str, url: str, body: dict[str, Any] = body, out: dict[str, RawResponse] = results
        ) -> None:
            out[name] = await http(url, "/v1/chat/completions", body)

        with trio.fail_after(10):
            async with trio.open_nursery() as legs:
                legs.start_soon(leg, "d", d_url)
                if room == 12345:  # make sure D is parked on the room before P even starts
                    while f"room-{room}" not in p._kv_waiters:
                        await trio.sleep(0.001)
                legs.start_soon(leg, "p", p_url)
        ref = await http(pd_url, "/v1/chat/completions", {**CHAT, "stream": stream})
        assert results["d"].status == 200 and text_of(results["d"]) == text_of(ref)
        assert results["p"].status == 200
        p_text = text_of(results["p"])
        assert p_text and text_of(ref).startswith(p_text)  # P stops after its first token


async def test_sglang_room_never_published_times_out(nursery: trio.Nursery) -> None:
    _, p_url = await start(nursery, "p")
    _, d_url = await start(nursery, "d", bootstrap_timeout_s=0.2)
    body = {
        **CHAT,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": int(p_url.rsplit(":", 1)[1]),
        "bootstrap_room": 99,
    }
    with trio.fail_after(5):
        msg = error_of(await http(d_url, "/v1/chat/completions", body), 500)
    assert "bootstrap_room 99" in msg and "holds no KV for 'room-99'" in msg
    no_port = {**body, "bootstrap_port": None}
    assert "bootstrap_port" in error_of(await http(d_url, "/v1/chat/completions", no_port), 400)


# -- vLLM EPD -------------------------------------------------------------------------------------


async def test_encode_then_prefill_decode_or_pd(
    nursery: trio.Nursery, tmp_path: Path, pd_url: str
) -> None:
    ec = str(tmp_path)
    e, e_url = await start(nursery, "e", ec_dir=ec)
    p, p_url = await start(nursery, "p", ec_dir=ec)
    _, d_url = await start(nursery, "d")
    _, pd_ec_url = await start(nursery, "pd", ec_dir=ec)
    path = "/v1/chat/completions"

    # Before the encode leg, consumers of the shared directory refuse the request.
    msg = error_of(await http(p_url, path, prefill_body(MM_CHAT)), 500)
    assert "no encoder output for image item" in msg and ec in msg
    assert "no encoder output" in error_of(await http(pd_ec_url, path, MM_CHAT), 500)

    # The encode leg, as disagg_epd_proxy.py sends it: one item, max_tokens 1.
    item = MM_CHAT["messages"][0]["content"][1]
    enc_body = {"model": MODEL, "messages": [{"role": "user", "content": [item]}], "max_tokens": 1}
    enc = await http(e_url, path, enc_body, {"x-request-id": "req:0:abcdef"})
    assert enc.status == 200 and enc.json()["usage"]["completion_tokens"] == 1
    (stored,) = list(tmp_path.iterdir())
    assert (stored / EC_FILE_NAME).stat().st_size > 0
    assert e.snapshot()["handoff"]["embeddings_stored"] == 1

    ref = text_of(await http(pd_url, path, MM_CHAT))  # PD without --ec-dir: as before
    assert text_of(await nixl(p_url, d_url, path, MM_CHAT)) == ref  # E -> P -> D
    assert text_of(await http(pd_ec_url, path, MM_CHAT)) == ref  # E -> PD
    assert p.snapshot()["handoff"]["embeddings_found"] == 1

    # An encoder takes exactly one item.
    two = {**MM_CHAT, "messages": [{"role": "user", "content": [item, item]}]}
    assert "exactly one media item" in error_of(await http(e_url, path, two), 400)
    assert "exactly one media item" in error_of(await http(e_url, path, CHAT), 400)

    # A corrupted file is caught too.
    (stored / EC_FILE_NAME).write_bytes(b"garbage")
    assert "corrupted" in error_of(await http(pd_ec_url, path, MM_CHAT), 500)


# -- processes ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_process_fleet_e_p_d() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"e": 1, "p": 1, "d": 1}, model=MODEL, speed=math.inf, task_status=task_status
                )
            )
            assert [r for r, _ in fleet] == ["e", "p", "d"]
            ec_dir = fleet.ec_dir
            assert ec_dir is not None and Path(ec_dir).is_dir()
            (e_url,), (p_url,), (d_url,) = fleet.urls("e"), fleet.urls("p"), fleet.urls("d")
            item = MM_CHAT["messages"][0]["content"][1]
            enc = {
                "model": MODEL,
                "messages": [{"role": "user", "content": [item]}],
                "max_tokens": 1,
            }
            assert (await http(e_url, "/v1/chat/completions", enc)).status == 200
            dec = await nixl(p_url, d_url, "/v1/chat/completions", {**MM_CHAT, "stream": True})
            assert dec.status == 200 and text_of(dec)
            stats = (await http_request(d_url, "GET", "/sim/stats")).json()
            assert stats["role"] == "d" and stats["handoff"]["kv_blocks_verified"] > 0
            nursery.cancel_scope.cancel()
    assert not Path(ec_dir).exists()  # run_fleet removed its shared directory
