"""Prometheus metrics: a small registry, cheap on the hot path, rendered as text on /metrics.

Naming follows DESIGN.md §7: ``lmgw_`` prefix, seconds for time, ``_total`` for counters,
``role`` and ``worker`` labels. Label values are tuples looked up in a dict; an observation is
a bisect plus two additions, so metrics never show up in request profiles.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
#: per-token latencies sit between ~1 ms and a few hundred ms (vLLM's own TPOT buckets are alike)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


Samples = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


class _Scalar:
    """A counter or gauge: values kept here, or read from ``collect`` at scrape time (for
    numbers the code keeps anyway, such as a worker's request total: no second update per
    request)."""

    kind = "untyped"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...] = (), collect: Samples | None = None
    ) -> None:
        self.name, self.help, self.labelnames = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.collect = collect

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        items = list(self.collect()) if self.collect else sorted(self.values.items())
        for lv, v in items:
            yield f"{self.name}{_labels(self.labelnames, lv)} {_num(v)}"


class Counter(_Scalar):
    kind = "counter"

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        v = self.values
        v[labels] = v.get(labels, 0.0) + amount


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = value


class Histogram:
    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.help, self.labelnames = name, help, labels
        self.buckets = buckets
        # per label set: [count per bucket (non-cumulative) + overflow, sum, count]
        self.series: dict[tuple[str, ...], list] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        s[0][bisect.bisect_left(self.buckets, value)] += 1
        s[1] += value
        s[2] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for lv, (counts, total, n) in sorted(self.series.items()):
            acc = 0
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                acc += c
                le = 'le="' + _num(bound) + '"'
                yield f"{self.name}_bucket{_labels(self.labelnames, lv, le)} {acc}"
            yield f"{self.name}_sum{_labels(self.labelnames, lv)} {_num(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, lv)} {n}"


class Metrics:
    """The gateway's metric set. One instance per Gateway (no module-level state)."""

    def __init__(
        self,
        in_flight: Samples | None = None,
        worker_requests: Samples | None = None,
    ) -> None:
        self.requests = Counter(
            "lmgw_requests_total",
            "Client requests answered, by endpoint, model, the model's flow and HTTP status.",
            ("endpoint", "model", "flow", "status"),
        )
        self.e2e = Histogram(
            "lmgw_request_duration_seconds",
            "End-to-end request latency as the client sees it.",
            ("endpoint", "model"),
        )
        self.ttft = Histogram(
            "lmgw_time_to_first_token_seconds",
            "Time from request arrival to the first streamed byte.",
            ("model",),
        )
        self.tpot = Histogram(
            "lmgw_time_per_output_token_seconds",
            "Mean time between streamed events after the first, per streamed request (the"
            " client-facing leg; one token per event as vLLM and SGLang stream by default).",
            ("model",),
            buckets=TPOT_BUCKETS,
        )
        self.upstream_errors = Counter(
            "lmgw_upstream_errors_total",
            "Failed exchanges with workers, by worker and kind.",
            ("role", "worker", "kind"),
        )
        self.stage = Histogram(
            "lmgw_stage_duration_seconds",
            "Duration of each leg on a worker, by role (e encode, p prefill, d decode, pd"
            " merged); the client-facing leg until its last byte is relayed.",
            ("role", "worker"),
        )
        self.stage_ttft = Histogram(
            "lmgw_stage_time_to_first_token_seconds",
            "From sending the client-facing leg (decode or merged) to its first streamed byte.",
            ("role", "worker"),
        )
        self.stage_tpot = Histogram(
            "lmgw_stage_time_per_output_token_seconds",
            "Mean time between streamed events of the client-facing leg after the first"
            " (vLLM and SGLang stream one token per event by default).",
            ("role", "worker"),
            buckets=TPOT_BUCKETS,
        )
        self.encoder_cache_hits = Counter(
            "lmgw_encoder_cache_hits_total",
            "Media items whose encoder leg was skipped: the gateway saw them encoded recently.",
            ("model",),
        )
        self.migrations = Counter(
            "lmgw_stream_migrations_total",
            "Streams that broke mid-way: continued on another worker, or ended with an error.",
            ("role", "outcome"),
        )
        self.pd_splits = Counter(
            "lmgw_pd_split_requests_total",
            "Requests a one-sequence P/D hand-off cannot carry (a completions batch, n > 1) run"
            " as one P/D pair per prompt and sample; kind: batch, n or both.",
            ("model", "kind"),
        )
        self.pd_split_pairs = Counter(
            "lmgw_pd_split_pairs_total",
            "The P/D pairs those requests ran as (prompts x n each).",
            ("model",),
        )
        self.pd_local_prefill = Counter(
            "lmgw_pd_local_prefill_total",
            "P/D requests their decode worker prefilled itself, with no prefill leg, by reason:"
            " short (prompt at most models[].local_prefill_tokens), cached (so many left after"
            " the decode worker's cached prefix), busy (the prefill worker had at least"
            " models[].local_prefill_busy requests).",
            ("model", "reason"),
        )
        self.placements = Counter(
            "lmgw_placement_pairs_total",
            "P/D requests placed jointly (routing.placement = joint, workers with zones), by"
            " whether the pair shares a zone (same_zone) or moves its KV across (cross_zone).",
            ("model", "zones"),
        )
        self.placement_speed = Gauge(
            "lmgw_placement_prefill_tokens_per_second",
            "Joint P/D placement's learned prefill speed per model (queued plus computed tokens"
            " over the prefill legs' durations), read at scrape time.",
            ("model",),
        )
        self.placement_queued = Gauge(
            "lmgw_placement_queued_tokens",
            "Prompt tokens joint P/D placement counts as queued on each prefill worker (sent,"
            " prefill not done), read at scrape time.",
            ("worker",),
        )
        self.tokenizer_parity = Gauge(
            "lmgw_tokenizer_parity",
            "1 when the gateway's template+tokenizer give the worker's prompt tokens exactly,"
            " 0 when they differ (token-level routing then falls back to byte keys).",
            ("model", "worker"),
        )
        self.segment_hits = Counter(
            "lmgw_tokenizer_segment_cache_hits_total",
            "Stretches of chat prompts (the text between two added tokens) whose token ids the"
            " gateway's tokenizer found in its segment cache instead of encoding them.",
            ("model",),
        )
        self.segment_misses = Counter(
            "lmgw_tokenizer_segment_cache_misses_total",
            "Stretches of chat prompts the gateway's tokenizer encoded (and cached).",
            ("model",),
        )
        self.segment_hit_tokens = Counter(
            "lmgw_tokenizer_segment_cache_hit_tokens_total",
            "Token ids the segment cache gave without encoding.",
            ("model",),
        )
        self.segment_chars = Gauge(
            "lmgw_tokenizer_segment_cache_chars",
            "What the segment cache holds, in characters (its budget's unit: each entry counts"
            " its own and 200 for its objects).",
            ("model",),
        )
        self.template_renders = Counter(
            "lmgw_chat_template_renders_total",
            'Chat prompts rendered, by path: "shape" (a plain conversation joined into its'
            ' shape\'s learned text, about 1 µs), "full" (jinja), "mismatch" (a sampled'
            " check found a shaped prompt that differed: shapes are then off for the model).",
            ("model", "path"),
        )
        self.word_ids = Counter(
            "lmgw_tokenizer_word_ids_total",
            'Stretches of prompts the segment cache had to encode, by path: "words" (plain'
            ' ASCII, encoded pre-token by pre-token in the gateway), "other" (left to the'
            ' tokenizers library: other characters), "mismatch" (a sampled check found'
            " different ids: the pre-token path is then off for the model).",
            ("model", "path"),
        )
        self.routing_predicted = Counter(
            "lmgw_routing_predicted_cached_tokens_total",
            "Prompt tokens the routing policy expected the chosen worker to have cached.",
            ("model",),
        )
        self.routing_reported = Counter(
            "lmgw_routing_reported_cached_tokens_total",
            "Prompt tokens the worker reported cached (usage.prompt_tokens_details), for the"
            " requests the policy made a prediction for.",
            ("model",),
        )
        self.routing_matched = Counter(
            "lmgw_routing_matched_cached_tokens_total",
            "min(predicted, reported) per request: precision = matched / predicted.",
            ("model",),
        )
        self.routing_precision = Gauge(
            "lmgw_routing_precision",
            "Share of the predicted cached tokens the workers really had (since start).",
            ("model",),
        )
        self.retries = Counter(
            "lmgw_retries_total",
            "Requests re-dispatched to another worker before any byte reached the client.",
            ("role",),
        )
        self.panic_routes = Counter(
            "lmgw_routing_panic_total",
            "Workers picked while every worker of the role was ejected (health.panic_routing):"
            " among the ejected ones whose health probe passes.",
            ("role",),
        )
        self.worker_requests = Counter(
            "lmgw_worker_requests_total",
            "Requests dispatched to each worker.",
            ("role", "worker"),
            collect=worker_requests,
        )
        self.express = Counter(
            "lmgw_express_requests_total",
            "Requests served on the express lane (plain non-streamed, merged HTTP workers);"
            " upstream.express_lane.",
        )
        # the compiled lane (lmgw.http.lane): read from its loop at scrape time
        self.lane_answers = Counter(
            "lmgw_lane_answers_total",
            "Whole worker answers the compiled lane relayed itself (a P/D request's two legs"
            " count two); server.compiled_lane.",
        )
        self.lane_streams = Counter(
            "lmgw_lane_streams_total",
            "Streamed answers the compiled lane relayed to their end itself; server.compiled_lane.",
        )
        self.lane_native = Counter(
            "lmgw_lane_native_total",
            "Native (zmq+) workers' answers the compiled lane built and wrote itself (whole"
            " and streamed, merged or P/D workers); server.compiled_lane.",
        )
        self.lane_handovers = Counter(
            "lmgw_lane_handovers_total",
            "Client connections the compiled lane handed to the trio server: a request it"
            " does not take, or one of its own to finish there (a failure, an error answer).",
        )
        self.lane_returns = Counter(
            "lmgw_lane_returns_total",
            "Client connections the trio server gave back to the compiled lane between"
            " requests: after a request the lane handed over mid-way, or for a passing reason"
            " (an error, a key's rate limit, a long prompt, a GET, a queue that emptied).",
        )
        self.lane_declined = Counter(
            "lmgw_lane_declined_total",
            "Requests the compiled lane left to the trio server, by reason: stream, not_plain"
            " (media, the tool loop, a P/D request split into pairs...), queue, error (the"
            " server answers it), tokenize, key, key_limit, priority, resumable, model_route,"
            " other_route (GETs, other paths), replaced_route, draining, unparsed.",
            ("reason",),
        )
        self.lane_connections = Gauge(
            "lmgw_lane_connections",
            "Connections the compiled lane holds, by side: client, upstream (idle or busy).",
            ("side",),
        )
        self.disconnects = Counter(
            "lmgw_client_disconnects_total",
            "Requests abandoned because the client went away.",
            ("endpoint",),
        )
        self.keepalives = Counter(
            "lmgw_sse_keepalives_total",
            "SSE keep-alive comments written to streams still waiting for their first event"
            " (limits.sse_keepalive_s), by the trio server and the compiled lane.",
        )
        self.in_flight = Gauge(
            "lmgw_worker_in_flight",
            "Requests in flight per worker.",
            ("role", "worker"),
            collect=in_flight,
        )
        self.healthy = Gauge(
            "lmgw_worker_healthy", "1 when the worker is routable.", ("role", "worker")
        )
        self._all: list[Counter | Gauge | Histogram] = [
            self.requests, self.e2e, self.ttft, self.tpot, self.stage, self.stage_ttft,
            self.stage_tpot,
            self.upstream_errors, self.retries, self.panic_routes, self.encoder_cache_hits,
            self.migrations,
            self.pd_splits, self.pd_split_pairs, self.pd_local_prefill,
            self.placements, self.placement_speed, self.placement_queued,
            self.tokenizer_parity, self.segment_hits, self.segment_misses,
            self.segment_hit_tokens, self.segment_chars, self.template_renders,
            self.word_ids,
            self.routing_predicted, self.routing_reported,
            self.routing_matched, self.routing_precision,
            self.worker_requests, self.express, self.lane_answers, self.lane_streams,
            self.lane_native, self.lane_handovers, self.lane_returns,
            self.lane_declined, self.lane_connections, self.disconnects, self.keepalives,
            self.in_flight,
            self.healthy,
        ]  # fmt: skip
        # Admission control (lmgw.admission): the gauges are read at scrape time from the
        # Admission object, which sets their ``collect``; the request path only counts.
        self.requests_in_flight = Gauge(
            "lmgw_requests_in_flight", "Client requests admitted and not yet finished."
        )
        self.admission_queue_depth = Gauge(
            "lmgw_admission_queue_depth",
            "Requests waiting for a slot under limits.max_concurrent_requests.",
        )
        self.admission_rejected = Counter(
            "lmgw_admission_rejected_total",
            "Requests turned away for capacity: queue_full, queue_timeout and evicted (429),"
            " worker_capacity (503: every worker at limits.max_in_flight_per_worker).",
            ("reason",),
        )
        for reason in ("queue_full", "queue_timeout", "evicted", "worker_capacity"):
            self.admission_rejected.inc((reason,), 0.0)  # exported as 0 before the first
        # The queue by priority class (high < 0, normal = 0, low > 0: raw priorities are
        # unbounded) and tenant (an API key's name, "-" without keys: bounded by the keys).
        # Only requests that wait touch these.
        self.admission_waiting = Gauge(
            "lmgw_admission_waiting",
            "Requests waiting for a slot now, by priority class and tenant.",
            ("priority_class", "tenant"),
        )
        self.admission_wait = Histogram(
            "lmgw_admission_wait_seconds",
            "Time waited in the admission queue by requests that got a slot, by priority class.",
            ("priority_class",),
        )
        self.admission_tenant_requests = Counter(
            "lmgw_admission_tenant_requests_total",
            "Requests that found no free slot, by tenant and how their wait ended: admitted,"
            " queue_full, queue_timeout, evicted, cancelled.",
            ("tenant", "outcome"),
        )
        self.admission_tenant_wait = Counter(
            "lmgw_admission_tenant_wait_seconds_total",
            "Seconds waited in the admission queue, summed per tenant (every outcome).",
            ("tenant",),
        )
        for metric in (self.requests_in_flight, self.admission_queue_depth,
                       self.admission_rejected, self.admission_waiting, self.admission_wait,
                       self.admission_tenant_requests, self.admission_tenant_wait):  # fmt: skip
            self.add(metric)
        # Engine KV events (lmgw.workers.kv_events): batches lost or unreadable per worker; the
        # policy then forgets that worker's blocks and rebuilds them from later events.
        self.kv_event_gaps = Counter(
            "lmgw_kv_event_gaps_total",
            "Gaps in a worker's KV event stream (dropped, unreadable, or a restarted engine):"
            " its cache view was reset.",
            ("worker",),
        )
        self.add(self.kv_event_gaps)
        self._observability()

    def _observability(self) -> None:
        """Issue 11's metrics. The ones read from state the gateway keeps anyway (pool
        counters, worker states, policies' own tallies) are ``collect``-ed at scrape time; the
        Gateway sets those callbacks. Nothing here adds work to a request unless noted."""
        self.queue_time = Histogram(
            "lmgw_queue_time_seconds",
            "Time a generation request waited for an admission slot (only observed while"
            " limits.max_concurrent_requests is on; 0 for requests admitted at once).",
        )
        self.encoder_cache_lookups = Counter(
            "lmgw_encoder_cache_lookups_total",
            "Media items looked up in the gateway's encoder cache (hits: see"
            " lmgw_encoder_cache_hits_total).",
            ("model",),
        )
        self.cache_hits = Counter(
            "lmgw_cache_hits_total",
            "Cache hits by tier: encoder (media items whose encode leg the gateway skipped),"
            " prefix (prompt tokens the engines found in their prefix caches, from their"
            " /metrics).",
            ("tier",),
        )
        self.cache_queries = Counter(
            "lmgw_cache_queries_total",
            "Cache lookups by tier, in the unit of lmgw_cache_hits_total (items or tokens).",
            ("tier",),
        )
        self.routing_decisions = Counter(
            "lmgw_routing_decisions_total",
            "Workers chosen by each role's policy, by the policy's reason (its fallbacks"
            " included: e.g. cache_aware no_match, consistent_hash spill); reason=retry counts"
            " choices that replaced a failed worker.",
            ("role", "policy", "reason"),
        )
        self.pool_events = Counter(
            "lmgw_upstream_pool_events_total",
            "Upstream connection pool events: connect (new connection), reuse (keep-alive hit),"
            " stale (an idle connection found closed by the worker), close.",
            ("event",),
        )
        self.pool_connections = Gauge(
            "lmgw_upstream_pool_connections",
            "Upstream connections per worker: idle (pooled) and waiting (a request sent, its"
            " answer's head not yet arrived).",
            ("role", "worker", "state"),
        )
        self.worker_transitions = Counter(
            "lmgw_worker_state_transitions_total",
            "Worker state changes (from ``new`` when added, to ``gone`` when removed).",
            ("role", "worker", "from", "to"),
        )
        self.worker_kv_usage = Gauge(
            "lmgw_worker_kv_cache_usage",
            "A worker's KV cache usage (0..1) from its /metrics, at the last scrape.",
            ("role", "worker"),
        )
        self.worker_engine_requests = Gauge(
            "lmgw_worker_engine_requests",
            "Requests a worker's engine reports running or waiting, at the last scrape.",
            ("role", "worker", "state"),
        )
        self.handoff_bytes = Counter(
            "lmgw_handoff_bytes_total",
            "Hand-off bytes that native workers sent through the gateway (kind: kv, a"
            " prefill's KV on its way to the decode worker; embeddings, an encoder's outputs on"
            " their way to the prompt stage), by how they came (via: frames, or shm: a"
            " shared-memory handle on one host). Hand-offs through a side channel or shared"
            " storage are not counted.",
            ("kind", "via"),
        )
        self.heap_trims = Counter(
            "lmgw_heap_trims_total",
            "Times the gateway gave freed heap back to the OS: after a burst of large request"
            " bodies or answers (limits.trim_heap_after_bytes), or once its resident memory"
            " grew (limits.trim_heap_on_growth_bytes).",
        )
        self.heap_trimmed_bytes = Counter(
            "lmgw_heap_trimmed_bytes_total",
            "Resident memory those trims returned to the OS (the drop in RSS across each).",
        )
        for metric in (self.queue_time, self.encoder_cache_lookups, self.cache_hits,
                       self.cache_queries, self.routing_decisions, self.pool_events,
                       self.pool_connections, self.worker_transitions, self.worker_kv_usage,
                       self.worker_engine_requests, self.handoff_bytes, self.heap_trims,
                       self.heap_trimmed_bytes):  # fmt: skip
            self.add(metric)

    def heap_trimmed(self, returned_bytes: int) -> None:
        """One heap trim (lmgw.memtrim) gave ``returned_bytes`` back to the OS."""
        self.heap_trims.inc()
        self.heap_trimmed_bytes.inc((), float(returned_bytes))

    def metric(self, name: str) -> Counter | Gauge | Histogram | None:
        """The exported metric called ``name`` (None if there is none)."""
        return next((m for m in self._all if m.name == name), None)

    def add(self, metric: Counter | Gauge | Histogram) -> None:
        self._all.append(metric)

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self._all:
            lines.extend(m.render())
        lines.append("")
        return "\n".join(lines).encode()
