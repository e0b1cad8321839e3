"""The disaggregated pipeline against scripted fake workers: what each leg carries, in what
order, and what the client gets when a stage fails. (Simulated E/P/D workers test the same
flows with real KV bytes elsewhere; these pin down the gateway's side exactly.)"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import http_request, metric_value

from lmgw.config import (
    DiscoveryConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.http.server import serve_http
from lmgw.http.types import Request, Responder
from lmgw.multimodal.limits import MediaLimits

MODEL = "m"
EXPRESS = "lmgw_express_requests_total"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
JSON = [(b"content-type", b"application/json")]
KV = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "engine-p0",
    "remote_block_ids": [3, 4, 5],
    "remote_host": "10.1.2.3",
    "remote_port": 5600,
    "remote_request_id": "rr-1",
    "tp_size": 1,
    "future_key": {"nested": [1, 2]},  # unknown to the gateway: must reach D untouched
}


def completion(text: str, **extra: Any) -> dict:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        **extra,
    }


class Fake:
    """A scripted worker: records every generation request; ``answer(body)`` decides."""

    def __init__(self, name: str, answer: Callable[[dict], tuple[int, Any]]) -> None:
        self.name = name
        self.answer = answer
        self.seen: list[dict] = []
        self.headers: list[dict] = []
        self.url = ""
        self.delay = 0.0  #: seconds before each generation answer
        self.event_gap = 0.0  #: seconds between the SSE events of an answer
        #: awaited with the request's body before answering (an SGLang decode worker answers
        #: only once its prefill worker has the request: the KV comes from there)
        self.after: Callable[[dict], Awaitable[None]] | None = None
        self.kv_address: str | None = None  #: P2P NCCL "ip:kv_port" (set by start())

    async def __call__(self, req: Request, responder: Responder) -> None:
        if req.method == "GET":  # health probes and model discovery
            body = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            await responder.send_full(200, JSON, msgspec.json.encode(body))
            return
        obj = msgspec.json.decode(req.body)
        self.seen.append(obj)
        self.headers.append({k.decode(): v.decode() for k, v in req.headers})
        await trio.sleep(self.delay)
        if self.after is not None:
            await self.after(obj)
        status, payload = self.answer(obj)
        if isinstance(payload, tuple):  # a JSON body written in pieces (chunked, split)
            await responder.start(status, JSON)
            for i, piece in enumerate(payload):
                if i:
                    await trio.sleep(0.02)
                await responder.send(piece)
            await responder.end()
        elif isinstance(payload, list):  # SSE events
            await responder.start(status, [(b"content-type", b"text/event-stream")])
            for i, ev in enumerate(payload):
                if i and self.event_gap:
                    await trio.sleep(self.event_gap)
                await responder.send(
                    b"data: " + (ev if isinstance(ev, bytes) else msgspec.json.encode(ev)) + b"\n\n"
                )
            await responder.end()
        else:
            await responder.send_full(status, JSON, msgspec.json.encode(payload))


def room_of(prefill: Fake) -> Callable[[dict], Awaitable[None]]:
    """A decode Fake's ``after`` for SGLang: wait until ``prefill`` has seen the body's room."""

    async def after(obj: dict) -> None:
        with trio.fail_after(5):
            while not any(b.get("bootstrap_room") == obj["bootstrap_room"] for b in prefill.seen):
                await trio.sleep(0.002)

    return after


def decode_answer(obj: dict) -> tuple[int, Any]:
    if "kv_transfer_params" not in obj:
        return 400, {
            "error": {"message": "decode without kv_transfer_params", "type": "BadRequestError"}
        }
    if obj.get("stream"):
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "decoded"}}],
        }
        return 200, [chunk, b"[DONE]"]
    return 200, completion("decoded")


async def start(nursery: trio.Nursery, fake: Fake) -> Fake:
    port = await nursery.start(serve_http, fake, "127.0.0.1", 0)
    fake.url = f"http://127.0.0.1:{port}"
    fake.kv_address = f"127.0.0.1:{port}"
    return fake


async def gateway_for(
    nursery: trio.Nursery,
    flow: str,
    dialect: str,
    workers: list[tuple[str, Fake]],
    media: MediaLimits | None = None,
    *,
    express: bool = True,
    response_timeout_s: float = 600.0,
    routing: RoutingConfig | None = None,
    zones: dict[str, str] | None = None,
    compiled: bool = True,
    request_timeout_s: float = 600.0,
) -> str:
    """A gateway in front of ``workers``; ``express``: upstream.express_lane (plain
    non-streamed P/D requests in sequential dialects take it); ``zones``: by worker name;
    ``compiled``: server.compiled_lane."""
    cfg = GatewayConfig(
        server=ServerConfig(port=0, compiled_lane=compiled),
        health=HealthConfig(interval_s=30),
        media=media or MediaLimits(),
        upstream=UpstreamConfig(express_lane=express, response_timeout_s=response_timeout_s),
        limits=LimitsConfig(request_timeout_s=request_timeout_s),
        routing=routing or RoutingConfig(),
        models=[ModelConfig(name=MODEL, flow=flow, dialect=dialect)],
        workers=[
            WorkerConfig(
                url=f.url,
                role=role,
                id=f.name,
                kv_address=f.kv_address,
                zone=(zones or {}).get(f.name),
            )
            for role, f in workers
        ],
    )
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    return f"http://127.0.0.1:{port}"


async def test_nixl_prefill_then_decode_with_handoff_untouched(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    d = await start(nursery, Fake("d0", decode_answer))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)])
    r = await http_request(
        url, "POST", "/v1/chat/completions", {**CHAT, "min_tokens": 2, "x_engine": 7}
    )
    assert r.status == 200, r.body
    assert r.json()["choices"][0]["message"]["content"] == "decoded"
    (pre,) = p.seen
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "min_tokens" not in pre
    assert pre["kv_transfer_params"] == {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None,
    }  # fmt: skip
    (dec,) = d.seen
    assert dec["kv_transfer_params"] == KV  # copied, unknown keys included
    assert dec["max_tokens"] == 5 and dec["min_tokens"] == 2 and dec["x_engine"] == 7
    assert p.headers[0]["x-request-id"] == d.headers[0]["x-request-id"]
    assert r.headers["server-timing"].startswith("prefill;dur=")
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert 'lmgw_stage_duration_seconds_count{role="p",worker="p0"} 1' in metrics


async def test_nixl_streamed_decode_is_relayed(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    d = await start(nursery, Fake("d0", decode_answer))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status == 200
    events = r.events()
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["content"] == "decoded"
    assert p.seen[0]["stream"] is False and d.seen[0]["stream"] is True


async def test_prefill_failure_names_the_stage_and_sends_no_decode(nursery: trio.Nursery) -> None:
    p = await start(
        nursery, Fake("p0", lambda b: (500, {"error": {"message": "CUDA out of memory"}}))
    )
    d = await start(nursery, Fake("d0", decode_answer))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 502
    err = r.json()["error"]
    assert "prefill stage failed" in err["message"] and "CUDA out of memory" in err["message"]
    assert d.seen == []  # a decode leg is never sent without the prefill's hand-off


async def test_nixl_decode_that_answered_an_error_is_retried_with_a_fresh_pair(
    nursery: trio.Nursery,
) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    bad = await start(
        nursery, Fake("d-bad", lambda b: (500, {"error": {"message": "KV fetch failed"}}))
    )
    good = await start(nursery, Fake("d-good", decode_answer))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", bad), ("d", good)])
    for _ in range(2):  # round robin starts on either decode worker
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
    # the failed decode may have pulled the blocks (P frees them once read): a fresh pair,
    # never the same hand-off again
    assert len(bad.seen) >= 1 and len(p.seen) == 2 + len(bad.seen)
    assert all(s["kv_transfer_params"] == KV for s in bad.seen + good.seen)
    assert len(good.seen) == 2


async def test_lmcache_decode_gets_the_unmodified_body(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x"))))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("plain"))))
    url = await gateway_for(nursery, "p/d", "vllm-lmcache", [("p", p), ("d", d)])
    body = {**CHAT, "x_extra": [1]}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "plain"
    assert p.seen[0]["max_tokens"] == 1
    assert d.seen[0] == body


async def test_sglang_legs_share_a_bootstrap_room(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x"))))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("sg"))))
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "sg"
    (pre,), (dec,) = p.seen, d.seen
    assert pre == dec  # the same body to both legs
    assert pre["bootstrap_host"] == "127.0.0.1"
    assert 0 <= pre["bootstrap_room"] < 2**63
    # none configured, and the worker's /get_server_info names none: null, SGLang's default
    assert pre["bootstrap_port"] is None


def sgl_generate(text: str, logprobs: list) -> dict:
    """An SGLang ``/generate`` answer with its input logprobs ([logprob, token id, text])."""
    return {"text": text, "meta_info": {"id": "r1", "input_token_logprobs": logprobs}}


P_LOGPROBS = [[None, 1, None], [-1.5, 2, None]]
D_LOGPROBS = [[-0.25, 3, None]]
GEN = {"text": "hello", "sampling_params": {"max_new_tokens": 4}, "return_logprob": True}


async def test_sglang_return_logprob_puts_prefill_logprobs_first(nursery: trio.Nursery) -> None:
    """D answers long before P: its answer is held until P's logprobs can go in front."""
    p = await start(nursery, Fake("p0", lambda b: (200, sgl_generate("", P_LOGPROBS))))
    p.delay = 0.2
    d = await start(nursery, Fake("d0", lambda b: (200, sgl_generate("sg", D_LOGPROBS))))
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/generate", GEN)
    assert r.status == 200, r.body
    out = r.json()
    assert out["text"] == "sg"
    assert out["meta_info"]["input_token_logprobs"] == P_LOGPROBS + D_LOGPROBS
    assert p.seen[0]["bootstrap_room"] == d.seen[0]["bootstrap_room"]


