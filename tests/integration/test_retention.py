"""With ``mark_mode=mark`` published rows are kept ``retention_seconds`` and then swept; the sweep
keeps up with the rate rows are published (the CRD's spec.publishing.retentionSeconds)."""

from __future__ import annotations

import asyncpg

from outbox_worker.adapters.store import OutboxStore, connect_pool, migrate
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")


async def _rows(pool: asyncpg.Pool, count: int, published: str | None) -> None:
    """``count`` rows published at ``published`` (SQL), or pending when None."""
    await pool.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, published_at) "
        f"SELECT 'o', g::text, 'e', 'x', {published or 'NULL'} FROM generate_series(1, $1::int) g",
        count,
    )


async def test_a_sweep_deletes_every_row_past_the_retention_statement_after_statement(pg_dsn: str) -> None:
    """One statement of at most ``limit`` rows a minute kept at most ~166 rows/s per worker: above
    that, published rows piled up past the retention for good. A sweep now goes on while a
    statement takes its whole limit; rows within the retention and pending rows stay."""
    pool = await connect_pool(pg_dsn, size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
        await _rows(pool, 2_500, "now() - interval '2 hours'")
        await _rows(pool, 100, "now()")
        await _rows(pool, 50, None)
        store = OutboxStore(pool, SQL, "p", "w")
        assert await store.retention_sweep(3600, limit=1_000) == 2_500  # three statements
        left = await pool.fetchrow(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FILTER (WHERE published_at IS NULL) "
            "FROM outbox"
        )
        assert tuple(left) == (100, 50)
        # bounded: past its budget a sweep stops after the statement it runs, the rest waits a minute
        await _rows(pool, 2_500, "now() - interval '2 hours'")
        assert await store.retention_sweep(3600, limit=1_000, budget_seconds=0) == 1_000
        assert await store.retention_sweep(3600, limit=1_000) == 1_500
    finally:
        await pool.close()
