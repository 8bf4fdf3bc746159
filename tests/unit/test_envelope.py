"""Envelope: one outbox row -> subject, headers, payload. Consumers rely on the header names and on
subjects always being valid NATS subjects (or the row being refused as a dead letter)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from outbox_common import names
from outbox_common.envelope import (
    MAX_SUBJECT,
    MAX_TOKEN,
    InvalidSubjectError,
    OutboxRow,
    SubjectTemplate,
    build_headers,
    created_at_text,
    sanitize_token,
    subject_fields,
)
from outbox_common.settings import validate_subject_template
from outbox_worker.core.subjects import subject_covers


def row(**kw: object) -> OutboxRow:
    base: dict[str, object] = {
        "id": 42,
        "event_id": "0b4a2a4e-8d6c-4a53-9a49-3f1f4f0d1c11",
        "partition": 3,
        "aggregate_type": "order",
        "aggregate_id": "o-1",
        "event_type": "created",
        "tenant": "",
        "payload": b"{}",
        "headers": {},
        "created_at": created_at_text(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        "attempts": 0,
    }
    base.update(kw)
    return OutboxRow(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("order", "order"),
        ("a.b", "a_b"),
        ("a b\tc\nd", "a_b_c_d"),
        ("*", "_"),
        (">", "_"),
        ("x\x00y", "x_y"),
        # control characters, like whitespace: a subscriber's tooling must never see them in a subject
        ("a\x01b", "a_b"),
        ("a\x1bb\x7fc", "a_b_c"),
        ("".join(map(chr, range(32))) + "\x7f", "_" * 33),
        ("Ünïcode-ok_1", "Ünïcode-ok_1"),
    ],
)
def test_sanitize_token_yields_one_token(raw: str, token: str) -> None:
    assert sanitize_token(raw) == token


def test_sanitize_token_refuses_what_cannot_be_a_token() -> None:
    with pytest.raises(InvalidSubjectError, match="empty"):
        sanitize_token("")
    assert sanitize_token("x" * MAX_TOKEN) == "x" * MAX_TOKEN
    with pytest.raises(InvalidSubjectError, match="longer"):
        sanitize_token("x" * (MAX_TOKEN + 1))


def test_render_replaces_each_placeholder_by_exactly_one_token() -> None:
    tpl = SubjectTemplate.parse("outbox.{tenant}.{aggregate_type}.{event_type}")
    subject = tpl.render(subject_fields(row(aggregate_type="order.v2", event_type="paid *now*", tenant="")))
    assert subject == "outbox._.order_v2.paid__now_"
    assert len(subject.split(".")) == 4


def test_rendered_subjects_are_captured_by_the_filter_subject() -> None:
    template = "ev.{aggregate_type}.x.{event_type}"
    tpl = SubjectTemplate.parse(validate_subject_template(template))
    assert tpl.filter_subject() == "ev.*.x.*"
    for agg, ev in [("a", "b"), ("a.b.c", "d>e"), ("with space", "*")]:
        subject = tpl.render(subject_fields(row(aggregate_type=agg, event_type=ev)))
        assert subject_covers(tpl.filter_subject(), subject)


def test_empty_field_makes_the_row_invalid() -> None:
    tpl = SubjectTemplate.parse("outbox.{aggregate_type}.{event_type}")
    with pytest.raises(InvalidSubjectError):
        tpl.render(subject_fields(row(aggregate_type="")))


def test_overlong_subject_is_invalid() -> None:
    tpl = SubjectTemplate.parse("{aggregate_type}.{event_type}.{aggregate_id}.{tenant}.{aggregate_type}")
    long = "x" * MAX_TOKEN
    with pytest.raises(InvalidSubjectError, match=str(MAX_SUBJECT)):
        tpl.render(subject_fields(row(aggregate_type=long, event_type=long, aggregate_id=long, tenant=long)))


def test_headers_carry_event_metadata_and_msg_id() -> None:
    r = row(tenant="acme", headers={"traceparent": "00-abc-def-01", "x-correlation-id": "c1"})
    h = build_headers(r, "orders")
    assert h[names.HDR_MSG_ID] == r.event_id
    assert h[names.HDR_EVENT_TYPE] == "created"
    assert h[names.HDR_AGGREGATE_TYPE] == "order"
    assert h[names.HDR_AGGREGATE_ID] == "o-1"
    assert h[names.HDR_OUTBOX_ID] == "42"
    assert h[names.HDR_TENANT] == "acme"
    assert h[names.HDR_PUBLISHER] == "orders"
    assert h[names.HDR_CREATED_AT] == "2026-01-02T03:04:05.000000+00:00"
    assert h["traceparent"] == "00-abc-def-01"
    assert h["x-correlation-id"] == "c1"


def test_user_headers_cannot_override_the_relays_own() -> None:
    forged = dict.fromkeys(names.RESERVED_HEADERS, "forged")
    h = build_headers(row(headers=forged), "orders")
    assert all(v != "forged" for v in h.values())
    assert h[names.HDR_MSG_ID] == row().event_id


def test_no_tenant_header_without_tenant() -> None:
    assert names.HDR_TENANT not in build_headers(row(tenant=""), "p")
    assert subject_fields(row(tenant=""))["tenant"] == "_"


@pytest.mark.parametrize("key", ["Nats-Rollup", "Nats-Expected-Last-Sequence", "nats-msg-id", "NATS-TTL"])
def test_user_headers_cannot_steer_jetstream(key: str) -> None:
    h = build_headers(row(headers={key: "all", "traceparent": "t"}), "p")
    assert key not in h
    assert h["traceparent"] == "t"
    assert {k for k in h if k.lower().startswith("nats-")} == {names.HDR_MSG_ID}


def test_invalid_header_names_have_their_own_reason() -> None:
    """A bad header name is an ``invalid_header`` dead letter, not an ``invalid_subject`` one."""
    from outbox_common.envelope import HeaderBlock, InvalidHeaderError

    with pytest.raises(InvalidHeaderError) as caught:
        HeaderBlock("p", "S").render(row(headers={"bad name": "x"}))
    assert caught.value.reason == names.REASON_INVALID_HEADER
    with pytest.raises(InvalidSubjectError) as subject:
        SubjectTemplate.parse("e.{aggregate_type}").render(subject_fields(row(aggregate_type="")))
    assert subject.value.reason == names.REASON_INVALID_SUBJECT


def test_wire_header_order_is_the_one_readme_documents() -> None:
    """README ("The message"): ``Nats-Trace-Dest`` first when the relay adds it, then the row's own
    headers in the row's order, then the relay's. Checked on the bytes the relay sends."""
    from pathlib import Path

    from outbox_common.envelope import HeaderBlock

    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = row(tenant="acme", headers={"b-second": "2", "traceparent": traceparent, "a-third": "3"})
    wire = HeaderBlock("pub", "EVENTS", skip_trace_check=True).render(r).decode()
    lines = [line.split(":", 1)[0] for line in wire.split("\r\n")[1:] if line]
    relay = [
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
    assert lines == [names.HDR_TRACE_DEST, "b-second", "traceparent", "a-third", *relay]
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "Row headers go out first, in the row's order, then the relay's" in readme
