"""Admission with the fair queue, on trio (MockClock where time matters): who gets a freed
slot (priority, aging, tenants and weights), the 429s (full, timeout, evicted), the metrics by
class and tenant, a request's terms (key default priority, min_priority, the tenant header,
the cost estimate), and the config keys."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from lmgw.admission import Admission, Rejected, estimated_tokens, priority_class
from lmgw.api.keys import ApiKeys, AuthMetrics, load_specs
from lmgw.api.openai import decode_view
from lmgw.auth import AuthError, KeyEntry, KeySpec, KeyTable
from lmgw.config import (
    ApiKeyConfig,
    AuthConfig,
    ConfigError,
    LimitsConfig,
    loads_config,
)
from lmgw.http.types import Request
from lmgw.metrics import Metrics

DIGEST = "sha256:" + "ab" * 32


def key(name: str, *, weight: float = 1.0, priority: int = 0, floor: int | None = None) -> KeyEntry:
    digest = "sha256:" + (name.encode().hex() * 64)[:64]
    return KeyEntry(
        KeySpec(digest, name, weight=weight, priority=priority, min_priority=floor), 0.0
    )


def request(
    principal: KeyEntry | None = None,
    priority: int | None = None,
    max_tokens: int | None = 16,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[Request, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if priority is not None:
        body["priority"] = priority
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    raw = msgspec.json.encode(body)
    req = Request("POST", "/v1/chat/completions", "", headers or [], raw)
    req.principal = principal
    return req, decode_view("chat", raw)


def sample(metrics: Metrics, prefix: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix}")


class Holders:
    """Requests that queue on ``adm`` in the order given (one tick apart), note when they
    get their slot, and hold it until the test calls :meth:`finish_one`."""

    def __init__(self, adm: Admission, nursery: trio.Nursery) -> None:
        self.adm, self.nursery = adm, nursery
        self.admitted: list[str] = []
        self.rejected: dict[str, Rejected] = {}
        self._release: dict[str, trio.Event] = {}

    async def start(self, name: str, req: Request | None = None, view: Any = None) -> None:
        release = self._release[name] = trio.Event()

        async def run() -> None:
            if not self.adm.enter():
                try:
                    await self.adm.wait(req, view)
                except Rejected as exc:
                    self.rejected[name] = exc
                    return
            self.admitted.append(name)
            try:
                await release.wait()
            finally:
                self.adm.leave(0.0)

        self.nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()

    async def finish(self, name: str) -> None:
        self._release[name].set()
        await trio.testing.wait_all_tasks_blocked()

    async def finish_all_in_order(self) -> None:
        """Finish the running requests one at a time until nobody waits or runs."""
        done = 0
        while done < len(self.admitted):
            await self.finish(self.admitted[done])
            done += 1


async def test_priority_decides_who_gets_the_slot() -> None:
    adm = Admission(1, 10, 60.0, aging_s=0.0)
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        for name, prio in [("p5", 5), ("p0a", 0), ("m1", -1), ("p0b", 0), ("p3", 3)]:
            await h.start(name, *request(priority=prio))
        assert adm.queue_depth == 5 and adm.in_flight == 1
        await h.finish_all_in_order()
    assert h.admitted == ["running", "m1", "p0a", "p0b", "p3", "p5"]
    assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_fifo_policy_keeps_arrival_order() -> None:
    adm = Admission(1, 10, 60.0, policy="fifo")
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        for name, prio in [("p5", 5), ("m1", -1), ("p0", 0)]:
            await h.start(name, *request(priority=prio))
        await h.finish_all_in_order()
    assert h.admitted == ["running", "p5", "m1", "p0"]


async def test_aging_serves_a_low_priority_waiter_under_a_stream_of_urgent_ones(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One slot, 1 s per request, a priority-0 request arriving every 0.5 s (the queue never
    empties). The priority-4 request (aging_s 2) goes after the priority-0 ones that arrived
    less than 4 x 2 s after it, and before all later ones; strict priority (aging_s 0) would
    run it after every one of them."""
    for aging_s in (2.0, 0.0):
        adm = Admission(1, 1000, 600.0, aging_s=aging_s)
        order: list[tuple[str, float]] = []  # (name, arrival) in the order they got the slot

        async def one(name: str, prio: int, adm: Admission = adm, order: list = order) -> None:
            arrival = trio.current_time()
            req, view = request(priority=prio)
            if not adm.enter():
                await adm.wait(req, view)
            order.append((name, arrival))
            try:
                await trio.sleep(1.0)
            finally:
                adm.leave(0.0)

        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(one, "first", 0)
            await trio.sleep(0.1)
            nursery.start_soon(one, "batch", 4)
            await trio.sleep(0.15)
            for i in range(30):  # at 0.25, 0.75, ...: none ties with batch's 0.1 + 4 x 2
                nursery.start_soon(one, f"live{i}", 0)
                await trio.sleep(0.5)
        names = [name for name, _ in order]
        before = {name for name, arrival in order[: names.index("batch")]}
        if aging_s:
            earlier = {n for n, a in order if n != "batch" and a < t0 + 8.1}
            assert before == {"first"} | earlier, sorted(before ^ ({"first"} | earlier))
        else:
            assert names[-1] == "batch"
        assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_two_tenants_share_slots_by_weight_while_one_floods(
    autojump_clock: trio.abc.Clock,
) -> None:
    """4 slots, 1 s per request. Key "heavy" floods (300 queued at once); key "light" keeps 4
    clients looping. Slots go 1:1, then 3:1 when light's weight is 3 (within 10%)."""
    for w_light, expected in ((1.0, 0.5), (3.0, 0.75)):
        adm = Admission(4, 1000, 600.0)
        heavy, light = key("heavy"), key("light", weight=w_light)
        served: list[str] = []

        async def client(
            k: KeyEntry, repeat: int, adm: Admission = adm, served: list[str] = served
        ) -> None:
            for _ in range(repeat):
                req, view = request(k)
                if not adm.enter():
                    await adm.wait(req, view)
                served.append(k.name)
                try:
                    await trio.sleep(1.0)
                finally:
                    adm.leave(0.0)

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(client, heavy, 1)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):
                nursery.start_soon(client, light, 50)
        window = served[4:204]  # after the first 4 slots, while both have waiters
        share = window.count("light") / len(window)
        assert abs(share - expected) <= 0.1 * expected, (w_light, share)
        assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_a_light_tenant_waits_at_most_a_slot_or_two_behind_1000_queued() -> None:
    adm = Admission(2, 2000, 600.0)
    heavy, light = key("heavy"), key("light")
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        for i in range(1002):
            req, view = request(heavy)
            await _queue_quietly(adm, nursery, h, f"h{i}", req, view)
        await trio.testing.wait_all_tasks_blocked()
        assert adm.in_flight == 2 and adm.queue_depth == 1000
        await h.start("light", *request(light))
        # two slots free up: the light request has one of them
        running = list(h.admitted)
        assert len(running) == 2
        await h.finish(running[0])
        await h.finish(running[1])
        assert "light" in h.admitted, h.admitted[-3:]
        nursery.cancel_scope.cancel()
    assert adm.in_flight == 0 and adm.queue_depth == 0


