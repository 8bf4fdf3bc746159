"""Partition leases against a real PostgreSQL: epochs fence stale owners, no two workers may publish a
partition at the same time, and shares rebalance to within one when workers join or leave."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from outbox_common.config import LeaseConfig, WorkerConfig
from outbox_common.settings import WorkerSettings
from outbox_devkit.producers import ProducerPlan, prepare, produce
from outbox_worker.adapters.history_io import verify
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.store import Fence, MarkFirst, OutboxStore, migrate
from outbox_worker.app.leases import LeaseManager
from outbox_worker.app.marks import AckedRows
from outbox_worker.app.worker import Worker
from outbox_worker.core.sql import Sql
from support.polling import wait_for
from support.relay import fast_settings, record_waves
from support.servers import ControlledPostgres

SQL = Sql.for_table("public", "outbox")
STREAM = "LEASES"
TTL = 3.0
RENEW = 1.0


def worker_settings(dsn: str, nats_url: str, worker_id: str, **kw: Any) -> WorkerSettings:
    names = {"worker_id": worker_id, "publisher": "leases", "stream": STREAM}
    leases = {"lease_ttl_seconds": TTL, "lease_renew_seconds": RENEW, "batch_size": 200, "loops": 2}
    return fast_settings(dsn, nats_url, **(names | leases | kw))


@dataclass
class Running:
    worker: Worker
    task: asyncio.Task[None]

    @property
    def id(self) -> str:
        return self.worker.worker_id

    def usable(self) -> dict[int, int]:
        """Partitions this worker believes it may publish right now: {partition: epoch}."""
        leases = self.worker.leases
        if leases is None or self.task.done():
            return {}
        now = time.monotonic()
        return {p: lease.epoch for p, lease in leases.leases.items() if lease.usable_until > now}


async def start(settings: WorkerSettings) -> Running:
    worker = Worker(WorkerConfig.from_settings(settings))
    await worker.start()
    return Running(worker, asyncio.create_task(worker.run()))


async def stop(r: Running) -> None:
    r.worker.request_stop()
    await asyncio.wait_for(r.task, 15)


@dataclass
class LeaseSampler:
    """Samples every worker's local view and the lease table, many times a second, and checks that a
    partition a worker may publish is live in the table under that worker and epoch, for one worker."""

    pool: asyncpg.Pool
    workers: list[Running]
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    max_epoch: dict[int, int] = field(default_factory=dict)

    async def sample(self) -> None:
        before = {r.id: r.usable() for r in self.workers}
        rows = await self.pool.fetch(SQL.lease_table, "leases")
        after = {r.id: r.usable() for r in self.workers}
        table = {r["partition"]: r for r in rows}
        holders: dict[int, list[str]] = {}
        for wid, mine in before.items():
            for p, epoch in mine.items():
                if after.get(wid, {}).get(p) != epoch:  # a worker may leave during the query
                    continue  # changed during the query: not a stable observation
                holders.setdefault(p, []).append(wid)
                row = table[p]
                if (row["owner"], row["epoch"], row["live"]) != (wid, epoch, True):
                    self.violations.append(
                        f"{wid} may publish partition {p} at epoch {epoch}, table says "
                        f"owner={row['owner']} epoch={row['epoch']} live={row['live']}"
                    )
        for p, ws in holders.items():
            if len(ws) > 1:
                self.violations.append(f"partition {p} usable by {ws} at once")
        for p, row in table.items():
            if row["epoch"] < self.max_epoch.get(p, 0):
                self.violations.append(f"partition {p} epoch went back from {self.max_epoch[p]} to {row['epoch']}")
            self.max_epoch[p] = max(self.max_epoch.get(p, 0), row["epoch"])
        self.samples += 1

    async def run(self) -> None:
        """Sample until cancelled; a crash is recorded as a violation, so it cannot pass unseen."""
        try:
            while True:
                await self.sample()
                await asyncio.sleep(0.02)
        except Exception as exc:
            self.violations.append(f"the sampler crashed after {self.samples} samples: {exc!r}")
            raise


async def live_shares(pool: asyncpg.Pool) -> Counter[str]:
    rows = await pool.fetch(SQL.lease_table, "leases")
    return Counter(r["owner"] for r in rows if r["live"] and r["owner"])


async def test_stale_epoch_changes_nothing(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=3)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
        a = OutboxStore(pool, SQL, "p", "worker-a")
        b = OutboxStore(pool, SQL, "p", "worker-b")
        await a.check_schema()
        held = await a.acquire(4, 1.0)
        assert sorted(held) == [0, 1, 2, 3]
        assert await b.acquire(4, 1.0) == {}  # live leases are not taken
        ids = [
            r[0]
            for r in await pool.fetch(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', '' FROM generate_series(1, 40) g RETURNING id"
            )
        ]
        old = Fence.of(held)
        await wait_for(
            lambda: pool.fetchval("SELECT bool_and(expires_at <= now()) FROM outbox_leases"), 5, "leases to expire"
        )
        taken = await b.acquire(4, 30.0)
        assert {p: taken[p] for p in taken} == {p: held[p] + 1 for p in held}  # takeover bumps every epoch
        # The stale owner renews, marks, fails, dead-letters and releases nothing.
        assert await a.renew(old, 30.0) == {}
        assert await a.mark_done(old, ids, delete=True) == 0
        assert await a.mark_done(old, ids, delete=False) == 0
        assert await a.mark_failed(old, ids, ["x"] * len(ids), [1.0] * len(ids)) == 0
        assert await a.dead_letter(old, ids, ["x"] * len(ids)) == []
        assert await a.release(old) == []
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE attempts = 0 AND published_at IS NULL") == 40
        assert await pool.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
        # The stale owner cannot use the new owner's epoch either: the fence names the owner.
        new = Fence.of(taken)
        assert await a.mark_done(new, ids, delete=True) == 0
        # The new owner can.
        assert await b.mark_done(new, ids[:10], delete=True) == 10
        assert sorted(await b.release(new)) == [0, 1, 2, 3]
        rows = await b.lease_table()
        assert all(r["owner"] is None and not r["live"] for r in rows)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def migrated_store(dsn: str) -> AsyncIterator[tuple[asyncpg.Pool, OutboxStore]]:
    """A pool over an outbox of 4 partitions, and the store of worker ``worker-a`` of publisher ``p``."""
    async with asyncpg.create_pool(dsn, min_size=1, max_size=3) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
        store = OutboxStore(pool, SQL, "p", "worker-a")
        await store.check_schema()
        yield pool, store


async def test_a_mark_changes_only_rows_of_partitions_whose_lease_still_holds(pg_dsn: str) -> None:
    """One statement carries a batch from several partitions. When some of their leases moved on,
    the rows of the others are still marked, and the moved ones' rows are left to their new owner."""
    async with migrated_store(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        assert sorted(held) == [0, 1, 2, 3]
        await pool.execute(  # partitions 2 and 3 were taken over (and given back) since the claim
            "UPDATE outbox_leases SET epoch = epoch + 1 WHERE publisher = 'p' AND partition >= 2"
        )
        fence = Fence.of(held)

        async def insert() -> tuple[list[int], set[int]]:
            rows = await pool.fetch(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', '' FROM generate_series(1, 40) g RETURNING id, partition"
            )
            assert {r["partition"] for r in rows} == {0, 1, 2, 3}
            return [r["id"] for r in rows], {r["id"] for r in rows if r["partition"] < 2}

        async def changed(ids: list[int], where: str) -> set[int]:
            rows = await pool.fetch(f"SELECT id FROM outbox WHERE id = ANY($1::bigint[]) AND {where}", ids)
            return {r["id"] for r in rows}

        ids, live = await insert()
        assert await store.mark_done(fence, ids, delete=False) == len(live)
        assert await changed(ids, "published_at IS NOT NULL") == live
        ids, live = await insert()
        assert await store.mark_failed(fence, ids, ["x"] * len(ids), [60.0] * len(ids)) == len(live)
        assert await changed(ids, "attempts = 1") == live
        ids, live = await insert()
        assert set(await store.dead_letter(fence, ids, ["x"] * len(ids))) == live
        dead = {r["id"] for r in await pool.fetch("SELECT id FROM outbox_dead_letters")}
        assert dead == live
        ids, live = await insert()
        assert await store.mark_done(fence, ids, delete=True) == len(live)
        assert await changed(ids, "true") == set(ids) - live


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("delete", [True, False])
async def test_a_claim_carries_a_fenced_mark_and_never_returns_the_rows_it_skips(
    pg_dsn: str, ordered: bool, delete: bool
) -> None:
    """The mark of acked rows rides on the next claim (AckedRows): one statement writes it under
    its fence and claims other rows. The claim reads the snapshot from before the mark, so it must
    skip the marked ids and those of marks still in flight; a stale fence changes nothing."""
    async with migrated_store(pg_dsn) as (pool, store):
        held = await store.acquire(4, 30.0)
        parts = sorted(held)
        rows = await pool.fetch(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'o', (g % 10)::text, 'e', '' FROM generate_series(1, 40) g RETURNING id"
        )
        ids = [r["id"] for r in rows]
        acked, in_flight = ids[:6], ids[6:9]  # the mark carried, and another mark not answered yet
        remaining = set(ids) - set(acked) - set(in_flight)

        stale = {p: e + 1 for p, e in held.items()}
        claim = await store.claim(parts, 100, ordered, MarkFirst(Fence.of(stale), acked, acked + in_flight, delete))
        assert claim.marked == 0  # a fence that does not hold: nothing changed
        assert {r.id for r in claim.rows} == remaining  # skipped all the same
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 40

        for limit in (100, 5):  # shares that fit, and a cut batch
            claim = await store.claim(
                parts, limit, ordered, MarkFirst(Fence.of(held), acked, acked + in_flight, delete)
            )
            assert claim.marked == (len(acked) if limit == 100 else 0)  # marked once: the second time, nothing left
            claimed = [r.id for r in claim.rows]
            assert set(claimed) <= remaining
            assert len(claimed) == len(remaining) if limit == 100 else 1 <= len(claimed) <= limit
            assert [(r.partition, r.id) for r in claim.rows] == sorted((r.partition, r.id) for r in claim.rows)
        left = {r["id"] for r in await pool.fetch("SELECT id FROM outbox WHERE published_at IS NULL")}
        assert left == set(ids) - set(acked)
        if not delete:
            assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == len(acked)
        else:
            assert await pool.fetchval("SELECT count(*) FROM outbox") == 40 - len(acked)

        # Nothing left to claim: the one row returned carries only the count.
        claim = await store.claim(parts, 100, ordered, MarkFirst(Fence.of(held), in_flight, ids, delete))
        assert (claim.rows, claim.marked) == ([], len(in_flight))
        # The statement commits without waiting for its WAL flush, and only it: the pool's connections
        # (statements of leases and marks on their own) keep the server's setting.
        assert {await pool.fetchval("SHOW synchronous_commit") for _ in range(6)} == {"on"}


async def test_acked_rows_no_claim_carries_are_marked_within_the_linger_and_before_their_release(
    pg_dsn: str,
) -> None:
    """Acked rows wait for a claim to carry their mark, but not for long: with no claim, the mark is
    written on its own after the linger; and a partition is released only after the marks of its
    waiting rows were written (else its next owner would publish them again)."""
    async with migrated_store(pg_dsn) as (pool, store):
        await store.join(30.0)
        lost: list[int] = []
        ids = [
            r[0]
            for r in await pool.fetch(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', '' FROM generate_series(1, 20) g RETURNING id"
            )
        ]

        async def pending() -> int:
            return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))

        # The linger: nothing claims, the mark is written on its own.
        leases = LeaseManager(store, LeaseConfig(ttl_seconds=30.0), 4, Metrics("p"))
        await leases.tick()
        held = {p: lease.epoch for p, lease in leases.leases.items()}
        assert sorted(held) == [0, 1, 2, 3]
        acked = AckedRows(store, delete=True, fenced_out=lost.append, linger=0.05)
        assert acked.add(held, ids[:10])
        assert await pending() == 20
        await wait_for(lambda: _equals(pending(), 10), 2, "the lingering mark")
        assert (acked.flushed, acked.carried, lost) == (10, 0, [])

        # The release: rows waiting (a linger far away) are marked first, under the lease they hold.
        acked = AckedRows(store, delete=True, fenced_out=lost.append, linger=60.0)
        leases.before_release = acked.flush_before_release
        assert acked.add(held, ids[10:])
        await leases.release_all(1.0)
        assert await pending() == 0
        assert (acked.flushed, lost, leases.leases) == (10, [], {})
        assert all(r["owner"] is None for r in await store.lease_table())


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_owners_never_overlap_and_shares_rebalance(pg_dsn: str, nats_url: str) -> None:
    partitions = 12
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, partitions)
            await prepare(conn, SQL)
        workers: list[Running] = []
        sampler = LeaseSampler(pool, workers)
        sampler_task = asyncio.create_task(sampler.run())
        plan = ProducerPlan(events=3000, aggregates=300, producers=3, rate_per_s=300, rollback_ratio=0.1)
        producer = asyncio.create_task(produce(pg_dsn, SQL, plan))
        convergence = TTL + RENEW + 1.0  # about one TTL + renew, with 1 s for scheduling slack

        async def shares_are(expected: list[int]) -> bool:
            shares = await live_shares(pool)
            return sorted(shares.values()) == expected and set(shares) == {w.id for w in workers}

        try:
            workers.append(await start(worker_settings(pg_dsn, nats_url, "w1")))
            await wait_for(lambda: shares_are([12]), convergence, "w1 to own all partitions")

            for wid, expected in (("w2", [6, 6]), ("w3", [4, 4, 4])):
                workers.append(await start(worker_settings(pg_dsn, nats_url, wid)))
                joined = time.monotonic()  # started: connected, stream checked, joined the membership
                await wait_for(lambda e=expected: shares_are(e), convergence, f"shares {expected} after {wid} joined")
                assert time.monotonic() - joined <= convergence

            left = time.monotonic()
            leaving = workers.pop(1)
            await stop(leaving)
            await wait_for(lambda: shares_are([6, 6]), convergence, "shares [6, 6] after w2 left")
            assert time.monotonic() - left <= convergence + 5.0  # stop itself may take a batch
            assert leaving.id not in await live_shares(pool)

            await asyncio.wait_for(producer, 60)
            await wait_for(
                lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 30, "the outbox to drain", interval=0.2
            )
        finally:
            sampler_task.cancel()
            producer.cancel()
            for r in workers:
                await stop(r)
        assert sampler.samples > 100
        assert sampler.violations == [], sampler.violations[:5]
        # Every takeover bumped an epoch: the table saw handovers.
        assert sum(sampler.max_epoch.values()) > partitions
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.lost, report.duplicates, report.order_violations, report.pending) == (0, 0, 0, 0)
    assert report.events == plan.events


