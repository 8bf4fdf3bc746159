"""A tiny run of ``outboxctl bench`` (every scenario at 1% scale, one repeat) to keep the command
working: the JSON report follows the documented schema and every run verified 0 lost, 0 duplicates
and 0 order violations. Speed is reported by the command, never asserted here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from outbox_devkit.benchstats import SCENARIOS, validate_report

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]


async def test_bench_smoke_verifies_every_scenario(pg_dsn: str, nats_url: str, tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "outbox_cli", "bench", "--scale", "0.01", "--repeat", "1", "--quiet"]
    argv += ["--json", str(report_path), "--database-url", pg_dsn, "--nats-url", nats_url]
    checkpoints = "SELECT num_requested FROM pg_stat_checkpointer"
    conn = await asyncpg.connect(pg_dsn)
    try:
        before = await conn.fetchval(checkpoints)
        proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=540)
        requested = await conn.fetchval(checkpoints) - before
    finally:
        await conn.close()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"

    report = json.loads(report_path.read_text())
    assert validate_report(report) == []
    assert report["ok"] is True
    # Each run starts after a CHECKPOINT of its own (the tests' PostgreSQL user is a superuser).
    assert report["machine"]["checkpoint_before_each_run"] is True
    assert requested >= 10, requested
    assert {row["scenario"] for row in report["rows"]} == set(SCENARIOS)
    names = {row["name"] for row in report["rows"]}
    assert {"sustained/1-worker", "sustained/2-workers", "baseline/naive", "baseline/ceiling"} <= names
    assert {"latency/1000-per-s", "latency/5000-per-s", "idle/1-worker", "hot-aggregate"} <= names
    assert {f"seed/{n}" for n in (500, 2000, 5000, 10000)} <= names
    verified = [r for r in report["rows"] if r["scenario"] not in ("growth",) and r["name"] != "idle/1-worker"]
    for row in verified:
        checks = row["checks"]
        assert checks["verified_runs"] == 1, row["name"]
        assert (checks["lost"], checks["duplicates"], checks["order_violations"]) == (0, 0, 0), row
        assert (checks["unexpected"], checks["pending"]) == (0, 0), row
        assert row["metrics"]["events_per_s"] > 0, row["name"]
    for row in report["rows"]:
        if "tasks_left" in row["metrics"]:
            assert row["metrics"]["tasks_left"] == 0, row["name"]
    for name in ("sustained/1-worker", "sustained/2-workers"):  # what each drain made PostgreSQL log
        metrics = next(r["metrics"] for r in report["rows"] if r["name"] == name)
        assert metrics["postgres_wal_mb"] > 0, metrics  # deleting the drained rows is logged
    for row in (r for r in report["rows"] if r["scenario"] == "growth"):
        assert row["metrics"]["claim_ms_p50"] > 0
    # The human table went to stdout, with the seed's figures beside ours.
    assert "325.42" in proc.stdout
    assert "targets" in proc.stdout


def test_report_schema_rejects_a_broken_report() -> None:
    assert validate_report({"schema": "other"})  # problems listed, not an exception
