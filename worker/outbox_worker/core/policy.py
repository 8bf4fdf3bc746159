"""Pure decisions of the relay: fair shares, how a batch is cut into waves, what an error ack means.
(The retry delay, shared with the operator, is outbox_common.timing.backoff_delay.)

Nothing here does I/O, so every rule is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

from outbox_common import names
from outbox_common.envelope import OutboxRow


def fair_share(partitions: int, live_workers: Sequence[str], me: str) -> int:
    """How many partitions ``me`` should own so that live workers differ by at most one.

    Workers are ranked by id; the first ``partitions % n`` get one extra. Every worker computes the
    same answer from the same list, so shares add up to ``partitions`` and converge without a leader.
    """
    workers = sorted(set(live_workers) | {me})
    n = len(workers)
    base, extra = divmod(partitions, n)
    return base + (1 if workers.index(me) < extra else 0)


def pressure_pause(took: float, interval: float, cost_factor: float = 50.0, longest: float = 60.0) -> float:
    """Seconds to wait before the next queue-pressure sample, the last one having taken ``took``.

    A sample counts the pending rows of the worker's partitions, a walk over every one of them: ~30 ms
    of database time at 100,000 (measured), growing with the backlog, every 5 s per worker. Every
    ``interval`` seconds while that is cheap; else ``cost_factor`` times what the last sample took,
    so counting keeps one database connection busy at most 1/50 of the time (up to 1.2 s per
    sample); never longer than ``longest``, so the status is at most that stale.
    """
    return min(longest, max(interval, took * cost_factor))


class Outcome(StrEnum):
    """How one publish ended. Every publish ends in exactly one of these, within the ack timeout."""

    ACKED = "acked"
    DUPLICATE = "duplicate"  # the stream already had this Nats-Msg-Id: a success
    RETRYABLE = "retryable"  # timeout, disconnect, 503, no responders: retry with the same id
    PERMANENT = "permanent"  # the server refused this message for good: count the attempt, dead-letter at N
    REFUSED = "refused"  # the relay's own check before sending (size, subject, header): dead-letter now
    CONFIG = "config"  # no stream captures the subject, another stream does, or it is sealed: stop the partition


class PublishResult(NamedTuple):
    """How one publish ended. Immutable; a tuple because one is built per ack (0.4 µs against 0.8 µs
    for a frozen dataclass)."""

    outcome: Outcome
    reason: str = ""  # a names.REASON_* value
    detail: str = ""  # one line, from the server or the client; never holds a secret
    seq: int = 0  # stream sequence of the stored message (acked or duplicate)

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.ACKED, Outcome.DUPLICATE)


# JetStream API error codes (``err_code``, nats-server's server/errors.json) a publish ack can carry.
HEADER_TOO_LARGE_ERR_CODE = 10097  # 400 "header size exceeds maximum allowed of 64k"
MESSAGE_TOO_LARGE_ERR_CODE = 10054  # 400 "message size exceeds maximum allowed" (max_msg_size, account)
STREAM_MISMATCH_ERR_CODE = 10060  # 400 "expected stream does not match" (Nats-Expected-Stream)
STREAM_SEALED_ERR_CODE = 10109  # 400 "invalid operation on sealed stream": the stream, not the row
# 4xx error acks that are about the moment or the stream, not the message: a retry can succeed.
RETRYABLE_4XX_ERR_CODES = frozenset(
    {
        10002,  # 400 resource limits exceeded for account: room may be made
        10070,  # 400 wrong last msg ID (Nats-Expected-Last-Msg-Id; the relay never sets it)
        10071,  # 400 wrong last sequence: {seq}
        10164,  # 400 wrong last sequence (another publish of the subject is in process)
        10158,  # 409 duplicate message id is in process: the first copy is being stored
        10167,  # 429 too many requests
        10180,  # 412 min last sequence
        10193,  # 400 missing sequence for expected last sequence per subject
        10202,  # 400 cluster member change is in progress
    }
)


def classify_error_ack(code: int, err_code: int, description: str) -> PublishResult:
    """Map a JetStream error ack ``{"error": {"code", "err_code", "description"}}`` to an outcome.

    - 5xx (503 stream full with ``discard: new``, no quorum, store failed), 408, 409 (the same
      ``Nats-Msg-Id`` is being stored), 429 and the 4xx of :data:`RETRYABLE_4XX_ERR_CODES`: retryable,
      never a dead letter.
    - The stream is not the configured one, or is sealed: a configuration error (partition paused).
    - Any other 4xx is about this message and retrying the same bytes cannot fix it: permanent, with
      a reason naming what failed (``header_too_large``, ``payload_too_large``, else
      ``server_rejected``) and the server's code and text as the detail.
    """
    detail = f"{code}/{err_code}: {description}"[:300]
    if err_code in (STREAM_MISMATCH_ERR_CODE, STREAM_SEALED_ERR_CODE):
        # The subject is captured by another stream than the configured one (the stream was replaced),
        # or the stream takes nothing any more: not the row's fault; stop the partition until fixed.
        return PublishResult(Outcome.CONFIG, names.REASON_NO_STREAM, detail)
    if code >= 500 or code in (408, 409, 429) or err_code in RETRYABLE_4XX_ERR_CODES or not 400 <= code < 500:
        return PublishResult(Outcome.RETRYABLE, names.REASON_SERVER_ERROR, detail)
    if err_code == HEADER_TOO_LARGE_ERR_CODE:
        return PublishResult(Outcome.PERMANENT, names.REASON_HEADER_TOO_LARGE, detail)
    if err_code == MESSAGE_TOO_LARGE_ERR_CODE or code == 413:
        return PublishResult(Outcome.PERMANENT, names.REASON_PAYLOAD_TOO_LARGE, detail)
    return PublishResult(Outcome.PERMANENT, names.REASON_SERVER_REJECTED, detail)


def plan_waves(rows: Sequence[OutboxRow], ordered: bool, wave_limit: int) -> list[list[OutboxRow]]:
    """Cut a claimed batch into waves that are published one after the other.

    With ``ordered``, a wave holds at most one row per aggregate, and an aggregate's k-th row is in
    wave k: the next row of an aggregate is only sent after the previous one was acked. Rows of
    different aggregates share waves (pipelined). Waves never exceed ``wave_limit`` rows (the
    per-loop in-flight bound); an aggregate's later rows then move to later waves, never earlier.
    Without ``ordered``, rows are simply chunked.
    """
    if not ordered:
        return [list(rows[i : i + wave_limit]) for i in range(0, len(rows), wave_limit)]
    depth: dict[tuple[int, str], int] = {}
    waves: list[list[OutboxRow]] = []
    for row in rows:  # rows come in (partition, id) order
        key = (row.partition, row.aggregate_id)
        k = depth.get(key, -1) + 1
        while k < len(waves) and len(waves[k]) >= wave_limit:
            k += 1
        depth[key] = k
        while len(waves) <= k:
            waves.append([])
        waves[k].append(row)
    return waves
