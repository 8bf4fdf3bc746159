"""The relay's JetStream wire (adapters/jetstream_acks.py): the publisher writes HPUB frames itself
(``encode_hpub``) instead of calling nats-py's ``Client.publish`` per message, and reads acks straight
from nats-py's parser (``take_acks``, ``install_ack_fast_path``). These tests pin that it writes
exactly the bytes nats-py would, rejects what nats-py would reject, reads every ack as nats-py's own
path would, and that the private nats-py methods it uses still exist."""

from __future__ import annotations

import asyncio
import inspect
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import cast

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.protocol import parser as nats_parser
from test_envelope import row

from outbox_common import names
from outbox_common.config import NatsConfig, PublishConfig
from outbox_common.envelope import (
    HeaderBlock,
    InvalidSubjectError,
    OutboxRow,
    build_headers,
    created_at_text,
    sampled_traceparent,
)
from outbox_worker.adapters.jetstream_acks import (
    InvalidMessageError,
    StoredAcks,
    StoredFrames,
    encode_headers,
    encode_hpub,
    install_ack_fast_path,
    parse_ack,
    take_acks,
)
from outbox_worker.adapters.publisher import DIRECT_WRITE_BYTES, JetStreamPublisher, Message, _Wave, _write_now
from outbox_worker.core.policy import Outcome

NOWHERE = NatsConfig.for_url("nats://127.0.0.1:1")  # never connected: these tests drive the wire by hand

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
    # a small wave goes to the socket itself when nothing is queued before it (_write_now)
    client = Client()
    assert client._pending == []
    assert client._transport is None
    assert "self._transport.writelines(self._pending[:])" in inspect.getsource(Client._flusher)
    assert TcpTransport()._io_writer is None
    assert "self._io_writer.writelines(payload)" in inspect.getsource(TcpTransport.writelines)
    # the ack fast path replaces the instance's _process_msg; the parser must call it that way
    params = list(inspect.signature(Client._process_msg).parameters)
    assert params == ["self", "sid", "subject", "reply", "data", "headers"]
    assert inspect.iscoroutinefunction(Client._process_msg)
    assert "await self.nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(nats_parser)
    # ... and replaces the parser's parse, which the read loop calls per read, at frame boundaries
    assert "await self._ps.parse(b)" in inspect.getsource(Client._read_loop)
    assert inspect.iscoroutinefunction(nats_parser.Parser.parse)
    parser = nats_parser.Parser()
    assert isinstance(parser.buf, bytearray)
    assert parser.state == nats_parser.AWAITING_CONTROL_LINE
    assert "self.buf = bytearray()" in inspect.getsource(nats_parser.Parser.reset)


def _row(**kw: object) -> OutboxRow:
    """test_envelope's row, with an id past 2**53 and microseconds in created_at."""
    return row(**{"id": 9_007_199_254_740_993, "created_at": "2026-01-02T03:04:05.000120+00:00", **kw})


ROWS = [
    _row(),
    _row(headers={"traceparent": "00-abc-def-01"}, tenant="acme"),
    _row(aggregate_id="  padded\r\nid ", event_type="line\nbreak", aggregate_type=" t ", tenant=" \r\n"),
    _row(headers={"Outbox-Seq": "forged", "nats-msg-id": "forged", " x-a ": "1", "x-a": "2", "": "skip"}),
    _row(headers={"x-b": "1", "Outbox-Seq": "forged", "Nats-Rollup": "all", "x-c": "2"}),  # no name to strip
    _row(headers={"X-Unicode": "grüße ✓", "X-Empty": "", "X-Tab": "\tv\t"}, aggregate_id="ünï"),
    _row(created_at=created_at_text(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5))))),
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
    texts = [created_at_text(ts) for ts in (utc, utc, same_instant_elsewhere, later, utc)]
    assert texts[2] == texts[0] == "2026-01-02T03:04:05.000000+00:00"
    assert texts[3] == "2026-01-02T03:04:05.000001+00:00"
    for text in texts:
        row = _row(created_at=text)
        assert block.render(row) == HeaderBlock("p", "S").render(row)
        assert f"Outbox-Created-At: {text}\r\n".encode() in block.render(row)


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-7F", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-81", False),  # past int8: the server's parse fails
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1", True),  # Go's ParseInt takes a sign
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7- 1", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-01", False),
        ("00-x-y-zz", False),
        ("", False),
    ],
)
def test_sampled_traceparent_is_read_as_nats_server_reads_it(value: str, sampled: bool) -> None:
    assert sampled_traceparent(value) is sampled


