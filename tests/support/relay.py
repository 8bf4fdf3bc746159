"""An in-process relay worker and the outbox schema with the producers' ledger, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from outbox_common.config import WorkerConfig
from outbox_common.settings import WorkerSettings
from outbox_devkit.producers import prepare
from outbox_worker.adapters.store import migrate
from outbox_worker.app.relay import RelayHooks
from outbox_worker.app.worker import Worker
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")


@contextlib.asynccontextmanager
async def running(settings: WorkerSettings, hooks: RelayHooks | None = None) -> AsyncIterator[Worker]:
    """An in-process worker, started and relaying for the duration of the block, then stopped (SIGTERM path).
    ``settings`` goes through :meth:`WorkerConfig.from_settings` as in ``outboxctl worker``."""
    worker = Worker(WorkerConfig.from_settings(settings), hooks=hooks)
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 15)


async def setup_db(dsn: str, partitions: int = 8) -> None:
    """Migrate the outbox and create the producers' ledger."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, SQL, partitions)
        await prepare(conn, SQL)
    finally:
        await conn.close()
