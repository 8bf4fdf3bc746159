"""A worker's start-up against servers that are there but not ready: PostgreSQL with no free
connection slot, a start-up budget with under a second left for NATS. Each either waits, within the
start-up timeout, or fails with the typed error the exit codes read (unavailable: exit 4), never
with a raw client error (exit 1 and a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from outbox_common.config import NatsConfig, WorkerConfig
from outbox_worker.adapters.publisher import JetStreamPublisher
from outbox_worker.adapters.store import DatabaseAuthError, DatabaseUnavailableError, SchemaError
from outbox_worker.app.worker import Worker
from support.relay import SQL, setup_db
from support.servers import ControlledPostgres

SLOTS = 6  # max_connections of the PostgreSQL here
E = TypeVar("E", bound=Exception)


@pytest.fixture
def small_pg() -> Iterator[ControlledPostgres]:
    """A private PostgreSQL with room for only SLOTS connections."""
    server = ControlledPostgres(max_connections=SLOTS)
    server.start()
    yield server
    server.cleanup()


async def take_every_slot(dsn: str) -> list[asyncpg.Connection]:
    """Open connections until PostgreSQL refuses one for want of a slot; return the open ones."""
    held: list[asyncpg.Connection] = []
    for _ in range(SLOTS + 1):
        try:
            held.append(await asyncpg.connect(dsn, timeout=5))
        except asyncpg.TooManyConnectionsError:
            return held
    raise AssertionError(f"PostgreSQL took {len(held)} connections, more than max_connections={SLOTS}")


def worker_config(dsn: str, nats_url: str, startup_timeout: float, **kw: Any) -> WorkerConfig:
    from test_relay_failures import worker_settings

    return WorkerConfig.from_settings(
        worker_settings(dsn, nats_url, db_pool_size=2, startup_timeout_seconds=startup_timeout, **kw)
    )


async def test_no_free_connection_slot_until_the_deadline_is_unavailable(
    small_pg: ControlledPostgres, nats_url: str
) -> None:
    """'Sorry, too many clients already' is a database that is not available yet (every client
    reconnecting after a restart causes it): retried until the start-up timeout, then
    DatabaseUnavailableError, which ``outboxctl worker`` exits 4 on."""
    await setup_db(small_pg.dsn)
    held = await take_every_slot(small_pg.dsn)
    worker = Worker(worker_config(small_pg.dsn, nats_url, startup_timeout=2.0))
    try:
        with pytest.raises(DatabaseUnavailableError) as info:
            await worker.start()
        assert "TooManyConnectionsError" in str(info.value)
        assert "postgresql://" not in str(info.value)
    finally:
        await worker.close()
        for conn in held:
            await conn.close()


async def test_a_slot_freed_within_the_start_up_timeout_is_taken(small_pg: ControlledPostgres, nats_url: str) -> None:
    await setup_db(small_pg.dsn)
    held = await take_every_slot(small_pg.dsn)
    worker = Worker(worker_config(small_pg.dsn, nats_url, startup_timeout=30.0))
    starting = asyncio.create_task(worker.start())
    try:
        await asyncio.sleep(1.5)
        assert not starting.done(), "the worker started with no free slot, or gave up at once"
        for conn in held:
            await conn.close()
        held = []
        async with asyncio.timeout(20):
            await starting
        assert worker.leases is not None  # started: joined, NATS connected, leases built
    finally:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await worker.close()
        for conn in held:
            await conn.close()


async def test_a_schema_check_held_up_by_a_lock_until_the_deadline_says_it_was_not_answered_in_time(
    small_pg: ControlledPostgres, nats_url: str
) -> None:
    """A long ``outboxctl migrate`` holds its tables' locks: the worker's start-up statements wait on
    them, each for the statement timeout, retried until the start-up timeout. The error (exit 4) says
    PostgreSQL did not answer in time and why that may be, not that it is unreachable: it answered
    the connection."""
    await setup_db(small_pg.dsn)
    holder = await asyncpg.connect(small_pg.dsn, timeout=5)
    worker = Worker(worker_config(small_pg.dsn, nats_url, startup_timeout=2.0, db_timeout_seconds=0.5))
    try:
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {SQL.meta} IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(DatabaseUnavailableError) as info:
                await worker.start()
        message = str(info.value)
        assert message.startswith("PostgreSQL did not answer in time (TimeoutError)"), message
        assert "lock" in message
        assert "not reachable" not in message
        assert worker.pool is not None, "the pool never connected: the lock was not what held the start-up up"
    finally:
        await worker.close()
        await holder.close()


async def http_status(port: int, path: str) -> int:
    """The status of ``GET path`` on the worker's metrics server (HTTP/1.0, as a kubelet's probe)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        async with asyncio.timeout(5):
            return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def test_a_worker_waiting_for_its_database_answers_its_liveness_probe_and_is_not_ready(
    nats_url: str,
) -> None:
    """The operator's liveness probe kills a worker after ~30 s without an answer on /healthz; a
    worker waits up to startup_timeout_seconds (60 s by default) for PostgreSQL and NATS. So the
    metrics server answers from the first moment of start-up: alive (200), not ready (503)."""
    from outbox_devkit.embedded import free_port

    port = free_port()
    nowhere = f"postgresql://relay@127.0.0.1:{free_port()}/app"  # nothing listens there
    worker = Worker(worker_config(nowhere, nats_url, startup_timeout=30.0, metrics_port=port))
    starting = asyncio.create_task(worker.start())
    try:
        async with asyncio.timeout(10):
            while worker.health is None and not starting.done():
                await asyncio.sleep(0.05)
        assert not starting.done(), starting
        assert await http_status(port, "/healthz") == 200
        assert await http_status(port, "/readyz") == 503
        assert worker.pool is None, "still waiting for PostgreSQL"
    finally:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await worker.close()