async def _queue_quietly(
    adm: Admission, nursery: trio.Nursery, h: Holders, name: str, req: Request, view: Any
) -> None:
    release = h._release[name] = trio.Event()

    async def run() -> None:
        if not adm.enter():
            await adm.wait(req, view)
        h.admitted.append(name)
        try:
            await release.wait()
        finally:
            adm.leave(0.0)

    nursery.start_soon(run)


async def test_a_full_queue_evicts_a_lower_priority_waiter_with_a_429() -> None:
    metrics = Metrics()
    adm = Admission(1, 2, 60.0, metrics)
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        await h.start("low1", *request(priority=3))
        await h.start("low2", *request(priority=3))
        await h.start("urgent", *request(priority=0))  # evicts low2 (the newest of its level)
        assert set(h.rejected) == {"low2"}
        exc = h.rejected["low2"]
        assert (exc.status, exc.reason, exc.type) == (429, "evicted", "RateLimitError")
        assert exc.retry_after >= 1 and "yielded its place" in exc.message
        await h.start("later", *request(priority=3))  # less urgent than every waiter: 429
        assert h.rejected["later"].reason == "queue_full"
        assert adm.queue_depth == 2
        await h.finish_all_in_order()
    assert h.admitted == ["running", "urgent", "low1"]
    assert sample(metrics, 'lmgw_admission_rejected_total{reason="evicted"}') == 1
    assert sample(metrics, 'lmgw_admission_rejected_total{reason="queue_full"}') == 1
    assert sample(metrics, 'lmgw_admission_tenant_requests_total{tenant="-",outcome="evicted"}')
    assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_a_full_queue_makes_room_for_a_tenant_with_no_place() -> None:
    adm = Admission(1, 3, 60.0)
    heavy, light = key("heavy"), key("light")
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        for i in range(3):
            await h.start(f"heavy{i}", *request(heavy))
        await h.start("light", *request(light))
        assert list(h.rejected) == ["heavy2"]
        await h.start("heavy3", *request(heavy))  # heavy has 2, light 1: heavy3 turned away
        assert h.rejected["heavy3"].reason == "queue_full"
        await h.finish_all_in_order()
    assert h.admitted == ["running", "heavy0", "light", "heavy1"]