def test_header_block_turns_the_servers_trace_check_off_for_sampled_traceparents() -> None:
    """With skip_trace_check, a sampled traceparent (any case) puts Nats-Trace-Dest: trace disabled
    first, and everything else is exactly what the block renders without it."""
    on, off = HeaderBlock("p", "S", skip_trace_check=True), HeaderBlock("p", "S")
    trace_line = f"{names.HDR_TRACE_DEST}: {names.TRACE_DEST_DISABLED}\r\n".encode()
    sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for headers in (
        {"traceparent": sampled},
        {"x-a": "1", "TraceParent": f" {sampled} "},
        {"traceparent": sampled, "Traceparent": sampled},  # the line goes out once
    ):
        row = _row(headers=headers)
        plain = off.render(row)
        assert trace_line not in plain
        assert on.render(row) == b"NATS/1.0\r\n" + trace_line + plain[len(b"NATS/1.0\r\n") :]
    for headers in ({"traceparent": sampled.replace("-01", "-00")}, {"x-traceparent": sampled}, {}):
        row = _row(headers=headers)
        assert on.render(row) == off.render(row)


@pytest.mark.parametrize("name", ["bad name", "colon:", "ü"])
def test_header_block_refuses_header_names_nats_py_refuses(name: str) -> None:
    with pytest.raises(InvalidSubjectError, match="invalid header name"):
        HeaderBlock("p", "S").render(_row(headers={name: "v"}))


MALFORMED_ACKS = [
    b"[]",
    b'"ok"',
    b"null",
    b"42",
    b'{"error":"boom"}',
    b'{"error":[503]}',
    b'{"error":{"code":"abc","err_code":1}}',
    b'{"error":{"code":1e400}}',
    b'{"stream":"EVENTS","seq":"x"}',
    b'{"stream":"EVENTS","seq":null}',
    b'{"stream":"EVENTS","seq":1.5}',
    b'{"stream":"EVENTS","seq":true}',
]

ACK_PAYLOADS = [
    (b'{"stream":"EVENTS","seq":17}', Outcome.ACKED, 17),
    (b'{"stream":"EVENTS","seq":18,"duplicate":true}', Outcome.DUPLICATE, 18),
    (b'{"stream":"EVENTS","domain":"hub","seq":19}', Outcome.ACKED, 19),
    (b'{ "stream": "EVENTS", "seq": 20 }', Outcome.ACKED, 20),
    (b'{"seq":21, "duplicate": true, "stream":"EVENTS"}', Outcome.DUPLICATE, 21),
    (b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}', Outcome.RETRYABLE, 0),
    (b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}', Outcome.CONFIG, 0),
    (b"not json", Outcome.RETRYABLE, 0),
    (b'{"stream":"EV\\"X","seq":22}', Outcome.ACKED, 22),  # an escaped quote in the name
    (b'{"stream":"EVENTS","seq":23,"duplicate":false}', Outcome.ACKED, 23),
    # JSON that is no pub ack (a broken server, or anyone who can publish to the ack inbox):
    # retryable like unreadable text, never an exception in nats-py's read loop
    *((bad, Outcome.RETRYABLE, 0) for bad in MALFORMED_ACKS),
]


def _wave(n: int) -> _Wave:
    """A wave of ``n`` publishes sent at time 0, not yet resolved (call inside the event loop)."""
    return _Wave([None] * n, 0.0, n, asyncio.get_running_loop().create_future())


@pytest.mark.parametrize(("data", "outcome", "seq"), ACK_PAYLOADS)
async def test_ack_payloads_resolve_to_their_outcome(data: bytes, outcome: Outcome, seq: int) -> None:
    """Acks are read without a JSON decode when they have the server's usual shape; every shape the
    fast path does not recognise falls back to the decoder."""
    pub = JetStreamPublisher(NOWHERE)
    wave = _wave(1)
    pub._pending[7] = (wave, 0)
    await pub._on_ack(Msg(None, subject="_INBOX.abc.7", data=data))  # type: ignore[arg-type]
    result = wave.results[0]
    assert result is not None
    assert (result.outcome, result.seq) == (outcome, seq)
    assert not pub._pending


