"""Every flow over the native ZeroMQ protocol, end to end: the official `openai` client ->
gateway -> ``RpcChannel`` -> ``WorkerServer`` + ``SimEngine`` (the HTTP simulator's engine
behind the native protocol), moving real KV bytes and media tensors.

* The answer text equals the HTTP simulator's for the same request, byte for byte, in every
  flow, streamed or not, for chat and completions. For media, the text is the engine's for the
  prompt ids the gateway sends: the HTTP simulator expands each image marker into placeholder
  ids derived from the data URL, which a native worker never sees (only pixels), so the two
  differ by design of the simulators, not of the gateway.
* Media reach the encoder as tensor frames (the decoded pixels, checked element by element),
  once per item (the gateway's encoder cache), and P/PD verify the encoder output.
* A decode failing before its first token is retried with the same hand-off; stage failures
  are 502s naming the stage; a worker's bad_request is a 400.
* A worker killed mid-stream: the stream is continued elsewhere or ends with an error event
  (no hang). A client disconnect reaches the worker's engine as an abort (its latency is
  printed, not asserted: timings flake on a shared box).

Workers run in-process (127.0.0.1, port 0) except where a test kills one; every wait is
bounded.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import openai
import pytest
import trio
from gateway_support import MODEL, http_request

from lmgw.cache.config import CacheConfig
from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    NativeConfig,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.errors import GatewayError
from lmgw.gateway import Gateway
from lmgw.pipeline.native import NativeWorker, choices, sampling_params
from lmgw.simulators import WorkerOptions, model_files
from lmgw.simulators.engine import Engine as MockEngine
from lmgw.simulators.engine import EngineConfig, SamplingSpec
from lmgw.simulators.faults import Faults
from lmgw.text.service import load_model_texts
from lmgw.transport.tensors import decode
from lmgw.transport.zmq import ChannelState
from lmgw.worker import WorkerServer
from lmgw.worker.sim import SimEngine
from lmgw.workers.worker import WorkerState

BOUND = 20.0
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJ"
    "IgAAAABJRU5ErkJggg=="
)
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}
TEXT_ONLY = [{"role": "user", "content": "Tell me about disaggregated serving, " * 6}]
WITH_IMAGE = [
    {"role": "user", "content": [{"type": "text", "text": "What is in the image?"}, IMAGE]}
]
PROMPT = "Once upon a time, in a gateway far away,"

FLOWS = {
    "pd": {"pd": 2},
    "p/d": {"p": 1, "d": 2},
    "e+pd": {"e": 1, "pd": 1},
    "e+p+d": {"e": 2, "p": 1, "d": 1},
}


class Recording(SimEngine):
    """The simulator's engine, remembering what tests look at: each Encode's tensors (as
    arrays), how many tensors each Prefill/Generate brought, and when each abort arrived
    (trio's clock: the gateway runs in the same loop)."""

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.encoded: list[tuple[list[Any], list[np.ndarray]]] = []
        self.stage_tensors: list[int] = []
        self.abort_at: dict[str, float] = {}
        self.shm_refs = 0  # tensors that arrived as shared-memory handles

    def _saw(self, req: Any) -> None:
        self.shm_refs += sum(ref.shm is not None for ref in req.msg.tensors)

    def generate(self, req: Any) -> Any:
        self.stage_tensors.append(len(req.tensors))
        self._saw(req)
        return super().generate(req)

    async def prefill(self, req: Any) -> Any:
        self.stage_tensors.append(len(req.tensors))
        self._saw(req)
        return await super().prefill(req)

    async def encode(self, req: Any) -> Any:
        self._saw(req)
        arrays = [np.array(a) for a in unpack_tensors_of(req)]
        self.encoded.append((list(req.msg.media), arrays))
        return await super().encode(req)

    async def abort(self, request_id: str) -> None:
        self.abort_at.setdefault(request_id, trio.current_time())
        await super().abort(request_id)


def unpack_tensors_of(req: Any) -> list[np.ndarray]:
    """A request's tensors as arrays, whether frames or mapped segments."""
    return [decode(ref.header, buf) for ref, buf in zip(req.msg.tensors, req.tensors, strict=True)]


async def start_worker(
    nursery: trio.Nursery,
    role: str,
    server: dict[str, Any] | None = None,
    host: str | None = None,
    **options: Any,
) -> tuple[Recording, str]:
    """A worker in this process; ``server``: WorkerServer arguments; ``host``: the host id it
    claims (another one than this process's: a worker on another machine)."""
    options.setdefault("speed", math.inf)
    engine = Recording(WorkerOptions(role=role, model=MODEL, **options))
    ws = WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None, **(server or {}))
    if host is not None:
        ws.host = host
    started = await nursery.start(ws.run)
    return engine, "zmq+" + started.endpoint


def gateway_config(workers: list[tuple[str, str]], flow: str = "pd", **kw: Any) -> GatewayConfig:
    health = {"interval_s": 0.2, "timeout_s": 5.0, "native_heartbeat_interval_s": 0.1,
              "native_heartbeat_timeout_s": 1.0, **kw.pop("health", {})}  # fmt: skip
    model = {"name": MODEL, "flow": flow, "tokenizer": str(model_files.default_model_dir())}
    return GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(**health),
        upstream=UpstreamConfig(**kw.pop("upstream", {})),
        routing=RoutingConfig(policy="round_robin"),
        models=[ModelConfig(**{**model, **kw.pop("model", {})})],
        workers=[
            WorkerConfig(url=url, role=role, id=f"{role}{i}")
            for i, (role, url) in enumerate(workers)
        ],
    )


