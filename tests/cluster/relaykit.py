"""Relay helpers of the cluster suite: the database, the stream, and the objects of one publisher."""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import nats
from clusterkit import API_VERSION, KIND

from outbox_worker.adapters.history_io import ledger_ddl, ledger_table
from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("public", "outbox")
STREAM = "CLUSTER"
PARTITIONS = 8


def publisher(name: str, nats_url: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "partitions": PARTITIONS,
            "replicas": replicas,
            "database": {"secretRef": {"name": f"{name}-db"}},
            "nats": {"servers": [nats_url]},
            "stream": {"name": STREAM, "mode": "create"},
            "subjectTemplate": "orders.{aggregate_type}.{event_type}",
            "publishing": {
                "ackTimeoutSeconds": 1,
                "pollIntervalSeconds": 0.2,
                "retry": {"initialBackoffSeconds": 0.05, "maxBackoffSeconds": 1},
            },
            "leases": {"ttlSeconds": 3},
            "reportIntervalSeconds": 1,
            "worker": {"shutdownGraceSeconds": 5, "logFormat": "text"},
        },
    }


def secret(name: str, dsn: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {"url": base64.b64encode(dsn.encode()).decode()},
    }


async def insert_events(dsn: str, count: int, aggregates: int) -> int:
    """``count`` events over ``aggregates`` aggregates, each written with its ledger row in one transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = [str(i % aggregates) for i in range(count)]
        await conn.execute(
            f"WITH o AS (INSERT INTO {SQL.outbox} (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'order', a, 'paid', convert_to(a, 'UTF8') FROM unnest($1::text[]) WITH ORDINALITY AS t(a, n) "
            "ORDER BY n RETURNING id, event_id, aggregate_type, aggregate_id) "
            f"INSERT INTO {ledger_table(SQL)} (event_id, aggregate, outbox_id) "
            "SELECT event_id, aggregate_type || '/' || aggregate_id, id FROM o",
            ids,
        )
    finally:
        await conn.close()
    return count


async def stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        return int((await nc.jetstream().stream_info(STREAM)).state.messages)
    except Exception:
        return -1
    finally:
        await nc.close()


async def prepare_database(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, SQL, PARTITIONS)
        await conn.execute(ledger_ddl(SQL))
    finally:
        await conn.close()
