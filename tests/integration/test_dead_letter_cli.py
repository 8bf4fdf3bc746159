"""``outboxctl dead-letters``: list, requeue and discard against real PostgreSQL and nats-server; a
requeued event reaches the stream exactly once, in the order README documents (history checker)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys

import asyncpg
import nats
from test_dead_letters import insert_row
from test_migrate import outboxctl
from test_relay_failures import STREAM, fetchval, worker_settings

from outbox_common import names
from outbox_worker.adapters.dead_letters import DeadLetterFilter, requeue
from outbox_worker.adapters.history_io import read_stream, verify
from support.polling import wait_for
from support.relay import SQL, running, setup_db

SMALL, BIG = b"{}", b"x" * 8000  # the stream takes at most 4096 bytes per message until it is fixed


async def counts(dsn: str) -> tuple[int, int]:
    """(rows in the outbox, dead letters)."""
    outbox = await fetchval(dsn, "SELECT count(*) FROM outbox")
    dead = await fetchval(dsn, "SELECT count(*) FROM outbox_dead_letters")
    return int(outbox), int(dead)


async def test_requeued_dead_letters_reach_the_stream_once_in_the_documented_order(pg_dsn: str, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["outbox.>"], max_msg_size=4096, duplicate_window=120)
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    settings = worker_settings(pg_dsn, nats_url, stream_mode="expect", max_attempts=1)
    db = ["--database-url", pg_dsn]
    order: dict[str, list[str]] = {}  # aggregate -> event ids in the order README promises
    try:
        # aggregates a, b, c: small, BIG, small, BIG, small; d: small only. The BIG ones are refused
        # by the stream (400/10054) and dead-lettered; their aggregates' later events flow past them.
        dead_first: dict[str, list[str]] = {}
        for agg in "abcd":
            for i in range(5):
                big = agg != "d" and i in (1, 3)
                _, event_id = await insert_row(conn, agg, payload=BIG if big else SMALL)
                (dead_first.setdefault(agg, []) if big else order.setdefault(agg, [])).append(event_id)
        async with running(settings):
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "first drain")
            # an event committed while its aggregate's earlier events are dead letters: published now
            _, meanwhile = await insert_row(conn, "a")
            order["a"].append(meanwhile)
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "second drain")
        assert await counts(pg_dsn) == (0, 6)

        listed = await outboxctl("dead-letters", "list", *db)
        assert listed.code == 0, listed.err
        assert listed.out.splitlines()[0].split() == [
            "id",
            "dead_at",
            "publisher",
            "aggregate",
            "event_type",
            "attempts",
            "bytes",
            "reason",
        ]
        assert len(listed.out.splitlines()) == 7
        as_json = await outboxctl("dead-letters", "list", *db, "--json", "--aggregate", "b", "--reason", "payload")
        rows = [json.loads(line) for line in as_json.out.splitlines()]
        assert [r["event_id"] for r in rows] == dead_first["b"]
        assert {r["reason"].split(": ")[1] for r in rows} == {"400/10054"}
        assert {(r["payload_bytes"], r["attempts"], r["requeueable"]) for r in rows} == {(8000, 1, True)}
        assert "payload" not in rows[0]
        newer = await outboxctl("dead-letters", "list", *db, "--older-than", "1h")
        assert newer.out.strip() == "no dead letters selected"

        # dry runs change nothing; a requeue without a selection is refused
        dry = await outboxctl("dead-letters", "requeue", *db, "--aggregate", "a")
        assert dry.code == 0, dry.err
        assert "dry run: would have requeued 2 dead letters; add --yes to act" in dry.out
        assert await counts(pg_dsn) == (0, 6)
        refused = await outboxctl("dead-letters", "requeue", *db)
        assert refused.code == 2
        assert "needs a selection" in refused.err

        # fix the cause, then requeue a first, and everything else; a second run finds nothing
        info = await js.stream_info(STREAM)
        info.config.max_msg_size = -1
        await js.update_stream(info.config)
        done = await outboxctl("dead-letters", "requeue", *db, "--aggregate", "a", "--yes")
        assert done.code == 0, done.err
        assert "requeued 2 dead letters" in done.out
        again = await outboxctl("dead-letters", "requeue", *db, "--aggregate", "a", "--yes")
        assert "requeued 0 dead letters" in again.out
        rest = await outboxctl("dead-letters", "requeue", *db, "--all", "--yes")
        assert "requeued 4 dead letters" in rest.out
        assert await counts(pg_dsn) == (6, 0)
        requeued = await conn.fetch(
            "SELECT o.id, o.event_id::text, o.attempts, q.dead_id FROM outbox AS o "
            "JOIN outbox_requeued AS q ON q.outbox_id = o.id ORDER BY o.id"
        )
        # original event ids, new ids after every row ever inserted, attempts reset
        assert {r["event_id"] for r in requeued} == {e for agg in "abc" for e in dead_first[agg]}
        assert min(r["id"] for r in requeued) > max(r["dead_id"] for r in requeued)
        assert {r["attempts"] for r in requeued} == {0}
        for agg in "abc":
            order[agg] += dead_first[agg]
        _, after = await insert_row(conn, "a")  # committed after the requeue: comes after it
        order["a"].append(after)

        async with running(settings):
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "requeued drain")
    finally:
        await conn.close()
        await nc.close()
    report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
    assert report.ok, report.to_dict()
    assert (report.events, report.published, report.dead_lettered) == (22, 22, 0)
    assert (report.duplicates, report.order_violations, report.seq_mismatches, report.lost) == (0, 0, 0, 0)
    stored = await read_stream(nats_url, STREAM)
    for agg, event_ids in order.items():
        assert [m.event_id for m in stored if m.aggregate == f"order/{agg}"] == event_ids, agg


async def test_discard_is_dry_by_default_transactional_and_idempotent(pg_dsn: str, nats_url: str) -> None:
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    db = ["--database-url", pg_dsn]
    try:
        for agg in ("x", "y", "y"):
            await insert_row(conn, agg, headers={"bad name": "1"})  # an invalid header name: refused
        async with running(worker_settings(pg_dsn, nats_url)):
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "drain")
        assert await counts(pg_dsn) == (0, 3)
        reasons = await conn.fetch("SELECT reason FROM outbox_dead_letters")
        assert {names.reason_of(r["reason"]) for r in reasons} == {names.REASON_INVALID_HEADER}
        dry = await outboxctl("dead-letters", "discard", *db, "--aggregate", "y")
        assert "dry run: would have discarded 2 dead letters" in dry.out
        assert await counts(pg_dsn) == (0, 3)
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM outbox_dead_letters ORDER BY id")]
        gone = await outboxctl("dead-letters", "discard", *db, "--id", str(ids[1]), "--id", str(ids[2]), "--yes")
        assert "discarded 2 dead letters" in gone.out
        again = await outboxctl("dead-letters", "discard", *db, "--id", str(ids[1]), "--yes")
        assert "discarded 0 dead letters" in again.out
        assert [r["id"] for r in await conn.fetch("SELECT id FROM outbox_dead_letters")] == [ids[0]]
        # one transaction: a requeue the table refuses as a whole leaves every dead letter in place
        await conn.execute("UPDATE outbox_dead_letters SET headers = '{}'")
        await conn.execute("ALTER TABLE outbox ADD CONSTRAINT never CHECK (aggregate_id <> 'x')")
        failed = await outboxctl("dead-letters", "requeue", *db, "--all", "--yes")
        assert failed.code == 1, failed.err
        assert "the database refused the requeue (constraint never), nothing was changed" in failed.err
        assert "Traceback" not in failed.err
        assert await counts(pg_dsn) == (0, 1)
        assert await fetchval(pg_dsn, "SELECT count(*) FROM outbox_requeued") == 0
    finally:
        await conn.close()
    missing = await outboxctl("dead-letters", "list", "--database-url", pg_dsn, "--table", "nothing")
    assert missing.code == 3
    assert "outboxctl migrate" in missing.err


async def test_a_large_selection_is_acted_on_within_the_timeout_and_printed_in_bounded_lines(pg_dsn: str) -> None:
    """80,000 dead letters (a bad deploy's worth): a dry run prints at most ~SHOWN rows, and a discard
    of all of them finishes within the CLI's 10 s statement timeout. It used to look the locked rows
    up again by an id array, a scan of the table per selected row under the pool's generic plans:
    past the timeout from ~10k rows, with a traceback and nothing done."""
    await setup_db(pg_dsn)
    n = 80_000
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO outbox_dead_letters (id, event_id, aggregate_type, aggregate_id, event_type, tenant, "
            "payload, headers, created_at, attempts, reason, publisher) "
            "SELECT g, gen_random_uuid(), 'order', (g % 97)::text, 'paid', '', '\\x00', '{}', now(), 1, "
            "'header_too_large: big', 'pub' FROM generate_series(1, $1) AS g",
            n,
        )
    finally:
        await conn.close()
    db = ["--database-url", pg_dsn]
    listed = await outboxctl("dead-letters", "list", *db, "--limit", "3")
    assert listed.code == 0, listed.err
    assert len(listed.out.splitlines()) == 4  # header + 3 rows
    assert "more match: raise --limit" in listed.err
    dry = await outboxctl("dead-letters", "requeue", *db, "--all")
    assert dry.code == 0, dry.err
    assert f"dry run: would have requeued {n} dead letters" in dry.out
    assert f"... and {n - 50} more dead letters" in dry.out
    assert len(dry.out.splitlines()) < 60
    gone = await outboxctl("dead-letters", "discard", *db, "--all", "--yes")
    assert gone.code == 0, gone.err
    assert f"discarded {n} dead letters" in gone.out
    assert len(gone.out.splitlines()) < 60
    assert await counts(pg_dsn) == (0, 0)


async def test_a_limit_acts_on_the_oldest_and_says_to_run_again(pg_dsn: str) -> None:
    """requeue and discard take --limit: the oldest that many, in one transaction, and a note that
    more may match, so a selection too large for the statement timeout is worked off in runs."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO outbox_dead_letters (id, event_id, aggregate_type, aggregate_id, event_type, tenant, "
            "payload, headers, created_at, attempts, reason, publisher) "
            "SELECT g, gen_random_uuid(), 'order', g::text, 'paid', '', '\\x00', '{}', now(), 1, "
            "'header_too_large: big', 'pub' FROM generate_series(1, 5) AS g"
        )
        db = ["--database-url", pg_dsn]
        dry = await outboxctl("dead-letters", "requeue", *db, "--all", "--limit", "2")
        assert dry.code == 0, dry.err
        assert "dry run: would have requeued 2 dead letters" in dry.out
        assert "--limit 2 reached" in dry.out
        first = await outboxctl("dead-letters", "discard", *db, "--all", "--limit", "2", "--yes")
        assert first.code == 0, first.err
        assert "discarded 2 dead letters" in first.out
        assert "run it again for the rest" in first.out
        assert [r[0] for r in await conn.fetch("SELECT id FROM outbox_dead_letters ORDER BY id")] == [3, 4, 5]
        last = await outboxctl("dead-letters", "discard", *db, "--all", "--limit", "10", "--yes")
        assert "discarded 3 dead letters" in last.out
        assert "reached" not in last.out
        assert await counts(pg_dsn) == (0, 0)
        refused = await outboxctl("dead-letters", "discard", *db, "--all", "--limit", "0")
        assert refused.code == 2
    finally:
        await conn.close()


