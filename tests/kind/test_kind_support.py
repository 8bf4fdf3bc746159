"""The kind suite's own helpers, checked here where no cluster exists: its INSERT fits the table
``outboxctl migrate`` creates, and its stream reader returns every message once with its Msg-Id.

The reader and the INSERT run against the real embedded PostgreSQL and nats-server of
tests/conftest.py (marker ``integration``); the pure helpers (order check, manifests, status
readers) need nothing. So a kind run never fails on a typo in the harness itself.
"""

from __future__ import annotations

import sys
import uuid

import asyncpg
import nats
import pytest
from kindsupport import (
    ROOT,
    StreamMessage,
    condition,
    insert_events_sql,
    order_violations,
    owned_partitions,
    payload_number,
    publisher_manifest,
    stream_contents,
    stream_messages,
)

from outbox_operator.spec import parse_spec
from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql


@pytest.mark.integration
async def test_insert_sql_matches_the_migrated_table(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, Sql.for_table("public", "outbox"), 4)
        ids = [str(uuid.uuid4()) for _ in range(30)]
        await conn.execute(insert_events_sql(ids[:15]))
        await conn.execute(insert_events_sql(ids[15:], start=15))
        rows = await conn.fetch("SELECT event_id::text, aggregate_id, payload FROM public.outbox ORDER BY id")
    finally:
        await conn.close()
    assert [r["event_id"] for r in rows] == ids
    assert rows[21]["aggregate_id"] == "order-1"
    assert rows[21]["payload"] == b'{"n": 21}'


def test_insert_sql_refuses_a_non_uuid() -> None:
    with pytest.raises(ValueError):
        insert_events_sql(["x'); DROP TABLE outbox; --"])


@pytest.mark.integration
async def test_stream_reader_returns_every_message_with_its_msg_id(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="OUTBOX", subjects=["outbox.>"])
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for eid in [*ids, ids[0]]:  # the repeat is de-duplicated by JetStream
            await js.publish("outbox.order.created", b"{}", headers={"Nats-Msg-Id": eid})
    finally:
        await nc.close()
    contents = await stream_contents(nats_url, "OUTBOX", expected=5, wait_seconds=1)
    assert contents == [(eid, "outbox.order.created") for eid in ids]


@pytest.mark.integration
async def test_stream_messages_carry_the_aggregate_and_the_payload_number(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="ORDERED", subjects=["ordered.>"])
        for n, aggregate in [(0, "order-0"), (1, "order-1"), (20, "order-0")]:
            headers = {"Nats-Msg-Id": str(uuid.uuid4()), "Outbox-Aggregate-Id": aggregate}
            await js.publish("ordered.order.created", f'{{"n": {n}}}'.encode(), headers=headers)
    finally:
        await nc.close()
    messages = await stream_messages(nats_url, "ORDERED", expected=3, wait_seconds=1)
    assert [(m.aggregate_id, m.n) for m in messages] == [("order-0", 0), ("order-1", 1), ("order-0", 20)]
    assert order_violations(messages) == []


# --- pure helpers (no marker needed, but they run with the suite's integration tests) --------------


def message(aggregate: str, n: int) -> StreamMessage:
    return StreamMessage(msg_id=str(uuid.uuid4()), subject="outbox.order.created", aggregate_id=aggregate, n=n)


def test_order_violations_finds_an_event_stored_after_a_later_one_of_its_aggregate() -> None:
    in_order = [message("order-1", 1), message("order-2", 2), message("order-1", 21), message("order-2", 22)]
    assert order_violations(in_order) == []
    swapped = [message("order-1", 21), message("order-2", 2), message("order-1", 1)]
    assert order_violations(swapped) == ["order-1: event 1 stored after event 21"]
    assert order_violations([message("order-1", 5), message("order-1", 5)]) == ["order-1: event 5 stored after event 5"]


def test_payload_number_reads_what_insert_events_sql_writes() -> None:
    assert payload_number(b'{"n": 21}') == 21
    assert payload_number(b"not json") == -1
    assert payload_number(b'{"m": 1}') == -1


def test_publisher_manifests_are_admitted_or_refused_as_the_suite_expects() -> None:
    """The manifests the kind tests apply, against the CRD (schema + CEL) and the operator's model."""
    sys.path.insert(0, str(ROOT / "tests" / "operator"))
    import crd_schema

    from outbox_operator.spec import InvalidSpec, render_worker_env

    schema = crd_schema.schema_of(crd_schema.load_crd())
    good, errors = crd_schema.admit(schema, publisher_manifest("e2e-nosecret", secret="no-such-secret", table="x"))
    assert errors == []
    parse_spec(good["spec"])
    _, errors = crd_schema.admit(schema, publisher_manifest("e2e-bad", partitions=2, replicas=3))
    assert any(e.startswith("spec.replicas") for e in errors), errors
    bad, errors = crd_schema.admit(
        schema, publisher_manifest("e2e-bad", subject_template="outbox.{customer}.{event_type}")
    )
    assert errors == []
    with pytest.raises(InvalidSpec) as caught:
        render_worker_env(parse_spec(bad["spec"]), "e2e-bad")
    assert caught.value.field == "spec.subjectTemplate"


def test_condition_and_owned_partitions_read_a_status() -> None:
    status = {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Publishing"}],
        "workers": {"a": {"partitions": [2, 0]}, "b": {"partitions": [1, 3]}},
    }
    assert condition({"status": status}, "Ready")["reason"] == "Publishing"
    assert condition({"status": status}, "Lagging") == {}
    assert owned_partitions(status) == [0, 1, 2, 3]