@pytest.mark.parametrize(("data", "outcome", "seq"), ACK_PAYLOADS)
def test_parse_ack_reads_each_payload_to_its_outcome(data: bytes, outcome: Outcome, seq: int) -> None:
    result = parse_ack(data)
    assert (result.outcome, result.seq) == (outcome, seq)


@pytest.mark.parametrize(("data", "outcome", "seq"), ACK_PAYLOADS)
async def test_acks_read_from_the_parser_resolve_like_delivered_ones(data: bytes, outcome: Outcome, seq: int) -> None:
    """The parser fast path (compact acks by one regex, the rest by ``_ack``) ends every payload in
    the same result as the delivered path above."""
    conn = _Conn()
    pub = JetStreamPublisher(NOWHERE)
    pub._prefix = INBOX
    pub._install_ack_fast_path(conn, ACK_SID)  # type: ignore[arg-type]
    wave = _wave(1)
    pub._pending[7] = (wave, 0)
    await conn._ps.parse(_ack_frame(7, data))
    result = wave.results[0]
    assert result is not None
    assert (result.outcome, result.seq) == (outcome, seq)
    assert not pub._pending
    assert conn.log == []


def test_message_accepts_an_encoded_header_block() -> None:
    msg = Message("a.b", b"x", HeaderBlock("p", "S").render(_row()))
    frame, size = encode_hpub(msg.subject, "_INBOX.x.1", msg.headers, msg.payload)
    assert frame.startswith(b"HPUB a.b _INBOX.x.1 ")
    assert size == len(msg.headers) + 1


# --- acks read from the parser in bulk (take_acks) ----------------------------------------------------

ACK_SID = 5
INBOX = "_INBOX.abc"


def _ack_frame(token: int | str, payload: bytes, sid: int = ACK_SID, reply: str = "") -> bytes:
    reply_part = f" {reply}" if reply else ""
    return f"MSG {INBOX}.{token} {sid}{reply_part} {len(payload)}\r\n".encode() + payload + b"\r\n"


def _seq(i: int, dup: bool = False) -> bytes:
    return b'{"stream":"EVENTS","seq":%d%s}' % (i, b',"duplicate":true' if dup else b"")


STATUS = b"NATS/1.0 503\r\n\r\n"
WIRE = b"".join(
    [
        *(_ack_frame(i, _seq(i)) for i in range(1, 4)),
        b"PING\r\n",
        _ack_frame(4, _seq(4, dup=True)),
        f"HMSG {INBOX}.5 {ACK_SID} {len(STATUS)} {len(STATUS)}\r\n".encode() + STATUS + b"\r\n",  # no responders
        b"MSG other.subject 9 3\r\nabc\r\n",  # another subscription
        _ack_frame(6, b"{}", reply="_INBOX.r"),  # a reply subject: nats-py's parser, then the ack path
        _ack_frame("x", b"{}"),  # not one of our tokens: ignored
        *(_ack_frame(i, _seq(i)) for i in range(7, 41)),
        b"+OK\r\nPONG\r\n",
        *(_ack_frame(i, b"") for i in range(41, 61)),
    ]
)
EXPECTED = [
    *(("ack", i, _seq(i)) for i in range(1, 4)),
    ("ping",),
    ("ack", 4, _seq(4, dup=True)),
    ("msg", ACK_SID, f"{INBOX}.5".encode(), b"", b"", STATUS),
    ("msg", 9, b"other.subject", b"", b"abc", None),
    ("ack", 6, b"{}"),
    *(("ack", i, _seq(i)) for i in range(7, 41)),
    ("pong",),
    *(("ack", i, b"") for i in range(41, 61)),
]


class _Conn:
    """What nats-py's parser calls on its client, recorded in order."""

    def __init__(self) -> None:
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self.log: list[tuple[object, ...]] = []
        self._ps = nats_parser.Parser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.log.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.log.append(("ping",))

    async def _process_pong(self) -> None:
        self.log.append(("pong",))

    async def _process_err(self, err: str) -> None:
        self.log.append(("err", err))

    async def _process_info(self, info: object) -> None:
        self.log.append(("info", info))


