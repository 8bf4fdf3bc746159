"""I/O for the history checker: read the whole stream back, and the ground truth from PostgreSQL.

The ground truth is the ledger table ``<table>_ledger`` (event id, aggregate, outbox id), which the
producers of ``outboxctl demo``, ``outboxctl bench`` and the test suite write in the *same
transaction* as the outbox row: a rolled-back event is in neither. Applications that want an audit
trail can write it the same way (README, "Verifying a relay").

The optional mark audit (:func:`audit_ddl`) is a statement-level trigger on the outbox that records,
inside every statement that deletes a pending row or sets ``published_at``, which worker did it
(from the session's ``application_name``, ``outbox-relay/<worker id>``) and whether that worker
held the lease of the row's partition at that moment. The checker then reports marks made without
the stream holding the event, marks made before it was stored, and marks made under a stale lease.
It costs one extra insert per marked row: a verification tool for test and staging runs, not for
production tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import nats
from nats.aio.client import Client
from nats.js import api as js_api
from nats.js import errors as js_errors

from outbox_common import names
from outbox_worker.adapters.publisher import ClientErrors, SecureClient
from outbox_worker.core.history import CommittedEvent, HistoryReport, MarkRecord, StoredEvent, check_history
from outbox_worker.core.sql import Sql


def ledger_table(sql: Sql) -> str:
    return f'"{sql.schema}"."{sql.table}_ledger"'


def ledger_ddl(sql: Sql) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {ledger_table(sql)} ("
        "event_id uuid PRIMARY KEY, aggregate text NOT NULL, outbox_id bigint NOT NULL, "
        "committed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def ledger_insert(sql: Sql) -> str:
    """$1 event_id, $2 aggregate, $3 outbox_id."""
    return f"INSERT INTO {ledger_table(sql)} (event_id, aggregate, outbox_id) VALUES ($1, $2, $3)"


MARKER_PREFIX = "outbox-relay/"
"""A worker session whose ``application_name`` is ``outbox-relay/<worker id>`` is attributed."""


def audit_table(sql: Sql) -> str:
    return f'"{sql.schema}"."{sql.table}_mark_audit"'


def audit_ddl(sql: Sql) -> list[str]:
    """DDL of the mark audit (idempotent). Needs the outbox and lease tables (``outboxctl migrate``)."""
    t = sql.table
    fn = f'"{sql.schema}"."{t}_mark_audit_fn"'
    audit = audit_table(sql)
    # Did the marking session's worker hold the lease of the row's partition, now? The relay's mark
    # statements lock the lease rows they are fenced by (FOR SHARE), so no takeover can commit between
    # the fence and this trigger.
    held = (
        f"CASE WHEN marker = '' THEN NULL ELSE EXISTS (SELECT 1 FROM {sql.leases} AS l "
        "WHERE l.partition = r.partition AND l.owner = marker) END"
    )
    return [
        f"""CREATE TABLE IF NOT EXISTS {audit} (
            event_id uuid NOT NULL, outbox_id bigint NOT NULL, partition int NOT NULL, op text NOT NULL,
            marker text NOT NULL, lease_held boolean,
            marked_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
        f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                app text := coalesce(current_setting('application_name', true), '');
                marker text := CASE WHEN app LIKE '{MARKER_PREFIX}%'
                                    THEN substr(app, {len(MARKER_PREFIX) + 1}) ELSE '' END;
            BEGIN
                IF TG_OP = 'DELETE' THEN
                    INSERT INTO {audit} (event_id, outbox_id, partition, op, marker, lease_held)
                    SELECT r.event_id, r.id, r.partition, 'delete', marker, {held}
                    FROM old_rows AS r WHERE r.published_at IS NULL;
                ELSE
                    INSERT INTO {audit} (event_id, outbox_id, partition, op, marker, lease_held)
                    SELECT r.event_id, r.id, r.partition, 'mark', marker, {held}
                    FROM new_rows AS r JOIN old_rows AS o ON o.id = r.id
                    WHERE r.published_at IS NOT NULL AND o.published_at IS NULL;
                END IF;
                RETURN NULL;
            END $$""",
        f'CREATE OR REPLACE TRIGGER "{t}_mark_audit_del" AFTER DELETE ON {sql.outbox} '
        f"REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
        f'CREATE OR REPLACE TRIGGER "{t}_mark_audit_upd" AFTER UPDATE ON {sql.outbox} '
        f"REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
    ]


async def read_marks(conn: asyncpg.Connection, sql: Sql) -> list[MarkRecord] | None:
    """The audited marks, or None when the audit is not installed."""
    if await conn.fetchval("SELECT to_regclass($1)", audit_table(sql)) is None:
        return None
    rows = await conn.fetch(
        f"SELECT event_id::text, EXTRACT(EPOCH FROM marked_at)::float8, op, marker, lease_held FROM {audit_table(sql)}"
    )
    return [MarkRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows]


class NatsPermissionError(Exception):
    """The NATS server denied the user a subject the read needs (a permissions violation); the
    message is the server's, which names the subject (nats-py lowercases it)."""


async def read_stream(
    nats_url: str | list[str], stream: str, *, timeout: float = 120.0, batch: int = 5000
) -> list[StoredEvent]:
    """Every message of ``stream`` in sequence order, via an ephemeral no-ack consumer (bounded time).

    Raises nats-py's AuthorizationError when the server rejected the credentials (nats-py itself
    only reports that to its error callback, then gives up with NoServersError, as if unreachable),
    :class:`TlsNotOfferedError` when a ``tls://`` server does not offer TLS (nothing is sent in clear),
    and :class:`NatsPermissionError` as soon as the server denies a subject the read needs (the
    request itself would go unanswered until its timeout)."""
    errors = ClientErrors()
    reading = asyncio.create_task(_read_stream(nats_url, stream, timeout, batch, errors.note))
    try:
        watched: set[asyncio.Future[Any]] = {reading, errors.denied}
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not reading.done():  # denied, or this read was cancelled: stop reading, close the connection
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    if errors.denied.done() and (reading.cancelled() or reading.exception() is not None):
        raise NatsPermissionError(errors.denied.result())
    try:
        return reading.result()
    except Exception:
        if errors.rejected:
            raise nats.errors.AuthorizationError from None
        if errors.no_tls is not None:
            raise errors.no_tls from None
        raise


async def _read_stream(
    nats_url: str | list[str],
    stream: str,
    timeout: float,
    batch: int,
    quiet: Callable[[Exception], Awaitable[None]],
) -> list[StoredEvent]:
    nc = SecureClient()  # a tls:// URL is read over TLS only, never in plaintext
    await nc.connect(nats_url, connect_timeout=3, reconnect_time_wait=1, max_reconnect_attempts=3, error_cb=quiet)
    out: list[StoredEvent] = []
    try:
        # JetStream API calls wait up to 15 s (nats-py's default is 5), ``timeout`` if shorter: right
        # after a cluster loses a leader, the stream info and consumer requests go unanswered until a
        # new one is elected.
        js = nc.jetstream(timeout=min(15.0, timeout))
        deadline = time.monotonic() + timeout
        info = await js.stream_info(stream)
        last = info.state.last_seq
        if info.state.messages == 0:
            return out
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.ALL, inactive_threshold=60.0
        )
        while True:
            # A cluster whose members were just killed and restarted may leave the consumer's creation
            # unanswered for a while (seen once in CI: 15 s): ask again until ``timeout``. A consumer a
            # lost answer created anyway is ephemeral and removes itself after a minute.
            try:
                sub = await js.pull_subscribe("", stream=stream, config=config)
                break
            except (nats.errors.TimeoutError, js_errors.ServiceUnavailableError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no consumer on {stream} could be created within {timeout}s") from None
                await asyncio.sleep(1.0)
        seq = 0
        while seq < last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(out)} messages of {stream} in {timeout}s, stopped at seq {seq}/{last}")
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except js_errors.ServiceUnavailableError:
                # Nobody answered for the consumer (503). In a cluster its server may not be listening
                # yet: the consumer was just placed, or a member just restarted. Ask again shortly; a
                # consumer that is gone for good ends in the TimeoutError above.
                await asyncio.sleep(0.2)
                continue
            for m in msgs:
                seq = m.metadata.sequence.stream
                h = m.headers or {}
                out.append(
                    StoredEvent(
                        seq=seq,
                        event_id=h.get(names.HDR_MSG_ID, ""),
                        aggregate=f"{h.get(names.HDR_AGGREGATE_TYPE, '')}/{h.get(names.HDR_AGGREGATE_ID, '')}",
                        outbox_id=int(h.get(names.HDR_OUTBOX_ID, "0")),
                        stored_at=m.metadata.timestamp.timestamp() if m.metadata.timestamp else 0.0,
                    )
                )
        await sub.unsubscribe()
    finally:
        await _close(nc)
    return out


