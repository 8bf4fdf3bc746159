"""The outbox history checker: compare what was committed with what the stream holds. Pure.

Inputs:

- the ground truth: every event a producer *committed* (a ledger row written in the same
  transaction as the outbox row, so rolled-back events never appear), with its aggregate and its
  outbox id (the per-aggregate order key); for an event requeued from the dead letters
  (``outboxctl dead-letters requeue``), the id it was re-inserted as, which places it after every
  event of its aggregate committed before the requeue;
- the stream, read in sequence order: event id (``Nats-Msg-Id``), aggregate and outbox id;
- what is still pending in the outbox, and what was dead-lettered.

Findings (all must be zero for a clean run, except ``pending`` when the relay was not drained):

- ``lost``: committed, not in the stream, not pending, not dead-lettered: a row was marked or
  deleted without being stored;
- ``unexpected``: in the stream but never committed (a phantom, e.g. a rolled-back transaction);
- ``duplicates``: stored more than once (extra copies counted);
- ``order_violations``: within one aggregate, a stored event whose outbox id is lower than the
  highest one stored before it (first copies only);
- ``seq_mismatches``: a stored event whose ``Outbox-Seq`` is not the outbox id it was committed (or
  requeued) as: the order above would be judged on a wrong key;
- ``pending``: committed, not yet in the stream, still in the outbox (backlog left);
- ``dead_lettered``: moved to the dead-letter table (by policy, not a violation).

With ``expect_drained=True`` (the relay ran until the backlog should be empty), ``pending`` is a
violation too: a row left behind, e.g. skipped by an ``id > last_seen`` cursor.

Mark consistency, when an audit of the marks is given (``marks``, one :class:`MarkRecord` per row
the relay deleted or marked published, recorded by a trigger in the marking statement):

- ``marked_not_stored``: a row marked done (not dead-lettered) whose event is not in the stream;
- ``marked_before_stored``: a row marked before the stream stored its event (the mark cannot have
  followed an ack);
- ``stale_marks``: a mark (or dead-letter move) made by a worker that did not hold the lease of the
  row's partition at that moment, i.e. under a stale lease epoch. Marks whose worker is unknown are
  counted in ``unattributed_marks`` and not judged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CommittedEvent:
    event_id: str
    aggregate: str  # aggregate type and id, e.g. "order/42"
    outbox_id: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: str
    aggregate: str
    outbox_id: int
    stored_at: float = 0.0  # server timestamp, seconds since the epoch


@dataclass(frozen=True, slots=True)
class MarkRecord:
    event_id: str
    marked_at: float  # database clock, seconds since the epoch
    op: str = "delete"  # "delete" (row deleted) or "mark" (published_at set)
    marker: str = ""  # worker id that ran the marking statement; "" when unknown
    lease_held: bool | None = None  # did ``marker`` hold the row's partition lease then; None: unknown


@dataclass
class HistoryReport:
    events: int = 0  # committed events
    stored: int = 0  # messages in the stream
    published: int = 0  # committed events found in the stream (each counted once)
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    order_violations: int = 0
    seq_mismatches: int = 0
    pending: int = 0
    dead_lettered: int = 0
    marks: int = 0  # audited marks (0 when no audit was given)
    marked_not_stored: int = 0
    marked_before_stored: int = 0
    stale_marks: int = 0
    unattributed_marks: int = 0
    expect_drained: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.unexpected
            or self.duplicates
            or self.order_violations
            or self.seq_mismatches
            or self.marked_not_stored
            or self.marked_before_stored
            or self.stale_marks
            or (self.expect_drained and self.pending)
        )

    def violations(self) -> dict[str, int]:
        """The non-zero findings that make :attr:`ok` false."""
        found = {
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "order_violations": self.order_violations,
            "seq_mismatches": self.seq_mismatches,
            "marked_not_stored": self.marked_not_stored,
            "marked_before_stored": self.marked_before_stored,
            "stale_marks": self.stale_marks,
            "pending": self.pending if self.expect_drained else 0,
        }
        return {k: v for k, v in found.items() if v}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def _example(self, kind: str, text: str) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < 5:
            bucket.append(text)


def check_history(
    committed: Iterable[CommittedEvent],
    stream: Iterable[StoredEvent],
    pending_ids: Iterable[str] = (),
    dead_ids: Iterable[str] = (),
    marks: Iterable[MarkRecord] | None = None,
    *,
    expect_drained: bool = False,
    mark_tolerance: float = 0.0,
) -> HistoryReport:
    """Compare ground truth with the stream; see the module docstring for the findings.

    ``mark_tolerance`` (seconds) absorbs clock differences between the database and the broker
    when they run on different hosts; on one host both read the same clock.

    Why this size: five independent sources of evidence (each a separate read by the caller) and
    two keyword options; bundling them would only move the same names into a class.
    """
    report = HistoryReport(expect_drained=expect_drained)
    truth = {e.event_id: e for e in committed}
    report.events = len(truth)
    seen: dict[str, float] = {}  # event id -> stored_at of its first copy
    first_seq: dict[str, int] = {}  # event id -> stream sequence of its first copy
    last_in_aggregate: dict[str, int] = {}
    for m in sorted(stream, key=lambda m: m.seq):
        report.stored += 1
        if m.event_id in seen:
            report.duplicates += 1
            report._example(
                "duplicates",
                f"{m.event_id} again at seq {m.seq} (first at seq {first_seq[m.event_id]}, "
                f"{m.stored_at - seen[m.event_id]:.3f}s earlier)",
            )
            continue
        seen[m.event_id] = m.stored_at
        first_seq[m.event_id] = m.seq
        if m.event_id not in truth:
            report.unexpected += 1
            report._example("unexpected", f"{m.event_id} at seq {m.seq}")
            continue
        report.published += 1
        committed_as = truth[m.event_id].outbox_id
        if m.outbox_id != committed_as:
            report.seq_mismatches += 1
            report._example("seq_mismatches", f"{m.event_id}: Outbox-Seq {m.outbox_id}, committed as {committed_as}")
        prev = last_in_aggregate.get(m.aggregate)
        if prev is not None and m.outbox_id < prev:
            report.order_violations += 1
            report._example("order_violations", f"{m.aggregate}: id {m.outbox_id} stored after id {prev}")
        else:
            last_in_aggregate[m.aggregate] = m.outbox_id
    pending = set(pending_ids)
    dead = set(dead_ids)
    for event_id in truth:
        if event_id in seen:
            continue
        if event_id in pending:
            report.pending += 1
        elif event_id in dead:
            report.dead_lettered += 1
        else:
            report.lost += 1
            report._example("lost", event_id)
    if report.expect_drained and report.pending:
        for event_id in sorted(pending & truth.keys() - seen.keys())[:5]:
            report._example("pending", event_id)
    if marks is not None:
        _check_marks(report, marks, seen, dead, mark_tolerance)
    return report


def _check_marks(
    report: HistoryReport, marks: Iterable[MarkRecord], seen: dict[str, float], dead: set[str], tolerance: float
) -> None:
    for mark in marks:
        report.marks += 1
        if mark.lease_held is None:
            report.unattributed_marks += 1
        elif not mark.lease_held:
            report.stale_marks += 1
            report._example("stale_marks", f"{mark.event_id} {mark.op} by {mark.marker} without its lease")
        if mark.event_id in dead:
            continue  # a dead-letter move, not a publish mark
        stored_at = seen.get(mark.event_id)
        if stored_at is None:
            report.marked_not_stored += 1
            report._example("marked_not_stored", mark.event_id)
        elif stored_at and mark.marked_at + tolerance < stored_at:
            report.marked_before_stored += 1
            report._example(
                "marked_before_stored", f"{mark.event_id} marked {stored_at - mark.marked_at:.6f}s before stored"
            )
