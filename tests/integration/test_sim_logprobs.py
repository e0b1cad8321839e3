"""Logprobs, batches and ``n > 1`` end to end through the gateway, against simulated workers
whose logprobs are a deterministic function of (prompt, seed, position), like their text:

* SGLang ``/generate`` through ``sglang-bootstrap`` P/D: P answers the prompt's logprobs, D
  the output's (D computed no prompt position), and the gateway puts P's in front; the client
  gets exactly what a merged worker answers, for one prompt, a batch, ``n = 2`` and a batch
  sampled twice (one room per (prompt, sample)), JSON and SSE.
* Chat and completions logprobs (``top_logprobs``, ``prompt_logprobs``) equal through the
  merged flow, vLLM NIXL P/D and SGLang P/D, streamed or not; the values are valid.
* Native (ZeroMQ) workers, merged or a P/D pair, answer the HTTP simulator's values exactly:
  chat ``top_logprobs`` 0, 3 and 20, completions ``logprobs: k`` (echo, batches),
  ``prompt_logprobs``, whole and streamed, ``n = 2``; the same 400s as vLLM; a worker without
  the ``top_logprobs`` capability never answers a request that needs alternatives.
* The simulators themselves: a room paired with the wrong prompt fails loudly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import trio
from gateway_support import MODEL, RawResponse, http_request

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import SimWorker, WorkerOptions, model_files, serve_worker_inprocess
from lmgw.worker.server import WorkerServer
from lmgw.worker.sim import SimEngine

BOUND = 20.0
LONG = "Summarise the history of the Roman empire in a few short sentences, please. " * 3
MESSAGES = [{"role": "user", "content": LONG}]


async def start_gateway(
    nursery: trio.Nursery, flow: str, dialect: str, workers: list[WorkerConfig], **model: Any
) -> str:
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        routing=RoutingConfig(policy="round_robin"),
        models=[ModelConfig(name=MODEL, flow=flow, dialect=dialect, **model)],
        workers=workers,
    )
    with trio.fail_after(BOUND):
        port = await nursery.start(Gateway(cfg).run)
    return f"http://127.0.0.1:{port}"


async def sim(nursery: trio.Nursery, role: str) -> tuple[SimWorker, str]:
    worker = SimWorker(WorkerOptions(role=role, model=MODEL, speed=math.inf))
    return worker, await nursery.start(serve_worker_inprocess, worker)


async def pd_pair(nursery: trio.Nursery, dialect: str) -> tuple[str, SimWorker, SimWorker]:
    """A gateway in front of one prefill and one decode simulator speaking ``dialect``."""
    p, p_url = await sim(nursery, "p")
    d, d_url = await sim(nursery, "d")
    port = int(p_url.rsplit(":", 1)[1])
    workers = [
        WorkerConfig(url=p_url, role="p", bootstrap_port=port),
        WorkerConfig(url=d_url, role="d"),
    ]
    return await start_gateway(nursery, "p/d", dialect, workers), p, d


async def merged(nursery: trio.Nursery) -> str:
    _, url = await sim(nursery, "pd")
    return await start_gateway(nursery, "pd", "openai", [WorkerConfig(url=url, role="pd")])


async def post(url: str, path: str, body: dict[str, Any]) -> RawResponse:
    r = await http_request(url, "POST", path, body, timeout=BOUND)
    assert r.status == 200, (url, path, r.status, r.body[:500])
    return r


def answer(r: RawResponse) -> Any:
    """The JSON body, or the SSE events (``[DONE]`` included)."""
    return r.events() if r.headers["content-type"].startswith("text/event-stream") else r.json()


def generate_view(obj: Any) -> Any:
    """A ``/generate`` answer without what differs by route: the request ids, and the cached
    tokens (D counts the KV it fetched, a merged worker its own prefix cache)."""
    if isinstance(obj, list):
        return [generate_view(o) for o in obj]
    if not isinstance(obj, dict):
        return obj
    out = copy.deepcopy(obj)
    out["meta_info"].pop("id")
    out["meta_info"].pop("cached_tokens")
    return out


def check_valid(entries: list[dict[str, Any]], k: int) -> None:
    """vLLM chat logprob entries: values <= 0, ``k`` alternatives best first, the chosen
    token among them whenever it is at least as likely as the last of them."""
    assert entries
    for e in entries:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        top = e["top_logprobs"]
        assert len(top) == k
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        if k and e["logprob"] >= values[-1]:
            assert {"token": e["token"], "logprob": e["logprob"]} in [
                {"token": t["token"], "logprob": t["logprob"]} for t in top
            ]


# -- SGLang /generate through sglang-bootstrap P/D --------------------------------------------

GENERATE_CASES = {
    "one prompt, top 3, text": {
        "text": LONG,
        "sampling_params": {"max_new_tokens": 10},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    },
    "default start": {
        "text": LONG,
        "sampling_params": {"max_new_tokens": 6},
        "return_logprob": True,
    },
    "batch of 2": {
        "text": [LONG, "Another prompt, shorter than the first one."],
        "sampling_params": {"max_new_tokens": 8},
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 2,
    },
    "n=2": {
        "input_ids": list(range(100, 140)),
        "sampling_params": {"max_new_tokens": 8, "n": 2},
        "return_logprob": True,
        "logprob_start_len": 5,
    },
    "batch of 2, n=2": {
        "text": [LONG, "Another prompt, shorter than the first one."],
        "sampling_params": {"max_new_tokens": 6, "n": 2},
        "return_logprob": True,
        "logprob_start_len": 0,
    },
    "no logprobs": {"text": [LONG, "Tiny."], "sampling_params": {"max_new_tokens": 5}},
}
SEQUENCES = {"batch of 2": 2, "n=2": 2, "batch of 2, n=2": 4, "no logprobs": 2}


async def test_generate_through_sglang_pd_equals_the_merged_worker(
    nursery: trio.Nursery,
) -> None:
    ref_url = await merged(nursery)
    pd_url, p, d = await pd_pair(nursery, "sglang-bootstrap")
    for name, body in GENERATE_CASES.items():
        sequences = SEQUENCES.get(name, 1)
        for stream in (False, True):
            req = {**body, "stream": stream}
            released = p.kv_store.released
            expected = answer(await post(ref_url, "/generate", req))
            got = answer(await post(pd_url, "/generate", req))
            assert generate_view(got) == generate_view(expected), (name, stream)
            # one room per (prompt, sample): each one's KV fetched from P and verified
            assert p.kv_store.released - released == sequences, (name, stream)
            assert d.stats.kv_verify_failures == 0
            if stream:
                assert got[-1] == "[DONE]"
                continue
            items = expected if isinstance(expected, list) else [expected]
            assert len(items) == sequences
            if "return_logprob" not in body:
                assert all("input_token_logprobs" not in o["meta_info"] for o in items)
                continue
            for o in items:
                meta = o["meta_info"]
                inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
                start = body.get("logprob_start_len", meta["prompt_tokens"] - 1)
                # the prompt's positions from logprob_start_len; the first one has no value
                assert len(inputs) == meta["prompt_tokens"] - start and inputs[0][0] is None
                assert all(lp < 0 for lp, _, _ in inputs[1:] + outputs)
                assert [t for _, t, _ in outputs] == o["output_ids"]
                with_text = body.get("return_text_in_logprobs", False)
                assert all((text is not None) == with_text for _, _, text in inputs + outputs)
                if body.get("top_logprobs_num"):
                    tops = meta["output_top_logprobs"]
                    assert len(tops) == len(outputs) and meta["input_top_logprobs"][0] is None
                    for lps in tops + meta["input_top_logprobs"][1:]:
                        values = [v for v, _, _ in lps]
                        assert len(values) == body["top_logprobs_num"]
                        assert values == sorted(values, reverse=True)
    # the samples of one prompt differ (their own completions), as on the merged worker
    pair = await post(ref_url, "/generate", GENERATE_CASES["n=2"])
    a, b = pair.json()
    assert a["output_ids"] != b["output_ids"]


async def test_sglang_prefill_and_decode_answer_their_halves(nursery: trio.Nursery) -> None:
    """Straight to the simulators: P the prompt's logprobs and its first token, D the output's
    and none of the prompt's (so the gateway's merge is what makes the client's list whole)."""
    _, p_url = await sim(nursery, "p")
    _, d_url = await sim(nursery, "d")
    _, pd_url = await sim(nursery, "pd")
    port = int(p_url.rsplit(":", 1)[1])
    body = {**GENERATE_CASES["one prompt, top 3, text"], "bootstrap_host": "127.0.0.1",
            "bootstrap_port": port, "bootstrap_room": 7}  # fmt: skip
    out: dict[str, Any] = {}

    async def leg(name: str, url: str) -> None:
        out[name] = (await post(url, "/generate", body)).json()["meta_info"]

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as legs:
            legs.start_soon(leg, "d", d_url)
            legs.start_soon(leg, "p", p_url)
    ref = (await post(pd_url, "/generate", GENERATE_CASES["one prompt, top 3, text"])).json()
    ref_meta = ref["meta_info"]
    assert out["p"]["input_token_logprobs"] == ref_meta["input_token_logprobs"]
    assert out["p"]["input_top_logprobs"] == ref_meta["input_top_logprobs"]
    assert out["p"]["output_token_logprobs"] == ref_meta["output_token_logprobs"][:1]
    assert out["d"]["input_token_logprobs"] == [] == out["d"]["input_top_logprobs"]
    assert out["d"]["output_token_logprobs"] == ref_meta["output_token_logprobs"]
    assert out["d"]["output_top_logprobs"] == ref_meta["output_top_logprobs"]


