"""An in-process relay worker and the outbox schema with the producers' ledger, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from outbox_common.config import WorkerConfig
from outbox_common.settings import WorkerSettings
from outbox_devkit.producers import prepare
from outbox_worker.adapters.publisher import MessageFields
from outbox_worker.adapters.store import migrate
from outbox_worker.app.relay import RelayHooks
from outbox_worker.app.worker import Worker
from outbox_worker.core.policy import PublishResult
from outbox_worker.core.sql import Sql
from support.polling import wait_for

SQL = Sql.for_table("public", "outbox")


def fast_settings(dsn: str, nats_url: str, **overrides: Any) -> WorkerSettings:
    """Worker settings for a test against the servers at ``dsn`` and ``nats_url``: short leases
    (3 s), acks and back-offs, a 0.2 s poll, a pool of 3, metrics on a free port; ``overrides``
    (setting names: the test's worker_id, publisher and stream, and anything else) last."""
    values: dict[str, Any] = {
        "database_url": dsn,
        "nats_servers": nats_url,
        "stream_mode": "create",
        "metrics_port": 0,
        "lease_ttl_seconds": 3.0,
        "ack_timeout_seconds": 1.0,
        "poll_interval_seconds": 0.2,
        "retry_backoff_initial_seconds": 0.05,
        "retry_backoff_max_seconds": 1.0,
        "shutdown_grace_seconds": 5.0,
        "db_pool_size": 3,
        "startup_timeout_seconds": 5.0,
    }
    return WorkerSettings(**(values | overrides))


@contextlib.asynccontextmanager
async def running(settings: WorkerSettings, hooks: RelayHooks | None = None) -> AsyncIterator[Worker]:
    """An in-process worker, started and relaying for the duration of the block, then stopped (SIGTERM path).
    ``settings`` goes through :meth:`WorkerConfig.from_settings` as in ``outboxctl worker``.

    The block starts once ``run`` has started its tasks (lease loop, listener, relay loops), or has
    ended (its error is raised on exit): what the block does (kill PostgreSQL, say) happens to a
    running worker, not to one still between ``start`` and ``run``."""
    worker = Worker(WorkerConfig.from_settings(settings), hooks=hooks)
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: worker._tasks or task.done(), 10, "the worker's run() starting its tasks")
        if task.done():
            task.result()  # run() ended before its tasks started: its error, now
            raise AssertionError("the worker's run() returned before it started its tasks")
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


@dataclass
class Wave:
    """One call of the worker's ``publish_wave``: when it was sent and, once it returned, its results."""

    sent_at: float  # time.monotonic() when the relay handed the wave to the publisher
    sent_wall: float  # time.time() at the same moment
    size: int
    ended_at: float | None = None  # time.monotonic() when publish_wave returned
    results: list[PublishResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        assert self.ended_at is not None, "the wave has not returned yet"
        return self.ended_at - self.sent_at


def record_waves(worker: Worker) -> list[Wave]:
    """Wrap the running worker's ``JetStreamPublisher.publish_wave`` so that every wave is logged when it
    is sent (and completed when it returns); the real method still publishes it.

    The wrapper has the real method's signature and only ``method-assign`` is silenced, so mypy (run
    on tests/support by tests/test_static.py) compares the two: a refactor of ``publish_wave`` fails
    the static check instead of disarming the tests that read this log. A caller asserts the log is
    not empty, which shows the relay really calls through the wrapper."""
    publisher = worker.publisher
    assert publisher is not None, "start the worker first"
    original = publisher.publish_wave
    log: list[Wave] = []

    async def recorded(messages: Sequence[MessageFields]) -> list[PublishResult]:
        wave = Wave(time.monotonic(), time.time(), len(messages))
        log.append(wave)
        wave.results = await original(messages)
        wave.ended_at = time.monotonic()
        return wave.results

    publisher.publish_wave = recorded  # type: ignore[method-assign]
    return log
