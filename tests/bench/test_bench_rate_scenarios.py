"""A tiny run of the ``commit-rate`` and ``scale-up`` bench scenarios (1% scale, one repeat): every
run verified 0 lost, 0 duplicates and 0 order violations, and the figures each scenario reports are
present. Speed is reported by the command, never asserted here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from outbox_devkit.benchstats import validate_report

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]


async def _bench(
    args: list[str], pg_dsn: str, nats_url: str, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``outboxctl bench ARGS`` at 1% on the tests' servers; asserts it exited 0 and that its JSON
    report is valid, and returns both."""
    report_path = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "outbox_cli", "bench", *args]
    argv += ["--scale", "0.01", "--repeat", "1", "--quiet", "--json", str(report_path)]
    argv += ["--database-url", pg_dsn, "--nats-url", nats_url]
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert validate_report(report) == []
    return proc, report


async def test_commit_rate_and_scale_up_scenarios_verify_and_report_their_figures(
    pg_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    proc, report = await _bench(["--scenario", "commit-rate,scale-up"], pg_dsn, nats_url, tmp_path)
    assert report["ok"] is True
    rows = {row["name"]: row for row in report["rows"]}
    expected = {f"commit-rate/{rate}-per-s" for rate in (500, 1000, 5000)}
    expected |= {"scale-up/1-2-3-workers", "backlog-drain/1-worker", "backlog-drain/2-workers-together"}
    assert set(rows) == expected
    for name, row in rows.items():
        checks = row["checks"]
        assert checks["verified_runs"] == 1, name
        assert (checks["lost"], checks["duplicates"], checks["order_violations"]) == (0, 0, 0), row
        assert (checks["unexpected"], checks["pending"]) == (0, 0), row
        assert row["metrics"]["events_per_s"] > 0, name
        assert row["metrics"]["tasks_left"] == 0, name
    for rate in (500, 1000, 5000):
        m = rows[f"commit-rate/{rate}-per-s"]["metrics"]
        assert m["worker_cores"] > 0, m
        assert m["cpu_us_per_event"] > 0, m
        assert 0 <= m["p50_ms"] <= m["p99_ms"], m  # commit timestamps vs stored times: may round to 0
        assert m["offered_per_s"] == rate
        # The servers' CPU is reported only for servers the bench started (here the tests' own).
        assert "postgres_cores" not in m, m
        assert "nats_cores" not in m, m
    scale_up = rows["scale-up/1-2-3-workers"]["metrics"]
    for key in ("phase1_events_per_s", "phase2_events_per_s", "phase3_events_per_s", "max_unowned_ms"):
        assert key in scale_up, (key, scale_up)
    assert scale_up["lease_samples"] > 0
    assert report["ratios"]["together_over_alone"] is not None
    assert "commit rate" in proc.stdout
    assert "scale-up" in proc.stdout


async def test_commit_rate_runs_the_rates_it_is_given(pg_dsn: str, nats_url: str, tmp_path: Path) -> None:
    """``--commit-rates`` (sizing a worker at your own rates): one row per rate given, each offered
    that rate and verified; the report records the rates; the targets stated at rates not run are
    not judged."""
    proc, report = await _bench(["--scenario", "commit-rate", "--commit-rates", "250,150"], pg_dsn, nats_url, tmp_path)
    assert report["ok"] is True
    assert report["config"]["commit_rates"] == [150, 250]
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["commit-rate/150-per-s", "commit-rate/250-per-s"]
    for rate in (150, 250):
        row = rows[f"commit-rate/{rate}-per-s"]
        assert row["checks"]["verified_runs"] == 1
        assert (row["checks"]["lost"], row["checks"]["duplicates"], row["checks"]["order_violations"]) == (0, 0, 0)
        assert row["metrics"]["offered_per_s"] == rate
        assert row["metrics"]["worker_cores"] > 0
    judged = {t["name"]: t["met"] for t in report["targets"]}
    assert judged["worker cores at 1000 commits/s"] is None
    assert judged["worker cores at 5000 commits/s"] is None
    assert "commit-rate/150-per-s" in proc.stdout


async def test_growth_with_10m_rows_of_history_runs_behind_its_flag(pg_dsn: str, nats_url: str, tmp_path: Path) -> None:
    """``--growth-10m`` adds a growth row with 10,000,000 published rows (here 1%: 100,000) beside the
    1M one, and the ratio of its claim time to the empty table's."""
    proc, report = await _bench(["--scenario", "growth", "--growth-10m"], pg_dsn, nats_url, tmp_path)
    rows = {row["name"]: row["metrics"] for row in report["rows"]}
    assert set(rows) == {"growth/empty", "growth/1M-history", "growth/10M-history"}
    assert rows["growth/10M-history"]["history_rows"] == 100_000
    assert rows["growth/1M-history"]["history_rows"] == 10_000
    for name, m in rows.items():
        assert m["claim_ms_p50"] > 0, name
    assert report["ratios"]["claim_10m_history_over_empty"] is not None
    assert "10M-history/empty" in proc.stdout
