"""The simulated worker's LoRA adapters over real HTTP: vLLM's runtime load/unload routes (their
exact bodies, statuses and error types), adapters in /v1/models, adapters as ``model``, per-adapter
counts in /sim/stats, ``--lora-modules`` at start, /sim/reset as an engine restart, and a prefix
cache (and KV events) per adapter."""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import pytest
import trio
import zmq
from conftest import SimFactory
from gateway_support import MODEL, RawResponse, SimHandle, http_request

from lmgw.routing.kv_events import decode_vllm_batch
from lmgw.simulators.engine import block_hashes, lora_root
from lmgw.simulators.lora import LoraAdapters, parse_lora_module
from lmgw.simulators.worker import build_parser, options_from_args
from lmgw.transport.zmq import ZmqSocket

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
SIM_MAX_MODEL_LEN = 32768  # the sim-model folder's config.json
MESSAGES = [{"role": "user", "content": "Say hello."}]


async def load(h: SimHandle, name: str, path: str, **extra: Any) -> RawResponse:
    return await http_request(h.url, "POST", LOAD, {"lora_name": name, "lora_path": path, **extra})


async def unload(h: SimHandle, name: str) -> RawResponse:
    return await http_request(h.url, "POST", UNLOAD, {"lora_name": name})


async def chat(h: SimHandle, model: str) -> RawResponse:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4}
    return await http_request(h.url, "POST", "/v1/chat/completions", body)


async def model_ids(h: SimHandle) -> list[str]:
    r = await http_request(h.url, "GET", "/v1/models")
    assert r.status == 200, r.body
    return [card["id"] for card in r.json()["data"]]


