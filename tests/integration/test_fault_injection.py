"""Fault injection: many concurrent requests while simulated workers fail, drop connections,
stall or leave, and clients hang up. Every request must end in time, with the merged worker's
exact text or an OpenAI error naming what failed, and the gateway's load accounting (and the
workers' own in-flight counts) must return to zero. P/D in every dialect (nixl's and lmcache's
non-streamed requests on the express lane when it is on), E+P+D, fleet changes through the
admin API, and merged workers with every recovery feature on (retries, migration, hedging)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_support import (
    MODEL,
    GatewayFactory,
    http_request,
    metric_value,
    open_stream,
    request_bytes,
)

from lmgw.bench.workloads import png_data_url
from lmgw.config import (
    AdminConfig,
    GatewayConfig,
    HealthConfig,
    HedgingConfig,
    ModelConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway

pytestmark = pytest.mark.usefixtures("hard_deadline")

REQUESTS = 32
CONCURRENCY = 8


def _body(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"question {i}: " + "tell me more " * (i % 5)}],
        "max_tokens": 8,
        "temperature": 0.0,  # greedy: a broken stream can be continued elsewhere
        "stream": stream,
    }


def _text(r: Any, stream: bool) -> str:
    """The answer's text, streamed or not; a stream must end cleanly ([DONE], no error event)."""
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    events = r.events()
    assert events[-1] == "[DONE]", events[-3:]
    errors = [e for e in events[:-1] if "error" in e]
    assert not errors, errors
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
    )


def _role(name: str) -> str:
    """A simulator's role from its name in these tests: ``p-ok``, ``d1``, ``pd0``, ``e-faulty``."""
    return name.split("-")[0].rstrip("0123456789")


async def _gateway(
    nursery: trio.Nursery, sims: dict[str, Any], flow: str, dialect: str, **config: Any
) -> str:
    """A gateway in front of ``sims`` (named as :func:`_role` reads them); its URL."""
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, flow=flow, dialect=dialect)],
        workers=[
            WorkerConfig(
                url=s.url,
                role=_role(name),
                id=name,
                kv_address=s.sim.kv_address,
                bootstrap_port=int(s.url.rsplit(":", 1)[1]) if _role(name) == "p" else None,
            )
            for name, s in sims.items()
        ],
        **config,
    )
    port = await nursery.start(Gateway(cfg).run)
    return f"http://127.0.0.1:{port}"


CASES = [
    ("vllm-nixl", True),
    ("vllm-nixl", False),
    ("vllm-lmcache", True),
    ("vllm-p2pnccl", True),
    ("sglang-bootstrap", True),
]