async def start_gateway(nursery: trio.Nursery, cfg: GatewayConfig) -> tuple[Gateway, str]:
    gw = Gateway(cfg)
    with trio.fail_after(BOUND):
        port = await nursery.start(gw.run)
    return gw, f"http://127.0.0.1:{port}"


def chat(url: str, messages: list[dict], stream: bool, **kw: Any) -> tuple[str, Any, str | None]:
    """(text, usage, finish_reason) of one chat through the official client."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("seed", 3)
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, **kw)
        return r.choices[0].message.content, r.usage, r.choices[0].finish_reason
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), usage, finish


def complete(url: str, stream: bool) -> tuple[str, Any]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
    if not stream:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10)
        return r.choices[0].text, r.usage
    parts, usage = [], None
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        parts.extend(c.text for c in chunk.choices)
    return "".join(parts), usage


async def raw_chat(url: str, rid: str, stream: bool = False, **extra: Any) -> trio.SocketStream:
    """A long chat (2000 tokens; ``extra``: more body fields) sent with ``X-Request-Id: rid``
    on a raw connection (the caller reads or hangs up)."""
    body = msgspec.json.encode({
        "model": MODEL, "messages": TEXT_ONLY, "max_tokens": 2000, "ignore_eos": True,
        "stream": stream, **extra,
    })  # fmt: skip
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: "
        f"application/json\r\nx-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    sock = await trio.open_tcp_stream(host, int(port))
    await sock.send_all(head + body)
    return sock


async def run(fn: Any, *args: Any, **kw: Any) -> Any:
    with trio.fail_after(BOUND):
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


def png_pixels() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(PNG))).convert("RGB"))


async def engine_answer(messages: list[dict], **spec: Any) -> Any:
    """The simulator engine's completion for the prompt ids the gateway renders for
    ``messages`` (the same tokenizer folder, the same template)."""
    folder = str(model_files.default_model_dir())
    text = load_model_texts([ModelConfig(name=MODEL, tokenizer=folder)])[MODEL]
    ids = await text.chat_ids({"messages": messages})
    return MockEngine(EngineConfig(seed=0)).generate(ids, SamplingSpec(**spec))


async def media_round(url: str, engines: dict[str, list[Recording]]) -> list[int]:
    """A chat with an image, not streamed then streamed, each answering the engine's text for
    the prompt ids; returns how many tensors each prompt-stage request brought."""
    stages = [e for role in ("p", "d", "pd") for e in engines.get(role, [])]
    seen = [len(e.stage_tensors) for e in stages]
    media_text = (await engine_answer(WITH_IMAGE, max_tokens=12, seed=3)).text
    for stream in (False, True):
        text, _, _ = await run(chat, url, WITH_IMAGE, stream)
        assert text == media_text, ("media", stream)
    return [n for e, k in zip(stages, seen, strict=True) for n in e.stage_tensors[k:]]


# -- every flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", list(FLOWS))
async def test_every_flow_gives_the_http_simulators_text(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, flow: str
) -> None:
    ec_dir = str(tmp_path / "ec")
    engines: dict[str, list[Recording]] = {}
    workers = []
    for role, n in FLOWS[flow].items():
        for _ in range(n):
            opts = {"ec_dir": ec_dir} if "e" in FLOWS[flow] and role != "d" else {}
            engine, url = await start_worker(nursery, role, **opts)
            engines.setdefault(role, []).append(engine)
            workers.append((role, url))
    gw, url = await start_gateway(nursery, gateway_config(workers, flow))
    assert all(isinstance(w, NativeWorker) and w.state is WorkerState.HEALTHY for w in gw.registry)
    reference = await sim_worker(role="pd")

    expected, ref_usage, _ = await run(chat, reference.url, TEXT_ONLY, False)
    for stream in (False, True):
        text, usage, finish = await run(chat, url, TEXT_ONLY, stream)
        assert text == expected, (flow, stream)
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            ref_usage.prompt_tokens, ref_usage.completion_tokens,
        )  # fmt: skip
        assert finish in ("stop", "length")
    ref_text, ref_cusage = await run(complete, reference.url, False)
    for stream in (False, True):
        text, usage = await run(complete, url, stream)
        assert text == ref_text, (flow, "completions", stream)
        assert usage.prompt_tokens == ref_cusage.prompt_tokens

    if "d" in FLOWS[flow]:  # the decode side verified the KV the prefill worker computed
        assert sum(e.counters["kv_blocks_verified"] for e in engines["d"]) > 0
        assert sum(e.counters["kv_blocks_published"] for e in engines["p"]) > 0

    tensors = await media_round(url, engines)  # what the media requests' stages brought
    if "e" not in FLOWS[flow]:  # no encoder: the prompt's workers got the pixels themselves
        assert tensors and all(n == 1 for n in tensors), tensors
        return
    assert tensors and all(n == 0 for n in tensors), tensors  # after E: by hash only
    # one Encode for the item (the second request found it in the gateway's encoder cache),
    # carrying the decoded pixels as a tensor frame, not the base64
    encodes = [rec for e in engines["e"] for rec in e.encoded]
    assert len(encodes) == 1
    (media, arrays) = encodes[0]
    assert [m.kind for m in media] == ["image"] and media[0].hash and media[0].tensor == 0
    assert np.array_equal(arrays[0], png_pixels())
    prefill = engines["p" if "p" in engines else "pd"]
    assert sum(e.counters["embeddings_verified"] for e in prefill) == 2  # found in the EC dir


@pytest.mark.parametrize("flow", ["p/d", "e+pd", "e+p+d"])
async def test_handoffs_through_the_gateway_as_tensor_frames(
    nursery: trio.Nursery, sim_worker, flow: str
) -> None:
    """Workers with no side channel and no shared encoder cache (``handoff="gateway"``): the
    prefill's KV and the encoder's outputs come back to the gateway as tensor frames and go on
    to the next stage (``Generate.kv_tensors``; the media item's tensor, with its hash), where
    the simulator verifies them byte for byte. The same text as ever; nothing remembered for
    a repeat, since only the request held the encoder output."""
    engines: dict[str, list[Recording]] = {}
    workers = []
    for role, n in FLOWS[flow].items():
        for _ in range(n):
            engine, url = await start_worker(nursery, role, handoff="gateway")
            engines.setdefault(role, []).append(engine)
            workers.append((role, url))
    gw, url = await start_gateway(nursery, gateway_config(workers, flow))
    reference = await sim_worker(role="pd")
    expected, _, _ = await run(chat, reference.url, TEXT_ONLY, False)
    for stream in (False, True):
        text, _, _ = await run(chat, url, TEXT_ONLY, stream)
        assert text == expected, (flow, stream)
    handoff = gw.metrics.handoff_bytes.values
    if "d" in engines:
        assert sum(e.counters["kv_blocks_verified"] for e in engines["d"]) > 0
        assert handoff[("kv", "frames")] > 0
        assert all(n == 1 for e in engines["d"] for n in e.stage_tensors)  # the KV tensor

    tensors = await media_round(url, engines)
    if "e" not in engines:
        return
    prompt_stage = engines["p" if "p" in engines else "pd"]
    assert sum(e.counters["embeddings_verified"] for e in prompt_stage) == 2  # from the tensor
    assert len([rec for e in engines["e"] for rec in e.encoded]) == 2  # no copy kept: encoded again
    assert handoff[("embeddings", "frames")] > 0
    # P/PD: the embedding; D: the embedding and the KV
    assert sorted(set(tensors)) == ([1, 2] if "d" in engines else [1]), tensors


@pytest.mark.parametrize("flow", ["e+p+d", "e+pd"])
async def test_big_tensors_go_by_shared_memory_on_one_host(
    nursery: trio.Nursery, sim_worker, flow: str
) -> None:
    """Gateway and workers on one host, everything over the threshold (1 byte here): the
    pixels reach the encoder, its output the prompt stage and the prefill's KV the decode
    worker as shared-memory handles (the gateway relays the workers' handles without reading
    them); the text and the verified bytes are as ever."""
    engines: dict[str, list[Recording]] = {}
    workers = []
    for role, n in FLOWS[flow].items():
        for _ in range(n):
            engine, url = await start_worker(
                nursery, role, server={"shm_threshold": 1}, handoff="gateway"
            )
            engines.setdefault(role, []).append(engine)
            workers.append((role, url))
    cfg = msgspec.structs.replace(
        gateway_config(workers, flow), native=NativeConfig(shm_threshold_bytes=1)
    )
    gw, url = await start_gateway(nursery, cfg)
    assert all(w.channel.session.shm for w in gw.registry)
    expected, _, _ = await run(chat, (await sim_worker(role="pd")).url, TEXT_ONLY, False)
    text, _, _ = await run(chat, url, TEXT_ONLY, True)
    assert text == expected
    await media_round(url, engines)
    encodes = [rec for e in engines["e"] for rec in e.encoded]
    assert len(encodes) == 2 and all(np.array_equal(a[0], png_pixels()) for _, a in encodes)
    assert sum(e.shm_refs for e in engines["e"]) == 2  # the pixels
    prompt_stage = engines["p" if "p" in engines else "pd"]
    assert sum(e.counters["embeddings_verified"] for e in prompt_stage) == 2
    assert sum(e.shm_refs for e in prompt_stage) == 2  # the embeddings, E's segments
    if "d" in engines:  # the KV (P's segments), and the embeddings again
        assert sum(e.counters["kv_blocks_verified"] for e in engines["d"]) > 0
        assert sum(e.shm_refs for e in engines["d"]) == 1 + 2 * 2
    assert gw.metrics.handoff_bytes.values[("embeddings", "shm")] > 0
    assert ("embeddings", "frames") not in gw.metrics.handoff_bytes.values

    # one encoder output relayed to 3 choices' legs (6 with P and D): the gateway holds the
    # segment until the request ends, so no leg finds it reused by the encoder's next put
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)

    def three() -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=WITH_IMAGE, max_tokens=4, n=3, seed=1
        )

    answer = await run(three)
    assert len(answer.choices) == 3 and all(c.message.content for c in answer.choices)
    assert sum(e.counters["embeddings_verified"] for e in prompt_stage) == 2 + 3


async def test_a_worker_on_another_host_gets_frames(nursery: trio.Nursery, sim_worker) -> None:
    """The prefill worker shares the gateway's host and hands its KV off in shared memory; the
    decode worker is on another host (another host id at registration), so the gateway reads
    the segment and sends the bytes as a frame. Nothing in shared memory reaches it."""
    _, p = await start_worker(nursery, "p", server={"shm_threshold": 1}, handoff="gateway")
    far, d = await start_worker(nursery, "d", server={"shm_threshold": 1}, host="elsewhere")
    cfg = msgspec.structs.replace(
        gateway_config([("p", p), ("d", d)], "p/d"), native=NativeConfig(shm_threshold_bytes=1)
    )
    gw, url = await start_gateway(nursery, cfg)
    sessions = {w.role: w.channel.session for w in gw.registry}
    assert sessions["p"].shm and not sessions["d"].shm
    expected, _, _ = await run(chat, (await sim_worker(role="pd")).url, TEXT_ONLY, False)
    for stream in (False, True):
        text, _, _ = await run(chat, url, TEXT_ONLY, stream)
        assert text == expected
    assert far.shm_refs == 0 and far.counters["kv_blocks_verified"] > 0


@pytest.mark.parametrize("shm", [0, 1], ids=["frames", "shm"])
async def test_encoder_outputs_sent_back_are_kept_in_the_cache_pool(
    nursery: trio.Nursery, shm: int
) -> None:
    """Encoders without shared storage send their outputs back; with a cache pool the gateway
    keeps each one, so a repeated image skips E and the prompt stages get the kept output
    (by frame; copied out of the encoder's segment when it came by shared memory, so the
    encoder may reuse the segment)."""
    engines: dict[str, list[Recording]] = {}
    workers = []
    for role, n in FLOWS["e+p+d"].items():
        for _ in range(n):
            engine, url = await start_worker(
                nursery, role, server={"shm_threshold": shm or None}, handoff="gateway"
            )
            engines.setdefault(role, []).append(engine)
            workers.append((role, url))
    cfg = msgspec.structs.replace(
        gateway_config(workers, "e+p+d"),
        native=NativeConfig(shm_threshold_bytes=shm),
        cache=CacheConfig(tiers=["memory"]),
    )
    gw, url = await start_gateway(nursery, cfg)
    await media_round(url, engines)  # two requests with the same image
    assert len([rec for e in engines["e"] for rec in e.encoded]) == 1  # the second skipped E
    assert sum(e.counters["embeddings_verified"] for e in engines["p"]) == 2  # both by tensor
    assert sum(e.counters["embeddings_verified"] for e in engines["d"]) == 2
    assert gw.metrics.encoder_cache_hits.values[(MODEL,)] == 1


class WithoutKvTensors(Recording):
    """A decode engine from a build before ``kv_tensors``."""

    @property
    def capabilities(self) -> frozenset[str]:
        return super().capabilities - {"kv_tensors"}


async def test_kv_tensors_go_only_to_a_decode_worker_that_takes_them(
    nursery: trio.Nursery, sim_worker
) -> None:
    """A decode worker without the ``kv_tensors`` capability would ignore the hand-off: the
    gateway sends the request to one that has it, or fails it with a 502 that says why."""
    _, p = await start_worker(nursery, "p", handoff="gateway")
    old = WithoutKvTensors(WorkerOptions(role="d", model=MODEL, speed=math.inf))
    server = await nursery.start(WorkerServer(old, bind="tcp://127.0.0.1:0", control_bind=None).run)
    d_old = "zmq+" + server.endpoint
    new, d_new = await start_worker(nursery, "d")
    _, url = await start_gateway(
        nursery, gateway_config([("p", p), ("d", d_old), ("d", d_new)], "p/d")
    )
    expected, _, _ = await run(chat, (await sim_worker(role="pd")).url, TEXT_ONLY, False)
    for stream in (False, True, False):  # round robin: the old decode is picked at least once
        text, _, _ = await run(chat, url, TEXT_ONLY, stream)
        assert text == expected
    assert not old.stage_tensors and len(new.stage_tensors) == 3

    _, url_old_only = await start_gateway(nursery, gateway_config([("p", p), ("d", d_old)], "p/d"))
    with pytest.raises(openai.APIStatusError) as info:
        await run(chat, url_old_only, TEXT_ONLY, False)
    assert info.value.status_code == 502
    assert "does not take a prefill's KV as tensor frames" in str(info.value)


async def test_response_ids_and_shapes(nursery: trio.Nursery) -> None:
    _, w = await start_worker(nursery, "pd")
    _, url = await start_gateway(nursery, gateway_config([("pd", w)]))
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)

    def ask() -> Any:
        return client.chat.completions.with_raw_response.create(
            model=MODEL, messages=TEXT_ONLY, max_tokens=3, extra_headers={"x-request-id": "abc"}
        )

    raw = await run(ask)
    body = msgspec.json.decode(raw.http_response.content)
    assert raw.headers["x-request-id"] == "abc" and body["id"] == "chatcmpl-abc"
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

    def best_of() -> None:  # n > 1 is fanned out (test_native_fanout.py); best_of is gone
        client.completions.create(model=MODEL, prompt="x", best_of=2)

    with pytest.raises(openai.BadRequestError, match="best_of > 1 is not supported"):
        await run(best_of)

    def bad_for_the_worker() -> None:  # the engine refuses it: its message, as a 400
        client.chat.completions.create(
            model=MODEL, messages=TEXT_ONLY, max_tokens=2, extra_body={"min_tokens": 5}
        )

    with pytest.raises(openai.BadRequestError, match="min_tokens must be less than"):
        await run(bad_for_the_worker)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("handoff", ["direct", "gateway"])
async def test_decode_failing_before_its_first_token_is_retried(
    nursery: trio.Nursery, sim_worker, handoff: str
) -> None:
    """On the other decode worker: with the same hand-off when the KV came through the gateway;
    with a fresh prefill when it stayed on P, named by the params (the failed decode got them
    and may have pulled the blocks, which a NIXL prefill frees once read)."""
    pe, p = await start_worker(nursery, "p", handoff=handoff)
    bad, d_bad = await start_worker(nursery, "d", faults=Faults(error_rate=1.0), handoff=handoff)
    good, d_good = await start_worker(nursery, "d", handoff=handoff)
    gw, url = await start_gateway(nursery, gateway_config([("p", p), ("d", d_bad),
                                                           ("d", d_good)], "p/d"))  # fmt: skip
    expected, _, _ = await run(chat, (await sim_worker(role="pd")).url, TEXT_ONLY, False)
    for stream in (False, True, False):  # round robin: the failing decode is picked at least once
        text, _, _ = await run(chat, url, TEXT_ONLY, stream)
        assert text == expected
    failed = bad.counters["errors_injected"]
    assert failed >= 1  # it failed, and its request was retried
    assert good.counters["kv_blocks_verified"] > 0
    assert gw.metrics.retries.values.get(("d",), 0) == failed
    assert len(pe.stage_tensors) == 3 + (failed if handoff == "direct" else 0)  # prefills


async def test_a_failing_stage_is_a_502_naming_it(nursery: trio.Nursery) -> None:
    _, p = await start_worker(nursery, "p", faults=Faults(error_rate=1.0))
    _, d = await start_worker(nursery, "d")
    _, url = await start_gateway(nursery, gateway_config([("p", p), ("d", d)], "p/d"))
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            await run(chat, url, TEXT_ONLY, stream)
        assert info.value.status_code == 502
        assert "prefill stage failed" in str(info.value)


async def test_channel_state_drives_worker_state(nursery: trio.Nursery) -> None:
    """Drain -> draining, Exit -> ejected (a static worker stays, to come back when it
    registers again), removal closes the channel; the HTTP health monitor (every 0.2 s here)
    leaves native workers alone."""
    engine_a = Recording(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
    server_a = WorkerServer(engine_a, bind="tcp://127.0.0.1:0", control_bind=None)
    await nursery.start(server_a.run)
    _, url_b = await start_worker(nursery, "pd")
    gw, url = await start_gateway(
        nursery, gateway_config([("pd", "zmq+" + server_a.endpoint), ("pd", url_b)])
    )
    a, b = gw.registry.get("pd0"), gw.registry.get("pd1")
    assert isinstance(a, NativeWorker) and isinstance(b, NativeWorker)
    seen: list[WorkerState] = []
    gw.registry.subscribe(lambda w: seen.append(w.state) if w is a else None)
    await trio.sleep(0.5)  # a few monitor rounds
    assert a.state is b.state is WorkerState.HEALTHY and not seen
    server_a.drain("test")
    with trio.fail_after(BOUND):  # the drain ends with Exit: lost, ejected (static worker)
        while a.state is not WorkerState.EJECTED:
            await trio.sleep(0.01)
    assert seen == [WorkerState.DRAINING, WorkerState.EJECTED]
    before = len(engine_a.recent)
    for _ in range(2):
        await run(chat, url, TEXT_ONLY, False)
    assert len(engine_a.recent) == before  # all went to b
    channel = a.channel
    gw.remove_worker("pd0")
    with trio.fail_after(BOUND):
        while channel.state is not ChannelState.CLOSED:
            await trio.sleep(0.01)
    assert b.state is WorkerState.HEALTHY and seen[-1] is WorkerState.GONE


async def test_a_removed_worker_finishes_what_it_has(nursery: trio.Nursery) -> None:
    """As an HTTP worker's requests finish on their own connections, a removed native
    worker's channel stays open until its requests ended, then closes."""
    _, w = await start_worker(nursery, "pd", speed=1.0)
    gw, url = await start_gateway(nursery, gateway_config([("pd", w)]))
    worker = gw.registry.get("pd0")
    assert isinstance(worker, NativeWorker) and worker.channel is not None
    full = await engine_answer(TEXT_ONLY, max_tokens=40, ignore_eos=True)
    got: list[Any] = []

    async def ask() -> None:
        got.append(await run(stream_outcome, url, 40))

    nursery.start_soon(ask)
    with trio.fail_after(BOUND):
        while worker.in_flight == 0:
            await trio.sleep(0.005)
    gw.remove_worker("pd0")
    assert worker.channel.state is ChannelState.READY
    with trio.fail_after(BOUND):
        while worker.channel.state is not ChannelState.CLOSED:
            await trio.sleep(0.01)
    with trio.fail_after(BOUND):
        while not got:
            await trio.sleep(0.01)
    text, finish, _, error = got[0]
    assert error is None and finish == "length" and text == full.text


async def test_curve_links(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``workers[].curve_server_key`` + ``native.curve_secret_key_file``: the channel is
    encrypted and the worker admits the gateway's key; a gateway the worker does not know
    never gets a healthy worker (503)."""
    from lmgw.config import NativeConfig
    from lmgw.transport.zmq.curve import CurveServer, generate_keys

    worker_public, worker_secret = generate_keys(tmp_path / "worker", "worker")
    _, gw_secret = generate_keys(tmp_path / "gw", "gw")
    _, stranger_secret = generate_keys(tmp_path / "stranger", "stranger")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "gw.key").write_bytes((tmp_path / "gw" / "gw.key").read_bytes())
    engine = Recording(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
    server = WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None,
                          curve=CurveServer.from_files(worker_secret, allow))  # fmt: skip
    await nursery.start(server.run)
    plain = gateway_config([("pd", "zmq+" + server.endpoint)])
    for secret, admitted in ((gw_secret, True), (stranger_secret, False)):
        wc = msgspec.structs.replace(plain.workers[0], curve_server_key=str(worker_public))
        cfg = msgspec.structs.replace(
            plain,
            workers=[wc],
            native=NativeConfig(curve_secret_key_file=str(secret)),
            health=msgspec.structs.replace(plain.health, timeout_s=1.0),
        )
        gw, url = await start_gateway(nursery, cfg)
        worker = gw.registry.get("pd0")
        if admitted:
            assert worker.state is WorkerState.HEALTHY
            text, _, _ = await run(chat, url, TEXT_ONLY, False)
            assert text == (await engine_answer(TEXT_ONLY, max_tokens=12, seed=3)).text
        else:
            assert worker.state is not WorkerState.HEALTHY
            with pytest.raises(openai.APIStatusError) as info:
                await run(chat, url, TEXT_ONLY, False)
            assert info.value.status_code == 503
    assert len(engine.recent) == 1  # the stranger's request never reached the engine


async def test_client_disconnect_aborts_on_the_worker(nursery: trio.Nursery) -> None:
    """The abort reaches the engine after the client hung up (latency printed: the issue's
    bound is 100 ms)."""
    latencies = []
    for flow, roles in (("pd", ["pd"]), ("p/d", ["p", "d"])):
        started = [await start_worker(nursery, r, speed=1.0) for r in roles]
        engine = started[-1][0]  # the client-facing worker
        _, url = await start_gateway(
            nursery,
            gateway_config([(r, u) for r, (_, u) in zip(roles, started, strict=True)], flow),
        )
        rid = f"abort-{flow.replace('/', '')}"
        with trio.fail_after(BOUND):
            stream = await raw_chat(url, rid, stream=True)
            got = b""
            while got.count(b'"content"') < 4:  # the role event and 3 tokens
                got += await stream.receive_some(65536)
            await stream.aclose()
            hung_up = trio.current_time()
            while rid not in engine.abort_at:
                await trio.sleep(0.001)
        latencies.append(engine.abort_at[rid] - hung_up)
        run_ = engine.run_of(rid)
        assert run_ is not None and run_.state == "cut"
        assert 3 <= run_.emitted < run_.total == 2000
    print(f"\nabort latency after client disconnect: pd {latencies[0] * 1000:.1f} ms,"
          f" p/d {latencies[1] * 1000:.1f} ms")  # fmt: skip


# -- a worker process killed mid-stream -------------------------------------------------------


def spawn_worker(*extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lmgw.worker", "--role", "pd", "--speed", "1", "--model", MODEL,
           "--bind", "tcp://127.0.0.1:0", "--control-bind", "none", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("READY tcp://"), line
    return proc, "zmq+" + line.split()[1]


def stream_outcome(url: str, max_tokens: int) -> tuple[str, str | None, Any, Exception | None]:
    """(text, finish_reason, usage, error) of one stream that may break."""
    parts: list[str] = []
    finish = usage = None
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
        for chunk in client.chat.completions.create(
            model=MODEL, messages=TEXT_ONLY, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ):  # fmt: skip
            usage = chunk.usage or usage
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
    except openai.APIError as exc:
        return "".join(parts), finish, usage, exc
    return "".join(parts), finish, usage, None


@pytest.mark.slow
@pytest.mark.parametrize("migrate", [1, 0])
async def test_worker_killed_mid_stream_is_continued_or_fails_cleanly(
    nursery: trio.Nursery, migrate: int
) -> None:
    procs: list[subprocess.Popen] = []
    try:
        crasher, crash_url = await trio.to_thread.run_sync(spawn_worker, "--crash-at-token", "4")
        procs.append(crasher)
        workers = [("pd", crash_url)]
        if migrate:
            healthy, healthy_url = await trio.to_thread.run_sync(spawn_worker)
            procs.append(healthy)
            workers.append(("pd", healthy_url))
        cfg = gateway_config(workers, upstream={"migrate_streams": migrate},
                             health={"native_heartbeat_timeout_s": 0.5})  # fmt: skip
        gw, url = await start_gateway(nursery, cfg)
        full = await engine_answer(TEXT_ONLY, max_tokens=30, ignore_eos=True)
        # the crasher streams up to 4 tokens (the last may die with the process), then exits
        before_crash = "".join(full.pieces[:4])
        errors = gw.metrics.upstream_errors.values
        for _ in range(4):  # round robin: until the crasher took one
            text, finish, usage, error = await run(stream_outcome, url, 30)
            if any(labels[1] == "pd0" for labels in errors):
                break
            assert error is None and text == full.text  # served by the healthy worker
        else:
            raise AssertionError("the crashing worker was never chosen")
        assert text.startswith(full.pieces[0]), (text, before_crash)
        if migrate:  # continued on the healthy worker: one stream, to the token budget
            assert error is None and finish == "length", (text, error)
            assert usage.completion_tokens == 30
            assert gw.metrics.migrations.values.get(("pd", "continued")) == 1
        else:  # what the client got, then an error event and [DONE]: no hang
            assert error is not None and "not continued" in str(error), error
            assert before_crash.startswith(text)
        with trio.fail_after(BOUND):
            while gw.registry.get("pd0").state is not WorkerState.EJECTED:
                await trio.sleep(0.01)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=BOUND)


# -- translation and configuration --------------------------------------------------------------


def test_sampling_params_from_an_openai_body() -> None:
    sp = sampling_params(
        "chat",
        {"model": "m", "messages": [], "max_completion_tokens": 7, "max_tokens": 9, "stop": "x",
         "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 1, "min_tokens": 2,
         "stop_token_ids": [5], "ignore_eos": True, "logprobs": True, "top_logprobs": 3,
         "repetition_penalty": 1.1, "user": "u", "stream": True},
    )  # fmt: skip
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.min_tokens) == (
        7, 0.5, 0.9, 4, 1, 2,
    )  # fmt: skip
    assert (sp.stop, sp.stop_token_ids, sp.ignore_eos, sp.logprobs) == (["x"], [5], True, 3)
    assert sp.extra == {"repetition_penalty": 1.1}
    assert sampling_params("completions", {"prompt": "p", "logprobs": 2}).logprobs == 2
    assert sampling_params("chat", {"n": 3}).extra is None  # n is the fan-out's, not sampling
    # prompt_logprobs: a field of its own (never in extra); a stream's 0 asks for nothing
    sp = sampling_params("completions", {"prompt": "p", "prompt_logprobs": 4, "logprobs": 0})
    assert (sp.prompt_logprobs, sp.logprobs, sp.extra) == (4, 0, None)
    sp = sampling_params("chat", {"prompt_logprobs": 0, "stream": True})
    assert (sp.prompt_logprobs, sp.logprobs, sp.extra) == (None, None, None)
    assert sampling_params("chat", {"logprobs": True}).logprobs == 0
    assert sampling_params("chat", {"logprobs": False, "top_logprobs": 0}).logprobs is None
    for body, message in (
        ({"top_logprobs": 2}, "`logprobs` must be set to true"),
        ({"logprobs": True, "top_logprobs": -1}, "`top_logprobs` must be a positive value"),
        ({"prompt_logprobs": 1, "stream": True}, "not available when `stream=True`"),
        ({"prompt_logprobs": -1}, "`prompt_logprobs` must be a positive value"),
        ({"prompt_logprobs": "2"}, "prompt_logprobs must be an integer"),
    ):
        with pytest.raises(GatewayError, match=re.escape(message)):
            sampling_params("chat", body)
    with pytest.raises(GatewayError, match="`logprobs` must be a positive value"):
        sampling_params("completions", {"logprobs": -3})
    # logit_bias: JSON keys are strings; engines take token ids (vLLM clamps to [-100, 100])
    sp = sampling_params("chat", {"logit_bias": {"12": 150, "7": -3.5}})
    assert sp.extra == {"logit_bias": {12: 100.0, 7: -3.5}}
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(sp), type=type(sp)) == sp
    assert sampling_params("chat", {"logit_bias": {}}).extra is None
    for bad in ({"x": 1}, {"1": "2"}, [1]):
        with pytest.raises(GatewayError) as info:
            sampling_params("chat", {"logit_bias": bad})
        assert info.value.param == "logit_bias"
    assert (choices({}), choices({"n": 3, "best_of": 1})) == (1, 3)
    with pytest.raises(Exception, match="best_of"):
        choices({"best_of": 3})
    with pytest.raises(Exception, match="n must be"):
        choices({"n": 0})


def test_native_models_need_a_tokenizer() -> None:
    cfg = GatewayConfig(
        models=[ModelConfig(name=MODEL)], workers=[WorkerConfig(url="zmq+tcp://127.0.0.1:9")]
    )
    with pytest.raises(ValueError, match="tokenizer"):
        Gateway(cfg)
    with pytest.raises(ValueError, match="not a worker URL"):
        WorkerConfig(url="zmq+tcp://127.0.0.1")
    assert WorkerConfig(url="ZMQ+IPC:///tmp/w.sock").url == "zmq+ipc:///tmp/w.sock"


class Pairing(Recording):
    """Remembers the request ids of its Prefills and Generates."""

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.ids: list[str] = []

    def generate(self, req: Any) -> Any:
        self.ids.append(req.msg.request_id)
        return super().generate(req)

    async def prefill(self, req: Any) -> Any:
        self.ids.append(req.msg.request_id)
        return await super().prefill(req)


async def test_native_pd_decodes_in_the_prefills_zone(nursery: trio.Nursery) -> None:
    """Joint placement over the native protocol: the decode worker of a P/D request is picked
    in the zone of the prefill worker that holds its KV."""
    engines: dict[str, Pairing] = {}
    workers: list[WorkerConfig] = []
    # zones across the registration order: round robin at both stages would pair across them
    for wid, role, zone in (("p0", "p", "a"), ("p1", "p", "b"), ("d0", "d", "b"),
                            ("d1", "d", "a")):  # fmt: skip
        engine = engines[wid] = Pairing(WorkerOptions(role=role, model=MODEL, speed=math.inf))
        server = await nursery.start(
            WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None).run
        )
        workers.append(WorkerConfig(url="zmq+" + server.endpoint, role=role, id=wid, zone=zone))
    cfg = gateway_config([], "p/d")
    cfg = msgspec.structs.replace(cfg, workers=workers)
    _, url = await start_gateway(nursery, cfg)
    for i in range(8):
        await run(chat, url, [{"role": "user", "content": f"question {i}"}], False)
    for p, d in (("p0", "d1"), ("p1", "d0")):
        assert engines[p].ids and set(engines[p].ids) == set(engines[d].ids)


@pytest.mark.parametrize("handoff", ["direct", "gateway"])
@pytest.mark.parametrize("fault", ["error_rate", "crash_at_token"])
async def test_native_pd_under_faults_every_request_ends_cleanly(
    nursery: trio.Nursery, sim_worker, handoff: str, fault: str
) -> None:
    """24 requests at once (half streamed) over ZeroMQ while one prefill worker fails a third
    of its requests and one decode worker fails a third too, or fails every request after 3
    tokens (a stream breaks mid-way and is continued elsewhere). Each request ends: with the
    HTTP simulator's exact text (a continued stream: the simulated engine words the rest of a
    continuation its own way, so only the first tokens are compared), or a 502 naming the
    stage (in a continued stream: its error event, when the continuation's prefill failed);
    the load accounting returns to zero."""
    faults = Faults(error_rate=0.3) if fault == "error_rate" else Faults(crash_at_token=3)
    workers = [
        ("p", (await start_worker(nursery, "p", handoff=handoff))[1]),
        ("p", (await start_worker(nursery, "p", handoff=handoff,
                                  faults=Faults(error_rate=0.3), fault_seed=3))[1]),
        ("d", (await start_worker(nursery, "d", handoff=handoff))[1]),
        ("d", (await start_worker(nursery, "d", handoff=handoff, faults=faults,
                                  fault_seed=5))[1]),
    ]  # fmt: skip
    gw, url = await start_gateway(nursery, gateway_config(workers, "p/d"))
    reference = await sim_worker(role="pd")

    def body(i: int, stream: bool) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "content": f"item {i}: go"}],
                "max_tokens": 8, "temperature": 0.0, "stream": stream}  # fmt: skip

    expected = {}
    for i in range(24):
        r = await http_request(reference.url, "POST", "/v1/chat/completions", body(i, False))
        expected[i] = r.json()["choices"][0]["message"]["content"]
    statuses: dict[int, int] = {}

    async def one(i: int) -> None:
        stream = i % 2 == 1
        with trio.fail_after(BOUND):
            r = await http_request(url, "POST", "/v1/chat/completions", body(i, stream))
        statuses[i] = r.status
        if r.status != 200:
            assert r.status == 502 and "stage failed" in r.json()["error"]["message"], r.body
            return
        if not stream:
            assert r.json()["choices"][0]["message"]["content"] == expected[i], i
            return
        events = r.events()
        assert events[-1] == "[DONE]", events[-3:]
        errors = [e["error"]["message"] for e in events[:-1] if "error" in e]
        assert all(m.startswith("prefill stage failed") for m in errors), errors
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if e.get("choices"))  # fmt: skip
        if fault == "error_rate":  # no stream broke mid-way
            assert not errors and text == expected[i], (i, text, expected[i])
        else:
            assert text[:8] == expected[i][:8], (i, text, expected[i])

    async with trio.open_nursery() as run_all:
        for i in range(24):
            run_all.start_soon(one, i)
    assert len(statuses) == 24 and list(statuses.values()).count(200) >= 12
    if fault == "crash_at_token":  # streams that broke on the crashing decode went on elsewhere
        assert gw.metrics.migrations.values.get(("d", "continued"), 0) > 0
    with trio.fail_after(BOUND):
        while any(w.in_flight for w in gw.registry):
            await trio.sleep(0.02)
