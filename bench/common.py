"""What every benchmark shares: a real stack, the statistics, and the report files."""

import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from tests.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def running_stack(asgi_processes=2, **env):
    """The native runtime, as `make up-cross-domain` runs it, on free ports."""
    # A benchmark stopped with SIGTERM still stops its stack (the with block below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as state,
        Stack("cross-domain", state, asgi_processes=asgi_processes, env=env) as stack,
    ):
        yield stack


def spread(values):
    """Median, min and max of several runs."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": len(values),
    }


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def machine():
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def write(name, figures, table):
    """bench/results/<name>.json and <name>.md (a Markdown table: header row, then rows)."""
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": machine(), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def fmt(figure, digits=0, scale=1):
    """'median (min–max)' of a spread."""
    m, lo, hi = (round(figure[k] * scale, digits) for k in ("median", "min", "max"))
    if digits == 0:
        m, lo, hi = int(m), int(lo), int(hi)
    return f"{m} ({lo}–{hi})"


def bar_chart(name, title, labels, figures, ylabel, scale=1):
    """A PNG bar chart of medians with min–max whiskers: bench/results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = [f["median"] * scale for f in figures]
    low = [(f["median"] - f["min"]) * scale for f in figures]
    high = [(f["max"] - f["median"]) * scale for f in figures]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, medians, yerr=[low, high], capsize=4, color="#4a7ab5")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)