@pytest.mark.parametrize("n", [2, 3])
async def test_simultaneous_start_splits_fairly(pg_dsn: str, nats_url: str, n: int) -> None:
    """Workers starting together (a Deployment rollout) converge without a leader to shares within one."""
    partitions = 7
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=2) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, partitions)
            await prepare(conn, SQL)
        workers = list(await asyncio.gather(*(start(worker_settings(pg_dsn, nats_url, f"w{i}")) for i in range(n))))
        sampler = LeaseSampler(pool, workers)
        sampler_task = asyncio.create_task(sampler.run())
        try:

            async def fair() -> bool:
                shares = await live_shares(pool)
                counts = [shares.get(w.id, 0) for w in workers]
                return sum(counts) == partitions and max(counts) - min(counts) <= 1

            await wait_for(fair, TTL + RENEW + 1.0, "a fair split")
            await produce(pg_dsn, SQL, ProducerPlan(events=500, aggregates=50, producers=2))
            await wait_for(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 30, "drain", interval=0.2)
        finally:
            sampler_task.cancel()
            for r in workers:
                await stop(r)
        assert sampler.violations == [], sampler.violations[:5]
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert report.published == report.events == 500


async def test_a_worker_that_cannot_renew_stops_publishing_before_its_lease_expires(pg_dsn: str, nats_url: str) -> None:
    """Renewals block (someone holds a lock on the lease table) while a long batch is being published:
    the worker sends no wave later than ack_timeout + margin before its lease expires on the database
    clock, so every publish it sent resolves before another worker could take the partition."""
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=2) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 2)
            await prepare(conn, SQL)
        # One aggregate: per-aggregate order makes its events one-message waves, 10000 in one batch,
        # which takes longer to publish than the lease stays usable without renewals.
        plan = ProducerPlan(events=10000, aggregates=1, producers=1, events_per_tx=500, rollback_ratio=0)
        await produce(pg_dsn, SQL, plan)
        settings = worker_settings(pg_dsn, nats_url, "w1", batch_size=10000, loops=1)
        r = await start(settings)
        waves = record_waves(r.worker)  # (monotonic, wall) when each wave was sent
        try:
            await wait_for(lambda: _true(len(waves) > 50), 10, "publishing to start")
            async with pool.acquire() as locker:
                tx = locker.transaction()
                await tx.start()
                await locker.execute("LOCK TABLE outbox_leases IN ACCESS EXCLUSIVE MODE")
                locked_at = time.monotonic()
                expires = await locker.fetchval("SELECT EXTRACT(EPOCH FROM max(expires_at))::float8 FROM outbox_leases")
                assert r.worker.leases is not None
                usable_until = max(lease.usable_until for lease in r.worker.leases.leases.values())
                await asyncio.sleep(TTL + 1.0)  # past the lease's expiry
                during = [(w.sent_at, w.sent_wall) for w in waves if w.sent_at >= locked_at]
                await tx.rollback()
            assert during, "the batch was still being published when renewals stopped"
            last_mono, last_wall = max(during)
            # no wave after the local deadline (checked before the wave is built: allow for building it)
            assert last_mono <= usable_until + 0.05
            # the last publish resolves (ack or timeout) before the lease expires on the database clock
            assert last_wall + settings.ack_timeout_seconds < expires
            # and the worker recovers once the lock is gone
            await wait_for(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 20, "drain", interval=0.2)
        finally:
            await stop(r)
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.published, report.duplicates, report.order_violations) == (10000, 0, 0)


