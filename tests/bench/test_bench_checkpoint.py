"""The bench takes a CHECKPOINT before each run so that no run pays for one the others do not; a
user whose own PostgreSQL refuses them still gets a complete report, and is told."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]


async def test_a_user_without_checkpoint_rights_is_told_once_and_the_bench_completes(
    pg_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    role = f"plain_{secrets.token_hex(4)}"
    database = pg_dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
        report_path = tmp_path / "bench.json"
        argv = [sys.executable, "-m", "outbox_cli", "bench", "--scenario", "hot,sustained", "--scale", "0.005"]
        argv += ["--repeat", "1", "--json", str(report_path), "--nats-url", nats_url]
        argv += ["--database-url", pg_dsn.replace("//postgres@", f"//{role}@", 1)]
        proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
        assert proc.stderr.count("no CHECKPOINT privilege") == 1, proc.stderr[-4000:]
        report = json.loads(report_path.read_text())
        assert report["ok"] is True
        assert report["machine"]["checkpoint_before_each_run"] is False
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
