"""The dead-letter table, for operators (``outboxctl dead-letters``): list, requeue, discard.

Guarantees:

- Every operation selects rows with one :class:`DeadLetterFilter`. Requeue and discard walk the
  selection in id order and act on the rows they can: a requeue on the requeueable ones (it skips
  the others and reports them), a discard on every one. A ``limit`` counts the rows acted on: the
  oldest ``limit`` of them, and the rows skipped among, before and after them up to the next row it
  would act on, where the walk stops (:attr:`Action.more`: the limit left out rows a rerun acts on).
  The walk keeps ids only; at most ``limit`` rows are locked and changed.
- Requeue and discard lock the rows they act on (``FOR UPDATE``, the rows skipped are only read) and
  act on them in the same transaction: all of it or nothing. A second run finds nothing more to do
  (the rows left the dead-letter table), and a concurrent run waits for the first, then finds them
  gone.
- With ``apply=False`` (the default of the command) nothing is changed: the result says what would
  be, the same rows ``apply=True`` acts on and skips (unless the table changes in between).
- Requeue puts a row back into the outbox with its original event id, aggregate, event type, tenant,
  payload, headers and created_at, attempts 0, and a new id after every row already in the outbox;
  the rows of one requeue are inserted in their dead-letter id order. Each requeue is recorded in
  ``<table>_requeued``. A row whose event id is already in the outbox, or whose created_at the
  table's CHECK would refuse, is skipped and stays a dead letter. Of dead letters with the same
  event id (an event dead-lettered twice) only the oldest, the lowest id, is requeueable: the
  outbox holds one row per event id, so the others are skipped (and their event id is in the
  outbox once the oldest is back), in the dry run as with ``apply``, never an error of the whole
  run; :attr:`DeadLetter.requeueable` says the same in a listing.
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
    # False: its event id is in the outbox already or in an older dead letter, or created_at has no RFC 3339 form
    requeueable: bool

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
WALK_BATCH = 10_000  # ids a requeue or discard reads per round trip while it walks its selection


@dataclass
class Action:
    """What a requeue or discard selected and did (or, with ``applied`` false, would do).

    Bounded whatever the selection: every selected dead letter is an id here, and only the first
    :data:`SHOWN` done and the first :data:`SHOWN` skipped are read in full (``shown``)."""

    selected: list[int] = field(default_factory=list)  # ids of every selected dead letter, up to the limit
    done: list[int] = field(default_factory=list)  # dead-letter ids requeued or discarded
    new_ids: dict[int, int] = field(default_factory=dict)  # requeue: dead-letter id -> new outbox id
    applied: bool = False
    shown: dict[int, DeadLetter] = field(default_factory=dict)  # id -> row, for the first done and skipped
    more: bool = False  # the limit left out rows this would act on: a rerun makes progress

    @property
    def skipped(self) -> list[int]:
        """Selected ids left as dead letters (a requeue skips those not :attr:`DeadLetter.requeueable`)."""
        done = set(self.done)
        return [i for i in self.selected if i not in done]


async def list_dead_letters(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, limit: int | None = None
) -> list[DeadLetter]:
    """The selected dead letters in id order, at most ``limit`` (None: all)."""
    return await _list(conn, sql, selection, limit, None)


async def _list(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, limit: int | None, later: frozenset[int] | None
) -> list[DeadLetter]:
    """:func:`list_dead_letters`, with the :func:`_later` ids if already read (None: read them)."""
    rows = await conn.fetch(sql.dead_letter_list, *selection.params(), limit)
    if rows and later is None:
        later = await _later(conn, sql)
    return [_dead_letter(r, later or frozenset()) for r in rows]


async def _later(conn: asyncpg.Connection, sql: Sql) -> frozenset[int]:
    """Ids of the dead letters that are not the oldest of their event id (a requeue skips them;
    :attr:`Sql.dead_letter_later`): usually none, at most one id per dead letter."""
    return frozenset(int(r[0]) for r in await conn.fetch(sql.dead_letter_later))


@dataclass
class _Picked:
    """A requeue's or discard's part of the selection: every id read, and those it acts on."""

    selected: list[int]
    acts: list[int]
    more: bool  # the limit left out a row it would act on


@dataclass(frozen=True, slots=True)
class _Acts:
    """Which rows an operation acts on: a discard every one, a requeue the requeueable ones."""

    requeue: bool
    later: frozenset[int]  # not the oldest dead letter of their event id (:func:`_later`)

    def __call__(self, dead_id: int, requeueable: bool) -> bool:
        return not self.requeue or (requeueable and dead_id not in self.later)


async def _walk(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, acts_on: _Acts, limit: int | None
) -> _Picked:
    """The selection in id order (not locked), read up to its ``limit``-th row to act on (None: to
    its end): a requeue acts on the requeueable rows and skips the others, a discard acts on every
    row. It stops at the first row past the limit it would act on: that one says the limit left
    rows out (:attr:`Action.more`)."""
    picked = _Picked([], [], False)
    async for r in conn.cursor(sql.dead_letter_ids, *selection.params(), prefetch=WALK_BATCH):
        acts = acts_on(int(r[0]), bool(r[1]))
        if acts and limit is not None and len(picked.acts) >= limit:
            picked.more = True
            break
        picked.selected.append(int(r[0]))
        if acts:
            picked.acts.append(int(r[0]))
    return picked


async def _lock(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, acts_on: _Acts, picked: _Picked
) -> _Picked:
    """Lock the rows ``picked`` acts on and read them again: a row a concurrent run removed is no
    longer selected, a row no longer requeueable (or selected) is not acted on."""
    rows = await conn.fetch(sql.dead_letter_lock, *selection.params(), picked.acts)
    locked = {int(r[0]): acts_on(int(r[0]), bool(r[1])) for r in rows}
    gone = set(picked.acts) - set(locked)
    return _Picked(
        [i for i in picked.selected if i not in gone], [i for i in picked.acts if locked.get(i)], picked.more
    )


async def _pick(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, acts_on: _Acts, *, apply: bool, limit: int | None
) -> _Picked:
    """The rows a requeue or discard selects and acts on, locked when ``apply`` (the dry run finds
    the same rows: only the lock differs)."""
    picked = await _walk(conn, sql, selection, acts_on, limit)
    return await _lock(conn, sql, selection, acts_on, picked) if apply else picked


async def _rows(
    conn: asyncpg.Connection, sql: Sql, ids: list[int], later: frozenset[int] | None
) -> dict[int, DeadLetter]:
    """The dead letters ``ids`` in full (at most 2 * SHOWN of them); ``later`` as for :func:`_list`."""
    if not ids:
        return {}
    return {d.id: d for d in await _list(conn, sql, DeadLetterFilter(ids=tuple(ids)), None, later)}


async def requeue(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, *, apply: bool, limit: int | None = None
) -> Action:
    """Put the selected dead letters back into the outbox (see the module docstring), the oldest
    ``limit`` requeueable ones (None: all); dry unless ``apply``."""
    async with conn.transaction():
        acts_on = _Acts(requeue=True, later=await _later(conn, sql))
        picked = await _pick(conn, sql, selection, acts_on, apply=apply, limit=limit)
        acts = set(picked.acts)
        skipped = [i for i in picked.selected if i not in acts]
        # read what is shown before the requeue deletes it
        shown = await _rows(conn, sql, picked.acts[:SHOWN] + skipped[:SHOWN], acts_on.later)
        if not apply:
            return Action(picked.selected, picked.acts, {}, False, shown, picked.more)
        moved = await conn.fetch(sql.dead_letter_requeue, picked.acts)
    return Action(picked.selected, [r[0] for r in moved], {r[0]: r[1] for r in moved}, True, shown, picked.more)


async def discard(
    conn: asyncpg.Connection, sql: Sql, selection: DeadLetterFilter, *, apply: bool, limit: int | None = None
) -> Action:
    """Delete the selected dead letters for good, the oldest ``limit`` of them (None: all); dry
    unless ``apply``."""
    async with conn.transaction():
        acts_on = _Acts(requeue=False, later=frozenset())
        picked = await _pick(conn, sql, selection, acts_on, apply=apply, limit=limit)
        shown = await _rows(conn, sql, picked.acts[:SHOWN], None)
        if not apply:
            return Action(picked.selected, picked.acts, {}, False, shown, picked.more)
        gone = await conn.fetch(sql.dead_letter_discard, picked.acts)
    return Action(picked.selected, [r[0] for r in gone], {}, True, shown, picked.more)


def _dead_letter(r: asyncpg.Record, later: frozenset[int]) -> DeadLetter:
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
        requeueable=bool(r["requeueable"]) and r["id"] not in later,
    )
