"""Fixtures shared by every test suite: real PostgreSQL and NATS servers, started on demand.

Session-scoped servers start lazily (only when a test asks for them) and once per session:

* ``pg`` -> :class:`EmbeddedPostgres`, ``nats_server`` -> :class:`EmbeddedNats` (the dev kit's).

Per test:

* ``pg_dsn`` -> DSN of a fresh, empty database on the shared server (dropped afterwards).
* ``nats_url`` -> URL of the shared nats-server; every JetStream stream is deleted after the test.
* ``own_pg`` / ``own_nats`` / ``own_nats_cluster`` -> a private server for tests that kill, pause or
  restart it (fault tests; ``support.servers``); removed after the test.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import nats
import pytest
from nats.js.errors import NotFoundError

from outbox_devkit.embedded import EmbeddedNats, EmbeddedPostgres
from support.servers import ControlledNats, ControlledPostgres, NatsCluster


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    """One PostgreSQL server for the whole session. Do not kill it: use ``own_pg`` for that."""
    server = EmbeddedPostgres()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    """One nats-server (JetStream, file storage) for the whole session. Use ``own_nats`` to kill one."""
    server = EmbeddedNats()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def pg_dsn(pg: EmbeddedPostgres) -> AsyncIterator[str]:
    """DSN of a new empty database ``t_<random>`` on the session server, dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield pg.dsn_for(name)
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def nats_url(nats_server: EmbeddedNats) -> AsyncIterator[str]:
    """URL of the session nats-server; all streams (and so consumers, KV buckets) are deleted after."""
    yield nats_server.url
    nc = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(info.config.name or "")
    finally:
        await nc.close()


@pytest.fixture
def own_pg() -> Iterator[ControlledPostgres]:
    """A private, started PostgreSQL that the test may kill, pause or restart."""
    server = ControlledPostgres()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_nats() -> Iterator[ControlledNats]:
    """A private, started nats-server that the test may kill, pause or restart."""
    server = ControlledNats()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_nats_cluster() -> Iterator[NatsCluster]:
    """A private, started 3-node JetStream cluster (meta leader elected)."""
    cluster = NatsCluster(size=3)
    cluster.start()
    yield cluster
    cluster.cleanup()
