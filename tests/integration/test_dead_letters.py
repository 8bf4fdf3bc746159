"""Rows that can never be published end as dead letters, once, with a reason that says what failed,
and release their aggregate; against real PostgreSQL and nats-server (README "Dead letters")."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import asyncpg
import nats
import pytest
from test_relay_failures import STREAM, WaveRecorder, fetchval, worker_settings

from outbox_common import names
from outbox_common.config import NatsConfig
from outbox_worker.adapters.history_io import ledger_insert, verify
from outbox_worker.adapters.publisher import JetStreamPublisher, Message
from outbox_worker.core.policy import Outcome
from support.polling import wait_for
from support.relay import SQL, running, setup_db

BIG = 70_000  # over nats-server's 64 KiB header limit, far under its 1 MiB max_payload


async def insert_row(
    conn: asyncpg.Connection,
    aggregate_id: str,
    *,
    tenant: str = "",
    headers: dict[str, Any] | None = None,
    payload: bytes = b"{}",
    created_at: str | None = None,
) -> tuple[int, str]:
    """One outbox row and its ledger row, in one transaction (as a producer writes them)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, tenant, created_at) "
            "VALUES ('order', $1, 'changed', $2, $3::jsonb, $4, COALESCE($5::text::timestamptz, clock_timestamp())) "
            "RETURNING id, event_id::text",
            aggregate_id,
            payload,
            json.dumps(headers or {}),
            tenant,
            created_at,
        )
        assert row is not None
        await conn.execute(ledger_insert(SQL), row[1], f"order/{aggregate_id}", row[0])
    return row[0], row[1]


async def dead_letters(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    return {
        r["id"]: r for r in await conn.fetch("SELECT id, event_id::text, attempts, reason FROM outbox_dead_letters")
    }


async def test_oversized_header_blocks_are_dead_lettered_at_once_and_release_their_aggregate(
    pg_dsn: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 70 KB ``baggage`` header, ``aggregate_id`` or ``tenant`` (both copied into headers) makes a
    header block nats-server refuses on every try (400/10097). Before, such a row was retried forever
    and held its aggregate back; now the relay refuses it before sending: one dead letter, one
    WARNING with its id and reason, and the aggregate's next event is published."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        bad_baggage, _ = await insert_row(conn, "agg-baggage", headers={"baggage": "b" * BIG}, payload=b"SECRET-1")
        _, after_baggage = await insert_row(conn, "agg-baggage")
        bad_id, _ = await insert_row(conn, "i" * BIG, payload=b"SECRET-2")
        bad_tenant, _ = await insert_row(conn, "agg-tenant", tenant="t" * BIG, payload=b"SECRET-3")
        _, after_tenant = await insert_row(conn, "agg-tenant")
        _, healthy = await insert_row(conn, "agg-healthy")
        hooks = WaveRecorder()
        caplog.set_level(logging.WARNING, logger="outbox_worker")
        async with running(worker_settings(pg_dsn, nats_url, max_attempts=3), hooks) as worker:
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
            assert worker.stats.dead_letters == 3
            assert worker.stats.dead_letters_by_reason == {names.REASON_HEADER_TOO_LARGE: 3}
            assert worker.report().deadLettersByReason == {names.REASON_HEADER_TOO_LARGE: 3}
            metrics = worker.metrics.render().decode()
        dead = await dead_letters(conn)
    finally:
        await conn.close()
    assert set(dead) == {bad_baggage, bad_id, bad_tenant}
    for row in dead.values():
        assert row["reason"].startswith(names.REASON_HEADER_TOO_LARGE + ": header block of ")
        assert "65535" in row["reason"]
        assert row["attempts"] == 1  # refused before sending: never tried again
    published = {event_id for _, event_id in hooks.published}
    assert {after_baggage, after_tenant, healthy} <= published
    assert f'outbox_dead_letters_total{{publisher="failures",reason="{names.REASON_HEADER_TOO_LARGE}"}} 3.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if "dead-lettered outbox row" in r.getMessage()]
    assert sorted(warnings) == sorted(f"dead-lettered outbox row {i}: {dead[i]['reason']}" for i in dead)
    assert all(r.levelno == logging.WARNING for r in caplog.records if "dead-lettered" in r.getMessage())
    assert not any("SECRET" in r.getMessage() for r in caplog.records)
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.published, report.dead_lettered, report.lost) == (3, 3, 0)


async def test_the_servers_header_limit_is_a_permanent_error(nats_url: str) -> None:
    """What the relay checks before sending is also what nats-server refuses: a header block over
    65,535 bytes gets the permanent error ack 400/10097, which the publisher reports as such (a row
    that got it would count an attempt and end in the dead letters, not be retried forever)."""
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name="HDR", subjects=["hdr.>"])
    await nc.close()
    pub = JetStreamPublisher(NatsConfig.for_url(nats_url))
    await pub.connect()
    try:
        at_limit = {names.HDR_MSG_ID: "at-limit", "baggage": "x"}
        block = len(b"NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in at_limit.items()) + 2
        at_limit["baggage"] = "x" * (names.MAX_HEADER_BYTES - block + 1)
        over = {**at_limit, names.HDR_MSG_ID: "over-limi"}
        over["baggage"] += "y"
        ok, refused = await pub.publish_wave([Message("hdr.a", b"", at_limit), Message("hdr.b", b"", over)])
    finally:
        await pub.close()
    assert ok.outcome is Outcome.ACKED  # exactly 65,535 bytes of headers are stored
    assert (refused.outcome, refused.reason) == (Outcome.PERMANENT, names.REASON_HEADER_TOO_LARGE)
    assert refused.detail.startswith("400/10097: ")


async def test_a_message_the_stream_refuses_counts_attempts_then_is_dead_lettered(pg_dsn: str, nats_url: str) -> None:
    """Only the server knows the stream's max_msg_size: its error ack (400/10054) is permanent, counts
    toward max_attempts, and the dead letter carries the server's code and text."""
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name=STREAM, subjects=["outbox.>"], max_msg_size=4096, duplicate_window=120)
    await nc.close()
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        big, _ = await insert_row(conn, "agg-1", payload=b"x" * 8000)
        _, after = await insert_row(conn, "agg-1")
        settings = worker_settings(pg_dsn, nats_url, stream_mode="expect", max_attempts=3)
        async with running(settings) as worker:
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
            assert worker.stats.failures_by_reason == {names.REASON_PAYLOAD_TOO_LARGE: 3}
        dead = await dead_letters(conn)
    finally:
        await conn.close()
    assert list(dead) == [big]
    assert dead[big]["attempts"] == 3
    assert dead[big]["reason"].startswith(names.REASON_PAYLOAD_TOO_LARGE + ": 400/10054: ")
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.published, report.dead_lettered) == (1, 1)
    assert after  # published after its aggregate's dead letter (verify: no order violation, not lost)


