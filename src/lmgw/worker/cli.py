"""``python -m lmgw.worker``: one worker process serving the native protocol.

::

    python -m lmgw.worker --role pd --bind tcp://127.0.0.1:0 --speed 100        # simulator
    python -m lmgw.worker --engine vllm --role p --bind tcp://0.0.0.0:7000 \\
        --gateway tcp://gw:7100 --model Qwen/Qwen3-0.6B --kv-transfer-config '{...}'

With ``--curve-secret-key FILE`` both ROUTERs use CURVE: the link is encrypted and gateways
must know this worker's public key; ``--curve-allow DIR`` admits only the gateways whose
public keys (``*.key`` files) are in DIR (re-read when it changes). Key files are ZeroMQ
certificates, e.g. from ``lmgw.transport.zmq.curve.generate_keys(DIR, NAME)``.

Arguments this parser does not know go to vLLM's engine-argument parser (``--engine vllm``
only). Once bound the process prints exactly one line to stdout,
``READY <data endpoint> control=<control endpoint>`` (``control=none`` without one), as the
simulator's ``READY <url>`` line; logs go to stderr. SIGTERM or SIGINT drains (no new work,
in-flight work finishes for ``--drain-grace`` seconds, then ``Exit`` to the gateways) and
exits 0; a second signal stops at once. A simulator worker (``--engine sim``) also stops when
its launching process dies, as ``python -m lmgw.simulators`` does.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence

import trio

from ..transport.zmq.curve import CurveError, CurveServer
from .engine import Engine, role_name
from .server import WorkerServer

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("lmgw.worker")


def build_parser(*, sim: bool = True) -> argparse.ArgumentParser:
    """The worker's flags; ``sim=False`` leaves out the simulator's (several share names with
    vLLM's engine arguments: --model, --seed, --max-num-seqs... go to vLLM then)."""
    p = argparse.ArgumentParser(
        prog="python -m lmgw.worker",
        allow_abbrev=False,  # unknown flags go to vLLM: never read them as abbreviations
        description="An lmgw worker: serves the native ZeroMQ protocol around an engine.",
    )
    p.add_argument("--role", default="pd", help="pd (merged), e (encode), p (prefill), d (decode)")
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    p.add_argument("--bind", default="tcp://127.0.0.1:0", help="data endpoint (port 0: a free one)")
    p.add_argument(
        "--control-bind",
        default="auto",
        help="heartbeat/metrics endpoint: auto (same host, free port), none, or an endpoint",
    )
    p.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="a gateway registration endpoint to announce this worker to (repeatable)",
    )
    p.add_argument(
        "--advertise", default=None, help="the data endpoint to announce (default: the bound one)"
    )
    p.add_argument("--worker-id", default=None)
    p.add_argument("--max-inflight", type=int, default=256, help="more are refused overloaded")
    p.add_argument("--drain-grace", type=float, default=30.0, help="seconds on SIGTERM")
    p.add_argument("--announce-interval", type=float, default=2.0)
    p.add_argument(
        "--zone", default=None, help="this worker's KV-transfer zone, announced to the gateways"
    )
    p.add_argument(
        "--shm-threshold",
        type=int,
        default=16 << 20,
        metavar="BYTES",
        help="hand-off tensors at least this big go by shared memory to a gateway on this host"
        " (default 16 MiB; 0: never)",
    )
    p.add_argument(
        "--no-batch",
        action="store_true",
        help="do not offer the batch capability: every message is its own ZeroMQ message",
    )
    p.add_argument(
        "--curve-secret-key",
        default=None,
        metavar="FILE",
        help="CURVE: this worker's key pair (a .key_secret file); encrypts both endpoints",
    )
    p.add_argument(
        "--curve-allow",
        default=None,
        metavar="DIR",
        help="CURVE: admit only gateways whose public key (*.key) is in DIR",
    )
    p.add_argument("--log-level", default="WARNING")
    if not sim:
        return p
    group = p.add_argument_group("simulator engine (--engine sim)")
    group.add_argument("--model", default="sim-model")
    group.add_argument("--served-model-name", nargs="+", default=None)
    group.add_argument("--speed", type=float, default=1.0, help="divide delays by this; inf: none")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--kv-blocks", type=int, default=8192)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    group.add_argument("--engine-id", default=None, help="KV engine id a prefill worker reports")
    group.add_argument("--ec-dir", default=None, help="shared encoder-cache directory")
    group.add_argument(
        "--handoff",
        choices=("direct", "gateway"),
        default="direct",
        help="how KV and encoder outputs reach the next stage: direct (a side channel and"
        " --ec-dir) or gateway (tensor frames through the gateway)",
    )
    group.add_argument("--error-rate", type=float, default=0.0)
    group.add_argument("--hang", action="store_true")
    group.add_argument("--slow", type=float, default=1.0)
    group.add_argument("--crash-at-token", type=int, default=None, help="exit(1) after k tokens")
    return p