async def _true(value: bool) -> bool:
    return value


@dataclass
class GapSampler:
    """Samples the lease table every few milliseconds and records, per partition, how long it stayed
    without a live owner: the time no worker may publish it (its rows wait)."""

    pool: asyncpg.Pool
    started: dict[int, float] = field(default_factory=dict)  # partition -> when it became unowned
    gaps: list[tuple[int, float]] = field(default_factory=list)  # (partition, seconds unowned)
    samples: int = 0

    async def run(self) -> None:
        while True:
            rows = await self.pool.fetch(SQL.lease_table, "leases")
            now = time.monotonic()
            for r in rows:
                p, owned = r["partition"], bool(r["owner"] and r["live"])
                if not owned:
                    self.started.setdefault(p, now)
                elif p in self.started:
                    self.gaps.append((p, now - self.started.pop(p)))
            self.samples += 1
            await asyncio.sleep(0.005)

    def longest(self) -> float:
        return max((seconds for _, seconds in self.gaps), default=0.0)


async def test_a_partition_changes_hands_without_a_gap_when_workers_join_and_leave(pg_dsn: str, nats_url: str) -> None:
    """Shares change (a worker joins, a worker drains and leaves): the releasing worker announces the
    release and the new owner takes it at once, not at its next lease tick. The ticks here are 3 s
    apart, so a handover that waits for a tick leaves partitions unowned for up to 3 s."""
    partitions = 12
    slow_ticks = {"lease_ttl_seconds": 9.0, "lease_renew_seconds": 3.0, "poll_interval_seconds": 3.0}
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, partitions)
            await prepare(conn, SQL)
        workers: list[Running] = []
        plan = ProducerPlan(events=4000, aggregates=400, producers=3, rate_per_s=400)
        producer = asyncio.create_task(produce(pg_dsn, SQL, plan))
        gaps = GapSampler(pool)
        sampler = LeaseSampler(pool, workers)
        sampler_task = asyncio.create_task(sampler.run())
        gap_task: asyncio.Task[None] | None = None
        converge = 8.0  # bounded waits; the gap assertion below is what the test is about

        async def shares_are(expected: list[int]) -> bool:
            shares = await live_shares(pool)
            return sorted(shares.values()) == expected and set(shares) == {w.id for w in workers}

        try:
            workers.append(await start(worker_settings(pg_dsn, nats_url, "w1", **slow_ticks)))
            await wait_for(lambda: shares_are([12]), converge, "w1 to own all partitions")
            gap_task = asyncio.create_task(gaps.run())  # from here on every partition has an owner
            for wid, expected in (("w2", [6, 6]), ("w3", [4, 4, 4])):
                workers.append(await start(worker_settings(pg_dsn, nats_url, wid, **slow_ticks)))
                await wait_for(lambda e=expected: shares_are(e), converge, f"shares {expected} after {wid} joined")
            for expected in ([6, 6], [12]):
                await stop(workers.pop())
                await wait_for(lambda e=expected: shares_are(e), converge, f"shares {expected} after a worker left")
            await asyncio.sleep(0.1)  # one more sample after the last handover
            await asyncio.wait_for(producer, 60)
            await wait_for(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 30, "drain", interval=0.2)
        finally:
            if gap_task is not None:
                gap_task.cancel()
            sampler_task.cancel()
            producer.cancel()
            for r in workers:
                await stop(r)
        assert gaps.samples > 100
        # The handovers happened: at least 6 + 4 + 4 + 6 partitions changed owner after w1's first 12
        # acquisitions (a gap shorter than one sample may go unseen by the gap sampler, never by epochs).
        assert sum(sampler.max_epoch.values()) >= partitions + 20, sampler.max_epoch
        assert gaps.longest() < 1.0, sorted(gaps.gaps, key=lambda g: -g[1])[:5]
        assert gaps.started == {}, f"partitions left without an owner: {gaps.started}"
        assert sampler.violations == [], sampler.violations[:5]
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.lost, report.duplicates, report.order_violations, report.pending) == (0, 0, 0, 0)
    assert report.events == plan.events


