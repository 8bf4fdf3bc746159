"""The bench's pure numbers: percentiles, medians of repeats, ratios, targets, schema, table."""

from __future__ import annotations

from typing import Any

import pytest

from outbox_devkit.benchstats import (
    SEED_REFERENCE,
    Row,
    build_report,
    median,
    percentile,
    poll_pause,
    render_table,
    seed_aggregates,
    validate_report,
)
from outbox_devkit.demo import latency_percentiles_ms


def test_poll_pause_asks_rarely_while_much_is_left_and_often_near_the_end() -> None:
    assert poll_pause(200_000, 0.0) == 0.2  # nothing arrived yet: no rate to go by
    assert poll_pause(150_000, 80_000.0) == 0.2  # ~1.9 s to go: at most the longest pause
    assert poll_pause(8_000, 80_000.0) == pytest.approx(0.05)  # half of the ~0.1 s left
    assert poll_pause(100, 80_000.0) == 0.02  # never shorter than the shortest pause
    assert poll_pause(10, 1.0, shortest=0.5, longest=3.0) == 3.0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_demo_and_bench_report_the_same_nearest_rank_percentiles() -> None:
    """One formula: the demo's commit->stored p50/p99 are the bench's nearest-rank percentiles
    (the demo's own formula used to read one rank too high: 51 and 100 ms here)."""
    latencies = [v / 1000 for v in range(1, 101)]  # 1 ms .. 100 ms
    assert latency_percentiles_ms(latencies) == (50.0, 99.0)
    assert latency_percentiles_ms([]) == (0.0, 0.0)


def test_median_ignores_missing_values() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, None, 2.0, 3.0]) == 2.5
    assert median([None]) is None


@pytest.mark.parametrize(("events", "aggregates"), [(500, 50), (2000, 200), (5000, 500), (10000, 1000), (50000, 1000)])
def test_seed_aggregates_are_n_over_10_clamped(events: int, aggregates: int) -> None:
    assert seed_aggregates(events) == aggregates


def _report() -> dict[str, Any]:
    sustained = Row("sustained/1-worker", "sustained")
    for eps in (60_000.0, 62_000.0, 59_000.0):
        sustained.runs.append({"events_per_s": eps, "cpu_s_per_1k": 0.015})
        sustained.checks.append({"lost": 0, "duplicates": 0, "order_violations": 0, "unexpected": 0, "pending": 0})
    naive = Row("baseline/naive", "baselines", runs=[{"events_per_s": 3_000.0}])
    naive.checks.append({"lost": 0, "duplicates": 0, "order_violations": 0, "unexpected": 0, "pending": 0})
    seed = Row("seed/500", "seed", runs=[{"events": 500.0, "level": 500.0, "events_per_s": 900.0, "p50_ms": 4.0}])
    seed.checks.append({"lost": 0, "duplicates": 0, "order_violations": 1, "unexpected": 0, "pending": 0})
    growth = [
        Row("growth/empty", "growth", runs=[{"claim_ms_p50": 2.0}]),
        Row("growth/1M-history", "growth", runs=[{"claim_ms_p50": 2.5}]),
    ]
    return build_report([seed, sustained, naive, *growth], machine={"cpus": 2}, config={"repeat": 3}, created_at="t")


def test_report_medians_ratios_targets_and_checks() -> None:
    report = _report()
    assert validate_report(report) == []
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["sustained/1-worker"]["metrics"]["events_per_s"] == 60_000.0
    assert report["ratios"] == {
        "relay_over_naive": 20.0,
        "relay_over_ceiling": None,
        "claim_history_over_empty": 1.25,
        "claim_10m_history_over_empty": None,  # growth ran without --growth-10m
        "together_over_alone": None,  # scale-up did not run
    }
    targets = {t["name"]: t for t in report["targets"]}
    assert targets["events/s, one worker process"]["met"] is True
    assert targets["relay/ceiling (one worker process)"]["met"] is None  # not run
    assert targets["claim time 1M history / empty"]["met"] is True
    # One order violation anywhere fails the report.
    assert rows["seed/500"]["checks"]["ok"] is False
    assert report["ok"] is False
    assert len(report["seed_reference"]) == len(SEED_REFERENCE)


