"""The outbox history checker: compare what was committed with what the stream holds. Pure.

Inputs:

- the ground truth: every event a producer *committed* (a ledger row written in the same
  transaction as the outbox row, so rolled-back events never appear), with its aggregate and its
  outbox id (the per-aggregate order key);
- the stream, read in sequence order: event id (``Nats-Msg-Id``), aggregate and outbox id;
- what is still pending in the outbox, and what was dead-lettered.

Findings (all must be zero for a clean run, except ``pending`` when the relay was not drained):

- ``lost``: committed, not in the stream, not pending, not dead-lettered: a row was marked or
  deleted without being stored;
- ``unexpected``: in the stream but never committed (a phantom, e.g. a rolled-back transaction);
- ``duplicates``: stored more than once (extra copies counted);
- ``order_violations``: within one aggregate, a stored event whose outbox id is lower than the
  highest one stored before it (first copies only);
- ``pending``: committed, not yet in the stream, still in the outbox (backlog left);
- ``dead_lettered``: moved to the dead-letter table (by policy, not a violation).
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


@dataclass
class HistoryReport:
    events: int = 0  # committed events
    stored: int = 0  # messages in the stream
    published: int = 0  # committed events found in the stream (each counted once)
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    order_violations: int = 0
    pending: int = 0
    dead_lettered: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.duplicates or self.order_violations)

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
) -> HistoryReport:
    """Compare ground truth with the stream; see the module docstring for the findings."""
    report = HistoryReport()
    truth = {e.event_id: e for e in committed}
    report.events = len(truth)
    seen: set[str] = set()
    last_in_aggregate: dict[str, int] = {}
    for m in sorted(stream, key=lambda m: m.seq):
        report.stored += 1
        if m.event_id in seen:
            report.duplicates += 1
            report._example("duplicates", f"{m.event_id} again at seq {m.seq}")
            continue
        seen.add(m.event_id)
        if m.event_id not in truth:
            report.unexpected += 1
            report._example("unexpected", f"{m.event_id} at seq {m.seq}")
            continue
        report.published += 1
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
    return report
