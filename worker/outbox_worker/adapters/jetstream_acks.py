"""The JetStream wire of the relay's hot path: HPUB frames out, ack frames in.

Three pieces, each pinned byte for byte against nats-py 2.16 by tests/unit/test_jetstream_acks.py:

- **frame encoding** (:func:`encode_headers`, :func:`encode_hpub`): the bytes nats-py's
  ``Client.publish`` writes, built ~7x cheaper; a message NATS would refuse raises
  :class:`InvalidMessageError` instead of reaching the wire;
- **the ack parser** (:func:`take_acks`, :class:`StoredAcks`, :func:`parse_ack`): runs of ack frames
  read straight from a read buffer, and one ack payload to its :class:`PublishResult`;
- **the nats-py parser hook** (:func:`install_ack_fast_path`): plain acks of the relay's ack inbox
  resolved from nats-py's read loop, every other frame left to nats-py, in wire order.

The publisher (adapters/publisher.py) owns the connection, the stream checks and the pending
publishes; this module owns no state but a bounded cache of checked header names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

from nats.aio.client import Client
from nats.protocol import parser as nats_parser

from outbox_common import names
from outbox_common.envelope import HEADER_NAME, header_value
from outbox_worker.core.policy import Outcome, PublishResult, classify_error_ack

# nats-py 2.16's rule (nats/aio/client.py): subjects without whitespace.
_SUBJECT_INVALID = re.compile(r"[ \t\r\n]")
_valid_names: set[str] = set()  # header names already checked (bounded)


class InvalidMessageError(ValueError):
    """A message that NATS would refuse (bad subject or header name): it can never be published.
    ``reason`` says which (``invalid_subject`` or ``invalid_header``)."""

    def __init__(self, message: str, reason: str = names.REASON_INVALID_SUBJECT) -> None:
        super().__init__(message)
        self.reason = reason


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block (``NATS/1.0`` line, one line per header, blank line) nats-py writes for
    ``headers``. Raises InvalidMessageError for a header name nats-py refuses."""
    lines = ["NATS/1.0\r\n"]
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if key not in _valid_names:
            if not HEADER_NAME.fullmatch(key):
                raise InvalidMessageError(f"invalid header name {key!r}"[:200], names.REASON_INVALID_HEADER)
            if len(_valid_names) < 4096:
                _valid_names.add(key)
        lines.append(f"{key}: {header_value(v)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def encode_hpub(subject: str, reply: str, headers: Mapping[str, str] | bytes, payload: bytes) -> tuple[bytes, int]:
    """The ``HPUB`` frame nats-py's ``Client.publish`` writes for these arguments, byte for byte (a
    unit test compares them), and the size the server counts against max_payload (headers + payload).
    ``headers`` is a mapping, or a header block already encoded (:class:`~outbox_common.envelope.HeaderBlock`).

    Why not ``Client.publish``: it validates and encodes every header value character by character
    (``str.translate`` with a dict), ~10 µs per message with the relay's nine headers, the largest
    single cost of the relay; this builds the same bytes in ~1.5 µs.
    """
    if not subject or _SUBJECT_INVALID.search(subject):
        raise InvalidMessageError(f"invalid subject {subject!r}"[:200])
    hdr = headers if isinstance(headers, bytes) else encode_headers(headers)
    total = len(hdr) + len(payload)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), len(hdr), total, hdr, payload), total


# A compact success ack frame; %s are the escaped head and subscription id (stored_ack_frame).
_STORED_FRAME = rb'%s(\d+) %s (\d+)\r\n(\{"stream":"[^"\\\r\n]*","seq":(\d+)(,"duplicate":true)?\})\r\n'


def stored_ack_frame(head: bytes, sid: bytes) -> re.Pattern[bytes]:
    """One whole ack frame (see :func:`take_acks`) whose payload is the server's compact success ack,
    ``{"stream":"S","seq":7}`` or ``{"stream":"S","seq":7,"duplicate":true}``. Groups: token, size,
    payload, seq, ``,"duplicate":true`` when present. Any other payload (an error, a domain, spaces, an
    escaped stream name) does not match and takes :func:`take_acks`' general path."""
    return re.compile(_STORED_FRAME % (re.escape(head), re.escape(sid)))


def stored_ack_run(head: bytes, sid: bytes) -> re.Pattern[bytes]:
    """One or more :func:`stored_ack_frame` frames back to back: where a run of them ends.

    Matching keeps ~400 bytes of state per frame (200,000 frames took ~80 MB). :func:`take_acks`
    sees one read at a time (nats-py reads 32 KB), ~450 frames, ~0.2 MB."""
    frame = _STORED_FRAME.replace(b"(", b"(?:")  # the same frame, without groups
    return re.compile(b"(?:%s)+" % (frame % (re.escape(head), re.escape(sid))))


