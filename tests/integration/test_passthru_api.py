"""vLLM's non-generation HTTP surface through the gateway (api/passthru.py) on both front-door
servers: embeddings and the pooling family, Anthropic messages, batched chat, audio, the
Responses API with its response-id affinity, and ``GET /version``. The official ``openai``
client where it has the API, raw HTTP elsewhere; simulated vLLM workers behind.

The simulator is deterministic and keeps stored responses in each worker's memory as vLLM does,
so a follow-up that reaches the wrong worker is a 404: the affinity tests fail without it.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayFactory,
    GatewayHandle,
    http_request,
    metric_value,
    server_config,
)

from lmgw.config import (
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.workers.worker import WorkerState

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("hard_deadline")

ERROR_KEYS = ["code", "message", "param", "type"]


async def in_thread(fn, *args: Any, timeout: float = 10.0) -> Any:
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def client_for(gw: GatewayHandle, key: str = "test-key") -> Any:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=8.0)


def error_of(r: Any, status: int) -> dict[str, Any]:
    """The OpenAI error body of an answer with ``status``."""
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert sorted(body["error"]) == ERROR_KEYS, body
    if status != 403:  # a key's refusal carries OpenAI's string code
        assert body["error"]["code"] == status
    return body["error"]


def worker_holding(gw: GatewayHandle, response_id: str) -> int:
    """Which simulated worker stored ``response_id`` (exactly one must)."""
    holders = [i for i, s in enumerate(gw.sims) if response_id in s.sim.response_store.entries]
    assert len(holders) == 1, holders
    return holders[0]


# == embeddings and the pooling family ============================================================


async def test_embeddings_with_the_openai_client(gateway: GatewayFactory) -> None:
    gw = await gateway(2, models=[MODEL], aliases=["emb"])
    direct = await http_request(
        gw.sims[0].url, "POST", "/v1/embeddings", {"model": MODEL, "input": ["hello", "world"]}
    )
    expected = [d["embedding"] for d in direct.json()["data"]]

    def run() -> tuple[Any, Any, Any]:
        client = client_for(gw)
        # the client asks for base64 unless told otherwise, and decodes it
        b64 = client.embeddings.create(model=MODEL, input=["hello", "world"])
        floats = client.embeddings.create(model="emb", input="hello", encoding_format="float")
        short = client.embeddings.create(model=MODEL, input=[[1, 2, 3]], dimensions=8)
        return b64, floats, short

    b64, floats, short = await in_thread(run)
    assert len(b64.data) == 2
    for got, want in zip(b64.data, expected, strict=True):  # float32 on the wire
        assert got.embedding == pytest.approx(want, abs=1e-6)
    assert b64.usage.prompt_tokens == direct.json()["usage"]["prompt_tokens"]
    assert floats.model == MODEL  # the alias reached the worker as the model's name
    assert floats.data[0].embedding == pytest.approx(expected[0], abs=1e-12)
    vec = short.data[0].embedding
    assert len(vec) == 8 and math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-6)
    metrics = await gw.metrics()
    sample = f'lmgw_requests_total{{endpoint="embeddings",model="{MODEL}",flow="pd",status="200"}}'
    assert metric_value(metrics, sample) == 3


async def test_pooling_score_rerank_routes(gateway: GatewayFactory) -> None:
    gw = await gateway(2)
    r = await gw.request(
        "POST", "/pooling", {"model": MODEL, "input": "x", "encoding_format": "base64"}
    )
    assert r.status == 200 and r.json()["data"][0]["object"] == "pooling"
    raw = base64.b64decode(r.json()["data"][0]["data"])
    assert len(raw) == 4 * 256 and struct.unpack("<256f", raw)
    r = await gw.request("POST", "/classify", {"model": MODEL, "input": ["a", "b"]})
    assert r.status == 200 and [d["num_classes"] for d in r.json()["data"]] == [2, 2]
    for path in ("/score", "/v1/score"):
        r = await gw.request(
            "POST", path, {"model": MODEL, "text_1": "paris", "text_2": ["paris", "rome"]}
        )
        assert r.status == 200, r.body
        scores = [d["score"] for d in r.json()["data"]]
        assert scores[0] == pytest.approx(1.0) and 0.0 <= scores[1] < 1.0
    docs = ["rome", "paris", "berlin"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = await gw.request(
            "POST", path, {"model": MODEL, "query": "paris", "documents": docs, "top_n": 2}
        )
        assert r.status == 200, r.body
        results = r.json()["results"]
        assert len(results) == 2 and results[0]["index"] == 1
        assert results[0]["document"]["text"] == "paris"
    r = await gw.request("POST", "/v2/embed", {"model": MODEL, "texts": ["a"]})
    assert r.status == 200 and len(r.json()["embeddings"]["float"][0]) == 256
    metrics = await gw.metrics()
    sample = f'lmgw_requests_total{{endpoint="rerank",model="{MODEL}",flow="pd",status="200"}}'
    assert metric_value(metrics, sample) == 3


# == the Responses API and its affinity ============================================================


async def test_responses_previous_id_reaches_the_storing_worker(gateway: GatewayFactory) -> None:
    # round robin over three workers: without affinity, every follow-up lands elsewhere
    gw = await gateway(3)

    def run() -> list[Any]:
        client = client_for(gw)
        turns = [client.responses.create(model=MODEL, input="Tell me about Paris.")]
        for text in ("And Rome?", "And Berlin?", "Which is largest?"):
            turns.append(
                client.responses.create(model=MODEL, input=text, previous_response_id=turns[-1].id)
            )
        return turns

    turns = await in_thread(run)
    assert all(t.status == "completed" and t.output_text for t in turns)
    holder = worker_holding(gw, turns[0].id)
    assert [worker_holding(gw, t.id) for t in turns] == [holder] * 4
    # the same conversation asked of the holder directly gives the same text
    direct = await http_request(
        gw.sims[holder].url,
        "POST",
        "/v1/responses",
        {"model": MODEL, "input": "And Rome?", "previous_response_id": turns[0].id},
    )
    assert direct.json()["output"][0]["content"][0]["text"] == turns[1].output_text

    def retrieve() -> list[Any]:
        client = client_for(gw)
        return [client.responses.retrieve(t.id) for t in turns]

    got = await in_thread(retrieve)
    assert [g.id for g in got] == [t.id for t in turns]
    assert [g.output_text for g in got] == [t.output_text for t in turns]
    metrics = await gw.metrics()
    assert metric_value(metrics, "lmgw_response_affinity_entries") == 4
    assert metric_value(metrics, 'lmgw_response_affinity_total{outcome="hit"}') == 7


async def test_responses_stream_records_the_id(gateway: GatewayFactory) -> None:
    gw = await gateway(3)

    def run() -> tuple[list[Any], Any]:
        client = client_for(gw)
        events = list(client.responses.create(model=MODEL, input="Hello", stream=True))
        first = events[0].response.id
        follow = list(
            client.responses.create(
                model=MODEL, input="More", previous_response_id=first, stream=True
            )
        )
        return events, follow

    events, follow = await in_thread(run)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    first = events[0].response.id
    assert follow[-1].type == "response.completed"
    assert worker_holding(gw, follow[-1].response.id) == worker_holding(gw, first)
    # a stored response replayed as a stream, from an event on
    r = await gw.request("GET", f"/v1/responses/{first}?stream=true&starting_after=1")
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.body.startswith(b"event: response.output_item.added\ndata: ")
    assert r.body.rstrip().split(b"\n")[-2] == b"event: response.completed"


async def test_responses_follow_up_errors(gateway: GatewayFactory) -> None:
    gw = await gateway(3)
    unknown = {"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}
    err = error_of(await gw.request("POST", "/v1/responses", unknown), 404)
    assert "resp_nope" in err["message"] and err["param"] == "previous_response_id"
    error_of(await gw.request("GET", "/v1/responses/resp_nope"), 404)
    error_of(await gw.request("POST", "/v1/responses/resp_nope/cancel"), 404)
    error_of(await gw.request("DELETE", "/v1/responses/resp_nope"), 405)
    error_of(await gw.request("GET", "/v1/responses/resp_nope/input_items"), 404)

    async def create() -> tuple[str, str]:
        r = await gw.request("POST", "/v1/responses", {"model": MODEL, "input": "hi"})
        assert r.status == 200, r.body
        rid = r.json()["id"]
        return rid, f"w{worker_holding(gw, rid)}"

    follow = {"model": MODEL, "input": "more"}
    # drained: reads still reach it, a new turn is refused
    rid, wid = await create()
    gw.gateway.drain_worker(wid)
    assert (await gw.request("GET", f"/v1/responses/{rid}")).status == 200
    err = error_of(
        await gw.request("POST", "/v1/responses", {**follow, "previous_response_id": rid}), 409
    )
    assert wid in err["message"] and "draining" in err["message"]
    # out of rotation (ejected): worth a retry
    rid, wid = await create()
    worker = gw.gateway.registry.get(wid)
    gw.gateway.registry.set_state(worker, WorkerState.EJECTED, "probe failed")
    err = error_of(await gw.request("GET", f"/v1/responses/{rid}"), 503)
    assert "ejected" in err["message"]
    # removed: gone with its worker
    rid, wid = await create()
    gw.gateway.remove_worker(wid)
    err = error_of(
        await gw.request("POST", "/v1/responses", {**follow, "previous_response_id": rid}), 404
    )
    assert "left the fleet" in err["message"] and wid in err["message"]
    metrics = await gw.metrics()
    assert metric_value(metrics, 'lmgw_response_affinity_total{outcome="gone"}') == 3


async def test_responses_background_cancel(gateway: GatewayFactory) -> None:
    gw = await gateway(2, speed=0.5)
    body = {"model": MODEL, "input": "a long story", "background": True}
    r = await gw.request("POST", "/v1/responses", body)
    assert r.status == 200 and r.json()["status"] == "queued"
    rid = r.json()["id"]

    def cancel() -> Any:
        return client_for(gw).responses.cancel(rid)

    assert (await in_thread(cancel)).status == "cancelled"
    # a second cancel is the worker's 400, passed on
    err = error_of(await gw.request("POST", f"/v1/responses/{rid}/cancel"), 400)
    assert "Cannot cancel" in err["message"]


async def test_responses_single_worker_serves_unknown_ids(gateway: GatewayFactory) -> None:
    # one merged worker: an id the gateway never saw (e.g. it restarted) can only be there
    gw = await gateway(1)
    direct = await http_request(
        gw.sims[0].url, "POST", "/v1/responses", {"model": MODEL, "input": "hi"}
    )
    rid = direct.json()["id"]
    r = await gw.request(
        "POST", "/v1/responses", {"model": MODEL, "input": "more", "previous_response_id": rid}
    )
    assert r.status == 200 and r.json()["previous_response_id"] == rid


# == Anthropic messages, batched chat, audio =======================================================

ANTHROPIC = {
    "model": MODEL,
    "max_tokens": 16,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
}


async def test_anthropic_messages_relayed_untouched(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    rid = {"x-request-id": "same-id"}
    for stream in (False, True):
        body = {**ANTHROPIC, "stream": stream}
        direct = await http_request(gw.sims[0].url, "POST", "/v1/messages", body, rid)
        via = await gw.request("POST", "/v1/messages", body, rid)
        assert via.status == 200 and via.body == direct.body
    lines = via.body.split(b"\n")
    assert lines[0] == b"event: message_start" and b"event: message_stop" in lines
    r = await gw.request(
        "POST", "/v1/messages", {**ANTHROPIC, "stream": True}, {"x-api-key": "whatever"}
    )
    assert r.status == 200
    r = await gw.request("POST", "/v1/messages/count_tokens", {**ANTHROPIC, "max_tokens": None})
    assert r.status == 200 and r.json()["input_tokens"] > 0


async def test_chat_batch_and_audio(gateway: GatewayFactory) -> None:
    gw = await gateway(2, models=[MODEL], aliases=["whisper"])
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    r = await gw.request("POST", "/v1/chat/completions/batch", {"model": MODEL, "messages": convs})
    assert r.status == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]

    def run() -> Any:
        client = client_for(gw)
        return client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF" * 64))

    a = await in_thread(run)
    # the file before the model, as curl -F sends it; the alias rewritten inside the form
    form = (
        b"--XyZ\r\nContent-Disposition: form-data; name=file; filename=a.wav\r\n"
        b"Content-Type: audio/wav\r\n\r\n" + b"RIFF" * 64 + b"\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--XyZ--\r\n'
    )
    ctype = {"content-type": "multipart/form-data; boundary=XyZ"}
    b = await gw.request("POST", "/v1/audio/translations", form, ctype)
    assert b.status == 200, b.body
    assert a.text and b.json()["text"] and a.text != b.json()["text"]
    bad = await gw.request("POST", "/v1/audio/transcriptions", {"model": MODEL})
    assert "multipart/form-data" in error_of(bad, 400)["message"]


# == errors, keys, /version =======================================================================


async def test_errors(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    err = error_of(await gw.request("POST", "/v1/embeddings", {"model": "nope", "input": "x"}), 404)
    assert err["param"] == "model"
    # the worker's 400 passed on with its message
    bad = {"model": MODEL, "input": "x", "dimensions": 100000}
    assert "dimensions" in error_of(await gw.request("POST", "/v1/embeddings", bad), 400)["message"]
    error_of(await gw.request("POST", "/v1/embeddings", b"[1]"), 400)
    error_of(await gw.request("POST", "/v1/embeddings", {"model": 3}), 400)
    await gw.sims[0].set_faults(error_rate=1.0)
    err = error_of(await gw.request("POST", "/rerank", {"model": MODEL, "query": "q"}), 502)
    assert "w0" in err["message"]


async def test_retry_deadline_and_abort(gateway: GatewayFactory) -> None:
    # a worker that refuses requests (503): each is retried on the other one
    gw = await gateway(2, limits={"request_timeout_s": 0.3})
    await gw.sims[1].set_faults(refuse=True)
    for _ in range(2):  # round robin: one of them tries w1 first
        r = await gw.request("POST", "/v1/embeddings", {"model": MODEL, "input": "x"})
        assert r.status == 200, r.body
    assert metric_value(await gw.metrics(), 'lmgw_retries_total{role="pd"}') == 1
    # the deadline: a 504 in OpenAI's shape, and the worker hears the abort
    for sim in gw.sims:
        await sim.set_faults(hang=True, refuse=False)
    headers = {"x-request-id": "hung-1"}
    body = {"model": MODEL, "input": "hello", "stream": True}
    err = error_of(await gw.request("POST", "/v1/responses", body, headers), 504)
    assert "deadline" in err["message"]
    with trio.fail_after(3):
        while not any(a["request_id"] == "hung-1" for s in gw.sims for a in s.sim.stats.aborted):
            await trio.sleep(0.01)


async def test_keys_apply_to_pass_through(gateway: GatewayFactory) -> None:
    keys = [
        ApiKeyConfig(key="sk-alpha-0123456789", name="alpha"),
        ApiKeyConfig(key="sk-beta-01234567890", name="beta"),
        ApiKeyConfig(key="sk-narrow-012345678", name="narrow", models=["other"]),
    ]
    gw = await gateway(2, models=[MODEL, "other"], auth=AuthConfig(keys=keys))
    alpha = {"authorization": "Bearer sk-alpha-0123456789"}
    beta = {"authorization": "Bearer sk-beta-01234567890"}
    narrow = {"x-api-key": "sk-narrow-012345678"}  # Anthropic's header works too
    emb = {"model": MODEL, "input": "x"}
    assert (await gw.request("POST", "/v1/embeddings", emb)).status == 401
    assert (await gw.request("POST", "/v1/embeddings", emb, alpha)).status == 200
    error_of(await gw.request("POST", "/v1/messages", ANTHROPIC, narrow), 403)
    r = await gw.request("POST", "/v1/responses", {"model": MODEL, "input": "hi"}, alpha)
    rid = r.json()["id"]
    assert (await gw.request("GET", f"/v1/responses/{rid}", None, alpha)).status == 200
    # another key cannot read or continue it: to that key it does not exist
    error_of(await gw.request("GET", f"/v1/responses/{rid}", None, beta), 404)
    follow = {"model": MODEL, "input": "more", "previous_response_id": rid}
    error_of(await gw.request("POST", "/v1/responses", follow, beta), 404)


async def test_version(gateway: GatewayFactory) -> None:
    gw = await gateway(2)
    r = await gw.request("GET", "/version")
    assert r.status == 200
    body = r.json()
    assert body["server"] == "lmgw" and body["version"]
    assert body["workers"] == {"w0": "0.0.0+lmgw.sim", "w1": "0.0.0+lmgw.sim"}


async def test_disaggregated_model_needs_merged_workers(
    nursery: trio.Nursery, server: str, sim_worker: Any
) -> None:
    # "split" runs p/d only; "mixed" runs p/d for generation and has a merged worker too
    p = await sim_worker(role="p", served_model_names=("split", "mixed"))
    d = await sim_worker(role="d", served_model_names=("split", "mixed"))
    pd = await sim_worker(model="mixed")
    cfg = GatewayConfig(
        server=server_config(server, port=0, graceful_shutdown_s=1.0),
        health=HealthConfig(interval_s=30.0),
        models=[ModelConfig(name="split", flow="p/d"), ModelConfig(name="mixed", flow="p/d")],
        workers=[
            WorkerConfig(url=p.url, role="p", id="p0", models=["split", "mixed"]),
            WorkerConfig(url=d.url, role="d", id="d0", models=["split", "mixed"]),
            WorkerConfig(url=pd.url, role="pd", id="m0", models=["mixed"]),
        ],
    )
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    err = error_of(
        await http_request(gw.url, "POST", "/v1/embeddings", {"model": "split", "input": "x"}), 400
    )
    assert "/v1/embeddings" in err["message"] and "'p/d'" in err["message"]
    assert err["param"] == "model"
    r = await http_request(gw.url, "POST", "/v1/embeddings", {"model": "mixed", "input": "x"})
    assert r.status == 200 and r.json()["model"] == "mixed"
    assert pd.sim.stats.requests_total == 1 and p.sim.stats.requests_total == 0
    # generation of the same model still runs its p/d legs
    chat = {"model": "mixed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = await http_request(gw.url, "POST", "/v1/chat/completions", chat)
    assert r.status == 200, r.body
    assert p.sim.stats.requests_total == 1 and pd.sim.stats.requests_total == 1


async def test_a_pass_through_body_priority_is_bounded_by_its_key(
    gateway: GatewayFactory,
) -> None:
    """Embeddings carry vLLM's ``priority`` like generation requests: a key's ``min_priority``
    refuses more urgency (403); at or above it the request is served."""
    keys = [ApiKeyConfig(key="sk-capped-012345678", name="capped", min_priority=0)]
    gw = await gateway(1, auth=AuthConfig(keys=keys))
    capped = {"authorization": "Bearer sk-capped-012345678"}
    emb = {"model": MODEL, "input": "x"}
    err = error_of(await gw.request("POST", "/v1/embeddings", {**emb, "priority": -1}, capped), 403)
    assert (err["code"], err["param"]) == ("priority_not_allowed", "priority")
    assert (
        await gw.request("POST", "/v1/embeddings", {**emb, "priority": 2}, capped)
    ).status == 200
    error_of(await gw.request("POST", "/v1/embeddings", {**emb, "priority": "x"}, capped), 400)
