"""Acked rows whose delete (or ``published_at`` mark) rides on the next claim.

At one event per transaction the worker's CPU is spent per claim cycle, and a cycle was three round
trips to the servers: claim, publish, mark. :class:`AckedRows` keeps the acked rows of small batches
and lets the next claim of any loop write their mark in the same statement
(:meth:`Sql.claim_after_mark`), so a cycle is two round trips.

Guarantees:

- Nothing is marked before its ack: a row enters only once JetStream acked it (or called it a
  duplicate), exactly where it would otherwise have been marked at once.
- Every mark is fenced by the lease (partition, epoch) the row was claimed and acked under, as a mark
  written at once is. A row whose fence no longer holds stays pending; its partition's next owner
  publishes it again and the stream's duplicate window absorbs it (counted in ``fenced_out``).
- No loop of this worker publishes a row twice: until its mark is answered, every claim excludes it.
- Bounded: a row waits at most :data:`MARK_LINGER_SECONDS` (then its mark is written on its own),
  and never past its partition's release or the worker's stop (both write the marks first). At
  most :data:`DEFER_LIMIT` rows wait; a batch that would exceed that is marked at once.
- A mark that fails is retried with the next claim or flush, at most :data:`MARK_RETRIES` times;
  then its rows stay pending and are published again later (absorbed as duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outbox_worker.adapters.store import Fence, OutboxStore

log = logging.getLogger(__name__)

MARK_LINGER_SECONDS = 0.02
"""How long acked rows wait for a claim to carry their mark before it is written on its own."""
DEFER_LIMIT = 128
"""Most acked rows waiting (every claim compares its candidates with them); larger batches are
marked at once, so draining a backlog runs exactly as without deferral."""
MARK_RETRIES = 5
"""Tries of one mark, deferred (here) or written at once (:meth:`RelayLoop._mark`), before its rows are
left pending (published again later, absorbed as duplicates). A deferred mark is tried again by the
next claim or flush; between the tries of ``RelayLoop._mark`` and of :meth:`AckedRows.flush` the wait
is 0.2 s, doubling, at most 2 s (:func:`retry_pause`)."""


def retry_pause(attempt: int) -> float:
    """Seconds to wait after failed try ``attempt`` of a mark (0.2, 0.4, 0.8, 1.6, 2.0)."""
    return min(0.1 * 2.0**attempt, 2.0)


@dataclass
class Ticket:
    """Acked rows taken for one statement: their ids and the leases that fence them."""

    leases: dict[int, int]  # partition -> epoch
    ids: list[int]
    attempts: int = 1

    @property
    def fence(self) -> Fence:
        return Fence.of(self.leases)


class AckedRows:
    """The acked rows of one worker whose mark is not written yet (see the module docstring)."""

    def __init__(
        self,
        store: OutboxStore,
        *,
        delete: bool,
        fenced_out: Callable[[int], None],
        linger: float = MARK_LINGER_SECONDS,
        limit: int = DEFER_LIMIT,
    ) -> None:
        self._store = store
        self.delete = delete
        self._fenced_out = fenced_out
        self._linger = linger
        self._limit = limit
        self._leases: dict[int, int] = {}
        self._ids: list[int] = []
        self._attempts = 1  # of the rows waiting: how often their mark was tried already
        self._in_flight: dict[int, Ticket] = {}  # by id(ticket)
        self._settled = asyncio.Event()
        self._settled.set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.carried = 0  # rows whose mark rode on a claim (tests and benchmarks read it)
        self.flushed = 0  # rows whose mark was written on its own

    @property
    def waiting(self) -> int:
        """Acked rows whose mark no statement carries yet."""
        return len(self._ids)

    def add(self, leases: dict[int, int], ids: Sequence[int]) -> bool:
        """Keep acked ``ids`` (claimed under ``leases``) for the next claim. False when they must be
        marked at once instead: too many waiting, or a partition already waits under another epoch."""
        if len(self._ids) + len(ids) > self._limit:
            return False
        return self._wait(leases, ids)

    def _wait(self, leases: dict[int, int], ids: Sequence[int]) -> bool:
        """Keep ``ids`` waiting under ``leases``, the linger armed; False (nothing kept) when one of
        their partitions already waits under another epoch (one statement has one fence)."""
        mine = self._leases
        if any(mine.get(p, e) != e for p, e in leases.items()):
            return False
        mine.update(leases)
        self._ids.extend(ids)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush_soon)
        return True

    def take(self) -> Ticket | None:
        """Everything waiting, for a statement about to be sent; None if nothing waits. Pass the
        ticket to :meth:`settle` when the statement is answered (or failed)."""
        if not self._ids:
            return None
        ticket = Ticket(self._leases, self._ids, self._attempts)
        self._leases, self._ids, self._attempts = {}, [], 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._in_flight[id(ticket)] = ticket
        self._settled.clear()
        return ticket

    def excluded(self) -> list[int]:
        """Ids no claim may return now: waiting, or in a statement not yet answered."""
        return [*self._ids, *(i for t in self._in_flight.values() for i in t.ids)]

    def settle(self, ticket: Ticket, marked: int | None) -> None:
        """The statement carrying ``ticket`` was answered: ``marked`` rows changed, or None if it
        failed (its rows wait again, until :data:`MARK_RETRIES` attempts)."""
        del self._in_flight[id(ticket)]
        if not self._in_flight:
            self._settled.set()
        if marked is None:
            if ticket.attempts >= MARK_RETRIES or not self._wait(ticket.leases, ticket.ids):
                log.warning("%d acked rows not marked: a successor re-publishes them", len(ticket.ids))
                self._fenced_out(len(ticket.ids))
                return
            self._attempts = max(self._attempts, ticket.attempts + 1)
            return
        if marked < len(ticket.ids):
            self._fenced_out(len(ticket.ids) - marked)
            log.warning(
                "%d acked rows not marked: lease lost (a successor re-publishes them)", len(ticket.ids) - marked
            )

    async def flush(self, attempts: int = MARK_RETRIES) -> None:
        """Write every waiting mark on its own, and wait for the statements carrying others; at
        most ``attempts`` tries (a failed mark waits again for the next claim or flush)."""
        for attempt in range(1, attempts + 1):
            ticket = self.take()
            if ticket is not None:
                marked: int | None = None
                try:
                    marked = await self._store.mark_done(ticket.fence, ticket.ids, self.delete)
                    self.flushed += len(ticket.ids)
                except Exception as exc:
                    log.warning("mark failed (attempt %d): %s", ticket.attempts, type(exc).__name__)
                finally:
                    self.settle(ticket, marked)
            await self._settled.wait()  # claims carrying marks: bounded by the statement timeout
            if not self._ids:
                return
            if attempt < attempts:
                await asyncio.sleep(retry_pause(attempt))

    async def flush_before_release(self) -> None:
        """One try (the lease tick waits for it): what still fails is left to the next owner."""
        await self.flush(attempts=1)

    def _flush_soon(self) -> None:
        """No claim came within the linger: write the marks on their own."""
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def close(self) -> None:
        """Flush (the worker's stop, after its loops ended; bounded by the caller)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.flush()
        for task in list(self._flushes):
            with contextlib.suppress(Exception):
                await task
