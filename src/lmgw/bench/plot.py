"""``--plot out.png``: latency CDFs (TTFT, TPOT, ITL, e2e) and a throughput timeline, for one
report or several overlaid (``--compare ... --plot``). matplotlib is optional (the ``bench``
extra) and imported only here, with the Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import CDF_POINTS, METRICS


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'lmgw[bench]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_TITLES = {
    "ttft": "time to first token",
    "tpot": "time per output token",
    "itl": "inter-token latency",
    "e2e": "end-to-end latency",
}


def plot_reports(reports: Sequence[dict[str, Any]], names: Sequence[str], path: str | Path) -> None:
    """Write the figure to ``path`` (PNG, or any format matplotlib infers from the name)."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 10), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    quantiles = [i / (CDF_POINTS - 1) for i in range(CDF_POINTS)]
    for k, metric in enumerate(METRICS):
        ax = fig.add_subplot(grid[k // 2, k % 2])
        for report, name in zip(reports, names, strict=True):
            points = report.get("cdf_ms", {}).get(metric) or []
            if points:
                ax.plot(points, quantiles[: len(points)], label=name, drawstyle="steps-post")
        ax.set_title(_TITLES[metric])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.0)
        ax.grid(True, alpha=0.3)
        if len(reports) > 1:
            ax.legend(fontsize="small")
    ax = fig.add_subplot(grid[2, :])
    right = ax.twinx()
    for i, (report, name) in enumerate(zip(reports, names, strict=True)):
        tl = report.get("timeline") or {}
        t = list(tl.get("t", []))
        if not t:
            continue
        width = tl.get("bin_s") or 1.0
        duration = report.get("summary", {}).get("duration_s") or t[-1] + width
        widths = [width] * (len(t) - 1) + [max(duration - t[-1], 1e-9)]  # the last is partial

        def rate(key: str, tl: dict[str, Any] = tl, widths: list[float] = widths) -> list[float]:
            values = [x / w for x, w in zip(tl.get(key, []), widths, strict=False)]
            return [*values, values[-1]] if values else values  # holds the last step

        t.append(duration)
        color = f"C{i}"
        tokens, done, errors = rate("output_tokens"), rate("completed"), rate("errors")
        suffix = f" ({name})" if len(reports) > 1 else ""
        ax.step(t, tokens, where="post", color=color, label="output tokens/s" + suffix)
        right.step(t, done, where="post", color=color, linestyle="--", label="requests/s" + suffix)
        if any(errors):
            right.step(
                t, errors, where="post", color="red", linestyle=":", label="errors/s" + suffix
            )
    ax.set_title("throughput over time")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    right.set_ylabel("requests/s")
    ax.grid(True, alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small", loc="upper right")
    fig.suptitle("lmgw bench: " + ", ".join(names))
    fig.savefig(path, dpi=100)
    plt.close(fig)
