"""The relay pipeline: claim → publish in waves → await acks → fenced mark. One :class:`RelayLoop`
per configured loop; loops share one publisher connection and one lease manager.

Guarantees (README "Guarantees" states them for users):

- At-least-once into the stream, exactly-once as stored: a row is deleted/marked only after its ack
  (acked or duplicate); a row whose outcome is unknown stays pending and is re-published later with
  the same ``Nats-Msg-Id``, which JetStream de-duplicates within its duplicate window.
- Per-aggregate order (``ordering=per_aggregate``): at most one unacknowledged message per aggregate;
  the next row of an aggregate is sent only after the previous one was acked; a failed row holds its
  aggregate back (SQL hold-back via ``not_before``) until it succeeds or is dead-lettered.
- Bounded: at most ``RelayConfig.in_flight`` publishes in flight per loop (``max_in_flight // loops``,
  at least 1: one wave at a time, never larger, :func:`plan_waves`), ``batch_size`` rows in memory per
  loop, every wait for acks bounded by the ack timeout, no new wave after ``batch_timeout_seconds``.
- A row that can never be published ends as a dead letter, logged once at WARNING with its id and
  reason (``names.DEAD_LETTER_REASONS``): at once when the relay's own checks refuse it before
  sending (subject, header name, header block over 64 KiB, max_payload, created_at), after
  ``max_attempts`` failed attempts when the server refuses it for good (its code and text kept).
  Retryable and configuration failures never dead-letter a row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from outbox_common import names
from outbox_common.config import RelayConfig
from outbox_common.envelope import (
    InvalidSubjectError,
    OutboxRow,
    SubjectTemplate,
    subject_fields,
)
from outbox_common.names import MAX_HEADER_BYTES
from outbox_common.report import ERROR_KIND_STREAM
from outbox_common.settings import MarkMode, OrderingMode
from outbox_common.timing import backoff_delay
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.publisher import JetStreamPublisher, MessageFields
from outbox_worker.adapters.store import Fence, MarkFirst, OutboxStore
from outbox_worker.app.leases import LeaseManager
from outbox_worker.app.marks import MARK_RETRIES, AckedRows, retry_pause
from outbox_worker.core.policy import Outcome, PublishResult, plan_waves

log = logging.getLogger(__name__)

CONFIG_PAUSE_SECONDS = 5.0  # a partition stopped by a configuration error is tried again after this
# Rendered subjects kept per loop; the cache is cleared when full (subjects built from aggregate_id
# can be unbounded in number).
SUBJECT_CACHE_LIMIT = 10_000
# A claim that failed (database unreachable, statement timeout) is tried again after the poll
# interval, at most this long: a loop never spins on a dead database, nor waits long after it is back.
CLAIM_RETRY_MAX_SECONDS = 1.0
_SUCCESS = (Outcome.ACKED, Outcome.DUPLICATE)  # PublishResult.ok, read per event without the property
_DUPLICATE = Outcome.DUPLICATE


@dataclass
class RelayStats:
    """Cumulative counters of one worker (all loops), read by the status reporter."""

    published: int = 0
    duplicates: int = 0
    failed: int = 0
    dead_letters: int = 0
    batches: int = 0
    fenced_out: int = 0  # acked rows a lost lease kept us from marking (a successor re-publishes)
    last_error: str = ""
    config_error: str = ""
    config_error_kind: str = ""  # report.ERROR_KINDS: which dependency config_error belongs to
    config_error_at: float = 0.0
    # partition -> when a configuration error last paused it, for those that have not published
    # since: the error is reported while any is left (and for at most CONFIG_ERROR_REPORTED_SECONDS
    # after it was last seen)
    config_error_parts: dict[int, float] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)  # by names.DEAD_LETTER_REASONS


@dataclass
class _BatchOutcome:
    done: list[int] = field(default_factory=list)
    failed_ids: list[int] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)
    failed_delays: list[float] = field(default_factory=list)
    dead_ids: list[int] = field(default_factory=list)
    dead_reasons: list[str] = field(default_factory=list)
    cut_short: bool = False  # stopped before the last wave (shutdown or batch time spent)
    blocked: set[tuple[int, str]] = field(default_factory=set)  # (partition, aggregate) with a failed row
    stopped_parts: set[int] = field(default_factory=set)  # partitions a configuration error paused


class RelayLoop:
    """One claim → publish → ack → mark loop over the partitions its worker leases. The knobs that
    move it are in :class:`~outbox_common.config.RelayConfig` (batch size, in-flight share, batch
    timeout, poll interval, attempts and backoff, ordering, mark mode, subject template)."""

    def __init__(
        self,
        index: int,
        config: RelayConfig,
        store: OutboxStore,
        publisher: JetStreamPublisher,
        leases: LeaseManager,
        metrics: Metrics,
        stats: RelayStats,
        hooks: RelayHooks | None = None,
        acked: AckedRows | None = None,
    ) -> None:
        """Why this size: the loop drives each of these parts; passing them (not the worker) keeps
        the loop's dependencies visible and lets a test give its own. ``acked`` (shared by the
        worker's loops) lets the marks of small batches ride on the next claim; without it every
        batch is marked on its own."""
        self.index = index
        self._c = config
        self._store = store
        self._pub = publisher
        self._leases = leases
        self._metrics = metrics
        self._stats = stats
        self._template = SubjectTemplate.parse(config.subject_template)
        # Rendered subjects by the row fields the template reads (subject_fields): most rows share a
        # handful of subjects, and rendering sanitizes every token. Bounded; failures never cached.
        self._subjects: dict[tuple[str, str, str, str], str] = {}
        self._subject_by_id = (True, "aggregate_id") in self._template.parts
        # Headers: build_headers + Nats-Expected-Stream (stored there or refused, never elsewhere),
        # and the trace-check line for rows with a sampled traceparent (see HeaderBlock).
        self._headers = publisher.header_block()
        self._ordered = config.ordering == OrderingMode.PER_AGGREGATE
        self._stopping = False
        self.hooks = hooks or RelayHooks()
        self._acked = acked

    def stop(self) -> None:
        """Finish the wave in flight (its acks awaited), send no further wave of the batch, mark what
        was acked (the rest stays pending), then return from :meth:`run`."""
        self._stopping = True

    async def run(self) -> None:
        """Until :meth:`stop`: check out partitions (:meth:`LeaseManager.checkout`), relay one batch of
        them (:meth:`_one_batch`: claim → publish in waves → record results → fenced mark), check them
        back in (those that may hold more come back dirty), and park (:meth:`_wait_for_rows`) only when
        no free partition is dirty. The partitions are checked in even if the batch raised."""
        c = self._c
        while not self._stopping:
            parts = self._leases.checkout(c.loops)
            if not parts:  # every partition is busy, paused or clean since its last claim
                await self._wait_for_rows()
                continue
            more: frozenset[int] = frozenset()
            try:
                more = await self._one_batch(parts)
            finally:
                self._leases.checkin(parts, more)  # partitions that may hold more come back dirty
            # Dirty partitions (a wake-up during this batch, or a backlog) are claimed at once by
            # this loop; else it parks until a wake-up or the poll.
            if not self._stopping and not self._leases.has_dirty():
                await self._wait_for_rows()

    async def _wait_for_rows(self) -> None:
        """Park until a wake-up (a NOTIFY, new leases) or the poll. How often NOTIFYs wake the loops
        is the listener's moderation (``notify_coalesce_seconds``, :class:`Listener`)."""
        await self._leases.wait_for_work(self._c.poll_interval_seconds)

    async def _one_batch(self, parts: dict[int, int]) -> frozenset[int]:
        """Claim and relay one batch of ``parts``; returns the partitions that may hold more rows."""
        c = self._c
        started = time.monotonic()
        try:
            rows, more = await self._claim(sorted(parts))
        except Exception as exc:
            self._error(f"claim failed: {type(exc).__name__}")
            await asyncio.sleep(min(c.poll_interval_seconds, CLAIM_RETRY_MAX_SECONDS))
            return frozenset()
        if not rows:  # a claim can find rows and return none (a payload over its bound): not drained
            return more
        outcome = await self._publish(rows, parts, started + c.batch_timeout_seconds)
        if self._stats.config_error_parts:  # before the mark, which hands out.done on
            self._config_error_cleared(rows, outcome)
        await self._mark(parts, outcome)
        self._stats.batches += 1
        self._metrics.batch_latency.observe(time.monotonic() - started)
        if outcome.cut_short:  # rows of this batch were left unsent
            return frozenset(parts)
        return more

    async def _claim(self, parts: list[int]) -> tuple[list[OutboxRow], frozenset[int]]:
        """The claim, carrying the marks of acked rows that wait for one (:class:`AckedRows`)."""
        acked = self._acked
        ticket = acked.take() if acked is not None else None
        skip = acked.excluded() if acked is not None else []  # the ticket's ids, and other marks in flight
        if acked is None or not skip:  # no mark to carry, none in flight: the plain claim
            claim = await self._store.claim(parts, self._c.batch_size, self._ordered)
            return claim.rows, claim.more
        fence, ids = (ticket.fence, ticket.ids) if ticket is not None else (Fence([], []), [])
        marked: int | None = None
        try:
            claim = await self._store.claim(
                parts, self._c.batch_size, self._ordered, MarkFirst(fence, ids, skip, acked.delete)
            )
            marked = claim.marked
            acked.carried += len(ids)
        finally:
            if ticket is not None:
                acked.settle(ticket, marked)
        return claim.rows, claim.more

    async def _publish(self, rows: list[OutboxRow], parts: dict[int, int], deadline: float) -> _BatchOutcome:
        """Publish the batch wave by wave (:func:`plan_waves`) until it is done, the worker stops or
        ``deadline`` passes; each wave: keep the rows that may still go, encode them, publish, record."""
        out = _BatchOutcome()
        for planned in plan_waves(rows, self._ordered, self._c.in_flight):
            if self._stopping or time.monotonic() > deadline:
                out.cut_short = True  # shutting down or batch_timeout_seconds spent: mark what was acked
                break
            wave = self._still_sendable(planned, parts, out)
            if not wave:
                continue
            sendable, messages = self._encode(wave, out)
            results = await self._send(messages)
            await self.hooks.after_wave(sendable, results)
            await self._record(sendable, messages, results, out)
        return out

    def _still_sendable(self, wave: list[OutboxRow], parts: dict[int, int], out: _BatchOutcome) -> list[OutboxRow]:
        """The wave's rows whose lease is still usable, whose partition no configuration error
        stopped, and whose aggregate has no failed row earlier in this batch."""
        usable = self._leases.still_usable(parts, 0.0)
        if len(usable) == len(parts) and not out.stopped_parts and not out.blocked:
            return wave  # the common case: every row still goes
        return [
            r
            for r in wave
            if r.partition in usable
            and r.partition not in out.stopped_parts
            and (r.partition, r.aggregate_id) not in out.blocked
        ]

    def _encode(self, wave: list[OutboxRow], out: _BatchOutcome) -> tuple[list[OutboxRow], list[MessageFields]]:
        """Subject and header block of each row; a row that can never be published (an invalid
        subject, headers over the server's limit, no created_at) is failed as refused instead."""
        messages: list[MessageFields] = []  # (subject, payload, headers): see Message
        sendable: list[OutboxRow] = []
        for row in wave:
            try:
                subject = self._subject(row)
                headers = self._headers.render(row)
            except InvalidSubjectError as exc:
                self._failed(row, PublishResult(Outcome.REFUSED, exc.reason, str(exc)), out)
                continue
            if len(headers) > MAX_HEADER_BYTES or not row.created_at or row.payload is None:
                self._failed(row, _refusal(row, headers), out)
                continue
            messages.append((subject, row.payload, headers))
            sendable.append(row)
        return sendable, messages

    async def _send(self, messages: list[MessageFields]) -> list[PublishResult]:
        """Publish one wave (outbox_in_flight reads the publisher's unacknowledged publishes)."""
        return await self._pub.publish_wave(messages)

    async def _record(
        self, sendable: list[OutboxRow], messages: list[MessageFields], results: list[PublishResult], out: _BatchOutcome
    ) -> None:
        """Successes go to ``out.done``; a configuration error pauses the row's partition; any other
        failure is retried later or dead-lettered (:meth:`_failed`)."""
        acked = duplicates = 0  # counted per wave: a metrics update takes a lock
        done = out.done
        for row, msg, res in zip(sendable, messages, results, strict=True):
            outcome = res.outcome
            if outcome in _SUCCESS:
                done.append(row.id)
                acked += 1
                if outcome is _DUPLICATE:
                    duplicates += 1
                continue
            if res.reason == names.REASON_NO_RESPONDERS:
                res = await self._no_responders(msg[0], res)
            elif res.reason == names.REASON_TIMEOUT and self._pub.publish_denied(msg[0]):
                # the server dropped the message and said why, on the connection, not in an ack
                res = PublishResult(
                    Outcome.CONFIG,
                    names.REASON_NOT_PERMITTED,
                    f"the NATS user may not publish to {msg[0]!r}: allow it in the server's permissions",
                )
            if res.outcome == Outcome.CONFIG:
                self._config_error(row.partition, res)
                out.stopped_parts.add(row.partition)
                continue
            self._failed(row, res, out)
        self._count_published(acked, duplicates)

    async def _no_responders(self, subject: str, res: PublishResult) -> PublishResult:
        """A 503 no-responders is a configuration error when no stream captures ``subject``; else
        (a stream exists, it was only unavailable) it stays retryable."""
        if await self._pub.stream_exists_for(subject) is False:
            return PublishResult(Outcome.CONFIG, names.REASON_NO_STREAM, f"no stream captures subject {subject!r}")
        return res

    def _count_published(self, acked: int, duplicates: int) -> None:
        self._stats.published += acked
        self._stats.duplicates += duplicates
        self._metrics.published.inc(acked)
        if duplicates:
            self._metrics.duplicates.inc(duplicates)

    def _subject(self, row: OutboxRow) -> str:
        key = (row.aggregate_type, row.event_type, row.tenant, row.aggregate_id if self._subject_by_id else "")
        subject = self._subjects.get(key)
        if subject is None:
            subject = self._template.render(subject_fields(row))
            if len(self._subjects) >= SUBJECT_CACHE_LIMIT:
                self._subjects.clear()
            self._subjects[key] = subject
        return subject

    def _failed(self, row: OutboxRow, res: PublishResult, out: _BatchOutcome) -> None:
        c = self._c
        self._stats.failed += 1
        self._stats.failures_by_reason[res.reason] = self._stats.failures_by_reason.get(res.reason, 0) + 1
        self._metrics.failed(res.reason)
        detail = f"{res.reason}: {res.detail}"[:500]
        self._stats.last_error = detail
        out.blocked.add((row.partition, row.aggregate_id))  # its later rows wait for the retry
        attempt = row.attempts + 1
        if res.outcome == Outcome.REFUSED or (res.outcome == Outcome.PERMANENT and attempt >= c.max_attempts):
            out.dead_ids.append(row.id)
            out.dead_reasons.append(detail)
            return
        out.failed_ids.append(row.id)
        out.failed_errors.append(detail)
        out.failed_delays.append(backoff_delay(attempt, c.backoff_initial_seconds, c.backoff_max_seconds))

    def _config_error(self, partition: int, res: PublishResult) -> None:
        # The prefix names the dependency for the reader of the message; the operator picks its
        # condition from config_error_kind (the report's errorKind), never from these words.
        area = "stream" if res.reason == names.REASON_NO_STREAM else "nats"
        msg = f"{area}: {res.detail}"
        # Every refused publish counts (README: the counter's meaning), also while the same error
        # lasts: the chart's alert reads its increase, which would stop while the partition is still
        # paused if only a new message counted. The log line is once per message.
        self._metrics.config_error(res.reason)
        if msg != self._stats.config_error:
            log.error("configuration error, pausing partition %d: %s", partition, msg)
        self._stats.config_error = msg
        self._stats.config_error_kind = ERROR_KIND_STREAM  # every publish-side configuration error is NATS's
        self._stats.config_error_at = self._stats.config_error_parts[partition] = time.monotonic()
        self._leases.pause(partition, CONFIG_PAUSE_SECONDS)

    def _config_error_cleared(self, rows: list[OutboxRow], out: _BatchOutcome) -> None:
        """A partition a configuration error paused published a row and met no configuration error in
        this batch: the error no longer stops it. Once no such partition is left the worker stops
        reporting the error at once (it was reported for a minute after the fix, Ready=False)."""
        done = set(out.done)
        published = {r.partition for r in rows if r.id in done} - out.stopped_parts
        stats = self._stats
        for partition in published:
            stats.config_error_parts.pop(partition, None)
        if not stats.config_error_parts:
            log.info("configuration error resolved: %s", stats.config_error)
            stats.config_error, stats.config_error_kind = "", ""

    async def _mark(self, parts: dict[int, int], out: _BatchOutcome) -> None:
        """Write the batch's results, fenced by the leases it was claimed under. Retries briefly:
        if marking keeps failing, the rows stay pending and are re-published (absorbed as duplicates)."""
        fence = Fence.of(parts)
        delete = self._c.mark_mode == MarkMode.DELETE
        await self.hooks.before_mark(out.done)
        for attempt in range(1, MARK_RETRIES + 1):
            try:
                if out.done and self._acked is not None and self._acked.add(parts, out.done):
                    out.done = []  # marked by the next claim, or within MARK_LINGER_SECONDS
                if out.done:
                    n = await self._store.mark_done(fence, out.done, delete)
                    if n < len(out.done):
                        self._stats.fenced_out += len(out.done) - n
                        log.warning(
                            "%d acked rows not marked: lease lost (a successor re-publishes them)", len(out.done) - n
                        )
                    out.done = []
                if out.failed_ids:
                    await self._store.mark_failed(fence, out.failed_ids, out.failed_errors, out.failed_delays)
                    out.failed_ids = []
                if out.dead_ids:
                    moved = await self._store.dead_letter(fence, out.dead_ids, out.dead_reasons)
                    self._dead_lettered(out, moved)
                    out.dead_ids = []
                return
            except Exception as exc:
                self._error(f"mark failed (attempt {attempt}): {type(exc).__name__}")
                if attempt == MARK_RETRIES or not self._leases.still_usable(parts, 0.0):
                    return
                await asyncio.sleep(retry_pause(attempt))

    def _dead_lettered(self, out: _BatchOutcome, moved: list[int]) -> None:
        """Count and log the rows the fenced statement moved (a row a lost lease kept is not moved:
        its new owner decides). One WARNING per dead letter, with its id and reason, never the payload."""
        reasons = dict(zip(out.dead_ids, out.dead_reasons, strict=True))
        by_reason = self._stats.dead_letters_by_reason
        for row_id in moved:
            reason = reasons[row_id]
            prefix = names.reason_of(reason)
            by_reason[prefix] = by_reason.get(prefix, 0) + 1
            self._metrics.dead_letter(prefix)
            log.warning("dead-lettered outbox row %d: %s", row_id, reason)
        self._stats.dead_letters += len(moved)

    def _error(self, message: str) -> None:
        self._stats.last_error = message
        log.warning("%s", message)


def _refusal(row: OutboxRow, headers: bytes) -> PublishResult:
    """Why a row whose message was built cannot be sent (the relay's checks after rendering)."""
    if row.payload is None:  # the claim left it out: over the server's max_payload (OutboxStore.limit_payloads)
        return PublishResult(
            Outcome.REFUSED,
            names.REASON_PAYLOAD_TOO_LARGE,
            "payload exceeds the server's max_payload (not read by the claim)",
        )
    if not row.created_at:
        return PublishResult(
            Outcome.REFUSED,
            names.REASON_INVALID_CREATED_AT,
            "created_at has no RFC 3339 form (a BC date or infinity): use a time between years 1 and 9999",
        )
    return PublishResult(
        Outcome.REFUSED,
        names.REASON_HEADER_TOO_LARGE,
        f"header block of {len(headers)} bytes exceeds nats-server's limit of {MAX_HEADER_BYTES}: "
        "shorten the row's headers, aggregate_id or tenant",
    )


class RelayHooks:
    """Test seams: deterministic points where fault tests stop or freeze a worker. No-ops here."""

    async def after_wave(self, rows: list[OutboxRow], results: list[PublishResult]) -> None:
        return None

    async def before_mark(self, ids: list[int]) -> None:
        return None
