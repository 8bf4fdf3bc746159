"""The one polling helper of the test suite: wait, bounded, until something becomes true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

CHECK_SLACK_SECONDS = 5.0  # how long past the deadline a running check may still finish


async def wait_for(check: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.05) -> Any:
    """Call ``check`` (sync or async) every ``interval`` seconds until it returns something truthy, and
    return that value. An ``AssertionError`` raised by ``check`` counts as "not yet".

    Bounded: after ``timeout`` seconds it raises ``AssertionError`` naming ``what`` and the last
    value, chained to the last assertion ``check`` raised, if any. An async ``check`` that does not
    return is cancelled ``CHECK_SLACK_SECONDS`` after the deadline (a slow check that ends in time
    to succeed still does), so a hung check fails the same way.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_error: AssertionError | None = None
        try:
            value = check()
            if inspect.isawaitable(value):
                bound = asyncio.timeout(max(deadline - time.monotonic(), 0.0) + CHECK_SLACK_SECONDS)
                try:
                    async with bound:
                        value = await value
                except TimeoutError:
                    if not bound.expired():
                        raise  # the check's own timeout, not this bound
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}: the check itself did not return"
                    ) from None
        except AssertionError as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})") from last_error
        await asyncio.sleep(interval)


async def seconds_until(
    check: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.05
) -> float:
    """:func:`wait_for`, returning how many seconds it took (for tests that measure a reaction time)."""
    started = time.monotonic()
    await wait_for(check, timeout, what, interval)
    return time.monotonic() - started