@pytest.mark.parametrize("fault", ["error_rate", "drop_at_token"])
@pytest.mark.parametrize(("dialect", "express"), CASES)
async def test_pd_requests_under_faults_all_end_cleanly(
    nursery: trio.Nursery,
    sim_worker: Any,
    tmp_path: Path,
    dialect: str,
    express: bool,
    fault: str,
) -> None:
    """``error_rate``: a third of the faulty workers' requests fail at once (500);
    ``drop_at_token``: the faulty decode drops every connection after 3 tokens (a stream
    breaks mid-way and is continued elsewhere; a non-streamed answer never completes)."""
    reference = await sim_worker(role="pd")
    opts: dict[str, Any] = {}
    if dialect == "vllm-p2pnccl":
        opts["kv_port"] = 0
    elif dialect == "vllm-lmcache":
        opts.update(kv_connector="lmcache", lmcache_dir=str(tmp_path / "lmcache"))
    faulty = {"faults": {"error_rate": 0.3}} if fault == "error_rate" else {}
    d_faulty = {"faults": {"error_rate": 0.3} if fault == "error_rate" else {"drop_at_token": 3}}
    sims = {
        "p-ok": await sim_worker(role="p", **opts),
        "p-faulty": await sim_worker(role="p", **opts, **faulty, fault_seed=7),
        "d-ok": await sim_worker(role="d", **opts),
        "d-faulty": await sim_worker(role="d", **opts, **d_faulty, fault_seed=11),
    }
    url = await _gateway(
        nursery, sims, "p/d", dialect, upstream=UpstreamConfig(express_lane=express)
    )

    expected = {}
    for i in range(REQUESTS):
        r = await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        expected[i] = r.json()["choices"][0]["message"]["content"]

    outcomes: dict[int, tuple[int, str]] = {}
    limiter = trio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        stream = i % 2 == 1
        async with limiter:
            with trio.fail_after(10):  # nothing hangs: every request ends
                r = await http_request(url, "POST", "/v1/chat/completions", _body(i, stream))
        if r.status == 200:
            text = _text(r, stream)
            assert text == expected[i], (i, stream)
            outcomes[i] = (200, "")
        else:
            assert r.status == 502, (i, r.status, r.body)
            message = r.json()["error"]["message"]
            assert message.startswith(("prefill stage failed", "decode stage failed")), message
            assert fault == "error_rate" and "Simulated engine failure" in message, message
            outcomes[i] = (502, message)

    async with trio.open_nursery() as requests:
        for i in range(REQUESTS):
            requests.start_soon(one, i)

    assert len(outcomes) == REQUESTS
    assert sum(status == 200 for status, _ in outcomes.values()) >= REQUESTS // 2
    samples = [f'lmgw_worker_in_flight{{role="{_role(n)}",worker="{n}"}}' for n in sims]
    with trio.fail_after(5):  # (an SGLang prefill leg may end after its request's answer)
        while True:
            text = (await http_request(url, "GET", "/metrics")).body.decode()
            if all(metric_value(text, sample) == 0 for sample in samples):
                break
            await trio.sleep(0.02)
    plain = REQUESTS // 2  # the non-streamed half
    lane = express  # (the compiled lane takes every P/D dialect's plain requests)
    assert metric_value(text, "lmgw_express_requests_total") == (plain if lane else 0)
    ok = metric_value(
        text, f'lmgw_requests_total{{endpoint="chat",model="{MODEL}",flow="p/d",status="200"}}'
    )
    assert ok == sum(status == 200 for status, _ in outcomes.values())


@pytest.mark.parametrize("dialect", ["vllm-nixl", "sglang-bootstrap"])
async def test_clients_leaving_at_any_point_leave_nothing_behind(
    nursery: trio.Nursery, sim_worker: Any, dialect: str
) -> None:
    """Clients that hang up at random moments (before the prefill answers, between the legs,
    mid-stream, after the answer): the gateway aborts what it sent upstream, its load
    accounting and the workers' own in-flight counts return to zero, and it serves on."""
    sims = {
        "p0": await sim_worker(role="p", speed=10.0),
        "d0": await sim_worker(role="d", speed=40.0),
    }
    url = await _gateway(nursery, sims, "p/d", dialect)
    rng = random.Random(5)

    async def leave(i: int, after_s: float) -> None:
        body = _body(i, i % 2 == 1)
        body["max_tokens"] = 32
        body["messages"][0]["content"] += " and the long context" * (50 * (i % 4))
        stream = await open_stream(url)
        with trio.move_on_after(after_s):
            await stream.send_all(request_bytes(url, "POST", "/v1/chat/completions", body))
            while await stream.receive_some(65536):
                pass
        await stream.aclose()

    async with trio.open_nursery() as clients:
        for i in range(REQUESTS):
            clients.start_soon(leave, i, rng.uniform(0.0, 0.05))

    def idle(text: str) -> bool:
        return all(
            metric_value(text, f'lmgw_worker_in_flight{{role="{n[0]}",worker="{n}"}}') == 0
            for n in sims
        )

    with trio.fail_after(5):  # every abandoned leg is given up, upstream too
        while not idle((await http_request(url, "GET", "/metrics")).body.decode()):
            await trio.sleep(0.05)
        for sim in sims.values():
            while (await sim.stats())["in_flight"]:
                await trio.sleep(0.05)
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    assert "lmgw_placement_queued_tokens{worker=" not in text
    stats = [await sim.stats() for sim in sims.values()]
    assert sum(st["aborted_total"] for st in stats) > 0  # legs were cut short upstream
    r = await http_request(url, "POST", "/v1/chat/completions", _body(0, False))
    assert r.status == 200, r.body


