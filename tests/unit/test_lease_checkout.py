"""How a worker hands its partitions to its loops (LeaseManager.checkout / checkin / wait_for_work).

What users rely on: a wake-up costs one claim however many loops are configured (low CPU at low
rates), while a backlog is split between the loops so they drain it side by side.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

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