async def test_nats_connects_with_under_a_second_of_the_budget_left(nats_url: str) -> None:
    """The worker gives each connection attempt what is left of its start-up budget, at least 0.5 s;
    nats-py refuses a flush timeout that rounds down to 0, so the connect must not pass one."""
    publisher = JetStreamPublisher(NatsConfig.for_url(nats_url))
    try:
        await publisher.connect(timeout=0.5)
        assert publisher.connected
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def role_with(dsn: str, *grants: str) -> AsyncIterator[str]:
    """A login role of its own with ``grants`` (GRANT statements, ``{role}`` in each); its DSN."""
    role = f"relay_{os.urandom(4).hex()}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        for grant in grants:
            await admin.execute(grant.format(role=f'"{role}"'))
        role_dsn = dsn.replace("//postgres@", f"//{role}@", 1)
        assert role_dsn != dsn
        yield role_dsn
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def start_refused(dsn: str, nats_url: str, error: type[E]) -> tuple[Worker, E]:
    """A worker on ``dsn`` whose start raises ``error``, closed again; the worker and the error."""
    worker = Worker(worker_config(dsn, nats_url, startup_timeout=5.0))
    try:
        with pytest.raises(error) as refused:
            await worker.start()
    finally:
        await worker.close()
    return worker, refused.value


async def test_a_role_that_may_not_delete_from_the_outbox_is_refused_at_start_naming_the_grant(
    pg_dsn: str, nats_url: str
) -> None:
    """Without DELETE on the outbox every mark would fail after its rows were published: they would
    be published again and again, and copies sent after the duplicate window stored twice. The
    worker checks its privileges at start: a configuration error (exit 3) with the GRANT to run."""
    await setup_db(pg_dsn)
    async with role_with(
        pg_dsn,
        "GRANT SELECT, UPDATE ON outbox TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_leases, outbox_workers, outbox_dead_letters TO {role}",
        "GRANT SELECT ON outbox_meta TO {role}",
    ) as dsn:
        worker, refused = await start_refused(dsn, nats_url, SchemaError)
    message = str(refused)
    assert 'lacks privileges the worker needs: run GRANT DELETE ON "public"."outbox" TO "relay_' in message, message
    assert "outbox_leases" not in message  # only what is missing
    assert worker.leases is None  # never got to claim anything


async def test_a_role_without_the_tables_or_the_database_is_a_configuration_error(pg_dsn: str, nats_url: str) -> None:
    await setup_db(pg_dsn)
    database = pg_dsn.rsplit("/", 1)[1].split("?", 1)[0]
    async with role_with(pg_dsn) as dsn:  # no grant at all: not even the schema version is readable
        _, no_tables = await start_refused(dsn, nats_url, SchemaError)
    assert 'permission denied for table outbox_meta: run GRANT SELECT ON "public"."outbox_meta" TO "relay_' in str(
        no_tables
    )
    async with role_with(pg_dsn, f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC') as dsn:
        _, no_connect = await start_refused(dsn, nats_url, DatabaseAuthError)
    assert "GRANT CONNECT ON DATABASE" in str(no_connect)