async def test_sglang_return_logprob_merges_into_the_stream(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, sgl_generate("", P_LOGPROBS))))
    p.delay = 0.1
    events = [sgl_generate("s", D_LOGPROBS), sgl_generate("sg", D_LOGPROBS), b"[DONE]"]
    d = await start(nursery, Fake("d0", lambda b: (200, events)))
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/generate", {**GEN, "stream": True})
    assert r.status == 200, r.body
    data = [ln[6:] for ln in r.body.split(b"\n") if ln.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    got = [msgspec.json.decode(x) for x in data[:-1]]
    assert [g["text"] for g in got] == ["s", "sg"]
    for g in got:
        assert g["meta_info"]["input_token_logprobs"] == P_LOGPROBS + D_LOGPROBS


async def test_sglang_without_return_logprob_relays_decode_untouched(
    nursery: trio.Nursery,
) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, sgl_generate("", P_LOGPROBS))))
    d = await start(nursery, Fake("d0", lambda b: (200, sgl_generate("sg", D_LOGPROBS))))
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/generate", {**GEN, "return_logprob": False})
    assert r.json()["meta_info"]["input_token_logprobs"] == D_LOGPROBS


async def test_sglang_generate_without_input_is_a_400(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, sgl_generate("", P_LOGPROBS))))
    d = await start(nursery, Fake("d0", lambda b: (200, sgl_generate("sg", D_LOGPROBS))))
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/generate", {"sampling_params": {}})
    assert r.status == 400 and "input_ids" in r.json()["error"]["message"]
    assert not p.seen and not d.seen


