"""JetStream publisher that owns its ack tracking.

Why not ``js.publish_async``: in nats-py 2.16 (the pinned version) an error ack never completes its
future, there is no per-message ack timeout, and publishes lost in a disconnect are never failed. Here each
publish carries a reply subject under one private inbox (``<inbox>.<token>``); acks arriving there are
resolved by token, straight from nats-py's parser (the wire: frames, the ack parser and the parser
hook live in adapters/jetstream_acks.py), and status replies through one wildcard subscription.

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
import logging
import math
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.js import api as js_api
from nats.js import errors as js_errors

from outbox_common import names
from outbox_common.config import NatsConfig, PublishConfig, StreamConfig
from outbox_common.envelope import HeaderBlock
from outbox_common.settings import StreamMode, redact_server_list
from outbox_worker.adapters.jetstream_acks import (
    InvalidMessageError,
    StoredAcks,
    StoredFrames,
    encode_hpub,
    install_ack_fast_path,
    parse_ack,
)
from outbox_worker.adapters.metrics import LATENCY_BUCKETS, BucketCounts
from outbox_worker.core.policy import Outcome, PublishResult
from outbox_worker.core.subjects import subject_covers

log = logging.getLogger(__name__)

_STATUS = "Status"
_DESCRIPTION = "Description"
_SUBJECT_CACHE_LIMIT = 10_000
# A stream the worker creates (mode ``create``): how long a refusal is retried (another worker's
# creation not yet visible on a cluster, a member still joining), and the pause between tries.
STREAM_CREATE_RETRY_SECONDS = 10.0
STREAM_CREATE_PAUSE_SECONDS = 0.25
# One JetStream API request of the stream check. A request that gets no answer in time (a cluster
# electing its meta leader, a server still deleting a large stream) is asked again until the
# check's deadline.
STREAM_API_TIMEOUT_SECONDS = 5.0
_CREDENTIALS_REJECTED = "NATS rejected the credentials: check the NATS user/password, token or creds Secret"


class NatsConfigError(Exception):
    """NATS is reachable but set up so the relay cannot run (auth, stream, duplicate window)."""


class NatsUnavailableError(Exception):
    """NATS could not be reached in time."""


class TlsNotOfferedError(nats_errors.Error):
    """A server that should speak TLS (a ``tls://`` URL, or a TLS CA or certificate configured) did
    not offer it: the connection was refused before anything, credentials above all, was sent."""

    def __str__(self) -> str:
        return (
            "the NATS server does not offer TLS, but the URL is tls:// or a TLS CA or certificate is set: "
            "nothing was sent in clear. Enable TLS on the server (a tls block), or connect with nats:// "
            "and no TLS settings if it is meant to be plain"
        )


class SecureClient(Client):
    """nats-py's client that never goes on in plaintext where TLS is expected.

    nats-py upgrades a connection to TLS only when the server's INFO says ``tls_required``, even for
    a ``tls://`` URL or a TLS context it was given. Against a server without TLS (or anything else
    listening at that address) it would send CONNECT, with the user's password or token, in clear.
    With ``require_tls`` (the worker: a ``tls://`` URL, or a CA or certificate configured; a
    ``ws``/``wss`` URL is left to its own scheme) this client upgrades when the server offers TLS
    (``tls_required`` or ``tls_available``) and otherwise fails the attempt with
    :class:`TlsNotOfferedError` before CONNECT; a ``tls://`` URL requires it on its own."""

    def __init__(self, *, require_tls: bool = False) -> None:
        super().__init__()
        self.require_tls = require_tls

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        scheme = server.uri.scheme if server is not None else ""
        if initial_connection and scheme in ("nats", "tls") and (self.require_tls or scheme == "tls"):
            if not (info.get("tls_required") or info.get("tls_available")):
                raise TlsNotOfferedError()
            info["tls_required"] = True  # nats-py reads this (the same dict) next, and upgrades
        await super()._process_info(info, initial_connection)


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
    done: asyncio.Future[None]  # set when no result remains

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
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


