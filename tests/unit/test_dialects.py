"""Dialects: the exact JSON and headers each leg sends, and how each stage's answer is read."""

from __future__ import annotations

import hashlib
import json
import random
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.transport.dialects import (
    DIALECTS,
    BodyError,
    ClientBody,
    HandOff,
    HandOffError,
    Peer,
    PeerError,
    StageContext,
    StageError,
    find_media,
    get_dialect,
)
from lmgw.transport.dialects._vllm import prefill_only
from lmgw.transport.dialects.vllm_nixl import remote_decode_params

enc = msgspec.json.encode
dec = msgspec.json.decode

CHAT = "/v1/chat/completions"
FWD = [
    (b"content-type", b"application/json"),
    (b"x-request-id", b"client-id"),
    (b"authorization", b"Bearer k"),
    (b"traceparent", b"00-abc-def-01"),
]
P = Peer("10.0.0.1", 8100, kv_address="10.0.0.1:21001", bootstrap_port=8998)
D = Peer("10.0.0.2", 8200, kv_address="10.0.0.2:22001")
D2 = Peer("10.0.0.3", 8200, kv_address="10.0.0.3:22001")
NIXL_REQ = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def ctx(path: str = CHAT, prefill: Peer | None = P, decode: Peer | None = D, seed: int = 1):
    return StageContext("rid-1", path, FWD, prefill, decode, random.Random(seed))


def body(**fields) -> ClientBody:
    obj = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ClientBody(enc(obj))


def hdr(req) -> dict[bytes, bytes]:
    names = [k for k, _ in req.headers]
    assert len(names) == len(set(names)), names
    return dict(req.headers)


def expected_headers(rid: bytes) -> dict[bytes, bytes]:
    return {
        b"content-type": b"application/json",
        b"authorization": b"Bearer k",
        b"traceparent": b"00-abc-def-01",
        b"x-request-id": rid,
    }


def prefill_answer(kv: bytes | None = None) -> bytes:
    tail = b"" if kv is None else b', "kv_transfer_params": ' + kv
    return b'{"id": "cmpl-x", "choices": [{"index": 0, "text": "a"}]' + tail + b"}"


KV = (
    b'{"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2, 3],'
    b' "remote_engine_id": "eng-0", "remote_host": "10.0.0.1", "remote_port": 5600,'
    b' "tp_size": 1, "remote_request_id": "r", "future_key": {"x": [1.5, null]}}'
)


# -- registry and body ----------------------------------------------------------------------


def test_registry_names_and_errors() -> None:
    assert set(DIALECTS) == {
        "vllm-nixl",
        "vllm-p2pnccl",
        "vllm-lmcache",
        "vllm-epd",
        "sglang-bootstrap",
        "openai",
    }
    for name, cls in DIALECTS.items():
        d = get_dialect(name)
        assert isinstance(d, cls) and d.name == name and d.flows
    with pytest.raises(ValueError, match=r"unknown dialect 'vllm'.*openai.*vllm-nixl"):
        get_dialect("vllm")
    assert get_dialect("vllm-nixl", push=True).push


def test_client_body_decodes_once_and_rejects_non_objects() -> None:
    b = body()
    assert b._obj is None
    assert b.obj is b.obj
    with pytest.raises(BodyError):
        _ = ClientBody(b"[1]").obj
    with pytest.raises(BodyError):
        _ = ClientBody(b"{nope").obj
    for bad in (b"[1]", b'"text"', b"{nope", b'{"a": 1', b"\xff"):
        with pytest.raises(BodyError):
            _ = ClientBody(bad).fields
    b = ClientBody(b'{"a": [1, {"b": 2.50}], "c": "\\u00e9"}')
    assert b.fields is b.fields
    assert {k: bytes(v) for k, v in b.fields.items()} == {
        "a": b'[1, {"b": 2.50}]',
        "c": b'"\\u00e9"',
    }


def test_stage_error_status_mapping() -> None:
    e = StageError("prefill", 500, "boom")
    assert e.client_status == 502 and "prefill" in str(e) and e.stage == "prefill"
    assert StageError("prefill", 400, "too long").client_status == 400
    assert StageError("prefill", 429, "busy").client_status == 502
    assert StageError("prefill", 200, "bad json").client_status == 502


