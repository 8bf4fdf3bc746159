"""JetStream publisher that owns its ack tracking.

Why not ``js.publish_async``: in nats-py 2.16 an error ack never completes its future, there is no
per-message ack timeout, and publishes lost in a disconnect are never failed (facts.md). Here each
publish carries a reply subject under one private inbox (``<inbox>.<token>``); acks arriving there are
resolved by token, straight from nats-py's parser (``_install_ack_fast_path``), and status replies
through one wildcard subscription.

Guarantees of :meth:`JetStreamPublisher.publish_wave`:

- every message of the wave ends in exactly one :class:`~outbox_worker.core.policy.PublishResult`
  (acked, duplicate, retryable, permanent, refused, config) no later than ``ack_timeout`` after it
  was sent; a message NATS would refuse (invalid subject or header name, over ``max_payload``) is
  ``refused`` without being sent;
- a disconnect fails every unacknowledged publish at once as retryable (the caller re-publishes with
  the same ``Nats-Msg-Id``; JetStream absorbs the copy if the first one was stored);
- a late ack for a publish that already timed out is ignored (counted in ``late_acks``);
- nothing is retried here: retry policy belongs to the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import nats
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.protocol import parser as nats_parser

from outbox_common import names
from outbox_common.envelope import HEADER_NAME, HeaderBlock, header_value
from outbox_common.settings import StreamMode, WorkerSettings
from outbox_worker.adapters.metrics import LATENCY_BUCKETS, BucketCounts
from outbox_worker.core.policy import Outcome, PublishResult, classify_error_ack
from outbox_worker.core.subjects import subject_covers

log = logging.getLogger(__name__)

_STATUS = "Status"
_DESCRIPTION = "Description"
# nats-py 2.16's rule (nats/aio/client.py): subjects without whitespace.
_SUBJECT_INVALID = re.compile(r"[ \t\r\n]")
_valid_names: set[str] = set()  # header names already checked (bounded)
_SUBJECT_CACHE_LIMIT = 10_000


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


class NatsConfigError(Exception):
    """NATS is reachable but set up so the relay cannot run (auth, stream, duplicate window)."""


class NatsUnavailableError(Exception):
    """NATS could not be reached in time."""


class Message(NamedTuple):
    """One message to publish. :meth:`JetStreamPublisher.publish_wave` takes any tuple of these three
    fields, so the relay builds plain tuples (one per event; a NamedTuple's constructor costs ~0.2 µs
    more)."""

    subject: str
    payload: bytes
    headers: Mapping[str, str] | bytes  # a mapping, or an encoded header block (HeaderBlock.render)


MessageFields = tuple[str, bytes, Mapping[str, str] | bytes]  # (subject, payload, headers): a Message or a plain tuple
# PublishResult(outcome, "", "", seq) without its Python-level constructor: built once per ack.
_new_result = tuple.__new__
_ACKED, _DUPLICATE = Outcome.ACKED, Outcome.DUPLICATE


@dataclass(slots=True)
class _Wave:
    results: list[PublishResult | None]
    sent_at: float  # one write per wave: every message of it was sent at once
    remaining: int
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def resolve(self, index: int, result: PublishResult) -> bool:
        if self.results[index] is not None:
            return False
        self.results[index] = result
        self.counted(1)
        return True

    def counted(self, resolved: int) -> None:
        """``resolved`` more results are in ``results`` (set by :meth:`resolve`, or in place by the
        ack fast path): the wave is done when none remains."""
        self.remaining -= resolved
        if self.remaining == 0:
            self.done.set()


class JetStreamPublisher:
    """One NATS connection, many acks in flight, results for every publish. Not thread-safe."""

    def __init__(
        self, settings: WorkerSettings, *, name: str = "outbox-relay", ack_latency: BucketCounts | None = None
    ) -> None:
        self._s = settings
        self._name = name
        self._nc: Client | None = None
        self._prefix = ""
        self._token = 0
        self._read_at = 0.0  # time.monotonic() of the read whose acks the fast path is resolving
        self._pending: dict[int, tuple[_Wave, int]] = {}
        self._max_payload = 1024 * 1024
        self.late_acks = 0
        self.disconnects = 0
        # seconds from a wave's write to each of its acks (the worker exposes it on /metrics)
        self.ack_latency = ack_latency if ack_latency is not None else BucketCounts(LATENCY_BUCKETS)
        self._stream_cache: dict[str, tuple[float, bool]] = {}
        self._subjects: dict[str, bytes] = {}  # subjects encode_hpub accepted, encoded
        self.ack_subscription: Subscription | None = None

    def header_block(self) -> HeaderBlock:
        """The header block for rows' messages (the relay's and the bench baselines'). Call after
        :meth:`connect`: the trace-check line (see HeaderBlock) needs nats-server 2.14+, and older
        servers would log an invalid trace destination for every message that carried it."""
        skip = not self._s.nats_message_tracing and self.server_at_least(2, 14)
        return HeaderBlock(self._s.publisher, self._s.stream, skip_trace_check=skip)

    def server_at_least(self, major: int, minor: int) -> bool:
        """Whether the server connected to runs ``major.minor`` or later (False if unknown)."""
        if self._nc is None:
            return False
        try:
            version = self._nc.connected_server_version
            return (version.major, version.minor) >= (major, minor)
        except (ValueError, TypeError):
            return False

    # --- lifecycle --------------------------------------------------------------------------------
    async def connect(self, timeout: float = 10.0) -> None:
        """Connect, subscribe the ack inbox. Raises NatsConfigError on bad credentials,
        NatsUnavailableError when no server answers within ``timeout``."""
        s = self._s
        opts: dict[str, Any] = {
            "servers": s.server_list,
            "name": self._name,
            "ping_interval": s.nats_ping_interval_seconds,
            "max_outstanding_pings": 3,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # never give up; the worker's supervision decides
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
            "pending_size": 64 * 1024 * 1024,
        }
        if s.nats_creds_file:
            opts["user_credentials"] = s.nats_creds_file
        if s.nats_user:
            opts["user"] = s.nats_user
            opts["password"] = s.nats_password.get_secret_value()
        if s.nats_token.get_secret_value():
            opts["token"] = s.nats_token.get_secret_value()
        if s.nats_tls_ca_file or s.nats_tls_cert_file:
            ctx = ssl.create_default_context(cafile=s.nats_tls_ca_file or None)
            if s.nats_tls_cert_file:
                ctx.load_cert_chain(s.nats_tls_cert_file, s.nats_tls_key_file or None)
            opts["tls"] = ctx
        connect_error: list[BaseException] = []

        async def first_error(exc: Exception) -> None:
            connect_error.append(exc)

        # The first connect must not retry forever: bounded attempts, then a clear error.
        try:
            nc = await asyncio.wait_for(
                nats.connect(**{**opts, "allow_reconnect": False, "error_cb": first_error}), timeout
            )
        except (TimeoutError, nats_errors.NoServersError, OSError) as exc:
            why = connect_error[-1] if connect_error else exc
            if _is_auth_error(why):
                raise NatsConfigError(
                    "NATS rejected the credentials: check the NATS user/password, token or creds Secret"
                ) from None
            raise NatsUnavailableError(f"no NATS server answered at {s.nats_servers}: {why!r}"[:300]) from None
        except Exception as exc:
            if _is_auth_error(exc) or any(_is_auth_error(e) for e in connect_error):
                raise NatsConfigError(
                    "NATS rejected the credentials: check the NATS user/password, token or creds Secret"
                ) from None
            raise
        await nc.close()
        # Now the long-lived connection with reconnects enabled.
        self._nc = await nats.connect(**opts)
        self._max_payload = self._nc.max_payload
        self._prefix = self._nc.new_inbox()
        self.ack_subscription = await self._nc.subscribe(
            self._prefix + ".*", cb=self._on_ack, pending_msgs_limit=1_000_000
        )
        self._install_ack_fast_path(self._nc, self.ack_subscription._id)
        await self._nc.flush(timeout=int(timeout))

    async def close(self, timeout: float = 5.0) -> None:
        """Fail what is still pending, drain and close. Idempotent."""
        nc, self._nc = self._nc, None
        self._fail_all(PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, "publisher closed"))
        if nc is None or nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), timeout)
        except Exception:
            await nc.close()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def max_payload(self) -> int:
        return self._max_payload

    # --- stream checks ------------------------------------------------------------------------------
    async def ensure_stream(self, filter_subject: str, horizon_seconds: float) -> None:
        """Check (or create) the stream: it must exist, capture ``filter_subject`` and keep a duplicate
        window of at least ``horizon_seconds``. Raises NatsConfigError naming the fix. Warns about a
        stream that acks before it writes (``persist_mode: async``)."""
        assert self._nc is not None
        s = self._s
        jsm = self._nc.jsm()
        try:
            info = await jsm.stream_info(s.stream)
        except js_errors.NotFoundError:
            if s.stream_mode != StreamMode.CREATE:
                raise NatsConfigError(
                    f"stream {s.stream!r} does not exist: create it with subjects [{filter_subject!r}] "
                    "or set stream mode to 'create'"
                ) from None
            window = s.stream_duplicate_window_seconds
            try:
                await jsm.add_stream(
                    name=s.stream,
                    subjects=[filter_subject],
                    storage=js_api.StorageType.FILE,
                    num_replicas=s.stream_replicas,
                    duplicate_window=window,
                )
                log.info("created stream %s for %s (duplicate window %.0fs)", s.stream, filter_subject, window)
                return
            except js_errors.BadRequestError:
                # Another worker created it first (or the config conflicts): check what exists.
                info = await jsm.stream_info(s.stream)
        cfg = info.config
        subjects = list(cfg.subjects or [])
        if not any(subject_covers(pattern, filter_subject) for pattern in subjects):
            raise NatsConfigError(
                f"stream {s.stream!r} captures {subjects} but the subject template needs "
                f"{filter_subject!r}: add it to the stream's subjects or change the subject template"
            )
        window = float(cfg.duplicate_window or 0.0)
        if window < horizon_seconds:
            raise NatsConfigError(
                f"stream {s.stream!r} has a duplicate window of {window:.0f}s, shorter than the relay's "
                f"re-publish horizon of {horizon_seconds:.0f}s (lease TTL + ack timeout + max retry "
                "delay): a re-published event could be stored twice. Raise the stream's "
                "duplicate_window or lower those settings"
            )
        if cfg.persist_mode == js_api.PersistMode.ASYNC:
            # The relay deletes (or marks) a row on its ack. This mode acks before the message is
            # written, so a killed nats-server can lose events whose rows are already gone.
            log.warning(
                "stream %r acks before it writes (persist_mode: async): if nats-server is killed, events "
                "already deleted or marked in the outbox can be lost. Use the default persist mode for "
                "the relay's no-loss guarantee",
                s.stream,
            )

    async def stream_exists_for(self, subject: str) -> bool | None:
        """Whether some stream captures ``subject`` (cached 5 s); None when the API did not answer."""
        now = time.monotonic()
        hit = self._stream_cache.get(subject)
        if hit and now - hit[0] < 5.0:
            return hit[1]
        if self._nc is None:
            return None
        try:
            await self._nc.jetstream().find_stream_name_by_subject(subject)
            found = True
        except js_errors.NotFoundError:
            found = False
        except Exception:
            return None
        self._stream_cache[subject] = (now, found)
        return found

    # --- publishing ---------------------------------------------------------------------------------
    async def publish_wave(self, messages: Sequence[MessageFields]) -> list[PublishResult]:
        """Publish all messages with acks in flight together; return one result per message, in order.

        Returns within ``ack_timeout`` of the last send. Never raises for a per-message problem.
        """
        n = len(messages)
        wave = _Wave([None] * n, time.monotonic(), n)
        if n == 0:
            return []
        nc = self._nc
        if nc is None or not nc.is_connected or nc.is_draining_pubs:
            for i in range(n):
                wave.resolve(i, PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, "not connected"))
            return [r for r in wave.results if r is not None]
        prefix = self._prefix
        reply_head = prefix.encode() + b"."
        pending = self._pending
        limit = self._max_payload
        subjects = self._subjects
        frames: list[bytes] = []
        tokens: list[int] = []
        token = self._token
        for i, (text, payload, hdr) in enumerate(messages):
            token += 1
            subject = subjects.get(text)
            try:
                if subject is None or type(hdr) is not bytes:
                    frame, size = encode_hpub(text, f"{prefix}.{token}", hdr, payload)
                    if len(subjects) >= _SUBJECT_CACHE_LIMIT:
                        subjects.clear()
                    subjects[text] = text.encode()  # valid: encode_hpub checked it
                else:  # encode_hpub's bytes, with the subject checked and encoded once
                    size = len(hdr) + len(payload)
                    frame = b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                        subject,
                        reply_head,
                        token,
                        len(hdr),
                        size,
                        hdr,
                        payload,
                    )
            except InvalidMessageError as exc:
                wave.resolve(i, PublishResult(Outcome.REFUSED, exc.reason, str(exc)))
                continue
            if size > limit:
                wave.resolve(
                    i,
                    PublishResult(
                        Outcome.REFUSED,
                        names.REASON_PAYLOAD_TOO_LARGE,
                        f"message of {size} bytes exceeds the server's max_payload of {limit}",
                    ),
                )
                continue
            pending[token] = (wave, i)
            frames.append(frame)
            tokens.append(token)
        self._token = token
        if frames:
            # One write for the whole wave through nats-py's pending buffer and flusher, exactly
            # where Client.publish puts each frame (private API of the pinned nats-py 2.16; the unit
            # test tests/unit/test_publisher_wire.py fails if it changes).
            try:
                await nc._send_command(b"".join(frames))
                await nc._flush_pending()
            except OSError as exc:
                failed = PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, repr(exc)[:200])
                for token in tokens:
                    entry = pending.pop(token, None)
                    if entry is not None:
                        entry[0].resolve(entry[1], failed)
        if wave.remaining:
            # asyncio.timeout, not wait_for: no extra task per wave (one wave per event for a hot aggregate)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._s.ack_timeout_seconds):
                    await wave.done.wait()
        if wave.remaining:
            timeout = PublishResult(
                Outcome.RETRYABLE, names.REASON_TIMEOUT, f"no ack within {self._s.ack_timeout_seconds}s"
            )
            for token, (w, i) in list(pending.items()):
                if w is wave:
                    del pending[token]
                    w.resolve(i, timeout)
        out: list[PublishResult] = []
        for r in wave.results:
            assert r is not None
            out.append(r)
        return out

    def _install_ack_fast_path(self, nc: Client, sid: int) -> None:
        """Resolve plain acks (no headers) of the ack inbox straight from nats-py's read loop.

        Why: the stock path runs a regex, builds a ``Msg``, queues it for the subscription task and
        awaits the callback per ack: ~30% of a worker's CPU before this. Two hooks:

        - the parser's ``parse``: while at a frame boundary, the run of complete ack frames at the
          start of what was read is read in one loop (:func:`take_acks`): the server's compact success
          acks to :meth:`_stored_run` (a run of them at a time), other acks to :meth:`_ack`; the first other
          frame and everything after it go to nats-py's parser;
        - ``_process_msg``, where nats-py's parser delivers messages: acks it parsed itself (after
          another frame, or a frame split across reads) still skip the ``Msg`` and the queue.

        Status messages (503 no responders, with headers) and other subscriptions take nats-py's own
        path, in the order they arrived, so the subscription callback stays in place. Private API of
        the pinned nats-py 2.16 (``Parser.parse``/``buf``/``state``, ``Client._process_msg`` and the
        calls between them); tests/unit/test_publisher_wire.py fails if any of them changes.
        """
        original = nc._process_msg
        prefix = (self._prefix + ".").encode()
        start = len(prefix)
        stats = nc.stats
        ack = self._ack

        async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            if msg_sid == sid and not headers and subject.startswith(prefix):
                stats["in_msgs"] += 1
                stats["in_bytes"] += len(data)
                try:
                    token = int(subject[start:])
                except ValueError:
                    return
                ack(token, data)
                return
            await original(msg_sid, subject, reply, data, headers)

        nc._process_msg = process_msg  # type: ignore[method-assign,assignment]

        ps = nc._ps
        parse = ps.parse
        head = b"MSG " + prefix
        sid_bytes = str(sid).encode()
        stored = StoredAcks.of(head, sid_bytes, self._stored_run)

        async def parse_acks_first(data: bytes = b"") -> None:
            if ps.state != nats_parser.AWAITING_CONTROL_LINE:  # inside a frame nats-py started
                await parse(data)
                return
            buf = ps.buf  # reset() on reconnect replaces it: read it per call
            buf.extend(data)
            self._read_at = time.monotonic()  # every ack of this read arrived now (see _settle)
            consumed, taken, nbytes, wait = take_acks(bytes(buf), head, sid_bytes, ack, stored)
            if consumed:
                del buf[:consumed]
                stats["in_msgs"] += taken
                stats["in_bytes"] += nbytes
            if buf and not wait:
                await parse(b"")

        ps.parse = parse_acks_first  # type: ignore[method-assign]

    async def _on_ack(self, msg: Msg) -> None:
        """Ack-inbox messages nats-py delivered: status replies (with headers), and plain acks if the
        fast path is not installed."""
        try:
            token = int(msg.subject.rsplit(".", 1)[1])
        except (ValueError, IndexError):
            return
        hdrs = msg.headers
        if hdrs and hdrs.get(_STATUS):
            entry = self._pending.pop(token, None)
            if entry is None:
                self.late_acks += 1
                return
            wave, index = entry
            status = hdrs.get(_STATUS, "")
            desc = hdrs.get(_DESCRIPTION, "")
            if status == "503":
                wave.resolve(index, PublishResult(Outcome.RETRYABLE, names.REASON_NO_RESPONDERS, "503 no responders"))
            else:
                wave.resolve(index, PublishResult(Outcome.RETRYABLE, names.REASON_SERVER_ERROR, f"{status} {desc}"))
            return
        self._ack(token, msg.data)

    def _take(self, token: int) -> tuple[_Wave, int] | None:
        """The pending publish ``token``, removed, its ack latency counted; None for a late ack."""
        entry = self._pending.pop(token, None)
        if entry is None:
            self.late_acks += 1
            return None
        self.ack_latency.observe(time.monotonic() - entry[0].sent_at)
        return entry

    def _stored_run(self, frames: StoredFrames) -> tuple[int, int]:
        """Resolve the publishes of a run of compact success acks (see :class:`StoredAcks`): each was
        stored at its ``seq``, or had been before if ``duplicate``. Returns (frames taken, payload
        bytes); stops at a frame whose size field disagrees with its payload.

        Per frame only what differs per frame: the ack latency is counted once per wave (all its
        messages went in one write, and all these acks came in one read), the result is built without
        its constructor and set in place. This runs once per event.
        """
        pop = self._pending.pop
        wave: _Wave | None = None
        results: list[PublishResult | None] = []
        resolved = taken = nbytes = 0
        for token, size, payload, seq, duplicate in frames:
            length = len(payload)
            if int(size) != length:
                break
            taken += 1
            nbytes += length
            entry = pop(int(token), None)
            if entry is None:
                self.late_acks += 1
                continue
            w, index = entry
            if w is not wave:
                if wave is not None:
                    self._settle(wave, resolved)
                wave, results, resolved = w, w.results, 0
            if results[index] is None:
                results[index] = _new_result(PublishResult, (_DUPLICATE if duplicate else _ACKED, "", "", int(seq)))
                resolved += 1
        if wave is not None:
            self._settle(wave, resolved)
        return taken, nbytes

    def _settle(self, wave: _Wave, resolved: int) -> None:
        """``resolved`` more results of ``wave`` were set in place (:meth:`_stored_run`)."""
        self.ack_latency.observe_times(self._read_at - wave.sent_at, resolved)
        wave.counted(resolved)

    def _ack(self, token: int, data: bytes) -> None:
        """Resolve the publish ``token`` with the ack payload ``data`` (a JSON pub ack)."""
        entry = self._take(token)
        if entry is None:
            return
        wave, index = entry
        if b'"error"' not in data and b" " not in data:
            # The server's compact shape, without a JSON decode: {"stream":"S","seq":7[,"duplicate":true]}.
            at = data.find(b'"seq":')
            end = data.find(b",", at) if at >= 0 else -1
            if end < 0:
                end = data.find(b"}", at)
            try:
                seq = int(data[at + 6 : end]) if at >= 0 and end > at else -1
            except ValueError:
                seq = -1  # not the shape above: decode it below
            if seq >= 0:
                outcome = Outcome.DUPLICATE if b'"duplicate":true' in data else Outcome.ACKED
                wave.resolve(index, PublishResult(outcome, seq=seq))
                return
        try:
            ack = json.loads(data)
        except ValueError:
            wave.resolve(index, PublishResult(Outcome.RETRYABLE, names.REASON_SERVER_ERROR, "unreadable ack"))
            return
        err = ack.get("error")
        if err:
            wave.resolve(
                index,
                classify_error_ack(
                    int(err.get("code", 0)), int(err.get("err_code", 0)), str(err.get("description", ""))
                ),
            )
            return
        if ack.get("duplicate"):
            wave.resolve(index, PublishResult(Outcome.DUPLICATE, seq=int(ack.get("seq", 0))))
        else:
            wave.resolve(index, PublishResult(Outcome.ACKED, seq=int(ack.get("seq", 0))))

    # --- connection events ----------------------------------------------------------------------------
    def _fail_all(self, result: PublishResult) -> None:
        pending, self._pending = self._pending, {}
        for wave, i in pending.values():
            wave.resolve(i, result)

    async def _on_disconnected(self) -> None:
        self.disconnects += 1
        if self._pending:
            log.warning("NATS disconnected with %d publishes in flight: failing them for retry", len(self._pending))
        self._fail_all(PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, "connection lost"))

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %r", exc)


def _is_auth_error(exc: BaseException) -> bool:
    text = repr(exc).lower()
    return isinstance(exc, nats_errors.AuthorizationError) or "authorization" in text or "authentication" in text
