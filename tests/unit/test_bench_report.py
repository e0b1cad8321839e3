"""`lmgw bench` reports: percentiles, the summary, the JSON document, comparisons."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.bench.loadgen import RequestRecord, RunResult
from lmgw.bench.plot import PlotUnavailable, plot_reports
from lmgw.bench.report import (
    CDF_POINTS,
    SCHEMA,
    VERSION,
    ReportError,
    build_report,
    compare_rows,
    compare_table,
    latency_stats,
    load_report,
    percentile,
    summary_tables,
    write_report,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(values=st.lists(finite, min_size=1, max_size=300), p=st.floats(0, 100))
def test_percentile_matches_numpy(values: list[float], p: float) -> None:
    ours = percentile(sorted(values), p)
    assert ours == pytest.approx(float(np.percentile(values, p)), rel=1e-9, abs=1e-6)


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(values=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200))
def test_latency_stats_are_milliseconds_of_numpy_figures(values: list[float]) -> None:
    s = latency_stats(values)
    assert s["n"] == len(values)
    for p in (50, 90, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(values, p) * 1000, abs=1e-3)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["mean"] == pytest.approx(np.mean(values) * 1000, abs=1e-3)
    assert latency_stats([])["p50"] is None


def record(
    start: float,
    tokens: list[float],
    end: float,
    *,
    completion: int | None = None,
    status: int = 200,
    error: str | None = None,
    prompt: int = 10,
) -> RequestRecord:
    r = RequestRecord(0, 0, start)
    r.token_times = array("d", tokens)
    r.end = end
    r.status = status
    r.error = error
    r.error_detail = f"detail of {error}" if error else None
    r.prompt_tokens = prompt if error is None else 0
    r.completion_tokens = (len(tokens) if completion is None else completion) if not error else 0
    r.usage = error is None
    return r


def sample_result() -> RunResult:
    records = [
        record(0.0, [0.1, 0.2, 0.3], 0.35),  # ttft .1, tpot (.35-.1)/2, itl .1 .1
        record(0.5, [0.7, 0.7, 1.0, 1.2], 1.3, completion=8),  # usage says 8 tokens
        record(1.0, [], 1.5, completion=5),  # not streamed: ttft = e2e
        record(1.1, [], 1.2, status=404, error="http_404"),
        record(1.2, [], 1.25, status=404, error="http_404"),
        record(1.4, [], 1.6, status=0, error="connect"),
    ]
    return RunResult(records=records, elapsed_s=2.0, cpu_s=0.5, started_at=1_700_000_000.0)


def test_build_report_counts_and_latencies() -> None:
    rep = build_report(sample_result(), config={"url": "u", "concurrency": 2}, workload={})
    s = rep["summary"]
    assert rep["schema"] == SCHEMA and rep["version"] == VERSION
    assert s["requests"] == {"completed": 6, "ok": 3, "errors": 3}
    assert s["errors_by_type"] == {"connect": 1, "http_404": 2}
    assert s["error_examples"]["http_404"] == "detail of http_404"
    assert s["status_counts"] == {"200": 3, "404": 2}
    assert s["tokens"] == {"prompt": 30, "completion": 16, "usage_reported": 3}
    assert s["throughput"]["requests_per_s"] == 1.5
    assert s["throughput"]["output_tokens_per_s"] == 8.0
    assert s["throughput"]["total_tokens_per_s"] == 23.0
    lat = s["latency_ms"]
    assert lat["ttft"]["n"] == 3 and lat["e2e"]["n"] == 3
    assert sorted([lat["ttft"]["min"], lat["ttft"]["max"]]) == [100.0, 500.0]
    assert lat["tpot"]["n"] == 2  # not for the answer that was not streamed
    assert lat["tpot"]["min"] == pytest.approx((1.3 - 0.5 - 0.2) / 7 * 1000, abs=1e-3)
    assert lat["itl"]["n"] == 5  # 2 gaps + 3 gaps, pooled
    assert lat["itl"]["min"] == 0.0 and lat["itl"]["max"] == pytest.approx(300.0)
    assert len(rep["cdf_ms"]["e2e"]) == CDF_POINTS
    assert rep["cdf_ms"]["e2e"][0] == lat["e2e"]["min"]
    assert rep["cdf_ms"]["e2e"][-1] == lat["e2e"]["max"]
    assert len(rep["requests"]) == 6 and rep["requests"][3]["error"] == "http_404"
    assert rep["generator"]["cpu_util"] == 0.25 and rep["warnings"] == []
    tl = rep["timeline"]
    assert sum(tl["completed"]) == 3 and sum(tl["errors"]) == 3
    assert sum(tl["output_tokens"]) == pytest.approx(16)  # usage's count, spread over events
    assert len(tl["t"]) == len(tl["completed"])


def test_generator_warnings() -> None:
    result = sample_result()
    result.cpu_s = 1.95
    result.lags = array("d", [0.0] * 90 + [0.05] * 10)
    rep = build_report(result, config={}, workload={}, include_requests=False)
    assert "requests" not in rep
    assert rep["generator"]["lag_ms"]["max"] == 50.0
    assert len(rep["warnings"]) == 2 and "bottleneck" in rep["warnings"][0]


def test_json_round_trip_and_checks(tmp_path: Path) -> None:
    rep = build_report(sample_result(), config={"url": "u"}, workload={"name": "synthetic"})
    path = tmp_path / "r.json"
    write_report(rep, path)
    assert load_report(path) == rep
    path.write_text('{"schema": "something-else"}')
    with pytest.raises(ReportError, match="not an lmgw bench report"):
        load_report(path)
    path.write_text(json.dumps({"schema": SCHEMA, "version": 99}))
    with pytest.raises(ReportError, match="version 99"):
        load_report(path)
    path.write_text("nope")
    with pytest.raises(ReportError, match="not JSON"):
        load_report(path)
    with pytest.raises(ReportError, match="cannot read"):
        load_report(tmp_path / "missing.json")


def test_compare_ratios_against_the_first_report() -> None:
    a = build_report(sample_result(), config={}, workload={})
    faster = sample_result()
    faster.elapsed_s = 1.0
    b = build_report(faster, config={}, workload={})
    rows = {label: (values, ratios) for label, values, ratios in compare_rows([a, b, a])}
    values, ratios = rows["requests/s"]
    assert values == [1.5, 3.0, 1.5] and ratios == [2.0, 1.0]
    values, ratios = rows["errors"]
    assert values == [3, 3, 3] and ratios == [1.0, 1.0]
    assert rows["TTFT p50 (ms)"][1] == [1.0, 1.0]
    a["summary"]["latency_ms"]["itl"]["p99"] = None  # a metric missing in one report
    assert rows and compare_rows([a, b])[-4][0] == "ITL p99 (ms)"
    assert compare_rows([a, b])[-4][2] == [None]


def test_tables_render() -> None:
    from rich.console import Console

    rep = build_report(sample_result(), config={"url": "u", "concurrency": 2}, workload={})
    console = Console(record=True, width=140)
    for r in summary_tables(rep):
        console.print(r)
    console.print(compare_table([rep, rep], ["a.json", "b.json"]))
    text = console.export_text()
    assert "http_404" in text and "TTFT" in text and "1.00x" in text and "concurrency 2" in text


def test_plot_writes_a_png_and_needs_matplotlib(tmp_path: Path, monkeypatch) -> None:
    rep = build_report(sample_result(), config={}, workload={})
    path = tmp_path / "p.png"
    plot_reports([rep, rep], ["a", "b"], path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(PlotUnavailable, match=re.escape("pip install 'lmgw[bench]'")):
        plot_reports([rep], ["a"], tmp_path / "q.png")
    from lmgw.cli import main

    argv = ["bench", "--url", "http://127.0.0.1:1", "--concurrency", "1", "--requests", "1"]
    assert main([*argv, "--plot", str(tmp_path / "r.png")]) == 2  # before any request
    assert not (tmp_path / "r.png").exists()


def test_every_bench_flag_is_documented() -> None:
    from lmgw.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["bench"]
    flags = [s for a in bench._actions for s in a.option_strings if s.startswith("--")]
    assert "--concurrency" in flags and "--compare" in flags
    for doc in ("bench.md", "configuration.md"):
        text = (DOCS / doc).read_text(encoding="utf-8")
        missing = [f for f in flags if f != "--help" and f"`{f}" not in text]
        assert not missing, f"docs/{doc} does not mention {missing}"


@pytest.mark.parametrize(
    ("url", "base", "prefix"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000", ""),
        ("http://h/v1/", "http://h:80", ""),
        ("https://h/api/v1/chat/completions", "https://h:443/api", "/api"),
        ("http://[::1]:9000/x/v1/completions", "http://[::1]:9000/x", "/x"),
    ],
)
def test_target_urls(url: str, base: str, prefix: str) -> None:
    from lmgw.bench.loadgen import Target, TargetError

    t = Target.from_url(url, api_key="k", headers=[("X-A", " b ")])
    assert t.base_url == base and t.prefix == prefix
    assert (b"authorization", b"Bearer k") in t.headers and (b"x-a", b"b") in t.headers
    with pytest.raises(TargetError):
        Target.from_url("ftp://h")
    with pytest.raises(TargetError):
        Target.from_url("http://h:99999")