# -- vllm-nixl --------------------------------------------------------------------------------


def test_nixl_prefill_leg_exact() -> None:
    b = body(
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
        max_completion_tokens=60,
        min_tokens=5,
        min_completion_tokens=5,
        temperature=0.7,
        vendor_x={"a": [1]},
    )
    req = get_dialect("vllm-nixl").prefill_request(b, ctx())
    assert req.path == CHAT and req.role == "prefill" and req.handoff is None
    assert hdr(req) == expected_headers(b"rid-1")
    assert dec(req.body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "temperature": 0.7,
        "vendor_x": {"a": [1]},
        "kv_transfer_params": NIXL_REQ,
    }


def test_nixl_prefill_adds_no_max_completion_tokens() -> None:
    req = get_dialect("vllm-nixl").prefill_request(body(), ctx())
    obj = dec(req.body)
    assert obj["max_tokens"] == 1 and "max_completion_tokens" not in obj


def test_nixl_decode_copies_kv_transfer_params_verbatim() -> None:
    d = get_dialect("vllm-nixl")
    b = body(stream=True, stream_options={"include_usage": True}, max_tokens=50, min_tokens=5)
    pre = d.prefill_request(b, ctx())
    handoff = d.read_prefill(pre, 200, prefill_answer(KV))
    req = d.decode_request(b, handoff, ctx())
    assert req.role == "decode" and req.path == CHAT
    assert hdr(req) == expected_headers(b"rid-1")
    assert KV in req.body  # the exact bytes, unknown keys and number spelling included
    assert dec(req.body) == {**b.obj, "kv_transfer_params": dec(KV)}


def test_nixl_decode_without_params_is_the_original_body() -> None:
    d = get_dialect("vllm-nixl")
    b = body(stream=True)
    for answer in (prefill_answer(), prefill_answer(b"null")):
        handoff = d.read_prefill(d.prefill_request(b, ctx()), 200, answer)
        assert handoff.data is None
        assert d.decode_request(b, handoff, ctx()).body is b.raw


def test_nixl_push_mode_drops_block_ids_only() -> None:
    d = get_dialect("vllm-nixl", push=True)
    b = body()
    handoff = d.read_prefill(d.prefill_request(b, ctx()), 200, prefill_answer(KV))
    kv = dec(d.decode_request(b, handoff, ctx()).body)["kv_transfer_params"]
    expected = dec(KV)
    del expected["remote_block_ids"]
    assert kv == expected


@pytest.mark.parametrize(
    ("status", "answer", "client_status", "text"),
    [
        (500, b'{"error": {"message": "engine dead", "code": 500}}', 502, "engine dead"),
        (400, b'{"object": "error", "message": "prompt too long"}', 400, "prompt too long"),
        (503, b"", 502, "no response body"),
        (200, b"<html>", 502, "not a JSON object"),
        (200, b"[1, 2]", 502, "not a JSON object"),
        (200, prefill_answer(b"[1]"), 502, "kv_transfer_params is not a JSON object"),
    ],
)
def test_nixl_prefill_failures(status, answer, client_status, text) -> None:
    d = get_dialect("vllm-nixl")
    with pytest.raises(StageError) as exc:
        d.read_prefill(d.prefill_request(body(), ctx()), status, answer)
    assert exc.value.stage == "prefill" and exc.value.client_status == client_status
    assert text in exc.value.message


@pytest.mark.parametrize("name", ["vllm-nixl", "vllm-lmcache", "vllm-p2pnccl", "vllm-epd"])
def test_sequential_decode_refuses_missing_or_foreign_handoff(name) -> None:
    d = get_dialect(name)
    b = body()
    pre = d.prefill_request(b, ctx())
    bad = [
        None,
        HandOff("other", None, prefill_done=True),
        HandOff(name, None, prefill_done=False),  # P not answered yet
    ]
    if pre.handoff is not None:
        bad.append(pre.handoff)
    for handoff in bad:
        with pytest.raises(HandOffError):
            d.decode_request(b, handoff, ctx())


# -- vllm-p2pnccl -----------------------------------------------------------------------------