def _fast_path_conn(paths: list[str] | None = None) -> _Conn:
    """A parser with the fast path installed. Acks are logged as ("ack", token, payload) whichever
    way they came: ``stored_run`` (runs of compact acks) rebuilds each payload from (seq, duplicate), so a wrong
    token, seq or duplicate flag shows in the log. ``paths`` records which way each ack came."""
    conn = _Conn()
    paths = [] if paths is None else paths

    def ack(token: int, data: bytes) -> None:
        paths.append("ack")
        conn.log.append(("ack", token, bytes(data)))

    def stored_run(frames: StoredFrames) -> tuple[int, int]:
        for token, _, _, seq, duplicate in frames:
            paths.append("stored")
            conn.log.append(("ack", int(token), _seq(int(seq), bool(duplicate))))
        return len(frames), sum(len(f[2]) for f in frames)

    stored = StoredAcks.of(f"MSG {INBOX}.".encode(), str(ACK_SID).encode(), stored_run)
    install_ack_fast_path(conn, ACK_SID, INBOX, ack, stored, lambda: None)  # type: ignore[arg-type]
    return conn


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 29, 64, 101, 1000, len(WIRE)])
async def test_acks_taken_in_bulk_keep_every_frame_and_its_order(chunk: int) -> None:
    """However the reads cut the wire, every ack reaches the ack path once, and every other frame
    reaches nats-py's handlers, all in wire order."""
    conn = _fast_path_conn()
    for i in range(0, len(WIRE), chunk):
        await conn._ps.parse(WIRE[i : i + chunk])
    assert conn.log == EXPECTED
    acks = [e[2] for e in EXPECTED if e[0] == "ack"]
    # counted as received like nats-py counts them: the acks, and the frame with a foreign token
    assert conn.stats["in_msgs"] == len(acks) + 1
    assert conn.stats["in_bytes"] == sum(len(a) for a in acks if isinstance(a, bytes)) + 2
    assert not conn._ps.buf


@pytest.mark.parametrize("chunk", [1, 5, 90, 4096])
async def test_a_run_of_acks_never_reaches_nats_py_parser(chunk: int) -> None:
    """Plain acks, split anywhere, are read by take_acks alone: nats-py's parser (which records the
    last MSG it parsed in msg_arg) never sees one."""
    wire = b"".join(_ack_frame(i, _seq(i, dup=i % 7 == 0)) for i in range(1, 200))
    paths: list[str] = []
    conn = _fast_path_conn(paths)
    for i in range(0, len(wire), chunk):
        await conn._ps.parse(wire[i : i + chunk])
    assert conn.log == [("ack", i, _seq(i, dup=i % 7 == 0)) for i in range(1, 200)]
    assert conn._ps.msg_arg == {}
    assert set(paths) == {"stored"}  # every one by the compact-ack regex


async def test_a_run_of_acks_resolves_every_wave_in_it() -> None:
    """One read with acks of two waves interleaved, a late ack and a duplicate: each publish gets its
    own result, a wave completes when its last ack came, and each ack counts once in the latency."""
    conn = _Conn()
    pub = JetStreamPublisher(NOWHERE)
    pub._prefix = INBOX
    pub._install_ack_fast_path(conn, ACK_SID)  # type: ignore[arg-type]
    a, b = _wave(3), _wave(2)
    pub._pending.update({1: (a, 0), 2: (b, 0), 3: (a, 1), 4: (a, 2), 5: (b, 1)})
    await conn._ps.parse(
        b"".join(_ack_frame(t, _seq(10 + t, dup=t == 4)) for t in (1, 2, 3, 9, 4))  # 9: not pending
    )
    assert [(r.outcome, r.seq) for r in a.results if r is not None] == [
        (Outcome.ACKED, 11),
        (Outcome.ACKED, 13),
        (Outcome.DUPLICATE, 14),
    ]
    assert (a.remaining, a.done.done()) == (0, True)
    first = b.results[0]
    assert first is not None
    assert (first.outcome, first.seq) == (Outcome.ACKED, 12)
    assert (b.results[1], b.remaining, b.done.done()) == (None, 1, False)
    assert pub._pending == {5: (b, 1)}
    assert pub.late_acks == 1
    assert sum(pub.ack_latency.counts) == 4
    assert conn.stats["in_msgs"] == 5
    assert conn.log == []