async def test_timeout_and_cancel_leave_no_trace_in_the_fair_queue(
    autojump_clock: trio.abc.Clock,
) -> None:
    adm = Admission(1, 10, 2.0)
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        scope = trio.CancelScope()

        async def cancelled() -> None:
            with scope:
                await adm.wait(*request(key("c"), priority=-2))

        nursery.start_soon(cancelled)
        await h.start("times-out", *request(key("t"), priority=1))
        await trio.testing.wait_all_tasks_blocked()
        assert adm.queue_depth == 2
        scope.cancel()
        await trio.sleep(3)
        assert h.rejected["times-out"].reason == "queue_timeout"
        assert adm.queue_depth == 0 and not adm._queue._levels
        await h.finish("running")
    assert adm.in_flight == 0 and adm.enter()


async def test_metrics_by_class_and_tenant(autojump_clock: trio.abc.Clock) -> None:
    metrics = Metrics()
    adm = Admission(1, 10, 60.0, metrics)
    alpha = key("alpha")
    async with trio.open_nursery() as nursery:
        h = Holders(adm, nursery)
        await h.start("running")
        await h.start("a", *request(alpha, priority=-1))
        await h.start("b", *request(alpha, priority=2))
        await h.start("c", *request(None))
        text = metrics.render().decode()
        assert 'lmgw_admission_waiting{priority_class="high",tenant="alpha"} 1' in text
        assert 'lmgw_admission_waiting{priority_class="low",tenant="alpha"} 1' in text
        assert 'lmgw_admission_waiting{priority_class="normal",tenant="-"} 1' in text
        assert sample(metrics, "lmgw_admission_queue_depth") == 3
        await trio.sleep(1.5)
        await h.finish_all_in_order()
    assert sample(metrics, 'lmgw_admission_wait_seconds_count{priority_class="high"}') == 1
    assert sample(metrics, 'lmgw_admission_wait_seconds_sum{priority_class="high"}') == 1.5
    admitted = 'lmgw_admission_tenant_requests_total{tenant="alpha",outcome="admitted"}'
    assert sample(metrics, admitted) == 2
    assert sample(metrics, 'lmgw_admission_tenant_wait_seconds_total{tenant="alpha"}') >= 3.0
    assert "lmgw_admission_waiting{" not in metrics.render().decode()


# -- a request's terms -------------------------------------------------------------------------


async def test_terms_from_the_key_the_body_and_the_header() -> None:
    adm = Admission(1, 10, 60.0, tenant_header="X-Tenant-Id")
    k = key("k", weight=2.5, priority=4)
    w = adm.waiter(*request(k))
    assert (w.priority, w.tenant, w.weight, w.label) == (4, k, 2.5, "k")  # the key's default
    assert adm.waiter(*request(k, priority=-1)).priority == -1  # the body's wins
    w = adm.waiter(*request(None, headers=[(b"x-tenant-id", b"team-a")]))
    assert (w.tenant, w.label, w.priority) == (b"team-a", "-", 0)
    assert adm.waiter(*request(None)).tenant is None
    assert adm.waiter().priority == 0
    req, _ = request(k)  # a pass-through route: no view, the key's tenant and default
    w = adm.waiter(req)
    assert (w.priority, w.tenant, w.cost) == (4, k, len(req.body) // 4 + 256)
    req, view = request(None, max_tokens=100)
    assert adm.waiter(req, view).cost == len(req.body) // 4 + 100
    assert Admission(1, 10, 60.0, cost="requests").waiter(req, view).cost == 1.0


def test_estimated_tokens() -> None:
    _, chat = request(max_tokens=None)
    assert estimated_tokens(400, chat) == 100 + 256
    view = decode_view("completions", b'{"prompt": "x", "max_tokens": 10, "n": 3}')
    assert estimated_tokens(40, view) == 10 + 30
    view = decode_view(
        "chat", b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7}'
    )
    assert estimated_tokens(0, view) == 7
    view = decode_view(
        "generate", b'{"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 5}, {"n": 2}]}'
    )
    assert estimated_tokens(8, view) == 2 + 5 + 2 * 256