def test_p2pnccl_pair_id_on_both_legs() -> None:
    d = get_dialect("vllm-p2pnccl")
    assert not d.decode_retry_keeps_handoff
    b = body(stream=True, max_tokens=20, max_completion_tokens=20, extra_field=[1, {"z": None}])
    pre = d.prefill_request(b, ctx())
    rid = hdr(pre)[b"x-request-id"].decode()
    assert re.fullmatch(
        r"___prefill_addr_10\.0\.0\.1:21001___decode_addr_10\.0\.0\.2:22001_[0-9a-f]{32}", rid
    )
    assert hdr(pre) == expected_headers(rid.encode())
    assert dec(pre.body) == {
        **b.obj,
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
    }
    handoff = d.read_prefill(pre, 200, b'{"choices": []}')
    req = d.decode_request(b, handoff, ctx())
    assert req.body is b.raw and req.role == "decode"
    assert hdr(req) == expected_headers(rid.encode())
    # the same seed gives the same id; another one a different id
    assert d.prefill_request(b, ctx()).headers == pre.headers
    assert d.prefill_request(b, ctx(seed=2)).headers != pre.headers


def test_p2pnccl_refuses_another_decode_worker_and_missing_addresses() -> None:
    d = get_dialect("vllm-p2pnccl")
    b = body()
    pre = d.prefill_request(b, ctx())
    handoff = d.read_prefill(pre, 200, b"{}")
    with pytest.raises(HandOffError, match="restart from prefill"):
        d.decode_request(b, handoff, ctx(decode=D2))
    with pytest.raises(PeerError, match="decode worker's KV address"):
        d.prefill_request(b, ctx(decode=Peer("10.0.0.2", 8200)))
    assert d.peer_problem("d", Peer("10.0.0.2", 8200)) is not None
    assert d.peer_problem("p", P) is None and d.peer_problem("e", Peer("h", 1)) is None
    with pytest.raises(StageError):
        d.read_prefill(pre, 500, b"oops")


# -- vllm-lmcache -----------------------------------------------------------------------------


def test_lmcache_legs() -> None:
    d = get_dialect("vllm-lmcache")
    b = body(stream=True, max_tokens=9, min_tokens=2, top_k=3)
    pre = d.prefill_request(b, ctx())
    assert hdr(pre) == expected_headers(b"rid-1")
    assert dec(pre.body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 1,
        "top_k": 3,
    }
    req = d.decode_request(b, d.read_prefill(pre, 200, b"{}"), ctx())
    assert req.body is b.raw and hdr(req) == expected_headers(b"rid-1")
    with pytest.raises(StageError):
        d.read_prefill(pre, 502, b"")


# -- vllm-epd ---------------------------------------------------------------------------------

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "uuid": "u1"}
AUD = {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}
VID = {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}
AURL = {"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}}
EPD_MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "look"}, IMG, AUD]},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": [VID, {"type": "text", "text": "and"}, AURL]},
    {"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "cached"}]},
]


def test_find_media_positions_and_hashes() -> None:
    items = find_media({"messages": EPD_MESSAGES})
    assert [(i.message, i.index, i.type) for i in items] == [
        (1, 1, "image_url"),
        (1, 2, "input_audio"),
        (3, 0, "video_url"),
        (3, 2, "audio_url"),
        (4, 0, "image_url"),
    ]
    assert items[0].uuid == "u1" and items[0].part is IMG
    sha = lambda s: hashlib.sha256(s.encode()).hexdigest()  # noqa: E731
    assert items[0].sha256 == sha("data:image/png;base64,AAAA")
    assert items[1].sha256 == sha("data:audio/wav;base64,UklG")
    assert items[2].sha256 == sha("https://x/v.mp4")
    assert items[4].url is None and items[4].sha256 is None and items[4].uuid == "cached"
    assert find_media({"messages": "x"}) == [] and find_media({"prompt": "x"}) == []