def test_take_acks_stops_where_a_frame_is_cut_or_foreign() -> None:
    head = f"MSG {INBOX}.".encode()
    got: list[tuple[int, bytes]] = []

    def take(buf: bytes) -> tuple[int, int, int, bool]:
        got.clear()
        return take_acks(buf, head, str(ACK_SID).encode(), lambda t, d: got.append((t, d)))

    two = _ack_frame(1, b"ab") + _ack_frame(2, b"cde")
    assert take(two) == (len(two), 2, 5, True)
    assert got == [(1, b"ab"), (2, b"cde")]
    first = len(_ack_frame(1, b"ab"))
    for cut in range(first + 1, len(two)):  # the second frame cut anywhere: wait for the rest
        assert take(two[:cut]) == (first, 1, 2, True)
    assert take(b"MS") == (0, 0, 0, True)
    assert take(b"PING\r\n") == (0, 0, 0, False)
    assert take(_ack_frame(1, b"ab") + _ack_frame(3, b"x", sid=6)) == (first, 1, 2, False)
    assert take(_ack_frame(-1, b"x")) == (0, 0, 0, False)
    assert take(f"MSG {INBOX}.1 {ACK_SID} -5\r\nx\r\n".encode()) == (0, 0, 0, False)


def test_take_acks_reads_compact_acks_by_regex_and_the_rest_by_frame() -> None:
    head = f"MSG {INBOX}.".encode()
    sid = str(ACK_SID).encode()
    got: list[tuple[object, ...]] = []

    def take(buf: bytes) -> tuple[int, int, int, bool]:
        got.clear()
        return take_acks(buf, head, sid, lambda t, d: got.append(("ack", t, d)), StoredAcks.of(head, sid, run))

    def run(frames: StoredFrames) -> tuple[int, int]:
        taken = 0
        for token, size, payload, seq, dup in frames:
            if int(size) != len(payload):
                break
            got.append(("stored", int(token), int(seq), bool(dup)))
            taken += 1
        return taken, sum(len(f[2]) for f in frames[:taken])

    wire = _ack_frame(1, _seq(11)) + _ack_frame(2, b'{"stream":"EVENTS","domain":"hub","seq":12}')
    wire += _ack_frame(3, _seq(13, dup=True))
    assert take(wire) == (len(wire), 3, len(wire) - 3 * len(f"MSG {INBOX}.1 {ACK_SID} 00\r\n\r\n"), True)
    assert got == [
        ("stored", 1, 11, False),
        ("ack", 2, b'{"stream":"EVENTS","domain":"hub","seq":12}'),
        ("stored", 3, 13, True),
    ]
    first = len(_ack_frame(1, _seq(11)))
    for cut in range(first + 1, len(wire) - 1):  # cut anywhere after the first: it alone is taken
        consumed, taken, _, wait = take(wire[:cut])
        assert wait
        assert consumed >= first
        assert taken >= 1
        assert got[0] == ("stored", 1, 11, False)
    # A size field that disagrees with the compact payload: the frame is read by its size.
    payload = _seq(14) + b"\r\nXY"
    lying = f"MSG {INBOX}.4 {ACK_SID} {len(payload)}\r\n".encode() + payload + b"\r\n"
    assert take(lying) == (len(lying), 1, len(payload), True)
    assert got == [("ack", 4, payload)]
    # ... also after compact acks of the same run, which are taken first
    good = _ack_frame(3, _seq(13, dup=True))
    assert take(good + lying) == (len(good + lying), 2, len(_seq(13, dup=True)) + len(payload), True)
    assert got == [("stored", 3, 13, True), ("ack", 4, payload)]
    # Another subscription's frame of the same shape is not an ack.
    assert take(_ack_frame(5, _seq(15), sid=6)) == (0, 0, 0, False)
    assert got == []


class _WireNc:
    """The part of a nats-py Client publish_wave touches; records what it writes."""

    is_connected = True
    is_draining_pubs = False
    _transport = None  # not a socket nats-py connected: every wave goes through the flusher

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._pending: list[bytes] = []

    async def _send_command(self, cmd: bytes) -> None:
        self.written.append(cmd)

    async def _flush_pending(self) -> None:
        return None


