"""A pass acts on the newest spec once it holds its publisher's lock, not on the body it was
handed before it waited (``handlers.reconcile_body``)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import pytest

from outbox_operator import handlers
from outbox_operator.children import OperatorConfig
from outbox_operator.kube import Kube
from outbox_operator.reconcile import Plan
from outbox_operator.state import ClusterState

UID = "0b3c6a52-0000-4000-8000-000000000001"


def publisher(generation: int, batch_size: int) -> dict[str, Any]:
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxPublisher",
        "metadata": {"name": "orders", "namespace": "shop", "uid": UID, "generation": generation},
        "spec": {"publishing": {"batchSize": batch_size}},
    }


class Passes:
    """Stands in for ``kube.reconcile`` (the API side of a pass): records the generation each pass
    acted on."""

    def __init__(self) -> None:
        self.generations: list[int] = []

    async def __call__(self, kube: Kube, state: ClusterState, body: Mapping[str, Any], config: OperatorConfig) -> Plan:
        self.generations.append(int(body["metadata"]["generation"]))
        return Plan()


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    recorder = Passes()
    monkeypatch.setattr(handlers, "reconcile_once", recorder)
    assert handlers.reconcile_once is recorder
    return recorder


def runtime_knowing(body: dict[str, Any]) -> handlers.Runtime:
    runtime = handlers.Runtime(config=OperatorConfig(worker_image="relay:test"), kube=Kube.__new__(Kube))
    runtime.known[UID] = copy.deepcopy(body)
    return runtime


@pytest.mark.parametrize("self_started", [True, False], ids=["resync", "kopf"])
async def test_a_pass_handed_an_older_spec_acts_on_the_newest_one(passes: Passes, self_started: bool) -> None:
    """The resync reads every publisher, then starts its passes; a spec change handled in between
    by kopf's pass (which took the lock first) was undone by the resync's pass with the older spec:
    the Deployment's template put back, a rollout back and forth."""
    runtime = runtime_knowing(publisher(1, 100))
    old = copy.deepcopy(runtime.known[UID])
    lock = runtime.locks.setdefault(UID, asyncio.Lock())
    await lock.acquire()  # a pass of generation 2 is running
    waiting = asyncio.create_task(handlers.reconcile_body(runtime, old, 0, self_started=self_started))
    await asyncio.sleep(0)
    runtime.known[UID] = publisher(2, 500)  # the watch delivered the change meanwhile
    lock.release()
    await asyncio.wait_for(waiting, 5)
    assert passes.generations == [2]


async def test_kopfs_body_is_kept_when_the_watch_has_seen_no_newer_spec(passes: Passes) -> None:
    """kopf hands its change handler the body of the event it processes; the watch-fed body may
    lag it (the same event not yet remembered): the newer of the two is acted on."""
    runtime = runtime_knowing(publisher(1, 100))
    await handlers.reconcile_body(runtime, publisher(2, 500), 0, self_started=False)
    assert passes.generations == [2]
