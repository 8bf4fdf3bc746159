"""The publisher writes HPUB frames itself (adapters/publisher.py, ``encode_hpub``) instead of calling
nats-py's ``Client.publish`` per message. These tests pin that it writes exactly the bytes nats-py
would, rejects what nats-py would reject, and that the private nats-py methods it uses still exist."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta, timezone

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol import parser as nats_parser
from test_envelope import row

from outbox_common import names
from outbox_common.envelope import HeaderBlock, InvalidSubjectError, OutboxRow, build_headers
from outbox_common.settings import WorkerSettings
from outbox_worker.adapters.publisher import (
    InvalidMessageError,
    JetStreamPublisher,
    Message,
    _Wave,
    encode_headers,
    encode_hpub,
)
from outbox_worker.core.policy import Outcome

HEADER_SETS = [
    {},
    {"Nats-Msg-Id": "0b6e2f0c-1c1e-4a43-9d3e-6a4f0e0f9a11", "Outbox-Seq": "42"},
    {"traceparent": "00-abc-def-01", "Outbox-Aggregate-Id": "  padded value  "},
    {"Outbox-Event-Type": "line\r\nbreak\ninside", "X-Unicode": "grüße ✓"},
    {" spaced-key ": "v", "": "empty key is skipped", "   ": "so is blank"},
    {"X-Empty": "", "X-Tab": "\tx\t"},
]


async def _nats_py_frame(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    client = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    client._flush_queue = None
    await client._send_publish(subject, reply, payload, len(payload), headers)
    assert len(sent) == 1
    return sent[0]


@pytest.mark.parametrize("headers", HEADER_SETS)
@pytest.mark.parametrize("payload", [b"", b'{"a": 1}', bytes(range(256))])
async def test_frame_is_byte_for_byte_what_nats_py_writes(headers: dict[str, str], payload: bytes) -> None:
    subject, reply = "outbox.order.created", "_INBOX.abcdef.17"
    ours, size = encode_hpub(subject, reply, headers, payload)
    assert ours == await _nats_py_frame(subject, reply, headers, payload)
    hdr_len = int(ours.split(b"\r\n", 1)[0].split()[3])
    assert size == hdr_len + len(payload)


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB x 1", "tab\there"])
def test_subjects_nats_py_refuses_are_refused(subject: str) -> None:
    with pytest.raises(InvalidMessageError):
        encode_hpub(subject, "_INBOX.x.1", {}, b"")


@pytest.mark.parametrize("name", ["bad name", "colon:", "ü", "new\nline"])
async def test_header_names_nats_py_refuses_are_refused(name: str) -> None:
    with pytest.raises(InvalidMessageError):
        encode_hpub("a.b", "_INBOX.x.1", {name: "v"}, b"")
    with pytest.raises(nats_errors.BadHeaderError):
        await _nats_py_frame("a.b", "_INBOX.x.1", {name: "v"}, b"")


def test_private_nats_py_api_used_by_the_publisher_exists() -> None:
    assert list(inspect.signature(Client._send_command).parameters)[:2] == ["self", "cmd"]
    assert inspect.iscoroutinefunction(Client._send_command)
    assert inspect.iscoroutinefunction(Client._flush_pending)
    assert isinstance(Client.is_draining_pubs, property)
    # the ack fast path replaces the instance's _process_msg; the parser must call it that way
    params = list(inspect.signature(Client._process_msg).parameters)
    assert params == ["self", "sid", "subject", "reply", "data", "headers"]
    assert inspect.iscoroutinefunction(Client._process_msg)
    assert "await self.nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(nats_parser)


def _row(**kw: object) -> OutboxRow:
    """test_envelope's row, with an id past 2**53 and microseconds in created_at."""
    return row(**{"id": 9_007_199_254_740_993, "created_at": datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC), **kw})


