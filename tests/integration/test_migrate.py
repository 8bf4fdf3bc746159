"""`outboxctl migrate` against a real PostgreSQL: idempotent, refuses a changed partition count, refuses
unsafe identifiers, installs a NOTIFY trigger, and gives the claim a plan that walks the pending index."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from outbox_common.envelope import created_at_text
from outbox_worker.adapters.history_io import ledger_ddl
from outbox_worker.adapters.store import OutboxStore, SchemaError, connect_pool, migrate
from outbox_worker.core.history import check_history
from outbox_worker.core.sql import COMPATIBLE_FROM, SCHEMA_VERSION, Sql

SQL = Sql.for_table("public", "outbox")


@dataclass
class Cli:
    code: int
    out: str
    err: str


async def outboxctl(*args: str, timeout: float = 60) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out: leave no process behind
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Cli(proc.returncode, out.decode(), err.decode())


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    return {r[0] for r in rows}


async def test_migrate_creates_everything_and_is_idempotent(pg_dsn: str) -> None:
    first = await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "8")
    assert first.code == 0, first.err
    assert "public.outbox: created (8 partitions)" in first.out
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await tables(conn) == {
            "public.outbox",
            "public.outbox_leases",
            "public.outbox_workers",
            "public.outbox_dead_letters",
            "public.outbox_requeued",
            "public.outbox_meta",
        }
        # a row inserted with only the contract's required columns gets the rest by default
        row = await conn.fetchrow(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "VALUES ('order', 'o-1', 'created', '\\x7b7d') RETURNING *"
        )
        assert row is not None
        assert 0 <= row["partition"] < 8
        assert row["event_id"] is not None
        assert row["attempts"] == 0
        assert row["headers"] == "{}"
        assert row["published_at"] is None
        schema_before = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )

        second = await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "8")
        assert second.code == 0, second.err
        assert "public.outbox: up to date (8 partitions)" in second.out
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 1  # data kept
        assert (
            await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
            == schema_before
        )
        assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify'") == 1
        # the same aggregate always lands in the same partition; the hash spreads aggregates
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'order', (g % 200)::text, 'e', '' FROM generate_series(1, 2000) g"
        )
        per_aggregate = "SELECT max(c) FROM (SELECT count(DISTINCT partition) c FROM outbox GROUP BY aggregate_id) x"
        assert await conn.fetchval(per_aggregate) == 1
        assert await conn.fetchval("SELECT count(DISTINCT partition) FROM outbox") == 8
        # event ids are unique: a replayed insert of the same event fails in the application's tx
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                "VALUES ($1, 'order', 'o-1', 'created', '')",
                row["event_id"],
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) "
                "VALUES ('order', 'o-1', 'created', '', '[1]')"
            )
    finally:
        await conn.close()


async def test_migrate_without_partitions_keeps_the_tables_own_count(pg_dsn: str) -> None:
    """An upgrade runs `migrate` without knowing the count the table was created with: it keeps it
    (instead of refusing because the default, 16, differs); a new table gets 16."""
    assert (await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "8")).code == 0
    again = await outboxctl("migrate", "--database-url", pg_dsn)
    assert again.code == 0, again.err
    assert "public.outbox: up to date (8 partitions)" in again.out
    fresh = await outboxctl("migrate", "--database-url", pg_dsn, "--table", "fresh")
    assert fresh.code == 0, fresh.err
    assert "public.fresh: created (16 partitions)" in fresh.out
    conn = await asyncpg.connect(pg_dsn)
    try:
        counts = dict(await conn.fetch("SELECT table_name, partitions FROM outbox_meta"))
        assert counts == {"outbox": 8, "fresh": 16}
    finally:
        await conn.close()


async def test_migrate_refuses_a_different_partition_count(pg_dsn: str) -> None:
    assert (await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "8")).code == 0
    again = await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "16")
    assert again.code == 3
    assert "public.outbox was created with 8 partitions" in again.err
    assert "--partitions 16 differs" in again.err
    assert "Keep 8" in again.err
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT partitions FROM outbox_meta WHERE table_name = 'outbox'") == 8
        gen = await conn.fetchval(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a "
            "ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE a.attname = 'partition' "
            "AND d.adrelid = 'public.outbox'::regclass"
        )
        assert "% (8)::bigint" in gen
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--table", "outbox; DROP TABLE victim; --"], "not a valid identifier"),
        (["--table", 'outbox" (id int); DROP TABLE victim; --'], "not a valid identifier"),
        (["--schema", "public; DROP TABLE victim"], "not a valid identifier"),
        (["--table", "Outbox"], "not a valid identifier"),
    ],
)
async def test_migrate_rejects_bad_identifiers_and_touches_nothing(pg_dsn: str, flags: list[str], needle: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE victim (id int)")
        result = await outboxctl("migrate", "--database-url", pg_dsn, *flags)
        assert result.code == 2
        assert needle in result.err
        assert await tables(conn) == {"public.victim"}
    finally:
        await conn.close()


async def test_migrate_into_a_custom_schema_and_table(pg_dsn: str) -> None:
    result = await outboxctl(
        "migrate", "--database-url", pg_dsn, "--schema", "relay", "--table", "orders_outbox", "--partitions", "4"
    )
    assert result.code == 0, result.err
    assert "relay.orders_outbox: created (4 partitions)" in result.out
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        store = OutboxStore(pool, Sql.for_table("relay", "orders_outbox"), "p", "w1")
        assert await store.check_schema() == 4
        assert len(await store.lease_table()) == 4  # one lease row per partition, seeded
        missing = OutboxStore(pool, Sql.for_table("relay", "other"), "p", "w1")
        with pytest.raises(SchemaError, match="outboxctl migrate"):
            await missing.check_schema()
    finally:
        await pool.close()


async def test_the_longest_schema_and_table_fit_postgresqls_channel_names_and_one_more_is_refused(
    pg_dsn: str,
) -> None:
    """The NOTIFY channels <schema>.<table> (the trigger's, on every INSERT) and <schema>.<table>_leases
    must fit PostgreSQL's 63 bytes: at 55 characters together both work, one more is refused by
    migrate before it touches anything, as PostgreSQL would refuse its lease channel."""
    schema, table = "s" * 5, "t" * 50
    result = await outboxctl("migrate", "--database-url", pg_dsn, "--schema", schema, "--table", table)
    assert result.code == 0, result.err
    sql = Sql.for_table(schema, table)
    conn = await asyncpg.connect(pg_dsn)
    try:
        heard: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener(sql.lease_channel, lambda _c, _pid, _channel, payload: heard.put_nowait(payload))
        await conn.execute(  # the trigger's pg_notify
            f"INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', '1', 'e', '')"
        )
        await conn.execute(sql.lease_notify, sql.lease_channel, "me")
        assert await asyncio.wait_for(heard.get(), 5) == "me"
        longer = schema + "s"
        with pytest.raises(asyncpg.PostgresError, match="channel name too long"):
            await conn.execute(sql.lease_notify, f"{longer}.{table}_leases", "")

        refused = await outboxctl("migrate", "--database-url", pg_dsn, "--schema", longer, "--table", table)
        assert refused.code == 2
        assert "table and schema are 56 characters together" in refused.err
        assert not [t for t in await tables(conn) if t.startswith(f"{longer}.")]
    finally:
        await conn.close()


async def test_concurrent_migrations_serialise(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, SQL, 16) for c in conns))
        assert sorted(r.created for r in results) == [False, False, False, True]
        assert {r.partitions for r in results} == {16}
    finally:
        for c in conns:
            await c.close()


async def test_migrate_reports_an_unreachable_database(pg_dsn: str) -> None:
    result = await outboxctl("migrate", "--database-url", "postgresql://u:secret-pw@127.0.0.1:1/db")
    assert result.code == 4
    assert "not reachable" in result.err
    assert "secret-pw" not in result.err + result.out


async def test_notify_trigger_fires_once_per_committed_insert_statement(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    listener = await asyncpg.connect(pg_dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await migrate(conn, SQL, 4)
        await listener.add_listener(SQL.channel, lambda _c, _pid, channel, _payload: got.put_nowait(channel))
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', '' FROM generate_series(1, 50) g"
            )
            await asyncio.sleep(0.1)
            assert got.empty()  # nothing before commit
        assert await asyncio.wait_for(got.get(), 5) == "public.outbox"
        # a rolled-back insert wakes nobody
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o','1','e','')"
        )
        await tx.rollback()
        await conn.execute("SELECT pg_notify('public.outbox', 'marker')")
        assert await asyncio.wait_for(got.get(), 5) == "public.outbox"
        assert got.empty()
    finally:
        await listener.close()
        await conn.close()


async def _plan(conn: asyncpg.Connection, name: str, statement: str, args: str) -> dict:  # type: ignore[type-arg]
    await conn.execute(f"PREPARE {name} AS {statement}")
    text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({args})")
    return json.loads(text)[0]["Plan"]  # type: ignore[no-any-return]


def _nodes(plan: dict) -> list[dict]:  # type: ignore[type-arg]
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def _analyze(conn: asyncpg.Connection, name: str, args: str) -> dict:  # type: ignore[type-arg]
    """The executed plan of a statement :func:`_plan` prepared (its rows are read, nothing changes)."""
    text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({args})")
    return json.loads(text)[0]["Plan"]  # type: ignore[no-any-return]


def _probes(plan: dict) -> list[dict]:  # type: ignore[type-arg]
    """The hold-back's per-row probes of the held index (not its one look for any held row)."""
    return [n for n in _nodes(plan) if "aggregate_id = o.aggregate_id" in n.get("Index Cond", "")]


def _scans(plan: dict) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    nodes = [(n["Node Type"], n.get("Relation Name", ""), n.get("Index Name", "")) for n in _nodes(plan)]
    return [s for s in nodes if "Scan" in s[0]]


@pytest.mark.parametrize("table", ["mark mode: published history", "delete mode: a backlog, partition 0 empty"])
async def test_claim_uses_the_pending_index_under_a_generic_plan(pg_dsn: str, table: str) -> None:
    """A claim walks each partition's pending rows and nothing else. On a table of pending rows only
    (delete mode), the unordered claims were planned as a walk of the primary key filtered by
    partition: a partition with no due rows read the whole backlog of the others."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 16)
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'o', (g % 500)::text, 'e', 'x' FROM generate_series(1, 30000) g"
        )
        if table.startswith("mark"):  # mostly published rows and a pending tail
            await conn.execute("UPDATE outbox SET published_at = now() WHERE id <= 29000")
        else:  # and rows in retry backoff, none of them in the claimed partitions
            await conn.execute("DELETE FROM outbox WHERE partition = 0")
            await conn.execute("UPDATE outbox SET not_before = now() + interval '1 minute' WHERE partition >= 4")
        await conn.execute("ANALYZE outbox")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for name in ("claim_ordered", "claim_unordered", "claim_ordered_uncut", "claim_unordered_uncut"):
            plan = await _plan(conn, name, getattr(SQL, name), "'{0,1,2,3}'::int[], 250, 1000, 1048576")
            scans = _scans(plan)
            walks = [s for s in scans if s[1] == "outbox" and s[2] != "outbox_held_idx"]  # held: the hold-back
            assert walks == [("Index Scan", "outbox", "outbox_pending_idx")], scans
            assert all(s[0] != "Seq Scan" for s in scans), scans
            if name.startswith("claim_ordered"):  # nothing of theirs is held back: no probe runs
                executed = await _analyze(conn, name, "'{0,1,2,3}'::int[], 250, 1000, 1048576")
                assert [n["Actual Loops"] for n in _probes(executed)] == [0], executed
            if name.endswith("_uncut"):  # what it saves: the ranking's window and its two extra sorts
                kinds = [n["Node Type"] for n in _nodes(plan)]
                assert "WindowAgg" not in kinds, kinds
                assert kinds.count("Sort") == 1, kinds
        # fenced marks find rows by primary key, not by scanning, and read the fence once: joined per
        # row (a nested loop over the fence), the check cost ~1 ms per 1,000-row delete
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        fence = "'p', 'w', '{0,1,2,3}'::int[], '{1,1,1,1}'::bigint[], '{29001,29002}'::bigint[]"
        marks = {
            "mark": (SQL.mark_delete, fence),
            "mark_pub": (SQL.mark_published, fence),
            "mark_failed": (SQL.mark_failed, fence + ", '{a,b}'::text[], '{1,1}'::float8[]"),
            "mark_dead": (SQL.dead_letter, fence + ", '{a,b}'::text[]"),
        }
        for name, (statement, args) in marks.items():
            plan = await _plan(conn, name, statement, args)
            assert all(s[0] != "Seq Scan" or s[1] != "outbox" for s in _scans(plan)), (name, _scans(plan))
            fence_reads = [n for n in _nodes(plan) if n["Node Type"] == "CTE Scan" and n.get("CTE Name") == "fence"]
            assert len(fence_reads) == 1, (name, fence_reads)
            assert fence_reads[0].get("Parent Relationship") == "InitPlan", (name, plan)
        # a claim carrying a mark (AckedRows): the same walk of the pending index, the mark by
        # primary key, nothing scanned
        skip = "'{29001,29002}'::bigint[]"
        for delete in (True, False):
            for ordered in (True, False):
                name = f"after_mark_{int(delete)}{int(ordered)}"
                statement = SQL.claim_after_mark(ordered=ordered, cut=True, delete=delete)
                args = f"{fence}, '{{0,1,2,3}}', 250, 1000, {skip}, 1048576"
                args = args.replace("::int[]", "").replace("::bigint[]", "")  # its arrays are passed as text
                plan = await _plan(conn, name, statement, args)  # its arrays are passed as text
                scans = _scans(plan)
                walks = [s for s in scans if s[1] == "outbox" and s[2] not in ("outbox_held_idx", "outbox_pkey")]
                assert walks == [("Index Scan", "outbox", "outbox_pending_idx")], scans
                assert all(s[0] != "Seq Scan" for s in scans if s[1] == "outbox"), scans
    finally:
        await conn.close()


@pytest.mark.parametrize("analyzed", [False, True])
async def test_hold_back_probes_by_aggregate_with_thousands_of_rows_in_backoff(pg_dsn: str, analyzed: bool) -> None:
    """After a broker outage thousands of rows wait in retry backoff. The claim must probe the held
    index per candidate by (partition, aggregate_id, id), never scan a partition's held rows per
    candidate (that plan ran claims past the statement timeout once the broker came back)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 8)
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'o', (g % 2000)::text, 'e', 'x' FROM generate_series(1, 30000) g"
        )
        await conn.execute(  # 4,000 rows of the even aggregates wait for a retry
            "UPDATE outbox SET not_before = now() + interval '1 minute', attempts = 1 "
            "WHERE id <= 8000 AND aggregate_id::int % 2 = 0"
        )
        if analyzed:
            await conn.execute("ANALYZE outbox")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = await _plan(conn, "claim_held", SQL.claim_ordered, "'{0,1,2,3}'::int[], 250, 1000, 1048576")
        held = [n for n in _nodes(plan) if n.get("Index Name") == "outbox_held_idx"]
        probes = _probes(plan)
        assert probes, plan
        for node in probes:
            assert "id < o.id" in node["Index Cond"], node
        # the only other use of the held index: one look per partition for any held row
        others = [n for n in held if n not in probes]
        assert [n["Index Cond"] for n in others] == ["((partition >= p.partition) AND (partition <= p.partition))"]
        executed = await _analyze(conn, "claim_held", "'{0,1,2,3}'::int[], 250, 1000, 1048576")
        assert all(n["Actual Loops"] > 0 for n in _probes(executed)), executed  # rows are held: probes run
        looks = [n for n in _nodes(executed) if n.get("Subplan Name", "").startswith("InitPlan")]
        assert [n["Actual Loops"] for n in looks] == [4], looks  # once per claimed partition
        assert not any("aggregate_id" in n.get("Join Filter", "") for n in _nodes(plan)), plan
        rows = await conn.fetch("EXECUTE claim_held('{0,1,2,3}'::int[], 250, 1000, 1048576)")
        assert rows  # aggregates with nothing in backoff still flow
        held_aggregates = {
            r["aggregate_id"] for r in await conn.fetch("SELECT DISTINCT aggregate_id FROM outbox WHERE attempts > 0")
        }
        assert not held_aggregates & {r["aggregate_id"] for r in rows}
    finally:
        await conn.close()


