"""Faults in the data: producers that commit out of id order and roll back, poison rows, malformed
rows. The relay must neither skip a late-committed row nor publish a rolled-back one, must
dead-letter what can never be published (with the reason) without holding up other aggregates, and
must not let one bad row stop its partition."""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
import pytest

from faults.harness import Rig, assert_clean, bulk_insert, check, fetch, insert_rows, produce, wait_drained


async def test_out_of_order_commits_and_20pct_rollbacks(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """Producers hold 30% of their transactions open for 0.3 s (so higher ids commit before lower
    ones) and roll back 20% of them, while two workers relay. 0 lost (no row skipped), 0 phantom
    (no rolled-back event published)."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    workers = [rig.worker(f"w{i}") for i in range(2)]
    stats = await produce(
        rig.dsn,
        rig.sql,
        8_000,
        producers=8,
        tx_size=10,
        rollback_ratio=0.2,
        slow_ratio=0.3,
        slow_seconds=0.3,
        aggregates=400,
        timeout=90,
    )
    gaps = await fetch(
        rig.dsn,
        f'SELECT count(*) AS n FROM "{rig.sql.schema}"."{rig.sql.table}_ledger" l '
        f'JOIN "{rig.sql.schema}"."{rig.sql.table}_ledger" m ON m.outbox_id = l.outbox_id + 1 '
        "WHERE m.committed_at < l.committed_at",
    )
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0, 0]
    assert all(w.exit_codes == [0] for w in workers)
    report = await check(
        rig,
        "producers: out-of-order commits + 20% rollbacks",
        f"8 producers, 30% of transactions held 0.3s, {stats.rolled_back:,} events rolled back "
        f"({stats.rolled_back / (stats.rolled_back + stats.committed):.0%}); {gaps[0]['n']:,} id pairs committed "
        "out of order; 2 workers",
        seconds=time.monotonic() - started,
        extra={"rolled_back": stats.rolled_back, "out_of_order_pairs": gaps[0]["n"]},
    )
    assert stats.rolled_back > 0.15 * (stats.rolled_back + stats.committed)
    assert gaps[0]["n"] > 0
    assert_clean(report)


async def test_poison_rows_dead_lettered_others_unaffected(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """A payload over the server's max_payload and a subject token that can never be valid: each is
    dead-lettered with its reason after ``max_attempts`` (3); the events after it in the same
    aggregate are published after it, in order (the documented policy: an aggregate waits for its
    failing row until it succeeds or is dead-lettered); other aggregates flow meanwhile."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 2000, 200)
    await insert_rows(
        rig.dsn,
        rig.sql,
        [
            {"aggregate_id": "huge", "payload": b"x" * (1024 * 1024 + 10)},
            {"aggregate_id": "huge", "payload": b"after-huge-1"},
            {"aggregate_id": "huge", "payload": b"after-huge-2"},
            {"aggregate_id": "badsubj", "aggregate_type": "", "payload": b"no aggregate type"},
            {"aggregate_id": "badsubj", "aggregate_type": "t" * 300, "payload": b"300-char token"},
            {"aggregate_id": "badsubj", "payload": b"after-badsubj"},
        ],
    )
    await bulk_insert(rig.dsn, rig.sql, 2000, 200)
    started = time.monotonic()
    rig.worker("w1")
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0]
    dead = await fetch(
        rig.dsn, f"SELECT aggregate_id, aggregate_type, attempts, reason FROM {rig.sql.dead_letters} ORDER BY id"
    )
    report = await check(
        rig,
        "poison rows (payload > max_payload, invalid subject token)",
        "1 row over max_payload, 2 rows whose subject token is empty / 300 chars, each followed by normal "
        f"rows of the same aggregate, among 4,000 others; dead-lettered after {sorted({d['attempts'] for d in dead})} "
        "attempts",
        seconds=time.monotonic() - started,
    )
    assert [(d["aggregate_id"], d["attempts"]) for d in dead] == [("huge", 3), ("badsubj", 3), ("badsubj", 3)]
    assert "payload_too_large" in dead[0]["reason"]
    assert "invalid_subject" in dead[1]["reason"]
    assert "empty" in dead[1]["reason"]
    assert "invalid_subject" in dead[2]["reason"]
    assert "longer than" in dead[2]["reason"]
    assert_clean(report, dead_lettered=3)