# (token, size, payload, seq, duplicate) of each frame of a run, as re.findall gives them
StoredFrames = list[tuple[bytes, bytes, bytes, bytes, bytes]]


class StoredAcks(NamedTuple):
    """How :func:`take_acks` reads runs of compact success acks: ``on_run(frames)`` gets the frames
    of a run (:data:`StoredFrames`) in wire order and returns how many it took and their payload
    bytes. It stops at the first frame whose size field disagrees with its payload, which
    :func:`take_acks` then reads by its size."""

    frame: re.Pattern[bytes]
    run: re.Pattern[bytes]
    on_run: Callable[[StoredFrames], tuple[int, int]]

    @classmethod
    def of(cls, head: bytes, sid: bytes, on_run: Callable[[StoredFrames], tuple[int, int]]) -> StoredAcks:
        return cls(stored_ack_frame(head, sid), stored_ack_run(head, sid), on_run)


def take_acks(
    buf: bytes,
    head: bytes,
    sid: bytes,
    on_ack: Callable[[int, bytes], None],
    stored: StoredAcks | None = None,
) -> tuple[int, int, int, bool]:
    """Hand the complete ack frames at the start of ``buf`` to ``on_ack(token, payload)``.

    An ack frame is ``MSG <head><token> <sid> <size>\r\n<payload>\r\n``: ``head`` is ``b"MSG "`` plus
    the ack inbox and a dot, ``sid`` the ack subscription's id, no reply subject, no headers. Stops at
    the first frame that is anything else (nats-py's parser takes it from there) or that is not
    complete yet. Returns (bytes consumed, acks taken, their payload bytes, ``wait``): ``wait`` means
    the rest, if any, may be the beginning of an ack frame and needs more bytes; otherwise the rest
    starts with a frame for nats-py's parser.

    With ``stored`` (:class:`StoredAcks`), a run of frames carrying the server's compact success ack
    goes to ``stored.on_run`` in one call: one regex match finds where the run ends, one ``findall``
    reads its frames, ~0.2 + 0.3 µs per ack. Matching frame by frame and resolving each in its own
    call cost ~1.4 µs per ack in all, against ~1.0 now (micro-benchmark of 1,000-ack reads).
    """
    pos, n, taken, nbytes, skip = 0, len(buf), 0, 0, len(head)
    while pos < n:
        if stored is not None:
            m = stored.run.match(buf, pos)
            if m is not None:
                frames = stored.frame.findall(buf, pos, m.end())
                k, size = stored.on_run(frames)
                taken += k
                nbytes += size
                if k == len(frames):
                    pos = m.end()
                    continue
                # frame k's size field disagrees with its payload: read it by its size, below
                pos += sum(skip + len(t) + len(s) + len(p) + len(sid) + 6 for t, s, p, _, _ in frames[:k])
        if not buf.startswith(head, pos):
            return pos, taken, nbytes, n - pos < skip and head.startswith(buf[pos:])
        eol = buf.find(b"\r\n", pos + skip)
        if eol < 0:  # the control line is cut off (nats-py's bound on its length applies)
            return pos, taken, nbytes, n - pos < nats_parser.MAX_CONTROL_LINE_SIZE
        fields = buf[pos + skip : eol].split(b" ")
        if len(fields) != 3 or fields[1] != sid or not fields[0].isdigit() or not fields[2].isdigit():
            return pos, taken, nbytes, False  # a reply subject, another subscription, not our token
        start = eol + 2
        end = start + int(fields[2])
        if end + 2 > n:  # the payload is cut off
            return pos, taken, nbytes, True
        on_ack(int(fields[0]), buf[start:end])
        taken += 1
        nbytes += end - start
        pos = end + 2
    return pos, taken, nbytes, True


def parse_ack(data: bytes) -> PublishResult:
    """The result of one ack payload (a JSON pub ack): acked or duplicate with its stream sequence,
    or the error ack classified by :func:`classify_error_ack`; an unreadable payload is retryable.

    The server's compact shape ``{"stream":"S","seq":7[,"duplicate":true]}`` is read without a JSON
    decode; every other shape (spaces, an escaped name, an error) goes through the decoder.
    """
    if b'"error"' not in data and b" " not in data:
        seq = _compact_seq(data)
        if seq >= 0:
            return PublishResult(Outcome.DUPLICATE if b'"duplicate":true' in data else Outcome.ACKED, seq=seq)
    try:
        ack = json.loads(data)
        if not isinstance(ack, dict):
            raise TypeError("an ack is a JSON object")
        err = ack.get("error")
        if err:
            if not isinstance(err, dict):
                raise TypeError("an ack's error is a JSON object")
            code, err_code = _ack_int(err.get("code", 0)), _ack_int(err.get("err_code", 0))
            return classify_error_ack(code, err_code, str(err.get("description", "")))
        outcome = Outcome.DUPLICATE if ack.get("duplicate") else Outcome.ACKED
        return PublishResult(outcome, seq=_ack_int(ack.get("seq", 0)))
    except (ValueError, TypeError, OverflowError):
        # Never raise: this runs inside nats-py's read loop, which an exception ends for good (no
        # more acks are read until the connection is replaced), and the publish it answers has
        # already left the pending table, so no timeout would ever end its wave.
        return PublishResult(Outcome.RETRYABLE, names.REASON_SERVER_ERROR, "unreadable ack")