async def test_claim_spreads_a_batch_over_partitions_and_keeps_it_full(pg_dsn: str) -> None:
    """A batch takes the first pending rows of every partition (so it holds few events per aggregate),
    in (partition, id) order; once some partitions are idle, the busy ones get their share."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
            await conn.execute(  # ~100 rows in each partition (the partition is a hash of aggregate_id)
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', 'x' FROM generate_series(1, 400) g"
            )
        late = await pool.fetchval("SELECT aggregate_id FROM outbox WHERE partition = 3 LIMIT 1")
        store = OutboxStore(pool, SQL, "p", "w")
        rows, more, _ = await store.claim([0, 1, 2, 3], 20, True)
        assert [r.partition for r in rows] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
        assert all(a.id < b.id for a, b in itertools.pairwise(rows) if a.partition == b.partition)
        assert more == {0, 1, 2, 3}  # each returned its whole share
        # the first rows of each partition, in id order
        first = await pool.fetch("SELECT partition, min(id) AS id FROM outbox GROUP BY partition ORDER BY 1")
        assert [r.id for r in rows[::5]] == [r["id"] for r in first]
        # partitions 2 and 3 run dry: after one claim that sees it, 0 and 1 fill the batch
        await pool.execute("DELETE FROM outbox WHERE partition IN (2, 3)")
        await pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r.id for r in rows])
        rows, more, _ = await store.claim([0, 1, 2, 3], 20, True)
        assert len(rows) == 10
        assert more == {0, 1}
        rows, more, _ = await store.claim([0, 1, 2, 3], 20, True)
        assert [r.partition for r in rows] == [0] * 10 + [1] * 10
        assert more == {0, 1}
        # rows arriving in an idle partition are claimed at once, within the batch limit
        await pool.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', $1, 'e', 'x')", late
        )
        rows, more, _ = await store.claim([0, 1, 2, 3], 20, True)
        assert len(rows) == 20
        assert 3 in {r.partition for r in rows}
        assert more == {0, 1, 3}  # cut to the limit: every partition that had rows may have more
        # the last rows: not full, nothing more
        await pool.execute("DELETE FROM outbox WHERE partition <> 1")
        remaining = await pool.fetchval("SELECT count(*) FROM outbox")
        rows, more, _ = await store.claim([0, 1, 2, 3], 1000, True)
        assert len(rows) == remaining
        assert not more
    finally:
        await pool.close()


async def test_uncut_claim_returns_what_the_cut_claim_returns_when_the_shares_fit(pg_dsn: str) -> None:
    """The store runs the uncut claim whenever shares x partitions <= limit: it must return exactly
    the cut claim's rows and columns then, held-back aggregates included."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 8)
        await conn.execute(  # uneven partitions: some hold fewer rows than a share
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'o', (g % 37)::text, 'e', 'x' FROM generate_series(1, 600) g"
        )
        await conn.execute(  # aggregate 5 waits for a retry, aggregate 6 for a delayed publish
            "UPDATE outbox SET not_before = now() + interval '1 minute', attempts = 1 "
            "WHERE id = (SELECT min(id) FROM outbox WHERE aggregate_id = '5')"
        )
        await conn.execute(
            "UPDATE outbox SET not_before = now() + interval '1 minute' WHERE id = "
            "(SELECT min(id) FROM outbox WHERE aggregate_id = '6')"
        )
        for cut, uncut in (("claim_ordered", "claim_ordered_uncut"), ("claim_unordered", "claim_unordered_uncut")):
            for parts, share, limit in (([0, 1, 2, 3, 4, 5, 6, 7], 12, 100), ([1, 4, 6], 40, 120), ([2], 500, 500)):
                want = await conn.fetch(getattr(SQL, cut), parts, share, limit, 1048576)
                got = await conn.fetch(getattr(SQL, uncut), parts, share, limit, 1048576)
                assert [tuple(r) for r in got] == [tuple(r) for r in want], (uncut, parts)
                assert list(got[0].keys()) == list(want[0].keys())
    finally:
        await conn.close()


