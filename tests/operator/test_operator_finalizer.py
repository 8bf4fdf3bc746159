"""Deletion never waits for the operator: no finalizer is put on an OutboxPublisher (deletion has no
work for it; children go through their ownerReferences), so uninstalling the operator first leaves
nothing stuck in Terminating."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from kube_emulator import KubeEmulator
from opkit import NAMESPACE, kopf_in_process
from test_operator_kopf import example

from support.polling import wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]
API, KIND = "outbox.dev/v1alpha1", "OutboxPublisher"


def assert_no_finalizer(obj: dict[str, Any]) -> None:
    assert not obj["metadata"].get("finalizers"), obj["metadata"].get("finalizers")


async def test_deleting_with_the_operator_stopped_completes(emulator: KubeEmulator) -> None:
    url = base64.b64encode(b"postgresql://relay:pw@db:5432/shop").decode()
    await emulator.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "orders-db", "namespace": NAMESPACE},
            "data": {"url": url},
        }
    )
    await emulator.apply(example())
    async with kopf_in_process(resync_seconds=0.3):
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        # several resync passes (0.3 s apart) have run and none added a finalizer
        await asyncio.sleep(1.5)
        obj = emulator.get(API, KIND, NAMESPACE, "orders")
        assert obj is not None
        assert_no_finalizer(obj)
    # the operator is stopped (as after `helm uninstall`): deleting must still complete
    await emulator.delete(API, KIND, NAMESPACE, "orders")
    await wait_for(lambda: emulator.get(API, KIND, NAMESPACE, "orders") is None, 5)
    assert emulator.list("apps/v1", "Deployment", NAMESPACE) == []


async def test_a_finalizer_left_by_an_older_operator_is_removed(emulator: KubeEmulator) -> None:
    obj = example()
    obj["metadata"]["finalizers"] = ["outbox.dev/finalizer"]
    await emulator.apply(obj)
    async with kopf_in_process(resync_seconds=0.3):
        await wait_for(lambda: not emulator.get(API, KIND, NAMESPACE, "orders")["metadata"].get("finalizers"), 20)
        await asyncio.sleep(1.0)
        assert_no_finalizer(emulator.get(API, KIND, NAMESPACE, "orders"))