def test_epd_encoder_fan_out_exact() -> None:
    d = get_dialect("vllm-epd")
    b = body(messages=EPD_MESSAGES, stream=True, max_tokens=30, mm_processor_kwargs={"fps": 2})
    reqs = d.encode_requests(b, ctx())
    assert len(reqs) == 4  # the uuid-only item has nothing to encode
    for i, (req, part) in enumerate(zip(reqs, [IMG, AUD, VID, AURL], strict=True)):
        assert req.path == CHAT and req.role == "encode"
        rid = hdr(req)[b"x-request-id"].decode()
        assert re.fullmatch(rf"rid-1:{i}:[0-9a-f]{{6}}", rid)
        assert hdr(req) == expected_headers(rid.encode())
        assert dec(req.body) == {
            "model": "m",
            "mm_processor_kwargs": {"fps": 2},
            "messages": [{"role": "user", "content": [part]}],
            "max_tokens": 1,
            "stream": False,
        }
    assert d.encode_requests(body(), ctx()) == []
    with pytest.raises(StageError) as exc:
        d.read_encode(reqs[0], 500, b'{"error": {"message": "oom"}}')
    assert exc.value.stage == "encode" and exc.value.client_status == 502
    d.read_encode(reqs[0], 200, b"{}")


def test_epd_p_and_d_legs_keep_original_content() -> None:
    d = get_dialect("vllm-epd")
    b = body(messages=EPD_MESSAGES, stream=True)
    pre = d.prefill_request(b, ctx())
    assert dec(pre.body)["messages"] == EPD_MESSAGES
    assert dec(pre.body)["kv_transfer_params"] == NIXL_REQ
    req = d.decode_request(b, d.read_prefill(pre, 200, prefill_answer(KV)), ctx())
    assert req.role == "decode" and dec(req.body) == {**b.obj, "kv_transfer_params": dec(KV)}
    # e+pd: no prefill worker, one merged leg with the client's bytes
    pd = d.decode_request(b, None, ctx(prefill=None))
    assert pd.role == "pd" and pd.body is b.raw and hdr(pd) == expected_headers(b"rid-1")
    with pytest.raises(HandOffError):
        d.decode_request(b, HandOff("vllm-epd", None, True), ctx(prefill=None))


# -- sglang-bootstrap -------------------------------------------------------------------------


def test_sglang_same_body_both_legs() -> None:
    d = get_dialect("sglang-bootstrap")
    assert d.concurrent_prefill_decode and not d.decode_retry_keeps_handoff
    b = body(stream=True, max_tokens=20, custom={"k": 1})
    pre = d.prefill_request(b, ctx())
    room = random.Random(1).getrandbits(63)
    assert dec(pre.body) == {
        **b.obj,
        "bootstrap_host": "10.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": room,
    }
    assert 0 <= room < 2**63
    req = d.decode_request(b, pre.handoff, ctx())
    assert req.body == pre.body and req.role == "decode"
    assert hdr(req) == hdr(pre) == expected_headers(b"rid-1")
    assert not d.needs_prefill_response(b)
    handoff = d.read_prefill(pre, 200, b"{}")
    assert not d.rewrites_decode(handoff)
    with pytest.raises(StageError) as exc:
        d.read_prefill(pre, 500, b'{"error": {"message": "bootstrap timeout"}}')
    assert exc.value.client_status == 502 and "bootstrap timeout" in str(exc.value)
    for bad in (None, HandOff("vllm-nixl", None, True), HandOff("sglang-bootstrap", None)):
        with pytest.raises(HandOffError):
            d.decode_request(b, bad, ctx())


def test_sglang_unknown_port_and_ipv6_host() -> None:
    d = get_dialect("sglang-bootstrap")
    pre = d.prefill_request(body(), ctx(prefill=Peer("[fd00::1]", 30000)))
    obj = dec(pre.body)
    assert obj["bootstrap_host"] == "fd00::1" and obj["bootstrap_port"] is None
    with pytest.raises(ValueError):
        d.prefill_request(body(), ctx(prefill=None))


