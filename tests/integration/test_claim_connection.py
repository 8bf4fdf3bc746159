"""The connection a worker's store keeps for its claims (``keep_claim_connection``): one of the pool's,
given back on close, replaced when PostgreSQL closed it, never a claim more than the pool allows."""

from __future__ import annotations

import asyncio

import asyncpg

from outbox_worker.adapters.store import OutboxStore, connect_pool, migrate
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")
POOL_SIZE = 2


async def _seeded_pool(dsn: str, rows: int = 40) -> asyncpg.Pool:
    """The worker's own pool (:func:`connect_pool`) over an outbox of 4 partitions with ``rows``
    pending rows spread over them."""
    pool = await connect_pool(dsn, size=POOL_SIZE)
    async with pool.acquire() as conn:
        await migrate(conn, SQL, 4)
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'o', g::text, 'e', 'x' FROM generate_series(1, $1::int) g",
            rows,
        )
    return pool


async def test_claims_share_one_kept_connection_and_close_gives_it_back(pg_dsn: str) -> None:
    """After a claim the pool has one connection fewer to lend (the kept one); claims made at once
    still all run (the one that finds it busy goes through the pool); after ``close`` the pool has
    every connection back and closes without waiting."""
    pool = await _seeded_pool(pg_dsn)
    store = OutboxStore(pool, SQL, "p", "w", keep_claim_connection=True)
    try:
        first = await store.claim([0, 1, 2, 3], 100, True)
        assert len(first.rows) == 40
        assert pool.get_idle_size() == pool.get_size() - 1  # the kept connection is out
        together = await asyncio.gather(*(store.claim([p], 100, True) for p in (0, 1, 2, 3)))
        assert sum(len(c.rows) for c in together) == 40
        assert pool.get_size() <= POOL_SIZE
        await store.close()
        assert pool.get_idle_size() == pool.get_size()
        assert len((await store.claim([0, 1, 2, 3], 100, True)).rows) == 40  # through the pool now
        assert pool.get_idle_size() == pool.get_size()
    finally:
        await store.close()
        await asyncio.wait_for(pool.close(), 5)


async def test_a_kept_connection_postgresql_closed_is_replaced_before_the_next_claim(pg_dsn: str) -> None:
    """A restart or failover of PostgreSQL ends every session: the next claim runs on a new
    connection instead of failing on the closed one."""
    pool = await _seeded_pool(pg_dsn)
    store = OutboxStore(pool, SQL, "p", "w", keep_claim_connection=True)
    admin = await asyncpg.connect(pg_dsn)
    try:
        await store.claim([0, 1, 2, 3], 100, True)
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'outbox-relay' AND pid <> pg_backend_pid()"
        )
        assert ended >= 1  # the kept connection at least
        await asyncio.sleep(0.5)  # the client reads the server's goodbye
        assert len((await store.claim([0, 1, 2, 3], 100, True)).rows) == 40
        assert pool.get_idle_size() == pool.get_size() - 1
    finally:
        await admin.close()
        await store.close()
        await asyncio.wait_for(pool.close(), 5)


async def test_a_failed_claim_gives_the_kept_connection_back_and_raises(pg_dsn: str) -> None:
    """A claim whose statement fails raises its error; the connection goes back to the pool (no
    connection is leaked), and the next claim takes one again."""
    pool = await _seeded_pool(pg_dsn)
    store = OutboxStore(pool, SQL, "p", "w", keep_claim_connection=True)
    try:
        await store.claim([0, 1, 2, 3], 100, True)
        await pool.execute("ALTER TABLE outbox RENAME TO outbox_away")
        try:
            await store.claim([0, 1, 2, 3], 100, True)
        except asyncpg.UndefinedTableError:
            pass
        else:
            raise AssertionError("a claim of a missing table succeeded")
        assert pool.get_idle_size() == pool.get_size()  # given back
        await pool.execute("ALTER TABLE outbox_away RENAME TO outbox")
        assert len((await store.claim([0, 1, 2, 3], 100, True)).rows) == 40
        assert pool.get_idle_size() == pool.get_size() - 1
    finally:
        await store.close()
        await asyncio.wait_for(pool.close(), 5)