async def test_store_runs_the_uncut_claim_only_when_the_shares_fit(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 4)
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'o', g::text, 'e', 'x' FROM generate_series(1, 400) g"
            )
        ran: list[tuple[str, int]] = []

        class Recording:  # the real pool, noting which claim ran with which share
            async def fetch(self, stmt: str, *args: Any) -> list[asyncpg.Record]:
                ran.append(({SQL.claim_ordered: "cut", SQL.claim_ordered_uncut: "uncut"}[stmt], args[1]))
                return await pool.fetch(stmt, *args)

        store = OutboxStore(Recording(), SQL, "p", "w")  # type: ignore[arg-type]
        # every partition busy: 30 // 4 = 7 each, 28 rows, no cut
        rows, _, _ = await store.claim([0, 1, 2, 3], 30, True)
        assert ran[-1] == ("uncut", 7)
        assert len(rows) == 28
        # partition 3 runs dry: the busy three get ceil(30 / 3) = 10, and the idle one too: cut to 30
        await pool.execute("DELETE FROM outbox WHERE partition = 3")
        await store.claim([0, 1, 2, 3], 30, True)
        rows, _, _ = await store.claim([0, 1, 2, 3], 30, True)
        assert ran[-1] == ("cut", 10)
        assert len(rows) == 30
        # fewer rows than partitions in the limit: a share of one row each would not fit
        await store.claim([0, 1, 2], 2, True)
        assert ran[-1] == ("cut", 1)
    finally:
        await pool.close()


