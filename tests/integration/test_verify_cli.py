"""``outboxctl verify`` against real servers: what each failure exits with (README: 1 a violation, 2 a
bad flag, 3 configuration, 4 unreachable) and that its one line names the problem, never a secret."""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import nats
import pytest

from outbox_cli.main import EXIT_USAGE
from outbox_worker.adapters.history_io import ledger_ddl
from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")
STREAM = "VERIFY"


async def verify_cli(*args: str, timeout: float = 90) -> tuple[int, str, str, float]:
    """Run ``outboxctl verify``; (exit code, stdout, stderr, seconds it took)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_cli",
        "verify",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


async def prepare(dsn: str, nats_url: str | None = None) -> None:
    """The outbox tables and the ledger; the stream too when ``nats_url`` is given."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute(ledger_ddl(SQL))
    finally:
        await conn.close()
    if nats_url:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().add_stream(name=STREAM, subjects=["verify.>"])
        finally:
            await nc.close()


@pytest.mark.parametrize("value", ["nan", "inf"])
async def test_a_timeout_that_is_no_finite_number_is_a_bad_flag(pg_dsn: str, nats_url: str, value: str) -> None:
    """``nan`` passed the ``<= 0`` check and then timed out at once (exit 4, "not reachable")."""
    await prepare(pg_dsn, nats_url)
    code, _, err, _ = await verify_cli(
        "--database-url", pg_dsn, "--nats-url", nats_url, "--stream", STREAM, "--timeout", value
    )
    assert code == EXIT_USAGE, err
    assert "--timeout" in err
    assert len(err.strip().splitlines()) == 1, err
