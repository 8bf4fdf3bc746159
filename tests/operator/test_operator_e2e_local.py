"""Local end-to-end (marker ``e2e_local``): API emulator + operator (kopf in-process) + a local
kubelet that runs the worker Deployment's pods as ``outboxctl worker`` processes, against the real
PostgreSQL and nats-server the test suite starts.

Apply an OutboxPublisher, write 20,000 events: each reaches the stream exactly once and in
per-aggregate order, and the status shows the totals, backlog 0 and Ready=True. Scale 1 -> 3: the
partitions rebalance over the three workers with no duplicate. Rotate the DSN Secret while events
are written: the workers roll onto it and nothing is lost, duplicated or reordered. Pause: the
workers drain and exit 0. Delete the OutboxPublisher: its children go.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from kube_emulator import KubeEmulator
from local_kubelet import LocalKubelet
from opkit import NAMESPACE, kopf_in_process

from outbox_devkit.producers import ProducerPlan, prepare, produce
from outbox_worker.adapters.history_io import verify
from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql
from support.polling import wait_for

pytestmark = [pytest.mark.e2e_local, pytest.mark.timeout(600)]

API, KIND = "outbox.dev/v1alpha1", "OutboxPublisher"
SQL = Sql.for_table("public", "outbox")
STREAM = "E2E"
PARTITIONS = 8


def publisher_cr(nats_url: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": KIND,
        "metadata": {"name": "orders", "namespace": NAMESPACE},
        "spec": {
            "partitions": PARTITIONS,
            "replicas": 1,
            "database": {"secretRef": {"name": "orders-db"}},
            "nats": {"servers": [nats_url]},
            "stream": {"name": STREAM, "mode": "create"},
            "subjectTemplate": "orders.{aggregate_type}.{event_type}",
            "publishing": {
                "ackTimeoutSeconds": 1,
                "pollIntervalSeconds": 0.2,
                "retry": {"initialBackoffSeconds": 0.05, "maxBackoffSeconds": 1},
            },
            "leases": {"ttlSeconds": 3},
            "reportIntervalSeconds": 1,
            "worker": {"shutdownGraceSeconds": 5, "logFormat": "text"},
        },
    }


async def stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    except Exception:
        return -1
    finally:
        await nc.close()


def database_secret(dsn: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "orders-db", "namespace": NAMESPACE},
        "data": {"url": base64.b64encode(dsn.encode()).decode()},
    }


def status(emu: KubeEmulator) -> dict[str, Any]:
    obj = emu.get(API, KIND, NAMESPACE, "orders")
    return (obj or {}).get("status") or {}


def condition(emu: KubeEmulator, type_: str) -> dict[str, Any]:
    for cond in status(emu).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return {}


async def test_e2e_local(emulator: KubeEmulator, pg_dsn: str, nats_url: str, tmp_path: Path) -> None:
    emulator.auto_ready_deployments = False  # the local kubelet reports real readiness
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, SQL, PARTITIONS)
        await prepare(conn, SQL)
    finally:
        await conn.close()
    await emulator.apply(database_secret(pg_dsn))
    kubeconfig = tmp_path / "kubeconfig"
    (tmp_path / "pods").mkdir()
    async with (
        kopf_in_process(resync_seconds=1.0),
        LocalKubelet(emulator, NAMESPACE, tmp_path / "pods", extra_env={"KUBECONFIG": str(kubeconfig)}) as kubelet,
    ):
        await emulator.apply(publisher_cr(nats_url))
        await wait_for(lambda: condition(emulator, "Ready").get("status") == "True", 60)

        # 20,000 events: each in the stream once, in per-aggregate order; status shows the totals
        plan = ProducerPlan(events=20_000, aggregates=500, producers=4, rollback_ratio=0.05, slow_tx_ratio=0.02)
        first = await produce(pg_dsn, SQL, plan)
        await wait_for(lambda: _equals(stream_count(nats_url), first.committed), 120)

        def drained() -> bool:
            totals = status(emulator).get("totals") or {}
            return (
                totals.get("backlog") == 0
                and totals.get("published", 0) >= first.committed
                and totals.get("workers") == 1
            )

        await wait_for(drained, 60)
        assert condition(emulator, "Ready")["status"] == "True"
        assert condition(emulator, "DatabaseReady")["status"] == "True"
        assert condition(emulator, "StreamReady")["status"] == "True"
        report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
        assert report.ok, report.to_dict()
        assert (report.published, report.duplicates, report.order_violations, report.lost) == (first.committed, 0, 0, 0)

        # scale 1 -> 3: partitions rebalance over three workers, nothing is duplicated
        await emulator.patch(API, KIND, NAMESPACE, "orders", {"spec": {"replicas": 3}})

        def rebalanced() -> bool:
            workers = status(emulator).get("workers") or {}
            owned = [set(w.get("partitions") or []) for w in workers.values()]
            live = {p.name for p in kubelet.running()}
            return (
                len(workers) == 3
                and set(workers) == live
                and all(owned)
                and sum(map(len, owned)) == PARTITIONS
                and set().union(*owned) == set(range(PARTITIONS))
            )

        await wait_for(rebalanced, 90)
        second = await produce(
            pg_dsn, SQL, ProducerPlan(events=3000, aggregates=500, producers=2, seed=11, rollback_ratio=0)
        )
        total = first.committed + second.committed
        await wait_for(lambda: _equals(stream_count(nats_url), total), 120)
        report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
        assert report.ok, report.to_dict()
        assert (report.published, report.duplicates, report.order_violations) == (total, 0, 0)
        assert kubelet.restarts == 0

        # rotate the DSN Secret under load: the workers roll onto it, nothing is lost or duplicated
        dep = emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")
        old_hash = dep["spec"]["template"]["metadata"]["annotations"]["outbox.dev/pod-template-hash"]
        load = asyncio.create_task(
            produce(
                pg_dsn,
                SQL,
                ProducerPlan(events=12_000, aggregates=300, producers=2, seed=13, rollback_ratio=0, rate_per_s=400),
            )
        )
        rotated = pg_dsn + ("&" if "?" in pg_dsn else "?") + "application_name=rotated"
        await emulator.apply(database_secret(rotated))

        def rolled() -> bool:
            pods = kubelet.running()
            return len(pods) == 3 and all(p.template_hash != old_hash and p.ready for p in pods)

        await wait_for(lambda: any(p.template_hash != old_hash for p in kubelet.running()), 60)
        assert not load.done(), "events must be written while the workers roll"
        await wait_for(rolled, 120)
        third = await load
        total += third.committed
        await wait_for(lambda: _equals(stream_count(nats_url), total), 120)
        report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
        assert report.ok, report.to_dict()
        assert (report.published, report.duplicates, report.order_violations, report.lost) == (total, 0, 0, 0)

        # pause: the workers drain and stop cleanly
        await emulator.patch(API, KIND, NAMESPACE, "orders", {"spec": {"paused": True}})
        await wait_for(lambda: not kubelet.running(), 60)
        assert set(kubelet.exit_codes.values()) == {0}, kubelet.exit_codes
        await wait_for(lambda: condition(emulator, "Ready").get("reason") == "Paused", 30)

        # delete: the children go with the publisher
        await emulator.delete(API, KIND, NAMESPACE, "orders")
        await wait_for(lambda: emulator.get(API, KIND, NAMESPACE, "orders") is None, 30)
        for api, kind in [
            ("apps/v1", "Deployment"),
            ("v1", "ServiceAccount"),
            ("v1", "Service"),
            ("rbac.authorization.k8s.io/v1", "Role"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ]:
            assert emulator.list(api, kind, NAMESPACE) == [], kind


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