async def test_sglang_rooms_pair_each_sequence_or_fail_loudly(nursery: trio.Nursery) -> None:
    _, p_url = await sim(nursery, "p")
    d, d_url = await sim(nursery, "d")
    d.options.bootstrap_timeout_s = 0.5
    port = int(p_url.rsplit(":", 1)[1])
    batch = {
        "text": [LONG, "Another prompt, shorter than the first one."],
        "sampling_params": {"max_new_tokens": 4},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": port,
    }
    results: dict[str, RawResponse] = {}

    async def leg(name: str, url: str, body: dict[str, Any]) -> None:
        results[name] = await http_request(url, "POST", "/generate", body, timeout=BOUND)

    # D's rooms in the other order: each room holds the other prompt's KV
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as legs:
            legs.start_soon(leg, "d", d_url, {**batch, "bootstrap_room": [22, 11]})
            legs.start_soon(leg, "p", p_url, {**batch, "bootstrap_room": [11, 22]})
    assert results["p"].status == 200
    err = results["d"]
    assert err.status == 500, err.body
    msg = err.json()["error"]["message"]
    assert "bootstrap_room" in msg and "different prompt" in msg
    assert d.stats.kv_verify_failures == 1
    # a prompt's samples cannot share its room: one room per (prompt, sample), or one room
    sampled = {**batch, "sampling_params": {"n": 2}, "bootstrap_room": [1, 2]}
    r = await http_request(d_url, "POST", "/generate", sampled, timeout=BOUND)
    assert r.status == 400 and "4 sequences" in r.json()["error"]["message"], r.body
    dup = {**batch, "bootstrap_room": [5, 5]}
    r = await http_request(d_url, "POST", "/generate", dup, timeout=BOUND)
    assert r.status == 400 and "room of its own" in r.json()["error"]["message"]