async def test_fleet_changes_under_pd_traffic_lose_no_request(
    nursery: trio.Nursery, sim_worker: Any
) -> None:
    """While P/D requests run, a decode worker is removed at once, a prefill worker is drained
    and both come back through the admin API: every request ends with the exact text (legs in
    flight finish on their connections, new ones go to the workers still routable)."""
    reference = await sim_worker(role="pd")
    sims = {
        "p0": await sim_worker(role="p", speed=40.0),
        "p1": await sim_worker(role="p", speed=40.0),
        "d0": await sim_worker(role="d", speed=40.0),
        "d1": await sim_worker(role="d", speed=40.0),
    }
    token = "admin-secret"
    url = await _gateway(nursery, sims, "p/d", "vllm-nixl", admin=AdminConfig(token=token))
    auth = {"authorization": f"Bearer {token}"}
    expected = {}
    for i in range(REQUESTS):
        r = await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        expected[i] = r.json()["choices"][0]["message"]["content"]
    texts: dict[int, str | None] = {}

    async def one(i: int) -> None:
        await trio.sleep(i * 0.004)  # spread over the changes below
        stream = i % 2 == 1
        with trio.fail_after(10):
            r = await http_request(url, "POST", "/v1/chat/completions", _body(i, stream))
        assert r.status == 200, (i, r.status, r.body)
        texts[i] = _text(r, stream)

    async def changes() -> None:
        await trio.sleep(0.03)
        r = await http_request(url, "DELETE", "/admin/workers/d1", headers=auth)
        assert r.status == 200, r.body
        r = await http_request(url, "POST", "/admin/workers/p1/drain", headers=auth)
        assert r.status == 200, r.body
        await trio.sleep(0.03)
        d1 = {"url": sims["d1"].url, "role": "decode", "id": "d1",
              "kv_address": sims["d1"].sim.kv_address}  # fmt: skip
        r = await http_request(url, "POST", "/admin/workers", d1, headers=auth)
        assert r.status == 201, r.body
        r = await http_request(url, "POST", "/admin/workers/p1/undrain", headers=auth)
        assert r.status == 200, r.body

    async with trio.open_nursery() as run:
        run.start_soon(changes)
        for i in range(REQUESTS):
            run.start_soon(one, i)
    assert texts == expected


@pytest.mark.parametrize("flow", ["e+p+d", "e+pd"])
async def test_epd_requests_with_media_under_encoder_faults_all_end_cleanly(
    nursery: trio.Nursery, sim_worker: Any, tmp_path: Path, flow: str
) -> None:
    """Requests with their own images (and some without) while one of two encoders fails a
    third of its requests: each ends with the merged worker's exact text (the images
    embedded there inline) or a 502 naming the encode stage; accounting returns to zero."""
    ec_dir = str(tmp_path / "ec")
    reference = await sim_worker(role="pd")
    sims = {
        "e-ok": await sim_worker(role="e", ec_dir=ec_dir),
        "e-faulty": await sim_worker(
            role="e", ec_dir=ec_dir, faults={"error_rate": 0.3}, fault_seed=3
        ),
    }
    if flow == "e+p+d":
        sims["p0"] = await sim_worker(role="p", ec_dir=ec_dir)
        sims["d0"] = await sim_worker(role="d")
    else:
        sims["pd0"] = await sim_worker(role="pd", ec_dir=ec_dir)
    url = await _gateway(nursery, sims, flow, "vllm-epd")
    rng = random.Random(9)

    def body(i: int, stream: bool) -> dict[str, Any]:
        out = _body(i, stream)
        if i % 4:  # three in four carry an image of their own
            image = {"type": "image_url", "image_url": {"url": png_data_url(rng, (8, 8))}}
            text = out["messages"][0]["content"]
            out["messages"][0]["content"] = [{"type": "text", "text": text}, image]
        return out

    bodies = {i: body(i, i % 2 == 1) for i in range(REQUESTS)}
    expected = {}
    for i, b in bodies.items():
        r = await http_request(
            reference.url, "POST", "/v1/chat/completions", {**b, "stream": False}
        )
        expected[i] = r.json()["choices"][0]["message"]["content"]
    outcomes: dict[int, int] = {}
    limiter = trio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        stream = bodies[i]["stream"]
        async with limiter:
            with trio.fail_after(10):
                r = await http_request(url, "POST", "/v1/chat/completions", bodies[i])
        outcomes[i] = r.status
        if r.status == 200:
            text = _text(r, stream)
            assert text == expected[i], (i, stream)
        else:
            assert r.status == 502 and i % 4, (i, r.status, r.body)
            message = r.json()["error"]["message"]
            assert message.startswith("encode stage failed") and "Simulated" in message, message

    async with trio.open_nursery() as run:
        for i in range(REQUESTS):
            run.start_soon(one, i)
    assert len(outcomes) == REQUESTS and list(outcomes.values()).count(200) >= REQUESTS // 2
    assert (await sims["e-faulty"].stats())["errors_injected"] > 0
    text = (await http_request(url, "GET", "/metrics")).body.decode()
    for n in sims:
        role = _role(n)
        sample = f'lmgw_worker_in_flight{{role="{role}",worker="{n}"}}'
        assert metric_value(text, sample) == 0, sample


