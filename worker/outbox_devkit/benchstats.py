"""Numbers of ``outboxctl bench``: percentiles, medians of repeats, targets, the JSON report schema
and the human table. Pure: no I/O, so the report format is unit-testable and stable.

The JSON report (``--json PATH``), schema version :data:`SCHEMA_VERSION`, documented in
docs/benchmarks.md::

    {
      "schema": "outbox-bench", "schema_version": 1, "created_at": "2026-11-29T10:00:00Z", "ok": true,
      "machine": {"cpus": 2, "cpu_model": "...", "python": "3.11.2", "platform": "...", ...},
      "config": {"repeat": 3, "scale": 1.0, "scenarios": ["seed", ...], "worker": {...}},
      "rows": [
        {"name": "sustained/1-worker", "scenario": "sustained",
         "metrics": {"events_per_s": 61234.0, ...},        # medians over the runs
         "runs": [{"events_per_s": 60001.0, ...}, ...],     # one object per repeat
         "checks": {"lost": 0, "duplicates": 0, "order_violations": 0, "unexpected": 0,
                    "pending": 0, "verified_runs": 3, "ok": true}},
        ...
      ],
      "ratios": {"relay_over_naive": 31.2, "relay_over_ceiling": 0.81},
      "targets": [{"name": "...", "target": ">= 60000", "value": 61234.0, "met": true}],
                 # "met": null when not run, or with "note" when a target's offered rate was not reached
      "seed_reference": [{"events": 500, "msg_per_s": 33.21, "send_latency_ms": 1.57}, ...]
    }

Metric values are numbers (or null when not applicable); ``checks`` counts are summed over runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "outbox-bench"
SCHEMA_VERSION = 1

COMMIT_RATES = (500, 1_000, 5_000)  # commits/s `commit-rate` offers unless told (`bench --commit-rates`)
SCENARIOS = ("seed", "sustained", "baselines", "latency", "growth", "hot", "commit-rate", "scale-up", "replicated")

# The report this project grew from: its NATS publisher at four pressure levels. "msg/s" divides the
# count by a duration that includes a fixed 15 s / 30 s wait; "send latency" is how long the publish
# call took to return (before any ack). See docs/benchmarks.md.
SEED_REFERENCE: tuple[dict[str, float], ...] = (
    {"events": 500, "msg_per_s": 33.21, "send_latency_ms": 1.570},
    {"events": 2000, "msg_per_s": 131.83, "send_latency_ms": 9.358},
    {"events": 5000, "msg_per_s": 164.07, "send_latency_ms": 45.353},
    {"events": 10000, "msg_per_s": 325.42, "send_latency_ms": 68.444},
)
SEED_LEVELS = tuple(int(r["events"]) for r in SEED_REFERENCE)

CHECK_KEYS = ("lost", "duplicates", "order_violations", "unexpected", "pending")


def seed_aggregates(events: int) -> int:
    """Aggregates of a seed pressure level: N/10 clamped to 50..1000 (as the seed's test did)."""
    return max(50, min(1000, events // 10))


def poll_pause(remaining: int, rate: float, shortest: float = 0.02, longest: float = 0.2) -> float:
    """Seconds the bench waits before it next asks the stream how many of a run's messages it holds.

    Each ask costs the bench's process ~0.5 ms of CPU and nats-server a stream-info request, on the
    two cores the relay is being measured on: asked every 20 ms through a 200,000-event drain, the
    bench took 2.7% of a core (docs/benchmarks.md). The bench waits until half the ``remaining``
    messages should be in at the ``rate`` seen so far (messages per second; 0 before any arrived:
    ``longest``), between ``shortest`` and ``longest``: a drain is asked ~15 times instead of ~120,
    and its end is still seen within ``shortest`` plus half of what was left.
    """
    if rate <= 0:
        return longest
    return min(longest, max(shortest, remaining / rate / 2))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    rank = max(1, math.ceil(q * len(s)))
    return float(s[min(len(s), rank) - 1])


def median(values: Iterable[float | None]) -> float | None:
    """Median of the non-null values (mean of the middle two for an even count); None if none."""
    s = sorted(float(v) for v in values if v is not None)
    if not s:
        return None
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@dataclass
class Row:
    """One line of the results: a scenario variant with one metrics dict per repeat."""

    name: str
    scenario: str
    runs: list[dict[str, float | None]] = field(default_factory=list)
    checks: list[dict[str, int]] = field(default_factory=list)  # history-checker findings per run
    note: str = ""

    def metrics(self) -> dict[str, float | None]:
        keys: list[str] = []
        for run in self.runs:
            keys.extend(k for k in run if k not in keys)
        return {k: _round(median(run.get(k) for run in self.runs)) for k in keys}

    def summed_checks(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: sum(c.get(k, 0) for c in self.checks) for k in CHECK_KEYS}
        out["verified_runs"] = len(self.checks)
        out["ok"] = all(out[k] == 0 for k in CHECK_KEYS)
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "scenario": self.scenario,
            "metrics": self.metrics(),
            "runs": [{k: _round(v) for k, v in run.items()} for run in self.runs],
            "checks": self.summed_checks(),
        }
        if self.note:
            d["note"] = self.note
        return d


def _round(v: float | None) -> float | None:
    """3 decimals, and 4 significant digits below 1: CPU seconds per 1,000 events (~0.015) would
    otherwise be read in whole microseconds per event, coarser than most changes worth measuring."""
    if v is None:
        return None
    v = float(v)
    return float(f"{v:.4g}") if abs(v) < 1 else round(v, 3)


@dataclass(frozen=True)
class Target:
    name: str
    row: str  # a row name, or "ratio:<key>"
    metric: str
    op: str  # ">=", "<=" or "<"
    bound: float
    # A target stated at an offered rate counts only where the row reached 90% of it (its
    # ``events_per_s``); below, ``met`` is None and ``note`` says what was reached instead.
    at_rate: float = 0.0

    def evaluate(self, rows: Mapping[str, Mapping[str, Any]], ratios: Mapping[str, float | None]) -> dict[str, Any]:
        if self.row.startswith("ratio:"):
            value = ratios.get(self.row.split(":", 1)[1])
        else:
            value = rows.get(self.row, {}).get("metrics", {}).get(self.metric)
        met: bool | None = None
        out: dict[str, Any] = {"name": self.name, "target": f"{self.op} {self.bound:g}", "value": value}
        reached = rows.get(self.row, {}).get("metrics", {}).get("events_per_s")
        if value is not None and self.at_rate and (reached is None or reached < 0.9 * self.at_rate):
            out["note"] = f"offered {self.at_rate:,.0f}/s, reached {reached or 0:,.0f}/s"
        elif value is not None:
            met = {">=": value >= self.bound, "<=": value <= self.bound, "<": value < self.bound}[self.op]
        out["met"] = met
        return out


TARGETS = (
    Target("relay/naive (one worker process)", "ratio:relay_over_naive", "", ">=", 10),
    Target("relay/ceiling (one worker process)", "ratio:relay_over_ceiling", "", ">=", 0.7),
    Target("events/s, one worker process", "sustained/1-worker", "events_per_s", ">=", 60_000),
    Target("events/s, two worker processes", "sustained/2-workers", "events_per_s", ">=", 90_000),
    Target("p99 commit->ack at 5000/s offered (ms)", "latency/5000-per-s", "p99_ms", "<=", 25),
    Target("idle worker CPU (% of a core)", "idle/1-worker", "cpu_percent", "<", 2),
    Target("claim time 1M history / empty", "ratio:claim_history_over_empty", "", "<=", 1.5),
    Target("claim time 10M history / empty", "ratio:claim_10m_history_over_empty", "", "<=", 1.2),
    Target("worker cores at 1000 commits/s", "commit-rate/1000-per-s", "worker_cores", "<=", 0.08, 1000),
    Target("p99 commit->ack at 1000 commits/s (ms)", "commit-rate/1000-per-s", "p99_ms", "<=", 10, 1000),
    Target("worker cores at 5000 commits/s", "commit-rate/5000-per-s", "worker_cores", "<=", 0.25, 5000),
    Target("longest unowned partition, scale-up (ms)", "scale-up/1-2-3-workers", "max_unowned_ms", "<=", 150),
    Target("2 workers started together / 1 (drain)", "ratio:together_over_alone", "", ">=", 1.0),
)


def ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    def metric(row: str, key: str) -> float | None:
        v = rows.get(row, {}).get("metrics", {}).get(key)
        return None if v is None else float(v)

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    relay = metric("sustained/1-worker", "events_per_s")
    return {
        "relay_over_naive": div(relay, metric("baseline/naive", "events_per_s")),
        "relay_over_ceiling": div(relay, metric("baseline/ceiling", "events_per_s")),
        "claim_history_over_empty": div(
            metric("growth/1M-history", "claim_ms_p50"), metric("growth/empty", "claim_ms_p50")
        ),
        "claim_10m_history_over_empty": div(
            metric("growth/10M-history", "claim_ms_p50"), metric("growth/empty", "claim_ms_p50")
        ),
        "together_over_alone": div(
            metric("backlog-drain/2-workers-together", "events_per_s"),
            metric("backlog-drain/1-worker", "events_per_s"),
        ),
    }


def build_report(
    rows: Sequence[Row],
    *,
    machine: Mapping[str, Any],
    config: Mapping[str, Any],
    created_at: str,
) -> dict[str, Any]:
    """The whole JSON report (see the module docstring)."""
    by_name = {r.name: r.to_json() for r in rows}
    rat = ratios(by_name)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_at": created_at,
        "machine": dict(machine),
        "config": dict(config),
        "rows": list(by_name.values()),
        "ratios": rat,
        "targets": [t.evaluate(by_name, rat) for t in TARGETS],
        "seed_reference": [dict(r) for r in SEED_REFERENCE],
        "ok": all(r["checks"]["ok"] for r in by_name.values()),
    }


def validate_report(report: Mapping[str, Any]) -> list[str]:
    """Problems with ``report``'s shape (empty when it follows schema version 1)."""
    problems: list[str] = []

    def need(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
            return None
        return obj[key]

    if report.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}")
    if report.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SCHEMA_VERSION}")
    need(report, "created_at", str, "report")
    need(report, "machine", dict, "report")
    need(report, "config", dict, "report")
    need(report, "ok", bool, "report")
    for i, row in enumerate(need(report, "rows", list, "report") or []):
        where = f"rows[{i}]"
        need(row, "name", str, where)
        scenario = need(row, "scenario", str, where)
        if scenario is not None and scenario not in SCENARIOS:
            problems.append(f"{where}.scenario: unknown {scenario!r}")
        for key, value in (need(row, "metrics", dict, where) or {}).items():
            if value is not None and not isinstance(value, int | float):
                problems.append(f"{where}.metrics.{key}: not a number")
        for j, run in enumerate(need(row, "runs", list, where) or []):
            if not isinstance(run, dict):
                problems.append(f"{where}.runs[{j}]: not an object")
        checks = need(row, "checks", dict, where) or {}
        for key in (*CHECK_KEYS, "verified_runs"):
            need(checks, key, int, f"{where}.checks")
        need(checks, "ok", bool, f"{where}.checks")
    rat = need(report, "ratios", dict, "report") or {}
    for key in ("relay_over_naive", "relay_over_ceiling", "claim_history_over_empty"):
        if key not in rat:
            problems.append(f"ratios: missing {key!r}")
    for i, t in enumerate(need(report, "targets", list, "report") or []):
        for key, types in (("name", str), ("target", str)):
            need(t, key, types, f"targets[{i}]")
        if "met" not in t or t["met"] not in (True, False, None):
            problems.append(f"targets[{i}].met: expected true, false or null")
    need(report, "seed_reference", list, "report")
    return problems