async def test_claimed_created_at_is_the_header_text_whatever_the_session_settings(pg_dsn: str) -> None:
    """The claim renders created_at as Outbox-Created-At's text (RFC 3339, UTC, microseconds): the
    same text as created_at_text gives for the same instant, whatever the database's TimeZone and
    DateStyle. A time RFC 3339 cannot write (BC, infinity), in a table from before schema version 2
    (without the CHECK), arrives as '' (the relay dead-letters it, never sends a wrong time)."""
    instants = [
        datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5))),  # no microseconds
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # a year of three digits
        datetime(2026, 7, 1, 12, 0, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 1)
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{database}\" SET TimeZone = 'Asia/Kolkata'")
        await conn.execute(f"ALTER DATABASE \"{database}\" SET DateStyle = 'SQL, DMY'")
        for ts in instants:
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
                "VALUES ('o', 'a', 'e', 'x', $1)",
                ts,
            )
        await conn.execute("ALTER TABLE outbox DROP CONSTRAINT outbox_rfc3339")  # as before version 2
        for bad in ("infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "10000-01-01 00:00:00+00"):
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
                "VALUES ('o', 'a', 'e', 'x', $1::text::timestamptz)",
                bad,
            )
    finally:
        await conn.close()
    pool = await connect_pool(pg_dsn, size=1)  # new sessions: the database's settings apply
    try:
        assert await pool.fetchval("SHOW TimeZone") == "Asia/Kolkata"
        rows, _, _ = await OutboxStore(pool, SQL, "p", "w").claim([0], 100, False)
    finally:
        await pool.close()
    assert [r.created_at for r in rows] == [*(created_at_text(ts) for ts in instants), "", "", "", ""]
    assert rows[1].created_at == "2026-01-02T08:04:05.000000+00:00"
    assert rows[2].created_at == "0999-12-31T23:59:59.999999+00:00"


