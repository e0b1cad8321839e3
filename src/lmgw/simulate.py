"""``lmgw simulate``: a simulated fleet (worker processes) with the gateway in front of it.

Workers run as real processes (``python -m lmgw.simulators``), each on a free port it reports;
the gateway runs in this process. The dialect shapes the fleet: ``vllm-p2pnccl`` gives every
p/d worker a KV port (its ``kv_address`` goes into the gateway's config), ``vllm-lmcache`` starts
them with the LMCache connector over a shared temporary directory. Ctrl-C or SIGTERM drains the
gateway, then terminates every worker (SIGTERM, then SIGKILL after a grace period): nothing is
left behind (the shared directories are removed too).

``--transport zmq`` runs the same simulated engine behind the native protocol instead
(``python -m lmgw.worker``): the gateway reaches the workers at ``zmq+tcp://`` URLs, the model's
dialect is ``lmgw-native``, and the gateway tokenizes with the workers' model folder (native
workers take token ids). Media then go to the encoders as tensor frames.

``--gateways N --redis [URL]`` runs N gateway replicas (ports ``--port``, ``--port``+1, ...; all
free ones with ``--port 0``) in front of the one fleet, sharing state through Redis (``URL``, or
a ``redis-server`` started here and stopped at the end): the fleet is registered there and every
replica discovers it (``discovery.redis_url``), the replicas share routing hints and health
verdicts (``[replicas]``), and their cache pools have a Redis tier (``[cache]``: memory, redis),
so an image one replica had encoded skips E on the others. ``--handoff pool`` makes the workers
hand encoder outputs and KV blocks through the cache pool (Redis with ``--redis``, else this
host's shared memory) instead of their side channel; with ``--transport zmq``, ``--handoff
gateway`` sends them through the gateway as tensor frames (no shared directory).

``--kv-events`` starts every worker with a prefix cache (all but encoders) with a KV event
publisher (``--kv-events tcp://127.0.0.1:0``, vLLM's wire format) and gives each its endpoint as
``workers[].kv_events``: a ``cache_aware`` policy then routes from what the engines report
they hold (exact mode, docs/routing.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import msgspec
import trio

from .cache import CacheConfig
from .cli import run_until_signal
from .config import (
    NATIVE_DIALECT,
    AdminConfig,
    AuthConfig,
    DiscoveryConfig,
    GatewayConfig,
    HedgingConfig,
    LimitsConfig,
    ModelConfig,
    ReplicasConfig,
    RoutingConfig,
    ServerConfig,
    StreamsConfig,
    WorkerConfig,
)
from .fdlimit import ensure_open_files
from .fleetspec import FleetSpec
from .gateway import Gateway
from .gctune import tune_gc
from .pipeline.runner import dialect_for
from .planner.standby import StandbyScaler
from .simulators.engine import DEFAULT_TOOL_FORMAT
from .simulators.fleet import Fleet, FleetError, run_fleet

log = logging.getLogger("lmgw.simulate")

KV_EVENTS_BIND = "tcp://127.0.0.1:0"
"""Where ``--kv-events`` workers bind their publishers (a free port each, on READY)."""

#: (flow, dialect) pairs whose decode workers may prefill a request themselves
_LOCAL_PREFILL = {("p/d", "vllm-nixl"), ("p/d", "vllm-lmcache"), ("e+p+d", "vllm-epd")}


def fleet_config(fleet: Fleet, spec: FleetSpec, args: argparse.Namespace) -> GatewayConfig:
    """Gateway configuration for a started fleet: one model (tokenized with the workers' model
    folder), every worker, the CLI's choices."""
    server = {"host": args.host, "port": args.port}
    if getattr(args, "server", None):
        server["server"] = args.server
    routing: dict[str, Any] = {"policy": args.policy} if getattr(args, "policy", None) else {}
    if getattr(args, "shadow_policies", None):
        routing["shadow_policies"] = args.shadow_policies
    if getattr(args, "enable_lora", False):  # adapters where they are active (--max-loras)
        routing["lora_affinity"] = True
    if getattr(args, "zones", 0):  # the workers' modelled KV size, for joint placement
        routing["kv_bytes_per_token"] = args.kv_bytes_per_token
    hedging = HedgingConfig(enabled=bool(getattr(args, "hedge", False)))
    native = getattr(fleet, "transport", "http") == "zmq"
    dialect = NATIVE_DIALECT if native else getattr(args, "dialect", None) or "openai"
    dp = getattr(args, "data_parallel_size", 1) or 1  # ranks of each merged worker
    workers = []
    for m in fleet.members:
        if not m.url:
            continue
        workers.append(
            WorkerConfig(
                url=m.url,
                role=m.role,
                models=[args.model],
                # (SGLang's bootstrap port: the gateway asks a prefill worker for it)
                kv_address=m.kv_address,  # set for vllm-p2pnccl fleets
                kv_events=m.kv_events,  # set for --kv-events fleets
                zone=m.zone,  # set for --zones fleets
                data_parallel_size=dp if m.role != "e" else 1,
            )
        )
    # the simulated workers write tool calls as text in this format (a vLLM without
    # --enable-auto-tool-choice): the gateway parses them, so clients get tool_calls
    model: dict[str, object] = {
        "name": args.model, "flow": spec.flow, "dialect": dialect,
        "tool_parser": DEFAULT_TOOL_FORMAT,
    }  # fmt: skip
    # the workers' own model folder, so the gateway tokenizes as they do
    if fleet.model_dir is not None:
        model["tokenizer"] = str(fleet.model_dir)
    for key in ("local_prefill_tokens", "local_prefill_busy"):  # prefilled on the decode worker
        if getattr(args, key, 0):
            model[key] = getattr(args, key)
    return GatewayConfig(
        server=ServerConfig(**server),
        limits=LimitsConfig(),
        # a simulation serves its API without keys on purpose, wherever it listens (logged);
        # its admin API (workers, LoRA adapters) takes $LMGW_ADMIN_TOKEN, else local clients
        auth=AuthConfig(open=True),
        admin=AdminConfig(
            token=os.environ.get("LMGW_ADMIN_TOKEN") or None,
            allow_unauthenticated_localhost=not os.environ.get("LMGW_ADMIN_TOKEN"),
        ),
        routing=RoutingConfig(**routing),
        hedging=hedging,
        streams=StreamsConfig(coalesce=bool(getattr(args, "coalesce", False))),
        models=[ModelConfig(**model)],  # type: ignore[arg-type]
        workers=workers,
    )