async def _close(nc: Client) -> None:
    """Close ``nc``, flushing what is buffered, within 5 s."""
    async with asyncio.timeout(5):
        await nc.close()


async def read_truth(conn: asyncpg.Connection, sql: Sql) -> tuple[list[CommittedEvent], set[str], set[str]]:
    """(committed events from the ledger, event ids still pending, event ids dead-lettered).

    An event requeued from the dead letters (``<table>_requeued``, since schema version 2) is
    committed as the outbox id of its latest requeue: that is its place in its aggregate's order."""
    outbox_id = "l.outbox_id"
    if await conn.fetchval("SELECT to_regclass($1)", sql.requeued) is not None:
        outbox_id = (
            f"COALESCE((SELECT max(r.outbox_id) FROM {sql.requeued} AS r WHERE r.event_id = l.event_id), l.outbox_id)"
        )
    ledger = await conn.fetch(f"SELECT l.event_id::text, l.aggregate, {outbox_id} FROM {ledger_table(sql)} AS l")
    pending = await conn.fetch(f"SELECT event_id::text FROM {sql.outbox} WHERE published_at IS NULL")
    dead = await conn.fetch(f"SELECT event_id::text FROM {sql.dead_letters}")
    return (
        [CommittedEvent(r[0], r[1], r[2]) for r in ledger],
        {r[0] for r in pending},
        {r[0] for r in dead},
    )


async def verify(
    dsn: str, sql: Sql, nats_url: str | list[str], stream: str, *, expect_drained: bool = False, timeout: float = 120.0
) -> HistoryReport:
    """Read the ledger, the outbox, the dead letters, the mark audit (if installed) and the stream;
    check them. Connection errors propagate (asyncpg / nats exceptions)."""
    report, _audited = await verify_audited(dsn, sql, nats_url, stream, expect_drained=expect_drained, timeout=timeout)
    return report


async def verify_audited(
    dsn: str, sql: Sql, nats_url: str | list[str], stream: str, *, expect_drained: bool = False, timeout: float = 120.0
) -> tuple[HistoryReport, bool]:
    """:func:`verify`, and whether the mark audit is installed: the marks were checked, also when
    there were none (``report.marks`` is 0 then, as without an audit)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        committed, pending, dead = await read_truth(conn, sql)
        marks = await read_marks(conn, sql)
    finally:
        await conn.close()
    stored = await read_stream(nats_url, stream, timeout=timeout)
    return check_history(committed, stored, pending, dead, marks, expect_drained=expect_drained), marks is not None