async def dead_letters(dsn: str, n: int, headers: str = "{}") -> None:
    """Dead letters 1..n, aggregates '1'..'n', with ``headers`` (JSON)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO outbox_dead_letters (id, event_id, aggregate_type, aggregate_id, event_type, tenant, "
            "payload, headers, created_at, attempts, reason, publisher) "
            "SELECT g, gen_random_uuid(), 'order', g::text, 'paid', '', convert_to('{\"card\":\"4111-SECRET\"}', "
            "'UTF8'), $2::jsonb, now(), 1, 'header_too_large: big', 'pub' FROM generate_series(1, $1) AS g",
            n,
            headers,
        )
    finally:
        await conn.close()


async def test_a_refused_requeue_names_the_constraint_and_never_prints_the_row(pg_dsn: str) -> None:
    """PostgreSQL's error for a row a CHECK refuses carries a DETAIL quoting the whole row: payload
    and headers (a token, a card number). The command prints the error's message and the
    constraint's name only."""
    await setup_db(pg_dsn)
    await dead_letters(pg_dsn, 1, headers='{"authorization": "Bearer SECRET-TOKEN"}')
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ALTER TABLE outbox ADD CONSTRAINT no_paid_orders CHECK (event_type <> 'paid')")
    finally:
        await conn.close()
    refused = await outboxctl("dead-letters", "requeue", "--database-url", pg_dsn, "--all", "--yes")
    assert refused.code == 1, refused.err
    assert "refused the requeue (constraint no_paid_orders), nothing was changed" in refused.err
    assert "SECRET" not in refused.err + refused.out
    assert "DETAIL" not in refused.err
    assert await counts(pg_dsn) == (0, 1)


