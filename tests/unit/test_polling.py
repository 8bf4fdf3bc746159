"""The suite's polling helper is bounded even when the check itself hangs (nothing waits forever)."""

from __future__ import annotations

import asyncio
import time

import pytest

from support.polling import CHECK_SLACK_SECONDS, wait_for


async def test_a_check_that_never_returns_fails_at_the_deadline() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="waiting for the hung check") as failure:
        await wait_for(hangs, 1.0, "the hung check")
    assert time.monotonic() - started < 1.0 + CHECK_SLACK_SECONDS + 3  # bounded here, not by pytest's timeout
    assert "did not return" in str(failure.value.__cause__ or failure.value.__context__)


async def test_the_checks_own_timeout_error_is_not_taken_for_the_bound() -> None:
    async def raises() -> bool:
        raise TimeoutError("the check's own")

    with pytest.raises(TimeoutError, match="the check's own"):
        await wait_for(raises, 5.0, "a check that raises")


async def test_a_check_becoming_true_returns_its_value() -> None:
    calls = 0

    async def third_time() -> int:
        nonlocal calls
        calls += 1
        return calls if calls >= 3 else 0

    assert await wait_for(third_time, 5.0, interval=0.01) == 3
