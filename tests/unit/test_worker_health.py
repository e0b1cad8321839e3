"""Passive outlier ejection with backoff, engine metric scrapes, and least_load's use of them."""

from __future__ import annotations

import pytest

from lmgw.routing.policies.least_load import LeastLoad
from lmgw.routing.policy import RouteContext
from lmgw.workers import monitor as monitor_mod
from lmgw.workers.registry import Registry
from lmgw.workers.worker import EngineLoad, Worker, WorkerState

VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
vllm:prefix_cache_hits_total{model_name="m"} 40.0
vllm:prefix_cache_queries_total{model_name="m"} 100.0
vllm:num_requests_running_bogus 99
garbage line
vllm:num_requests_waiting{engine="1"} not-a-number
"""


SGLANG_METRICS = b"""# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 8.0
sglang:num_queue_reqs{model_name="m"} 4.0
sglang:token_usage{model_name="m"} 0.52
sglang:cache_hit_rate{model_name="m"} 0.28
sglang:prompt_tokens_total{model_name="m"} 8128902.0
sglang:generation_tokens_total{model_name="m"} 7557572.0
sglang:time_to_first_token_seconds_bucket{le="0.04",model_name="m"} 1.0
"""


def test_sglang_engine_metrics_are_read_too() -> None:
    """SGLang (``--enable-metrics``): its queue and KV usage weigh in load-aware routing, and
    its token counters feed the stuck-worker watch, as vLLM's do."""
    load = EngineLoad()
    assert load.tokens is None
    monitor_mod.apply_engine_metrics(load, SGLANG_METRICS)
    assert (load.running, load.waiting, load.kv_usage) == (8.0, 4.0, 0.52)
    assert load.tokens == 8128902.0 + 7557572.0
    assert (load.prefix_hits, load.prefix_queries) == (0.0, 0.0)  # it has a rate gauge only


def test_engine_metrics_are_summed_over_label_sets() -> None:
    load = EngineLoad()
    monitor_mod.apply_engine_metrics(load, VLLM_METRICS)
    assert (load.running, load.waiting, load.kv_usage) == (5.0, 7.0, 0.25)
    assert (load.prefix_hits, load.prefix_queries) == (40.0, 100.0)


def healthy(registry: Registry, wid: str) -> Worker:
    w = registry.add(Worker(wid, f"http://127.0.0.1:{len(registry) + 1}", "pd"))
    registry.set_state(w, WorkerState.HEALTHY)
    return w