@pytest.mark.parametrize("dialect", ["vllm-nixl", "vllm-p2pnccl", "vllm-lmcache"])
async def test_generate_on_a_vllm_pair_is_a_400_before_any_leg(
    nursery: trio.Nursery, dialect: str
) -> None:
    """SGLang's native /generate on vLLM workers: vLLM serves no such route, so relaying it
    would end in a prefill 404 or a decode that refuses a request without a hand-off."""
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x"))))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("y"))))
    url = await gateway_for(nursery, "p/d", dialect, [("p", p), ("d", d)])
    for body in (GEN, {**GEN, "stream": True}, {**GEN, "return_logprob": False}):
        r = await http_request(url, "POST", "/generate", body)
        assert r.status == 400, r.body
        assert "/generate is SGLang's native API" in r.json()["error"]["message"]
    assert not p.seen and not d.seen


async def test_stage_metrics_per_role_and_worker(nursery: trio.Nursery) -> None:
    """Prefill duration, decode time to first token and time per output token, by worker."""
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "t"}}],
    }
    d = await start(nursery, Fake("d0", lambda b: (200, [chunk, chunk, chunk, b"[DONE]"])))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)])
    r = await http_request(url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status == 200
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    for line in (
        'lmgw_stage_duration_seconds_count{role="p",worker="p0"} 1',
        'lmgw_stage_duration_seconds_count{role="d",worker="d0"} 1',
        'lmgw_stage_time_to_first_token_seconds_count{role="d",worker="d0"} 1',
        'lmgw_stage_time_per_output_token_seconds_count{role="d",worker="d0"} 1',
    ):
        assert line in text, line
    assert 'lmgw_stage_time_to_first_token_seconds_count{role="p"' not in text


IMAGE2 = {
    "type": "image_url",
    "image_url": {
        "url": "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGMUabJhYGBgYmBgYGBgAAAJ2gDWk0BfggAAAABJRU5ErkJggg=="
    },
}
IMAGE = {
    "type": "image_url",
    "image_url": {
        "url": "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="
    },
}


@pytest.mark.parametrize("flow", ["e+p+d", "e+pd"])
async def test_epd_encodes_each_media_item_then_runs_the_rest(
    nursery: trio.Nursery, flow: str
) -> None:
    e = await start(nursery, Fake("e0", lambda b: (200, completion("x"))))
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    d = await start(
        nursery, Fake("d0", decode_answer if flow == "e+p+d" else lambda b: (200, completion("pd")))
    )
    workers = [("e", e), ("p", p), ("d", d)] if flow == "e+p+d" else [("e", e), ("pd", d)]
    url = await gateway_for(nursery, flow, "vllm-epd", workers)
    content = [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE2, IMAGE]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert len(e.seen) == 2  # one encoder request per distinct media item
    uuids = set()
    for leg in e.seen:
        ((part,),) = [m["content"] for m in leg["messages"]]
        assert {k: v for k, v in part.items() if k != "uuid"} in (IMAGE, IMAGE2)
        assert len(part["uuid"]) == 64 and leg["max_tokens"] == 1  # pinned by content hash
        uuids.add(part["uuid"])
    last = d.seen[0]
    sent = last["messages"][0]["content"]  # the client's content, each item pinned by its uuid
    assert [{k: v for k, v in p.items() if k != "uuid"} for p in sent] == content
    assert {p.get("uuid") for p in sent[1:]} == uuids and sent[1]["uuid"] == sent[3]["uuid"]
    stages = [t.split(";")[0] for t in r.headers["server-timing"].split(", ")]
    assert stages == ["encode", "encode"] + (["prefill"] if flow == "e+p+d" else [])
    # no media: the E stage is skipped
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200 and len(e.seen) == 2
    # the same items again: in the encoder cache, so no encoder leg at all
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and len(e.seen) == 2
    assert "encode" not in r.headers.get("server-timing", "")
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert 'lmgw_encoder_cache_hits_total{model="m"} 2' in text


def media_body(*parts: dict) -> dict:
    return {
        **CHAT,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}],
    }


async def test_bad_media_is_a_400_naming_the_part_before_any_leg(nursery: trio.Nursery) -> None:
    e = await start(nursery, Fake("e0", lambda b: (200, completion("x"))))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("pd"))))
    url = await gateway_for(nursery, "e+pd", "vllm-epd", [("e", e), ("pd", d)])
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    r = await http_request(url, "POST", "/v1/chat/completions", media_body(IMAGE, broken))
    assert r.status == 400, r.body
    assert r.json()["error"]["param"].startswith("messages[0].content[2]")
    private = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/x.png"}}
    r = await http_request(url, "POST", "/v1/chat/completions", media_body(private))
    assert r.status == 400 and "messages[0].content[1]" in r.json()["error"]["param"]
    assert e.seen == [] and d.seen == []


async def test_media_preprocess_never_passes_media_unchecked(nursery: trio.Nursery) -> None:
    e = await start(nursery, Fake("e0", lambda b: (200, completion("x"))))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("pd"))))
    url = await gateway_for(
        nursery, "e+pd", "vllm-epd", [("e", e), ("pd", d)], MediaLimits(preprocess="never")
    )
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    r = await http_request(url, "POST", "/v1/chat/completions", media_body(broken))
    assert r.status == 200  # the encoder judges it (this fake accepts anything)
    assert d.seen[0]["messages"][0]["content"][1] == broken  # not pinned: forwarded as sent


