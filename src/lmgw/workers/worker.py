"""A worker as the gateway sees it: identity, role, models, state and live load.

Only the ``workers`` package writes these fields (state and load through
:class:`~lmgw.workers.registry.Registry`); routing and the pipeline read them.
"""

from __future__ import annotations

import enum

from ..config import ROLE_NAMES
from ..transport.pool import Origin


class WorkerState(enum.Enum):
    STARTING = "starting"  # registered, not yet probed
    HEALTHY = "healthy"  # routable
    DRAINING = "draining"  # finishes what it has, gets nothing new
    EJECTED = "ejected"  # failing probes or requests; probed until it recovers
    GONE = "gone"  # removed from the fleet


class EngineLoad:
    """A worker's own view of its load, from its ``/metrics`` (zero until scraped)."""

    __slots__ = (
        "_waiting", "_worker", "engines", "kv_usage", "lora_max", "lora_running", "prefix_hits",
        "prefix_queries", "running", "tokens",
    )  # fmt: skip

    def __init__(self, worker: Worker | None = None) -> None:
        self._worker = worker  # told when ``waiting`` changes (its load boards)
        self.running = 0.0  #: vllm:num_requests_running
        self._waiting = 0.0
        self.kv_usage = 0.0  #: vllm:kv_cache_usage_perc (0..1)
        self.prefix_hits = 0.0  #: vllm:prefix_cache_hits_total
        self.prefix_queries = 0.0  #: vllm:prefix_cache_queries_total
        #: prompt plus generated tokens the engine processed (vllm:prompt_tokens_total +
        #: vllm:generation_tokens_total); None: its /metrics has neither
        self.tokens: float | None = None
        #: vllm:lora_requests_info: adapters with running requests, and max_lora (0: unknown)
        self.lora_running: frozenset[str] = frozenset()
        self.lora_max = 0
        #: engines its /metrics names (vLLM's ``engine`` label: data-parallel ranks); 0: unknown
        self.engines = 0

    @property
    def waiting(self) -> float:
        """vllm:num_requests_waiting."""
        return self._waiting

    @waiting.setter
    def waiting(self, value: float) -> None:
        self._waiting = value
        worker = self._worker
        if worker is not None and worker.boards:
            worker.post_load()

    def describe(self) -> dict:
        out = {k: getattr(self, k) for k in self.__slots__ if not k.startswith("_")}
        out["waiting"] = self._waiting
        out["lora_running"] = sorted(self.lora_running)
        return out


class Worker:
    """One inference worker endpoint serving one role."""

    __slots__ = (
        "_in_flight",
        "adapters",
        "boards",
        "bootstrap_port",
        "consecutive_failures",
        "dp_rank",
        "ejected_at",
        "ejected_until",
        "ejections",
        "engine",
        "id",
        "kv_address",
        "last_error",
        "models",
        "origin",
        "probe_ok",
        "role",
        "state",
        "static_models",
        "stuck",
        "total_requests",
        "url",
        "zone",
    )

    def __init__(
        self,
        id: str,
        url: str,
        role: str,
        models: frozenset[str] | None = None,
        bootstrap_port: int | None = None,
        kv_address: str | None = None,
        dp_rank: int | None = None,
    ) -> None:
        self.id = id
        self.url = url.rstrip("/")
        #: one data-parallel rank of a vLLM server (``workers[].data_parallel_size``): every
        #: request to it carries ``X-data-parallel-rank``; None: the whole server
        self.dp_rank = dp_rank
        self.role = role
        #: SGLang prefill: the bootstrap server's port (dialects name it on the wire)
        self.bootstrap_port = bootstrap_port
        #: vLLM P2P NCCL: the connector's "ip:kv_port" (written into the pairing request id)
        self.kv_address = kv_address
        #: models named in config (fixed) or None: then ``models`` is discovered from /v1/models
        self.static_models = models
        #: models this worker serves; None = not known yet (treated as "any")
        self.models: frozenset[str] | None = models
        #: LoRA adapters the gateway loaded here (workers/lora.py): served whatever ``models``
        #: says (a worker whose models config fixed serves them too)
        self.adapters: frozenset[str] = frozenset()
        self.origin = Origin.from_url(self.url, dp_rank)
        self.state = WorkerState.STARTING
        #: the load lists of the registry's candidate tuples this worker is in, with its index
        #: there (:class:`~lmgw.workers.registry.Candidates`): kept equal to its load
        self.boards: list[tuple[list[float], int]] = []
        self._in_flight = 0
        self.total_requests = 0
        self.consecutive_failures = 0
        self.last_error = ""
        #: passive ejection: how many in a row, when the last began, and until when it holds
        self.ejections = 0
        self.ejected_at = 0.0
        self.ejected_until = 0.0
        #: whether its last health probe passed (HTTP workers; panic routing uses it)
        self.probe_ok = False
        #: ejected as stuck (health.stuck_timeout_s): its passing probe says nothing, so panic
        #: routing skips it until it is healthy again
        self.stuck = False
        #: what the worker's /metrics said at the last scrape (vLLM names, short keys)
        self.engine = EngineLoad(self)
        #: its KV-transfer domain (``workers[].zone``): joint P/D placement weighs it
        self.zone: str | None = None

    @property
    def in_flight(self) -> int:
        """Requests in flight through this gateway (:meth:`Registry.acquire` / ``release``)."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        if self.boards:
            self.post_load()

    @property
    def load(self) -> float:
        """Requests in flight through this gateway plus those the engine reports waiting: the
        one load signal of every load-aware policy."""
        return self._in_flight + self.engine._waiting

    def post_load(self) -> None:
        """Write the current load into every board that lists this worker."""
        value = self.load
        for loads, i in self.boards:
            loads[i] = value

    @property
    def routable(self) -> bool:
        return self.state is WorkerState.HEALTHY

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models or model in self.adapters

    @property
    def role_name(self) -> str:
        return ROLE_NAMES[self.role]

    def describe(self) -> dict:
        return {
            "id": self.id,
            "url": self.url,
            "role": self.role_name,
            "zone": self.zone,
            "data_parallel_rank": self.dp_rank,
            "state": self.state.value,
            "models": sorted(self.models) if self.models is not None else None,
            "lora_adapters": sorted(self.adapters),
            "in_flight": self.in_flight,
            "total_requests": self.total_requests,
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "engine": self.engine.describe(),
            "last_error": self.last_error or None,
        }

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.role} {self.state.value} in_flight={self.in_flight}>"
