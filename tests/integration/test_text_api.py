"""Gateway-side tokenization: /tokenize and /detokenize, the context-length check, and the
tokenization parity self-test against workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import http_request

from lmgw.config import GatewayConfig, HealthConfig, ModelConfig, ServerConfig, WorkerConfig
from lmgw.errors import GatewayError
from lmgw.gateway import Gateway
from lmgw.http.server import serve_http
from lmgw.http.types import Request, Responder
from lmgw.simulators.model_files import ensure_model_dir
from lmgw.text import ChatTemplate, ModelTokenizer

MODEL = "sim-model"
JSON = [(b"content-type", b"application/json")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def text(model_dir: Path) -> tuple[ModelTokenizer, ChatTemplate]:
    tok = ModelTokenizer.load(model_dir)
    return tok, ChatTemplate.load(model_dir, special_tokens=tok.special_tokens_map)


class Worker:
    """A fake vLLM worker: records generation bodies; /tokenize answers with ``tokenize``."""

    def __init__(self, tokenize) -> None:
        self.tokenize = tokenize
        self.tokenize_calls = 0
        self.seen: list[dict] = []
        self.url = ""

    async def __call__(self, req: Request, responder: Responder) -> None:
        if req.method == "GET":
            body = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            await responder.send_full(200, JSON, msgspec.json.encode(body))
            return
        obj = msgspec.json.decode(req.body)
        if req.path == "/tokenize":
            self.tokenize_calls += 1
            ids = self.tokenize(obj)
            answer = {"count": len(ids), "max_model_len": 32768, "tokens": ids}
            await responder.send_full(200, JSON, msgspec.json.encode(answer))
            return
        self.seen.append(obj)
        answer = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        await responder.send_full(200, JSON, msgspec.json.encode(answer))


def worker_tokens(tok: ModelTokenizer, tmpl: ChatTemplate):
    def tokenize(obj: dict) -> list[int]:
        if "messages" in obj:
            rendered = tmpl.render(obj["messages"], add_generation_prompt=True)
            return tok.encode(rendered, add_special_tokens=obj.get("add_special_tokens", False))
        return tok.encode(obj["prompt"], add_special_tokens=obj.get("add_special_tokens", True))

    return tokenize


async def start(nursery: trio.Nursery, workers: list[Worker], **model: Any) -> tuple[str, Gateway]:
    for w in workers:
        port = await nursery.start(serve_http, w, "127.0.0.1", 0)
        w.url = f"http://127.0.0.1:{port}"
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, **model)],
        workers=[WorkerConfig(url=w.url, role="pd", id=f"w{i}") for i, w in enumerate(workers)],
    )
    gw = Gateway(cfg)
    port = await nursery.start(gw.run)
    return f"http://127.0.0.1:{port}", gw


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 😀 there"}]


async def test_tokenize_and_detokenize_answered_by_the_gateway(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    tok, tmpl = text
    w = Worker(worker_tokens(tok, tmpl))
    url, gw = await start(nursery, [w], tokenizer=str(model_dir))
    with trio.fail_after(5):  # the parity probes go to the worker's /tokenize first
        while not gw.parity.reports:
            await trio.sleep(0.02)
    calls = w.tokenize_calls
    r = await http_request(url, "POST", "/tokenize", {"model": MODEL, "messages": CHAT})
    assert r.status == 200, r.body
    expected = tok.encode(tmpl.render(CHAT, add_generation_prompt=True), add_special_tokens=False)
    assert r.json()["tokens"] == expected and r.json()["count"] == len(expected)
    assert r.json()["max_model_len"] == tok.max_model_len
    r = await http_request(
        url, "POST", "/tokenize", {"prompt": "plain text", "return_token_strs": True}
    )
    ids = r.json()["tokens"]
    assert ids == tok.encode("plain text") and len(r.json()["token_strs"]) == len(ids)
    r = await http_request(url, "POST", "/detokenize", {"model": MODEL, "tokens": ids})
    assert r.status == 200 and r.json()["prompt"] == tok.decode(ids)
    r = await http_request(url, "POST", "/detokenize", {"tokens": [10**9]})
    assert r.status == 400 and r.json()["error"]["param"] == "tokens"
    r = await http_request(url, "POST", "/tokenize", {"model": "nope", "prompt": "x"})
    assert r.status == 404
    assert w.tokenize_calls == calls  # none of these reached the worker


async def test_tokenize_is_relayed_without_a_gateway_tokenizer(nursery: trio.Nursery, text) -> None:
    w = Worker(lambda obj: [7, 8, 9])
    url, _ = await start(nursery, [w])
    r = await http_request(url, "POST", "/tokenize", {"model": MODEL, "prompt": "x"})
    assert r.status == 200 and r.json()["tokens"] == [7, 8, 9]


async def test_parity_match_and_mismatch_are_reported(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    tok, tmpl = text
    same = Worker(worker_tokens(tok, tmpl))
    differs = Worker(lambda obj: worker_tokens(tok, tmpl)(obj)[1:])  # e.g. a lost BOS/token
    url, gw = await start(nursery, [same, differs], tokenizer=str(model_dir))
    assert gw.parity is not None
    with trio.fail_after(5):
        while len(gw.parity.reports) < 2:
            await trio.sleep(0.02)
    metrics = (await http_request(url, "GET", "/metrics")).body.decode()
    assert 'lmgw_tokenizer_parity{model="sim-model",worker="w0"} 1' in metrics
    assert 'lmgw_tokenizer_parity{model="sim-model",worker="w1"} 0' in metrics
    assert gw.parity.token_routing_safe[MODEL] is False
    assert "position" in gw.parity.reports[(MODEL, "w1")] or gw.parity.reports[(MODEL, "w1")]


def test_a_bad_tokenizer_folder_stops_the_start(tmp_path: Path) -> None:
    cfg = GatewayConfig(models=[ModelConfig(name="m", tokenizer=str(tmp_path / "missing"))])
    with pytest.raises(ValueError, match="model 'm'"):
        Gateway(cfg)


async def test_context_length_is_checked_and_max_tokens_filled_like_vllm(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    tok, tmpl = text
    w = Worker(worker_tokens(tok, tmpl))
    url, gw = await start(nursery, [w], tokenizer=str(model_dir), max_model_len=64)
    long = [{"role": "user", "content": "word " * 200}]
    r = await http_request(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": long})
    assert r.status == 400, r.body
    assert "maximum context length is 64 tokens" in r.json()["error"]["message"]
    prompt_len = len(
        tok.encode(tmpl.render(CHAT, add_generation_prompt=True), add_special_tokens=False)
    )
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 64 - prompt_len + 1}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 400 and r.json()["error"]["param"] == "max_tokens"
    assert w.seen == []  # refused before any worker was busy
    r = await http_request(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
    assert r.status == 200, r.body
    assert w.seen[-1]["max_tokens"] == 64 - prompt_len  # what fits, as vLLM defaults it
    r = await http_request(
        url, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    )
    assert r.status == 200 and w.seen[-1]["max_tokens"] == 3  # given: forwarded as sent
    # the compiled lane checked the two it served itself; the server answered the refusals
    relay = gw.server.lane.relay
    assert relay.served == 2 and gw.server.lane.app.declined["error"] == 2


async def test_truncate_prompt_tokens_is_applied_before_the_context_check_like_vllm(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    """vLLM keeps the prompt's last k tokens before checking the context length: a long prompt
    with ``truncate_prompt_tokens`` is served, not refused (and max_tokens fills what is left
    after truncation); the body goes to the worker as sent, which truncates it itself."""
    tok, tmpl = text
    w = Worker(worker_tokens(tok, tmpl))
    url, gw = await start(nursery, [w], tokenizer=str(model_dir), max_model_len=64)
    long = [{"role": "user", "content": "word " * 200}]
    body = {"model": MODEL, "messages": long, "truncate_prompt_tokens": 20}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert w.seen[-1]["max_tokens"] == 64 - 20 and w.seen[-1]["truncate_prompt_tokens"] == 20
    r = await http_request(
        url, "POST", "/v1/completions",
        {"model": MODEL, "prompt": "word " * 200, "truncate_prompt_tokens": -1, "max_tokens": 1},
    )  # fmt: skip
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"  # 64 left: no room
    for bad, words in ((65, "greater than max_model_len (64)"), (0, "-1 or a positive"),
                       ("3", "-1 or a positive")):  # fmt: skip
        body = {"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": bad}
        r = await http_request(url, "POST", "/v1/completions", body)
        assert r.status == 400 and words in r.json()["error"]["message"], r.body
        assert r.json()["error"]["param"] == "truncate_prompt_tokens"
    mt = gw.texts[MODEL]
    ids = await mt.completion_ids({"prompt": "word " * 10})
    assert await mt.completion_ids({"prompt": "word " * 10, "truncate_prompt_tokens": 4}) == [
        ids[0][-4:]
    ]
    assert await mt.completion_ids({"prompt": [5, 6, 7], "truncate_prompt_tokens": 9}) == [
        [5, 6, 7]
    ]


async def test_a_requests_own_chat_template_is_left_to_the_worker(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    """The gateway cannot count a prompt rendered with a template it does not run: the context
    check steps aside (the worker renders and checks); prompt ids are not made from it."""
    tok, tmpl = text
    w = Worker(worker_tokens(tok, tmpl))
    url, gw = await start(nursery, [w], tokenizer=str(model_dir), max_model_len=64)
    long = [{"role": "user", "content": "word " * 200}]
    body = {"model": MODEL, "messages": long, "chat_template": "{{ messages[0].content }}"}
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and w.seen[-1]["chat_template"] == body["chat_template"]
    assert "max_tokens" not in w.seen[-1]
    with pytest.raises(GatewayError) as info:  # what a native worker's prompt would need
        await gw.texts[MODEL].chat_ids(body)
    assert info.value.status == 400 and info.value.param == "chat_template"


async def test_usage_is_counted_when_the_worker_leaves_it_out(
    nursery: trio.Nursery, model_dir: Path, text
) -> None:
    tok, tmpl = text

    class NoUsage(Worker):
        async def __call__(self, req: Request, responder: Responder) -> None:
            if req.method == "POST" and req.path == "/v1/chat/completions":
                answer = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "fine thanks"}}
                    ],
                }
                await responder.send_full(200, JSON, msgspec.json.encode(answer))
                return
            await super().__call__(req, responder)

    w = NoUsage(worker_tokens(tok, tmpl))
    url, gw = await start(nursery, [w], tokenizer=str(model_dir))
    r = await http_request(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
    assert r.status == 200, r.body
    usage = r.json()["usage"]
    prompt = len(
        tok.encode(tmpl.render(CHAT, add_generation_prompt=True), add_special_tokens=False)
    )
    completion = len(tok.encode("fine thanks", add_special_tokens=False))
    assert usage == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert gw.server.lane.relay.served == 1  # counted in the compiled lane