async def test_ledger_and_checker_wiring(pg_dsn: str) -> None:
    """The checker sees an unrelayed committed event as pending, not lost (the suite's judge works)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute(ledger_ddl(SQL))
        from outbox_worker.adapters.history_io import read_truth

        async with conn.transaction():
            r = await conn.fetchrow(SQL.insert_event, "o", "1", "e", b"", "{}", "")
            assert r is not None
            await conn.execute(
                "INSERT INTO outbox_ledger (event_id, aggregate, outbox_id) VALUES ($1, 'o/1', $2)", r[1], r[0]
            )
        committed, pending, dead = await read_truth(conn, SQL)
        report = check_history(committed, [], pending, dead)
        assert (report.events, report.pending, report.lost) == (1, 1, 0)
        await conn.execute("DELETE FROM outbox")
        committed, pending, dead = await read_truth(conn, SQL)
        assert check_history(committed, [], pending, dead).lost == 1
    finally:
        await conn.close()


async def test_the_pool_releases_without_a_reset_round_trip_and_still_rolls_back(pg_dsn: str) -> None:
    """asyncpg's default reset sends a statement on every release: a round trip after each claim and
    mark. The relay's pool sends none, and a transaction left open is still rolled back."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 1)
    finally:
        await conn.close()
    pool = await connect_pool(pg_dsn, size=1)  # one connection: every acquire gets the same session
    try:
        sent: list[str] = []
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda q: sent.append(q.query))
        assert await pool.fetchval("SELECT 1") == 1
        await pool.execute("SELECT 2")
        assert sent == ["SELECT 1", "SELECT 2"]
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', '1', 'e', '')"
            )
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        assert sent[-2:] == ["ROLLBACK", "SELECT count(*) FROM outbox"]
    finally:
        await pool.close()