async def test_an_item_goes_back_to_the_encoder_that_has_it(nursery: trio.Nursery) -> None:
    encoders = [
        await start(nursery, Fake(f"e{i}", lambda b: (200, completion("x")))) for i in range(3)
    ]
    d = await start(nursery, Fake("d0", lambda b: (200, completion("pd"))))
    url = await gateway_for(
        nursery, "e+pd", "vllm-epd", [*(("e", e) for e in encoders), ("pd", d)],
        MediaLimits(encoder_cache_ttl_s=0),  # encode every time: affinity alone decides
    )  # fmt: skip
    for _ in range(3):
        for image in (IMAGE, IMAGE2):
            r = await http_request(url, "POST", "/v1/chat/completions", media_body(image))
            assert r.status == 200
    by_uuid: dict[str, set[str]] = {}
    for e in encoders:
        for leg in e.seen:
            by_uuid.setdefault(leg["messages"][0]["content"][0]["uuid"], set()).add(e.name)
    assert len(by_uuid) == 2 and all(len(names) == 1 for names in by_uuid.values())
    assert sum(len(e.seen) for e in encoders) == 6


async def test_encoder_failure_is_a_502_naming_the_stage(nursery: trio.Nursery) -> None:
    e = await start(nursery, Fake("e0", lambda b: (500, {"error": {"message": "bad pixels"}})))
    d = await start(nursery, Fake("d0", lambda b: (200, completion("pd"))))
    url = await gateway_for(nursery, "e+pd", "vllm-epd", [("e", e), ("pd", d)])
    content = [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 502, r.body
    assert "encode stage failed" in r.json()["error"]["message"]
    assert "bad pixels" in r.json()["error"]["message"]
    assert d.seen == []  # no P/PD leg without every embedding


async def test_no_decode_worker_is_a_503_before_any_leg(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    cfg_workers = [("p", p)]
    url = await gateway_for(nursery, "p/d", "vllm-nixl", cfg_workers)
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 503 and "decode" in r.json()["error"]["message"]
    assert p.seen == []


async def test_flags_without_models_infer_the_flow_from_worker_roles(nursery: trio.Nursery) -> None:
    """`lmgw serve --worker p=URL --worker d=URL` (no --model): models the workers report go
    through P/D with vLLM's default dialect (NIXL); /health asks for both roles."""
    from lmgw.cli import build_parser
    from lmgw.config import config_from_args

    p = await start(nursery, Fake("p0", lambda b: (200, completion("x", kv_transfer_params=KV))))
    d = await start(nursery, Fake("d0", decode_answer))
    ns = build_parser().parse_args(
        ["serve", "--port", "0", "--worker", f"p={p.url}", "--worker", f"d={d.url}"]
    )
    gw = Gateway(config_from_args(ns, env={}))
    port = await nursery.start(gw.run)
    url = f"http://127.0.0.1:{port}"
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200, r.body
    assert d.seen[0]["kv_transfer_params"] == KV
    health = (await http_request(url, "GET", "/health")).json()
    assert health["models"][MODEL]["flow"] == "p/d"
    assert health["models"][MODEL]["routable_workers"] == {"prefill": 1, "decode": 1}


async def test_client_gone_during_prefill_sends_no_decode(nursery: trio.Nursery) -> None:
    """A client that leaves while P runs: P's connection is closed, D is never sent."""
    prefill_started = trio.Event()
    prefill_cancelled = trio.Event()

    class SlowPrefill(Fake):
        async def __call__(self, req: Request, responder: Responder) -> None:
            if req.method == "POST":
                prefill_started.set()
                try:
                    await trio.sleep(5)
                except trio.Cancelled:
                    prefill_cancelled.set()
                    raise
            await super().__call__(req, responder)

    p = await start(
        nursery, SlowPrefill("p0", lambda b: (200, completion("x", kv_transfer_params=KV)))
    )
    d = await start(nursery, Fake("d0", decode_answer))
    url = await gateway_for(nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)])
    host, port = url.rsplit("/", 1)[1].split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    body = msgspec.json.encode(CHAT)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    with trio.fail_after(5):
        await prefill_started.wait()
    await stream.aclose()
    with trio.fail_after(2):  # the gateway closes the prefill leg's connection
        await prefill_cancelled.wait()
    await trio.sleep(0.2)
    assert d.seen == []


# -- failure semantics, per dialect (docs/protocols.md) -----------------------------------------
PD_DIALECTS = ["vllm-nixl", "vllm-p2pnccl", "vllm-lmcache", "sglang-bootstrap"]
#: dialects whose hand-off survives a decode worker that answered with an error (another
#: decode worker can take it); NIXL's only one that never got the request (D pulls the blocks
#: and P frees them once read: test_leg_that_cannot_connect_is_retried_on_another_worker...)
RETRY_KEEPS_HANDOFF = {"vllm-lmcache": True}
#: the dialects on the express lanes (non-streamed requests; SGLang's concurrent pairs and P2P
#: NCCL's on the compiled lane only, which these gateways have)
EXPRESS_DIALECTS = {"vllm-nixl", "vllm-lmcache", "sglang-bootstrap", "vllm-p2pnccl"}


def prefill_ok(body: dict) -> tuple[int, Any]:
    return 200, completion("x", kv_transfer_params=KV)


def any_decode(body: dict) -> tuple[int, Any]:
    return 200, completion("decoded")


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("dialect", PD_DIALECTS)
async def test_prefill_failure_is_a_502_naming_the_stage(
    nursery: trio.Nursery, dialect: str, express: bool
) -> None:
    p = await start(nursery, Fake("p0", lambda b: (500, {"error": {"message": "engine dead"}})))
    d = await start(nursery, Fake("d0", any_decode))
    d.delay = 2.0  # SGLang's decode waits for KV that never comes: it must be cancelled
    url = await gateway_for(nursery, "p/d", dialect, [("p", p), ("d", d)], express=express)
    with trio.fail_after(1.5):  # nothing waits for the decode
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 502
    assert "prefill stage failed" in r.json()["error"]["message"]
    assert "engine dead" in r.json()["error"]["message"]
    if dialect != "sglang-bootstrap":  # sequential dialects: no decode without the hand-off
        assert d.seen == []


