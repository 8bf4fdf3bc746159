"""A claim's payload bytes are bounded (OUTBOX_MAX_BATCH_BYTES, OutboxStore.claim), against a real
PostgreSQL: a worker holds a claim's payloads until their acks, and bounded by rows alone, 4 loops of
1,000 rows of 1 MB were 4 GB against the operator's default 512Mi memory limit: an OOM-kill, then the
same claim after every restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from test_relay import _is, _true, stored_count, worker_settings
from test_relay import insert as insert_event

from outbox_common.envelope import OutboxRow
from outbox_worker.adapters.store import Fence, MarkFirst, OutboxStore, migrate
from outbox_worker.core.sql import Sql
from support.polling import wait_for
from support.relay import running, setup_db

SQL = Sql.for_table("public", "outbox")
BUDGET = 64 * 1024
MAX_PAYLOAD = 1024 * 1024
ROWS = 20  # rows a claim asks for: a payload bound of BUDGET // ROWS = 3,276 bytes


@asynccontextmanager
async def store_of(dsn: str, max_payload: int = MAX_PAYLOAD) -> AsyncIterator[tuple[asyncpg.Pool, OutboxStore]]:
    """An outbox of 4 partitions, and a store whose claims hold at most BUDGET of payloads."""
    async with asyncpg.create_pool(dsn, min_size=1, max_size=3) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
        store = OutboxStore(pool, SQL, "p", "worker-a")
        await store.check_schema()
        store.limit_payloads(max_payload, BUDGET)
        yield pool, store


async def insert(pool: asyncpg.Pool, sizes: list[int]) -> list[int]:
    """One row per size (payload of that many bytes), aggregates spread over the partitions; their ids."""
    rows = await pool.fetch(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
        "SELECT 'o', (n % 7)::text, 'e', convert_to(repeat('x', size), 'UTF8') "
        "FROM unnest($1::int[]) WITH ORDINALITY AS s(size, n) ORDER BY n RETURNING id",
        sizes,
    )
    return [r["id"] for r in rows]


async def aggregates_by_partition(pool: asyncpg.Pool) -> dict[int, list[str]]:
    """Aggregate ids agg-0 … agg-39 by the partition (of 4) their rows land in (the table's own hash)."""
    rows = await pool.fetch(
        "SELECT a, ((hashtextextended(a, 0) & 2147483647) % 4)::int AS p FROM unnest($1::text[]) AS a",
        [f"agg-{i}" for i in range(40)],
    )
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(r["p"], []).append(r["a"])
    return out


def payload_bytes(rows: list[OutboxRow]) -> int:
    return sum(len(r.payload or b"") for r in rows)


@pytest.mark.parametrize("carry_mark", [False, True], ids=["claim", "claim carrying a mark"])
@pytest.mark.parametrize("ordered", [True, False])
async def test_claims_hold_at_most_their_byte_budget_and_every_row_comes_once_in_order(
    pg_dsn: str, ordered: bool, carry_mark: bool
) -> None:
    """Small rows with large ones among them (under max_payload, over the bound of a claim of 20
    rows): each claim's payloads fit the budget, a large row waits with the rest of its partition
    for the next claim, which takes fewer rows and reads it, and once only small rows are left the
    claims take 20 rows again. Every row comes exactly once, each partition in id order, none
    without its payload. A claim may carry the previous claim's mark (the statement with the
    bound as its 10th parameter)."""
    async with store_of(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        parts = sorted(held)
        sizes = [200] * 60
        for i in (7, 8, 30):
            sizes[i] = 20_000  # over 3,276: left for a claim of fewer rows
        ids = await insert(pool, sizes)
        big = {ids[i] for i in (7, 8, 30)}
        claims: list[list[OutboxRow]] = []
        previous: list[int] = []
        for _ in range(30):
            mark = MarkFirst(Fence.of(held), previous, previous, True) if carry_mark and previous else None
            claim = await store.claim(parts, ROWS, ordered, mark)
            if mark is not None:
                assert claim.marked == len(previous)
            if not claim.rows and not claim.more:
                break
            claims.append(claim.rows)
            previous = [r.id for r in claim.rows]
            if not carry_mark:  # published and deleted, as a mark on its own would
                await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", previous)
        else:
            pytest.fail(f"the claims never ended: {[len(c) for c in claims]}")

        claimed = [r.id for c in claims for r in c]
        assert sorted(claimed) == sorted(ids), "every row exactly once"
        by_partition: dict[int, list[int]] = {}
        for r in (r for c in claims for r in c):
            by_partition.setdefault(r.partition, []).append(r.id)
        assert all(seq == sorted(seq) for seq in by_partition.values()), by_partition
        sizes_seen = {r.id: len(r.payload) if r.payload is not None else None for c in claims for r in c}
        assert sizes_seen == {i: 20_000 if i in big else 200 for i in ids}
        for c in claims:
            assert len(c) <= ROWS
            assert payload_bytes(c) <= BUDGET, [len(c), payload_bytes(c)]
        with_big = [c for c in claims if big & {r.id for r in c}]
        assert with_big
        assert all(len(c) <= BUDGET // 20_000 for c in with_big), [len(c) for c in with_big]
        assert len(claims[0]) > BUDGET // 20_000  # the first claim took the small rows before the large
        # with only small rows left, a claim takes as many rows as a store that never saw a large one
        await insert(pool, [200] * 40)
        if carry_mark:
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", previous)
        fresh = OutboxStore(pool, SQL, "p", "worker-a")  # never saw a large payload
        fresh.limit_payloads(MAX_PAYLOAD, BUDGET)
        want = [r.id for r in (await fresh.claim(parts, ROWS, ordered)).rows]
        assert [r.id for r in (await store.claim(parts, ROWS, ordered)).rows] == want
        assert len(want) > BUDGET // 20_000


async def test_a_payload_larger_than_the_budget_comes_alone(pg_dsn: str) -> None:
    """A row over the whole budget (under max_payload) still goes: in a claim of its own."""
    async with store_of(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        ids = await insert(pool, [100, 100_000, 100])  # 100 KB > BUDGET
        seen: list[list[int]] = []
        for _ in range(6):
            claim = await store.claim(sorted(held), ROWS, True)
            if not claim.rows:
                break
            seen.append([r.id for r in claim.rows])
            big = [r for r in claim.rows if r.id == ids[1]]
            if big:
                assert big[0].payload is not None
                assert len(big[0].payload) == 100_000
                assert len(claim.rows) == 1, "alone"
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", seen[-1])
        assert sorted(i for s in seen for i in s) == sorted(ids)
        assert [ids[1]] in seen


async def test_a_payload_over_max_payload_comes_empty_for_the_dead_letters_and_holds_nothing_back(
    pg_dsn: str,
) -> None:
    """A payload the server can never take (over its max_payload) is not left for a later claim: it
    comes without its bytes (the relay dead-letters it by its size), with the rows after it."""
    async with store_of(pg_dsn, max_payload=10_000) as (pool, store):
        held = await store.acquire(4, 30.0)
        ids = await insert(pool, [100, 50_000, 100, 100])
        claim = await store.claim(sorted(held), ROWS, True)
        assert sorted(r.id for r in claim.rows) == ids
        assert {r.id: r.payload is None for r in claim.rows} == {i: i == ids[1] for i in ids}
        assert not claim.more


async def test_a_large_payload_is_claimed_at_the_next_claim_while_other_partitions_stay_busy(pg_dsn: str) -> None:
    """The partition a claim stopped at (a large payload) is claimed on its own by the next claim
    given it, so its large row comes then, even while every other partition keeps getting rows: a
    claim of fewer rows over all of them would spend those rows on the lowest partitions and leave
    the large one waiting for as long as they are busy."""
    async with store_of(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        parts = sorted(held)
        by_partition = await aggregates_by_partition(pool)
        large_partition = max(by_partition)
        busy = [a for p, aggs in by_partition.items() if p != large_partition for a in aggs]
        big = await pool.fetchval(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "VALUES ('o', $1, 'e', convert_to(repeat('x', 20000), 'UTF8')) RETURNING id",
            by_partition[large_partition][0],
        )
        claims = 0
        for _ in range(3):
            claims += 1
            await pool.execute(  # the other partitions never run dry
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', a, 'e', convert_to(repeat('x', 200), 'UTF8') FROM unnest($1::text[]) AS a",
                busy,
            )
            claim = await store.claim(parts, ROWS, True)
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r.id for r in claim.rows])
            if big in {r.id for r in claim.rows}:
                break
            assert large_partition in claim.more
        else:
            pytest.fail("the large payload was not claimed within 3 claims while other partitions were busy")
        assert claims == 2  # the claim after the one that stopped at it


async def test_a_worker_relays_a_large_payload_at_once_not_at_the_poll(pg_dsn: str, nats_url: str) -> None:
    """A claim that found only a payload over its bound returns no row, but its partition in
    ``more``: the relay must check it in dirty so that the next claim (alone, fewer rows) takes it
    at once. Dropped, the row waited for the poll (30 s here), after every such claim."""
    await setup_db(pg_dsn)
    # 1,000 rows a claim: a payload bound of 65 bytes; 1,000 bytes is over it and well under the budget
    settings = worker_settings(pg_dsn, nats_url, poll_interval_seconds=30.0, max_batch_bytes=BUDGET)
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with running(settings) as worker:
            await wait_for(lambda: _true(worker.leases is not None and len(worker.leases.owned) == 8), 5, "leases")
            await asyncio.sleep(0.3)  # the loops idle now, waiting on the 30 s poll
            await insert_event(conn, "agg-1", payload=b"x" * 1000)
            await wait_for(lambda: _is(stored_count(nats_url), 1), 5, "the large event stored before the poll")
    finally:
        await conn.close()


async def test_large_payloads_of_one_partition_do_not_starve_another_partitions_large_payload(pg_dsn: str) -> None:
    """Two partitions stopped at payloads over half the budget: the claim of the large partitions
    takes one row, the lower partition's (the fair cut's order). The other one must come next, even
    while the lower partition keeps getting large payloads; forgotten with it, it was stopped again by
    the next claim, claimed after the lower one again, and waited for as long as that one had large
    payloads."""
    async with store_of(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        parts = sorted(held)
        by_partition = {p: aggs[0] for p, aggs in (await aggregates_by_partition(pool)).items()}
        low, high = min(by_partition), max(by_partition)
        large = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
        large += "VALUES ('o', $1, 'e', convert_to(repeat('x', 40000), 'UTF8')) RETURNING id"  # > BUDGET / 2
        waiting = await pool.fetchval(large, by_partition[high])
        claims = 0
        for _ in range(8):
            claims += 1
            await pool.fetchval(large, by_partition[low])  # the lower partition never runs dry of large rows
            claim = await store.claim(parts, ROWS, True)
            assert payload_bytes(claim.rows) <= BUDGET
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r.id for r in claim.rows])
            if waiting in {r.id for r in claim.rows}:
                break
            assert high in claim.more
        else:
            pytest.fail("the higher partition's large payload waited while the lower one had large payloads")
        assert claims <= 3  # stopped at, claimed with the lower one (which goes first), then alone