# --- the human table ------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{v:,.0f}" if isinstance(v, int | float) else str(v)


def render_table(report: Mapping[str, Any]) -> str:
    """The report as text: one section per scenario family, the seed's figures beside ours."""
    rows = {r["name"]: r for r in report["rows"]}
    out: list[str] = []
    repeat = report.get("config", {}).get("repeat", "?")
    clock = report.get("machine", {}).get("latency_clock") or "producer's clock"
    out.append(f"medians of {repeat} run(s); commit->ack: commit ({clock}) -> message stored in the stream")
    seed = [r for r in report["rows"] if r["scenario"] == "seed"]
    if seed:
        ref = {int(r["events"]): r for r in report["seed_reference"]}
        out.append("")
        out.append(f"{'seed pressure levels: ours':<83} | the seed's NATS figures")
        out.append(
            f"{'events':>8} {'aggs':>5} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'order viol':>10} "
            f"{'success':>8} {'tasks left':>10} | {'msg/s':>8} {'send ms':>8}"
        )
        for r in seed:
            m = r["metrics"]
            events = int(m.get("events") or 0)
            sr = ref.get(int(m.get("level") or events), {})
            out.append(
                f"{events:>8,} {_fmt(m.get('aggregates')):>5} {_fmt(m.get('events_per_s')):>10} "
                f"{_fmt(m.get('p50_ms'), 1):>8} {_fmt(m.get('p99_ms'), 1):>8} "
                f"{r['checks']['order_violations']:>10} {_pct(m.get('success_rate')):>8} "
                f"{_fmt(m.get('tasks_left')):>10} | {_fmt(sr.get('msg_per_s'), 2):>8} "
                f"{_fmt(sr.get('send_latency_ms'), 3):>8}"
            )
    thr = [r for r in report["rows"] if r["scenario"] in ("sustained", "baselines", "hot")]
    if thr:
        out.append("")
        out.append(
            f"{'throughput':<22} {'events':>9} {'events/s':>10} {'CPU s/1k ev':>12} {'peak RSS MB':>12} "
            f"{'NATS s/1k':>10} {'PG s/1k':>8} {'host %':>7} {'ok':>4}"
        )
        for r in thr:
            m = r["metrics"]
            out.append(
                f"{r['name']:<22} {_fmt(m.get('events')):>9} {_fmt(m.get('events_per_s')):>10} "
                f"{_fmt(m.get('cpu_s_per_1k'), 4):>12} {_fmt(m.get('peak_rss_mb'), 1):>12} "
                f"{_fmt(m.get('nats_cpu_s_per_1k'), 4):>10} {_fmt(m.get('postgres_cpu_s_per_1k'), 4):>8} "
                f"{_fmt(m.get('host_busy_percent'), 1):>7} {'yes' if r['checks']['ok'] else 'NO':>4}"
            )
    lat = [r for r in report["rows"] if r["scenario"] == "latency"]
    if lat:
        out.append("")
        out.append(f"{'latency':<22} {'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU %':>7}")
        for r in lat:
            m = r["metrics"]
            out.append(
                f"{r['name']:<22} {_fmt(m.get('offered_per_s')):>10} {_fmt(m.get('events_per_s')):>10} "
                f"{_fmt(m.get('p50_ms'), 1):>8} {_fmt(m.get('p99_ms'), 1):>8} {_fmt(m.get('cpu_percent'), 2):>7}"
            )
    out.extend(_commit_rate_table(report["rows"]))
    out.extend(_scale_up_table(report["rows"]))
    out.extend(_replicated_table(report["rows"]))
    growth = [r for r in report["rows"] if r["scenario"] == "growth"]
    if growth:
        out.append("")
        out.append(f"{'claim per batch':<22} {'history':>10} {'batch':>6} {'p50 ms':>8} {'p99 ms':>8}")
        for r in growth:
            m = r["metrics"]
            out.append(
                f"{r['name']:<22} {_fmt(m.get('history_rows')):>10} {_fmt(m.get('batch')):>6} "
                f"{_fmt(m.get('claim_ms_p50'), 2):>8} {_fmt(m.get('claim_ms_p99'), 2):>8}"
            )
    out.append("")
    rat = report["ratios"]
    out.append(
        "ratios: relay/naive "
        + _fmt(rat.get("relay_over_naive"), 2)
        + ", relay/ceiling "
        + _fmt(rat.get("relay_over_ceiling"), 2)
        + ", claim 1M-history/empty "
        + _fmt(rat.get("claim_history_over_empty"), 2)
        + ", 10M-history/empty "
        + _fmt(rat.get("claim_10m_history_over_empty"), 2)
        + ", drain 2 together/1 "
        + _fmt(rat.get("together_over_alone"), 2)
    )
    out.append("")
    out.append("targets")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "not run"}[t["met"]]
        if t.get("note"):
            mark = f"not measured: {t['note']}"
        value = "-" if t["value"] is None else f"{t['value']:,.2f}"
        out.append(f"  {t['name']:<42} {t['target']:>10}  {value:>12}  {mark}")
    bad = [r["name"] for r in rows.values() if not r["checks"]["ok"]]
    out.append("")
    out.append(
        "verification: " + ("0 lost, 0 duplicates, 0 order violations in every run" if not bad else f"FAILED in {bad}")
    )
    return "\n".join(out)