def error(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# -- load and unload ------------------------------------------------------------------------------


async def test_load_and_unload_answer_vllm_plain_text(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    r = await load(h, "sql", "/adapters/sql")
    assert r.status == 200
    assert r.body == b"Success: LoRA adapter 'sql' added successfully."
    assert "content-type" not in r.headers  # vLLM answers a bare string
    r = await unload(h, "sql")
    assert r.status == 200
    assert r.body == b"Success: LoRA adapter 'sql' removed successfully."
    assert await model_ids(h) == [MODEL]


async def test_load_errors_are_vllm_error_bodies(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    both = error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
    r = await load(h, "", "/adapters/x")
    assert (r.status, r.json()) == (400, both)
    r = await load(h, "x", "")
    assert (r.status, r.json()) == (400, both)
    r = await http_request(h.url, "POST", LOAD, {"lora_name": "x"})  # absent: a validation 400
    assert r.status == 400
    assert r.json()["error"]["type"] == "BadRequestError"
    assert "lora_path" in r.json()["error"]["message"]
    assert (await load(h, "x", "/adapters/x")).status == 200
    r = await load(h, "x", "/adapters/other")
    assert r.status == 400
    assert r.json() == error(
        "The lora adapter 'x' has already been loaded. If you want to load the adapter in "
        "place, set 'load_inplace' to True.",
        "InvalidUserInput",
        400,
    )
    assert h.sim.lora.as_dict() == {"x": "/adapters/x"}


async def test_load_inplace_repoints_an_adapter_in_its_place(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    assert (await load(h, "a", "/v1/a")).status == 200
    assert (await load(h, "b", "/v1/b")).status == 200
    r = await load(h, "a", "/v2/a", load_inplace=True)
    assert r.status == 200
    assert r.body == b"Success: LoRA adapter 'a' added successfully."
    cards = (await http_request(h.url, "GET", "/v1/models")).json()["data"]
    assert [(c["id"], c["root"]) for c in cards] == [
        (MODEL, MODEL),
        ("a", "/v2/a"),
        ("b", "/v1/b"),
    ]


async def test_unload_errors(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    r = await unload(h, "ghost")
    assert r.status == 404
    assert r.json() == error("The lora adapter 'ghost' cannot be found.", "NotFoundError", 404)
    r = await unload(h, "")
    assert r.status == 400
    assert r.json() == error(
        "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400
    )
    r = await http_request(h.url, "GET", UNLOAD)
    assert r.status == 405


async def test_lora_routes_need_the_api_key(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True, api_key="k")
    assert (await load(h, "a", "/a")).status == 401
    r = await http_request(
        h.url, "POST", LOAD, {"lora_name": "a", "lora_path": "/a"}, {"authorization": "Bearer k"}
    )
    assert r.status == 200
    assert h.sim.lora.as_dict() == {"a": "/a"}


# -- /v1/models and requests ----------------------------------------------------------------------


async def test_models_list_adapters_after_the_base_model(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True, served_model_names=("base", "alias"))
    assert (await load(h, "sql", "/adapters/sql")).status == 200
    assert (await load(h, "chat", "/adapters/chat")).status == 200
    cards = (await http_request(h.url, "GET", "/v1/models")).json()["data"]
    assert [c["id"] for c in cards] == ["base", "alias", "sql", "chat"]
    base, sql = cards[0], cards[2]
    assert (base["root"], base["parent"], base["max_model_len"]) == (
        MODEL,
        None,
        SIM_MAX_MODEL_LEN,
    )
    assert {k: v for k, v in sql.items() if k not in ("created", "permission")} == {
        "id": "sql",
        "object": "model",
        "owned_by": "vllm",
        "root": "/adapters/sql",
        "parent": "base",
        "max_model_len": None,
    }
    assert isinstance(sql["created"], int)
    assert len(sql["permission"]) == 1
    assert sql["permission"][0]["object"] == "model_permission"


async def test_requests_name_an_adapter_and_are_counted(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    assert (await load(h, "sql", "/adapters/sql")).status == 200
    r = await chat(h, "sql")
    assert r.status == 200, r.body
    assert r.json()["model"] == "sql"
    body = {"model": "sql", "prompt": "SELECT", "max_tokens": 2}
    r = await http_request(h.url, "POST", "/v1/completions", body)
    assert r.status == 200, r.body
    assert r.json()["model"] == "sql"
    assert (await chat(h, MODEL)).status == 200  # the base model: not an adapter's
    r = await http_request(h.url, "POST", "/tokenize", {"model": "sql", "prompt": "hi"})
    assert r.status == 200  # accepted, but runs nothing: not counted
    stats = await h.stats()
    assert stats["lora_requests"] == {"sql": 2}
    assert stats["lora_adapters"] == {"sql": "/adapters/sql"}
    assert stats["requests_total"] == 3


async def test_an_unloaded_adapter_is_an_unknown_model(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    assert (await load(h, "sql", "/adapters/sql")).status == 200
    assert (await chat(h, "sql")).status == 200
    assert (await unload(h, "sql")).status == 200
    r = await chat(h, "sql")
    assert r.status == 404
    assert r.json() == error("The model `sql` does not exist.", "NotFoundError", 404, "model")
    assert await model_ids(h) == [MODEL]


async def test_without_enable_lora_the_routes_do_not_exist(sim_worker: SimFactory) -> None:
    h = await sim_worker()
    for path in (LOAD, UNLOAD):
        r = await http_request(h.url, "POST", path, {"lora_name": "a", "lora_path": "/a"})
        assert (r.status, r.body) == (404, b'{"detail":"Not Found"}')
    assert (await chat(h, "a")).status == 404
    assert (await h.stats())["lora_requests"] == {}


# -- start-up adapters and reset ------------------------------------------------------------------


async def test_lora_modules_load_at_start_and_imply_enable_lora(sim_worker: SimFactory) -> None:
    h = await sim_worker(lora_modules=(("sql", "/adapters/sql"), ("law", "/adapters/law")))
    assert await model_ids(h) == [MODEL, "sql", "law"]
    r = await chat(h, "law")
    assert (r.status, r.json()["model"]) == (200, "law")
    assert (await load(h, "extra", "/adapters/extra")).status == 200


def test_cli_flags() -> None:
    parse = build_parser().parse_args
    opts = options_from_args(parse(["--lora-modules", "sql=/a/sql", "x=/p=q"]), as_process=False)
    assert opts.enable_lora is True
    assert opts.lora_modules == (("sql", "/a/sql"), ("x", "/p=q"))
    opts = options_from_args(parse(["--enable-lora"]), as_process=False)
    assert (opts.enable_lora, opts.lora_modules) == (True, ())
    opts = options_from_args(parse([]), as_process=False)
    assert (opts.enable_lora, opts.lora_modules) == (False, ())
    with pytest.raises(ValueError, match="NAME=PATH"):
        options_from_args(parse(["--lora-modules", "sql"]), as_process=False)
    with pytest.raises(ValueError, match="given twice"):
        options_from_args(parse(["--lora-modules", "a=/1", "a=/2"]), as_process=False)


async def test_cli_lora_modules_serve(sim_worker: SimFactory) -> None:
    ns = build_parser().parse_args(["--lora-modules", "sql=/adapters/sql"])
    opts = options_from_args(ns, as_process=False)
    h = await sim_worker(enable_lora=opts.enable_lora, lora_modules=opts.lora_modules)
    assert await model_ids(h) == [MODEL, "sql"]
    assert (await chat(h, "sql")).status == 200
    assert (await h.stats())["lora_requests"] == {"sql": 1}


async def test_reset_keeps_only_the_start_up_adapters(sim_worker: SimFactory) -> None:
    h = await sim_worker(lora_modules=(("sql", "/adapters/sql"),))
    assert (await load(h, "run", "/adapters/run")).status == 200
    assert (await load(h, "sql", "/adapters/sql-v2", load_inplace=True)).status == 200
    assert (await chat(h, "run")).status == 200
    assert (await h.stats())["lora_requests"] == {"run": 1}
    r = await http_request(h.url, "POST", "/sim/reset")
    assert r.status == 200
    assert await model_ids(h) == [MODEL, "sql"]
    assert h.sim.lora.as_dict() == {"sql": "/adapters/sql"}
    assert (await chat(h, "run")).status == 404
    assert (await h.stats())["lora_requests"] == {}
    assert (await unload(h, "sql")).status == 200
    h.sim.reset()  # an unloaded start-up adapter comes back too
    assert await model_ids(h) == [MODEL, "sql"]


# -- the sans-IO bookkeeping ----------------------------------------------------------------------


def test_parse_lora_module() -> None:
    assert parse_lora_module("a=/x") == ("a", "/x")
    for bad in ("a", "=/x", "a="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_lora_module(bad)


def test_adapters_keep_load_order() -> None:
    adapters = LoraAdapters([("s", "/s")])
    adapters.load("b", "/b")
    adapters.load("a", "/a")
    assert list(adapters) == [("s", "/s"), ("b", "/b"), ("a", "/a")]
    assert "a" in adapters and "z" not in adapters and len(adapters) == 3
    with pytest.raises(ValueError, match="given twice"):
        LoraAdapters([("s", "/1"), ("s", "/2")])


# -- the prefix cache per adapter -----------------------------------------------------------------

REPORT = "The quarterly report covers revenue, costs, hiring and the outlook. " * 8
"""A prompt of several 16-token blocks."""
MEMO = "Please summarise the memo on travel, budgets and the new office. " * 8


async def cached(h: SimHandle, model: str, prompt: str = REPORT) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` of one completion of ``prompt``."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4}
    r = await http_request(h.url, "POST", "/v1/completions", body)
    assert r.status == 200, r.body
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_an_adapter_does_not_hit_the_base_models_blocks(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True)
    assert (await load(h, "sql", "/adapters/sql")).status == 200
    assert (await load(h, "law", "/adapters/law")).status == 200
    assert await cached(h, MODEL) == 0
    assert await cached(h, "sql") == 0  # the base model's blocks are not the adapter's
    hit = await cached(h, "sql")
    assert hit >= 3 * 16 and hit % 16 == 0  # the adapter's own blocks are
    assert await cached(h, "law") == 0  # nor another adapter's
    assert await cached(h, MODEL) == hit  # the base model's blocks are still there
    cache = (await h.stats())["prefix_cache"]
    assert cache["hits"] == 2 * hit  # vLLM's prefix-cache counters follow


async def test_the_base_model_does_not_hit_an_adapters_blocks(sim_worker: SimFactory) -> None:
    h = await sim_worker(lora_modules=(("sql", "/adapters/sql"),))
    assert await cached(h, "sql", MEMO) == 0
    assert await cached(h, "sql", MEMO) > 0
    assert await cached(h, MODEL, MEMO) == 0
    assert await cached(h, MODEL, MEMO) > 0
    body = {"model": "sql", "messages": [{"role": "user", "content": MEMO}], "max_tokens": 4}
    for want_hit in (False, True):  # chat keys its blocks by adapter too
        r = await http_request(h.url, "POST", "/v1/chat/completions", body)
        assert r.status == 200, r.body
        assert (r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) is want_hit


async def test_kv_events_of_an_adapter_carry_its_lora_id_and_name(sim_worker: SimFactory) -> None:
    """On the wire, in vLLM's field order: ``[tag, block_hashes, parent_block_hash, token_ids,
    block_size, lora_id, medium, lora_name]``; the base model's events are as before."""
    h = await sim_worker(enable_lora=True, kv_events="tcp://127.0.0.1:0")
    assert (await load(h, "sql", "/adapters/sql")).status == 200
    assert (await load(h, "law", "/adapters/law")).status == 200  # lora_id 2
    publisher = h.sim.kv_events
    assert publisher is not None and publisher.endpoint
    events: list[list[Any]] = []
    with ZmqSocket.open(None, zmq.SUB, options={zmq.SUBSCRIBE: b""}) as sub:
        sub.connect(publisher.endpoint)
        with trio.fail_after(10):
            while publisher.subscriptions == 0:
                await trio.sleep(0.01)
        assert await cached(h, MODEL) == 0
        assert await cached(h, "law") == 0
        received = 0
        with trio.fail_after(10):
            while received < publisher.seq:
                _, _, payload = await sub.recv_multipart()
                received += 1
                events += msgspec.msgpack.decode(payload)[1]
                assert decode_vllm_batch(payload)  # the gateway's decoder takes them
    stored = [e for e in events if e[0] == "BlockStored"]
    base = [e for e in stored if len(e) == 7]
    law = [e for e in stored if len(e) == 8]
    assert base and law and len(base) + len(law) == len(stored)
    assert all(e[5:] == [None, "GPU"] for e in base)
    assert all(e[5:] == [2, "GPU", "law"] for e in law)
    r = await http_request(h.url, "POST", "/tokenize", {"model": "law", "prompt": REPORT})
    ids = r.json()["tokens"]
    first = next(e for e in law if e[2] is None)
    assert first[1][0] == block_hashes(ids, 16, root=lora_root("law"))[0]
    base_hashes = {x for e in base for x in e[1]}
    assert base_hashes.isdisjoint(x for e in law for x in e[1])


# -- LoRA slots (vLLM's --max-loras) --------------------------------------------------------------

SLOTS: dict[str, Any] = {
    "enable_lora": True,
    "max_loras": 1,
    "lora_modules": (("a", "/a"), ("b", "/b")),
    "speed": 1.0,  # ~8 ms a token: a 1000-token request runs for seconds
}
LORA_INFO = re.compile(
    r'^vllm:lora_requests_info\{max_lora="(\d+)",waiting_lora_adapters="([^"]*)",'
    r'running_lora_adapters="([^"]*)"\} (\S+)$',
    re.MULTILINE,
)


async def generate(h: SimHandle, model: str, max_tokens: int) -> RawResponse:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True}
    return await http_request(h.url, "POST", "/v1/chat/completions", body)


async def lora_info(h: SimHandle) -> tuple[str, str, str, float]:
    """(max_lora, waiting, running, value) of the one ``vllm:lora_requests_info`` sample."""
    text = (await http_request(h.url, "GET", "/metrics")).body.decode()
    [(max_lora, waiting, running, value)] = LORA_INFO.findall(text)
    return max_lora, waiting, running, float(value)


async def until(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.005)


def slot_state(h: SimHandle) -> dict[str, Any]:
    return h.sim.snapshot()["lora_slots"]


async def test_a_second_adapter_waits_for_the_only_slot(sim_worker: SimFactory) -> None:
    h = await sim_worker(**SLOTS)
    done: list[int] = []

    async def second() -> None:
        done.append((await generate(h, "b", 2)).status)

    with trio.fail_after(10):
        async with trio.open_nursery() as outer, trio.open_nursery() as first:
            first.start_soon(generate, h, "a", 1000)
            await until(lambda: h.sim.engine.running == 1)  # "a" loaded and decoding
            outer.start_soon(second)
            await until(lambda: slot_state(h)["waiting"] == ["b"])
            assert h.sim.engine.waiting == 1 and h.sim.engine.running == 1
            max_lora, waiting, running, _ = await lora_info(h)
            assert (max_lora, waiting, running) == ("1", "b", "a")
            assert not done
            # Ending "a" (its client goes) frees the slot: "b" evicts it and runs.
            first.cancel_scope.cancel()
        await until(lambda: h.sim.stats.in_flight == 0)
    assert done == [200]
    assert slot_state(h) == {"max_loras": 1, "active": {"b": 0}, "waiting": []}
    assert (await lora_info(h))[1:3] == ("", "")


async def test_requests_of_one_adapter_share_its_slot(sim_worker: SimFactory) -> None:
    h = await sim_worker(**SLOTS)
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(generate, h, "a", 1000)
            clients.start_soon(generate, h, "a", 1000)
            await until(lambda: h.sim.engine.running == 2)
            assert slot_state(h)["active"] == {"a": 2}
            assert (await lora_info(h))[1:3] == ("", "a")
            clients.cancel_scope.cancel()
    await until(lambda: h.sim.stats.in_flight == 0)
    assert slot_state(h)["active"] == {"a": 0}


async def test_base_model_requests_never_wait_for_a_slot(sim_worker: SimFactory) -> None:
    h = await sim_worker(**SLOTS)
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(generate, h, "a", 1000)
            await until(lambda: h.sim.engine.running == 1)  # "a" loaded and decoding
            clients.start_soon(generate, h, "b", 1000)
            await until(lambda: slot_state(h)["waiting"] == ["b"])
            r = await generate(h, MODEL, 2)
            assert r.status == 200
            assert slot_state(h)["waiting"] == ["b"]  # "b" still waits behind "a"
            clients.cancel_scope.cancel()


async def test_a_waiting_request_that_goes_away_leaves_no_trace(sim_worker: SimFactory) -> None:
    h = await sim_worker(**SLOTS)
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(generate, h, "a", 1000)
            await until(lambda: h.sim.engine.running == 1)  # "a" loaded and decoding
            async with trio.open_nursery() as waiter:
                waiter.start_soon(generate, h, "b", 2)
                await until(lambda: slot_state(h)["waiting"] == ["b"])
                waiter.cancel_scope.cancel()
            await until(lambda: h.sim.stats.in_flight == 1)
            assert slot_state(h) == {"max_loras": 1, "active": {"a": 1}, "waiting": []}
            clients.cancel_scope.cancel()


async def test_lora_info_metric_shape(sim_worker: SimFactory) -> None:
    h = await sim_worker(enable_lora=True, lora_modules=(("a", "/a"), ("b", "/b")))
    text = (await http_request(h.url, "GET", "/metrics")).body.decode()
    assert "# TYPE vllm:lora_requests_info gauge\n" in text
    before = time.time()
    max_lora, waiting, running, value = await lora_info(h)
    assert (max_lora, waiting, running) == ("2", "", "")  # unlimited: every adapter may run
    assert before - 1 <= value <= time.time() + 1  # vLLM sets it to the current time
    assert (await chat(h, "a")).status == 200
    assert (await lora_info(h))[0] == "2"
    h2 = await sim_worker(**SLOTS)
    assert (await lora_info(h2))[0] == "1"


async def test_no_lora_info_without_lora(sim_worker: SimFactory) -> None:
    h = await sim_worker()
    text = (await http_request(h.url, "GET", "/metrics")).body.decode()
    assert "lora_requests_info" not in text


def test_max_loras_flags() -> None:
    opts = options_from_args(build_parser().parse_args(["--max-loras", "2", "--lora-load-s", "0"]))
    assert (opts.max_loras, opts.lora_load_s) == (2, 0.0)
    opts = options_from_args(build_parser().parse_args([]))
    assert (opts.max_loras, opts.lora_load_s) == (None, 0.02)
    with pytest.raises(ValueError, match="max-loras"):
        options_from_args(build_parser().parse_args(["--max-loras", "0"]))