async def test_a_database_that_stops_answering_is_reported_until_it_answers_again(
    own_pg: ControlledPostgres, nats_url: str
) -> None:
    """The worker's lease renewals are its steady database round trip: while they fail for 10 s or
    more its report carries databaseError (DatabaseReady=False, DatabaseUnavailable, in the
    operator), never the DSN; the first renewal that succeeds clears it."""
    from test_relay_failures import worker_settings

    from support.relay import running, setup_db

    await setup_db(own_pg.dsn)
    settings = worker_settings(own_pg.dsn, nats_url, lease_ttl_seconds=3.0, db_timeout_seconds=2.0)
    async with running(settings) as worker:
        assert worker.leases is not None
        leases = worker.leases
        await wait_for(lambda: leases.owned, 10, "the worker holding partitions")
        assert worker.report().databaseError == ""
        own_pg.kill()
        try:
            await assert_reported_while_down(worker)
        finally:
            own_pg.restart()
        await wait_for(lambda: worker.report().databaseError == "", 30, "databaseError cleared after the restart")


async def test_a_backlog_the_worker_cannot_count_is_reported_unknown_not_as_its_last_count(
    own_pg: ControlledPostgres, nats_url: str
) -> None:
    """The pressure sample counts the due rows every 5 s. While PostgreSQL does not answer it fails;
    the report kept the last count and age and sent them as current (the operator's Lagging stayed
    False, its autoscaler acted on them). Now the report leaves both out (None: the merge patch
    removes them) until a sample succeeds again."""
    from test_relay_failures import worker_settings

    from support.relay import running, setup_db

    await setup_db(own_pg.dsn)
    settings = worker_settings(own_pg.dsn, nats_url, lease_ttl_seconds=3.0, db_timeout_seconds=2.0)
    async with running(settings) as worker:
        assert worker.leases is not None
        leases = worker.leases
        await wait_for(lambda: leases.owned, 10, "the worker holding partitions")
        async with asyncio.timeout(10):
            await worker.sample_pressure()
        counted = worker.report()
        assert (counted.backlog, counted.oldestPendingSeconds) == (0, 0.0)
        own_pg.kill()
        try:
            async with asyncio.timeout(10):  # the pool's command timeout is 2 s
                await worker.sample_pressure()
            down = worker.report()
            assert (down.backlog, down.oldestPendingSeconds) == (None, None), down
            assert "backlog" not in {k for k, v in down.to_status().items() if v is not None}
        finally:
            own_pg.restart()

        async def counted_again() -> bool:
            async with asyncio.timeout(10):
                await worker.sample_pressure()
            return worker.report().backlog is not None

        await wait_for(counted_again, 30, "a backlog counted again after the restart")


