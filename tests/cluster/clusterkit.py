"""Helpers of the cluster suite that tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "outboxpublisher.yaml"
OPERATOR_START_TIMEOUT_S = 30.0
OPERATOR_STOP_TIMEOUT_S = 30.0

# kubectl(*args, input=None, check=True) / helm(...): the genuine binary against the test control plane
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


API_VERSION, KIND = "outbox.dev/v1alpha1", "OutboxPublisher"


@contextlib.asynccontextmanager
async def operator_in_process(namespaces: list[str], resync_seconds: float = 1.0) -> AsyncIterator[None]:
    """The operator (kopf) in this event loop, watching ``namespaces``; credentials from $KUBECONFIG."""
    from outbox_operator.children import OperatorConfig
    from outbox_operator.handlers import Runtime, run_operator

    stop, ready = asyncio.Event(), asyncio.Event()
    runtime = Runtime(config=OperatorConfig(worker_image="outbox-relay:test"), resync_seconds=resync_seconds)
    task = asyncio.create_task(
        run_operator(runtime, namespaces=namespaces, clusterwide=False, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), OPERATOR_START_TIMEOUT_S)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, OPERATOR_STOP_TIMEOUT_S)


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


async def kubectl_async(
    kubectl: Kubectl, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl in a thread: tests that run kopf in this loop must not block it."""
    return await asyncio.to_thread(kubectl, *args, check=check, input=input)