def test_report_keeps_cpu_per_event_to_a_tenth_of_a_microsecond() -> None:
    # CPU s per 1,000 events is ~0.015: three decimals would hide a 0.4 µs/event change.
    row = Row("sustained/1-worker", "sustained", runs=[{"events_per_s": 48945.07312, "cpu_s_per_1k": 0.0153849}])
    row.checks.append({"lost": 0, "duplicates": 0, "order_violations": 0, "unexpected": 0, "pending": 0})
    report = build_report([row], machine={}, config={}, created_at="t")
    assert report["rows"][0]["metrics"] == {"events_per_s": 48945.073, "cpu_s_per_1k": 0.01538}
    assert "0.0154" in render_table(report)


def test_table_puts_the_seed_figures_beside_ours() -> None:
    text = render_table(_report())
    seed_line = next(line for line in text.splitlines() if line.strip().startswith("500"))
    assert "33.21" in seed_line
    assert "1.570" in seed_line
    assert "FAILED in ['seed/500']" in text


def test_validate_report_names_the_problems() -> None:
    report = _report()
    report["rows"][0]["metrics"]["p50_ms"] = "fast"
    del report["ratios"]
    problems = validate_report(report)
    assert any("p50_ms" in p for p in problems)
    assert any("ratios" in p for p in problems)


def _row(name: str, scenario: str, metrics: dict[str, float]) -> Row:
    row = Row(name, scenario, runs=[metrics])
    row.checks.append({"lost": 0, "duplicates": 0, "order_violations": 0, "unexpected": 0, "pending": 0})
    return row


def test_commit_rate_and_scale_up_rows_feed_their_ratio_targets_and_tables() -> None:
    rows = [
        _row("commit-rate/1000-per-s", "commit-rate", {"events_per_s": 1000, "worker_cores": 0.2, "p99_ms": 8.0}),
        _row("scale-up/1-2-3-workers", "scale-up", {"events_per_s": 70_000, "max_unowned_ms": 40.0}),
        _row("backlog-drain/1-worker", "scale-up", {"events_per_s": 60_000}),
        _row("backlog-drain/2-workers-together", "scale-up", {"events_per_s": 66_000}),
    ]
    report = build_report(rows, machine={}, config={}, created_at="t")
    assert validate_report(report) == []
    assert report["ratios"]["together_over_alone"] == 1.1
    targets = {t["name"]: t["met"] for t in report["targets"]}
    assert targets["worker cores at 1000 commits/s"] is False  # 0.2 > 0.08
    assert targets["p99 commit->ack at 1000 commits/s (ms)"] is True
    assert targets["worker cores at 5000 commits/s"] is None  # not run
    # a rate the producers did not reach is not a target met: 1,300 commits/s of 5,000 offered
    rows.append(_row("commit-rate/5000-per-s", "commit-rate", {"events_per_s": 1300, "worker_cores": 0.2}))
    report = build_report(rows, machine={}, config={}, created_at="t")
    assert validate_report(report) == []
    (at_5000,) = [t for t in report["targets"] if t["name"] == "worker cores at 5000 commits/s"]
    assert (at_5000["met"], at_5000["value"], at_5000["note"]) == (None, 0.2, "offered 5,000/s, reached 1,300/s")
    assert "not measured: offered 5,000/s, reached 1,300/s" in render_table(report)
    assert targets["longest unowned partition, scale-up (ms)"] is True
    assert targets["2 workers started together / 1 (drain)"] is True
    table = render_table(report)
    assert "commit-rate/1000-per-s" in table
    assert "max unowned ms" in table


def test_replicated_rows_are_valid_and_shown_beside_the_single_server_drain() -> None:
    replicated = {
        "events_per_s": 40_000,
        "stream_replicas": 3,
        "cpu_s_per_1k": 0.009,
        "postgres_cpu_s_per_1k": 0.0045,
        "nats_n1_cpu_s_per_1k": 0.0211,
        "nats_n2_cpu_s_per_1k": 0.0072,
        "nats_n3_cpu_s_per_1k": 0.0073,
        "nats_cpu_s_per_1k": 0.0356,
    }
    rows = [
        _row("sustained/1-worker", "sustained", {"events_per_s": 81_593, "nats_cpu_s_per_1k": 0.0084}),
        _row("replicated/1-worker", "replicated", replicated),
    ]
    report = build_report(rows, machine={}, config={}, created_at="t")
    assert validate_report(report) == []
    line = next(line for line in render_table(report).splitlines() if line.startswith("replicated/1-worker"))
    # replicas, events/s, the single server's events/s, workers', PostgreSQL's and all members' CPU s/1k
    assert line.split()[1:7] == ["3", "40,000", "81,593", "0.0090", "0.0045", "0.0356"]
    assert line.endswith("0.0211 / 0.0072 / 0.0073  yes")  # each member, in member order