@pytest.mark.parametrize("express", [True, False])
async def test_sglang_a_prefill_leg_that_outlives_its_answer_ends_at_the_deadline(
    nursery: trio.Nursery, express: bool
) -> None:
    """The decode leg answered whole and the prefill leg's answer is late: the answer goes
    out at once, with nothing after it, and the prefill leg ends: on the server at the
    answer's end (its KV came over; waiting would hold the connection), on the compiled lane,
    where it goes on alone, at the request's deadline, before the longer response timeout."""
    p = await start(nursery, Fake("p0", lambda b: (200, completion("x"))))
    p.delay = 30.0
    d = await start(nursery, Fake("d0", lambda b: (200, completion("sg"))))
    url = await gateway_for(
        nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)], express=express,
        response_timeout_s=60.0, request_timeout_s=0.5,
    )  # fmt: skip
    with trio.fail_after(3):
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.json()["choices"][0]["message"]["content"] == "sg"
    gauge = 'lmgw_worker_in_flight{role="p",worker="p0"}'
    with trio.fail_after(5):
        while True:
            text = (await http_request(url, "GET", "/metrics")).body.decode()
            if metric_value(text, gauge) == 0:
                break
            await trio.sleep(0.05)


@pytest.mark.parametrize("express", [True, False])
async def test_sglang_a_prefill_failing_mid_stream_ends_the_stream(
    nursery: trio.Nursery, express: bool
) -> None:
    """SGLang: the decode leg's stream began (its head and first events out), then the
    prefill leg that went with it fails: the stream's last event names the prefill's error,
    and the decode leg is cancelled (on the compiled lane and on the server alike)."""
    p = await start(nursery, Fake("p0", lambda b: (500, {"error": {"message": "engine dead"}})))
    p.delay = 0.3
    delta = {"index": 0, "delta": {"content": "x"}}
    chunk = {"object": "chat.completion.chunk", "choices": [delta]}
    d = await start(nursery, Fake("d0", lambda b: (200, [chunk] * 40 + [b"[DONE]"])))
    d.event_gap = 0.02
    url = await gateway_for(nursery, "p/d", "sglang-bootstrap", [("p", p), ("d", d)],
                            express=express)  # fmt: skip
    with trio.fail_after(3):
        r = await http_request(url, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    events = r.events()
    assert r.status == 200 and events[-1] == "[DONE]", r.body
    assert events[-2]["error"]["message"] == "prefill stage failed: engine dead"
    assert 1 <= len(events) - 2 < 40  # some of the decode leg's events, not all
    assert p.seen[0]["bootstrap_room"] == d.seen[0]["bootstrap_room"]
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    # the lane ended the stream itself: the GET is the one connection it handed over (without
    # upstream.express_lane, no lane)
    assert metric_value(metrics, "lmgw_lane_handovers_total") == (1 if express else 0)


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("dialect", [d for d in PD_DIALECTS if d != "sglang-bootstrap"])
async def test_prefill_that_answered_an_error_is_retried_on_another_prefill_worker(
    nursery: trio.Nursery, dialect: str, express: bool
) -> None:
    """A 5xx from the prefill worker leaves nothing to hand off and nothing reached the client:
    the leg goes to another prefill worker (as a merged worker's 5xx does), and the failure
    counts toward the bad worker's outlier ejection. (SGLang pairs P and D in one room, sent
    together: its prefill failure stays a 502.)"""
    bad = await start(nursery, Fake("p-bad", lambda b: (503, {"error": {"message": "busy"}})))
    good = await start(nursery, Fake("p-good", prefill_ok))
    d = await start(nursery, Fake("d0", any_decode))
    workers = [("p", bad), ("p", good), ("d", d)]
    url = await gateway_for(nursery, "p/d", dialect, workers, express=express)
    results = [(await http_request(url, "POST", "/v1/chat/completions", CHAT)) for _ in range(4)]
    assert [r.status for r in results] == [200] * 4, results[0].body
    assert bad.seen and len(good.seen) == 4 and len(d.seen) == 4
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, 'lmgw_retries_total{role="p"}') == len(bad.seen)


async def test_every_prefill_worker_failing_is_still_a_502(nursery: trio.Nursery) -> None:
    bads = [
        await start(nursery, Fake(f"p{i}", lambda b: (500, {"error": {"message": "dead"}})))
        for i in range(3)
    ]
    d = await start(nursery, Fake("d0", any_decode))
    workers = [*(("p", b) for b in bads), ("d", d)]
    url = await gateway_for(nursery, "p/d", "vllm-nixl", workers)
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 502 and "prefill stage failed" in r.json()["error"]["message"]
    assert sum(len(b.seen) for b in bads) == 2  # upstream.max_attempts
    assert d.seen == []


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("dialect", PD_DIALECTS)
async def test_decode_failure_before_first_token(
    nursery: trio.Nursery, dialect: str, express: bool
) -> None:
    """Retried once on the other decode worker: with the same hand-off when any decode worker
    can use it; else (a P2P NCCL id names one decode address, an SGLang room pairs one P with
    one D, a NIXL decode may have pulled the blocks before failing) the pair restarts with a
    fresh prefill for the other decode worker."""
    p = await start(nursery, Fake("p0", prefill_ok))
    bad = await start(nursery, Fake("d-bad", lambda b: (500, {"error": {"message": "oom"}})))
    good = await start(nursery, Fake("d-good", any_decode))
    if dialect == "sglang-bootstrap":  # (a decode answers once its prefill has the request)
        good.after = room_of(p)
    workers = [("p", p), ("d", bad), ("d", good)]
    url = await gateway_for(nursery, "p/d", dialect, workers, express=express)
    results = [(await http_request(url, "POST", "/v1/chat/completions", CHAT)) for _ in range(4)]
    assert [r.status for r in results] == [200] * 4
    assert bad.seen and len(good.seen) == 4  # each failed decode was retried on d-good
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    lane = express and dialect in EXPRESS_DIALECTS
    assert metric_value(metrics, EXPRESS) == (4 if lane else 0)
    assert metric_value(metrics, 'lmgw_retries_total{role="d"}') == len(bad.seen)
    if RETRY_KEEPS_HANDOFF.get(dialect):
        assert len(p.seen) == 4  # the retry reused the prefill's hand-off
    else:
        assert len(p.seen) == 4 + len(bad.seen)  # a fresh pair per restart
        if dialect == "vllm-nixl":  # each decode got the hand-off of its own prefill
            assert all(b["kv_transfer_params"] == KV for b in good.seen)
        elif dialect == "vllm-p2pnccl":  # each decode got the id naming its own address
            for seen, fake in ((good.headers, good), (bad.headers, bad)):
                for h in seen:
                    assert h["x-request-id"].split("___decode_addr_")[1][:-33] == fake.kv_address
        else:  # a fresh room for the restarted pair
            rooms = [b["bootstrap_room"] for b in p.seen]
            assert len(set(rooms)) == len(rooms)


