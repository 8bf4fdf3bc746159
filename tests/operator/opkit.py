"""Helpers of the operator suite (imported by tests; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

NAMESPACE = "shop"


@contextlib.asynccontextmanager
async def kopf_in_process(namespaces: list[str] | None = None, resync_seconds: float = 1.0) -> AsyncIterator[None]:
    from outbox_operator.children import OperatorConfig
    from outbox_operator.handlers import Runtime, run_operator

    stop, ready = asyncio.Event(), asyncio.Event()
    runtime = Runtime(config=OperatorConfig(worker_image="outbox-relay:test"), resync_seconds=resync_seconds)
    task = asyncio.create_task(
        run_operator(runtime, namespaces=namespaces or [NAMESPACE], clusterwide=False, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), 20)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