async def test_a_database_that_dies_as_the_worker_starts_running_is_reported_and_survived(
    own_pg: ControlledPostgres, nats_url: str
) -> None:
    """PostgreSQL dies between the worker's start (connected, joined) and its run (first lease tick,
    the join's announcement, the side tasks): the worker keeps running and reports databaseError,
    as it does for an outage later on, and relays once the database is back. The join's
    announcement failed there once with an error asyncpg does not class as a connection error, and
    ended the worker before its lease loop ever ran."""
    from test_relay_failures import insert, worker_settings

    from support.relay import setup_db

    await setup_db(own_pg.dsn)
    worker = Worker(
        WorkerConfig.from_settings(worker_settings(own_pg.dsn, nats_url, lease_ttl_seconds=3.0, db_timeout_seconds=2.0))
    )
    await worker.start()
    own_pg.kill()
    task = asyncio.create_task(worker.run())
    try:
        try:
            await assert_reported_while_down(worker, task)
        finally:
            own_pg.restart()
        await wait_for(lambda: worker.report().databaseError == "", 30, "databaseError cleared after the restart")
        conn = await asyncpg.connect(own_pg.dsn)
        try:
            await insert(conn, "order", "after-the-outage")
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
                30,
                "the row committed after the outage published",
            )
        finally:
            await conn.close()
        assert not task.done()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 15)


async def assert_reported_while_down(worker: Worker, task: asyncio.Task[None] | None = None) -> None:
    """Wait for the worker's report to carry databaseError, and check what it says (never the DSN)."""

    def reported() -> str:
        assert task is None or not task.done(), f"the worker ended: {task.exception()!r}"
        return worker.report().databaseError

    down = await wait_for(reported, 30, "databaseError while PostgreSQL is down")
    assert down.startswith("the database has not answered lease renewals for ")
    assert "lease renewal failed: " in down
    assert "postgresql://" not in down


async def test_a_lease_announcement_that_fails_in_any_way_is_logged_not_raised(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Announcing a lease change is best effort (peers rebalance at their next tick anyway), so no
    failure of it may escape: here the pool is closed, and asyncpg raises InterfaceError, neither a
    PostgresError nor an OSError."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    assert pool is not None
    async with pool.acquire() as conn:
        await migrate(conn, SQL, 4)
    store = OutboxStore(pool, SQL, "p", "worker-a")
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):  # what the announcement's statement raises now
        await pool.execute(SQL.lease_notify, SQL.lease_channel, store.instance)
    await store.announce_lease_change()
    assert "lease change announcement failed (InterfaceError)" in caplog.text
