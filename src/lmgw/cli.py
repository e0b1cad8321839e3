"""``lmgw serve | simulate | workers | lora | routes | bench``: the command line.

Exit codes: 0 on a clean stop (Ctrl-C or SIGTERM), 2 for bad configuration or flags, 1 when the
gateway or the simulated fleet fails to start. ``lmgw workers ...``, ``lmgw lora ...`` and
``lmgw routes ...`` (the admin API's client) exit 1 when the gateway cannot be reached or
answers an error, with the gateway's message.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import trio

from . import __version__
from .config import (
    ConfigError,
    add_serve_arguments,
    comma_list,
    config_from_args,
    dump_config,
    parse_worker_flag,
)
from .errors import DECODE_ERRORS
from .fdlimit import ensure_open_files
from .gateway import Gateway
from .gctune import tune_gc
from .logs import setup_logging
from .model_routes import SPLITS, route_body
from .routing.registry import UnknownPolicy

log = logging.getLogger("lmgw")


async def _graceful(gateway, scope: trio.CancelScope) -> None:
    await gateway.shutdown()
    scope.cancel()


async def run_until_signal(gateway, nursery: trio.Nursery) -> None:
    """First SIGINT/SIGTERM drains the gateway gracefully; a second one stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        draining = False
        async for signum in signals:
            if draining:
                break
            draining = True
            log.info("%s: draining (send again to stop at once)", signal.Signals(signum).name)
            nursery.start_soon(_graceful, gateway, nursery.cancel_scope)
    nursery.cancel_scope.cancel()


async def serve(gateway: Gateway, *, ready_line: bool = False) -> None:
    cfg = gateway.config
    ensure_open_files()  # the CLI's call, as tune_gc() below: an embedder keeps its own
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.run)
        tune_gc()
        if ready_line:
            print(f"READY http://{cfg.server.host}:{port}", flush=True)
        await run_until_signal(gateway, nursery)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"lmgw: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg, redact=True), end="")
        return 0
    d = cfg.discovery
    if not cfg.workers and not (d.file or d.redis_url or d.p2p_nccl_bind or d.k8s_selectors):
        print(
            "lmgw: no workers configured: give --worker ROLE=URL or [[workers]] in --config, or"
            " a discovery source (--discovery-file, --redis-url, --p2p-discovery,"
            " --k8s-selector)",
            file=sys.stderr,
        )
        return 2
    setup_logging(cfg.logging.level, cfg.logging.json)
    try:
        gateway = Gateway(cfg)
    except (UnknownPolicy, ValueError) as exc:
        print(f"lmgw: {exc}", file=sys.stderr)
        return 2
    return _run_reporting_start_errors(serve, gateway)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _run_reporting_start_errors(fn, *args) -> int:
    """trio.run(fn, *args), turning a failure to bind or spawn into one line and exit 1."""
    failed = bad_config = False
    result = None
    try:
        result = trio.run(fn, *args)
    except* OSError as group:
        failed = True
        for exc in _leaves(group):
            print(f"lmgw: cannot start: {exc}", file=sys.stderr)
    except* ConfigError as group:  # e.g. a discovery file found invalid at its first read
        bad_config = True
        for exc in _leaves(group):
            print(f"lmgw: {exc}", file=sys.stderr)
    if bad_config:
        return 2
    if failed:
        return 1
    return result if isinstance(result, int) else 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .fleetspec import parse_fleet_spec
    from .simulate import run_simulation

    try:
        spec = parse_fleet_spec(args.workers)
    except ConfigError as exc:
        print(f"lmgw: {exc}", file=sys.stderr)
        return 2
    missing = spec.unimplemented()
    if missing:
        print(
            f"lmgw: the simulator does not implement role(s) {', '.join(missing)}", file=sys.stderr
        )
        return 2
    setup_logging(args.log_level)
    return _run_reporting_start_errors(run_simulation, spec, args)