def sim_engine_from_args(ns: argparse.Namespace) -> Engine:
    """The simulator engine the flags describe. Raises ValueError for bad values."""
    from ..simulators.app import WorkerOptions
    from ..simulators.faults import Faults
    from .sim import SimEngine

    if math.isnan(ns.speed) or ns.speed <= 0:
        raise ValueError("--speed must be > 0 (use 'inf' for no delays)")
    options = WorkerOptions(
        model=ns.model,
        served_model_names=tuple(ns.served_model_name or ()),
        role=role_name(ns.role),
        speed=ns.speed,
        seed=ns.seed,
        max_num_seqs=ns.max_num_seqs,
        kv_blocks=ns.kv_blocks,
        block_size=ns.block_size,
        max_model_len=ns.max_model_len,
        engine_id=ns.engine_id,
        ec_dir=ns.ec_dir,
        handoff=ns.handoff,
        exit_on_crash=True,
        faults=Faults(
            error_rate=ns.error_rate,
            hang=ns.hang,
            slow=ns.slow,
            crash_at_token=ns.crash_at_token,
        ),
    )
    return SimEngine(options)


def curve_from_args(ns: argparse.Namespace) -> CurveServer | None:
    """The CURVE settings the flags describe. Raises CurveError for unusable key files."""
    if ns.curve_secret_key is None:
        if ns.curve_allow is not None:
            raise CurveError("--curve-allow needs --curve-secret-key")
        return None
    return CurveServer.from_files(ns.curve_secret_key, ns.curve_allow)


def server_from_args(ns: argparse.Namespace, engine: Engine) -> WorkerServer:
    control = ns.control_bind
    return WorkerServer(
        engine,
        bind=ns.bind,
        control_bind=None if control == "none" else control,
        worker_id=ns.worker_id,
        max_inflight=ns.max_inflight,
        gateways=ns.gateway,
        advertise=ns.advertise,
        announce_interval_s=ns.announce_interval,
        zone=ns.zone,
        drain_grace_s=ns.drain_grace,
        curve=curve_from_args(ns),
        batch=not ns.no_batch,
        shm_threshold=ns.shm_threshold or None,
    )


async def serve(server: WorkerServer, *, ready: Callable[[str], None] | None = None) -> None:
    """Run ``server`` until it drained (first SIGTERM/SIGINT) or a second signal; print the
    READY line once bound. The signal receiver is installed before READY, so an early
    SIGTERM is never lost."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:

            async def on_signals() -> None:
                async for signum in signals:
                    if server.draining:
                        log.warning("second signal: stopping now")
                        outer.cancel_scope.cancel()
                        return
                    log.warning("signal %d: draining", signum)
                    server.drain(f"signal {signum}")

            outer.start_soon(on_signals)
            async with trio.open_nursery() as inner:
                await inner.start(server.run)
                line = f"READY {server.endpoint} control={server.control_endpoint or 'none'}"
                (ready or _print)(line)
            outer.cancel_scope.cancel()  # run() returned: the drain is complete


async def serve_sim(server: WorkerServer) -> None:
    """:func:`serve` for a simulator worker, which also stops when its launcher dies
    (SIGKILL, a crash), as the HTTP simulator does: ``lmgw simulate --transport zmq`` must
    never leave orphan workers behind."""
    parent = os.getppid()
    async with trio.open_nursery() as nursery:

        async def watch_parent() -> None:
            while os.getppid() == parent:
                await trio.sleep(1.0)
            log.warning("the launching process is gone: stopping")
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_parent)
        await serve(server)
        nursery.cancel_scope.cancel()


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    pre, _ = build_parser(sim=False).parse_known_args(argv)
    parser = build_parser(sim=pre.engine == "sim")
    ns, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr)
    try:
        role_name(ns.role)
        curve = curve_from_args(ns)  # bad key files stop the start here, with exit 2
    except ValueError as exc:  # CurveError is one
        parser.error(str(exc))
    if curve is not None and curve.allow_dir is None:
        log.warning(
            "CURVE without --curve-allow: any gateway that knows this worker's public key "
            "may connect (the link is encrypted, but gateways are not authenticated)"
        )
    if ns.engine == "vllm":
        from .vllm import run_vllm_worker

        return run_vllm_worker(ns, rest, server_from_args)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        engine = sim_engine_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    trio.run(serve_sim, server_from_args(ns, engine))
    return 0