@pytest.mark.parametrize(
    ("path", "fields", "n"),
    [
        (CHAT, {"n": 3}, 3),
        (CHAT, {"n": 1}, None),
        ("/v1/completions", {"prompt": ["a", "b"]}, 2),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, 2),
        ("/v1/completions", {"prompt": [1, 2, 3]}, None),
        ("/v1/completions", {"prompt": "a"}, None),
        ("/generate", {"input_ids": [[1], [2], [3], [4]]}, 4),
        ("/generate", {"input_ids": [1, 2]}, None),
        ("/generate", {"text": ["a", "b"]}, 2),
        ("/generate", {"text": "a"}, None),
        # one room per (prompt, sample): SGLang reads P * n rooms in its expanded order
        ("/v1/completions", {"prompt": ["a", "b"], "n": 2}, 4),
        ("/v1/completions", {"prompt": "a", "n": 2}, None),  # one room, expanded by SGLang
        ("/generate", {"text": ["a", "b"], "sampling_params": {"n": 3}}, 6),
        ("/generate", {"input_ids": [[1], [2]], "sampling_params": [{"n": 2}, {"n": 2}]}, 4),
        ("/generate", {"text": "a", "sampling_params": {"n": 2}}, None),
    ],
)
def test_sglang_arrays_for_batches(path, fields, n) -> None:
    d = get_dialect("sglang-bootstrap")
    obj = dec(d.prefill_request(ClientBody(enc(fields)), ctx(path=path)).body)
    if n is None:
        assert isinstance(obj["bootstrap_room"], int)
        assert obj["bootstrap_host"] == "10.0.0.1" and obj["bootstrap_port"] == 8998
    else:
        rooms = obj["bootstrap_room"]
        assert len(rooms) == n == len(set(rooms)) and all(0 <= r < 2**63 for r in rooms)
        assert obj["bootstrap_host"] == ["10.0.0.1"] * n
        assert obj["bootstrap_port"] == [8998] * n


def _meta(lp):
    return {"text": "x", "meta_info": {"id": "r", "input_token_logprobs": lp}}