# -- merged workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("express", [True, False])
async def test_merged_requests_under_mixed_faults_end_cleanly(
    gateway: GatewayFactory, sim_worker: Any, express: bool
) -> None:
    """One worker fails a third of its requests, one drops every connection after 3 tokens,
    one stalls half of its requests before the first token (hedged streams), one is healthy:
    retries, migration and hedging hide the faults, or, where a request met failing workers
    on every attempt, it gets an OpenAI error. Both servers, the lane on and off."""
    reference = await sim_worker()
    gw = await gateway(
        per_worker=[
            {},
            {"faults": {"error_rate": 0.3}, "fault_seed": 3},
            {"faults": {"drop_at_token": 3}},
            {"faults": {"stall_rate": 0.5, "stall_s": 0.3}, "fault_seed": 5},
        ],
        upstream={"express_lane": express},
        hedging=HedgingConfig(enabled=True, delay_s=0.05),
    )
    expected = {}
    for i in range(REQUESTS):
        r = await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        expected[i] = r.json()["choices"][0]["message"]["content"]
    statuses: dict[int, int] = {}
    limiter = trio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        stream = i % 2 == 1
        async with limiter:
            with trio.fail_after(10):
                r = await gw.request("POST", "/v1/chat/completions", _body(i, stream))
        statuses[i] = r.status
        if r.status != 200:  # failing workers on both attempts
            assert r.status == 502, (i, r.status, r.body)
            assert r.json()["error"]["message"], r.body
            return
        assert _text(r, stream) == expected[i], (i, stream)

    async with trio.open_nursery() as run:
        for i in range(REQUESTS):
            run.start_soon(one, i)
    assert len(statuses) == REQUESTS
    assert list(statuses.values()).count(200) >= REQUESTS * 3 // 4
    stats = [await sim.stats() for sim in gw.sims]
    # the faults did strike: failures, dropped connections, stalls (hedged or waited out)
    assert stats[1]["errors_injected"] > 0 and stats[2]["dropped_total"] > 0
    text = await gw.metrics()
    for w in range(4):
        sample = f'lmgw_worker_in_flight{{role="pd",worker="w{w}"}}'
        assert metric_value(text, sample) == 0, sample


async def test_a_continuation_refused_by_one_worker_goes_to_another(
    gateway: GatewayFactory, sim_worker: Any
) -> None:
    """A stream broken mid-way is continued elsewhere; when the worker chosen for the
    continuation refuses it before its first byte (a 500), another worker gets it, as a first
    attempt would: the client gets the whole text, not an error event."""
    reference = await sim_worker()
    gw = await gateway(
        per_worker=[
            {"faults": {"drop_at_token": 3}},
            {"faults": {"error_rate": 1.0}},
            {},
        ],
        upstream={"max_attempts": 3},
    )
    for i in range(6):  # round robin: streams start on each worker, continuations move on
        expected = (
            await http_request(reference.url, "POST", "/v1/chat/completions", _body(i, False))
        ).json()["choices"][0]["message"]["content"]
        with trio.fail_after(10):
            r = await gw.request("POST", "/v1/chat/completions", _body(i, True))
        assert r.status == 200, r.body
        assert _text(r, True) == expected, i
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_stream_migrations_total{role="pd",outcome="continued"}') >= 1
