"""Plot an ``outboxctl bench --json`` report: throughput and latency per pressure level, beside the
seed's figures, plus the sustained drain and its baselines.

    pip install -e '.[bench]'
    outboxctl bench --json docs/bench.json
    python tools/plot_bench.py docs/bench.json docs/bench.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
from matplotlib.ticker import FuncFormatter


def _metric(rows: dict[str, Any], name: str, key: str) -> float:
    value = rows.get(name, {}).get("metrics", {}).get(key)
    return float(value) if value is not None else 0.0


def plot(report: dict[str, Any], out: Path) -> None:
    rows = {r["name"]: r for r in report["rows"]}
    ref = {int(r["events"]): r for r in report["seed_reference"]}
    levels = sorted(ref)
    labels = [f"{n:,}" for n in levels]
    fig, (ax_t, ax_l, ax_s) = plt.subplots(1, 3, figsize=(16, 4.8))
    x = range(len(levels))
    width = 0.4

    ours = [_metric(rows, f"seed/{n}", "events_per_s") for n in levels]
    seed = [ref[n]["msg_per_s"] for n in levels]
    ax_t.bar([i - width / 2 for i in x], ours, width, label="relay: committed -> stored, verified")
    ax_t.bar([i + width / 2 for i in x], seed, width, label="seed: count / (send + fixed wait)")
    ax_t.set_yscale("log")
    ax_t.set_ylim(top=max([*ours, *seed, 1.0]) * 20)  # room for the legend above the bars
    ax_t.set_xticks(list(x), labels)
    ax_t.set_xlabel("events per pressure level")
    ax_t.set_ylabel("events/s (log)")
    ax_t.set_title("Throughput per pressure level")
    ax_t.legend(fontsize=8)

    p50 = [_metric(rows, f"seed/{n}", "p50_ms") for n in levels]
    p99 = [_metric(rows, f"seed/{n}", "p99_ms") for n in levels]
    send = [ref[n]["send_latency_ms"] for n in levels]
    ax_l.plot(list(x), p50, "o-", label="relay p50 commit -> ack")
    ax_l.plot(list(x), p99, "s-", label="relay p99 commit -> ack")
    ax_l.plot(list(x), send, "^--", label="seed: publish call returned (no ack)")
    ax_l.set_xticks(list(x), labels)
    ax_l.set_xlabel("events per pressure level")
    ax_l.set_ylabel("ms")
    ax_l.set_title("Latency per pressure level")
    ax_l.legend(fontsize=8)

    names = ["sustained/1-worker", "sustained/2-workers", "baseline/ceiling", "baseline/naive", "hot-aggregate"]
    present = [n for n in names if n in rows]
    values = [_metric(rows, n, "events_per_s") for n in present]
    bars = ax_s.barh(present, values)
    ax_s.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=3)
    ax_s.invert_yaxis()
    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1000:.0f}k"))
    ax_s.set_xlabel("events/s")
    ax_s.set_title("Backlog drain and baselines")
    ax_s.margins(x=0.25)

    machine = report.get("machine", {})
    repeat = report.get("config", {}).get("repeat", "?")
    fig.suptitle(
        f"outboxctl bench, medians of {repeat} runs, {machine.get('cpus', '?')} CPUs "
        f"({machine.get('cpu_model', '')}), {report.get('created_at', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", default="docs/bench.json", type=Path)
    parser.add_argument("out", nargs="?", default="docs/bench.png", type=Path)
    args = parser.parse_args()
    plot(json.loads(args.report.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
