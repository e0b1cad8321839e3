"""``lmgw serve | simulate``: the command line.

Exit codes: 0 on a clean stop (Ctrl-C or SIGTERM), 2 for bad configuration or flags, 1 when the
gateway or the simulated fleet fails to start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from . import __version__
from .config import ConfigError, add_serve_arguments, config_from_args, dump_config
from .gateway import Gateway
from .routing.registry import UnknownPolicy

log = logging.getLogger("lmgw")


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    fmt = (
        '{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
        if json_lines
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr
    )


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
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.run)
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
    if not cfg.workers:
        print(
            "lmgw: no workers configured: give --worker ROLE=URL or [[workers]] in --config",
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
    failed = False
    result = None
    try:
        result = trio.run(fn, *args)
    except* OSError as group:
        failed = True
        for exc in _leaves(group):
            print(f"lmgw: cannot start: {exc}", file=sys.stderr)
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
        "--speed", type=float, default=1.0, help="simulator speed factor (inf: no delays)"
    )
    p_sim.add_argument("--seed", type=int, default=0)
    p_sim.add_argument("--policy", default=None, help="routing policy for every role")
    p_sim.add_argument(
        "--dialect",
        default=None,
        help="disaggregation dialect (vllm-nixl, vllm-p2pnccl, vllm-lmcache, vllm-epd,"
        " sglang-bootstrap);"
        " default: the engine default for the flow of --workers",
    )
    p_sim.add_argument("--server", choices=("native", "hypercorn"), default=None)
    p_sim.add_argument("--log-level", default="info")
    p_sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