async def test_malformed_rows_do_not_stop_their_partition(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """Rows an application can write but the relay cannot use as they are. ``headers`` that is not a
    JSON object is refused by the table itself (a CHECK constraint: the producer's transaction fails
    with a clear error, nothing half-written). A header name NATS refuses is dead-lettered with the
    reason; CR/LF in a header value cannot inject a header; non-string values are sent as JSON.
    None of them stops the partition: every other row is relayed."""
    rig = make_rig(pg_dsn, nats_url, partitions=1)  # one partition: a stuck claim would stop everything
    await rig.prepare()
    await rig.create_stream()
    for bad in ("[1, 2]", '"just a string"', "null"):
        with pytest.raises(asyncpg.CheckViolationError, match="headers"):
            await insert_rows(rig.dsn, rig.sql, [{"aggregate_id": "ok"}, {"aggregate_id": "m0", "headers": bad}])
    assert (await fetch(rig.dsn, f'SELECT count(*) AS n FROM "{rig.sql.table}_ledger"'))[0]["n"] == 0
    await bulk_insert(rig.dsn, rig.sql, 500, 50)
    await insert_rows(
        rig.dsn,
        rig.sql,
        [
            {"aggregate_id": "m4", "headers": {"bad key: with space": "v"}},
            {"aggregate_id": "m4", "payload": b"after the bad header name"},
            {"aggregate_id": "m5", "headers": {"x-trace": "a\r\nNats-Msg-Id: forged"}},
            {"aggregate_id": "m6", "headers": {"nested": {"a": [1, 2]}, "n": 5}},
        ],
    )
    await bulk_insert(rig.dsn, rig.sql, 500, 50)
    started = time.monotonic()
    w = rig.worker("w1")
    await wait_drained(rig, 45)
    codes = rig.stop_all()
    assert codes == [0]
    dead = await fetch(rig.dsn, f"SELECT aggregate_id, reason FROM {rig.sql.dead_letters} ORDER BY id")
    report = await check(
        rig,
        "malformed rows (non-object headers, bad header name, CR/LF)",
        "3 inserts with non-object headers refused by the table; among 1,000 rows in one partition: "
        "a header name NATS refuses (dead-lettered), CR/LF in a value, nested values",
        seconds=time.monotonic() - started,
    )
    assert [d["aggregate_id"] for d in dead] == ["m4"]
    assert "invalid" in dead[0]["reason"]
    assert "header" in dead[0]["reason"]
    assert "claim failed" not in w.log_text()
    assert_clean(report, dead_lettered=1)


async def test_row_header_cannot_forge_the_dedup_id(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """A row header whose name is ``Nats-Msg-Id`` padded with whitespace must not become the
    message's dedup id: if it did, that row could claim another event's id and the other event would
    be acked as a 'duplicate' and deleted without ever being stored."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    victim = await insert_rows(rig.dsn, rig.sql, [{"aggregate_id": "victim", "payload": b"victim"}])
    victim_event = victim[0][1]
    await insert_rows(
        rig.dsn,
        rig.sql,
        [
            {"aggregate_id": "forger", "headers": {" Nats-Msg-Id": victim_event}},
            {"aggregate_id": "forger2", "headers": {"Nats-Msg-Id\t": victim_event}},
        ],
    )
    # the forgers must be published first: make the victim wait a moment
    await fetch(
        rig.dsn,
        f"UPDATE {rig.sql.outbox} SET not_before = now() + interval '2 seconds' WHERE id = $1 RETURNING id",
        victim[0][0],
    )
    started = time.monotonic()
    rig.worker("w1")
    await wait_drained(rig, 30)
    codes = rig.stop_all()
    assert codes == [0]
    report = await check(
        rig,
        "row header forging Nats-Msg-Id (' Nats-Msg-Id')",
        "2 rows carry the victim's event id under a whitespace-padded Nats-Msg-Id header",
        seconds=time.monotonic() - started,
    )
    assert_clean(report)
