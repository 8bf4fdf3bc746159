"""How a worker hands its partitions to its loops (LeaseManager.checkout / checkin / wait_for_work).

What users rely on: a wake-up costs one claim however many loops are configured (low CPU at low
rates), while a backlog is split between the loops so they drain it side by side.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from outbox_common.config import LeaseConfig
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.store import OutboxStore
from outbox_worker.app.leases import Lease, LeaseManager

LOOPS = 4


def manager(partitions: int = 8) -> LeaseManager:
    # checkout/checkin never touch the database: no store is needed to exercise them
    leases = LeaseManager(cast(OutboxStore, None), LeaseConfig(), partitions, Metrics("orders"))
    for p in range(partitions):
        leases.leases[p] = Lease(epoch=1, usable_until=time.monotonic() + 60, dirty=False)
    return leases


def test_a_wake_up_is_claimed_by_one_loop_whatever_the_number_of_loops() -> None:
    leases = manager()
    leases.mark_dirty()  # a NOTIFY
    first = leases.checkout(LOOPS)
    assert sorted(first) == list(range(8))
    assert leases.checkout(LOOPS) == {}  # the other loops find nothing free: they wait
    leases.checkin(first)  # the claim found less than a full share everywhere
    assert not leases.has_dirty()


def test_a_backlog_is_split_between_the_loops_backlogged_partitions_first() -> None:
    leases = manager()
    leases.mark_dirty()
    everything = leases.checkout(LOOPS)
    leases.checkin(everything, more=frozenset({1, 4, 6}))  # these returned a full share
    slices = [leases.checkout(LOOPS) for _ in range(LOOPS)]
    assert [len(s) for s in slices] == [2, 2, 2, 2]  # 8 partitions over 4 loops
    taken = [p for s in slices for p in s]
    assert sorted(taken) == list(range(8))  # no partition checked out twice
    assert {1, 4, 6} <= set(slices[0]) | set(slices[1])  # the backlog goes first


def test_a_wake_up_during_a_backlog_still_splits_the_free_partitions() -> None:
    leases = manager()
    leases.mark_dirty()
    leases.checkin(leases.checkout(LOOPS), more=frozenset({0}))
    leases.mark_dirty()  # a NOTIFY while partition 0 still has rows
    first = leases.checkout(LOOPS)
    assert len(first) == 2  # a fair slice, not every dirty partition
    assert 0 in first


def test_the_poll_rotates_fair_slices_over_clean_partitions() -> None:
    """Nothing dirty (no wake-up came, or it was missed): each poll claims a slice, and the slices
    rotate, so a row a wake-up missed is found within a few polls."""
    leases = manager()
    seen: set[int] = set()
    for _ in range(8):
        parts = leases.checkout(LOOPS)
        assert len(parts) == 2
        seen |= set(parts)
        leases.checkin(parts)
    assert seen == set(range(8))


async def parked(leases: LeaseManager, n: int) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(leases.wait_for_work(30.0)) for _ in range(n)]
    await asyncio.sleep(0)  # every loop is parked now
    return tasks


async def test_a_wake_up_wakes_one_parked_loop() -> None:
    leases = manager()
    tasks = await parked(leases, LOOPS)
    leases.mark_dirty()
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 1  # the others stay parked: no claim finds nothing
    leases.wake_all()
    await asyncio.gather(*tasks)


async def test_a_loop_taking_a_backlog_slice_wakes_the_next_one() -> None:
    leases = manager()
    leases.mark_dirty()
    leases.checkin(leases.checkout(LOOPS), more=frozenset(range(8)))  # every partition has more
    tasks = await parked(leases, LOOPS)
    leases.checkout(LOOPS)  # a slice; six backlogged partitions are left
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 1
    leases.checkout(LOOPS)
    leases.checkout(LOOPS)
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 3
    leases.checkout(LOOPS)  # the last slice: nothing is left for a fourth loop to take
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 3
    leases.wake_all()
    await asyncio.gather(*tasks)


async def test_a_parked_loop_wakes_at_the_poll() -> None:
    leases = manager()
    await asyncio.wait_for(leases.wait_for_work(0.05), 5)  # raises if the poll never comes
    assert not leases._idle_loops  # a timed-out loop leaves no stale entry behind


async def test_a_burst_of_notifies_before_the_claim_wakes_one_loop() -> None:
    """NOTIFYs read together (the listener's moderation window, or several in one socket read)
    all ask for the claim the first one asked for: one loop wakes, the others stay parked."""
    leases = manager()
    tasks = await parked(leases, LOOPS)
    for _ in range(5):
        leases.mark_dirty()
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 1
    first = leases.checkout(LOOPS)  # the woken loop claims every partition
    assert sorted(first) == list(range(8))
    leases.mark_dirty()  # a NOTIFY during its batch: rows its claim may not have seen
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2  # one more loop (it finds the partitions busy)
    leases.checkin(first)
    assert leases.has_dirty()  # so the busy loop claims again at once, not at the poll
    leases.wake_all()
    await asyncio.gather(*tasks)


class _CountingDeque(collections.deque[asyncio.Future[bool]]):
    """A parked-loop queue that counts removals of futures it no longer holds."""

    failed_removes = 0

    def remove(self, value: asyncio.Future[bool]) -> None:
        if value not in self:
            self.failed_removes += 1
        super().remove(value)


async def test_a_woken_loop_leaves_the_parked_queue_without_a_failing_remove() -> None:
    """A loop woken by _wake_one (which already took its future off the queue) must not try to
    remove it again: deque.remove's ValueError formats the future's repr, ~50 µs, and it ran on
    every wake-up. A loop woken by the poll does remove its entry."""
    leases = manager()
    queue = _CountingDeque()
    leases._idle_loops = queue
    [task] = await parked(leases, 1)
    leases.mark_dirty()
    await asyncio.wait_for(task, 5)
    await asyncio.wait_for(leases.wait_for_work(0.01), 5)  # the poll
    assert not queue
    assert queue.failed_removes == 0


async def _cancel_lined_up_with_the_event(
    sleep: Coroutine[Any, Any, None], fire: Callable[[], None], steps: int
) -> bool:
    """Start ``sleep``, fire its event, let the event loop run ``steps`` steps, cancel it; whether
    the cancellation ended the sleep (True) or was lost (the sleep returned as if woken). A sleep
    that ended before the cancel came has nothing to lose (True)."""
    task = asyncio.create_task(sleep)
    await asyncio.sleep(0)  # waiting now
    fire()
    for _ in range(steps):
        await asyncio.sleep(0)
    if task.done():
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_a_cancelled_lease_wait_ends_however_the_cancel_lines_up_with_its_wake_up() -> None:
    """The worker's stop cancels the lease task, which sleeps until its next tick or until a tick
    is asked for, and waits for it to end. A cancel arriving in the same moment as that wake-up
    must still end it: Python 3.11's ``asyncio.wait_for`` returned the wake-up's result instead and
    lost the cancel, the task ran on, and the stop hung until the pod was killed. Every lining-up of
    the two within a few steps of the event loop is tried."""
    for steps in range(6):
        leases = manager()
        assert await _cancel_lined_up_with_the_event(
            leases._sleep_until_next_tick(10.0), leases._tick_now.set, steps
        ), f"the tick sleep lost a cancel {steps} steps after its wake-up"
        leases = manager()
        assert await _cancel_lined_up_with_the_event(leases.wait_changed(10.0), leases._notify, steps), (
            f"wait_changed lost a cancel {steps} steps after its wake-up"
        )
