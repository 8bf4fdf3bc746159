"""AckedRows' bookkeeping without a database: what waits, what a claim must skip, what a failed
mark does. The statements themselves run against PostgreSQL in tests/integration/test_leases.py."""

from __future__ import annotations

from typing import cast

from outbox_worker.adapters.store import OutboxStore
from outbox_worker.app.marks import MARK_RETRIES, AckedRows


def acked_rows(limit: int = 10) -> tuple[AckedRows, list[int]]:
    lost: list[int] = []
    rows = AckedRows(cast(OutboxStore, None), delete=True, fenced_out=lost.append, linger=60.0, limit=limit)
    return rows, lost


async def test_rows_wait_until_a_claim_takes_them_and_are_skipped_until_it_is_answered() -> None:
    rows, lost = acked_rows()
    assert rows.take() is None  # nothing waits: the plain claim runs
    assert rows.add({0: 3, 1: 3}, [10, 11])
    assert rows.add({1: 3, 2: 4}, [12])
    ticket = rows.take()
    assert ticket is not None
    assert (ticket.leases, ticket.ids) == ({0: 3, 1: 3, 2: 4}, [10, 11, 12])
    assert rows.waiting == 0
    assert rows.add({0: 3}, [13])
    assert sorted(rows.excluded()) == [10, 11, 12, 13]  # in flight, and waiting
    rows.settle(ticket, 3)
    assert rows.excluded() == [13]
    assert lost == []


async def test_a_batch_is_refused_when_it_would_pass_the_limit_or_its_epoch_differs() -> None:
    rows, _ = acked_rows(limit=3)
    assert rows.add({0: 1}, [1, 2])
    assert not rows.add({1: 1}, [3, 4])  # 4 > 3: the loop marks this batch itself
    assert not rows.add({0: 2}, [5])  # partition 0 lost and taken again: another fence
    assert rows.add({1: 1}, [6])
    assert rows.excluded() == [1, 2, 6]


async def test_a_failed_mark_waits_again_and_is_given_up_after_its_retries() -> None:
    rows, lost = acked_rows()
    assert rows.add({0: 1}, [1, 2])
    for attempt in range(1, MARK_RETRIES + 1):
        ticket = rows.take()
        assert ticket is not None
        assert ticket.attempts == attempt
        rows.settle(ticket, None)  # the statement failed
        if attempt < MARK_RETRIES:
            assert rows.excluded() == [1, 2]
            assert lost == []
    assert rows.excluded() == []
    assert lost == [2]


async def test_rows_a_lost_lease_kept_from_the_mark_are_counted() -> None:
    rows, lost = acked_rows()
    assert rows.add({0: 1, 1: 1}, [1, 2, 3])
    ticket = rows.take()
    assert ticket is not None
    rows.settle(ticket, 1)
    assert lost == [2]
