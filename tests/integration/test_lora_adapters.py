"""LoRA adapters on the whole fleet: loaded on every worker through the gateway (its admin API
or vLLM's own paths), routed to the workers that hold them at once, reloaded on a worker that
lost one (a restart) or joined later, unloaded everywhere."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, GatewayHandle, http_request

from lmgw.config import AdminConfig

pytestmark = pytest.mark.parametrize("server", ["native"])

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ADAPTER = {"lora_name": "sql-lora", "lora_path": "/adapters/sql"}


async def _lora_gateway(gateway: GatewayFactory, n: int = 2, **options: Any) -> GatewayHandle:
    options.setdefault("enable_lora", True)
    return await gateway(n, admin=AdminConfig(token=TOKEN), **options)


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _lora_requests(gw: GatewayHandle, name: str = "sql-lora") -> list[int]:
    return [h.sim.stats.lora_requests.get(name, 0) for h in gw.sims]


async def _worker_lists(url: str, name: str) -> bool:
    models = (await http_request(url, "GET", "/v1/models")).json()["data"]
    return any(m["id"] == name for m in models)


async def test_load_route_unload(gateway: GatewayFactory) -> None:
    gw = await _lora_gateway(gateway)
    r = await gw.request("POST", "/v1/load_lora_adapter", ADAPTER, AUTH)
    assert r.status == 200, r.body
    out = r.json()
    assert out["loaded"] == ["w0", "w1"] and out["failed"] == {}
    for h in gw.sims:
        assert await _worker_lists(h.url, "sql-lora")
    listed = {m["id"]: m for m in (await gw.request("GET", "/v1/models")).json()["data"]}
    assert listed["sql-lora"]["root"] == "/adapters/sql" and listed[MODEL]["parent"] is None
    with trio.fail_after(5):
        for _ in range(4):
            r = await gw.request("POST", "/v1/chat/completions", _chat("sql-lora"))
            assert r.status == 200, r.body
    assert _lora_requests(gw) == [2, 2]
    r = await gw.request("GET", "/admin/lora_adapters", None, AUTH)
    assert r.status == 200
    [entry] = r.json()["data"]
    assert entry["lora_name"] == "sql-lora" and entry["loaded"] == ["w0", "w1"]

    r = await gw.request("POST", "/v1/unload_lora_adapter", {"lora_name": "sql-lora"}, AUTH)
    assert r.status == 200, r.body
    assert r.json()["unloaded"] == ["w0", "w1"]
    for h in gw.sims:
        assert not await _worker_lists(h.url, "sql-lora")
    r = await gw.request("POST", "/v1/chat/completions", _chat("sql-lora"))
    assert r.status == 404, r.body
    assert (await gw.request("GET", "/admin/lora_adapters", None, AUTH)).json()["data"] == []


async def test_the_admin_token_guards_the_adapter_routes(gateway: GatewayFactory) -> None:
    gw = await _lora_gateway(gateway, 1)
    for method, path, body in (
        ("POST", "/v1/load_lora_adapter", ADAPTER),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
        ("GET", "/admin/lora_adapters", None),
        ("POST", "/admin/lora_adapters", ADAPTER),
        ("DELETE", "/admin/lora_adapters/x", None),
    ):
        r = await gw.request(method, path, body)
        assert r.status == 401, (path, r.body)
        assert r.json()["error"]["message"].startswith("missing or invalid admin token")
    assert gw.sims[0].sim.stats.requests_total == 0


async def test_a_worker_without_lora_is_reported_and_skipped(gateway: GatewayFactory) -> None:
    gw = await _lora_gateway(gateway, per_worker=[{"enable_lora": True}, {}])
    r = await gw.request("POST", "/admin/lora_adapters", ADAPTER, AUTH)
    assert r.status == 200, r.body
    out = r.json()
    assert out["loaded"] == ["w0"] and list(out["failed"]) == ["w1"]
    assert out["failed"]["w1"].startswith("404")
    with trio.fail_after(5):
        for _ in range(4):
            r = await gw.request("POST", "/v1/chat/completions", _chat("sql-lora"))
            assert r.status == 200, r.body
    assert _lora_requests(gw) == [4, 0]


async def test_a_load_no_worker_takes_is_an_error_and_forgotten(gateway: GatewayFactory) -> None:
    gw = await _lora_gateway(gateway, enable_lora=False)
    r = await gw.request("POST", "/admin/lora_adapters", ADAPTER, AUTH)
    assert r.status == 502, r.body
    message = r.json()["error"]["message"]
    assert "no worker loaded adapter `sql-lora`" in message and "w0: 404" in message
    assert (await gw.request("GET", "/admin/lora_adapters", None, AUTH)).json()["data"] == []
    assert "sql-lora" not in (await gw.request("GET", "/v1/models")).body.decode()


async def test_bad_requests(gateway: GatewayFactory) -> None:
    gw = await _lora_gateway(gateway, 1)
    r = await gw.request("POST", "/v1/load_lora_adapter", {"lora_name": "x"}, AUTH)
    assert r.status == 400 and "lora_path" in r.json()["error"]["message"]
    r = await gw.request("POST", "/v1/load_lora_adapter", b"{not json", AUTH)
    assert r.status == 400
    r = await gw.request("POST", "/v1/unload_lora_adapter", {"lora_name": "nope"}, AUTH)
    assert r.status == 404
    r = await gw.request("DELETE", "/admin/lora_adapters/nope", None, AUTH)
    assert r.status == 404
    r = await gw.request("PUT", "/admin/lora_adapters/nope", None, AUTH)
    assert r.status == 405
    assert (await gw.request("POST", "/v1/load_lora_adapter", ADAPTER, AUTH)).status == 200
    other = {**ADAPTER, "lora_path": "/adapters/other"}
    r = await gw.request("POST", "/v1/load_lora_adapter", other, AUTH)
    assert r.status == 409, r.body
    r = await gw.request("POST", "/v1/load_lora_adapter", {**other, "load_inplace": True}, AUTH)
    assert r.status == 200, r.body
    r = await gw.request("GET", "/admin/lora_adapters/sql-lora", None, AUTH)
    assert r.status == 200 and r.json()["lora_path"] == "/adapters/other"
    # loading again is idempotent (the worker says "already loaded": that is loaded)
    assert (await gw.request("POST", "/v1/load_lora_adapter", other, AUTH)).status == 200
    body = {"lora_name": "other", "lora_path": "/adapters/o", "model": "no-such"}
    r = await gw.request("POST", "/admin/lora_adapters", body, AUTH)
    assert r.status == 503 and "no-such" in r.json()["error"]["message"]


async def test_a_worker_that_lost_the_adapter_gets_it_again(gateway: GatewayFactory) -> None:
    """A worker restarted (its run-time adapters gone): its next /v1/models tells, and the
    gateway stops routing the adapter there and loads it again."""
    gw = await _lora_gateway(gateway)
    assert (await gw.request("POST", "/v1/load_lora_adapter", ADAPTER, AUTH)).status == 200
    r = await http_request(gw.sims[1].url, "POST", "/sim/reset")
    assert r.status == 200
    assert not await _worker_lists(gw.sims[1].url, "sql-lora")
    worker = gw.gateway.registry.get("w1")
    await gw.gateway.monitor.probe(worker)  # the next health round, now
    with trio.fail_after(5):
        while not await _worker_lists(gw.sims[1].url, "sql-lora"):
            await trio.sleep(0.05)
        while "sql-lora" not in worker.adapters:
            await trio.sleep(0.05)
    r = await gw.request("POST", "/v1/chat/completions", _chat("sql-lora"))
    assert r.status == 200


async def test_a_worker_added_later_gets_the_adapter(
    gateway: GatewayFactory, sim_worker: Any
) -> None:
    gw = await _lora_gateway(gateway, 1)
    assert (await gw.request("POST", "/v1/load_lora_adapter", ADAPTER, AUTH)).status == 200
    late = await sim_worker(enable_lora=True)
    r = await gw.request(
        "POST", "/admin/workers", {"url": late.url, "role": "pd", "id": "late"}, AUTH
    )
    assert r.status == 201, r.body
    with trio.fail_after(5):
        while not await _worker_lists(late.url, "sql-lora"):
            await trio.sleep(0.05)
    r = await gw.request("GET", "/admin/lora_adapters/sql-lora", None, AUTH)
    with trio.fail_after(5):
        while r.json()["loaded"] != ["late", "w0"]:
            await trio.sleep(0.05)
            r = await gw.request("GET", "/admin/lora_adapters/sql-lora", None, AUTH)


async def test_adapters_are_known_as_adapters_for_routing(gateway: GatewayFactory) -> None:
    """Routing keys an adapter's prompt apart from the base model's (engines cache them apart):
    the gateway knows a model is an adapter when it loaded it, or when a worker's /v1/models
    lists it with a parent (an adapter the worker was started with)."""
    gw = await _lora_gateway(gateway, 1, lora_modules=(("boot-lora", "/adapters/boot"),))
    core = gw.gateway
    assert core.is_lora("boot-lora") and not core.is_lora(MODEL)
    assert not core.is_lora("sql-lora")
    assert (await gw.request("POST", "/v1/load_lora_adapter", ADAPTER, AUTH)).status == 200
    assert core.is_lora("sql-lora")


async def test_unloading_an_adapter_the_workers_started_with(gateway: GatewayFactory) -> None:
    """vLLM's unload through the gateway reaches every worker that lists the adapter, also
    one it did not load (--lora-modules); its requests then find no worker."""
    gw = await _lora_gateway(gateway, 2, lora_modules=(("boot-lora", "/adapters/boot"),))
    r = await gw.request("POST", "/v1/unload_lora_adapter", {"lora_name": "boot-lora"}, AUTH)
    assert r.status == 200, r.body
    assert r.json()["unloaded"] == ["w0", "w1"]
    for h in gw.sims:
        assert not await _worker_lists(h.url, "boot-lora")
    r = await gw.request("POST", "/v1/chat/completions", _chat("boot-lora"))
    assert r.status == 404, r.body
    r = await gw.request("POST", "/v1/unload_lora_adapter", {"lora_name": "boot-lora"}, AUTH)
    assert r.status == 404


async def test_the_lora_cli(
    gateway: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lmgw lora list|load|unload``: the admin API's client, as ``lmgw workers``."""
    from lmgw import cli

    async def run(*argv: str) -> int:
        with trio.fail_after(15):
            return await trio.to_thread.run_sync(cli.main, list(argv))

    gw = await _lora_gateway(gateway, per_worker=[{"enable_lora": True}, {}])
    monkeypatch.setenv("LMGW_ADMIN_TOKEN", TOKEN)
    common = ("--gateway", gw.url)
    assert await run("lora", "list", *common) == 0
    assert "no LoRA adapters" in capsys.readouterr().out
    assert await run("lora", "load", "sql-lora", "/adapters/sql", *common) == 0
    out = capsys.readouterr().out
    assert "sql-lora  /adapters/sql  base=*  loaded on 1: w0" in out
    assert "failed on w1: 404" in out
    assert await run("lora", "list", "--json", *common) == 0
    assert '"lora_name":"sql-lora"' in capsys.readouterr().out
    assert await run("lora", "unload", "sql-lora", *common) == 0
    assert "unloaded sql-lora from 1 workers" in capsys.readouterr().out
    assert await run("lora", "unload", "sql-lora", *common) == 1
    assert "404" in capsys.readouterr().err