async def test_schema_version_2_refuses_times_rfc3339_cannot_write_and_upgrades_old_tables(pg_dsn: str) -> None:
    """A BC date or infinity in created_at is refused by the table (CHECK), so Outbox-Created-At is
    always RFC 3339. Upgrading a version-1 table that already holds such rows succeeds (NOT VALID:
    old rows are left to the relay), is idempotent, and records version 2."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 2)
        for bad in ("infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "10000-01-01 00:00:00+00"):
            with pytest.raises(asyncpg.CheckViolationError, match="outbox_rfc3339"):
                await conn.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
                    "VALUES ('o', 'a', 'e', 'x', $1::text::timestamptz)",
                    bad,
                )
        for fine in ("0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00"):
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
                "VALUES ('o', 'a', 'e', 'x', $1::text::timestamptz)",
                fine,
            )
        # a version-1 table: no constraint, no instance column, version 1, and a row of infinity
        await conn.execute("ALTER TABLE outbox DROP CONSTRAINT outbox_rfc3339")
        await conn.execute("ALTER TABLE outbox_workers DROP COLUMN instance")
        await conn.execute("UPDATE outbox_meta SET schema_version = 1")
        await conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
            "VALUES ('o', 'a', 'e', 'x', 'infinity')"
        )
        for _ in range(2):
            await migrate(conn, SQL, 2)
        assert await conn.fetchval("SELECT schema_version FROM outbox_meta") == 2
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE conname = 'outbox_rfc3339'") == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE created_at = 'infinity'") == 1
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) "
                "VALUES ('o', 'a', 'e', 'x', 'infinity')"
            )
        # a newer version recorded by a newer tool is never lowered by an older one
        await conn.execute("UPDATE outbox_meta SET schema_version = 7")
        await migrate(conn, SQL, 2)
        assert await conn.fetchval("SELECT schema_version FROM outbox_meta") == 7
    finally:
        await conn.close()


# --- compatibility level: outbox_meta.compatible_from ------------------------------------------------
NEWER = SCHEMA_VERSION + 1  # a table migrated by a future release
# What `outboxctl migrate` of the releases before compatible_from ran on outbox_meta (their meta_select
# and meta_insert, verbatim): they must keep working on a table migrated by this release, and not undo it.
PREVIOUS_META_SELECT = 'SELECT partitions, schema_version FROM "public"."outbox_meta" WHERE table_name = $1'
PREVIOUS_META_INSERT = (
    'INSERT INTO "public"."outbox_meta" (table_name, partitions, schema_version) VALUES ($1, $2, $3) '
    'ON CONFLICT (table_name) DO UPDATE SET schema_version = GREATEST("public"."outbox_meta".schema_version, '
    "excluded.schema_version)"
)
STORE_LOGGER = "outbox_worker.adapters.store"


async def meta(conn: asyncpg.Connection, table: str = "outbox") -> tuple[int, int | None]:
    row = await conn.fetchrow(
        "SELECT schema_version, (to_jsonb(m) ->> 'compatible_from')::int FROM outbox_meta AS m WHERE table_name = $1",
        table,
    )
    assert row is not None
    return row[0], row[1]


async def check_schema(dsn: str, table: str = "outbox") -> int:
    """A worker's start-up check of the table, as `outboxctl worker` runs it."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        return await OutboxStore(pool, Sql.for_table("public", table), "p", "w1").check_schema()
    finally:
        await pool.close()


def newer_schema_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == STORE_LOGGER and "newer than this worker" in r.getMessage()
    ]


async def test_migrate_records_the_compatibility_level_and_prints_it(pg_dsn: str) -> None:
    first = await outboxctl("migrate", "--database-url", pg_dsn, "--partitions", "4")
    assert first.code == 0, first.err
    if COMPATIBLE_FROM == SCHEMA_VERSION:  # a release whose migration older workers cannot run against
        workers = f"schema version {SCHEMA_VERSION}"
    else:
        workers = f"schema versions {COMPATIBLE_FROM} to {SCHEMA_VERSION}"
    assert (
        f"public.outbox: created (4 partitions), schema version {SCHEMA_VERSION}; workers of {workers} run against it"
    ) in first.out
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await meta(conn) == (SCHEMA_VERSION, COMPATIBLE_FROM)
    finally:
        await conn.close()


@pytest.mark.parametrize("compatible_from", sorted({COMPATIBLE_FROM, SCHEMA_VERSION - 1, SCHEMA_VERSION}))
async def test_a_worker_runs_against_a_newer_table_that_is_compatible_and_warns(
    pg_dsn: str, compatible_from: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer release's migration that older workers can run against (an added column with a
    default, an index): a worker of this release that (re)starts after it runs, and says to roll
    out the new image."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute("UPDATE outbox_meta SET schema_version = $1, compatible_from = $2", NEWER, compatible_from)
    finally:
        await conn.close()
    with caplog.at_level("WARNING", logger=STORE_LOGGER):
        assert await check_schema(pg_dsn) == 4
    [warning] = newer_schema_warnings(caplog)
    assert f"public.outbox has schema version {NEWER}, newer than this worker's {SCHEMA_VERSION}" in warning
    assert f"compatible with workers of schema version {compatible_from} and newer" in warning
    assert "roll out the new worker image" in warning