def split_standby(
    config: GatewayConfig, counts: Mapping[str, int]
) -> tuple[GatewayConfig, list[WorkerConfig]]:
    """``--autoscale``: the first ``counts[role]`` workers of each role stay in ``config``, the
    others are returned as the standby list the planner's recommendations draw on."""
    kept: list[WorkerConfig] = []
    standby: list[WorkerConfig] = []
    seen: dict[str, int] = {}
    for wc in config.workers:
        seen[wc.role] = seen.get(wc.role, 0) + 1
        (kept if seen[wc.role] <= counts.get(wc.role, 0) else standby).append(wc)
    return msgspec.structs.replace(config, workers=kept), standby


def replica_configs(
    base: GatewayConfig, n: int, redis_url: str | None, shm_name: str | None, port: int
) -> list[GatewayConfig]:
    """The gateways of a simulation: ``base`` alone, or ``n`` replicas that discover the fleet
    in Redis and share hints, verdicts and a cache pool there."""
    tiers = ["memory", "redis"] if redis_url else ["memory", "shm"] if shm_name else []
    cache = CacheConfig(tiers=tiers, redis_url=redis_url, shm_name=shm_name or "lmgw-cache")
    out = []
    for i in range(n):
        server = msgspec_replace(base.server, port=port + i if port else 0)
        if redis_url is None:
            out.append(msgspec_replace(base, server=server, cache=cache))
            continue
        out.append(
            msgspec_replace(
                base,
                server=server,
                workers=[],  # discovered in Redis, where the simulation registers them
                discovery=DiscoveryConfig(
                    redis_url=redis_url, redis_prefix=SIM_PREFIX, redis_interval_s=1.0
                ),
                replicas=ReplicasConfig(redis_url=redis_url, prefix=SIM_PREFIX, id=f"gw{i}"),
                cache=msgspec_replace(cache, redis_prefix=SIM_PREFIX),
            )
        )
    return out