def test_priority_classes() -> None:
    assert [priority_class(p) for p in (-5, 0, 7)] == ["high", "normal", "low"]


def test_priority_field_must_be_an_integer() -> None:
    for bad in (b'"high"', b"1.5", b"true"):
        body = b'{"messages": [{"role": "user", "content": "x"}], "priority": ' + bad + b"}"
        with pytest.raises(Exception) as info:
            decode_view("chat", body)
        assert getattr(info.value, "status", None) == 400
        assert getattr(info.value, "param", None) == "priority"


def test_min_priority_is_enforced_per_key() -> None:
    table = KeyTable()
    capped = key("capped", floor=0)
    KeyTable.check_priority(capped, 0)
    KeyTable.check_priority(capped, 9)
    with pytest.raises(AuthError) as info:
        KeyTable.check_priority(capped, -1)
    exc = info.value
    assert (exc.status, exc.code, exc.reason, exc.param) == (
        403,
        "priority_not_allowed",
        "priority",
        "priority",
    )
    KeyTable.check_priority(key("free"), -(10**9))  # no floor
    assert len(table) == 0


def test_key_priority_settings_from_config_and_defaults() -> None:
    cfg = AuthConfig(
        min_priority=0,
        priority=1,
        keys=[
            ApiKeyConfig(key="sk-aaaaaaaaaaaaaaaa", name="plain"),
            ApiKeyConfig(key="sk-bbbbbbbbbbbbbbbb", name="vip", min_priority=-10, weight=3),
            ApiKeyConfig(key="sk-cccccccccccccccc", name="batch", priority=5),
        ],
    )
    specs = {s.name: s for s in load_specs(cfg)}
    assert (specs["plain"].priority, specs["plain"].min_priority, specs["plain"].weight) == (
        1,
        0,
        1.0,
    )
    assert (specs["vip"].min_priority, specs["vip"].weight) == (-10, 3.0)
    assert specs["batch"].priority == 5
    keys = ApiKeys(cfg, AuthMetrics(Metrics()))
    entry = next(e for e in keys.table if e.name == "plain")
    with pytest.raises(AuthError):
        keys.check_priority(entry, -1)


def test_key_priority_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        ApiKeyConfig(key="sk-aaaaaaaaaaaaaaaa", priority=-1, min_priority=0)
    assert info.value.path == "priority"
    with pytest.raises(ConfigError) as info:
        ApiKeyConfig(key="sk-aaaaaaaaaaaaaaaa", weight=0)
    assert info.value.path == "weight"
    with pytest.raises(ConfigError) as info:  # the section's floor above a key's default
        load_specs(
            AuthConfig(min_priority=0, keys=[ApiKeyConfig(key="sk-aaaaaaaaaaaaaaaa", priority=-2)])
        )
    assert "min_priority" in str(info.value)


def test_limits_queue_keys() -> None:
    lim = LimitsConfig()
    assert (lim.queue_policy, lim.priority_aging_s, lim.fair_share_cost, lim.tenant_header) == (
        "fair",
        10.0,
        "tokens",
        None,
    )
    cfg = loads_config(
        '[limits]\nqueue_policy = "fifo"\npriority_aging_s = 0\nfair_share_cost = "requests"\n'
        'tenant_header = "X-Tenant-Id"'
    )
    assert cfg.limits.queue_policy == "fifo" and cfg.limits.tenant_header == "X-Tenant-Id"
    for text, path in [
        ('queue_policy = "lifo"', "limits.queue_policy"),
        ("priority_aging_s = -1", "limits.priority_aging_s"),
        ('fair_share_cost = "bytes"', "limits.fair_share_cost"),
        ('tenant_header = "bad header"', "limits.tenant_header"),
    ]:
        with pytest.raises(ConfigError) as info:
            loads_config(f"[limits]\n{text}")
        assert info.value.path == path, text
    with pytest.raises(ConfigError) as info:
        loads_config(
            '[limits]\ntenant_header = "X-Tenant-Id"\n[[auth.keys]]\nkey = "sk-aaaaaaaaaaaaaaaa"'
        )
    assert info.value.path == "limits.tenant_header"