def test_consecutive_failures_eject_with_doubling_backoff(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(monitor_mod.time, "monotonic", lambda: now[0])
    import lmgw.workers.registry as registry_mod

    monkeypatch.setattr(registry_mod.time, "monotonic", lambda: now[0])
    reg = Registry(outlier_failures=3, base_ejection_s=2.0, max_ejection_s=60.0)
    w = healthy(reg, "w")
    for _ in range(2):
        reg.record_failure(w, "500", eject=False)
    assert w.state is WorkerState.HEALTHY
    reg.record_success(w)  # a success in between resets the streak
    for _ in range(2):
        reg.record_failure(w, "500", eject=False)
    assert w.state is WorkerState.HEALTHY
    reg.record_failure(w, "500", eject=False)
    assert w.state is WorkerState.EJECTED and w.ejected_until == 1002.0
    mon = monitor_mod.HealthMonitor(reg, None, monitor_mod.HealthConfig())  # type: ignore[arg-type]
    mon._apply(w, True, "")
    assert w.state is WorkerState.EJECTED  # a good probe inside the backoff changes nothing
    now[0] = 1002.5
    mon._apply(w, True, "")  # half-open: the probe after the backoff brings it back
    assert w.state is WorkerState.HEALTHY and w.consecutive_failures == 0
    reg.record_failure(w, "refused", eject=True)  # soon after: the backoff doubles
    assert w.ejections == 2 and w.ejected_until == pytest.approx(1006.5)
    now[0] = 2000.0
    mon._apply(w, True, "")
    reg.record_failure(w, "refused", eject=True)  # long after: back to the base
    assert w.ejections == 1 and w.ejected_until == pytest.approx(2002.0)


def test_outlier_detection_off() -> None:
    reg = Registry(outlier_failures=0)
    w = healthy(reg, "w")
    for _ in range(50):
        reg.record_failure(w, "500", eject=False)
    assert w.state is WorkerState.HEALTHY


def test_panic_routing_only_when_every_worker_is_ejected_and_only_to_probed_ones() -> None:
    reg = Registry(outlier_failures=1)
    a, b = healthy(reg, "a"), healthy(reg, "b")
    other = reg.add(Worker("p0", "http://127.0.0.1:9", "p"))
    reg.set_state(other, WorkerState.HEALTHY)
    for w in (a, b):
        reg.probed(w, True)
    reg.record_failure(a, "500", eject=False)
    found = reg.candidates("m", "pd")
    assert list(found) == [b] and not found.panic  # one healthy left: no panic
    reg.record_failure(b, "500", eject=False)
    found = reg.candidates("m", "pd")
    assert sorted(w.id for w in found) == ["a", "b"] and found.panic
    assert not reg.candidates("m", "p").panic  # per role
    reg.probed(a, False)  # its probe fails too: out of the panic set at once
    assert [w.id for w in reg.candidates("m", "pd")] == ["b"]
    b.stuck = True  # ejected as stuck: its passing probe says nothing
    reg.probed(b, False)
    reg.probed(b, True)  # (a probe flip rebuilds the sets)
    assert not reg.candidates("m", "pd")
    reg.set_state(b, WorkerState.HEALTHY)  # back: no longer marked
    assert not b.stuck
    reg.record_failure(b, "500", eject=False)
    assert [w.id for w in reg.candidates("m", "pd")] == ["b"]  # a panic pick again
    reg.probed(b, False)
    assert not reg.candidates("m", "pd")  # nobody answers its probe: a 503 then
    reg.probed(b, True)
    reg.set_state(a, WorkerState.HEALTHY)  # one back: routing is normal again
    found = reg.candidates("m", "pd")
    assert list(found) == [a] and not found.panic
    strict = Registry(outlier_failures=1, panic_routing=False)
    w = healthy(strict, "w")
    strict.probed(w, True)
    strict.record_failure(w, "500", eject=False)
    assert not strict.candidates("m", "pd")
    drained = healthy(reg, "c")  # a draining worker is never a panic pick
    reg.probed(drained, True)
    reg.set_state(drained, WorkerState.DRAINING)
    reg.set_state(a, WorkerState.DRAINING)
    assert [w.id for w in reg.candidates("m", "pd")] == ["b"]


def test_least_load_counts_the_queue_the_worker_reports() -> None:
    reg = Registry()
    a, b = healthy(reg, "a"), healthy(reg, "b")
    a.engine.waiting = 10.0  # busy with other gateways' requests
    Registry.acquire(b)
    policy = LeastLoad()
    picks = {policy.choose((a, b), RouteContext("m")).id for _ in range(4)}
    assert picks == {"b"}


@pytest.mark.parametrize(
    ("answer", "port"),
    [
        ((200, b'{"disaggregation_mode":"prefill","disaggregation_bootstrap_port":9001}'), 9001),
        ((200, b'{"disaggregation_mode":"decode","disaggregation_bootstrap_port":9001}'), None),
        ((200, b'{"disaggregation_mode":"prefill","disaggregation_bootstrap_port":70000}'), None),
        ((200, b'{"disaggregation_mode":"prefill","disaggregation_bootstrap_port":"9001"}'), None),
        ((200, b"not json"), None),
        ((404, b'{"detail":"Not Found"}'), None),
    ],
)
def test_an_sglang_prefill_workers_bootstrap_port_is_asked_once(
    answer: tuple[int, bytes], port: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefill worker without a configured bootstrap port: its /get_server_info's, when it
    says it is a prefill server on a real port; else a warning, and it is not asked again. A
    failed exchange is asked again at the next probe; a configured port is never asked."""
    import trio

    asked: list[str] = []
    answers: list[tuple[int, bytes] | None] = [None, answer]

    async def get(worker: Worker, path: str, limit: int) -> tuple[int, bytes] | None:
        asked.append(path)
        return answers.pop(0)

    m = monitor_mod.HealthMonitor(Registry(), None, monitor_mod.HealthConfig())  # type: ignore[arg-type]
    m._get = get  # type: ignore[method-assign]
    w = Worker("p0", "http://127.0.0.1:8100", "p")
    for _ in range(3):  # the first exchange fails, the second answers, the third is not made
        trio.run(m._discover_bootstrap, w)
    assert asked == ["/get_server_info"] * 2
    assert w.bootstrap_port == port
    assert ("none in its /get_server_info" in caplog.text) == (port is None)
    configured = Worker("p1", "http://127.0.0.1:8101", "p", bootstrap_port=8998)
    trio.run(m._discover_bootstrap, configured)
    assert asked == ["/get_server_info"] * 2 and configured.bootstrap_port == 8998
