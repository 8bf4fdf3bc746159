"""Helpers shared by the integration tests (this folder is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from outbox_common.settings import WorkerSettings
from outbox_worker.adapters.store import migrate
from outbox_worker.app.producers import prepare
from outbox_worker.app.relay import RelayHooks
from outbox_worker.app.worker import Worker
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy, and return it; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(settings: WorkerSettings, hooks: RelayHooks | None = None) -> AsyncIterator[Worker]:
    """An in-process worker, started and relaying for the duration of the block, then stopped (SIGTERM path)."""
    worker = Worker(settings, hooks=hooks)
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