async def test_a_reader_that_goes_away_after_the_requeue_is_not_an_error(pg_dsn: str) -> None:
    """`requeue --yes | head -1`: the output is printed after the commit, so a closed pipe says
    nothing about the requeue, which is done. Exit 0 and no traceback, not exit 1, which README
    reserves for "nothing was changed"."""
    await setup_db(pg_dsn)
    await dead_letters(pg_dsn, 3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    try:
        argv = [sys.executable, "-m", "outbox_cli", "dead-letters", "requeue", "--database-url", pg_dsn]
        proc = await asyncio.create_subprocess_exec(
            *argv, "--all", "--yes", stdout=write_end, stderr=asyncio.subprocess.PIPE, env=env
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (0, "")
    assert await counts(pg_dsn) == (3, 0)


async def test_rows_another_session_holds_past_the_lock_timeout_are_one_line_and_exit_1(pg_dsn: str) -> None:
    """A role's or DSN's lock_timeout (or statement_timeout) is PostgreSQL's cancel, not the
    client's timeout: the same one line, saying another session may hold the rows, and nothing done."""
    await setup_db(pg_dsn)
    await dead_letters(pg_dsn, 2)
    holder = await asyncpg.connect(pg_dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM outbox_dead_letters WHERE id = 2 FOR UPDATE")
            dsn = pg_dsn + ("&" if "?" in pg_dsn else "?") + "lock_timeout=200"
            blocked = await outboxctl("dead-letters", "discard", "--database-url", dsn, "--all", "--yes")
    finally:
        await holder.close()
    assert blocked.code == 1, blocked.err
    assert "PostgreSQL cancelled the discard (canceling statement due to lock timeout)" in blocked.err
    assert "another session holds these rows" in blocked.err
    assert "Traceback" not in blocked.err
    assert await counts(pg_dsn) == (0, 2)


async def test_a_role_that_may_only_read_is_told_what_to_grant(pg_dsn: str) -> None:
    await setup_db(pg_dsn)
    await dead_letters(pg_dsn, 1)
    role = f"reader_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        dsn = pg_dsn.replace("//postgres@", f"//{role}@", 1)
        assert dsn != pg_dsn
        listed = await outboxctl("dead-letters", "list", "--database-url", dsn)
        refused = await outboxctl("dead-letters", "discard", "--database-url", dsn, "--all", "--yes")
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
    assert listed.code == 0, listed.err
    assert refused.code == 3, refused.err
    assert "the database role may not discard dead letters (permission denied for table" in refused.err
    assert "(UPDATE, DELETE)" in refused.err
    assert "Traceback" not in refused.err
    assert await counts(pg_dsn) == (0, 1)


async def insert_dead_letters(conn: asyncpg.Connection, event_ids: list[str]) -> None:
    """Dead letters 1..n with these event ids (a repeated one: the same event dead-lettered twice)."""
    await conn.execute(
        "INSERT INTO outbox_dead_letters (id, event_id, aggregate_type, aggregate_id, event_type, tenant, "
        "payload, headers, created_at, attempts, reason, publisher) "
        "SELECT g, e::uuid, 'order', g::text, 'paid', '', '\\x00', '{}', now(), 1, 'header_too_large: big', 'pub' "
        "FROM unnest($1::text[]) WITH ORDINALITY AS u(e, g)",
        event_ids,
    )


async def test_a_requeue_limit_counts_the_rows_it_acts_on_and_reports_those_it_skips(pg_dsn: str) -> None:
    """--limit N of a requeue is the oldest N it can requeue, not the oldest N selected: dead letters
    1 and 2 are already in the outbox (re-inserted by hand), so `--limit 2` requeues 3 and 4, names
    1 and 2 as skipped, and says to run again only while a rerun would requeue more. It used to
    select 1 and 2, requeue nothing and say "--limit 2 reached; run it again" on every run."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    db = ["--database-url", pg_dsn]
    try:
        events = [str(r[0]) for r in await conn.fetch("SELECT gen_random_uuid() FROM generate_series(1, 5)")]
        await insert_dead_letters(conn, events)
        await conn.execute(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
            "SELECT e::uuid, 'order', 'by-hand', 'paid', '\\x00' FROM unnest($1::text[]) AS e",
            events[:2],
        )
        skipped = ["skipped 1: its event_id is already in the outbox", "skipped 2: its event_id is already"]
        for flags in ([], ["--yes"]):  # the dry run says what --yes does
            out = (await outboxctl("dead-letters", "requeue", *db, "--all", "--limit", "2", *flags)).out
            verb = "requeued 2 dead letters" if flags else "would have requeued 2 dead letters"
            assert verb in out, out
            assert all(s in out for s in skipped), out
            assert "--limit 2 reached; more may match: run it again for the rest" in out
        assert [r[0] for r in await conn.fetch("SELECT dead_id FROM outbox_requeued ORDER BY dead_id")] == [3, 4]
        rest = await outboxctl("dead-letters", "requeue", *db, "--all", "--limit", "2", "--yes")
        assert rest.code == 0, rest.err
        assert "requeued 1 dead letters" in rest.out
        assert all(s in rest.out for s in skipped), rest.out
        assert "reached" not in rest.out  # nothing a rerun could requeue
        again = await outboxctl("dead-letters", "requeue", *db, "--all", "--limit", "2", "--yes")
        assert "requeued 0 dead letters" in again.out
        assert "reached" not in again.out
        assert [r[0] for r in await conn.fetch("SELECT id FROM outbox_dead_letters ORDER BY id")] == [1, 2]
        # discard acts on every row it selects: the limit is reached only when rows are left
        exact = await outboxctl("dead-letters", "discard", *db, "--all", "--limit", "2", "--yes")
        assert "discarded 2 dead letters" in exact.out
        assert "reached" not in exact.out
    finally:
        await conn.close()


async def test_a_concurrent_requeue_waits_for_the_first_then_finds_its_rows_gone(pg_dsn: str) -> None:
    """The rows a requeue acts on are locked in its transaction: a second requeue of the same
    selection waits for the first, then finds them gone and requeues none of them twice."""
    await setup_db(pg_dsn)
    first, second = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        events = [str(r[0]) for r in await first.fetch("SELECT gen_random_uuid() FROM generate_series(1, 4)")]
        await insert_dead_letters(first, events)
        outer = first.transaction()
        await outer.start()
        done = await requeue(first, SQL, DeadLetterFilter(), apply=True, limit=2)
        assert (done.done, done.more) == ([1, 2], True)
        late = asyncio.create_task(requeue(second, SQL, DeadLetterFilter(), apply=True, limit=2))
        pid = second.get_server_pid()
        waits = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
        await wait_for(lambda: fetchval(pg_dsn, waits, pid), 10, "the second requeue waiting for the first")
        await outer.commit()
        after = await late
        assert (after.selected, after.done, after.more) == ([], [], True)  # 3 and 4 are the next run's
        assert [r[0] for r in await first.fetch("SELECT dead_id FROM outbox_requeued ORDER BY dead_id")] == [1, 2]
    finally:
        await first.close()
        await second.close()


async def test_dead_letters_of_one_event_id_requeue_the_oldest_and_skip_the_others(pg_dsn: str) -> None:
    """The same event dead-lettered twice (or re-inserted by hand and dead-lettered again): a requeue
    puts back the oldest dead letter of each event id and skips the others, in the dry run as with
    --yes, and the listing says so. It used to promise all of them, then fail as a whole on the
    requeue log's primary key (the outbox's event_id is unique: both copies cannot go back)."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    db = ["--database-url", pg_dsn]
    try:
        a, b, c = [str(r[0]) for r in await conn.fetch("SELECT gen_random_uuid() FROM generate_series(1, 3)")]
        await insert_dead_letters(conn, [a, a, b, c, a])  # dead letters 1-5

        async def requeueable() -> dict[int, bool]:
            listed = await outboxctl("dead-letters", "list", *db, "--json")
            return {r["id"]: r["requeueable"] for r in map(json.loads, listed.out.splitlines())}

        assert await requeueable() == {1: True, 2: False, 3: True, 4: True, 5: False}
        alone = await outboxctl("dead-letters", "requeue", *db, "--id", "5")  # 1 is the one to requeue
        assert "would have requeued 0 dead letters" in alone.out
        assert "skipped 5: " in alone.out
        for flags in ([], ["--yes"]):  # the dry run says what --yes does
            run = await outboxctl("dead-letters", "requeue", *db, "--all", *flags)
            assert run.code == 0, run.err
            assert ("requeued 3 dead letters" if flags else "would have requeued 3 dead letters") in run.out
            assert "skipped 2: " in run.out
            assert "skipped 5: " in run.out
        requeued = await conn.fetch("SELECT dead_id, event_id::text FROM outbox_requeued ORDER BY dead_id")
        assert [tuple(r) for r in requeued] == [(1, a), (3, b), (4, c)]
        assert sorted(r[0] for r in await conn.fetch("SELECT event_id::text FROM outbox")) == sorted([a, b, c])
        assert await requeueable() == {2: False, 5: False}  # their event id is in the outbox now
        # once the outbox no longer holds event a (its rows swept), 2 is the oldest copy: it goes
        # back, 5 is skipped, and a rerun would requeue nothing (no note)
        await conn.execute("DELETE FROM outbox")
        limited = await outboxctl("dead-letters", "requeue", *db, "--all", "--limit", "1", "--yes")
        assert limited.code == 0, limited.err
        assert "requeued 1 dead letters" in limited.out
        assert "skipped 5: " in limited.out
        assert "reached" not in limited.out
        assert [r[0] for r in await conn.fetch("SELECT id FROM outbox_dead_letters")] == [5]
    finally:
        await conn.close()
