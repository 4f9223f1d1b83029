"""The benchmark's outputs: a printed table, a JSON report, and a PNG of throughput against concurrency."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from trtfalcon.bench.throughput import ConcurrencyResult


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_table(results: list[ConcurrencyResult], device: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:  # a pipe or a log file: don't squeeze the table into 80 columns
        console = Console(width=160, file=console.file)
    unit = "GPU" if device.startswith("cuda") else "process"
    t = Table(title=f"trtfalcon bench ({device})")
    for col in ("concurrency", "requests", "req/s", "output tok/s", f"tok/s per {unit}", "TTFT p50/p99 ms",
                "TPOT p50/p99 ms", "live batch", "host us/step", "preempt"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            str(r.concurrency), str(r.num_requests), _fmt(r.request_throughput, 2), _fmt(r.output_tokens_per_s),
            _fmt(r.output_tokens_per_s_per_gpu), f"{_fmt(r.ttft_ms['p50'])} / {_fmt(r.ttft_ms['p99'])}",
            f"{_fmt(r.tpot_ms['p50'], 2)} / {_fmt(r.tpot_ms['p99'], 2)}", _fmt(r.mean_live_batch),
            _fmt(r.host_us_per_step["mean"], 0), str(r.num_preemptions),
        )
    console.print(t)


def write_report(path: Path, results: list[ConcurrencyResult], meta: dict[str, Any], **sections: Any) -> None:
    """report.json: meta (with versions), the concurrency levels' results, and any other workload's section
    (`bench --tts` writes "tts")."""
    import torch

    from trtfalcon import __version__

    report = {
        "meta": {**meta, "trtfalcon": __version__, "torch": torch.__version__, "python": platform.python_version(),
                 "machine": platform.machine()},
        "results": [r.as_dict() for r in results],
        **sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def plot(path: Path, results: list[ConcurrencyResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(xs, [r.output_tokens_per_s for r in results], marker="o", label="output tok/s")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tokens / s")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [r.tpot_ms["p50"] or 0 for r in results], marker="s", color="tab:orange", label="TPOT p50 ms")
    ax2.set_ylabel("TPOT p50 (ms)")
    ax2.set_ylim(bottom=0)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
