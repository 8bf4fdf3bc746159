"""The two baselines ``outboxctl bench`` measures beside the relay, on the same servers.

- :func:`naive_relay`: the seed's "before": read pending rows in id order, then for each row publish
  it, wait for its ack, delete it, and only then take the next. One message in flight, one statement
  per row. (It reads rows 100 at a time, which only flatters it.)
- :func:`publish_ceiling`: the same messages through the project's :class:`JetStreamPublisher` with
  no database at all: rows are built in memory, turned into messages by the same envelope code
  (subject template, headers) and published in waves of ``batch_size`` by ``loops`` concurrent loops,
  exactly as the relay's loops do. relay/ceiling is then the share of the publish path's speed that
  survives claiming and marking.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from outbox_common.config import WorkerConfig
from outbox_common.envelope import OutboxRow, SubjectTemplate, created_at_text, subject_fields
from outbox_worker.adapters.publisher import JetStreamPublisher, Message
from outbox_worker.adapters.store import OutboxStore, connect_pool
from outbox_worker.core.history import CommittedEvent
from outbox_worker.core.sql import Sql

EVENT_TYPES = ("created", "paid", "shipped", "delivered", "closed")  # five topics


@dataclass
class BaselineResult:
    events: int
    published: int
    failed: int
    seconds: float  # first publish -> last ack (ceiling) or first claim -> last mark (naive)
    first_at: float  # time.time()
    last_at: float

    def to_json(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}


async def _publisher(config: WorkerConfig) -> JetStreamPublisher:
    pub = JetStreamPublisher(config.nats, config.publish, name="outbox-bench-baseline")
    await pub.connect()
    await pub.ensure_stream(config.stream, SubjectTemplate.parse(config.relay.subject_template).filter_subject(), 0)
    return pub


async def naive_relay(config: WorkerConfig, events: int, timeout: float = 600.0) -> BaselineResult:
    """Relay ``events`` rows of ``config.database``'s outbox table one at a time (see the module docstring)."""
    db = config.database
    sql = Sql.for_table(db.schema, db.table)
    template = SubjectTemplate.parse(config.relay.subject_template)
    pub = await _publisher(config)
    headers = pub.header_block()  # the relay's headers (app/relay.py)
    pool = await connect_pool(db.url.get_secret_value(), size=2)
    store = OutboxStore(pool, sql, config.publish.publisher, "naive")
    parts = list(range(await store.check_schema()))
    delete = f"DELETE FROM {sql.outbox} WHERE id = $1"
    published = failed = 0
    first = time.time()
    deadline = time.monotonic() + timeout
    try:
        while published < events and time.monotonic() < deadline:
            rows = (await store.claim(parts, 100, True)).rows
            if not rows:
                await asyncio.sleep(0.01)
                continue
            for row in rows:
                msg = Message(template.render(subject_fields(row)), row.payload or b"", headers.render(row))
                (res,) = await pub.publish_wave([msg])
                if not res.ok:
                    failed += 1
                    break  # keep the aggregate's order: re-read from the database
                await pool.execute(delete, row.id)
                published += 1
        return BaselineResult(events, published, failed, time.time() - first, first, time.time())
    finally:
        await pool.close()
        await pub.close()


def synthetic_rows(events: int, aggregates: int, payload_bytes: int = 100) -> list[OutboxRow]:
    """Rows shaped like the bench's seeded rows (same aggregates, topics, payload and header sizes)."""
    now = created_at_text(datetime.now(UTC))
    pad = "x" * max(0, payload_bytes - 60)
    rows = []
    for i in range(events):
        agg, version = i % aggregates, i // aggregates + 1
        rows.append(
            OutboxRow(
                id=i + 1,
                event_id=str(uuid.UUID(int=i + 1)),  # deterministic: see synthetic_truth
                partition=0,
                aggregate_type="order",
                aggregate_id=str(agg),
                event_type=EVENT_TYPES[version % len(EVENT_TYPES)],
                tenant="",
                payload=json.dumps({"aggregate": agg, "version": version, "pad": pad}).encode(),
                headers={"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"},
                created_at=now,
                attempts=0,
            )
        )
    return rows


def synthetic_truth(events: int, aggregates: int) -> list[CommittedEvent]:
    """What :func:`synthetic_rows` holds, as ground truth for the history checker."""
    return [CommittedEvent(str(uuid.UUID(int=i + 1)), f"order/{i % aggregates}", i + 1) for i in range(events)]


async def publish_ceiling(config: WorkerConfig, rows: list[OutboxRow]) -> BaselineResult:
    """Publish ``rows`` with no database: ``config.relay.loops`` loops, waves of ``config.relay.batch_size``."""
    relay = config.relay
    template = SubjectTemplate.parse(relay.subject_template)
    pub = await _publisher(config)
    headers = pub.header_block()  # the relay's headers (app/relay.py)
    batches = [rows[i : i + relay.batch_size] for i in range(0, len(rows), relay.batch_size)]
    published = failed = 0

    async def loop(mine: list[list[OutboxRow]]) -> None:
        nonlocal published, failed
        for batch in mine:
            messages = [Message(template.render(subject_fields(r)), r.payload or b"", headers.render(r)) for r in batch]
            for res in await pub.publish_wave(messages):
                if res.ok:
                    published += 1
                else:
                    failed += 1

    try:
        first = time.time()
        await asyncio.gather(*(loop(batches[i :: relay.loops]) for i in range(relay.loops)))
        last = time.time()
        return BaselineResult(len(rows), published, failed, last - first, first, last)
    finally:
        await pub.close()