def test_sglang_logprob_merge_json_and_sse() -> None:
    d = get_dialect("sglang-bootstrap")
    b = ClientBody(enc({"text": "hi", "return_logprob": True, "stream": True}))
    assert d.needs_prefill_response(b)
    pre = d.prefill_request(b, ctx(path="/generate"))
    handoff = d.read_prefill(pre, 200, enc(_meta([[-0.1, 1], [-0.2, 2]])))
    assert d.rewrites_decode(handoff)
    merged = dec(d.merge_decode_body(handoff, enc(_meta([[-0.3, 3]]))))
    assert merged["meta_info"]["input_token_logprobs"] == [[-0.1, 1], [-0.2, 2], [-0.3, 3]]
    # a decode answer without the list is left alone (as sgl-router does)
    plain = enc({"text": "x", "meta_info": {"id": "r"}})
    assert d.merge_decode_body(handoff, plain) == plain
    events = (
        b"data: " + enc(_meta([[-0.3, 3]])) + b"\n\n"
        b": keep-alive\n\n"
        b'data: {"error": {"message": "x"}}\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    out = d.merge_decode_events(handoff, events)
    first, rest = out.split(b"\n\n", 1)
    assert dec(first[6:])["meta_info"]["input_token_logprobs"] == [[-0.1, 1], [-0.2, 2], [-0.3, 3]]
    assert rest == events.split(b"\n\n", 1)[1]
    # P answered with SSE: its last event carries the list
    sse = b"data: " + enc(_meta([[-0.9, 9]])) + b"\n\ndata: [DONE]\n\n"
    handoff = d.read_prefill(pre, 200, sse)
    merged = dec(d.merge_decode_body(handoff, enc(_meta([]))))
    assert merged["meta_info"]["input_token_logprobs"] == [[-0.9, 9]]


def test_sglang_logprob_merge_batch() -> None:
    d = get_dialect("sglang-bootstrap")
    b = ClientBody(enc({"input_ids": [[1], [2]], "return_logprob": [True, True]}))
    pre = d.prefill_request(b, ctx(path="/generate"))
    handoff = d.read_prefill(pre, 200, enc([_meta([[-1, 1]]), _meta([[-2, 2]])]))
    out = dec(d.merge_decode_body(handoff, enc([_meta([[-5, 5]]), _meta([[-6, 6]])])))
    assert [o["meta_info"]["input_token_logprobs"] for o in out] == [
        [[-1, 1], [-5, 5]],
        [[-2, 2], [-6, 6]],
    ]
    chunk = {**_meta([[-6, 6]]), "index": 1}
    out = d.merge_decode_events(handoff, b"data: " + enc(chunk) + b"\n\n")
    assert dec(out[6:-2])["meta_info"]["input_token_logprobs"] == [[-2, 2], [-6, 6]]


def test_sglang_logprob_merge_puts_prefill_top_logprobs_first_too() -> None:
    d = get_dialect("sglang-bootstrap")
    b = ClientBody(enc({"text": "hi", "return_logprob": True, "top_logprobs_num": 1}))
    pre = d.prefill_request(b, ctx(path="/generate"))

    def meta(lp: list, top: list) -> dict:
        return {"meta_info": {"input_token_logprobs": lp, "input_top_logprobs": top}}

    handoff = d.read_prefill(pre, 200, enc(meta([[None, 1], [-0.2, 2]], [None, [[-0.1, 7]]])))
    merged = dec(d.merge_decode_body(handoff, enc(meta([], []))))["meta_info"]
    assert merged == meta([[None, 1], [-0.2, 2]], [None, [[-0.1, 7]]])["meta_info"]
    # a decode answer without top logprobs keeps none
    only = dec(d.merge_decode_body(handoff, enc({"meta_info": {"input_token_logprobs": []}})))
    assert only["meta_info"] == {"input_token_logprobs": [[None, 1], [-0.2, 2]]}


def test_sglang_streamed_prefill_batch_keeps_each_elements_logprobs() -> None:
    """P streamed a batch: each element's last event carries that element's lists, and D's
    events get their own element's, by ``index``."""
    d = get_dialect("sglang-bootstrap")
    b = ClientBody(enc({"text": ["a", "b"], "return_logprob": True, "stream": True}))
    pre = d.prefill_request(b, ctx(path="/generate"))
    sse = b"".join(
        b"data: " + enc({**_meta(lp), "index": i}) + b"\n\n"
        for i, lp in ((0, [[-1, 1]]), (1, [[-2, 2]]), (0, [[-1, 1], [-3, 3]]))
    )
    handoff = d.read_prefill(pre, 200, sse + b"data: [DONE]\n\n")
    for i, expected in ((0, [[-1, 1], [-3, 3], [-9, 9]]), (1, [[-2, 2], [-9, 9]])):
        out = d.merge_decode_events(handoff, b"data: " + enc({**_meta([[-9, 9]]), "index": i}))
        assert dec(out[6:])["meta_info"]["input_token_logprobs"] == expected


# -- openai -----------------------------------------------------------------------------------


def test_openai_pass_through() -> None:
    d = get_dialect("openai")
    b = ClientBody(b'{"model":"m",  "stream":true, "x": 1.50}')
    req = d.decode_request(b, None, ctx(prefill=None))
    assert req.body is b.raw and req.role == "pd" and req.path == CHAT
    assert hdr(req) == expected_headers(b"rid-1")
    assert b._obj is None  # never decoded
    assert d.encode_requests(b, ctx()) == []
    with pytest.raises(ValueError):
        d.prefill_request(b, ctx())
    with pytest.raises(HandOffError):
        d.decode_request(b, HandOff("openai"), ctx())


# -- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
extra_fields = st.dictionaries(
    st.text(min_size=1, max_size=10).map(lambda s: "x_" + s), json_values, max_size=4
)


def _all_legs(name: str, b: ClientBody) -> list[bytes]:
    d = get_dialect(name)
    c = ctx(prefill=None) if name == "openai" else ctx()
    if name == "openai":
        return [d.decode_request(b, None, c).body]
    legs = [r.body for r in d.encode_requests(b, c)]
    pre = d.prefill_request(b, c)
    handoff = pre.handoff if d.concurrent_prefill_decode else d.read_prefill(pre, 200, b"{}")
    return [*legs, pre.body, d.decode_request(b, handoff, c).body]


@settings(max_examples=40, deadline=None)
@given(extra=extra_fields, name=st.sampled_from(sorted(DIALECTS)))
def test_unknown_fields_survive_every_leg(extra, name) -> None:
    b = body(**extra, max_tokens=7)
    legs = _all_legs(name, b)
    for leg in legs:
        obj = dec(leg)
        for key, value in extra.items():
            assert obj[key] == value


parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=5)),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, st.text(min_size=1)),
    st.builds(lambda u: {"type": "video_url", "video_url": {"url": u}}, st.text(min_size=1)),
    st.builds(lambda u: {"type": "audio_url", "audio_url": {"url": u}}, st.text(min_size=1)),
    st.builds(
        lambda d: {"type": "input_audio", "input_audio": {"data": d, "format": "mp3"}},
        st.text(max_size=8),
    ),
    st.builds(lambda t: {"type": t}, st.sampled_from(["image_embeds", "file", "refusal"])),
)
messages = st.lists(
    st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["user", "system", "assistant"]),
        st.text(max_size=5) | st.lists(parts, max_size=4),
    ),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(msgs=messages)
