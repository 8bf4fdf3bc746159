"""What one worker reports about itself into the OutboxPublisher status (``status.workers[]``).

The worker produces a :class:`WorkerReport` every ``report_interval_seconds``; a status sink (the
Kubernetes adapter in operator mode) writes it with a merge patch of the status subresource. The
operator aggregates the entries into totals and conditions. Field names here are the status field
names (camelCase) so the CRD schema, the worker and the operator agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# errorKind: which dependency a configError belongs to (the operator's DatabaseReady or StreamReady).
ERROR_KIND_DATABASE = "database"
ERROR_KIND_STREAM = "stream"  # NATS: the stream, its subjects, credentials
ERROR_KINDS = (ERROR_KIND_DATABASE, ERROR_KIND_STREAM)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    pod: str
    partitions: list[int] = field(default_factory=list)
    published: int = 0  # acked rows (duplicates included), cumulative since the worker started
    duplicates: int = 0  # acks with duplicate=true (a success: the broker already had the event)
    failed: int = 0  # publish attempts that failed (all reasons), cumulative
    deadLetters: int = 0  # rows this worker moved to the dead-letter table, cumulative
    # deadLetters by reason prefix (outbox_common.names.DEAD_LETTER_REASONS, e.g. header_too_large),
    # cumulative; only reasons that occurred are present
    deadLettersByReason: dict[str, int] = field(default_factory=dict)
    # the publisher's rows in the dead-letter table now, whoever moved them (up to 10,000): what is
    # left to requeue or discard (outboxctl dead-letters); sampled with the backlog
    deadLettersWaiting: int = 0
    inFlight: int = 0  # unacknowledged publishes right now
    # due rows in the partitions this worker owns, and the age of the one due longest; None (null in
    # the merge patch: the key is removed) while the worker has no sample, or its last one failed
    backlog: int | None = None
    oldestPendingSeconds: float | None = None
    ratePerSecond: float = 0.0  # acked rows per second over the last interval
    lastError: str = ""  # last failure, one line, never a secret
    configError: str = ""  # a configuration error that pauses partitions (today only NATS-side: the stream)
    errorKind: str = ""  # ERROR_KINDS: the dependency configError belongs to; "" when there is none
    # the database has not answered this worker's lease renewals for a while (an outage, not a
    # configuration error): how long, and the last error's type; "" while it answers
    databaseError: str = ""
    # NOTIFYs do not reach this worker (its listener's probe did not come back, or LISTEN fails): new
    # rows wait for the poll; why, one line; "" while they arrive (Listener.notify_error)
    notifyError: str = ""
    reportTime: str = ""  # RFC 3339, the worker's clock

    def to_status(self) -> dict[str, Any]:
        return asdict(self)


class StatusSink:
    """Port: where reports go. The default drops them (no Kubernetes, e.g. in ``outboxctl demo``)."""

    async def write(self, report: WorkerReport) -> None:  # pragma: no cover - trivial default
        return None

    async def close(self) -> None:
        return None
