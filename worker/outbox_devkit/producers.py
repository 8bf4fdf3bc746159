"""Synthetic producers for ``outboxctl demo``, ``outboxctl bench`` and the tests.

Each producer owns a disjoint set of aggregates and writes each aggregate's events with increasing
versions, each event's outbox row and ledger row in the same transaction. Some transactions are held
open for a while (so rows commit out of id order), some roll back (their events must never appear).
The wall-clock time of each commit is recorded per event id, for commit → stored latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import asyncpg

from outbox_worker.adapters.history_io import ledger_ddl, ledger_table
from outbox_worker.core.history import StoredEvent
from outbox_worker.core.sql import Sql


@dataclass
class ProducerPlan:
    events: int
    aggregates: int = 10_000
    producers: int = 8
    events_per_tx: int = 20
    rollback_ratio: float = 0.1  # share of transactions that roll back (their events are re-sent)
    slow_tx_ratio: float = 0.05  # share of transactions held open before commit
    slow_tx_seconds: float = 0.2
    aggregate_type: str = "order"
    event_types: tuple[str, ...] = ("created", "paid", "shipped", "delivered", "closed")
    rate_per_s: float = 0.0  # 0: as fast as possible
    payload_bytes: int = 100
    seed: int = 7


@dataclass
class ProducerResult:
    committed: int = 0
    rolled_back: int = 0
    transactions: int = 0
    commit_times: dict[str, float] = field(default_factory=dict)  # event_id -> time.time() of commit
    first_commit: float = 0.0
    last_commit: float = 0.0


class _Rollback(Exception):
    """Raised inside a producer transaction to roll it back on purpose."""


async def prepare(conn: asyncpg.Connection, sql: Sql) -> None:
    await conn.execute(ledger_ddl(sql))


def insert_with_ledger(sql: Sql) -> str:
    """One statement that writes outbox rows and their ledger rows (the ground truth), atomically.

    $1 aggregate type, $2 aggregate ids, $3 event types, $4 payloads (arrays, one entry per event),
    $5 user headers (jsonb, shared). Returns each event's id as text.

    Why one statement: BEGIN, the outbox INSERT, one ledger INSERT per event and COMMIT were four
    round trips and 2 + n statements per transaction; at 5,000 events/s offered, that harness work
    (producer and PostgreSQL) kept the 2-core machine ~97% busy and inflated the relay's tail latency
    it is there to measure.
    """
    return (
        f"WITH o AS (INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload, headers) "
        "SELECT $1, a, e, p, $5::jsonb FROM unnest($2::text[], $3::text[], $4::bytea[]) AS t(a, e, p) "
        "RETURNING id, event_id, aggregate_type, aggregate_id) "
        f"INSERT INTO {ledger_table(sql)} (event_id, aggregate, outbox_id) "
        "SELECT event_id, aggregate_type || '/' || aggregate_id, id FROM o RETURNING event_id::text"
    )


async def produce(dsn: str, sql: Sql, plan: ProducerPlan, progress: ProducerResult | None = None) -> ProducerResult:
    """Write ``plan.events`` committed events (rolled-back ones are extra and never counted)."""
    result = progress or ProducerResult()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=plan.producers, command_timeout=30)
    assert pool is not None
    try:
        per = [
            plan.events // plan.producers + (1 if i < plan.events % plan.producers else 0)
            for i in range(plan.producers)
        ]
        await asyncio.gather(*(_producer(pool, sql, plan, i, n, result) for i, n in enumerate(per)))
    finally:
        await pool.close()
    return result


async def _producer(
    pool: asyncpg.Pool, sql: Sql, plan: ProducerPlan, index: int, count: int, result: ProducerResult
) -> None:
    rng = random.Random(plan.seed * 1000 + index)
    mine = [a for a in range(plan.aggregates) if a % plan.producers == index] or [index]
    version = dict.fromkeys(mine, 0)
    insert = insert_with_ledger(sql)
    padding = "x" * max(0, plan.payload_bytes - 60)
    sent = 0
    started = time.monotonic()
    while sent < count:
        n = min(plan.events_per_tx, count - sent)
        rollback = rng.random() < plan.rollback_ratio
        slow = rng.random() < plan.slow_tx_ratio
        rows = []
        for _ in range(n):
            agg = rng.choice(mine)
            version[agg] += 1
            payload = json.dumps({"aggregate": agg, "version": version[agg], "pad": padding}).encode()
            rows.append((agg, payload, plan.event_types[version[agg] % len(plan.event_types)]))
        args = (
            plan.aggregate_type,
            [str(r[0]) for r in rows],
            [r[2] for r in rows],
            [r[1] for r in rows],
            json.dumps({"traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"}),
        )
        async with pool.acquire() as conn:
            if not (slow or rollback):
                ids = await conn.fetch(insert, *args)  # one statement: its own transaction
            else:
                try:
                    async with conn.transaction():
                        ids = await conn.fetch(insert, *args)
                        if slow:
                            await asyncio.sleep(plan.slow_tx_seconds)
                        if rollback:
                            raise _Rollback
                except _Rollback:
                    pass
        result.transactions += 1
        if rollback:
            result.rolled_back += n
            for r in rows:  # the versions were never committed: reuse them
                version[r[0]] -= 1
            continue
        now = time.time()
        for r in ids:
            result.commit_times[r[0]] = now
        result.first_commit = result.first_commit or now
        result.last_commit = now
        result.committed += n
        sent += n
        if plan.rate_per_s > 0:
            share = plan.rate_per_s / plan.producers
            ahead = sent / share - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)


# --- measuring what was produced -------------------------------------------------------------------
LATENCY_CLOCK_COMMIT = "postgres commit timestamp"
LATENCY_CLOCK_RETURNED = "producer, after COMMIT returned"


async def ledger_commit_times(dsn: str, sql: Sql) -> dict[str, float]:
    """Commit time (seconds since the epoch) of every ledger row, from PostgreSQL's commit timestamps
    (the ledger row commits with its outbox row), or {} when ``track_commit_timestamp`` is off."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT event_id::text, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
            f"FROM {ledger_table(sql)}"
        )
        return {r[0]: r[1] for r in rows if r[1] is not None}
    except asyncpg.PostgresError:
        return {}
    finally:
        await conn.close()


def commit_latencies(stored: list[StoredEvent], commit_times: dict[str, float]) -> list[float]:
    """Seconds from each event's commit to the stream storing its first copy (never negative)."""
    seen: set[str] = set()
    out = []
    for m in stored:
        t = commit_times.get(m.event_id)
        if t is not None and m.event_id not in seen:
            out.append(max(0.0, m.stored_at - t))
        seen.add(m.event_id)
    return out