# -- OpenAI logprobs across flows ---------------------------------------------------------------


def stream_logprobs(events: list[Any], field: str) -> dict[int, Any]:
    """Per choice index: the chat ``content`` entries or the completion lists, joined."""
    out: dict[int, Any] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            lp = c.get("logprobs")
            if not lp:
                continue
            if field == "content":
                out.setdefault(c["index"], []).extend(lp["content"])
            else:
                acc = out.setdefault(c["index"], {k: [] for k in lp})
                for k, v in lp.items():
                    acc[k].extend(v)
    return out


async def test_chat_and_completion_logprobs_equal_across_flows(nursery: trio.Nursery) -> None:
    urls = {
        "merged": await merged(nursery),
        "vllm-nixl": (await pd_pair(nursery, "vllm-nixl"))[0],
        "sglang-bootstrap": (await pd_pair(nursery, "sglang-bootstrap"))[0],
    }
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "seed": 5,
            "logprobs": True, "top_logprobs": 3}  # fmt: skip
    completion = {"model": MODEL, "prompt": LONG, "max_tokens": 10, "logprobs": 2}
    for n in (1, 2):
        answers = {}
        for flow, url in urls.items():
            body = (await post(url, "/v1/chat/completions", {**chat, "n": n})).json()
            answers[flow] = [(c["message"]["content"], c["logprobs"]) for c in body["choices"]]
            streamed_body = {**chat, "n": n, "stream": True}
            events = answer(await post(url, "/v1/chat/completions", streamed_body))
            streamed = stream_logprobs(events, "content")
            assert [streamed[i] for i in range(n)] == [lp["content"] for _, lp in answers[flow]]
        assert answers["vllm-nixl"] == answers["merged"] == answers["sglang-bootstrap"], n
        for text, lp in answers["merged"]:
            check_valid(lp["content"], 3)
            assert "".join(e["token"] for e in lp["content"]) == text
        if n == 2:
            assert answers["merged"][0] != answers["merged"][1]
    # a batch of prompts sampled twice: one room per (prompt, sample) through SGLang's P/D
    batch = {**completion, "prompt": [LONG, "Another one."], "n": 2, "logprobs": 1}
    by_flow = [
        (await post(urls[flow], "/v1/completions", batch)).json()["choices"]
        for flow in ("merged", "sglang-bootstrap")
    ]
    assert by_flow[0] == by_flow[1] and len(by_flow[0]) == 4
    # prompt_logprobs (every worker computes the prompt's the same) and completions' shapes
    seen: dict[str, list[Any]] = {"prompt": [], "completion": []}
    for flow in ("merged", "vllm-nixl"):
        body = await post(urls[flow], "/v1/chat/completions", {**chat, "prompt_logprobs": 2})
        plp = body.json()["prompt_logprobs"]
        assert plp[0] is None and all(1 <= len(p) <= 3 for p in plp[1:])
        seen["prompt"].append(plp)
        r = (await post(urls[flow], "/v1/completions", completion)).json()
        (choice,) = r["choices"]
        seen["completion"].append(choice)
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"]
        offsets = lp["text_offset"]
        assert offsets[0] == 0
        steps = zip(offsets, offsets[1:], lp["tokens"], strict=False)
        assert all(b - a == len(t) for a, b, t in steps)
        for tok, value, top in zip(
            lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
        ):
            assert top[tok] == value and 2 <= len(top) <= 3  # the best 2, and the chosen one
        events = answer(await post(urls[flow], "/v1/completions", {**completion, "stream": True}))
        assert stream_logprobs(events, "lists")[0] == lp
    assert seen["prompt"][0] == seen["prompt"][1]
    assert seen["completion"][0] == seen["completion"][1]
    bad = await http_request(
        urls["merged"], "POST", "/v1/chat/completions", {**chat, "top_logprobs": 21}, timeout=BOUND
    )
    assert bad.status == 400 and "max allowed: 20" in bad.body.decode()


