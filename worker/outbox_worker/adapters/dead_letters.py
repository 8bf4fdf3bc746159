"""The dead-letter table, for operators (``outboxctl dead-letters``): list, requeue, discard.

Guarantees:

- Every operation selects rows with one :class:`DeadLetterFilter`; requeue and discard lock the rows
  they select (``FOR UPDATE``) and act on them in one transaction: all of it or nothing. A second run
  finds nothing more to do (the rows left the dead-letter table), and a concurrent run waits for
  the first, then finds them gone.
- With ``apply=False`` (the default of the command) nothing is changed: the result says what would be.
- Requeue puts a row back into the outbox with its original event id, aggregate, event type, tenant,
  payload, headers and created_at, attempts 0, and a new id after every row already in the outbox;
  the rows of one requeue are inserted in their dead-letter id order. Each requeue is recorded in
  ``<table>_requeued``. A row whose event id is already in the outbox, or whose created_at the
  table's CHECK would refuse, is skipped and stays a dead letter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from outbox_worker.core.sql import Sql


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operation selects; a field left None does not filter."""

    ids: tuple[int, ...] | None = None
    publisher: str | None = None
    aggregate_id: str | None = None
    reason: str | None = None  # a prefix of the reason, e.g. "header_too_large"
    older_than_seconds: float | None = None  # dead at least this long ago
    newer_than_seconds: float | None = None  # dead at most this long ago

    @property
    def narrows(self) -> bool:
        """Whether any filter is set (else the selection is every dead letter)."""
        return any(
            v is not None
            for v in (
                self.ids,
                self.publisher,
                self.aggregate_id,
                self.reason,
                self.older_than_seconds,
                self.newer_than_seconds,
            )
        )

    def params(self) -> tuple[Any, ...]:
        """$1-$6 of the dead-letter statements (see Sql._DEAD_SELECTION)."""
        return (
            list(self.ids) if self.ids is not None else None,
            self.publisher,
            self.aggregate_id,
            self.reason,
            self.older_than_seconds,
            self.newer_than_seconds,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as listed: every column but the payload (its size instead)."""

    id: int
    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    tenant: str
    payload_bytes: int
    headers: dict[str, Any]
    created_at: datetime
    attempts: int
    reason: str
    publisher: str
    dead_at: datetime
    requeueable: bool  # False: its event id is in the outbox already, or created_at has no RFC 3339 form

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["created_at"] = _iso(self.created_at)
        out["dead_at"] = _iso(self.dead_at)
        return out


def _iso(ts: datetime) -> str:
    try:
        return ts.isoformat()
    except (ValueError, OverflowError):  # pragma: no cover - asyncpg gives infinity as a datetime max
        return str(ts)


SHOWN = 50  # dead letters a requeue or discard reads in full, to show them; the rest are counted


@dataclass
class Action:
    """What a requeue or discard selected and did (or, with ``applied`` false, would do).

    Bounded whatever the selection: every selected dead letter is an id here, and only the first
    :data:`SHOWN` done and the first :data:`SHOWN` skipped are read in full (``shown``)."""

    selected: list[int] = field(default_factory=list)  # ids of every selected dead letter
    done: list[int] = field(default_factory=list)  # dead-letter ids requeued or discarded
    new_ids: dict[int, int] = field(default_factory=dict)  # requeue: dead-letter id -> new outbox id
    applied: bool = False
    shown: dict[int, DeadLetter] = field(default_factory=dict)  # id -> row, for the first done and skipped

    @property
    def skipped(self) -> list[int]:
        """Selected ids left as dead letters (a requeue skips those not :attr:`DeadLetter.requeueable`)."""
        done = set(self.done)
        return [i for i in self.selected if i not in done]


async def list_dead_letters(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, limit: int | None = None
) -> list[DeadLetter]:
    """The selected dead letters in id order, at most ``limit`` (None: all)."""
    rows = await conn.fetch(sql.dead_letter_list, *selection.params(), limit)
    return [_dead_letter(r) for r in rows]


async def _select(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, *, lock: bool, limit: int | None
) -> list[tuple[int, bool]]:
    """(id, requeueable) of the selected dead letters, the oldest ``limit`` (None: all), locked when ``lock``."""
    rows = await conn.fetch(sql.dead_letter_lock if lock else sql.dead_letter_ids, *selection.params(), limit)
    return [(int(r[0]), bool(r[1])) for r in rows]


async def _rows(conn: asyncpg.Connection, sql: Sql, ids: list[int]) -> dict[int, DeadLetter]:
    """The dead letters ``ids`` in full (at most 2 * SHOWN of them)."""
    if not ids:
        return {}
    return {d.id: d for d in await list_dead_letters(conn, sql, DeadLetterFilter(ids=tuple(ids)))}


async def requeue(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, *, apply: bool, limit: int | None = None
) -> Action:
    """Put the selected dead letters back into the outbox (see the module docstring), the oldest
    ``limit`` of them (None: all); dry unless ``apply``."""
    async with conn.transaction():
        picked = await _select(conn, sql, selection, lock=apply, limit=limit)
        ids = [i for i, _ in picked]
        would = [i for i, ok in picked if ok]
        # read what is shown before the requeue deletes it
        shown = await _rows(conn, sql, would[:SHOWN] + [i for i, ok in picked if not ok][:SHOWN])
        if not apply:
            return Action(ids, would, {}, False, shown)
        moved = await conn.fetch(sql.dead_letter_requeue, ids)
    return Action(ids, [r[0] for r in moved], {r[0]: r[1] for r in moved}, True, shown)


async def discard(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, *, apply: bool, limit: int | None = None
) -> Action:
    """Delete the selected dead letters for good, the oldest ``limit`` of them (None: all); dry
    unless ``apply``."""
    async with conn.transaction():
        ids = [i for i, _ in await _select(conn, sql, selection, lock=apply, limit=limit)]
        shown = await _rows(conn, sql, ids[:SHOWN])
        if not apply:
            return Action(ids, ids, {}, False, shown)
        gone = await conn.fetch(sql.dead_letter_discard, ids)
    return Action(ids, [r[0] for r in gone], {}, True, shown)


def _dead_letter(r: asyncpg.Record) -> DeadLetter:
    return DeadLetter(
        id=r["id"],
        event_id=r["event_id"],
        aggregate_type=r["aggregate_type"],
        aggregate_id=r["aggregate_id"],
        event_type=r["event_type"],
        tenant=r["tenant"],
        payload_bytes=r["payload_bytes"],
        headers=json.loads(r["headers"]),
        created_at=r["created_at"],
        attempts=r["attempts"],
        reason=r["reason"],
        publisher=r["publisher"],
        dead_at=r["dead_at"],
        requeueable=bool(r["requeueable"]),
    )
