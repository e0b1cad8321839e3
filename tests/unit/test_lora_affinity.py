"""LoRA affinity (routing/lora_affinity.py): an adapter's requests go where it is active or a
LoRA slot is free; what is active comes from the gateway's own dispatches and the engine's
``vllm:lora_requests_info``."""

from __future__ import annotations

from lmgw.routing.lora_affinity import LoraAffine, affine
from lmgw.routing.policies.round_robin import RoundRobin
from lmgw.routing.policy import RouteContext
from lmgw.workers.monitor import apply_engine_metrics
from lmgw.workers.worker import EngineLoad, Worker


def workers(n: int, max_lora: int = 1) -> list[Worker]:
    out = []
    for i in range(n):
        w = Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "pd")
        w.engine.lora_max = max_lora
        out.append(w)
    return out


def test_the_latest_lora_info_sample_is_read() -> None:
    load = EngineLoad()
    text = (
        b'vllm:num_requests_running{model_name="m"} 2.0\n'
        b"# HELP vllm:lora_requests_info Running stats on lora requests.\n"
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""}'
        b" 1.7e9\n"
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="b,c",waiting_lora_adapters="a"}'
        b" 1.8e9\n"
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}'
        b" 1.6e9\n"
    )
    apply_engine_metrics(load, text)
    assert load.running == 2.0
    assert load.lora_running == {"b", "c"} and load.lora_max == 2
    apply_engine_metrics(load, b'vllm:num_requests_running{model_name="m"} 0.0\n')
    assert load.lora_running == {"b", "c"}  # no sample: the last known state stays


def test_affinity_keeps_workers_where_the_adapter_is_or_fits() -> None:
    w0, w1, w2 = workers(3)
    w0.engine.lora_running = frozenset({"x"})  # the engine says x runs there
    in_flight = {"w1": {"y": 2}}  # the gateway has y requests on w1: its one slot is taken
    assert affine([w0, w1, w2], "x", in_flight) == [w0, w2]  # w2: a free slot
    assert affine([w0, w1, w2], "y", in_flight) == [w1, w2]
    w2.engine.lora_max = 0  # unknown limit: counts as room
    assert affine([w1, w2], "z", in_flight) == [w2]
    # nobody has room or the adapter: every candidate (the engines queue it)
    w2.engine.lora_max = 1
    w2.engine.lora_running = frozenset({"q"})
    cands = [w1, w2]
    assert affine(cands, "z", in_flight) is cands


def test_the_wrapper_narrows_only_adapter_requests_and_counts_back_to_zero() -> None:
    ws = workers(2)
    policy = LoraAffine(RoundRobin())
    a = RouteContext("m", "r1", lora="a")
    first = policy.choose(ws, a)
    policy.on_dispatch(first, a)
    b = RouteContext("m", "r2", lora="b")
    second = policy.choose(ws, b)  # the slot of `first` is a's: b goes to the other
    assert second is not first and policy.narrowed == 1
    policy.on_dispatch(second, b)
    for _ in range(4):  # a again: only where a is active (the other slot holds b)
        assert policy.choose(ws, RouteContext("m", "r", lora="a")) is first
    base = {policy.choose(ws, RouteContext("m", "r")) for _ in range(4)}
    assert base == set(ws)  # base-model requests: round robin as ever
    policy.on_finish(first, a, True)
    policy.on_finish(second, b, False)
    assert policy.in_flight == {}
    assert policy.statistics()["lora_affinity_narrowed"] >= 5
    assert policy.name == "round_robin"
