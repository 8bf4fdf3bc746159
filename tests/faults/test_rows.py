"""Faults in the data: producers that commit out of id order and roll back, poison rows, malformed
rows. The relay must neither skip a late-committed row nor publish a rolled-back one, must
dead-letter what can never be published (with the reason) without holding up other aggregates, and
must not let one bad row stop its partition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from faults.harness import (
    Rig,
    assert_clean,
    bulk_insert,
    check,
    fetch,
    insert_rows,
    produce,
    wait_drained,
    worker_logs,
)


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
    """A payload over the server's max_payload and a subject token that can never be valid: the relay
    knows before sending, so each is dead-lettered at once (attempts 1) with its reason; the events
    after it in the same aggregate are published after it, in order (the documented policy: an
    aggregate waits for its failing row until it succeeds or is dead-lettered); other aggregates
    flow meanwhile."""
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
    assert [(d["aggregate_id"], d["attempts"]) for d in dead] == [("huge", 1), ("badsubj", 1), ("badsubj", 1)]
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
    assert dead[0]["reason"].startswith("invalid_header: ")
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


SAMPLED_TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"  # the relay adds Nats-Trace-Dest to it


async def test_oversized_headers_and_identifiers_mixed_into_traffic(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """While producers commit normal traffic, rows whose header block exceeds nats-server's 64 KiB
    (a 70 KB ``baggage`` header, a 70 KB ``tenant``, a 70 KB ``aggregate_id``: both copied into
    headers) are committed into the same aggregates, between good events. Two workers relay. Every
    bad row is dead-lettered (``header_too_large``, once), every good event of those aggregates is
    published after it in order, and the checker is clean. Before #19 such a row was retried
    forever (400/10097) and its aggregate never drained."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    for i in range(2):
        rig.worker(f"w{i}")
    producers = asyncio.create_task(produce(rig.dsn, rig.sql, 6_000, aggregates=300, producers=4, rate=2_000))
    big = "z" * 70_000  # over nats-server's 65,535-byte header block, far under max_payload
    bad_ids: set[str] = set()
    mixed = 0
    for k in range(12):
        agg = f"mixed-{k}"
        rows = await insert_rows(
            rig.dsn,
            rig.sql,
            [
                {"aggregate_id": agg, "payload": b"good-1"},
                {
                    "aggregate_id": agg,
                    "headers": {"baggage": big, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
                },
                {"aggregate_id": agg, "payload": b"good-2"},
                {"aggregate_id": agg, "tenant": big},
                {"aggregate_id": agg, "payload": b"good-3", "tenant": "acme"},
                {"aggregate_id": big + str(k), "payload": b"the id itself is too long"},
            ],
        )
        bad_ids |= {rows[1][1], rows[3][1], rows[5][1]}
        mixed += len(rows)
        await asyncio.sleep(0.2)  # spread over the producers' run
    stats = await asyncio.wait_for(producers, 90)
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0, 0], worker_logs(rig)
    dead = await fetch(rig.dsn, f"SELECT event_id::text AS event_id, attempts, reason FROM {rig.sql.dead_letters}")
    report = await check(
        rig,
        "oversized header blocks and identifiers mixed into traffic",
        f"{len(bad_ids)} rows over the 64 KiB header limit (baggage, tenant, aggregate_id of 70 KB) between "
        f"good events of 12 aggregates, among {stats.committed:,} produced events; 2 workers",
        seconds=time.monotonic() - started,
    )
    assert {d["event_id"] for d in dead} == bad_ids
    assert {d["attempts"] for d in dead} == {1}
    assert all(d["reason"].startswith("header_too_large: ") for d in dead)
    for w in rig.workers:
        assert "400/10097" not in w.log_text()  # refused before sending: the server never saw one
    assert report.published == stats.committed + mixed - len(bad_ids)
    assert_clean(report, dead_lettered=len(bad_ids))