def _commit_rate_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One event per transaction: the worker's cost per commit, and the servers' beside it."""
    mine = [r for r in rows if r["scenario"] == "commit-rate"]
    if not mine:
        return []
    out = [
        "",
        f"{'commit rate':<24} {'achieved/s':>10} {'worker cores':>12} {'us/event':>9} "
        f"{'PG cores':>9} {'NATS cores':>10} {'p50 ms':>7} {'p99 ms':>7}",
    ]
    for r in mine:
        m = r["metrics"]
        out.append(
            f"{r['name']:<24} {_fmt(m.get('events_per_s')):>10} {_fmt(m.get('worker_cores'), 3):>12} "
            f"{_fmt(m.get('cpu_us_per_event'), 1):>9} {_fmt(m.get('postgres_cores'), 3):>9} "
            f"{_fmt(m.get('nats_cores'), 3):>10} {_fmt(m.get('p50_ms'), 1):>7} {_fmt(m.get('p99_ms'), 1):>7}"
        )
    return out


def _scale_up_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Workers joining a backlog: the longest time a partition had no owner, events/s per phase."""
    mine = [r for r in rows if r["scenario"] == "scale-up"]
    if not mine:
        return []
    out = [
        "",
        f"{'scale-up':<34} {'events/s':>9} {'1 worker':>9} {'2 workers':>9} {'3 workers':>9} {'max unowned ms':>14}",
    ]
    for r in mine:
        m = r["metrics"]
        out.append(
            f"{r['name']:<34} {_fmt(m.get('events_per_s')):>9} {_fmt(m.get('phase1_events_per_s')):>9} "
            f"{_fmt(m.get('phase2_events_per_s')):>9} {_fmt(m.get('phase3_events_per_s')):>9} "
            f"{_fmt(m.get('max_unowned_ms'), 1):>14}"
        )
    return out