@pytest.mark.parametrize("express", [True, False])
async def test_nixl_pair_restarts_once_then_the_decode_failure_is_a_502(
    nursery: trio.Nursery, express: bool
) -> None:
    p = await start(nursery, Fake("p0", prefill_ok))
    bad = [
        await start(nursery, Fake(f"d{i}", lambda b: (500, {"error": {"message": "oom"}})))
        for i in range(3)
    ]
    workers = [("p", p)] + [("d", d) for d in bad]
    url = await gateway_for(nursery, "p/d", "vllm-nixl", workers, express=express)
    with trio.fail_after(3):
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 502
    message = r.json()["error"]["message"]
    assert message.startswith("decode stage failed") and "oom" in message
    # two pairs (the first and one restart), each decode worker used once, never twice
    assert len(p.seen) == 2 and sorted(len(d.seen) for d in bad) == [0, 1, 1]
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, 'lmgw_retries_total{role="d"}') == 1


async def test_decode_failure_with_no_other_decode_worker_is_a_502(nursery: trio.Nursery) -> None:
    p = await start(nursery, Fake("p0", prefill_ok))
    bad = await start(nursery, Fake("d-bad", lambda b: (500, {"error": {"message": "oom"}})))
    url = await gateway_for(nursery, "p/d", "vllm-p2pnccl", [("p", p), ("d", bad)])
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 502
    message = r.json()["error"]["message"]
    assert "decode stage failed" in message and "oom" in message
    assert len(p.seen) == 1 and len(bad.seen) == 1


def test_p2pnccl_worker_without_kv_address_is_refused_at_start() -> None:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-p2pnccl")],
        workers=[
            WorkerConfig(url="http://127.0.0.1:1", role="p", kv_address="127.0.0.1:2"),
            WorkerConfig(url="http://127.0.0.1:3", role="d", id="d0"),
        ],
    )
    with pytest.raises(ValueError, match=r"worker d0: .*kv_address"):
        Gateway(cfg)


async def test_p2pnccl_worker_added_without_kv_address_is_a_503(nursery: trio.Nursery) -> None:
    """A worker added at run time without its KV address: a clear 503, not a crash."""
    p = await start(nursery, Fake("p0", prefill_ok))
    d = await start(nursery, Fake("d0", any_decode))
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-p2pnccl")],
        workers=[WorkerConfig(url=p.url, role="p", id="p0", kv_address=p.kv_address)],
    )
    gw = Gateway(cfg)
    gw.add_worker(WorkerConfig(url=d.url, role="d", id="d0"))
    port = await nursery.start(gw.run)
    r = await http_request(f"http://127.0.0.1:{port}", "POST", "/v1/chat/completions", CHAT)
    assert r.status == 503, r.body
    assert "kv_address" in r.json()["error"]["message"]
    assert p.seen == [] and d.seen == []


async def test_p2pnccl_workers_join_by_discovery_pings_and_leave_when_silent(
    nursery: trio.Nursery,
) -> None:
    """vLLM P2P NCCL instances announce themselves over ZeroMQ; no static workers."""
    import zmq

    p = await start(nursery, Fake("p0", prefill_ok))
    d = await start(nursery, Fake("d0", any_decode))
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow="p/d", dialect="vllm-p2pnccl")],
        discovery=DiscoveryConfig(p2p_nccl_bind="tcp://127.0.0.1:*", p2p_nccl_expiry_s=0.5),
    )
    gw = Gateway(cfg)
    url = f"http://127.0.0.1:{await nursery.start(gw.run)}"
    ctx = zmq.Context.instance()
    dealers = []
    try:
        for role, fake, kv in (("P", p, "127.0.0.1:21001"), ("D", d, "127.0.0.1:22001")):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(gw.p2p_endpoint)
            ping = {"type": role, "http_address": fake.url[7:], "zmq_address": kv}
            dealers.append((sock, msgspec.msgpack.encode(ping)))
        with trio.fail_after(5):
            while True:
                for sock, ping in dealers:
                    sock.send(ping)
                r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
                if r.status == 200:
                    break
                await trio.sleep(0.05)
        rid = d.headers[-1]["x-request-id"]
        assert rid.startswith("___prefill_addr_127.0.0.1:21001___decode_addr_127.0.0.1:22001_")
        assert p.headers[-1]["x-request-id"] == rid
        with trio.fail_after(5):  # silence: both expire and the model has no workers left
            while len(gw.registry):
                await trio.sleep(0.1)
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
        assert r.status in (404, 503)
    finally:
        for sock, _ in dealers:
            sock.close()