async def test_publish_wave_writes_encode_hpubs_frames_in_one_write() -> None:
    """The wave's frames are encode_hpub's bytes, with a reply subject per message, whether the
    subject is new or cached and the headers a mapping or an encoded block; messages NATS would
    refuse never reach the wire and end as permanent failures."""
    pub = JetStreamPublisher(NOWHERE, PublishConfig(ack_timeout_seconds=0.05))
    nc = _WireNc()
    pub._nc = nc  # type: ignore[assignment]
    pub._prefix = INBOX
    pub._max_payload = 400
    block = HeaderBlock("p", "S").render(_row())
    messages = [
        Message("a.b", b"1", block),  # new subject
        Message("a.b", b"2", block),  # cached subject
        Message("a.c", b"3", {"X-A": "1"}),  # a mapping
        Message("a.c", b"4", block),
        Message("bad subject", b"5", block),  # refused, twice: never cached
        Message("bad subject", b"6", block),
        Message("a.b", b"x" * 400, block),  # past max_payload
    ]
    results = await pub.publish_wave(messages)
    sent = [0, 1, 2, 3]
    assert nc.written == [
        b"".join(
            encode_hpub(messages[i].subject, f"{INBOX}.{i + 1}", messages[i].headers, messages[i].payload)[0]
            for i in sent
        )
    ]
    assert [r.reason for r in results] == [names.REASON_TIMEOUT] * 4 + [
        names.REASON_INVALID_SUBJECT,
        names.REASON_INVALID_SUBJECT,
        names.REASON_PAYLOAD_TOO_LARGE,
    ]
    assert pub._subjects == {"a.b": b"a.b", "a.c": b"a.c"}
    # tokens go on from where the wave left them
    await pub.publish_wave([Message("a.b", b"7", block)])
    assert nc.written[1] == encode_hpub("a.b", f"{INBOX}.8", block, b"7")[0]


class _Socket:
    """An asyncio write transport that records what it is given."""

    def __init__(self, closing: bool = False, buffered: int = 0) -> None:
        self.closing, self.buffered = closing, buffered
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)


def _connected(socket: _Socket | None, pending: list[bytes] | None = None, connected: bool = True) -> Client:
    """A nats-py Client whose transport writes to ``socket`` (None: a transport other than TCP)."""
    client = Client()
    client._status = Client.CONNECTED if connected else Client.RECONNECTING
    client._pending = pending or []
    if socket is None:
        client._transport = None
        return client
    transport = TcpTransport()  # type: ignore[no-untyped-call]
    transport._io_writer = cast(asyncio.StreamWriter, SimpleNamespace(transport=socket))
    client._transport = transport
    return client


def test_a_small_wave_is_written_to_the_socket_at_once_only_when_it_goes_there_in_order() -> None:
    """_write_now writes when nothing is queued before the wave and the socket takes it now; else
    the wave is left to nats-py's flusher (it returns False and writes nothing)."""
    wave = b"HPUB a 1 0 0\r\n\r\n"
    socket = _Socket()
    assert _write_now(_connected(socket), wave)
    assert socket.written == [wave]
    assert _write_now(_connected(socket), b"x" * DIRECT_WRITE_BYTES)  # the limit itself still goes
    left_to_the_flusher = [  # (socket, wave, queued before it, connected)
        (_Socket(), b"x" * (DIRECT_WRITE_BYTES + 1), [], True),  # a drain's: back-pressure through drain()
        (_Socket(), wave, [b"PING\r\n"], True),  # something queued before it must go first
        (_Socket(), wave, [], False),  # reconnecting: nats-py buffers for the next connection
        (_Socket(buffered=1), wave, [], True),  # the socket is full: the flusher waits for it
        (_Socket(closing=True), wave, [], True),
    ]
    for sock, data, pending, connected in left_to_the_flusher:
        assert not _write_now(_connected(sock, pending, connected), data)
        assert sock.written == []
    assert not _write_now(_connected(None), wave)  # not a TCP transport (a WebSocket one)


async def test_a_malformed_ack_ends_its_publish_and_the_acks_after_it_are_still_read() -> None:
    """A JSON ack of the wrong shape resolves its publish (retryable) instead of raising inside
    nats-py's read loop: an exception there ended the loop (no ack was read any more until the
    connection was replaced) and, its publish being out of the pending table already, left the
    wave waiting forever, with the loop's partitions held."""
    conn = _Conn()
    pub = JetStreamPublisher(NOWHERE)
    pub._prefix = INBOX
    pub._install_ack_fast_path(conn, ACK_SID)  # type: ignore[arg-type]
    wave = _wave(3)
    pub._pending.update({7: (wave, 0), 8: (wave, 1), 9: (wave, 2)})
    await conn._ps.parse(_ack_frame(7, b"[]") + _ack_frame(8, b'{"error":"boom"}') + _ack_frame(9, _seq(9)))
    assert [(r.outcome, r.seq) for r in wave.results if r is not None] == [
        (Outcome.RETRYABLE, 0),
        (Outcome.RETRYABLE, 0),
        (Outcome.ACKED, 9),
    ]
    assert wave.done.done()
    assert not pub._pending