async def test_a_worker_refuses_a_newer_table_that_is_not_compatible_with_the_fix(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute("UPDATE outbox_meta SET schema_version = $1, compatible_from = $1", NEWER)
    finally:
        await conn.close()
    with caplog.at_level("WARNING", logger=STORE_LOGGER), pytest.raises(SchemaError) as refused:
        await check_schema(pg_dsn)
    assert str(refused.value) == (
        f"public.outbox has schema version {NEWER}, newer than this worker's {SCHEMA_VERSION}, and needs "
        f"workers of schema version {NEWER} or newer: roll out the new worker image (the release whose "
        "`outboxctl migrate` upgraded the table)"
    )
    assert newer_schema_warnings(caplog) == []


async def test_a_table_without_the_column_is_checked_as_before_and_migrate_adds_it(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """outbox_meta as the releases before compatible_from left it: workers of this release run
    against its version, refuse a newer or an older one as before; `migrate` adds the column."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute("ALTER TABLE outbox_meta DROP COLUMN compatible_from")
        with caplog.at_level("WARNING", logger=STORE_LOGGER):
            assert await check_schema(pg_dsn) == 4
        assert newer_schema_warnings(caplog) == []

        await conn.execute("UPDATE outbox_meta SET schema_version = $1", NEWER)
        with pytest.raises(SchemaError, match=f"newer than this worker's {SCHEMA_VERSION}, and records no "):
            await check_schema(pg_dsn)

        await conn.execute("UPDATE outbox_meta SET schema_version = $1", SCHEMA_VERSION - 1)
        with pytest.raises(SchemaError, match=f"older than this worker's {SCHEMA_VERSION}: run `outboxctl migrate"):
            await check_schema(pg_dsn)

        await migrate(conn, SQL, 4)
        assert await meta(conn) == (SCHEMA_VERSION, COMPATIBLE_FROM)
        assert await check_schema(pg_dsn) == 4
    finally:
        await conn.close()


async def test_migrate_never_lowers_the_schema_version_or_the_compatibility_level(pg_dsn: str) -> None:
    """A table a newer release migrated, migrated again by this one (a concurrent run, a rollback of
    the tool): both values stay the newer release's, and the output says so."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute("UPDATE outbox_meta SET schema_version = $1, compatible_from = $2", NEWER + 1, NEWER)
        again = await outboxctl("migrate", "--database-url", pg_dsn)
        assert again.code == 0, again.err
        assert (
            f"public.outbox: up to date (4 partitions), schema version {NEWER + 1}; "
            f"workers of schema versions {NEWER} to {NEWER + 1} run against it"
        ) in again.out
        assert await meta(conn) == (NEWER + 1, NEWER)
        # a newer version without a level (set by hand): read as "only workers of that version",
        # and migrate records that instead of this release's level
        await conn.execute("UPDATE outbox_meta SET compatible_from = NULL")
        assert (await migrate(conn, SQL, None)).compatible_from == NEWER + 1
        assert await meta(conn) == (NEWER + 1, NEWER + 1)
    finally:
        await conn.close()


async def test_migrate_of_a_release_before_the_column_keeps_this_ones_level(pg_dsn: str) -> None:
    """The previous release's `outboxctl migrate` on a table this release (or a newer one) migrated:
    it still runs, lowers neither value, and a table it creates records no level (its workers'
    version is the table's: they run as before)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute("UPDATE outbox_meta SET schema_version = $1, compatible_from = $2", NEWER, SCHEMA_VERSION)
        async with conn.transaction():
            row = await conn.fetchrow(PREVIOUS_META_SELECT, "outbox")
            assert row is not None
            assert tuple(row) == (4, NEWER)
            await conn.execute(PREVIOUS_META_INSERT, "outbox", 4, SCHEMA_VERSION)
            await conn.execute(PREVIOUS_META_INSERT, "older", 4, SCHEMA_VERSION)
        assert await meta(conn) == (NEWER, SCHEMA_VERSION)
        assert await meta(conn, "older") == (SCHEMA_VERSION, None)
        await migrate(conn, Sql.for_table("public", "older"), None)
        assert await meta(conn, "older") == (SCHEMA_VERSION, COMPATIBLE_FROM)
    finally:
        await conn.close()


async def test_concurrent_migrations_of_tables_sharing_outbox_meta_add_the_column(pg_dsn: str) -> None:
    """Migrations of several tables of one schema, at once, on an outbox_meta without the column
    (the first upgrade to this release): each adds it or finds it, none deadlocks on the others."""
    names = [f"outbox_{i}" for i in range(4)]
    conn = await asyncpg.connect(pg_dsn)
    try:
        for name in names:
            await migrate(conn, Sql.for_table("public", name), 4)
        await conn.execute("ALTER TABLE outbox_meta DROP COLUMN compatible_from")
    finally:
        await conn.close()
    for _ in range(3):  # a deadlock depends on the interleaving (with the column added too late: every run)
        conns = [await asyncpg.connect(pg_dsn) for _ in names]
        try:
            await asyncio.gather(
                *(migrate(c, Sql.for_table("public", n), None) for c, n in zip(conns, names, strict=True))
            )
            assert [await meta(conns[0], n) for n in names] == [(SCHEMA_VERSION, COMPATIBLE_FROM)] * len(names)
            await conns[0].execute("ALTER TABLE outbox_meta DROP COLUMN compatible_from")
        finally:
            for c in conns:
                await c.close()


async def test_a_dsn_query_setting_postgresql_refuses_is_a_one_line_configuration_error(pg_dsn: str) -> None:
    """asyncpg hands query parameters it does not know to the server, which refuses an unknown one
    (a libpq-only connect_timeout, a typo) or a bad value at connect: exit 3 with one line naming
    the setting, not exit 1 with a traceback."""
    sep = "&" if "?" in pg_dsn else "?"
    for query, named in (("connect_timeout=5", "connect_timeout"), ("options=-c%20work_mem%3Dxx", "work_mem")):
        out = await outboxctl("migrate", "--database-url", f"{pg_dsn}{sep}{query}")
        assert out.code == 3, out.err
        assert "PostgreSQL refused a setting of the DSN's query string" in out.err
        assert named in out.err
        assert "Traceback" not in out.err


def test_a_database_that_goes_away_during_a_command_exits_unavailable(
    own_pg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate and dead-letters run on one connection (``run_on_connection``): PostgreSQL crashing
    while the command's statements run is the database being unavailable (exit 4, one line, never the
    DSN), as when it cannot be reached at all; not a traceback and exit 1."""
    from outbox_cli.main import EXIT_UNAVAILABLE, run_on_connection

    async def act(conn: asyncpg.Connection) -> int:
        assert await conn.fetchval("SELECT 1") == 1  # connected: what follows happens mid-command
        own_pg.kill()
        await conn.fetchval("SELECT 2")
        raise AssertionError("a statement on a crashed server returned")

    try:
        code = run_on_connection(own_pg.dsn, act)
    finally:
        own_pg.restart()
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE, err
    assert err.startswith("error: PostgreSQL is not reachable: "), err
    assert "postgresql://" not in err


@pytest.mark.parametrize("cause", ["client timeout", "statement_timeout", "closed pipe"])
def test_errors_that_say_nothing_of_the_connection_are_the_commands_to_report(pg_dsn: str, cause: str) -> None:
    """A statement over the client's timeout or the server's statement_timeout (the server answered:
    slow, not gone) and a command's own print to a closed pipe are not 'PostgreSQL is not
    reachable': run_on_connection hands them to the command (dead-letters says to act on fewer rows
    at a time), as they were raised."""
    from outbox_cli.main import run_on_connection

    async def act(conn: asyncpg.Connection) -> int:
        if cause == "client timeout":
            await conn.fetchval("SELECT pg_sleep(2)", timeout=0.1)
        elif cause == "statement_timeout":
            await conn.execute("SET statement_timeout = 100")
            await conn.fetchval("SELECT pg_sleep(2)")
        else:
            raise BrokenPipeError(32, "Broken pipe")
        raise AssertionError("the statement returned")

    expected = {
        "client timeout": TimeoutError,
        "statement_timeout": asyncpg.QueryCanceledError,
        "closed pipe": BrokenPipeError,
    }[cause]
    with pytest.raises(expected):
        run_on_connection(pg_dsn, act)


@pytest.mark.parametrize("lock_timeout", [None, "200"])
async def test_a_migrate_held_up_by_another_sessions_lock_says_so_and_changes_nothing(
    pg_dsn: str, lock_timeout: str | None
) -> None:
    """A migrate waits for the locks of its tables; behind a long transaction it meets the CLI's
    statement timeout (10 s), or PostgreSQL's lock_timeout when the role or DSN sets one. Either is
    one line naming the likely cause and exit 1, with nothing changed: not a bare TimeoutError
    traceback."""
    first = await outboxctl("migrate", "--database-url", pg_dsn)
    assert first.code == 0, first.err
    holder = await asyncpg.connect(pg_dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
            separator = "&" if "?" in pg_dsn else "?"
            dsn = pg_dsn if lock_timeout is None else f"{pg_dsn}{separator}lock_timeout={lock_timeout}"
            held = await outboxctl("migrate", "--database-url", dsn)
    finally:
        await holder.close()
    assert held.code == 1, held.err
    assert held.err.startswith("error: migrate did not finish in time ("), held.err
    assert "nothing was changed (it is one transaction)" in held.err
    assert "other sessions hold (a long transaction, another migrate)" in held.err
    assert "Traceback" not in held.err


async def test_a_role_that_may_not_create_the_tables_is_told_what_it_needs(pg_dsn: str) -> None:
    role = f"plain_{os.urandom(4).hex()}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        dsn = pg_dsn.replace("//postgres@", f"//{role}@", 1)
        assert dsn != pg_dsn
        refused = await outboxctl("migrate", "--database-url", dsn)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
    assert refused.code == 3, refused.err
    assert "the database role may not create or change public.outbox's tables (permission denied" in refused.err
    assert "run migrate as their owner, or as a role that may CREATE" in refused.err
    assert "Traceback" not in refused.err


async def test_a_role_given_its_own_schema_migrates_without_create_on_the_database(pg_dsn: str) -> None:
    """The usual grant of a cautious administrator: a schema owned by the relay's role, no CREATE on
    the database. ``CREATE SCHEMA IF NOT EXISTS`` is refused even for a schema that exists
    (PostgreSQL checks the database's CREATE first), so migrate failed with exit 3 for a role that
    may create everything it needs."""
    role = f"owner_{os.urandom(4).hex()}"
    schema = f"relay_{os.urandom(4).hex()}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
        dsn = pg_dsn.replace("//postgres@", f"//{role}@", 1)
        assert dsn != pg_dsn
        probe = await asyncpg.connect(dsn)
        try:  # the role may not create a schema: the case this test is about
            assert not await probe.fetchval("SELECT has_database_privilege(current_database(), 'CREATE')")
        finally:
            await probe.close()
        migrated = await outboxctl("migrate", "--database-url", dsn, "--schema", schema)
        again = await outboxctl("migrate", "--database-url", dsn, "--schema", schema)
        created = await admin.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tableowner = $2", schema, role
        )
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
    assert migrated.code == 0, migrated.err
    assert migrated.out.startswith(f"{schema}.outbox: created (16 partitions)"), migrated.out
    assert again.code == 0, again.err
    assert "up to date" in again.out
    assert created >= 4  # outbox, its leases, workers and dead letters, outbox_meta