# -- the native protocol answers the HTTP simulator's values -----------------------------------


async def native_gateway(nursery: trio.Nursery, flow: str = "pd") -> str:
    """A gateway in front of native simulated workers (``pd``, or a ``p/d`` pair), once they
    registered."""
    workers = []
    for role in ("p", "d") if flow == "p/d" else ("pd",):
        engine = SimEngine(WorkerOptions(role=role, model=MODEL, speed=math.inf))
        with trio.fail_after(BOUND):
            server = await nursery.start(
                WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None).run
            )
        workers.append(WorkerConfig(url="zmq+" + server.endpoint, role=role, id=role + "0"))
    url = await start_gateway(
        nursery, flow, "openai", workers, tokenizer=str(model_files.default_model_dir())
    )
    probe = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    with trio.fail_after(BOUND):
        while (await http_request(url, "POST", "/v1/completions", probe)).status == 503:
            await trio.sleep(0.05)  # the native worker registers with the gateway
    return url


def body_view(obj: dict[str, Any]) -> dict[str, Any]:
    """A whole answer without what differs by route: ids, ``created`` and cached tokens."""
    out = copy.deepcopy(obj)
    for key in ("id", "created"):
        out.pop(key)
    out["usage"].pop("prompt_tokens_details", None)
    return out


CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "seed": 2, "logprobs": True}
COMPLETION = {"model": MODEL, "prompt": LONG, "max_tokens": 8}
NATIVE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    *[(f"chat top {k}", "/v1/chat/completions", {**CHAT, "top_logprobs": k}) for k in (0, 3, 20)],
    ("chat, no top_logprobs", "/v1/chat/completions", CHAT),
    *[(f"completion {k}", "/v1/completions", {**COMPLETION, "logprobs": k}) for k in (0, 2, 5)],
    ("completion echo", "/v1/completions", {**COMPLETION, "logprobs": 3, "echo": True}),
    (
        "completion batch",
        "/v1/completions",
        {**COMPLETION, "prompt": [LONG, "Another one."], "logprobs": 1},
    ),
    # vLLM's return_tokens_as_token_ids: tokens named "token_id:N" (prompt logprobs keep text)
    (
        "chat token ids",
        "/v1/chat/completions",
        {**CHAT, "top_logprobs": 2, "return_tokens_as_token_ids": True},
    ),
    (
        "completion token ids, echo",
        "/v1/completions",
        {**COMPLETION, "logprobs": 2, "echo": True, "return_tokens_as_token_ids": True},
    ),
]
PROMPT_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat prompt 0", "/v1/chat/completions", {**CHAT, "prompt_logprobs": 0}),
    (
        "chat prompt 2, top 3",
        "/v1/chat/completions",
        {**CHAT, "top_logprobs": 3, "prompt_logprobs": 2},
    ),
    (
        "chat prompt 20, no logprobs",
        "/v1/chat/completions",
        {**CHAT, "logprobs": False, "prompt_logprobs": 20},
    ),
    ("completion prompt 3", "/v1/completions", {**COMPLETION, "logprobs": 2, "prompt_logprobs": 3}),
    (
        "completion batch prompt 1",
        "/v1/completions",
        {**COMPLETION, "prompt": [LONG, "Another one."], "prompt_logprobs": 1},
    ),
]


@pytest.mark.parametrize("flow", ["pd", "p/d"])
async def test_native_worker_gives_the_http_simulators_logprobs(
    nursery: trio.Nursery, flow: str
) -> None:
    """Chat ``top_logprobs`` (0, 3, 20), completions ``logprobs: k`` (echo, batches): the
    native workers' answers (merged, or a P/D pair's decode worker) are the HTTP simulator's,
    whole and streamed, ``n`` 1 and 2."""
    http_url = await merged(nursery)
    native_url = await native_gateway(nursery, flow)
    for name, path, body in NATIVE_CASES:
        field = "content" if path == "/v1/chat/completions" else "lists"
        for n in (1, 2):
            req = {**body, "n": n}
            ref = (await post(http_url, path, req)).json()
            got = (await post(native_url, path, req)).json()
            assert body_view(got) == body_view(ref), (name, n)
            lps = [c["logprobs"] for c in ref["choices"]]
            assert all(lp is not None for lp in lps), name
            if field == "content":
                for lp in lps:
                    check_valid(lp["content"], body.get("top_logprobs", 0))
            if n == 2:
                assert lps[0] != lps[1], name
            events = answer(await post(native_url, path, {**req, "stream": True}))
            ref_events = answer(await post(http_url, path, {**req, "stream": True}))
            assert events[-1] == "[DONE]"
            streamed = stream_logprobs(events, field)
            assert streamed == stream_logprobs(ref_events, field), (name, n)
            want = {c["index"]: c["logprobs"] for c in ref["choices"]}
            if field == "content":
                want = {i: lp["content"] for i, lp in want.items()}
            elif body.get("return_tokens_as_token_ids"):
                # vLLM's offsets: by the names within an answer, by the text from one event
                # to the next; with names that are not the text, the two differ (both sides)
                for lps in (streamed, want):
                    for lp in lps.values():
                        lp.pop("text_offset")
            assert streamed == want, (name, n)