class JetStreamPublisher:
    """One NATS connection, many acks in flight, results for every publish. Not thread-safe."""

    def __init__(
        self,
        nats_config: NatsConfig,
        publish: PublishConfig | None = None,
        *,
        name: str = "outbox-relay",
        ack_latency: BucketCounts | None = None,
    ) -> None:
        """``nats_config`` moves :meth:`connect`; ``publish`` (default: the settings' defaults) the
        header block and the ack timeout."""
        self._nats = nats_config
        self._publish = publish or PublishConfig()
        self._name = name
        self._nc: Client | None = None
        self._prefix = ""
        self._token = 0
        self._read_at = 0.0  # time.monotonic() of the read whose acks the fast path is resolving
        self._pending: dict[int, tuple[_Wave, int]] = {}
        self._denied: dict[str, float] = {}  # subject (lower-cased) -> when a publish to it was refused
        # Waves awaited with acks in flight (one per loop at most), and the one timer that times
        # them out (see _arm).
        self._waiting: list[_Wave] = []
        self._expiry: asyncio.TimerHandle | None = None
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
        skip = not self._publish.message_tracing and self.server_at_least(2, 14)
        return HeaderBlock(self._publish.publisher, self._publish.stream, skip_trace_check=skip)

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
        NatsUnavailableError when no server answers within ``timeout``.

        ``timeout`` bounds the whole call: the probe, then the long-lived connection with what is
        left (at least 0.5 s), since with reconnects on nats-py would try a server that went away
        since the probe forever. Such a failure closes it again (no client is left reconnecting in
        the background) and is NatsUnavailableError."""
        end = time.monotonic() + timeout
        opts = self._connect_options()
        await self._probe_once(opts, timeout)
        # Now the long-lived connection with reconnects enabled.
        left = max(0.5, end - time.monotonic())
        nc = self._nc = SecureClient(require_tls=self._requires_tls)
        try:
            async with asyncio.timeout(left):
                await nc.connect(**opts)
                await self._subscribe_acks(nc)
                await nc.flush(timeout=max(1, math.ceil(left)))  # nats-py refuses a flush timeout of 0
        except (TimeoutError, OSError, nats_errors.Error) as exc:
            await self.close(timeout=1.0)
            raise NatsUnavailableError(f"the NATS server went away while connecting: {type(exc).__name__}") from None
        self._max_payload = nc.max_payload

    @property
    def _requires_tls(self) -> bool:
        """TLS configured (a CA or a client certificate): never connect without it (:class:`SecureClient`)."""
        return bool(self._nats.tls_ca_file or self._nats.tls_cert_file)

    def _connect_options(self) -> dict[str, Any]:
        """nats-py's connect arguments: reconnect forever (the worker's supervision decides), detect a
        stalled server after 3 missed pings, credentials and TLS from the config."""
        c = self._nats
        opts: dict[str, Any] = {
            "servers": list(c.servers),
            "name": self._name,
            "ping_interval": c.ping_interval_seconds,
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
        opts.update(_credential_options(c))
        if c.tls_ca_file or c.tls_cert_file:
            opts["tls"] = _tls_context(c)
        return opts

    async def _probe_once(self, opts: dict[str, Any], timeout: float) -> None:
        """One connect without reconnects, closed again: the first connect must not retry forever,
        and a rejected credential or an unreachable server becomes a clear error."""
        connect_error: list[BaseException] = []

        async def first_error(exc: Exception) -> None:
            connect_error.append(exc)

        nc = SecureClient(require_tls=self._requires_tls)
        servers = redact_server_list(self._nats.servers)  # for messages: a URL may hold a password
        try:
            async with asyncio.timeout(timeout):
                await nc.connect(**{**opts, "allow_reconnect": False, "error_cb": first_error})
        except (TimeoutError, nats_errors.NoServersError, OSError, TlsNotOfferedError) as exc:
            why = connect_error[-1] if connect_error else exc
            if isinstance(why, TlsNotOfferedError) or isinstance(exc, TlsNotOfferedError):
                raise NatsConfigError(f"{TlsNotOfferedError()} ({servers})") from None
            if is_auth_error(why):
                raise NatsConfigError(_CREDENTIALS_REJECTED) from None
            raise NatsUnavailableError(f"no NATS server answered at {servers}: {why!r}"[:300]) from None
        except Exception as exc:
            if is_auth_error(exc) or any(is_auth_error(e) for e in connect_error):
                raise NatsConfigError(_CREDENTIALS_REJECTED) from None
            if isinstance(exc, nats_errors.Error) and not connect_error:
                # Refused before any server was tried (no error callback ran): nats-py found the server
                # list unusable. The settings refuse what is known of that (server_url_problem); any
                # other such refusal is a configuration error too, not a defect to crash-loop on.
                raise NatsConfigError(
                    f"the NATS client refused the server list {servers}: {exc}; fix OUTBOX_NATS_SERVERS "
                    "(spec.nats.servers)"
                ) from None
            if isinstance(exc, nats_errors.Error):
                # The server answered the connect with an error of its own (-ERR), such as 'maximum
                # connections exceeded' while every client reconnects after a restart: not there
                # for us yet, asked again until the start-up deadline.
                raise NatsUnavailableError(f"the NATS server refused the connection: {exc}"[:300]) from None
            raise
        await nc.close()

    async def _subscribe_acks(self, nc: Client) -> None:
        """The private ack inbox: one wildcard subscription (status replies) plus the parser hook
        that resolves plain acks straight from the read loop."""
        self._prefix = nc.new_inbox()
        self.ack_subscription = await nc.subscribe(self._prefix + ".*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        self._install_ack_fast_path(nc, self.ack_subscription._id)

    def _install_ack_fast_path(self, nc: Client, sid: int) -> None:
        """Plain acks of the ack inbox resolved from nats-py's read loop (see
        :func:`~outbox_worker.adapters.jetstream_acks.install_ack_fast_path`)."""
        head = b"MSG " + (self._prefix + ".").encode()
        stored = StoredAcks.of(head, str(sid).encode(), self._stored_run)
        install_ack_fast_path(nc, sid, self._prefix, self._ack, stored, self._mark_read)

    def _mark_read(self) -> None:
        """Every ack of the read being parsed arrived now (see :meth:`_settle`)."""
        self._read_at = time.monotonic()

    async def close(self, timeout: float = 5.0) -> None:
        """Fail what is still pending, then close the connection, flushing what is buffered, within
        ``timeout`` s even if the server hangs. Idempotent.

        No drain: the worker's loops have already settled their waves, and nats-py's ``drain()``
        swallows its cancellation and then waits up to 10 s for a PONG, which would make a stop
        against a frozen server overrun any deadline."""
        nc, self._nc = self._nc, None
        self._fail_all(PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, "publisher closed"))
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if nc is None or nc.is_closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await nc.close()
        except Exception as exc:
            log.warning("closing the NATS connection: %s", type(exc).__name__)

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
    async def ensure_stream(
        self, stream: StreamConfig, filter_subject: str, horizon_seconds: float, deadline: float | None = None
    ) -> None:
        """Check (or, with mode ``create``, create) ``stream``: it must exist, capture
        ``filter_subject`` and keep a duplicate window of at least ``horizon_seconds``. Raises
        NatsConfigError naming the fix. Warns about a stream that acks before it writes
        (``persist_mode: async``).

        Bounded: a JetStream API that does not answer, or answers with a passing error
        (:func:`_passing`: the cluster has no leader for the stream or the meta layer yet, the
        stream's servers are offline), is asked again until ``deadline`` (monotonic; default
        :data:`STREAM_CREATE_RETRY_SECONDS` from now), then NatsUnavailableError; a refused creation is
        looked at again for at most STREAM_CREATE_RETRY_SECONDS, then NatsConfigError with the
        server's reason. Any other error answer is a NatsConfigError at once."""
        assert self._nc is not None
        nc = self._nc
        refusals_until = time.monotonic() + STREAM_CREATE_RETRY_SECONDS
        deadline = refusals_until if deadline is None else deadline
        while True:
            jsm = nc.jsm(timeout=max(1.0, min(STREAM_API_TIMEOUT_SECONDS, deadline - time.monotonic())))
            try:
                found = await _find_or_create(jsm, stream, filter_subject)
            except (nats_errors.TimeoutError, js_errors.APIError) as exc:
                off = jetstream_off_error(exc)
                if off is not None:
                    raise off from None
                if isinstance(exc, js_errors.APIError) and not _passing(exc):
                    raise NatsConfigError(
                        f"the JetStream API refused the check of stream {stream.name!r}: {_api_reason(exc)}"
                    ) from None
                api = f"$JS.API.STREAM.INFO.{stream.name}"
                if self.publish_denied(api) or self.publish_denied(f"$JS.API.STREAM.CREATE.{stream.name}"):
                    raise jetstream_denied_error(api) from None
                # A creation that timed out may still have happened: the next look tells.
                why = type(exc).__name__ if isinstance(exc, nats_errors.TimeoutError) else _api_reason(exc)
                if time.monotonic() + STREAM_CREATE_PAUSE_SECONDS >= deadline:
                    raise NatsUnavailableError(
                        f"the JetStream API did not answer the check of stream {stream.name!r} in time "
                        f"({why}): check that the NATS cluster has a JetStream meta leader and that the "
                        "stream's servers are up"
                    ) from None
                log.warning(
                    "the JetStream API did not answer the check of stream %s (%s); asking again", stream.name, why
                )
            else:
                if isinstance(found, js_api.StreamInfo):
                    _check_stream(stream.name, found.config, filter_subject, horizon_seconds)
                    return
                if found is None:  # created
                    return
                # Refused: another worker created it first (on a cluster it may not be visible yet),
                # or the cluster cannot place it yet (a member still joining), or the config
                # conflicts. Look again.
                if time.monotonic() >= refusals_until:
                    raise NatsConfigError(
                        f"stream {stream.name!r} could not be created within {STREAM_CREATE_RETRY_SECONDS:.0f}s: "
                        f"{found}; create it yourself or check the cluster's JetStream peers"
                    )
            await asyncio.sleep(STREAM_CREATE_PAUSE_SECONDS)

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
        The steps: encode every message into one buffer (refusing what NATS would refuse), write it
        in one go, await the acks, time out what is still unacknowledged.
        """
        n = len(messages)
        if n == 0:
            return []
        wave = _Wave([None] * n, time.monotonic(), n, asyncio.get_running_loop().create_future())
        nc = self._nc
        if nc is None or not nc.is_connected or nc.is_draining_pubs:
            not_connected = PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, "not connected")
            return [not_connected] * n
        frames, tokens = self._encode_wave(messages, wave)
        if frames:
            await self._write_wave(nc, frames, tokens)
        if wave.remaining:
            self._waiting.append(wave)
            if self._expiry is None:
                self._arm(wave.sent_at)
            try:
                await wave.done
            finally:
                self._waiting.remove(wave)
        return _results_of(wave)

    def _encode_wave(self, messages: Sequence[MessageFields], wave: _Wave) -> tuple[list[bytes], list[int]]:
        """One HPUB frame per message, each with its own reply token registered as pending; a message
        NATS would refuse (bad subject or header, over max_payload) is resolved ``refused`` instead.

        This loop runs once per event: locals instead of attributes, and a cached subject with an
        already encoded header block skips :func:`encode_hpub` for the same bytes built inline.
        """
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
                wave.resolve(i, _too_large(size, limit))
                continue
            pending[token] = (wave, i)
            frames.append(frame)
            tokens.append(token)
        self._token = token
        return frames, tokens

    async def _write_wave(self, nc: Client, frames: list[bytes], tokens: list[int]) -> None:
        """One write for the whole wave: a small one straight to the socket (:func:`_write_now`),
        any other through nats-py's pending buffer and flusher, exactly where Client.publish puts
        each frame (private API of the pinned nats-py 2.16; the unit test
        tests/unit/test_jetstream_acks.py fails if it changes). A failed write fails its publishes
        as retryable disconnects."""
        data = b"".join(frames)
        try:
            if not _write_now(nc, data):
                await nc._send_command(data)
                await nc._flush_pending()
        except OSError as exc:
            failed = PublishResult(Outcome.RETRYABLE, names.REASON_DISCONNECT, repr(exc)[:200])
            for token in tokens:
                entry = self._pending.pop(token, None)
                if entry is not None:
                    entry[0].resolve(entry[1], failed)

    def _arm(self, sent_at: float) -> None:
        """Time out, ``ack_timeout`` after ``sent_at``, what is still pending of the waves awaited
        then (retryable; a late ack for it is ignored).

        One timer for all waves, not one per wave (a timer armed and cancelled per wave was ~3% of
        the worker's CPU at one event per commit, docs/benchmarks.md): a wave's acks take
        milliseconds, its timeout seconds, so the timer armed for the oldest wave awaited usually
        finds it done, times out what has expired, and is armed again for the oldest wave then
        awaited, if any."""
        delay = sent_at + self._publish.ack_timeout_seconds - time.monotonic()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        timeout_seconds = self._publish.ack_timeout_seconds
        expired_at = time.monotonic() - timeout_seconds
        for wave in list(self._waiting):  # at most one per loop
            if wave.remaining and wave.sent_at <= expired_at:
                self._time_out(wave, timeout_seconds)
        pending = [wave.sent_at for wave in self._waiting if wave.remaining]
        if pending:
            self._arm(min(pending))

    def _time_out(self, wave: _Wave, timeout_seconds: float) -> None:
        timeout = PublishResult(Outcome.RETRYABLE, names.REASON_TIMEOUT, f"no ack within {timeout_seconds}s")
        for token, (w, i) in list(self._pending.items()):
            if w is wave:
                del self._pending[token]
                w.resolve(i, timeout)

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
        if entry is not None:
            entry[0].resolve(entry[1], parse_ack(data))

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
        """nats-py's error callback. A permissions violation for a publish is remembered by subject
        (:meth:`publish_denied`) and logged once a minute per subject: the server answers each such
        publish with one, and drops the message, so its ack never comes."""
        denied = _PUBLISH_DENIED.search(str(exc))
        if denied is None:
            log.warning("NATS error: %r", exc)
            return
        subject, now = denied.group(1).lower(), time.monotonic()
        last = self._denied.get(subject)
        if last is None or now - last > PUBLISH_DENIED_SECONDS:
            log.warning("NATS error: %r", exc)
        if len(self._denied) >= _SUBJECT_CACHE_LIMIT:
            self._denied.clear()
        self._denied[subject] = now

    def publish_denied(self, subject: str) -> bool:
        """Whether the server refused this connection's user a publish to ``subject`` within the
        last :data:`PUBLISH_DENIED_SECONDS` (nats-py reports the subject lower-cased)."""
        at = self._denied.get(subject.lower())
        return at is not None and time.monotonic() - at <= PUBLISH_DENIED_SECONDS


# nats-py's text of the server's -ERR for a publish its permissions refuse (the subject lower-cased).
_PUBLISH_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)
PUBLISH_DENIED_SECONDS = 60.0  # how long such a refusal explains a publish's missing ack

# A wave up to this size is written to the socket at once (_write_now); a larger one (a drain's)
# goes through nats-py's flusher, whose drain() applies the socket's back-pressure.
DIRECT_WRITE_BYTES = 64 * 1024


def _write_now(nc: Client, data: bytes) -> bool:
    """Write ``data`` (a small wave) to the connection's socket now, if it can go there in order
    and without waiting; returns whether it did. Else the caller queues it for nats-py's flusher.

    Why: nats-py queues every write for its flusher task, one more event-loop step, a future and a
    queue hand-over per wave; at one event per commit a wave carries a handful of events, and that
    hop was ~4% of the worker's CPU (docs/benchmarks.md, "commit-rate, sixth step").

    Order: only when nothing is queued before it (nats-py's pending buffer is empty: what the flusher
    took is already in the transport, which writes in order) and the transport holds no unwritten
    bytes (a full socket: the flusher's drain() waits for it). Only a connected plain TCP or TLS
    transport (nats-py's TcpTransport), not a WebSocket one, and not while reconnecting, when
    nats-py buffers writes for the next connection."""
    if len(data) > DIRECT_WRITE_BYTES or nc._pending or not nc.is_connected:
        return False
    transport = nc._transport
    if type(transport) is not TcpTransport or transport._io_writer is None:
        return False
    socket = transport._io_writer.transport
    if socket.is_closing() or socket.get_write_buffer_size():
        return False
    socket.write(data)
    return True


def _results_of(wave: _Wave) -> list[PublishResult]:
    """The wave's results, every one set by now."""
    out: list[PublishResult] = []
    for r in wave.results:
        assert r is not None
        out.append(r)
    return out


def _too_large(size: int, limit: int) -> PublishResult:
    return PublishResult(
        Outcome.REFUSED,
        names.REASON_PAYLOAD_TOO_LARGE,
        f"message of {size} bytes exceeds the server's max_payload of {limit}",
    )


def _credential_options(c: NatsConfig) -> dict[str, Any]:
    """The connect arguments of whichever credentials ``c`` names (secrets read only here)."""
    opts: dict[str, Any] = {}
    if c.creds_file:
        opts["user_credentials"] = c.creds_file
    if c.user:
        opts["user"] = c.user
        opts["password"] = c.password.get_secret_value()
    if c.token.get_secret_value():
        opts["token"] = c.token.get_secret_value()
    return opts


def _tls_context(c: NatsConfig) -> ssl.SSLContext:
    """TLS verifying the servers against ``c.tls_ca_file`` (system CAs if empty), with a client
    certificate for mutual TLS when ``c.tls_cert_file`` is set."""
    ctx = ssl.create_default_context(cafile=c.tls_ca_file or None)
    if c.tls_cert_file:
        ctx.load_cert_chain(c.tls_cert_file, c.tls_key_file or None)
    return ctx


def is_auth_error(exc: BaseException) -> bool:
    """Whether nats-py's ``exc`` says the server rejected the credentials (an -ERR, or its own error)."""
    text = repr(exc).lower()
    return isinstance(exc, nats_errors.AuthorizationError) or "authorization" in text or "authentication" in text


class ConnectErrors:
    """What nats-py reported to the error callback (:meth:`note`) of a connect that gives up with a
    bare NoServersError (or OSError): the server rejected the credentials, or a server that should
    speak TLS did not offer it (:class:`SecureClient`). For the short-lived connections of the
    command-line tools; the worker's publisher reads the same (:meth:`JetStreamPublisher.connect`)."""

    def __init__(self) -> None:
        self.rejected = False
        self.no_tls: TlsNotOfferedError | None = None

    async def note(self, exc: Exception) -> None:
        if isinstance(exc, TlsNotOfferedError):
            self.no_tls = exc
        elif is_auth_error(exc):
            self.rejected = True


class ClientErrors(ConnectErrors):
    """What the NATS client reported through its error callback (connection errors surface as
    exceptions, not log spam): a connect's (:class:`ConnectErrors`), and the first subject the
    server's permissions denied (:attr:`denied`, done at once: a request to a denied subject is
    dropped by the server, and would go unanswered until its timeout). Make it in a running loop."""

    def __init__(self) -> None:
        super().__init__()
        self.denied: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def note(self, exc: Exception) -> None:
        await super().note(exc)
        if "permissions violation" in repr(exc).lower() and not self.denied.done():
            self.denied.set_result(str(exc).removeprefix("nats: "))


async def _find_or_create(jsm: Any, stream: StreamConfig, filter_subject: str) -> js_api.StreamInfo | str | None:
    """One look at ``stream``: its info when it exists; when it does not, NatsConfigError in mode
    ``expect``, else None when this call created it (file storage, capturing ``filter_subject``) or
    the server's refusal (another worker created it first, the config conflicts). Unanswered
    requests raise nats-py's TimeoutError or ServiceUnavailableError; a passing error answer
    (:func:`_passing`) and any error answer to the stream's info raise as nats-py's APIError."""
    try:
        info: js_api.StreamInfo = await jsm.stream_info(stream.name)
        return info
    except js_errors.NotFoundError:
        if stream.mode != StreamMode.CREATE:
            raise NatsConfigError(
                f"stream {stream.name!r} does not exist: create it with subjects [{filter_subject!r}] "
                "or let the worker create it (OUTBOX_STREAM_MODE=create; spec.stream.mode: create)"
            ) from None
    try:
        await jsm.add_stream(
            name=stream.name,
            subjects=[filter_subject],
            storage=js_api.StorageType.FILE,
            num_replicas=stream.replicas,
            duplicate_window=stream.duplicate_window_seconds,
        )
    except js_errors.APIError as exc:
        if isinstance(exc, js_errors.ServiceUnavailableError) or _passing(exc):
            raise
        return _api_reason(exc)
    log.info(
        "created stream %s for %s (duplicate window %.0fs)",
        stream.name,
        filter_subject,
        stream.duplicate_window_seconds,
    )
    return None


# JetStream's "not enabled for account" and "not enabled" error codes; nats-py raises a bare
# ServiceUnavailableError (no code) when nothing answers the API at all: a server without JetStream.
_JS_NOT_ENABLED = frozenset({10039, 10076})


def jetstream_off_error(exc: BaseException) -> NatsConfigError | None:
    """The configuration error a JetStream API request's failure ``exc`` shows when it says that
    JetStream is off for the server or the user's account; None for any other failure."""
    if not (isinstance(exc, js_errors.ServiceUnavailableError) and _jetstream_off(exc)):
        return None
    return NatsConfigError(
        f"JetStream is not enabled for this NATS server or account ({exc.description or 'no responders'}): "
        "enable it (nats-server -js, or a jetstream block in the server's and the account's configuration)"
    )


def jetstream_denied_error(subject: str) -> NatsConfigError:
    """The configuration error of a JetStream API request to ``subject`` that the server's
    permissions refused the user (the request itself goes unanswered)."""
    return NatsConfigError(
        f"the NATS user may not use the JetStream API (a publish to {subject} was refused by the server's "
        "permissions): allow it to publish to $JS.API.> and to subscribe to _INBOX.>"
    )


def _jetstream_off(exc: js_errors.ServiceUnavailableError) -> bool:
    """Whether a 503 from the JetStream API means JetStream is off, not busy."""
    return exc.code is None or exc.err_code in _JS_NOT_ENABLED


# JetStream API errors (nats-server's errors.json, by err_code) that a cluster gives while it moves:
# system temporarily unavailable (10008), insufficient resources (10023, placement is retried), stream
# offline (10118, 10194: the servers of its replicas are down), cluster cannot handle the request, not
# assigned, incomplete results (10009, 10007, 10004), the generic RAFT, assignment, create, update
# and general errors (10041, 10048, 10049, 10069, 10051), a member change in progress (10202) and no
# suitable peers for placement (10005: a member still joining; lasting when the cluster is too small,
# which the deadline then reports). So is any other server error (5xx) but those that say the server
# or the configuration is wrong (_REFUSED_ERR_CODES): JetStream off (10039, 10076), replicas in
# non-clustered mode (10074), stream config invalid (10052), clustered mode needed or not supported
# (10006, 10010, 10036), insufficient storage or memory for the stream's limits (10047, 10028).
# Client errors (4xx: name in use with another config 10058, subjects overlap 10065, ...) are refusals.
_PASSING_ERR_CODES = frozenset(
    {10008, 10023, 10118, 10194, 10009, 10007, 10004, 10041, 10048, 10049, 10069, 10051, 10202, 10005}
)
_REFUSED_ERR_CODES = frozenset({10039, 10076, 10074, 10052, 10006, 10010, 10036, 10047, 10028})


def _passing(exc: js_errors.APIError) -> bool:
    """Whether a JetStream API error answer may go away by asking again (see _PASSING_ERR_CODES)."""
    if exc.err_code in _PASSING_ERR_CODES:
        return True
    return exc.code is not None and exc.code >= 500 and exc.err_code not in _REFUSED_ERR_CODES


def _api_reason(exc: BaseException) -> str:
    """A JetStream API error answer as the server gave it: its description and codes."""
    if isinstance(exc, js_errors.APIError):
        return f"{exc.description or type(exc).__name__} (code {exc.code}, err_code {exc.err_code})"
    return type(exc).__name__


def _check_stream(name: str, cfg: js_api.StreamConfig, filter_subject: str, horizon_seconds: float) -> None:
    """An existing stream must capture ``filter_subject`` and keep duplicates for ``horizon_seconds``."""
    subjects = list(cfg.subjects or [])
    if not any(subject_covers(pattern, filter_subject) for pattern in subjects):
        raise NatsConfigError(
            f"stream {name!r} captures {subjects} but the subject template needs "
            f"{filter_subject!r}: add it to the stream's subjects or change the subject template"
        )
    window = float(cfg.duplicate_window or 0.0)
    if window < horizon_seconds:
        raise NatsConfigError(
            f"stream {name!r} has a duplicate window of {window:.0f}s, shorter than the relay's "
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
            name,
        )
