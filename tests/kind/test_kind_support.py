"""The kind suite's own helpers, checked here where no cluster exists: its INSERT fits the table
``outboxctl migrate`` creates, and its stream reader returns every message once with its Msg-Id.

These run against the real embedded PostgreSQL and nats-server of tests/conftest.py (marker
``integration``), so a kind run never fails on a typo in the harness itself.
"""

from __future__ import annotations

import uuid

import asyncpg
import nats
import pytest
from kindsupport import insert_events_sql, stream_contents

from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql

pytestmark = pytest.mark.integration


async def test_insert_sql_matches_the_migrated_table(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, Sql.for_table("public", "outbox"), 4)
        ids = [str(uuid.uuid4()) for _ in range(30)]
        await conn.execute(insert_events_sql(ids[:15]))
        await conn.execute(insert_events_sql(ids[15:], start=15))
        rows = await conn.fetch("SELECT event_id::text, aggregate_id, payload FROM public.outbox ORDER BY id")
    finally:
        await conn.close()
    assert [r["event_id"] for r in rows] == ids
    assert rows[21]["aggregate_id"] == "order-1"
    assert rows[21]["payload"] == b'{"n": 21}'


def test_insert_sql_refuses_a_non_uuid() -> None:
    with pytest.raises(ValueError):
        insert_events_sql(["x'); DROP TABLE outbox; --"])


async def test_stream_reader_returns_every_message_with_its_msg_id(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="OUTBOX", subjects=["outbox.>"])
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for eid in [*ids, ids[0]]:  # the repeat is de-duplicated by JetStream
            await js.publish("outbox.order.created", b"{}", headers={"Nats-Msg-Id": eid})
    finally:
        await nc.close()
    contents = await stream_contents(nats_url, "OUTBOX", expected=5, wait_seconds=1)
    assert contents == [(eid, "outbox.order.created") for eid in ids]
