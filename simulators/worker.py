"""Run one simulated worker as a process: ``python -m lmgw.simulators --role pd --port 0 ...``.

Roles: ``pd`` (merged), ``e`` (encoder; needs ``--ec-dir``), ``p`` (prefill), ``d`` (decode).
P/D hand-offs: vLLM NIXL and SGLang bootstrap need no flag; vLLM P2P NCCL needs ``--kv-port``
on p and d; vLLM LMCache needs ``--kv-connector lmcache --lmcache-dir DIR`` on p and d.
``--model-dir`` is the Hugging Face folder the worker tokenizes with (default: the sim-model,
built once in ``~/.cache/lmgw``); a folder that cannot be loaded is a usage error (exit 2).
``--tool-format`` is how the model writes tool calls (docs/tools.md). ``--enable-lora`` mounts
vLLM's runtime LoRA adapter routes; ``--lora-modules NAME=PATH ...`` loads adapters at start.

``--zone NAME --kv-bytes-per-token N`` (with ``--kv-gbps-same-zone`` / ``--kv-gbps-cross-zone``)
model where KV moves: a decode worker sleeps each hand-off's KV bytes over the bandwidth between
its zone and its prefill worker's before its first token.

``--timing c=0.002,d=0.004`` sets the timing model's seconds (prefill ``a + b`` x tokens,
decode step ``c + d`` x running requests, ``e`` per encoded item; ``--speed`` divides them).
``--serial-prefill`` computes prefills one at a time (a busy worker queues); ``--kv-events
tcp://127.0.0.1:0`` publishes the prefix cache's changes as vLLM's KV events (ZMQ PUB).

The process prints exactly one line, ``READY http://<host>:<port>`` (followed by
`` kv_address=<host>:<kv_port>`` with ``--kv-port`` and `` kv_events=tcp://<host>:<port>`` with
``--kv-events``), to stdout once it is bound (the fleet
launcher waits for it; port 0 means "pick a free one"), logs only to stderr, and exits with
status 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from lmgw.tools import TOOL_PARSERS

from .app import HANDOFFS, KV_CONNECTORS, ROLES, SimWorker, WorkerOptions, unsupported_role_message
from .disagg import LMCACHE_CHUNK_TOKENS
from .engine import DEFAULT_TOOL_FORMAT, TIMING_KEYS, load_tokenizer
from .faults import Faults
from .lora import LoraAdapters, parse_lora_module


def parse_timing(text: str) -> tuple[tuple[str, float], ...]:
    """``--timing a=0.002,d=0.004``: the timing model's coefficients to set (see
    :class:`~lmgw.simulators.engine.TimingModel`)."""
    out = []
    for item in text.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if key not in TIMING_KEYS or not eq or not 0.0 <= seconds < 3600.0:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected K=SECONDS (0 <= SECONDS < 3600) with K one of "
                + ", ".join(TIMING_KEYS)
            )
        out.append((key, seconds))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmgw.simulators",
        description="A simulated vLLM worker (OpenAI-compatible HTTP API, timing model, faults).",
    )
    p.add_argument(
        "--role",
        default="pd",
        help="worker role: pd (merged), e (encode), p (prefill) or d (decode)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (reported on READY)")
    p.add_argument("--model", default="sim-model", help="model name (also the served name)")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names the API accepts for the model (default: --model)",
    )
    p.add_argument(
        "--speed", type=float, default=1.0, help="divide every delay by this; 'inf': no delays"
    )
    p.add_argument(
        "--timing",
        type=parse_timing,
        default=(),
        metavar="K=S,...",
        help="the timing model's seconds (before --speed): prefill a + b x uncached tokens,"
        " each decode step c + d x running requests, e per encoded item; e.g. c=0.002,d=0.004"
        " (defaults: a=0.002 b=0.0001 c=0.008 d=0.0001 e=0.01, a 7-8B model on one GPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="output and fault RNG seed")
    p.add_argument(
        "--fault-seed", type=int, default=None, help="the fault RNG's own seed (default: --seed)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="concurrent requests")
    p.add_argument("--kv-blocks", type=int, default=8192, help="prefix cache capacity (blocks)")
    p.add_argument("--block-size", type=int, default=16, help="prefix cache block (tokens)")
    p.add_argument(
        "--serial-prefill",
        action="store_true",
        help="prefills compute one at a time, first come first served (a busy worker queues, "
        "as on one GPU); default: every request prefills in parallel",
    )
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="serve N data-parallel ranks behind this one API, as `vllm serve "
        "--data-parallel-size N`: each rank its own engine and prefix cache, a request pinned "
        "with X-data-parallel-rank or placed on the rank with the fewest in flight (roles pd, "
        "p, d; default 1)",
    )
    p.add_argument(
        "--kv-events",
        default=None,
        metavar="ENDPOINT",
        help="publish the prefix cache's changes as vLLM KV events (ZMQ PUB) bound here, e.g. "
        "tcp://127.0.0.1:0 (a free port, reported on READY as kv_events=...)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model folder's config.json)",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="Hugging Face model folder to tokenize with (tokenizer.json, chat template), as "
        "vLLM's model path; default: the sim-model built in ~/.cache/lmgw (XDG_CACHE_HOME)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter "
        "(as with VLLM_ALLOW_RUNTIME_LORA_UPDATING), adapters accepted as the model",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters loaded at start (implies --enable-lora); /sim/reset keeps them",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="adapters active in a batch at once, as vLLM's; others wait (default: unlimited)",
    )
    p.add_argument(
        "--lora-load-s",
        type=float,
        default=0.02,
        help="seconds to activate an adapter in a slot at speed 1 (with --max-loras)",
    )
    dis = p.add_argument_group("disaggregation (roles e, p, d)")
    dis.add_argument(
        "--ec-dir",
        default=None,
        help="shared encoder-cache directory: e writes embeddings, p/pd require them",
    )
    dis.add_argument(
        "--engine-id", default=None, help="KV engine id reported by a prefill worker (uuid4)"
    )
    dis.add_argument(
        "--stream-head",
        choices=("arrival", "first-token"),
        default="arrival",
        help="when a stream's head goes out: with its first event, or at arrival (vLLM's way)",
    )
    dis.add_argument(
        "--kv-ttl", type=float, default=480.0, help="seconds a prefill worker keeps unfetched KV"
    )
    dis.add_argument(
        "--bootstrap-timeout",
        type=float,
        default=30.0,
        help="seconds a decode worker waits for KV not yet published (SGLang room, P2P NCCL)",
    )
    dis.add_argument(
        "--kv-port",
        type=int,
        default=None,
        help="vLLM P2P NCCL: serve the KV side channel on this port too (0: a free one); "
        "HOST:KV_PORT is the address pair request ids name (reported on READY)",
    )
    dis.add_argument(
        "--kv-connector",
        choices=KV_CONNECTORS,
        default="auto",
        help="auto: NIXL, SGLang or P2P NCCL as each request asks; lmcache: LMCache "
        "(p stores chunks in --lmcache-dir, d requires them)",
    )
    dis.add_argument(
        "--lmcache-dir", default=None, help="shared directory standing in for LMCache's store"
    )
    dis.add_argument(
        "--lmcache-strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a decode whose chunks are missing fails (default) instead of recomputing",
    )
    dis.add_argument(
        "--lmcache-chunk-size",
        type=int,
        default=LMCACHE_CHUNK_TOKENS,
        help="tokens per LMCache chunk (p and d must agree)",
    )
    dis.add_argument(
        "--handoff",
        choices=HANDOFFS,
        default="direct",
        help="direct: KV over the prefill worker's side channel, embeddings in --ec-dir; pool: "
        "both through the cache pool (--pool-tiers)",
    )
    dis.add_argument(
        "--pool-tiers",
        default="shm",
        help="the hand-off pool's tiers, comma-separated: shm (this host), redis (default: shm)",
    )
    dis.add_argument("--pool-redis-url", default=None, help="the hand-off pool's Redis")
    dis.add_argument(
        "--pool-shm-name",
        default="lmgw-handoff",
        help="processes with the same name share the pool's shm tier (default: lmgw-handoff)",
    )
    topo = p.add_argument_group(
        "KV transfer topology (p and d): a decode worker sleeps tokens * --kv-bytes-per-token / "
        "(GB/s * 1e9) per hand-off before its first token, at the same-zone bandwidth when the "
        "prefill worker's --zone is its own, else at the cross-zone one"
    )
    topo.add_argument(
        "--local-prefill",
        action="store_true",
        help="a decode worker (--role d) also serves requests that carry no hand-off, "
        "prefilling them itself as a vLLM decode instance does (the gateway's "
        "models[].local_prefill_tokens); default: refused",
    )
    topo.add_argument(
        "--zone",
        default=None,
        metavar="NAME",
        help="this worker's KV-transfer domain (node, NVLink island, rack); a prefill worker "
        "announces it with its hand-offs (default: none; none and none count as one zone)",
    )
    topo.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=0,
        metavar="N",
        help="modelled KV bytes per prompt token, e.g. 131072 (Llama-3-8B fp16) or 327680 "
        "(Llama-3-70B); 0: transfers take no modelled time (default)",
    )
    topo.add_argument(
        "--kv-gbps-same-zone",
        type=float,
        default=100.0,
        metavar="GBPS",
        help="KV bandwidth from a prefill worker of the same zone, GB/s (default: %(default)s)",
    )
    topo.add_argument(
        "--kv-gbps-cross-zone",
        type=float,
        default=12.5,
        metavar="GBPS",
        help="KV bandwidth from a prefill worker of another zone, GB/s (default: %(default)s)",
    )
    p.add_argument(
        "--tool-format",
        choices=sorted(TOOL_PARSERS),
        default=DEFAULT_TOOL_FORMAT,
        help="how the model writes tool calls for chat requests with tools (answered as raw "
        "text, parsed by the gateway); default: %(default)s",
    )
    faults = p.add_argument_group("fault injection (also settable at run time: POST /sim/faults)")
    faults.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 500")
    faults.add_argument("--hang", action="store_true", help="never answer generation requests")
    faults.add_argument("--slow", type=float, default=1.0, help="multiply every delay")
    faults.add_argument("--crash-at-token", type=int, default=None, help="exit(1) after k tokens")
    faults.add_argument("--drop-at-token", type=int, default=None, help="drop conn after k tokens")
    faults.add_argument("--refuse", action="store_true", help="answer 503 to everything")
    faults.add_argument("--flap-health", action="store_true", help="/health alternates 200/503")
    faults.add_argument(
        "--stall-rate", type=float, default=0.0, help="fraction stalled before their prefill"
    )
    faults.add_argument("--stall-s", type=float, default=1.0, help="how long a stall lasts")
    p.add_argument("--log-level", default="WARNING")
    return p


def options_from_args(ns: argparse.Namespace, *, as_process: bool = True) -> WorkerOptions:
    """WorkerOptions from parsed flags. Raises ``ValueError`` for an unsupported role or bad
    fault values."""
    if ns.role not in ROLES:
        raise ValueError(unsupported_role_message(ns.role))
    if math.isnan(ns.speed) or ns.speed <= 0:
        raise ValueError("--speed must be > 0 (use 'inf' for no delays)")
    if ns.role == "e" and not ns.ec_dir and ns.handoff != "pool":
        raise ValueError("--role e needs --ec-dir (where the embeddings go) or --handoff pool")
    if ns.data_parallel_size != 1 and (
        ns.role == "e" or not 1 <= ns.data_parallel_size <= 64 or ns.kv_port is not None
    ):
        raise ValueError(
            "--data-parallel-size must be 1..64, for --role pd, p or d without --kv-port"
        )
    if not ns.kv_ttl > 0 or not ns.bootstrap_timeout > 0:
        raise ValueError("--kv-ttl and --bootstrap-timeout must be > 0")
    if ns.kv_port is not None and not 0 <= ns.kv_port < 65536:
        raise ValueError(f"--kv-port {ns.kv_port} is not a port")
    if ns.kv_connector == "lmcache" and ns.role in ("p", "d") and not ns.lmcache_dir:
        raise ValueError("--kv-connector lmcache needs --lmcache-dir (the shared store)")
    if ns.lmcache_chunk_size < 1:
        raise ValueError("--lmcache-chunk-size must be >= 1")
    if ns.max_model_len is not None and ns.max_model_len < 1:
        raise ValueError("--max-model-len must be >= 1")
    if ns.kv_events is not None and not ns.kv_events.startswith(("tcp://", "ipc://")):
        raise ValueError("--kv-events must be a ZMQ endpoint: tcp://HOST:PORT or ipc://PATH")
    lora_modules = tuple(parse_lora_module(spec) for spec in ns.lora_modules or ())
    if ns.max_loras is not None and ns.max_loras < 1:
        raise ValueError("--max-loras must be >= 1")
    if not ns.lora_load_s >= 0:
        raise ValueError("--lora-load-s must be >= 0")
    LoraAdapters(lora_modules)  # a repeated name: a usage error now, not at start-up
    if ns.kv_bytes_per_token < 0:
        raise ValueError("--kv-bytes-per-token must be >= 0")
    if not (ns.kv_gbps_same_zone > 0 and ns.kv_gbps_cross_zone > 0):
        raise ValueError("--kv-gbps-same-zone and --kv-gbps-cross-zone must be > 0")
    faults = Faults(
        error_rate=ns.error_rate,
        hang=ns.hang,
        slow=ns.slow,
        crash_at_token=ns.crash_at_token,
        drop_at_token=ns.drop_at_token,
        refuse=ns.refuse,
        flap_health=ns.flap_health,
        stall_rate=ns.stall_rate,
        stall_s=ns.stall_s,
    )
    return WorkerOptions(
        model=ns.model,
        served_model_names=tuple(ns.served_model_name or ()),
        role=ns.role,
        host=ns.host,
        port=ns.port,
        speed=ns.speed,
        timing=ns.timing,
        seed=ns.seed,
        fault_seed=ns.fault_seed,
        max_num_seqs=ns.max_num_seqs,
        kv_blocks=ns.kv_blocks,
        block_size=ns.block_size,
        max_model_len=ns.max_model_len,
        model_dir=ns.model_dir,
        api_key=ns.api_key,
        faults=faults,
        exit_on_crash=as_process,
        engine_id=ns.engine_id,
        ec_dir=ns.ec_dir,
        kv_ttl_s=ns.kv_ttl,
        stream_head=ns.stream_head.replace("-", "_"),
        bootstrap_timeout_s=ns.bootstrap_timeout,
        kv_port=ns.kv_port,
        kv_connector=ns.kv_connector,
        lmcache_dir=ns.lmcache_dir,
        lmcache_strict=ns.lmcache_strict,
        lmcache_chunk_size=ns.lmcache_chunk_size,
        tool_format=ns.tool_format,
        serial_prefill=ns.serial_prefill,
        kv_events=ns.kv_events,
        handoff=ns.handoff,
        pool_tiers=tuple(t.strip() for t in ns.pool_tiers.split(",") if t.strip()),
        pool_redis_url=ns.pool_redis_url,
        pool_shm_name=ns.pool_shm_name,
        enable_lora=ns.enable_lora or bool(lora_modules),
        lora_modules=lora_modules,
        max_loras=ns.max_loras,
        lora_load_s=ns.lora_load_s,
        zone=ns.zone,
        local_prefill=ns.local_prefill,
        kv_bytes_per_token=ns.kv_bytes_per_token,
        kv_gbps_same_zone=ns.kv_gbps_same_zone,
        kv_gbps_cross_zone=ns.kv_gbps_cross_zone,
    )


async def _exit_with_parent(scope: trio.CancelScope, parent: int) -> None:
    """A fleet member whose launcher died without stopping it (SIGKILL, a crash) stops by
    itself within a second: ``lmgw simulate`` must never leave orphan workers behind."""
    while os.getppid() == parent:
        await trio.sleep(1.0)
    scope.cancel()


async def run_worker_process(options: WorkerOptions, data_parallel_size: int = 1) -> None:
    """Serve until SIGTERM/SIGINT; print the READY line once bound."""
    from .dp import DataParallelSim, serve_dp_inprocess
    from .fleet import serve_worker_inprocess  # fleet imports this module's parser

    worker: SimWorker | DataParallelSim
    if data_parallel_size > 1:
        worker = DataParallelSim(options, data_parallel_size)
        serve: Any = serve_dp_inprocess
    else:
        worker, serve = SimWorker(options), serve_worker_inprocess
    # Install the signal receiver before announcing READY, so an early SIGTERM is never lost.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, worker)
            line = f"READY {url}"
            first = worker.ranks[0] if isinstance(worker, DataParallelSim) else worker
            if first.kv_address:
                line += f" kv_address={first.kv_address}"
            if first.kv_events is not None:  # (rank r's: rank_endpoint of it, as vLLM's)
                line += f" kv_events={first.kv_events.endpoint}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            nursery.start_soon(_exit_with_parent, nursery.cancel_scope, os.getppid())
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        options = options_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr)
    try:
        load_tokenizer(options.model_dir)  # now: a bad model folder is a usage error
    except ValueError as exc:
        parser.error(str(exc))
    trio.run(run_worker_process, options, ns.data_parallel_size)
    return 0
