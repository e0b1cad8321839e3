"""Prometheus text exposition of a mock engine under vLLM's metric names, so the gateway's scraper
(load- and cache-aware routing) reads a simulator exactly as it reads a real vLLM V1 server."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .engine import Engine, Histogram


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value))


def render_metrics(
    engine: Engine,
    model_name: str,
    extra_counters: Iterable[tuple[str, str, float]] = (),
    *,
    engine_index: int = 0,
) -> str:
    """The /metrics body: gauges, counters and histograms with ``model_name`` and ``engine``
    labels (vLLM V1 labels every series with both; ``engine``: the data-parallel rank).
    ``extra_counters`` are simulator-only ``(name, help, value)`` series appended at the end
    (hand-off counters of the roles)."""
    labels = f'model_name="{_esc(model_name)}",engine="{engine_index}"'
    stats = engine.stats
    cache = engine.cache
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        out.append(
            f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{{{labels}}} {_num(value)}\n"
        )

    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        engine.running,
    )
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        engine.waiting,
    )
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        engine.kv_cache_usage,
    )
    metric(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        cache.queries,
    )
    metric(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        cache.hits,
    )
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        stats.prompt_tokens,
    )
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        stats.generation_tokens,
    )
    out.append(
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
    )
    for reason in ("stop", "length", "abort", *sorted(set(stats.finished) - {"stop", "length"})):
        count = stats.aborted_total if reason == "abort" else stats.finished.get(reason, 0)
        out.append(
            f'vllm:request_success_total{{{labels},finished_reason="{_esc(reason)}"}} '
            f"{_num(count)}\n"
        )
    _histogram(
        out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        stats.ttft,
        labels,
    )
    _histogram(
        out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        stats.e2e,
        labels,
    )
    for name, help_, value in extra_counters:
        metric(name, "counter", help_, value)
    return "".join(out)


def render_lora_info(running: Iterable[str], waiting: Iterable[str], max_lora: int) -> str:
    """vLLM's ``vllm:lora_requests_info`` gauge (no model or engine labels; its value the time
    it was set), which adapter-aware routers read to place a request where its adapter runs."""
    name = "vllm:lora_requests_info"
    labels = (
        f'max_lora="{max_lora}",waiting_lora_adapters="{_esc(",".join(waiting))}",'
        f'running_lora_adapters="{_esc(",".join(running))}"'
    )
    return (
        f"# HELP {name} Running stats on lora requests.\n# TYPE {name} gauge\n"
        f"{name}{{{labels}}} {_num(time.time())}\n"
    )


def _histogram(out: list[str], name: str, help_: str, hist: Histogram, labels: str) -> None:
    out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram\n")
    cumulative = 0
    for bound, count in zip(hist.buckets, hist.counts, strict=False):
        cumulative += count
        out.append(f'{name}_bucket{{{labels},le="{_num(bound)}"}} {_num(cumulative)}\n')
    out.append(f'{name}_bucket{{{labels},le="+Inf"}} {_num(hist.count)}\n')
    out.append(f"{name}_count{{{labels}}} {_num(hist.count)}\n")
    out.append(f"{name}_sum{{{labels}}} {_num(hist.total)}\n")