@pytest.mark.parametrize("flow", ["pd", "p/d"])
async def test_native_worker_gives_the_http_simulators_prompt_logprobs(
    nursery: trio.Nursery, flow: str
) -> None:
    """``prompt_logprobs``: chat's at the top level, completions' per choice (each prompt's
    in a batch; the extra choices of ``n = 2`` did not compute them but carry them). In P/D
    the decode worker answers them, as over HTTP."""
    http_url = await merged(nursery)
    native_url = await native_gateway(nursery, flow)
    for name, path, body in PROMPT_CASES:
        for n in (1, 2):
            req = {**body, "n": n}
            ref = (await post(http_url, path, req)).json()
            got = (await post(native_url, path, req)).json()
            assert body_view(got) == body_view(ref), (name, n)
            k = body["prompt_logprobs"]
            if path == "/v1/chat/completions":
                plps = [ref["prompt_logprobs"]]
            else:
                plps = [c["prompt_logprobs"] for c in ref["choices"]]
                assert len(plps) == n * (2 if isinstance(body["prompt"], list) else 1)
            for plp in plps:
                assert plp[0] is None and all(1 <= len(p) <= k + 1 for p in plp[1:]), name
                ranks = [[v["rank"] for v in p.values()] for p in plp[1:]]
                assert any(r[0] > k for r in ranks) or k == 20, name  # the prompt token first
        # a stream asking for none is answered (without them), as vLLM
        if body["prompt_logprobs"] == 0:
            streamed = {**body, "stream": True}
            events = answer(await post(native_url, path, streamed))
            ref_events = answer(await post(http_url, path, streamed))
            field = "content" if path == "/v1/chat/completions" else "lists"
            assert stream_logprobs(events, field) == stream_logprobs(ref_events, field)
            assert all("prompt_logprobs" not in e for e in events[:-1])


class OlderEngine(SimEngine):
    """A worker built before the ``top_logprobs`` capability: sampled tokens' values only."""

    @property
    def capabilities(self) -> frozenset[str]:
        return super().capabilities - {"top_logprobs"}


async def test_alternatives_go_only_to_workers_that_send_them(nursery: trio.Nursery) -> None:
    """A request that needs alternatives or prompt logprobs is never answered by an older
    worker (it would leave them out): another worker takes it, else a 502 that says why;
    the older worker is not blamed, and still answers ``top_logprobs: 0``."""
    workers = []
    for name, cls in (("old", OlderEngine), ("new", SimEngine)):
        engine = cls(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
        with trio.fail_after(BOUND):
            server = await nursery.start(
                WorkerServer(engine, bind="tcp://127.0.0.1:0", control_bind=None).run
            )
        workers.append(WorkerConfig(url="zmq+" + server.endpoint, role="pd", id=name))
    tok = str(model_files.default_model_dir())
    both = await start_gateway(nursery, "pd", "openai", workers, tokenizer=tok)
    old_only = await start_gateway(nursery, "pd", "openai", workers[:1], tokenizer=tok)
    ref_url = await merged(nursery)
    probe = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for url in (both, old_only):
        with trio.fail_after(BOUND):
            while (await http_request(url, "POST", "/v1/completions", probe)).status == 503:
                await trio.sleep(0.05)
    asks = [{**CHAT, "top_logprobs": 3}, {**CHAT, "prompt_logprobs": 1}]
    for body in asks:
        ref = (await post(ref_url, "/v1/chat/completions", body)).json()
        for _ in range(4):  # round robin: half of them picked the old worker first
            got = (await post(both, "/v1/chat/completions", body)).json()
            assert body_view(got) == body_view(ref)
        for _ in range(6):  # more than health.outlier_failures (5): no passive ejection
            r = await http_request(old_only, "POST", "/v1/chat/completions", body, timeout=BOUND)
            assert r.status == 502 and "capability top_logprobs" in r.body.decode(), r.body
    plain = {**CHAT, "top_logprobs": 0}
    ref = (await post(ref_url, "/v1/chat/completions", plain)).json()
    got = (await post(old_only, "/v1/chat/completions", plain)).json()
    assert body_view(got) == body_view(ref)


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"top_logprobs": 2}, "`logprobs` must be set to true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "must be a positive value"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "max allowed: 20"),
    ("/v1/chat/completions", {"prompt_logprobs": 21}, "max allowed: 20"),
    ("/v1/chat/completions", {"prompt_logprobs": -2}, "must be a positive value"),
    ("/v1/completions", {"logprobs": 21}, "max allowed: 20"),
    ("/v1/completions", {"logprobs": -1}, "must be a positive value"),
]


