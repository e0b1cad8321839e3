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

``--kv-events`` starts every worker with a prefix cache (all but encoders) with a KV event
publisher (``--kv-events tcp://127.0.0.1:0``, vLLM's wire format) and gives each its endpoint as
``workers[].kv_events``: a ``cache_aware`` policy then routes from what the engines report
they hold (exact mode, docs/routing.md).
"""

from __future__ import annotations

import argparse
import logging

import trio

from .cli import run_until_signal
from .config import (
    NATIVE_DIALECT,
    AuthConfig,
    GatewayConfig,
    LimitsConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from .fleetspec import FleetSpec
from .gateway import Gateway
from .pipeline.runner import dialect_for
from .simulators.fleet import Fleet, FleetError, run_fleet

log = logging.getLogger("lmgw.simulate")

KV_EVENTS_BIND = "tcp://127.0.0.1:0"
"""Where ``--kv-events`` workers bind their publishers (a free port each, on READY)."""


def fleet_config(fleet: Fleet, spec: FleetSpec, args: argparse.Namespace) -> GatewayConfig:
    """Gateway configuration for a started fleet: one model (tokenized with the workers' model
    folder), every worker, the CLI's choices."""
    server = {"host": args.host, "port": args.port}
    if getattr(args, "server", None):
        server["server"] = args.server
    routing = {"policy": args.policy} if getattr(args, "policy", None) else {}
    native = getattr(fleet, "transport", "http") == "zmq"
    dialect = NATIVE_DIALECT if native else getattr(args, "dialect", None) or "openai"
    workers = []
    for m in fleet.members:
        if not m.url:
            continue
        # a simulated prefill worker serves its SGLang bootstrap rendezvous on its HTTP port
        port = int(m.url.rsplit(":", 1)[1]) if m.role == "p" and not native else None
        workers.append(
            WorkerConfig(
                url=m.url,
                role=m.role,
                models=[args.model],
                bootstrap_port=port,
                kv_address=m.kv_address,  # set for vllm-p2pnccl fleets
                kv_events=m.kv_events,  # set for --kv-events fleets
            )
        )
    model: dict[str, object] = {"name": args.model, "flow": spec.flow, "dialect": dialect}
    # the workers' own model folder, so the gateway tokenizes as they do
    if fleet.model_dir is not None:
        model["tokenizer"] = str(fleet.model_dir)
    return GatewayConfig(
        server=ServerConfig(**server),
        limits=LimitsConfig(),
        # a simulation serves its API without keys on purpose, wherever it listens (logged)
        auth=AuthConfig(open=True),
        routing=RoutingConfig(**routing),
        models=[ModelConfig(**model)],  # type: ignore[arg-type]
        workers=workers,
    )


async def run_simulation(spec: FleetSpec, args: argparse.Namespace) -> int:
    counts = {role: n for role, n in spec.counts().items() if n}
    transport = getattr(args, "transport", None) or "http"
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
    async with trio.open_nursery() as nursery:
        try:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    counts,
                    model=args.model,
                    speed=args.speed,
                    role_args=roles_args,
                    dialect=None if dialect is None else dialect.name,
                    transport=transport,
                    task_status=task_status,
                )
            )
        except FleetError as exc:
            log.error("simulated fleet failed to start: %s", exc)
            return 1
        cfg = fleet_config(fleet, spec, args)
        try:
            gateway = Gateway(cfg)
        except ValueError as exc:
            log.error("%s", exc)
            nursery.cancel_scope.cancel()  # stops the fleet
            return 2
        port = await nursery.start(gateway.run)
        for m in fleet.members:
            kv = f"  kv_address={m.kv_address}" if m.kv_address else ""
            kv += f"  kv_events={m.kv_events}" if getattr(m, "kv_events", None) else ""
            print(f"  worker {m.role:<3} {m.url}{kv}", flush=True)
        if fleet.lmcache_dir:
            print(f"  lmcache dir {fleet.lmcache_dir}", flush=True)
        print(
            f"lmgw gateway for {spec} ({args.model}) on http://{args.host}:{port}"
            "  (Ctrl-C to stop)",
            flush=True,
        )
        await run_until_signal(gateway, nursery)
    return 0
