"""The admin API (``/admin/workers...``) and ``lmgw workers`` against a live gateway in front of
in-process simulated workers.

The HTTP tests run on both front-door servers (the ``server`` fixture of ``conftest.py``); the
CLI tests run ``lmgw.cli.main`` in a thread (its client is blocking ``http.client``) against the
native server. Slow requests are the simulator's own (``speed=1``, ``ignore_eos``, about 8 ms
per token) or a ``hang`` fault; waits are on observable states, never sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayHandle,
    RawResponse,
    SimHandle,
    free_port_url,
    http_request,
    server_config,
)

from lmgw import cli
from lmgw.config import (
    AdminConfig,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

pytestmark = pytest.mark.usefixtures("hard_deadline")

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MESSAGES = [{"role": "user", "content": "Which worker answers?"}]

AdminGateway = Callable[..., Awaitable[GatewayHandle]]
SimFactory = Callable[..., Awaitable[SimHandle]]


@pytest.fixture
def admin_gateway(nursery: trio.Nursery, server: str, sim_worker: SimFactory) -> AdminGateway:
    """``await admin_gateway(n, admin=AdminConfig(...), **worker_options)``: a gateway with ids
    w0..w{n-1} and the admin token ``TOKEN`` unless ``admin`` says otherwise; on both servers."""
    return gateway_factory(nursery, server, sim_worker)


@pytest.fixture
def native_gateway(nursery: trio.Nursery, sim_worker: SimFactory) -> AdminGateway:
    """The same on the native server only (the CLI tests: the server makes no difference)."""
    return gateway_factory(nursery, "native", sim_worker)


def gateway_factory(nursery: trio.Nursery, server: str, sim_worker: SimFactory) -> AdminGateway:
    async def start(
        n: int = 2,
        *,
        admin: AdminConfig | None = None,
        per_worker: list[dict[str, Any]] | None = None,
        request_timeout_s: float = 30.0,
        **worker_options: Any,
    ) -> GatewayHandle:
        option_sets = per_worker if per_worker is not None else [worker_options] * n
        sims = [await sim_worker(**dict(opts)) for opts in option_sets]
        cfg = GatewayConfig(
            server=server_config(server, port=0, graceful_shutdown_s=1.0),
            limits=LimitsConfig(request_timeout_s=request_timeout_s),
            upstream=UpstreamConfig(connect_timeout_s=2.0),
            health=HealthConfig(interval_s=30.0, timeout_s=2.0),
            admin=admin if admin is not None else AdminConfig(token=TOKEN),
            workers=[WorkerConfig(url=s.url, id=f"w{i}") for i, s in enumerate(sims)],
        )
        gw = Gateway(cfg)
        with trio.fail_after(10):
            await nursery.start(gw.run)
        return GatewayHandle(gw, gw.url, server, sims, [s.url for s in sims])

    return start


def chat(tokens: int = 2) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": tokens, "ignore_eos": True}


async def admin(gw: GatewayHandle, method: str, path: str, body: Any = None) -> RawResponse:
    return await http_request(gw.url, method, path, body, AUTH)


def error_of(r: RawResponse, status: int) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert list(body) == ["error"] and body["error"]["code"] == status, body
    assert sorted(body["error"]) == ["code", "message", "param", "type"]
    return body["error"]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


# == auth ========================================================================================


async def test_without_a_token_the_admin_api_is_off(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(1, admin=AdminConfig())
    for method, path in [
        ("GET", "/admin/workers"),
        ("POST", "/admin/workers"),
        ("GET", "/admin/workers/w0"),
        ("DELETE", "/admin/workers/w0"),
        ("POST", "/admin/workers/w0/drain"),
    ]:
        err = error_of(await admin(gw, method, path), 403)
        assert "LMGW_ADMIN_TOKEN" in err["message"] and "[admin] token" in err["message"]
        assert err["type"] == "PermissionDeniedError"
    assert gw.gateway.registry.get("w0") is not None  # nothing happened


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong-token"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": TOKEN},
    ],
    ids=["missing", "wrong", "longer", "basic", "no-scheme"],
)
async def test_bad_or_missing_token_is_401(
    admin_gateway: AdminGateway, headers: dict[str, str]
) -> None:
    gw = await admin_gateway(1)
    r = await http_request(gw.url, "POST", "/admin/workers/w0/drain", None, headers)
    err = error_of(r, 401)
    assert err["type"] == "AuthenticationError" and "admin token" in err["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert gw.gateway.registry.get("w0").state.value == "healthy"  # not drained


async def test_token_works_and_scheme_is_case_insensitive(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(1)
    r = await http_request(
        gw.url, "GET", "/admin/workers", None, {"authorization": f"bearer {TOKEN}"}
    )
    assert r.status == 200, r.body


async def test_localhost_may_be_let_in_without_a_token(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(1, admin=AdminConfig(allow_unauthenticated_localhost=True))
    r = await http_request(gw.url, "GET", "/admin/workers")
    assert r.status == 200, r.body
    assert [w["id"] for w in r.json()["data"]] == ["w0"]


# == list / get / add ============================================================================


async def test_list_and_get(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(2)
    r = await admin(gw, "GET", "/admin/workers")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    data = r.json()["data"]
    assert [w["id"] for w in data] == ["w0", "w1"]
    for w, sim in zip(data, gw.sims, strict=True):
        assert w["url"] == sim.url and w["role"] == "merged" and w["state"] == "healthy"
        assert w["source"] == "static" and w["models"] == [MODEL] and w["in_flight"] == 0
    one = await admin(gw, "GET", "/admin/workers/w1")
    assert one.status == 200 and one.json() == data[1]
    err = error_of(await admin(gw, "GET", "/admin/workers/nope"), 404)
    assert "nope" in err["message"]
    r = await admin(gw, "PUT", "/admin/workers/w1")
    error_of(r, 405)
    assert r.headers["allow"] == "DELETE, GET, HEAD"
    error_of(await admin(gw, "GET", "/admin/workers/w1/drain"), 405)
    error_of(await admin(gw, "DELETE", "/admin/workers"), 405)


async def test_add_worker(admin_gateway: AdminGateway, sim_worker: SimFactory) -> None:
    gw = await admin_gateway(1)
    extra = await sim_worker()
    r = await admin(gw, "POST", "/admin/workers", {"url": extra.url + "/", "role": "merged"})
    assert r.status == 201, r.body
    added = r.json()
    # no id: the URL (without the trailing slash) is the id, as in [[workers]]
    assert added["id"] == extra.url and added["url"] == extra.url and added["role"] == "merged"
    assert added["state"] == "starting" and added["source"] == "static"
    worker = gw.gateway.registry.get(extra.url)
    await wait_until(lambda: worker.routable)  # the monitor probes a new worker at once
    # the id is a URL: it travels percent-encoded
    r = await admin(gw, "GET", "/admin/workers/" + quote(extra.url, safe=""))
    assert r.status == 200 and r.json()["state"] == "healthy", r.body
    for _ in range(4):  # round robin: the new worker takes its share
        assert (await http_request(gw.url, "POST", "/v1/chat/completions", chat())).status == 200
    assert worker.total_requests == 2
    err = error_of(await admin(gw, "POST", "/admin/workers", {"url": extra.url}), 409)
    assert err["param"] == "id"
    err = error_of(
        await admin(gw, "POST", "/admin/workers", {"url": free_port_url(), "id": "w0"}), 409
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"url": "http://127.0.0.1:9", "role": "x"}, "role", "is not a role"),
        ({"url": "ftp://127.0.0.1:9"}, "url", "is not a worker URL"),
        ({"role": "pd"}, "url", "missing required field"),
        ({"url": "http://127.0.0.1:9", "colour": "red"}, "colour", "unknown field"),
        ({"url": "http://127.0.0.1:9", "models": "m"}, "models", "Expected `array`"),
        (["http://127.0.0.1:9"], None, "expected a JSON object"),
        (b"{not json", None, "not valid JSON"),
        (b'{"url": "\xff"}', None, "not valid JSON"),
    ],
)
async def test_add_worker_rejects_bad_bodies(
    admin_gateway: AdminGateway, body: Any, param: str | None, words: str
) -> None:
    gw = await admin_gateway(1)
    err = error_of(await admin(gw, "POST", "/admin/workers", body), 400)
    assert err["param"] == param and words in err["message"], err
    assert len(gw.gateway.registry) == 1


# == drain / undrain / remove ====================================================================


async def test_drain_stops_new_requests_and_lets_in_flight_finish(
    admin_gateway: AdminGateway,
) -> None:
    gw = await admin_gateway(2, speed=1.0)
    registry = gw.gateway.registry
    slow: list[RawResponse] = []

    async def slow_request() -> None:
        slow.append(await http_request(gw.url, "POST", "/v1/chat/completions", chat(120)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)  # ~1 s at speed 1
        await wait_until(lambda: any(w.in_flight for w in registry))
        busy = next(w for w in registry if w.in_flight)
        other = next(w for w in registry if w is not busy)
        r = await admin(gw, "POST", f"/admin/workers/{busy.id}/drain")
        assert r.status == 200, r.body
        described = r.json()
        assert described["state"] == "draining" and described["in_flight"] == 1  # not done yet
        before = busy.total_requests
        for _ in range(4):
            r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(1))
            assert r.status == 200, r.body
        assert busy.total_requests == before  # nothing new went to the draining worker
        assert not slow  # the in-flight request was still running through all of this
    assert slow[0].status == 200, slow[0].body
    assert slow[0].json()["usage"]["completion_tokens"] == 120  # finished, not cut
    assert busy.in_flight == 0 and other.in_flight == 0
    # undrain: probed at once, routable again, and gets traffic again
    r = await admin(gw, "POST", f"/admin/workers/{busy.id}/undrain")
    assert r.status == 200 and r.json()["state"] == "healthy", r.body
    for _ in range(2):
        assert (await http_request(gw.url, "POST", "/v1/chat/completions", chat(1))).status == 200
    assert busy.total_requests == before + 1
    # both are idempotent
    assert (await admin(gw, "POST", f"/admin/workers/{busy.id}/undrain")).json()["state"] == (
        "healthy"
    )
    await admin(gw, "POST", f"/admin/workers/{busy.id}/drain")
    assert (await admin(gw, "POST", f"/admin/workers/{busy.id}/drain")).json()["state"] == (
        "draining"
    )
    error_of(await admin(gw, "POST", "/admin/workers/nope/drain"), 404)


async def test_undrain_of_a_dead_worker_ejects_it(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(2)
    await admin(gw, "POST", "/admin/workers/w1/drain")
    await gw.sims[1].stop()
    r = await admin(gw, "POST", "/admin/workers/w1/undrain")
    assert r.status == 200 and r.json()["state"] == "ejected", r.body
    assert r.json()["last_error"]


async def test_remove_at_once(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(2)
    r = await admin(gw, "DELETE", "/admin/workers/w1")
    assert r.status == 200 and r.json()["id"] == "w1" and r.json()["state"] == "gone", r.body
    listed = (await admin(gw, "GET", "/admin/workers")).json()["data"]
    assert [w["id"] for w in listed] == ["w0"]
    error_of(await admin(gw, "DELETE", "/admin/workers/w1"), 404)
    for _ in range(3):
        assert (await http_request(gw.url, "POST", "/v1/chat/completions", chat())).status == 200
    assert gw.gateway.registry.get("w0").total_requests == 3


async def test_remove_with_grace_waits_for_the_request_in_flight(
    admin_gateway: AdminGateway,
) -> None:
    gw = await admin_gateway(1, speed=1.0)
    worker = gw.gateway.registry.get("w0")
    slow: list[RawResponse] = []

    async def slow_request() -> None:
        slow.append(await http_request(gw.url, "POST", "/v1/chat/completions", chat(80)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await wait_until(lambda: worker.in_flight == 1)
        r = await admin(gw, "DELETE", "/admin/workers/w0?grace_s=15")
    assert r.status == 200, r.body
    gone = r.json()
    # answered only once idle: the request it had ran to its end, then the worker went
    assert gone["state"] == "gone" and gone["in_flight"] == 0
    assert slow[0].status == 200 and slow[0].json()["usage"]["completion_tokens"] == 80
    assert gw.gateway.registry.get("w0") is None


async def test_remove_with_grace_gives_up_after_grace(admin_gateway: AdminGateway) -> None:
    gw = await admin_gateway(2, per_worker=[{"faults": {"hang": True}}, {}])
    w0 = gw.gateway.registry.get("w0")
    async with trio.open_nursery() as nursery:

        async def hung() -> None:
            await http_request(gw.url, "POST", "/v1/chat/completions", chat())

        for _ in range(2):  # round robin: one of two lands on the hanging w0
            nursery.start_soon(hung)
        await wait_until(lambda: w0.in_flight == 1)
        r = await admin(gw, "DELETE", "/admin/workers/w0?grace_s=0.2")
        assert r.status == 200, r.body
        assert r.json()["state"] == "gone" and r.json()["in_flight"] == 1  # removed anyway
        assert gw.gateway.registry.get("w0") is None
        nursery.cancel_scope.cancel()
    await wait_until(lambda: w0.in_flight == 0)  # the cancelled request still released it


@pytest.mark.parametrize(
    ("query", "param"),
    [("grace_s=-1", "grace_s"), ("grace_s=soon", "grace_s"), ("grace_s=nan", "grace_s"),
     ("grace_s=30", "grace_s"), ("force=1", "force")],
)  # fmt: skip
async def test_remove_rejects_bad_queries(
    admin_gateway: AdminGateway, query: str, param: str
) -> None:
    gw = await admin_gateway(1, request_timeout_s=30.0)
    err = error_of(await admin(gw, "DELETE", f"/admin/workers/w0?{query}"), 400)
    assert err["param"] == param, err
    assert gw.gateway.registry.get("w0").state.value == "healthy"


# == the CLI =====================================================================================


async def run_cli(*argv: str) -> int:
    with trio.fail_after(15):
        return await trio.to_thread.run_sync(cli.main, list(argv))


async def test_cli_list_drain_undrain_add_remove(
    native_gateway: AdminGateway,
    sim_worker: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await native_gateway(2)
    monkeypatch.setenv("LMGW_ADMIN_TOKEN", TOKEN)  # the CLI's default for --token
    common = ("--gateway", gw.url)

    assert await run_cli("workers", "list", *common) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID", "ROLE", "ZONE", "STATE", "IN_FLIGHT", "TOTAL_REQUESTS", "SOURCE", "URL", "MODELS",
    ]  # fmt: skip
    assert [ln.split()[:4] for ln in lines[1:]] == [
        ["w0", "merged", "-", "healthy"],
        ["w1", "merged", "-", "healthy"],
    ]

    assert await run_cli("workers", "drain", "w1", *common) == 0
    assert "worker w1: draining" in capsys.readouterr().out
    assert gw.gateway.registry.get("w1").state.value == "draining"
    assert await run_cli("workers", "undrain", "w1", *common) == 0
    assert "worker w1: healthy" in capsys.readouterr().out

    extra = await sim_worker()
    spec = f"pd={extra.url},id=w9,zone=rack-2"
    assert await run_cli("workers", "add", spec, "--model", MODEL, *common) == 0
    assert "worker w9: starting" in capsys.readouterr().out
    added = gw.gateway.registry.get("w9")
    assert added is not None and added.url == extra.url and added.static_models == {MODEL}
    assert added.zone == "rack-2"

    assert await run_cli("workers", "remove", "w9", "--grace", "5", "--json", *common) == 0
    out = capsys.readouterr().out
    assert '"state":"gone"' in out and '"id":"w9"' in out
    assert gw.gateway.registry.get("w9") is None


async def test_cli_errors_exit_1_with_the_gateways_message(
    native_gateway: AdminGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await native_gateway(1)
    monkeypatch.delenv("LMGW_ADMIN_TOKEN", raising=False)
    common = ("--gateway", gw.url)

    assert await run_cli("workers", "list", *common) == 1  # no token at all
    err = capsys.readouterr().err
    assert "401" in err and "invalid admin token" in err

    assert await run_cli("workers", "drain", "w0", "--token", "wrong", *common) == 1
    assert "401" in capsys.readouterr().err
    assert gw.gateway.registry.get("w0").state.value == "healthy"

    assert await run_cli("workers", "drain", "ghost", "--token", TOKEN, *common) == 1
    assert "404: no worker with id 'ghost'" in capsys.readouterr().err

    assert await run_cli("workers", "add", "pd=" + gw.sims[0].url, "--token", TOKEN, *common) == 0
    capsys.readouterr()
    assert await run_cli("workers", "add", "pd=" + gw.sims[0].url, "--token", TOKEN, *common) == 1
    assert "409" in capsys.readouterr().err

    assert await run_cli("workers", "add", "zz=http://h:1", "--token", TOKEN, *common) == 2
    assert "is not a role" in capsys.readouterr().err  # checked before any request

    assert await run_cli("workers", "list", "--token", TOKEN, "--gateway", free_port_url()) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