def _replicated_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The drain on a replicated stream, beside the same drain on the single server (``sustained``,
    when it ran): events/s and CPU seconds per 1,000 events of the workers, PostgreSQL, all
    nats-servers together and each member (``nats_n1_cpu_s_per_1k``, ... in member order)."""
    mine = [r for r in rows if r["scenario"] == "replicated"]
    if not mine:
        return []
    single = {r["name"].split("/", 1)[1]: r for r in rows if r["scenario"] == "sustained"}
    out = [
        "",
        f"{'replicated stream':<22} {'replicas':>8} {'events/s':>10} {'1 server':>10} {'CPU s/1k ev':>12} "
        f"{'PG s/1k':>8} {'NATS s/1k':>10} {'each NATS s/1k':>26} {'ok':>4}",
    ]
    for r in mine:
        m = r["metrics"]
        members = sorted(
            k for k in m if k.startswith("nats_") and k.endswith("_cpu_s_per_1k") and k != "nats_cpu_s_per_1k"
        )
        each = " / ".join(_fmt(m[k], 4) for k in members) or "-"
        reference = single.get(r["name"].split("/", 1)[1], {}).get("metrics", {})
        out.append(
            f"{r['name']:<22} {_fmt(m.get('stream_replicas')):>8} {_fmt(m.get('events_per_s')):>10} "
            f"{_fmt(reference.get('events_per_s')):>10} {_fmt(m.get('cpu_s_per_1k'), 4):>12} "
            f"{_fmt(m.get('postgres_cpu_s_per_1k'), 4):>8} {_fmt(m.get('nats_cpu_s_per_1k'), 4):>10} "
            f"{each:>26} {'yes' if r['checks']['ok'] else 'NO':>4}"
        )
    return out


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"
