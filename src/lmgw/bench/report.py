"""The report of a `lmgw bench` run: percentiles, the summary table, the JSON document
(``schema``/``version`` fields; docs/bench.md describes it) and the comparison of reports.

Latencies are over successful requests only. TTFT: start to the first event carrying generated
text (a non-streamed answer: the whole answer). TPOT: (e2e - TTFT) / (completion tokens - 1),
per request with two or more tokens. ITL: the gaps between consecutive text events of a request,
pooled over all requests. Throughput divides by the run's duration (start to the last answer).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ..errors import DECODE_ERRORS
from .loadgen import RequestRecord, RunResult

SCHEMA = "lmgw-bench-report"
VERSION = 1
PERCENTILES = (50, 90, 99)
CDF_POINTS = 201
"""Quantiles kept per latency (0, 0.5, ..., 100 %): the plot's CDFs, from a run or a file."""
METRICS = ("ttft", "tpot", "itl", "e2e")
CPU_WARN = 0.9
"""Above this share of one core the generator itself may be what limits the load."""
LAG_WARN_S = 0.01
"""Open loop: a p99 lag of arrivals past this means the schedule slipped."""


class ReportError(ValueError):
    """A file that is not a readable bench report of a known version."""


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of sorted values, interpolating linearly between the
    closest ranks (numpy's default method). NaN for no values."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not in [0, 100]")
    pos = (n - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = sorted_values[lo], sorted_values[hi]
    return a + (b - a) * frac if frac else a


def latency_stats(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, p50/p90/p99, max of seconds, in milliseconds (None when empty)."""
    s = sorted(values)
    n = len(s)
    if not n:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None,
                "max": None}  # fmt: skip
    out: dict[str, Any] = {"n": n, "mean": _ms(math.fsum(s) / n), "min": _ms(s[0])}
    for p in PERCENTILES:
        out[f"p{p}"] = _ms(percentile(s, p))
    out["max"] = _ms(s[-1])
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 4)


def _cdf(values: Sequence[float]) -> list[float]:
    s = sorted(values)
    if not s:
        return []
    step = 100.0 / (CDF_POINTS - 1)
    return [_ms(percentile(s, i * step)) for i in range(CDF_POINTS)]


def _bin_width(elapsed: float) -> float:
    for w in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0):
        if elapsed / w <= 200:
            return w
    return math.ceil(elapsed / 200)


def _timeline(records: Sequence[RequestRecord], elapsed: float) -> dict[str, Any]:
    """Per time bin: answers completed, errors, output tokens (each request's tokens spread
    over its text events, so a run with ``usage`` counts true tokens)."""
    width = _bin_width(elapsed)
    nbins = max(1, math.ceil(elapsed / width))
    ok = [0] * nbins
    errors = [0] * nbins
    tokens = [0.0] * nbins
    last = nbins - 1
    for r in records:
        b = min(int(r.end / width), last)
        if r.error is None:
            ok[b] += 1
        else:
            errors[b] += 1
        times = r.token_times
        if r.completion_tokens:
            if times:
                w = r.completion_tokens / len(times)
                for t in times:
                    tokens[min(int(t / width), last)] += w
            else:
                tokens[b] += r.completion_tokens
    return {
        "bin_s": width,
        "t": [round(i * width, 6) for i in range(nbins)],
        "completed": ok,
        "errors": errors,
        "output_tokens": [round(x, 3) for x in tokens],
    }


def build_report(
    result: RunResult,
    *,
    config: dict[str, Any],
    workload: dict[str, Any],
    include_requests: bool = True,
) -> dict[str, Any]:
    """The JSON-ready report of a run."""
    records = result.records
    ok = [r for r in records if r.error is None]
    elapsed = result.elapsed_s
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    statuses: dict[str, int] = {}
    for r in records:
        if r.status:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
            if r.error not in examples and r.error_detail:
                examples[r.error] = r.error_detail
    prompt = sum(r.prompt_tokens for r in records)
    completion = sum(r.completion_tokens for r in records)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for r in ok:
        samples["e2e"].append(r.e2e)
        ttft = r.ttft
        if ttft is not None:
            samples["ttft"].append(ttft)
        tpot = r.tpot
        if tpot is not None:
            samples["tpot"].append(tpot)
        times = r.token_times
        if len(times) > 1:
            itl = samples["itl"]
            prev = times[0]
            for t in times[1:]:
                itl.append(t - prev)
                prev = t
    lags = sorted(result.lags)
    cpu_util = result.cpu_s / elapsed if elapsed > 0 else 0.0
    generator: dict[str, Any] = {
        "cpu_s": round(result.cpu_s, 4),
        "cpu_util": round(cpu_util, 4),
        "connections": result.connections,
    }
    if lags:
        generator["lag_ms"] = {
            "p50": _ms(percentile(lags, 50)),
            "p99": _ms(percentile(lags, 99)),
            "max": _ms(lags[-1]),
        }
    warnings = []
    if cpu_util > CPU_WARN and elapsed >= 1.0:
        warnings.append(
            f"the generator used {cpu_util:.0%} of a core: it may be the bottleneck"
            " (see docs/bench.md for its ceiling)"
        )
    if lags and percentile(lags, 99) > LAG_WARN_S:
        warnings.append(
            f"arrivals ran late (p99 {percentile(lags, 99) * 1000:.1f} ms after schedule):"
            " the generator could not keep the rate"
        )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "started_at": datetime.datetime.fromtimestamp(result.started_at, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "config": config,
        "workload": workload,
        "interrupted": result.interrupted,
        "summary": {
            "duration_s": round(elapsed, 6),
            "requests": {
                "completed": len(records),
                "ok": len(ok),
                "errors": len(records) - len(ok),
            },
            "errors_by_type": dict(sorted(errors.items())),
            "error_examples": dict(sorted(examples.items())),
            "status_counts": dict(sorted(statuses.items())),
            "tokens": {
                "prompt": prompt,
                "completion": completion,
                "usage_reported": sum(1 for r in ok if r.usage),
            },
            "throughput": {
                "requests_per_s": round(len(ok) / elapsed, 4) if elapsed > 0 else 0.0,
                "output_tokens_per_s": round(completion / elapsed, 4) if elapsed > 0 else 0.0,
                "total_tokens_per_s": round((prompt + completion) / elapsed, 4)
                if elapsed > 0
                else 0.0,
            },
            "latency_ms": {m: latency_stats(samples[m]) for m in METRICS},
        },
        "generator": generator,
        "warnings": warnings,
        "cdf_ms": {m: _cdf(samples[m]) for m in METRICS},
        "timeline": _timeline(records, elapsed),
    }
    if include_requests:
        report["requests"] = [r.as_dict() for r in records]
    return report


# -- files -----------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1) + b"\n")


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by ``--json``. Raises ReportError for anything else."""
    try:
        data = msgspec.json.decode(Path(path).read_bytes())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    except DECODE_ERRORS as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ReportError(f"{path} is not an lmgw bench report (no schema {SCHEMA!r})")
    if data.get("version") != VERSION:
        raise ReportError(
            f"{path} is a version {data.get('version')!r} report; this lmgw reads version {VERSION}"
        )
    return data


# -- tables ----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_tables(report: dict[str, Any]) -> list[Any]:
    """The summary as rich renderables: the totals, then the latency percentiles."""
    from rich import box
    from rich.table import Table

    s = report["summary"]
    cfg = report.get("config", {})
    load = (
        f"concurrency {cfg['concurrency']}"
        if cfg.get("concurrency") is not None
        else f"rate {cfg.get('rate')}/s"
    )
    title = f"lmgw bench: {cfg.get('url', '?')}, {cfg.get('model') or '?'}, {load},"
    title += f" {report.get('workload', {}).get('name', '?')}"
    if report.get("interrupted"):
        title += " (interrupted)"
    totals = Table(box=box.SIMPLE_HEAD, show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    req = s["requests"]
    tput = s["throughput"]
    rows = [
        ("duration", f"{s['duration_s']:.2f} s"),
        ("requests ok / errors", f"{req['ok']:,} / {req['errors']:,}"),
        ("throughput", f"{tput['requests_per_s']:,.2f} req/s"),
        ("output tokens/s", _fmt(tput["output_tokens_per_s"], 1)),
        ("total tokens/s", _fmt(tput["total_tokens_per_s"], 1)),
        (
            "prompt / completion tokens",
            f"{s['tokens']['prompt']:,} / {s['tokens']['completion']:,}",
        ),
    ]
    for kind, n in s["errors_by_type"].items():
        example = s.get("error_examples", {}).get(kind)
        rows.append((f"errors: {kind}", f"{n:,}" + (f"  ({example[:80]})" if example else "")))
    gen = report.get("generator", {})
    if gen:
        line = f"{gen.get('cpu_util', 0):.0%} of a core, {gen.get('connections', 0)} connections"
        if "lag_ms" in gen:
            line += f", arrival lag p99 {gen['lag_ms']['p99']:.2f} ms"
        rows.append(("generator", line))
    for k, v in rows:
        totals.add_row(k, v)
    lat = Table(box=box.SIMPLE_HEAD, title="latency (ms)", title_justify="left")
    lat.add_column("metric")
    for col in ("n", "mean", "p50", "p90", "p99", "max"):
        lat.add_column(col, justify="right")
    for m in METRICS:
        st = s["latency_ms"][m]
        lat.add_row(
            m.upper(),
            *(
                _fmt(st[c]) if c != "n" else f"{st['n']:,}"
                for c in ("n", "mean", "p50", "p90", "p99", "max")
            ),
        )
    return [title, totals, lat]


_COMPARED: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    # label, path in the report, higher is better
    ("requests/s", ("summary", "throughput", "requests_per_s"), True),
    ("output tokens/s", ("summary", "throughput", "output_tokens_per_s"), True),
    ("errors", ("summary", "requests", "errors"), False),
    *(
        (f"{m.upper()} {p} (ms)", ("summary", "latency_ms", m, p), False)
        for m in METRICS
        for p in ("p50", "p90", "p99")
    ),
)


def _get(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def compare_rows(reports: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any], list[Any]]]:
    """(label, values per report, ratio of each later report to the first) per compared metric."""
    rows = []
    for label, path, _ in _COMPARED:
        values = [_get(r, path) for r in reports]
        base = values[0]
        ratios: list[Any] = []
        for v in values[1:]:
            if isinstance(base, (int, float)) and isinstance(v, (int, float)) and base:
                ratios.append(v / base)
            else:
                ratios.append(None)
        rows.append((label, values, ratios))
    return rows


def compare_table(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    """A rich table: one column per report; a later report's cells add its ratio to the first
    (the baseline)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=f"baseline: {names[0]}", title_justify="left")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for label, values, ratios in compare_rows(reports):
        cells = [_fmt(values[0])]
        for v, x in zip(values[1:], ratios, strict=True):
            cells.append(_fmt(v) + ("" if x is None else f" ({x:.2f}x)"))
        table.add_row(label, *cells)
    return table