ROWS = [
    _row(),
    _row(headers={"traceparent": "00-abc-def-01"}, tenant="acme"),
    _row(aggregate_id="  padded\r\nid ", event_type="line\nbreak", aggregate_type=" t ", tenant=" \r\n"),
    _row(headers={"Outbox-Seq": "forged", "nats-msg-id": "forged", " x-a ": "1", "x-a": "2", "": "skip"}),
    _row(headers={"X-Unicode": "grüße ✓", "X-Empty": "", "X-Tab": "\tv\t"}, aggregate_id="ünï"),
    _row(created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))),
]


@pytest.mark.parametrize("row", ROWS)
async def test_header_block_is_the_relay_headers_as_nats_py_encodes_them(row: OutboxRow) -> None:
    """The relay renders headers in one pass (HeaderBlock); the bytes must be build_headers + the
    expected stream, exactly as nats-py would send them."""
    headers = build_headers(row, "pub-1")
    headers[names.HDR_EXPECTED_STREAM] = "EVENTS"
    block = HeaderBlock("pub-1", "EVENTS")
    rendered = block.render(row)
    assert rendered == block.render(row)  # the cached lines change nothing
    assert rendered == encode_headers(headers)
    frame, _ = encode_hpub("a.b", "_INBOX.x.1", rendered, row.payload)
    assert frame == await _nats_py_frame("a.b", "_INBOX.x.1", headers, row.payload)


def test_header_block_renders_each_rows_own_created_at() -> None:
    block = HeaderBlock("p", "S")
    utc = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    same_instant_elsewhere = utc.astimezone(timezone(timedelta(hours=2)))
    later = utc + timedelta(microseconds=1)
    for ts in (utc, utc, same_instant_elsewhere, later, utc):
        row = _row(created_at=ts)
        assert block.render(row) == HeaderBlock("p", "S").render(row)
        assert f"Outbox-Created-At: {ts.isoformat()}\r\n".encode() in block.render(row)


@pytest.mark.parametrize("name", ["bad name", "colon:", "ü"])
def test_header_block_refuses_header_names_nats_py_refuses(name: str) -> None:
    with pytest.raises(InvalidSubjectError, match="invalid header name"):
        HeaderBlock("p", "S").render(_row(headers={name: "v"}))


@pytest.mark.parametrize(
    ("data", "outcome", "seq"),
    [
        (b'{"stream":"EVENTS","seq":17}', Outcome.ACKED, 17),
        (b'{"stream":"EVENTS","seq":18,"duplicate":true}', Outcome.DUPLICATE, 18),
        (b'{"stream":"EVENTS","domain":"hub","seq":19}', Outcome.ACKED, 19),
        (b'{ "stream": "EVENTS", "seq": 20 }', Outcome.ACKED, 20),
        (b'{"seq":21, "duplicate": true, "stream":"EVENTS"}', Outcome.DUPLICATE, 21),
        (b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}', Outcome.RETRYABLE, 0),
        (b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}', Outcome.CONFIG, 0),
        (b"not json", Outcome.RETRYABLE, 0),
    ],
)
async def test_ack_payloads_resolve_to_their_outcome(data: bytes, outcome: Outcome, seq: int) -> None:
    """Acks are read without a JSON decode when they have the server's usual shape; every shape the
    fast path does not recognise falls back to the decoder."""
    pub = JetStreamPublisher(WorkerSettings(database_url="postgresql://x@localhost/db"))
    wave = _Wave([None], 0.0, 1)
    pub._pending[7] = (wave, 0)
    await pub._on_ack(Msg(None, subject="_INBOX.abc.7", data=data))  # type: ignore[arg-type]
    result = wave.results[0]
    assert result is not None
    assert (result.outcome, result.seq) == (outcome, seq)
    assert not pub._pending


def test_message_accepts_an_encoded_header_block() -> None:
    msg = Message("a.b", b"x", HeaderBlock("p", "S").render(_row()))
    frame, size = encode_hpub(msg.subject, "_INBOX.x.1", msg.headers, msg.payload)
    assert frame.startswith(b"HPUB a.b _INBOX.x.1 ")
    assert size == len(msg.headers) + 1
