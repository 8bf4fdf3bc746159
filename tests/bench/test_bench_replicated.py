"""A tiny run of the ``replicated`` bench scenario (1% scale, one repeat): the sustained drain on the
dev kit's 3-node nats-server cluster, the stream on all three. Every run verified 0 lost,
0 duplicates and 0 order violations, the figures it reports are present, and the cluster is gone
when the command ends, also when a run fails. Speed is reported by the command, never asserted here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from outbox_devkit.bench import BenchOptions, run_bench
from outbox_devkit.benchstats import validate_report
from outbox_devkit.demo import DemoError

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]

MEMBERS = ("n1", "n2", "n3")


async def test_replicated_scenario_drains_onto_a_three_replica_stream_verified(
    pg_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    report_path = tmp_path / "bench.json"
    # --nats-url names the tests' single server: the scenario runs on its own cluster regardless.
    proc = await _bench(["--json", str(report_path), "--database-url", pg_dsn, "--nats-url", nats_url])
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert _bench_cluster_members() == []

    report = json.loads(report_path.read_text())
    assert validate_report(report) == []
    assert report["ok"] is True
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"replicated/1-worker", "replicated/2-workers"}
    for name, row in rows.items():
        checks = row["checks"]
        assert checks["verified_runs"] == 1, name
        assert (checks["lost"], checks["duplicates"], checks["order_violations"]) == (0, 0, 0), row
        assert (checks["unexpected"], checks["pending"]) == (0, 0), row
        m = row["metrics"]
        assert m["events"] == 2_000, m  # 1% of the sustained drain's 200,000
        assert m["events_per_s"] > 0, m
        assert m["stream_replicas"] == 3, m  # the stream the workers created is on every member
        assert m["tasks_left"] == 0, m
        assert m["cpu_s_per_1k"] > 0, m
        members = [m[f"nats_{member}_cpu_s_per_1k"] for member in MEMBERS]
        assert m["nats_cpu_s_per_1k"] == pytest.approx(sum(members), abs=1e-3), m
        assert m["nats_cpu_s_per_1k"] > 0, m
        # The servers' CPU is reported only for servers the bench started: not the tests' PostgreSQL.
        assert "postgres_cpu_s_per_1k" not in m, m
    assert "replicated stream" in proc.stdout


async def test_replicated_scenario_stops_its_cluster_when_a_run_fails(pg_dsn: str, nats_url: str) -> None:
    """Workers that refuse their settings end the run with an error, and the cluster is stopped then,
    not only by the dev kit's exit-time safety net: this runs in the test's own process, which does
    not exit in between."""
    options = BenchOptions(
        scenarios=("replicated",),
        repeat=1,
        scale=0.01,
        database_url=pg_dsn,
        nats_url=nats_url,
        worker_env={"OUTBOX_BATCH_SIZE": "0"},
    )
    with pytest.raises(DemoError, match="worker 0 exited 1 while starting"):
        await run_bench(options)
    assert _bench_cluster_members() == []


async def _bench(args: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "outbox_cli", "bench", "--scenario", "replicated"]
    argv += ["--scale", "0.01", "--repeat", "1", "--quiet", *args]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=240)


def _bench_cluster_members() -> list[str]:
    """Command lines of live nats-servers of a bench's cluster (config under
    ``outbox-bench-*/nats-cluster/``): any left would have outlived the bench that started them."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if "nats-server" in text and "outbox-bench-" in text and "/nats-cluster/" in text:
            found.append(text)
    return found