def _ack_int(value: object) -> int:
    """An integer field of an ack (seq, code, err_code): JSON integers only, not booleans,
    strings, floats or null."""
    if type(value) is not int:
        raise TypeError("not an integer")
    return value


def _compact_seq(data: bytes) -> int:
    """The ``"seq"`` of a compact ack payload, or -1 when it is not there in that shape."""
    at = data.find(b'"seq":')
    if at < 0:
        return -1
    end = data.find(b",", at)
    if end < 0:
        end = data.find(b"}", at)
    if end <= at:
        return -1
    try:
        return int(data[at + 6 : end])
    except ValueError:
        return -1


def install_ack_fast_path(
    nc: Client,
    sid: int,
    inbox: str,
    on_ack: Callable[[int, bytes], None],
    stored: StoredAcks,
    on_read: Callable[[], None],
) -> None:
    """Resolve plain acks (no headers) of the ack inbox ``inbox`` (subscription ``sid``) straight
    from nats-py's read loop: ``on_ack(token, payload)`` per ack, ``stored.on_run`` per run of compact
    success acks, ``on_read()`` once per read before its acks (they all arrived then).

    Why: the stock path runs a regex, builds a ``Msg``, queues it for the subscription task and
    awaits the callback per ack: ~30% of a worker's CPU before this. Two hooks:

    - the parser's ``parse``: while at a frame boundary, the run of complete ack frames at the start
      of what was read is read in one loop (:func:`take_acks`); the first other frame and everything
      after it go to nats-py's parser;
    - ``_process_msg``, where nats-py's parser delivers messages: acks it parsed itself (after
      another frame, or a frame split across reads) still skip the ``Msg`` and the queue.

    Status messages (503 no responders, with headers) and other subscriptions take nats-py's own
    path, in the order they arrived, so the subscription callback stays in place. Private API of
    the pinned nats-py 2.16 (``Parser.parse``/``buf``/``state``, ``Client._process_msg`` and the
    calls between them); tests/unit/test_jetstream_acks.py fails if any of them changes.
    """
    prefix = (inbox + ".").encode()
    _hook_process_msg(nc, sid, prefix, on_ack)
    _hook_parse(nc, b"MSG " + prefix, str(sid).encode(), on_ack, stored, on_read)


def _hook_process_msg(nc: Client, sid: int, prefix: bytes, on_ack: Callable[[int, bytes], None]) -> None:
    """Acks nats-py's parser delivers go to ``on_ack`` without a ``Msg`` or a queue."""
    original = nc._process_msg
    start = len(prefix)
    stats = nc.stats

    async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if msg_sid == sid and not headers and subject.startswith(prefix):
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            try:
                token = int(subject[start:])
            except ValueError:
                return
            on_ack(token, data)
            return
        await original(msg_sid, subject, reply, data, headers)

    nc._process_msg = process_msg  # type: ignore[method-assign,assignment]


def _hook_parse(
    nc: Client,
    head: bytes,
    sid: bytes,
    on_ack: Callable[[int, bytes], None],
    stored: StoredAcks,
    on_read: Callable[[], None],
) -> None:
    """Runs of ack frames at the start of a read are taken (:func:`take_acks`) before nats-py parses."""
    ps = nc._ps
    parse = ps.parse
    stats = nc.stats

    async def parse_acks_first(data: bytes = b"") -> None:
        if ps.state != nats_parser.AWAITING_CONTROL_LINE:  # inside a frame nats-py started
            await parse(data)
            return
        buf = ps.buf  # reset() on reconnect replaces it: read it per call
        buf.extend(data)
        on_read()
        consumed, taken, nbytes, wait = take_acks(bytes(buf), head, sid, on_ack, stored)
        if consumed:
            del buf[:consumed]
            stats["in_msgs"] += taken
            stats["in_bytes"] += nbytes
        if buf and not wait:
            await parse(b"")

    ps.parse = parse_acks_first  # type: ignore[method-assign]