async def start_stoppable(nursery: trio.Nursery, fake: Fake) -> trio.CancelScope:
    """Start ``fake``; cancelling the returned scope stops it (the port then refuses)."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_http(fake, "127.0.0.1", 0, task_status=task_status)

    port = await nursery.start(run)
    fake.url = f"http://127.0.0.1:{port}"
    fake.kv_address = f"127.0.0.1:{port}"
    return scope


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("role", ["p", "d"])
async def test_leg_that_cannot_connect_is_retried_on_another_worker_of_its_role(
    nursery: trio.Nursery, role: str, express: bool
) -> None:
    """A prefill or decode worker that died after the gateway counted it healthy: its leg is
    never delivered, so it goes to the role's other worker (a decode with the same hand-off),
    one attempt on the dead worker per retry and no more."""
    answers = {"p": prefill_ok, "d": decode_answer}
    peer = "d" if role == "p" else "p"  # the other role: one healthy worker
    dead = Fake(f"{role}-dead", answers[role])
    stop = await start_stoppable(nursery, dead)
    good = await start(nursery, Fake(f"{role}-good", answers[role]))
    other = await start(nursery, Fake(f"{peer}0", answers[peer]))
    workers = [(role, dead), (role, good), (peer, other)]
    url = await gateway_for(nursery, "p/d", "vllm-nixl", workers, express=express)
    stop.cancel()
    await trio.sleep(0.05)
    for _ in range(2):  # round robin starts on either worker of the role
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
        assert r.status == 200, r.body
        assert r.json()["choices"][0]["message"]["content"] == "decoded"
    assert dead.seen == [] and len(good.seen) == 2 and len(other.seen) == 2
    if role == "d":
        assert all(b["kv_transfer_params"] == KV for b in good.seen)
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    retries = metric_value(metrics, f'lmgw_retries_total{{role="{role}"}}')
    assert retries >= 1
    dead_tries = f'lmgw_worker_requests_total{{role="{role}",worker="{role}-dead"}}'
    assert metric_value(metrics, dead_tries) == retries
    assert metric_value(metrics, EXPRESS) == (2 if express else 0)


async def test_encode_leg_that_cannot_connect_is_retried_on_another_encoder(
    nursery: trio.Nursery,
) -> None:
    def encoded(b: dict) -> tuple[int, Any]:
        return 200, completion("")

    dead = Fake("e-dead", encoded)
    stop = await start_stoppable(nursery, dead)
    good = await start(nursery, Fake("e-good", encoded))
    d = await start(nursery, Fake("pd0", lambda b: (200, completion("pd"))))
    url = await gateway_for(nursery, "e+pd", "vllm-epd", [("e", dead), ("e", good), ("pd", d)])
    stop.cancel()
    await trio.sleep(0.05)
    content = [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE2]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert dead.seen == [] and len(good.seen) == 2 and len(d.seen) == 1


async def test_encode_leg_that_answered_an_error_is_retried_on_another_encoder(
    nursery: trio.Nursery,
) -> None:
    bad = await start(nursery, Fake("e-bad", lambda b: (500, {"error": {"message": "oom"}})))
    good = await start(nursery, Fake("e-good", lambda b: (200, completion(""))))
    d = await start(nursery, Fake("pd0", lambda b: (200, completion("pd"))))
    url = await gateway_for(nursery, "e+pd", "vllm-epd", [("e", bad), ("e", good), ("pd", d)])
    content = [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE2]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert len(good.seen) == 2 and len(d.seen) == 1
    assert len(bad.seen) >= 1  # the items the hash sent there went to e-good after
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, 'lmgw_retries_total{role="e"}') == len(bad.seen)


# -- the express lane: plain non-streamed P/D requests (lmgw.pipeline.express) ---------------
# Sequential dialects whose decode retries keep the hand-off (vllm-nixl, vllm-lmcache) take
# it; what the client, the workers and the metrics see must not depend on it.


def _same(body: bytes) -> Any:
    return msgspec.json.decode(body)


async def _pd_pair(
    nursery: trio.Nursery, express: bool, decode: Callable[[dict], tuple[int, Any]], **options: Any
) -> tuple[str, Fake, Fake]:
    p = await start(nursery, Fake("p0", prefill_ok))
    d = await start(nursery, Fake("d0", decode))
    url = await gateway_for(
        nursery, "p/d", "vllm-nixl", [("p", p), ("d", d)], express=express, **options
    )
    return url, p, d


@pytest.mark.parametrize("express", [True, False])
async def test_express_pd_answers_and_metrics_are_the_same_either_way(
    nursery: trio.Nursery, express: bool
) -> None:
    url, p, d = await _pd_pair(nursery, express, decode_answer)
    r = await http_request(
        url, "POST", "/v1/chat/completions", {**CHAT, "x_engine": 7}, {"X-Request-Id": "cid-1"}
    )
    assert r.status == 200, r.body
    assert _same(r.body) == completion("decoded")
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "cid-1"
    assert re.fullmatch(r"prefill;dur=[\d.]+", r.headers["server-timing"])
    (pre,), (dec,) = p.seen, d.seen
    assert pre["max_tokens"] == 1 and pre["kv_transfer_params"]["do_remote_decode"] is True
    assert dec["kv_transfer_params"] == KV and dec["x_engine"] == 7 and dec["max_tokens"] == 5
    assert p.headers[0]["x-request-id"] == d.headers[0]["x-request-id"] == "cid-1"
    r = await http_request(url, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"})
    assert r.status == 200 and _same(r.body) == completion("decoded")
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(text, EXPRESS) == (2 if express else 0)
    for role, worker in (("p", "p0"), ("d", "d0")):
        assert (
            metric_value(text, f'lmgw_worker_requests_total{{role="{role}",worker="{worker}"}}')
            == 2
        )
        assert (
            metric_value(
                text, f'lmgw_stage_duration_seconds_count{{role="{role}",worker="{worker}"}}'
            )
            == 2
        )
        assert metric_value(text, f'lmgw_worker_in_flight{{role="{role}",worker="{worker}"}}') == 0
    ok = f'lmgw_requests_total{{endpoint="chat",model="{MODEL}",flow="p/d",status="200"}}'
    assert metric_value(text, ok) == 1


@pytest.mark.parametrize("express", [True, False])
async def test_express_pd_decode_refusal_is_passed_on(nursery: trio.Nursery, express: bool) -> None:
    """A decode worker's 4xx is the request's fault: the client gets it as it is, no retry."""
    bad = {"error": {"message": "max_tokens too large", "type": "BadRequestError", "code": 400}}
    url, p, d = await _pd_pair(nursery, express, lambda b: (400, bad))
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 400
    assert r.json()["error"]["message"] == "max_tokens too large"
    assert len(p.seen) == len(d.seen) == 1
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(text, 'lmgw_worker_in_flight{role="d",worker="d0"}') == 0


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("pieces", [2, 3])
async def test_express_pd_decode_answer_in_pieces_is_relayed(
    nursery: trio.Nursery, express: bool, pieces: int
) -> None:
    """A decode answer that does not come whole in one read (chunked, in several writes)
    continues on the general path, the same bytes for the client."""
    body = msgspec.json.encode(completion("in pieces"))
    cut = len(body) // pieces
    parts = tuple(body[i * cut : (i + 1) * cut if i < pieces - 1 else None] for i in range(pieces))
    url, _, d = await _pd_pair(nursery, express, lambda b: (200, parts))
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200, r.body
    assert _same(r.body) == completion("in pieces")
    assert r.headers["server-timing"].startswith("prefill;dur=")
    assert d.seen[0]["kv_transfer_params"] == KV


@pytest.mark.parametrize("express", [True, False])
async def test_express_pd_hung_decode_is_a_504_naming_the_stage(
    nursery: trio.Nursery, express: bool
) -> None:
    url, _, d = await _pd_pair(nursery, express, decode_answer, response_timeout_s=0.3)
    d.delay = 5.0
    with trio.fail_after(3):
        r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 504
    message = r.json()["error"]["message"]
    assert message.startswith("decode stage failed") and "within 0.3 s" in message


@pytest.mark.parametrize("express", [True, False])
async def test_express_pd_with_joint_placement_releases_its_accounting(
    nursery: trio.Nursery, express: bool
) -> None:
    p = [await start(nursery, Fake(f"p{i}", prefill_ok)) for i in range(2)]
    d = [await start(nursery, Fake(f"d{i}", decode_answer)) for i in range(2)]
    zones = {"p0": "z0", "d0": "z0", "p1": "z1", "d1": "z1"}
    workers = [("p", w) for w in p] + [("d", w) for w in d]
    routing = RoutingConfig(policy="round_robin", placement="joint")
    url = await gateway_for(
        nursery, "p/d", "vllm-nixl", workers, express=express, routing=routing, zones=zones
    )
    for i in range(6):
        r = await http_request(url, "POST", "/v1/chat/completions", {**CHAT, "user": f"u{i}"})
        assert r.status == 200, r.body
    for i in range(2):  # every pair in one zone: each decode heard only from its zone's prefill
        assert len(p[i].seen) == len(d[i].seen)
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert (
        metric_value(text, f'lmgw_placement_pairs_total{{model="{MODEL}",zones="same_zone"}}') == 6
    )
    assert "lmgw_placement_queued_tokens{worker=" not in text  # every prefill is done
    assert metric_value(text, EXPRESS) == (6 if express else 0)


@pytest.mark.parametrize("dialect", ["vllm-p2pnccl", "sglang-bootstrap"])
async def test_express_lane_leaves_other_dialects_and_streams_alone(
    nursery: trio.Nursery, dialect: str
) -> None:
    """On trio (no compiled lane), dialects whose decode retry needs a fresh pair (P2P NCCL,
    SGLang) and streamed requests take the general path even with the express lane on."""
    p = await start(nursery, Fake("p0", prefill_ok))
    d = await start(nursery, Fake("d0", any_decode))
    url = await gateway_for(nursery, "p/d", dialect, [("p", p), ("d", d)], compiled=False)
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200, r.body
    nixl, _, _ = await _pd_pair(nursery, True, decode_answer, compiled=False)
    r = await http_request(nixl, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status == 200 and r.events()[-1] == "[DONE]"
    for where in (url, nixl):
        text = (await http_request(where, "GET", "/metrics")).body.decode()
        assert metric_value(text, EXPRESS) == 0


@pytest.mark.parametrize("express", [True, False])
async def test_epd_requests_without_media_take_the_express_lane_media_ones_never(
    nursery: trio.Nursery, express: bool
) -> None:
    """e+p+d: a request without media skips E, so it is a P/D request (the lane takes the
    non-streamed ones); one with media always goes the general way through E, even when its
    media type hides behind a JSON escape."""
    e = await start(nursery, Fake("e0", lambda b: (200, completion("x"))))
    p = await start(nursery, Fake("p0", prefill_ok))
    d = await start(nursery, Fake("d0", decode_answer))
    workers = [("e", e), ("p", p), ("d", d)]
    url = await gateway_for(nursery, "e+p+d", "vllm-epd", workers, express=express)
    r = await http_request(url, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "decoded"
    assert e.seen == [] and d.seen[0]["kv_transfer_params"] == KV
    assert r.headers["server-timing"].startswith("prefill;dur=")
    r = await http_request(url, "POST", "/v1/chat/completions", media_body(IMAGE))
    assert r.status == 200 and len(e.seen) == 1
    escaped = msgspec.json.encode(media_body(IMAGE2)).replace(b'"image_url"', b'"image\\u005furl"')
    r = await http_request(url, "POST", "/v1/chat/completions", escaped)
    assert r.status == 200 and len(e.seen) == 2
    assert e.seen[1]["messages"][0]["content"][0]["type"] == "image_url"
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert metric_value(metrics, EXPRESS) == (1 if express else 0)