def test_media_finder_finds_exactly_the_media_parts(msgs) -> None:
    media = {"image_url", "input_audio", "audio_url", "video_url"}
    expected = [
        (m, i)
        for m, msg in enumerate(msgs)
        if isinstance(msg["content"], list)
        for i, part in enumerate(msg["content"])
        if part["type"] in media
    ]
    items = find_media({"messages": msgs})
    assert [(it.message, it.index) for it in items] == expected
    assert all(it.part is msgs[it.message]["content"][it.index] for it in items)
    reqs = get_dialect("vllm-epd").encode_requests(ClientBody(enc({"messages": msgs})), ctx())
    distinct: dict[str, object] = {}  # one encoder leg per distinct item, in order
    for it in items:
        key = it.uuid or it.sha256
        if it.url is not None and key not in distinct:
            distinct[key] = [it.part]
    assert [dec(r.body)["messages"][0]["content"] for r in reqs] == list(distinct.values())
    assert [r.key for r in reqs] == list(distinct)


json_bodies = st.builds(
    lambda extra, msgs, indent, ascii_only, pad: json.dumps(
        {"model": "m", "messages": msgs, "max_tokens": 7, **extra, **pad},
        indent=indent,
        ensure_ascii=ascii_only,
    ).encode(),
    st.dictionaries(
        st.sampled_from(
            ["stream", "stream_options", "min_tokens", "max_completion_tokens", "temperature",
             "kv_transfer_params", "x_vendor"]
        ),
        json_values | st.floats(allow_nan=False, allow_infinity=False),
        max_size=5,
    ),
    messages,
    st.sampled_from([None, 0, 2]),
    st.booleans(),
    st.sampled_from([{}, {"x_long": "é" * 40000}]),  # past 64 kB: ClientBody.encode joins
)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(raw=json_bodies, n=st.sampled_from([None, 1, 3]), logprob=st.booleans())
def test_sglang_legs_add_members_as_a_full_decode_would(raw, n, logprob) -> None:
    obj = json.loads(raw)
    if n is not None:
        obj["n"] = n
    if logprob:
        obj["return_logprob"] = True
    raw = json.dumps(obj).encode() if n is not None or logprob else raw
    d = get_dialect("sglang-bootstrap")
    b = ClientBody(raw)
    pre = d.prefill_request(b, ctx())
    boot = pre.handoff.data
    assert json.loads(pre.body) == {**obj, **boot.fields}
    assert d.decode_request(b, pre.handoff, ctx()).body == pre.body
    room = boot.fields["bootstrap_room"]
    if n == 3:  # chat with n > 1: a room per sequence
        assert isinstance(room, list) and len(room) == 3
    else:
        assert isinstance(room, int)
    assert d.needs_prefill_response(b) is logprob


@settings(max_examples=80, deadline=None)
@given(raw=json_bodies, name=st.sampled_from(["vllm-nixl", "vllm-lmcache", "vllm-p2pnccl"]))
def test_vllm_legs_edit_members_as_a_full_decode_would(raw, name) -> None:
    """The legs copy the client's members as raw bytes (ClientBody.fields): whatever the
    body's spacing, escapes, number spelling or length, each leg means exactly what editing
    the fully decoded object would give."""
    obj = json.loads(raw)
    d = get_dialect(name)
    c = ctx()
    b = ClientBody(raw)
    pre = d.prefill_request(b, c)
    expected = prefill_only(obj)
    if name == "vllm-nixl":
        expected["kv_transfer_params"] = remote_decode_params()
    assert json.loads(pre.body) == expected
    params = b'{"remote_engine_id": "e", "remote_block_ids": [1, 2], "x": {"y": 1.5e3}}'
    answer = b'{"kv_transfer_params": %s}' % params if name == "vllm-nixl" else b"{}"
    leg = d.decode_request(b, d.read_prefill(pre, 200, answer), c)
    if name == "vllm-nixl":
        assert json.loads(leg.body) == {**obj, "kv_transfer_params": json.loads(params)}
    else:
        assert leg.body == raw