# -- lmgw workers: a small client of the admin API (stdlib http.client: a CLI needs no pool) --


class AdminClientError(Exception):
    """The gateway could not be reached, or answered an error (the message says which)."""


def admin_call(
    gateway: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 30.0,
) -> Any:
    """One admin API request; the decoded JSON answer. Raises AdminClientError."""
    import http.client  # here: `lmgw serve` does not pay for it (~25 ms with email.parser)

    parts = urlsplit(gateway if "://" in gateway else "http://" + gateway)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdminClientError(f"--gateway {gateway!r} is not an http(s)://HOST[:PORT] URL")
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    headers = {"accept": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = msgspec.json.encode(body)
        headers["content-type"] = "application/json"
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminClientError(f"cannot reach the gateway at {gateway}: {exc}") from None
    finally:
        conn.close()
    try:
        payload = msgspec.json.decode(raw) if raw else None
    except DECODE_ERRORS:
        payload = None
    if resp.status >= 400:
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        text = message or raw[:300].decode("utf-8", "replace").strip() or resp.reason
        raise AdminClientError(f"gateway answered {resp.status}: {text}")
    return payload


def _worker_path(worker_id: str, action: str = "") -> str:
    return "/admin/workers/" + quote(worker_id, safe="") + (f"/{action}" if action else "")


_TABLE_COLUMNS = (
    "id", "role", "zone", "state", "in_flight", "total_requests", "source", "url", "models",
)  # fmt: skip


def format_workers(workers: list[dict[str, Any]]) -> str:
    """The ``lmgw workers list`` table: one row per worker, columns padded to fit."""

    def cell(w: dict[str, Any], key: str) -> str:
        value = w.get(key)
        if key == "models":
            return "*" if value is None else ",".join(value) or "-"
        return "-" if value is None else str(value)

    rows = [[c.upper() for c in _TABLE_COLUMNS]]
    rows += [[cell(w, c) for c in _TABLE_COLUMNS] for w in workers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join(
        "  ".join(v.ljust(n) for v, n in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _summary(w: dict[str, Any]) -> str:
    if w.get("object") == "list":  # the ranks of a data-parallel server, added at once
        return "\n".join(_summary(x) for x in w["data"])
    line = f"worker {w['id']}: {w['state']} ({w['role']}, {w['url']}, in flight {w['in_flight']})"
    if w.get("last_error") and w["state"] in ("ejected", "draining"):
        line += f": {w['last_error']}"
    return line


def _cmd_workers(args: argparse.Namespace) -> int:
    token = _admin_token(args)
    call = args.workers_command
    body: dict[str, Any] = {}
    if call == "add":
        try:
            wc = parse_worker_flag(args.spec)
        except ConfigError as exc:
            print(f"lmgw: {exc}", file=sys.stderr)
            return 2
        body = {k: v for k, v in msgspec.structs.asdict(wc).items() if v is not None}
        if args.model:
            body["models"] = args.model

    def run() -> tuple[Any, str]:
        if call == "list":
            answer = admin_call(args.gateway, token, "GET", "/admin/workers")
            return answer, format_workers(answer["data"])
        if call == "plan":
            answer = admin_call(args.gateway, token, "GET", "/admin/planner")
            return answer, format_plan(answer)
        if call == "add":
            answer = admin_call(args.gateway, token, "POST", "/admin/workers", body)
        elif call == "remove":
            path = _worker_path(args.id)
            timeout = 30.0
            if args.grace is not None:
                path += f"?grace_s={args.grace:g}"
                timeout += args.grace
            answer = admin_call(args.gateway, token, "DELETE", path, timeout=timeout)
        else:  # drain, undrain
            answer = admin_call(args.gateway, token, "POST", _worker_path(args.id, call))
        return answer, _summary(answer)

    return _admin_printed(args, run)


def _admin_printed(args: argparse.Namespace, run: Callable[[], tuple[Any, str]]) -> int:
    """Run an admin API call (``run``: its answer and that answer as text) and print it, as
    JSON with ``--json``; 1 with the gateway's message when it fails (``lmgw workers``,
    ``lora``, ``routes``)."""
    try:
        answer, text = run()
    except AdminClientError as exc:
        print(f"lmgw: {exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(answer).decode() if args.json else text)
    return 0


def _admin_token(args: argparse.Namespace) -> str | None:
    """``--token``, else ``$LMGW_ADMIN_TOKEN`` (``lmgw workers``, ``lora``, ``routes``)."""
    return args.token if args.token is not None else os.environ.get("LMGW_ADMIN_TOKEN") or None


def _admin_common() -> argparse.ArgumentParser:
    """The flags every admin API command takes (``lmgw workers``, ``lora``, ``routes``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--gateway",
        default="http://127.0.0.1:8000",
        metavar="URL",
        help="the gateway's base URL (default http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--token",
        default=None,
        help="the admin token (default $LMGW_ADMIN_TOKEN; flags show in `ps`)",
    )
    common.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    return common


def _add_workers_parser(sub: Any) -> None:
    p = sub.add_parser(
        "workers",
        help="list, add, remove, drain or undrain a running gateway's workers; plan: how many"
        " each role needs",
    )
    common = _admin_common()
    cmds = p.add_subparsers(dest="workers_command", required=True)
    cmds.add_parser("list", parents=[common], help="print a table of the workers")
    cmds.add_parser(
        "plan", parents=[common], help="the planner's recommended worker count of each role"
    )
    add = cmds.add_parser(
        "add",
        parents=[common],
        help="add a worker: ROLE=URL[,id=..,bootstrap_port=..,kv_address=..,zone=..,dp=..]",
    )
    add.add_argument("spec", metavar="ROLE=URL[,K=V...]", help="as `lmgw serve --worker`")
    add.add_argument(
        "--model", action="append", default=None, help="a model it serves (repeatable)"
    )
    rm = cmds.add_parser("remove", parents=[common], help="remove a worker")
    rm.add_argument("id")
    rm.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drain first; remove once idle or after SECONDS",
    )
    for name, what in (
        ("drain", "stop sending it new requests (those in flight finish)"),
        ("undrain", "route to it again (after one health probe)"),
    ):
        cmds.add_parser(name, parents=[common], help=what).add_argument("id")
    p.set_defaults(func=_cmd_workers)


def format_plan(answer: dict[str, Any]) -> str:
    """The ``lmgw workers plan`` table: each pool's workers, recommendation and why."""
    head = ("ROLE", "MODELS", "WORKERS", "DESIRED", "LOAD", "CAPACITY", "STATUS")
    rows = [head] + [
        (
            p["role"], p["models"], str(p["workers"]), str(p["desired"]), f"{p['load']:.1f}",
            "-" if p["capacity_per_worker"] is None else str(p["capacity_per_worker"]),
            p["status"],
        )
        for p in answer["pools"]
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"targets: p90 TTFT {answer['ttft_slo_s']:g} s, p90 time between tokens"
        f" {answer['itl_slo_s']:g} s; load averaged over {answer['window_s']:g} s"
    )
    return "\n".join(lines)


def format_adapters(adapters: list[dict[str, Any]]) -> str:
    """The ``lmgw lora list`` lines: each adapter, where it is loaded and where it failed."""
    if not adapters:
        return "no LoRA adapters loaded through this gateway"
    lines = []
    for a in adapters:
        lines.append(
            f"{a['lora_name']}  {a['lora_path']}  base={a.get('model') or '*'}"
            f"  loaded on {len(a['loaded'])}: {', '.join(a['loaded']) or '-'}"
        )
        lines += [f"   failed on {wid}: {why}" for wid, why in sorted(a["failed"].items())]
    return "\n".join(lines)


def _cmd_lora(args: argparse.Namespace) -> int:
    token = _admin_token(args)
    call = args.lora_command

    def run() -> tuple[Any, str]:
        if call == "list":
            answer = admin_call(args.gateway, token, "GET", "/admin/lora_adapters")
            return answer, format_adapters(answer["data"])
        if call == "load":
            body: dict[str, Any] = {"lora_name": args.name, "lora_path": args.path}
            if args.model:
                body["model"] = args.model
            if args.inplace:
                body["load_inplace"] = True
            # one load may read the adapter from a hub on every worker: minutes, not seconds
            answer = admin_call(
                args.gateway, token, "POST", "/admin/lora_adapters", body, timeout=180.0
            )
            return answer, format_adapters([answer])
        path = "/admin/lora_adapters/" + quote(args.name, safe="")
        answer = admin_call(args.gateway, token, "DELETE", path, timeout=180.0)
        text = f"unloaded {args.name} from {len(answer['unloaded'])} workers" + "".join(
            f"\n   failed on {wid}: {why}" for wid, why in sorted(answer["failed"].items())
        )
        return answer, text

    return _admin_printed(args, run)


def _add_lora_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lora", help="list, load or unload LoRA adapters on a running gateway's whole fleet"
    )
    common = _admin_common()
    cmds = p.add_subparsers(dest="lora_command", required=True)
    cmds.add_parser("list", parents=[common], help="the adapters and where they are loaded")
    load = cmds.add_parser("load", parents=[common], help="load an adapter on every worker")
    load.add_argument("name")
    load.add_argument("path", help="where the workers read it (vLLM's lora_path)")
    load.add_argument("--model", default=None, help="only workers serving this base model")
    load.add_argument("--inplace", action="store_true", help="reload a name from a new path")
    unload = cmds.add_parser("unload", parents=[common], help="unload it everywhere")
    unload.add_argument("name")
    p.set_defaults(func=_cmd_lora)


def format_routes(routes: list[dict[str, Any]]) -> str:
    """The ``lmgw routes list`` lines: each route's targets (weight and share), fallbacks,
    split, and the requests each target was given since the route was set."""
    if not routes:
        return "no model routes on this gateway"
    lines = []
    for r in routes:
        targets = "  ".join(
            f"{t['model']}={t['weight']:g} ({round(t['share'] * 100, 2):g}%)" for t in r["targets"]
        )
        given = " ".join(f"{m}={n}" for m, n in r["requests"].items())
        mirror = ""
        if r.get("mirror"):
            mirror = f"  mirror={r['mirror']} ({round(r['mirror_share'] * 100, 2):g}%)"
        lines.append(
            f"{r['model']}  {targets}  fallbacks={','.join(r['fallbacks']) or '-'}"
            f"  split={r['split']}{mirror}  requests {given or '-'}"
        )
    return "\n".join(lines)


def _route_targets(specs: list[str]) -> list[tuple[str, float]]:
    """``MODEL=WEIGHT`` (a bare ``MODEL``: weight 1) as (model, weight) pairs; ValueError
    naming the bad one (a weight the gateway would refuse anyway is caught before asking)."""
    targets = []
    for spec in specs:
        model, eq, text = spec.rpartition("=")
        if not eq:
            model, text = spec, "1"
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"target {spec!r}: the weight must be a number >= 0 (MODEL=WEIGHT)")
        targets.append((model, weight))
    return targets


def _cmd_routes(args: argparse.Namespace) -> int:
    token = _admin_token(args)
    call = args.routes_command
    targets: list[tuple[str, float]] = []
    if call == "set":
        try:
            targets = _route_targets(args.targets)
        except ValueError as exc:
            print(f"lmgw: {exc}", file=sys.stderr)
            return 2

    def run() -> tuple[Any, str]:
        if call == "list":
            answer = admin_call(args.gateway, token, "GET", "/admin/model_routes")
            return answer, format_routes(answer["data"])
        path = "/admin/model_routes/" + quote(args.name, safe="")
        if call == "set":
            body = route_body(targets, args.fallback, args.split, args.mirror, args.mirror_share)
            answer = admin_call(args.gateway, token, "PUT", path, body)
            return answer, format_routes([answer])
        answer = admin_call(args.gateway, token, "DELETE", path)
        return answer, f"deleted model route {args.name}"

    return _admin_printed(args, run)


def _add_routes_parser(sub: Any) -> None:
    p = sub.add_parser(
        "routes", help="list, set or delete model routes (weighted splits, fallbacks) at run time"
    )
    common = _admin_common()
    cmds = p.add_subparsers(dest="routes_command", required=True)
    cmds.add_parser("list", parents=[common], help="the routes, their shares and request counts")
    put = cmds.add_parser(
        "set", parents=[common], help="add or replace a route: the next request is split anew"
    )
    put.add_argument("name", help="the model name clients send")
    put.add_argument(
        "targets", nargs="+", metavar="MODEL[=WEIGHT]", help="a model behind it (weight 1)"
    )
    put.add_argument(
        "--fallback",
        action="append",
        default=[],
        metavar="MODEL",
        help="tried in order when the chosen model cannot serve (repeatable)",
    )
    put.add_argument(
        "--split",
        choices=SPLITS,
        default="request",
        help="request: exact weighted shares; session: a session stays on one model",
    )
    put.add_argument(
        "--mirror",
        default=None,
        metavar="MODEL",
        help="also send a copy of the requests to this model (answers dropped)",
    )
    put.add_argument(
        "--mirror-share",
        type=float,
        default=1.0,
        metavar="F",
        help="the share of requests copied to --mirror, in (0, 1] (default 1)",
    )
    delete = cmds.add_parser("delete", parents=[common], help="the name stops being a route")
    delete.add_argument("name")
    p.set_defaults(func=_cmd_routes)


def _speed(text: str) -> float:
    """``--speed``: a positive number (inf: no simulated delays); refused here, before any
    worker starts, rather than by each worker."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0 (inf: no delays), not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgw", description="Low-latency gateway for disaggregated LLM serving."
    )
    parser.add_argument("--version", action="version", version=f"lmgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the gateway in front of workers")
    add_serve_arguments(p_serve)
    p_serve.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    p_serve.set_defaults(func=_cmd_serve)

    p_sim = sub.add_parser(
        "simulate", help="start simulated workers and the gateway in front of them"
    )
    p_sim.add_argument(
        "--workers", default="2pd", help="fleet spec, e.g. 2pd, 1e2pd, 3e2p4d (default 2pd)"
    )
    p_sim.add_argument("--host", default="127.0.0.1")
    p_sim.add_argument("--port", type=int, default=8000, help="gateway port (0 picks a free one)")
    p_sim.add_argument(
        "--model", default="sim-llama-8b", help="model name the simulated workers serve"
    )
    p_sim.add_argument(
        "--speed", type=_speed, default=1.0, help="simulator speed factor (inf: no delays)"
    )
    p_sim.add_argument("--seed", type=int, default=0)
    p_sim.add_argument("--policy", default=None, help="routing policy for every role")
    p_sim.add_argument(
        "--shadow-policies",
        default=None,
        metavar="LIST",
        type=comma_list,
        help="policies asked beside the active one and never obeyed (routing.shadow_policies)",
    )
    p_sim.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=0,
        metavar="N",
        help="p/d fleets (vllm-nixl, vllm-lmcache): a request with at most N prompt tokens to"
        " prefill runs whole on its decode worker, no prefill leg (models[].local_prefill_tokens)",
    )
    p_sim.add_argument(
        "--autoscale",
        type=int,
        default=0,
        metavar="N",
        help="start N workers of each role and route to the spec's count; the gateway adds"
        " and retires the others as its planner recommends (a closed loop, with the"
        " planner.* targets; see docs/operations.md, Planner)",
    )
    p_sim.add_argument(
        "--local-prefill-busy",
        type=int,
        default=0,
        metavar="N",
        help="p/d fleets (vllm-nixl, vllm-lmcache): a request whose prefill worker already has N"
        " requests runs whole on its decode worker while that one has room"
        " (models[].local_prefill_busy)",
    )
    p_sim.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="each pd, p and d worker serves N data-parallel ranks behind one API, as `vllm"
        " serve --data-parallel-size N`; the gateway routes to every rank (workers[]."
        "data_parallel_size)",
    )
    p_sim.add_argument(
        "--enable-lora",
        action="store_true",
        help="simulated workers take LoRA adapters at run time (POST /v1/load_lora_adapter"
        " through the gateway, with --admin-token)",
    )
    p_sim.add_argument(
        "--max-loras",
        type=int,
        default=None,
        metavar="N",
        help="with --enable-lora: N LoRA slots per worker, as vLLM's --max-loras",
    )
    p_sim.add_argument(
        "--stream-head",
        choices=("arrival", "first-token"),
        default="arrival",
        help="when the HTTP workers send a stream's head: at arrival as vLLM does (before the"
        " queue and the prefill), or with its first event",
    )
    p_sim.add_argument(
        "--coalesce",
        action="store_true",
        help="identical deterministic requests in flight share one generation (streams.coalesce)",
    )
    p_sim.add_argument(
        "--hedge",
        action="store_true",
        help="hedge streams whose first token is late (hedging.enabled)",
    )
    p_sim.add_argument(
        "--dialect",
        default=None,
        help="disaggregation dialect (vllm-nixl, vllm-p2pnccl, vllm-lmcache, vllm-epd,"
        " sglang-bootstrap);"
        " default: the engine default for the flow of --workers",
    )
    p_sim.add_argument("--server", choices=("native", "hypercorn"), default=None)
    p_sim.add_argument(
        "--transport",
        choices=("http", "zmq"),
        default="http",
        help="how the gateway reaches the simulated workers: http (the vLLM API) or zmq (the"
        " native protocol, media as tensor frames); default http",
    )
    p_sim.add_argument(
        "--kv-events",
        action="store_true",
        help="the workers publish their prefix cache's changes (vLLM KV events over ZMQ) and"
        " the gateway subscribes (workers[].kv_events): cache_aware routes in exact mode",
    )
    p_sim.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway replicas in front of the fleet (ports --port, --port+1, ...); more than"
        " one needs --redis",
    )
    p_sim.add_argument(
        "--redis",
        nargs="?",
        const="local",
        default=None,
        metavar="URL",
        help="share state through Redis (URL, or a redis-server started here): the fleet is"
        " registered there, the replicas share routing hints, health verdicts and a cache pool",
    )
    p_sim.add_argument(
        "--handoff",
        choices=("direct", "pool", "gateway"),
        default="direct",
        help="how workers hand off encoder outputs and KV: direct (side channel, shared"
        " directory), pool (the cache pool: Redis with --redis, else shared memory) or gateway"
        " (--transport zmq: tensor frames through the gateway)",
    )
    p_sim.add_argument(
        "--zones",
        type=int,
        default=0,
        metavar="N",
        help="spread each role's workers over N KV-transfer zones (z0, z1, ...): the gateway"
        " places P/D pairs jointly, and HTTP P/D workers model moving KV between zones",
    )
    p_sim.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=131072,
        metavar="N",
        help="with --zones: KV bytes per prompt token the workers move (default 131072: an"
        " 8B model in bf16)",
    )
    p_sim.add_argument("--log-level", default="info")
    p_sim.set_defaults(func=_cmd_simulate)

    _add_workers_parser(sub)
    _add_lora_parser(sub)
    _add_routes_parser(sub)
    from .bench.cli import add_bench_parser  # light: rich and matplotlib load only when used

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
