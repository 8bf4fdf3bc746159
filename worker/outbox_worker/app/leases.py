"""Partition leases of one worker: join, fair share, renew, release, and hand partitions to loops.

Guarantees:

- A partition is published by at most one loop of this worker at a time (check-out / check-in), so
  an aggregate (always in one partition) is never published by two loops at once.
- A partition is usable only until ``renew_sent + ttl - ack_timeout - margin`` on the local monotonic
  clock. The database computes expiry as ``now() + ttl`` *after* the renew was sent, so this worker
  stops sending before the lease can expire on the database clock and every publish it sent resolves
  (ack or timeout) before then.
- Partitions are released only after the loop using them checked them back in (in-flight publishes
  resolved, acked rows marked or handed to :class:`AckedRows`), and after :attr:`before_release` has
  written the marks still waiting there (one try), so a successor never races the previous owner's
  marks; a mark that still fails leaves its rows to the successor (re-published, absorbed as
  duplicates).
- Every mark is additionally fenced by (owner, epoch) in SQL; a worker that lost a lease changes
  nothing even if these local rules were broken (e.g. a process frozen past its lease).
- Handover without waiting for a tick: a worker that joins, releases partitions or leaves announces
  it (NOTIFY on :attr:`Sql.lease_channel`); every other worker runs its lease tick at once
  (:meth:`LeaseManager.on_lease_notice`), so the owner of a partition that is no longer its share
  releases it, and the new owner takes it, within a few database round trips instead of one tick
  interval. A partition whose loop is busy is released as soon as the loop checks it in. The
  announcements only make this faster: missed ones (a dropped LISTEN connection) leave the
  handover to the next tick, as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import asyncpg

from outbox_common.config import LeaseConfig
from outbox_common.timing import LEASE_SAFETY_MARGIN_SECONDS
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.store import DuplicateWorkerError, Fence, OutboxStore
from outbox_worker.core.policy import fair_share

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: SQLSTATE class 42 (undefined table or column, insufficient
# privilege) and 3F000 (the schema does not exist). Connection errors and timeouts stay retryable.
_PERMANENT = (asyncpg.SyntaxOrAccessError, asyncpg.InvalidSchemaNameError)


@dataclass(slots=True)
class Lease:
    epoch: int
    usable_until: float  # time.monotonic()
    busy: bool = False  # checked out by a loop
    releasing: bool = False  # will be released once checked in
    paused_until: float = 0.0  # monotonic; set by a configuration error
    dirty: bool = True  # rows may have arrived since this partition was last claimed
    backlog: bool = False  # its last claim was cut short: it holds more rows right now


class LeaseManager:
    """The leases of one worker (see the module docstring). The relay loops call :meth:`checkout`,
    :meth:`checkin`, :meth:`still_usable`, :meth:`pause` and :meth:`wait_for_work`; the worker runs
    :meth:`run` (the lease tick: heartbeat, renew, converge to the fair share, release) as a side task
    and :meth:`release_all` at stop."""

    def __init__(self, store: OutboxStore, config: LeaseConfig, partitions: int, metrics: Metrics) -> None:
        self._store = store
        self._c = config
        self.partitions = partitions
        self._metrics = metrics
        self.leases: dict[int, Lease] = {}
        self.live_workers: list[str] = []
        self.target = 0
        self._changed = asyncio.Event()
        self._tick_now = asyncio.Event()  # shares changed: run the lease tick without waiting
        self._rotation = 0
        self.last_error = ""
        # time.monotonic() of the first lease tick that failed since the last one that succeeded; 0.0
        # while ticks succeed. The tick is the worker's steady database round trip (heartbeat, renew),
        # so this is how long the database has not answered (the worker reports it, Worker.report).
        self.failing_since = 0.0
        # Loops with nothing to claim, parked in wait_for_work (oldest first); woken one at a time.
        self._idle_loops: collections.deque[asyncio.Future[bool]] = collections.deque()
        # Runs before partitions are released: writes the marks of acked rows still waiting for a
        # claim to carry them (AckedRows.flush), so the next owner does not publish them again.
        self.before_release: Callable[[], Awaitable[None]] | None = None
        # outbox_partitions_owned is read at each scrape: a lease counts while it is usable, so the
        # gauge drops when leases lapse (renewals failing past the TTL), are lost or released (also
        # at stop), not only at the end of a lease tick that succeeded.
        metrics.partitions.set_function(self.usable_count)

    def usable_count(self) -> int:
        """Partitions whose lease this worker may still publish for (not lost, released or lapsed)."""
        now = time.monotonic()
        return sum(1 for lease in self.leases.values() if lease.usable_until > now)

    # --- for the relay loops ------------------------------------------------------------------------
    @property
    def owned(self) -> list[int]:
        return sorted(self.leases)

    def _free(self) -> list[int]:
        now = time.monotonic()
        return [
            p
            for p, lease in sorted(self.leases.items())
            if not lease.busy and not lease.releasing and lease.paused_until <= now and lease.usable_until > now
        ]

    def checkout(self, loops: int) -> dict[int, int]:
        """Take partitions for one loop to claim: {partition: epoch}.

        - Backlog (a partition's last claim was cut short by its share): a fair slice of the free
          partitions, backlog and dirty ones first, so the loops drain the backlog side by side.
        - No backlog, some dirty (woken by a NOTIFY, or newly acquired): every dirty free partition,
          so one claim serves a wake-up however many loops there are (the others stay parked).
        - Neither (the poll): a fair slice, rotating, so a row a wake-up missed is found within a
          few polls.

        Partitions are clean once checked out: the claim that follows sees every row committed
        before the wake-up.
        """
        free = self._free()
        if not free:
            return {}
        leases = self.leases
        if any(leases[p].dirty for p in free) and not any(leases[p].backlog for p in free):
            chosen = [p for p in free if leases[p].dirty]
        else:
            active = sum(1 for lease in leases.values() if not lease.releasing)
            share = max(1, -(-active // loops))
            start = self._rotation % len(free)
            self._rotation += 1
            rotated = free[start:] + free[:start]
            chosen = sorted(rotated, key=lambda p: (not leases[p].backlog, not leases[p].dirty))[:share]
        for p in chosen:
            leases[p].busy = True
            leases[p].dirty = False
            leases[p].backlog = False
        if any(leases[p].dirty for p in free if not leases[p].busy):  # a backlog slice: wake the next loop
            self._wake_one()
        return {p: leases[p].epoch for p in chosen}

    def mark_dirty(self) -> None:
        """Rows may have arrived in every partition (a NOTIFY): each must be claimed once more.
        Wakes one idle loop; a busy loop finds the dirty partitions when it checks in. When every
        partition is dirty already, the claim asked for by an earlier wake-up is still to come (a
        woken loop has not checked out yet, or a busy loop will at check-in): that claim sees this
        wake-up's rows too, so no other loop is woken (a burst of NOTIFYs costs one wake-up)."""
        fresh = False
        for lease in self.leases.values():
            if not lease.dirty:
                lease.dirty = True
                fresh = True
        if fresh:
            self._wake_one()

    def has_dirty(self) -> bool:
        """Whether a free partition still waits for the claim a wake-up asked for."""
        return any(self.leases[p].dirty for p in self._free())

    def checkin(self, parts: dict[int, int], more: AbstractSet[int] = frozenset()) -> None:
        """Return partitions after a batch; those in ``more`` may hold more due rows and are marked
        dirty, so a loop claims them next instead of sleeping (or claiming drained ones)."""
        for p, epoch in parts.items():
            lease = self.leases.get(p)
            if lease is not None and lease.epoch == epoch:
                lease.busy = False
                if lease.releasing:
                    self._tick_now.set()  # release it now, not at the next tick
                if p in more:
                    lease.dirty = True
                    lease.backlog = True
        self._notify()

    def still_usable(self, parts: dict[int, int], needed: float) -> dict[int, int]:
        """The subset of ``parts`` this worker may still publish for ``needed`` more seconds."""
        deadline = time.monotonic() + needed
        return {
            p: e
            for p, e in parts.items()
            if (lease := self.leases.get(p)) is not None and lease.epoch == e and lease.usable_until > deadline
        }

    def pause(self, partition: int, seconds: float) -> None:
        lease = self.leases.get(partition)
        if lease is not None:
            lease.paused_until = time.monotonic() + seconds

    # --- the lease loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Tick every renew interval, or every poll interval if that is shorter, until cancelled.
        Transient database errors are logged and retried; the leases simply become unusable if
        renewals keep failing. Errors no retry can fix (a dropped table, revoked privileges) end the
        task, and with it the worker.

        The poll interval bounds how long expired leases of a dead worker stay unclaimed: a tick is
        when this worker sees the dead one's heartbeat gone and takes its partitions, so takeover
        happens within lease TTL + one poll interval of the death, not TTL + one renew interval.
        """
        while True:
            try:
                self._tick_now.clear()
                await self.tick()
                self.last_error = ""
                self.failing_since = 0.0
            except asyncio.CancelledError:
                raise
            except DuplicateWorkerError as exc:
                # Another live process took this worker id's heartbeat (this one was frozen past it):
                # two processes must never share a lease identity. End the task, and the worker.
                self.last_error = str(exc)
                log.error("%s", exc)
                raise
            except _PERMANENT as exc:
                # The lease tables are gone or no longer accessible: no retry can fix that. End the
                # task; the worker's supervision stops it with a non-zero exit instead of idling.
                self.last_error = f"lease renewal cannot succeed: {type(exc).__name__}: {exc}"
                log.error("%s", self.last_error)
                raise
            except Exception as exc:
                self.last_error = f"lease renewal failed: {type(exc).__name__}"
                log.warning("%s", self.last_error)
                self.failing_since = self.failing_since or time.monotonic()
            await self._sleep_until_next_tick(min(self._c.renew_interval_seconds, self._c.poll_interval_seconds))

    async def _sleep_until_next_tick(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if shares changed meanwhile (:meth:`on_lease_notice`, or a
        partition to release was checked in)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: see wait_changed
                await self._tick_now.wait()

    def on_lease_notice(self, sender: str) -> None:
        """A lease announcement arrived (``sender`` is the announcing worker's instance token, ``""``
        after the LISTEN connection (re)connected): run the lease tick now. This worker's own
        announcements are ignored."""
        if sender != self._store.instance:
            self._tick_now.set()

    async def tick(self) -> None:
        c = self._c
        ttl = c.ttl_seconds
        sent = time.monotonic()
        self.live_workers = await self._store.heartbeat(ttl)
        self.target = fair_share(self.partitions, self.live_workers, self._store.owner)
        usable_until = sent + ttl - c.ack_timeout_seconds - LEASE_SAFETY_MARGIN_SECONDS
        # Renew what we hold; what did not renew is lost (taken over or expired).
        held = {p: lease.epoch for p, lease in self.leases.items()}
        renewed = await self._store.renew(Fence.of(held), ttl)
        for p in list(self.leases):
            if renewed.get(p) == self.leases[p].epoch:
                self.leases[p].usable_until = usable_until
            else:
                log.warning("lease on partition %d lost", p)
                self.leases[p].usable_until = 0.0
                if not self.leases[p].busy:
                    del self.leases[p]
                else:
                    self.leases[p].releasing = True
                self._metrics.handover("lost")
        # Drop lost leases whose loop has checked them in.
        for p in [p for p, lease in self.leases.items() if lease.usable_until == 0.0 and not lease.busy]:
            del self.leases[p]
        # Converge to the fair share.
        keep = [p for p, lease in self.leases.items() if not lease.releasing]
        if len(keep) > self.target:
            for p in sorted(keep)[self.target :]:
                self.leases[p].releasing = True
        elif len(keep) < self.target:
            got = await self._store.acquire(self.target - len(keep), ttl)
            for p, epoch in got.items():
                self.leases[p] = Lease(epoch, usable_until)
                self._metrics.handover("acquired")
            if got:
                log.info("acquired partitions %s (epochs %s)", sorted(got), [got[p] for p in sorted(got)])
                self._notify()
                self._wake_one()  # new leases are dirty: their rows wait for a claim
        await self._release_idle()

    async def _release_idle(self) -> None:
        idle = {
            p: lease.epoch
            for p, lease in self.leases.items()
            if lease.releasing and not lease.busy and lease.usable_until > 0.0
        }
        if not idle:
            return
        if self.before_release is not None:
            await self.before_release()
        for p in idle:
            self.leases.pop(p, None)
        released = await self._store.release(Fence.of(idle))
        if released:
            self._metrics.handover("released", len(released))
            log.info("released partitions %s", sorted(released))
            await self._store.announce_lease_change()

    async def release_all(self, timeout: float) -> None:
        """Stop handing out partitions, wait (bounded) for loops to check in, then release."""
        for lease in self.leases.values():
            lease.releasing = True
        deadline = time.monotonic() + timeout
        while any(lease.busy for lease in self.leases.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "partitions %s still busy at shutdown deadline",
                    sorted(p for p, lease in self.leases.items() if lease.busy),
                )
                break
            await self.wait_changed(remaining)
        await self._release_idle()

    async def wait_changed(self, timeout: float) -> None:
        """Wait until partitions are acquired or checked in, or ``timeout`` passes.

        ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11 a task cancelled while the
        event it waits for fires in the same moment has its cancel lost by ``wait_for`` (it returns
        the event's result instead); the lease task then ran on, and a worker's stop, which cancels
        it and waits for it, hung until the pod was killed."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_work(self, timeout: float) -> None:
        """Park a loop that has nothing to claim until it is woken (:meth:`mark_dirty`, new leases,
        or a backlog slice left for it), :meth:`wake_all`, or ``timeout`` passes (the poll).

        Loops are woken one at a time, and a loop that takes a slice of a backlog wakes the next:
        a NOTIFY costs one wake-up and one claim however many loops wait. No wake-up is lost: a
        loop checks for work and parks in the same step of the event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._idle_loops.append(future)
        # A timer, not asyncio.wait_for: that wraps the future and adds callbacks on every park.
        poll = loop.call_later(timeout, _poll_due, future)
        try:
            await future
        finally:
            poll.cancel()
            # Still parked unless _wake_one took it (it pops the future, then sets True). Not a bare
            # remove() under suppress(ValueError): that error's message is the future's repr,
            # ~50 µs, paid on every wake-up.
            if future.cancelled() or not future.done() or future.result() is not True:
                with contextlib.suppress(ValueError):
                    self._idle_loops.remove(future)

    def wake_all(self) -> None:
        """Wake every parked loop (shutdown)."""
        while self._idle_loops:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._idle_loops:
            future = self._idle_loops.popleft()
            if not future.done():
                future.set_result(True)
                return


def _poll_due(future: asyncio.Future[bool]) -> None:
    """The poll interval of a parked loop has passed (:meth:`LeaseManager.wait_for_work`)."""
    if not future.done():
        future.set_result(False)