@pytest.mark.parametrize("affinity", [True, False])
async def test_affinity_sends_an_adapter_where_a_slot_is_free(
    gateway: GatewayFactory, affinity: bool
) -> None:
    """Two workers with one LoRA slot each (vLLM --max-loras 1). A long `a` stream holds w0's
    slot; a base-model request moves round robin on; `b` would then go to w0 and wait there
    for the slot: with affinity it goes to w1, whose slot is free."""
    lora = (("a", "/adapters/a"), ("b", "/adapters/b"))
    gw = await _lora_gateway(
        gateway,
        2,
        lora_modules=lora,
        max_loras=1,
        speed=1.0,
        routing_options={"lora_affinity": affinity},
    )
    assert [w.engine.lora_max for w in gw.gateway.registry] == [1, 1]  # scraped at start
    long_a = {**_chat("a"), "max_tokens": 5000, "stream": True}  # holds w0's slot throughout
    chat = partial(gw.request, "POST", "/v1/chat/completions")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chat, long_a)
            while _lora_requests(gw, "a") != [1, 0]:  # a runs on w0
                await trio.sleep(0.01)
            assert (await chat(_chat(MODEL))).status == 200  # round robin: w1
            nursery.start_soon(chat, _chat("b"))  # (on w0 it would wait for a's slot)
            while sum(_lora_requests(gw, "b")) != 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert _lora_requests(gw, "b") == ([0, 1] if affinity else [1, 0])
