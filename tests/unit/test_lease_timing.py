"""The lease timing rule (outbox_common.timing) against the lease manager's own arithmetic.

A worker renews its leases every renew interval (LeaseManager.run) and sets a renewed lease usable
until ``sent + ttl - ack_timeout - margin`` (LeaseManager.tick), ``sent`` taken before the renewal's
round trips. Driven here on a fake clock with a store whose every statement takes a fixed time:
every timing the rule admits keeps a lease usable without a gap from one renewal to the next, and
each timing the rule refuses (the audit's, which passed the CRD and the settings) has a gap after
every renewal, in which the worker publishes nothing.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import pytest

from outbox_common.config import LeaseConfig
from outbox_common.timing import Timing, renew_interval_seconds, timing_violation
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.store import Fence, OutboxStore
from outbox_worker.app import leases as leases_module
from outbox_worker.app.leases import LeaseManager

STATEMENT_SECONDS = 0.1  # each of the tick's statements: heartbeat, renew (a slow database)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowStore:
    """One worker alone: keeps every lease it holds; each statement advances the clock."""

    owner = "w1"
    instance = "i1"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def _statement(self) -> None:
        self.clock.now += STATEMENT_SECONDS

    async def heartbeat(self, ttl: float) -> list[str]:
        await self._statement()
        return [self.owner]

    async def renew(self, fence: Fence, ttl: float) -> dict[int, int]:
        if not fence.partitions:  # as OutboxStore.renew: no statement
            return {}
        await self._statement()
        return dict(zip(fence.partitions, fence.epochs, strict=True))

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        await self._statement()
        return dict.fromkeys(range(count), 1)

    async def release(self, fence: Fence) -> list[int]:
        return []

    async def announce_lease_change(self) -> None:
        return None


async def unusable_seconds(
    monkeypatch: pytest.MonkeyPatch, ttl: float, ack: float, renew: float, poll: float = 1.0, ticks: int = 20
) -> float:
    """Seconds, over ``ticks`` renewals after the first, in which the worker's one lease was not
    usable (LeaseManager.run's loop, on the fake clock)."""
    clock = Clock()
    monkeypatch.setattr(leases_module.time, "monotonic", clock)
    interval = renew_interval_seconds(ttl, renew)
    config = LeaseConfig(
        ttl_seconds=ttl, renew_interval_seconds=interval, poll_interval_seconds=poll, ack_timeout_seconds=ack
    )
    manager = LeaseManager(cast(OutboxStore, cast(Any, SlowStore(clock))), config, 1, Metrics("orders"))
    await manager.tick()  # acquires the partition
    usable_until = manager.leases[0].usable_until
    gaps = 0.0
    for _ in range(ticks):
        clock.now += min(interval, poll)  # run()'s sleep between ticks
        await manager.tick()
        gaps += max(0.0, clock.now - usable_until)  # renewed only now: unusable since usable_until
        usable_until = manager.leases[0].usable_until
    return gaps


def admitted(ttl: float, ack: float, renew: float) -> bool:
    return timing_violation(Timing(ttl, renew, ack, 0.2, 1.0, 3600), str) is None


GRID = [
    (ttl, ack, renew)
    for ttl, ack, renew in itertools.product(
        [1.5, 2, 2.5, 3, 4, 6, 9, 15], [0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5], [0, 0.25, 0.5, 1, 2, 3]
    )
    if admitted(ttl, ack, renew)
]


def test_the_grid_holds_timings_at_the_rules_boundary() -> None:
    assert (3, 1, 0) in GRID  # the test suites' timing: 3 - 1 - 1 = exactly 1 s to spare
    assert len(GRID) > 40


@pytest.mark.parametrize(("ttl", "ack", "renew"), GRID)
async def test_every_admitted_timing_keeps_a_lease_usable_between_renewals(
    monkeypatch: pytest.MonkeyPatch, ttl: float, ack: float, renew: float
) -> None:
    assert await unusable_seconds(monkeypatch, ttl, ack, renew) < 1e-9  # 0, up to the floats' rounding


@pytest.mark.parametrize(("ttl", "ack"), [(1, 0.5), (1.2, 0.6), (2, 1), (3, 1.5)])
async def test_the_audits_timings_are_refused_and_leave_a_gap_after_every_renewal(
    monkeypatch: pytest.MonkeyPatch, ttl: float, ack: float
) -> None:
    """They keep the older rule (ack timeout at most half the TTL) with the default renew interval."""
    assert not admitted(ttl, ack, 0)
    assert await unusable_seconds(monkeypatch, ttl, ack, 0) > 0.0
