"""The one polling helper of the test suite: wait, bounded, until something becomes true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_for(check: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.05) -> Any:
    """Call ``check`` (sync or async) every ``interval`` seconds until it returns something truthy, and
    return that value. An ``AssertionError`` raised by ``check`` counts as "not yet".

    Bounded: after ``timeout`` seconds it raises ``AssertionError`` naming ``what`` and the last
    value, chained to the last assertion ``check`` raised, if any.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_error: AssertionError | None = None
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
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