async def test_times_without_rfc3339_form_are_dead_lettered_and_control_characters_never_reach_a_subject(
    pg_dsn: str, nats_url: str
) -> None:
    """Rows of a table from before schema version 2 may hold a BC or infinite created_at: such a row
    is dead-lettered (``invalid_created_at``), never sent with a wrong Outbox-Created-At. Control
    characters in subject tokens become ``_`` like whitespace."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ALTER TABLE outbox DROP CONSTRAINT outbox_rfc3339")  # a version-1 table
        bc, _ = await insert_row(conn, "agg-bc", created_at="0044-03-15 12:00:00+00 BC")
        _, after_bc = await insert_row(conn, "agg-bc")
        inf, _ = await insert_row(conn, "agg-inf", created_at="infinity")
        async with conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "VALUES ($1, 'agg-ctl', $2, 'x') RETURNING id, event_id::text",
                "ord\x01er",
                "paid\x7f\x1b",
            )
            assert row is not None
            await conn.execute(ledger_insert(SQL), row[1], "ord\x01er/agg-ctl", row[0])
        async with running(worker_settings(pg_dsn, nats_url, subject_template="outbox.{aggregate_type}.{event_type}")):
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
        dead = await dead_letters(conn)
    finally:
        await conn.close()
    assert set(dead) == {bc, inf}
    assert {names.reason_of(r["reason"]) for r in dead.values()} == {names.REASON_INVALID_CREATED_AT}
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        ctl = await js.get_last_msg(STREAM, "outbox.ord_er.paid__")
        assert ctl.headers is not None
        assert ctl.headers[names.HDR_AGGREGATE_TYPE] == "ord\x01er"  # the header keeps the value
        by_bc = await js.get_last_msg(STREAM, "outbox.order.changed")
        assert by_bc.headers is not None
        assert by_bc.headers[names.HDR_MSG_ID] == after_bc
    finally:
        await nc.close()
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.published, report.dead_lettered) == (2, 2)


async def test_a_failing_row_with_a_long_aggregate_id_still_counts_its_attempts(pg_dsn: str, nats_url: str) -> None:
    """A failed attempt holds the row back (not_before), which puts it into the held-rows index on
    (partition, aggregate_id, id). An incompressible aggregate_id of a few KB is over a btree entry's
    limit (~2.7 KB): the mark failed with ProgramLimitExceededError, the attempt was never counted
    and the row was retried forever. It must end as a dead letter after max_attempts like any other."""
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name=STREAM, subjects=["outbox.>"], max_msg_size=4096, duplicate_window=120)
    await nc.close()
    await setup_db(pg_dsn)
    long_id = secrets.token_hex(1500)  # 3,000 random characters: TOAST cannot compress them
    conn = await asyncpg.connect(pg_dsn)
    try:
        bad, _ = await insert_row(conn, long_id, payload=b"x" * 2000)  # with its headers, over 4096
        _, after = await insert_row(conn, long_id, payload=b"small")
        settings = worker_settings(pg_dsn, nats_url, stream_mode="expect", max_attempts=3)
        async with running(settings) as worker:
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
            assert "mark failed" not in worker.stats.last_error
        dead = await dead_letters(conn)
    finally:
        await conn.close()
    assert list(dead) == [bad]
    assert dead[bad]["attempts"] == 3
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.ok, report.to_dict()
    assert (report.published, report.dead_lettered) == (1, 1)
    assert after


async def test_stored_header_order_is_the_documented_one(pg_dsn: str, nats_url: str) -> None:
    """README ("The message"): the row's headers first, in the row's order, then the relay's. Read
    back from the stream as the server stored the header block."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        _, event_id = await insert_row(conn, "agg-h", tenant="acme", headers={"zz-first": "1", "aa-second": "2"})
        async with running(worker_settings(pg_dsn, nats_url)):
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
    finally:
        await conn.close()
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg(STREAM, "outbox.order.changed")
    finally:
        await nc.close()
    assert msg.headers is not None
    assert list(msg.headers) == [
        "zz-first",
        "aa-second",
        names.HDR_MSG_ID,
        names.HDR_EVENT_TYPE,
        names.HDR_AGGREGATE_TYPE,
        names.HDR_AGGREGATE_ID,
        names.HDR_OUTBOX_ID,
        names.HDR_CREATED_AT,
        names.HDR_PUBLISHER,
        names.HDR_TENANT,
        names.HDR_EXPECTED_STREAM,
    ]
    assert msg.headers[names.HDR_MSG_ID] == event_id


