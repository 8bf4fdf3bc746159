"""The worker-side StatusSink against the API emulator: merge-patches its own entry, never raises."""

from __future__ import annotations

import asyncio

import crd_schema
import pytest
import yaml
from kube_emulator import KubeEmulator
from opkit import NAMESPACE

from outbox_common.config import StatusConfig, WorkerConfig
from outbox_common.report import WorkerReport
from outbox_common.settings import WorkerSettings
from outbox_worker.adapters.kube_status import KubeStatusSink, sink_for

pytestmark = pytest.mark.timeout(60)

API, KIND = "outbox.dev/v1alpha1", "OutboxPublisher"


async def make_publisher(emu: KubeEmulator) -> None:
    obj = yaml.safe_load((crd_schema.ROOT / "examples" / "outboxpublisher.yaml").read_text())
    obj["metadata"]["namespace"] = NAMESPACE
    await emu.apply(obj)


def report(pod: str, published: int) -> WorkerReport:
    return WorkerReport(pod=pod, partitions=[0, 1], published=published, reportTime="2026-01-01T00:00:00Z")


async def test_each_worker_patches_only_its_own_entry(emulator: KubeEmulator) -> None:
    await make_publisher(emulator)
    a = KubeStatusSink(NAMESPACE, "orders", min_interval=0)
    b = KubeStatusSink(NAMESPACE, "orders", min_interval=0)
    await a.write(report("orders-relay-a", 10))
    await b.write(report("orders-relay-b", 20))
    await a.write(report("orders-relay-a", 11))
    workers = emulator.get(API, KIND, NAMESPACE, "orders")["status"]["workers"]
    assert workers["orders-relay-a"]["published"] == 11
    assert workers["orders-relay-b"]["published"] == 20
    assert workers["orders-relay-a"]["partitions"] == [0, 1]
    patches = [r for r in emulator.writes() if r.path.endswith("/orders/status")]
    assert {r.content_type for r in patches} == {"application/merge-patch+json"}

    await a.close()  # a clean stop removes the pod's entry
    workers = emulator.get(API, KIND, NAMESPACE, "orders")["status"]["workers"]
    assert "orders-relay-a" not in workers
    assert "orders-relay-b" in workers


async def test_writes_are_rate_limited(emulator: KubeEmulator) -> None:
    await make_publisher(emulator)
    now = [100.0]
    sink = KubeStatusSink(NAMESPACE, "orders", min_interval=5, clock=lambda: now[0])
    await sink.write(report("p", 1))
    now[0] += 1
    await sink.write(report("p", 2))  # too soon: dropped
    assert (sink.written, sink.dropped) == (1, 1)
    now[0] += 5
    await sink.write(report("p", 3))
    assert sink.written == 2
    assert emulator.get(API, KIND, NAMESPACE, "orders")["status"]["workers"]["p"]["published"] == 3


async def test_failures_are_logged_and_dropped(emulator: KubeEmulator, caplog: pytest.LogCaptureFixture) -> None:
    sink = KubeStatusSink(NAMESPACE, "missing", min_interval=0)
    await sink.write(report("p", 1))  # 404: no such publisher
    assert sink.failed == 1

    def broken(path: str, body: dict) -> None:
        raise ConnectionError("api server down")

    sink = KubeStatusSink(NAMESPACE, "orders", min_interval=0, patcher=broken)
    await sink.write(report("p", 1))
    await sink.close()
    assert sink.failed == 2
    assert "status report to" in caplog.text


def test_sink_targets_the_publisher_named_by_the_operator() -> None:
    sink = sink_for(StatusConfig(namespace="shop", publisher="orders", interval_seconds=10))
    assert sink.path == "/apis/outbox.dev/v1alpha1/namespaces/shop/outboxpublishers/orders/status"
    assert sink.min_interval == 5
    assert sink.jitter == 2  # a fifth of the interval


def test_the_status_config_comes_from_the_environment_the_operator_renders() -> None:
    settings = WorkerSettings(
        database_url="postgresql://x/y", publisher="orders", kube_namespace="shop", report_interval_seconds=10
    )
    assert WorkerConfig.from_settings(settings).status == StatusConfig("shop", "orders", 10.0)


async def test_each_write_waits_its_jitter_first(emulator: KubeEmulator) -> None:
    """Workers started together spread their patches: each write waits jitter * U[0, 1) first."""
    await make_publisher(emulator)
    draws = iter([0.0, 0.9])
    sink = KubeStatusSink(NAMESPACE, "orders", min_interval=0, jitter=0.5, uniform=lambda: next(draws))
    loop = asyncio.get_running_loop()
    await sink.write(report("p", 1))
    started = loop.time()
    await sink.write(report("p", 2))
    second = loop.time() - started
    assert second >= 0.45  # drew 0.9 of 0.5 s (the first drew 0)
    assert sink.written == 2
