"""``lmgw bench``: the flags, and the run from flags to summary, JSON and plot.

Exit codes: 0 when the run completed with at least one successful request (or ``--compare``
printed its table), 1 when no request succeeded or the target could not be asked for its
model, 2 for bad flags, an unreadable dataset or report, or ``--plot`` without matplotlib, 130
for a Ctrl-C before the load began.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import trio

from .. import __version__

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint (lmgw or not)",
        description="Load generator for any OpenAI-compatible endpoint: closed loop"
        " (--concurrency) or open loop (--rate, Poisson arrivals); see docs/bench.md.",
    )
    p.add_argument("--url", help="the endpoint's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--model", default=None, help="model name (default: the first of GET /v1/models)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"sent as a Bearer token (default ${DEFAULT_API_KEY_ENV} when set)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra request header (repeatable)",
    )
    p.add_argument(
        "--cacert",
        default=None,
        metavar="FILE",
        help="https: trust the CA certificates in FILE (PEM) instead of the system's",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: N sessions at a time"
    )
    load.add_argument(
        "--rate", type=float, default=None, help="open loop: Poisson arrivals, R per second"
    )
    stop = p.add_argument_group("when to stop (one or both)")
    stop.add_argument(
        "--duration", type=float, default=None, metavar="S", help="issue requests for S seconds"
    )
    stop.add_argument(
        "--requests", type=int, default=None, metavar="K", help="issue K requests in all"
    )
    what = p.add_mutually_exclusive_group()
    from .workloads import LENGTH_DISTS, WORKLOADS

    what.add_argument(
        "--workload",
        choices=WORKLOADS,
        default=None,
        help="a generated workload (default synthetic)",
    )
    what.add_argument(
        "--dataset", default=None, metavar="FILE.jsonl", help="one OpenAI request body per line"
    )
    w = p.add_argument_group("workload shape")
    w.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="for synthetic and shared-prefix (default chat)",
    )
    w.add_argument("--input-len", type=int, default=256, help="prompt tokens (mean; 256)")
    w.add_argument("--output-len", type=int, default=128, help="max_tokens (mean; 128)")
    w.add_argument(
        "--len-dist",
        choices=LENGTH_DISTS,
        default="fixed",
        help="how input and output lengths vary around their means (default fixed)",
    )
    w.add_argument(
        "--len-spread",
        type=float,
        default=0.5,
        help="uniform: +-spread x mean; normal: sd = spread x mean (default 0.5)",
    )
    w.add_argument("--turns", type=int, default=4, help="multi-turn: turns per session (4)")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: shared tokens (512)")
    w.add_argument(
        "--prefix-groups", type=int, default=4, help="shared-prefix: distinct prefixes (4)"
    )
    w.add_argument("--images", type=int, default=1, help="multimodal: images per request (1)")
    w.add_argument(
        "--image-size", default="256x256", metavar="WxH", help="multimodal: image size (256x256)"
    )
    w.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos (vLLM, SGLang, the simulator): answers run to max_tokens",
    )
    w.add_argument(
        "--no-stream", action="store_true", help="ask for whole answers (no SSE: TTFT = e2e)"
    )
    w.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help="a JSON object merged into every body, e.g. '{\"temperature\": 0}'",
    )
    w.add_argument("--seed", type=int, default=0, help="workload and arrivals seed (0)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="per-request limit, counted as a timeout error (600)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write the JSON report")
    out.add_argument(
        "--plot", default=None, metavar="FILE.png", help="latency CDFs and a throughput timeline"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="REPORT.json",
        help="compare reports (the first is the baseline) instead of running",
    )
    p.set_defaults(func=cmd_bench)


def _fail(message: str, code: int = 2) -> int:
    print(f"lmgw bench: {message}", file=sys.stderr)
    return code


def _print(renderables: list[Any]) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout, soft_wrap=False, width=None if sys.stdout.isatty() else 120)
    for r in renderables:
        console.print(r)


def _plot(reports: list[dict[str, Any]], names: list[str], path: str) -> int:
    from .plot import PlotUnavailable, plot_reports

    try:
        plot_reports(reports, names, path)
    except PlotUnavailable as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write --plot {path}: {exc}")
    print(f"plot written to {path}", file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report import ReportError, compare_table, load_report

    if len(args.compare) < 2:
        return _fail("--compare needs two or more reports")
    try:
        reports = [load_report(path) for path in args.compare]
    except ReportError as exc:
        return _fail(str(exc))
    names = [os.path.basename(path) for path in args.compare]
    _print([compare_table(reports, names)])
    if args.plot:
        return _plot(reports, names, args.plot)
    return 0


def _plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_bench(args: argparse.Namespace) -> int:
    if args.compare is not None:
        return _cmd_compare(args)
    if not args.url:
        return _fail("give --url (or --compare REPORT.json ...)")
    if args.plot and not _plot_available():
        return _fail(
            "--plot needs matplotlib: pip install 'lmgw[bench]' (or pip install matplotlib)"
        )
    from .api import BenchSetupError, prepare

    try:
        prepared = prepare(args)
    except BenchSetupError as exc:
        return _fail(str(exc), exc.code)
    try:
        report = trio.run(_run_with_signals, prepared, args.quiet)
    except BenchSetupError as exc:
        return _fail(str(exc), exc.code)
    if report is None:  # a second Ctrl-C, or one before the load began
        return 130
    from .report import summary_tables, write_report

    _print(summary_tables(report))
    for warning in report["warnings"]:
        print(f"lmgw bench: warning: {warning}", file=sys.stderr)
    if args.json:
        try:
            write_report(report, args.json)
        except OSError as exc:
            return _fail(f"cannot write --json {args.json}: {exc}")
        print(f"report written to {args.json}", file=sys.stderr)
    if args.plot:
        code = _plot([report], [args.url], args.plot)
        if code:
            return code
    return 0 if report["summary"]["requests"]["ok"] else 1


async def _run_with_signals(prepared: Any, quiet: bool) -> dict[str, Any] | None:
    """The run; the first Ctrl-C (or SIGTERM) stops it (requests in flight are abandoned) and
    reports what completed; a second one quits at once (None: no report)."""
    from .api import BenchSetupError, resolve, run_prepared

    interrupted = False
    error: BenchSetupError | None = None
    report: dict[str, Any] | None = None
    run_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for _ in signals:
                    if interrupted:  # the body is cancelled too: no report
                        nursery.cancel_scope.cancel()
                        return
                    interrupted = True
                    print("\nlmgw bench: stopping (again to quit)", file=sys.stderr)
                    run_scope.cancel()

        await nursery.start(watch)
        with run_scope:
            try:
                await resolve(prepared)
                report = await run_prepared(prepared, progress=not quiet and sys.stderr.isatty())
            except BenchSetupError as exc:  # raised below, outside the nursery's group
                error = exc
        if run_scope.cancelled_caught and prepared.generator is not None:
            report = prepared.report(interrupted=True)  # else stopped before the load began
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return report


__all__ = ["__version__", "add_bench_parser", "cmd_bench"]