def msgspec_replace(obj: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(obj, **changes)


SIM_PREFIX = "lmgw-sim"
"""Key prefix of a simulation's fleet, events and cache entries in Redis."""


async def local_redis(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """A ``redis-server`` on a free 127.0.0.1 port (no persistence) until cancelled; reports its
    URL once it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FleetError("--redis without a URL needs redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="lmgw-sim-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", workdir]  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    args,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            with trio.fail_after(10):
                while True:
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                        await stream.aclose()
                        break
                    except OSError:
                        if proc.poll() is not None:
                            raise FleetError("redis-server exited at start") from None
                        await trio.sleep(0.02)
            task_status.started(f"redis://127.0.0.1:{port}/0")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Gateways:
    """Several gateways drained together (run_until_signal's one-gateway interface)."""

    def __init__(self, gateways: Sequence[Gateway]) -> None:
        self.gateways = gateways

    async def shutdown(self) -> None:
        async with trio.open_nursery() as nursery:
            for gw in self.gateways:
                nursery.start_soon(gw.shutdown)


async def run_simulation(spec: FleetSpec, args: argparse.Namespace) -> int:
    ensure_open_files()  # the gateways' descriptors (the worker processes inherit it)
    counts = {role: n for role, n in spec.counts().items() if n}
    transport = getattr(args, "transport", None) or "http"
    n_gateways = getattr(args, "gateways", 1) or 1
    autoscale = getattr(args, "autoscale", 0) or 0
    if autoscale:
        if not max(counts.values()) <= autoscale <= 64:
            log.error("--autoscale N: at least every role's count of the spec, at most 64")
            return 2
        ranks = getattr(args, "data_parallel_size", 1) or 1
        if transport == "zmq" or n_gateways > 1 or ranks > 1:
            log.error("--autoscale is for one gateway in front of HTTP workers without ranks")
            return 2
    redis_arg = getattr(args, "redis", None)
    handoff = getattr(args, "handoff", None) or "direct"
    if n_gateways < 1:
        log.error("--gateways must be >= 1")
        return 2
    if n_gateways > 1 and redis_arg is None:
        log.error("--gateways %d needs --redis (the replicas share state there)", n_gateways)
        return 2
    if (redis_arg is not None or handoff == "pool") and transport == "zmq":
        log.error("--redis and --handoff pool are for HTTP workers")
        return 2
    if handoff == "gateway" and transport != "zmq":
        log.error("--handoff gateway is for native workers (--transport zmq): HTTP dialects"
                  " hand off through the engines' own connectors")  # fmt: skip
        return 2
    dialect = None
    if transport == "zmq":
        if getattr(args, "dialect", None):
            log.error("--dialect is for HTTP workers; --transport zmq speaks %s", NATIVE_DIALECT)
            return 2
    else:
        try:  # before any process starts: a dialect that cannot run the spec's flow
            dialect = dialect_for(
                spec.flow, getattr(args, "dialect", None) or "openai", "--dialect"
            )
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    roles_args: dict[str, list[str]] = {}
    if getattr(args, "kv_events", False):
        if transport == "zmq":
            log.error("--kv-events is for HTTP workers (the simulated vLLM API)")
            return 2
        # every role with a prefix cache publishes (encoders have none)
        roles_args = {r: ["--kv-events", KV_EVENTS_BIND] for r in counts if r != "e"}
    if getattr(args, "enable_lora", False):
        if transport == "zmq":
            log.error("--enable-lora is for HTTP workers (vLLM's runtime adapter routes)")
            return 2
        slots = getattr(args, "max_loras", None)
        for role in counts:
            if role != "e":  # generating workers take adapters (load with the admin token)
                roles_args.setdefault(role, []).append("--enable-lora")
                if slots:  # vLLM's --max-loras: the contention LoRA affinity routes around
                    roles_args[role] += ["--max-loras", str(slots)]
    head = getattr(args, "stream_head", "arrival")
    if head != "arrival":
        if transport == "zmq":
            log.error("--stream-head is for HTTP workers (the simulated vLLM API)")
            return 2
        for role in counts:
            if role != "e":  # the generating workers stream
                roles_args.setdefault(role, []).extend(["--stream-head", head])
    if getattr(args, "local_prefill_tokens", 0) or getattr(args, "local_prefill_busy", 0):
        name = getattr(args, "dialect", None) or "openai"
        if (spec.flow, name) not in _LOCAL_PREFILL:
            log.error(
                "--local-prefill-tokens and --local-prefill-busy are for p/d fleets with"
                " --dialect vllm-nixl or vllm-lmcache, and e+p+d fleets with vllm-epd"
            )
            return 2
        roles_args.setdefault("d", []).append("--local-prefill")  # whole engines, as vLLM's
    dp = getattr(args, "data_parallel_size", 1) or 1
    if dp != 1:
        name = getattr(args, "dialect", None) or "openai"
        if transport == "zmq" or name == "vllm-p2pnccl" or handoff != "direct" or not 1 <= dp <= 64:
            log.error(
                "--data-parallel-size is 1..64, for HTTP workers that hand KV off directly"
                " (not vllm-p2pnccl, not --handoff pool)"
            )
            return 2
        for role in counts:
            if role != "e":  # encoders have no ranks
                roles_args.setdefault(role, []).extend(["--data-parallel-size", str(dp)])
    zones = getattr(args, "zones", 0) or 0
    if zones and transport == "http":
        # the p and d workers model their KV transfers between zones at this size (native
        # workers hand KV off in the protocol: their zones steer placement, without a model)
        for role in ("p", "d"):
            if role in counts:
                roles_args.setdefault(role, []).extend(
                    ["--kv-bytes-per-token", str(args.kv_bytes_per_token)]
                )
    async with trio.open_nursery() as nursery:
        redis_url: str | None = None
        if redis_arg is not None:
            try:
                redis_url = await nursery.start(local_redis) if redis_arg == "local" else redis_arg
            except FleetError as exc:
                log.error("%s", exc)
                return 2
        shm_name = f"lmgw-sim-{os.getpid()}" if handoff == "pool" and not redis_url else None
        extra: list[str] = []
        if handoff == "gateway":
            extra = ["--handoff", "gateway"]
        if handoff == "pool":
            extra = ["--handoff", "pool"]
            if redis_url:
                extra += ["--pool-tiers", "redis", "--pool-redis-url", redis_url]
            else:
                extra += ["--pool-tiers", "shm", "--pool-shm-name", shm_name or ""]
        try:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {role: max(n, autoscale) for role, n in counts.items()},
                    model=args.model,
                    speed=args.speed,
                    extra_args=extra,
                    role_args=roles_args,
                    dialect=None if dialect is None else dialect.name,
                    transport=transport,
                    zones=getattr(args, "zones", 0),
                    task_status=task_status,
                )
            )
        except FleetError as exc:
            log.error("simulated fleet failed to start: %s", exc)
            nursery.cancel_scope.cancel()
            return 1
        base = fleet_config(fleet, spec, args)
        base, standby = split_standby(base, counts)
        if redis_url is not None:  # the fleet lives in Redis: every replica discovers it there
            from .workers.discovery.redis import register

            for wc in base.workers:
                await nursery.start(partial(register, redis_url, wc, prefix=SIM_PREFIX, ttl_s=10.0))
        configs = replica_configs(base, n_gateways, redis_url, shm_name, args.port)
        try:
            gateways = [Gateway(cfg) for cfg in configs]
        except ValueError as exc:
            log.error("%s", exc)
            nursery.cancel_scope.cancel()  # stops the fleet
            return 2
        ports = [await nursery.start(gw.run) for gw in gateways]
        tune_gc()  # as lmgw serve does, once the gateways have started
        spare = {wc.url for wc in standby}
        for m in fleet.members:
            kv = f"  kv_address={m.kv_address}" if m.kv_address else ""
            kv += f"  kv_events={m.kv_events}" if getattr(m, "kv_events", None) else ""
            kv += "  (standby: --autoscale)" if m.url in spare else ""
            print(f"  worker {m.role:<3} {m.url}{kv}", flush=True)
        if standby:  # the closed loop: the planner's recommendations move workers in and out
            await nursery.start(StandbyScaler(gateways[0], standby).run)
        if fleet.lmcache_dir:
            print(f"  lmcache dir {fleet.lmcache_dir}", flush=True)
        if redis_url:
            print(f"  redis {redis_url}  (prefix {SIM_PREFIX})", flush=True)
        for port in ports:
            print(
                f"lmgw gateway for {spec} ({args.model}) on http://{args.host}:{port}"
                "  (Ctrl-C to stop)",
                flush=True,
            )
        await run_until_signal(_Gateways(gateways), nursery)
    if shm_name:
        shutil.rmtree(os.path.join("/dev/shm", shm_name), ignore_errors=True)
    return 0