async def test_the_dead_letters_waiting_are_reported_until_acted_on_with_no_restart(pg_dsn: str, nats_url: str) -> None:
    """What the status's DEAD column and Degraded=PoisonRows follow: the publisher's rows in the
    dead-letter table now, whoever moved them. It drops when `outboxctl dead-letters discard` (or
    requeue) acts, while the worker runs on; the worker's own cumulative count stays."""
    from outbox_worker.adapters.dead_letters import DeadLetterFilter, discard

    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        for i in range(3):
            await insert_row(conn, f"agg-{i}", headers={"baggage": "b" * BIG})
        async with running(worker_settings(pg_dsn, nats_url, max_attempts=3)) as worker:
            await wait_for(lambda: fetchval(pg_dsn, "SELECT count(*) = 0 FROM outbox"), 20, "outbox drained")
            await worker.sample_pressure()
            assert worker.report().deadLettersWaiting == 3
            assert 'outbox_dead_letters_waiting{publisher="failures"} 3.0' in worker.metrics.render().decode()
            assert worker.store is not None
            assert await worker.store.dead_letters_waiting(2) == 2  # counted up to the cap
            # another publisher's dead letters are not this one's to act on
            await conn.execute(
                "UPDATE outbox_dead_letters SET publisher = 'other' "
                "WHERE id = (SELECT min(id) FROM outbox_dead_letters)"
            )
            await worker.sample_pressure()
            assert worker.report().deadLettersWaiting == 2
            done = await discard(conn, SQL, DeadLetterFilter(publisher="failures"), apply=True)
            assert len(done.done) == 2
            await worker.sample_pressure()
            assert worker.report().deadLettersWaiting == 0
            assert worker.report().deadLetters == 3
            assert 'outbox_dead_letters_waiting{publisher="failures"} 0.0' in worker.metrics.render().decode()
    finally:
        await conn.close()
