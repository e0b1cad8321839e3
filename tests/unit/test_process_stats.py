"""The process metrics' parsing (sans-IO, over procfs text) and the trio task count."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from lmgw.metrics import Metrics
from lmgw.process_stats import (
    ProcessReader,
    count_tasks,
    current_tasks,
    parse_boot_time,
    parse_max_fds,
    parse_stat,
    register_process_metrics,
)

# a command name with spaces and a ')' of its own: the fields count from the last ')'
STAT = (
    "4242 (lmgw (serve) x) S 1 4242 4242 0 -1 4194304 900 0 0 0 "
    "250 150 0 0 20 0 7 0 123456 987654321 5000 18446744073709551615 0 0 0"
)


def test_parse_stat_reads_the_fields_after_the_last_parenthesis() -> None:
    s = parse_stat(STAT, ticks=100, page_size=4096, boot_time_s=1_000.0)
    assert s.cpu_seconds == pytest.approx(4.0)  # (250 + 150) ticks
    assert s.resident_bytes == 5000 * 4096
    assert s.virtual_bytes == 987654321
    assert s.start_time_s == pytest.approx(1_000.0 + 1234.56)
    assert s.threads == 7


def test_boot_time_and_fd_limit() -> None:
    assert parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n") == 1700000000.0
    with pytest.raises(ValueError):
        parse_boot_time("cpu 1 2 3\n")
    limits = (
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            1024                 4096                 files\n"
    )
    assert parse_max_fds(limits) == 1024.0
    assert parse_max_fds(limits.replace("1024 ", "unlimited ")) == float("inf")


def fake_proc(tmp_path: Path, fds: int) -> Path:
    (tmp_path / "stat").write_text("btime 1000\n")
    me = tmp_path / "self"
    (me / "fd").mkdir(parents=True)
    for i in range(fds):
        (me / "fd" / str(i)).write_text("")
    (me / "stat").write_text(STAT)
    (me / "limits").write_text("Max open files            64                   64    files\n")
    return me


def render(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_series_are_read_at_scrape_time(tmp_path: Path) -> None:
    me = fake_proc(tmp_path, fds=3)
    metrics = Metrics()
    conns = [5]
    register_process_metrics(metrics, connections=lambda: conns[0], reader=ProcessReader(me))
    got = render(metrics)
    assert got["process_cpu_seconds_total"] == pytest.approx(4.0)
    assert got["process_open_fds"] == 3
    assert got["process_max_fds"] == 64
    assert got["process_threads"] == 7
    assert got["lmgw_client_connections"] == 5
    assert got["lmgw_tasks"] == 0  # outside a trio run
    (me / "fd" / "3").write_text("")
    conns[0] = 2
    got = render(metrics)
    assert got["process_open_fds"] == 4 and got["lmgw_client_connections"] == 2


def test_no_procfs_and_no_connection_count_leave_series_out(tmp_path: Path) -> None:
    metrics = Metrics()
    register_process_metrics(
        metrics, connections=lambda: None, reader=ProcessReader(tmp_path / "nowhere")
    )
    got = render(metrics)
    assert not [k for k in got if k.startswith("process_") or k == "lmgw_client_connections"]
    assert "lmgw_tasks" in got


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no procfs")
def test_this_process_is_read() -> None:
    s = ProcessReader().stats()
    assert s is not None and s.resident_bytes > 1 << 20 and s.threads >= 1
    assert ProcessReader().open_fds() >= 3


async def test_task_count_follows_the_tasks_of_the_run() -> None:
    base = current_tasks()
    assert base >= 1
    async with trio.open_nursery() as outer:
        for _ in range(3):
            outer.start_soon(trio.sleep_forever)

        async def parent() -> None:
            async with trio.open_nursery() as inner:
                for _ in range(2):
                    inner.start_soon(trio.sleep_forever)
                await trio.sleep_forever()

        outer.start_soon(parent)
        await trio.testing.wait_all_tasks_blocked()
        assert current_tasks() == base + 3 + 1 + 2
        assert count_tasks(trio.lowlevel.current_task()) == 1 + 3 + 1 + 2
        outer.cancel_scope.cancel()
    assert current_tasks() == base


def test_gc_series_follow_the_collector(tmp_path: Path) -> None:
    """python_gc_* as the official client names and labels them, read at scrape time."""
    metrics = Metrics()
    register_process_metrics(metrics, connections=lambda: None, reader=ProcessReader(tmp_path))
    before = render(metrics)
    for gen in ("0", "1", "2"):
        for name in ("collections", "objects_collected", "objects_uncollectable"):
            assert f'python_gc_{name}_total{{generation="{gen}"}}' in before
    cycle: list[object] = []
    cycle.append(cycle)  # garbage only the collector frees
    del cycle
    gc.collect()
    after = render(metrics)
    key = 'python_gc_collections_total{generation="2"}'
    assert after[key] == before[key] + 1
    assert after['python_gc_objects_collected_total{generation="2"}'] >= (
        before['python_gc_objects_collected_total{generation="2"}'] + 1
    )
