"""I/O for the history checker: read the whole stream back, and the ground truth from PostgreSQL.

The ground truth is the ledger table ``<table>_ledger`` (event id, aggregate, outbox id), which the
producers of ``outboxctl demo``, ``outboxctl bench`` and the test suite write in the *same
transaction* as the outbox row: a rolled-back event is in neither. Applications that want an audit
trail can write it the same way (README, "Verifying a relay").
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import nats
from nats.js import api as js_api

from outbox_common import names
from outbox_worker.core.history import CommittedEvent, HistoryReport, StoredEvent, check_history
from outbox_worker.core.sql import Sql


def ledger_ddl(sql: Sql) -> str:
    return (
        f'CREATE TABLE IF NOT EXISTS "{sql.schema}"."{sql.table}_ledger" ('
        "event_id uuid PRIMARY KEY, aggregate text NOT NULL, outbox_id bigint NOT NULL, "
        "committed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def ledger_insert(sql: Sql) -> str:
    """$1 event_id, $2 aggregate, $3 outbox_id."""
    return f'INSERT INTO "{sql.schema}"."{sql.table}_ledger" (event_id, aggregate, outbox_id) VALUES ($1, $2, $3)'


async def read_stream(nats_url: str, stream: str, *, timeout: float = 120.0, batch: int = 5000) -> list[StoredEvent]:
    """Every message of ``stream`` in sequence order, via an ephemeral no-ack consumer (bounded time)."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=5)
    out: list[StoredEvent] = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        last = info.state.last_seq
        if info.state.messages == 0:
            return out
        sub = await js.pull_subscribe(
            "",
            stream=stream,
            config=js_api.ConsumerConfig(
                ack_policy=js_api.AckPolicy.NONE,
                deliver_policy=js_api.DeliverPolicy.ALL,
                inactive_threshold=60.0,
            ),
        )
        deadline = time.monotonic() + timeout
        seq = 0
        while seq < last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(out)} messages of {stream} in {timeout}s, stopped at seq {seq}/{last}")
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for m in msgs:
                seq = m.metadata.sequence.stream
                h = m.headers or {}
                out.append(
                    StoredEvent(
                        seq=seq,
                        event_id=h.get(names.HDR_MSG_ID, ""),
                        aggregate=f"{h.get(names.HDR_AGGREGATE_TYPE, '')}/{h.get(names.HDR_AGGREGATE_ID, '')}",
                        outbox_id=int(h.get(names.HDR_OUTBOX_ID, "0")),
                        stored_at=m.metadata.timestamp.timestamp() if m.metadata.timestamp else 0.0,
                    )
                )
        await sub.unsubscribe()
    finally:
        await asyncio.wait_for(nc.close(), 5)
    return out


async def read_truth(conn: asyncpg.Connection, sql: Sql) -> tuple[list[CommittedEvent], set[str], set[str]]:
    """(committed events from the ledger, event ids still pending, event ids dead-lettered)."""
    ledger = await conn.fetch(f'SELECT event_id::text, aggregate, outbox_id FROM "{sql.schema}"."{sql.table}_ledger"')
    pending = await conn.fetch(f"SELECT event_id::text FROM {sql.outbox} WHERE published_at IS NULL")
    dead = await conn.fetch(f"SELECT event_id::text FROM {sql.dead_letters}")
    return (
        [CommittedEvent(r[0], r[1], r[2]) for r in ledger],
        {r[0] for r in pending},
        {r[0] for r in dead},
    )


async def verify(dsn: str, sql: Sql, nats_url: str, stream: str) -> HistoryReport:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        committed, pending, dead = await read_truth(conn, sql)
    finally:
        await conn.close()
    stored = await read_stream(nats_url, stream)
    return check_history(committed, stored, pending, dead)