async def test_native_path_refuses_what_vllm_refuses(nursery: trio.Nursery) -> None:
    """The same 400s (status and vLLM's message) from a native worker as from the HTTP
    simulator; ``prompt_logprobs`` above 0 in a stream too."""
    http_url = await merged(nursery)
    native_url = await native_gateway(nursery)
    stream_case = ("/v1/chat/completions", {"prompt_logprobs": 1},
                   "not available when `stream=True`")  # fmt: skip
    for stream in (False, True):
        cases = [stream_case] if stream else []
        cases += [c for c in REFUSALS if not (stream and "prompt_logprobs" in c[1])]
        for path, extra, message in cases:
            base = {"model": MODEL, "max_tokens": 4, "stream": stream}
            base.update({"messages": MESSAGES} if "chat" in path else {"prompt": LONG})
            req = {**base, **extra}
            for url in (http_url, native_url):
                r = await http_request(url, "POST", path, req, timeout=BOUND)
                assert r.status == 400, (url, extra, r.body)
                assert message in r.json()["error"]["message"], (url, extra, r.body)


@pytest.mark.parametrize("stream", [False, True])
async def test_logprob_requests_vllm_refuses(nursery: trio.Nursery, stream: bool) -> None:
    _, url = await sim(nursery, "pd")
    base = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": stream}
    cases = [
        ({"top_logprobs": 2}, "`logprobs` must be set to true"),
        ({"logprobs": True, "top_logprobs": -1}, "must be a positive value"),
        ({"logprobs": True, "top_logprobs": 21}, "max allowed: 20"),
    ]
    if stream:
        cases.append(({"prompt_logprobs": 1}, "not available when `stream=True`"))
    for extra, message in cases:
        r = await http_request(url, "POST", "/v1/chat/completions", {**base, **extra})
        assert r.status == 400 and message in r.json()["error"]["message"], (extra, r.body)


async def test_tokens_named_by_id(nursery: trio.Nursery) -> None:
    """``return_tokens_as_token_ids``: every token and alternative is ``token_id:N``; the
    prompt's ``decoded_token`` stays text, as in vLLM."""
    native_url = await native_gateway(nursery, "pd")
    req = {**CHAT, "top_logprobs": 2, "prompt_logprobs": 1, "return_tokens_as_token_ids": True}
    got = (await post(native_url, "/v1/chat/completions", req)).json()
    content = got["choices"][0]["logprobs"]["content"]
    names = [e["token"] for e in content] + [a["token"] for e in content for a in e["top_logprobs"]]
    assert names and all(n.startswith("token_id:") and n[9:].isdigit() for n in names)
    assert all(bytes(e["bytes"]) == e["token"].encode() for e in content)
    decoded = [v["decoded_token"] for p in got["prompt_logprobs"][1:] for v in p.values()]
    assert decoded and not any(d.startswith("token_id:") for d in decoded)
