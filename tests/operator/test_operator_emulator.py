"""The API emulator behaves like the API server where the operator and kopf rely on it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import crd_schema
import pytest
import yaml
from kube_emulator import KubeEmulator
from opkit import NAMESPACE

pytestmark = pytest.mark.timeout(60)

CRS = f"/apis/outbox.dev/v1alpha1/namespaces/{NAMESPACE}/outboxpublishers"
MERGE = {"Content-Type": "application/merge-patch+json"}


def example() -> dict[str, Any]:
    obj = yaml.safe_load((crd_schema.ROOT / "examples" / "outboxpublisher.yaml").read_text())
    obj["metadata"]["namespace"] = NAMESPACE
    return obj


async def call(
    emu: KubeEmulator, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            emu.url + path,
            data=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as response,
    ):
        return response.status, await response.json()


async def test_crud_status_codes_and_metadata(emulator: KubeEmulator) -> None:
    code, created = await call(emulator, "POST", CRS, example())
    assert code == 201
    meta = created["metadata"]
    assert meta["uid"]
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    assert created["spec"]["stream"]["mode"] == "create"
    assert created["spec"]["leases"]["ttlSeconds"] == 15  # defaulted
    assert (await call(emulator, "POST", CRS, example()))[0] == 409
    assert (await call(emulator, "GET", CRS + "/nope"))[0] == 404

    # status writes do not bump generation; spec writes do; stale PUTs conflict
    code, after = await call(emulator, "PATCH", CRS + "/orders/status", {"status": {"replicas": 2}}, MERGE)
    assert code == 200
    assert after["metadata"]["generation"] == 1
    code, after = await call(emulator, "PATCH", CRS + "/orders", {"spec": {"replicas": 3}, "status": {"x": 1}}, MERGE)
    assert after["metadata"]["generation"] == 2
    assert after["status"] == {"replicas": 2}  # the main resource ignores status
    stale = dict(created)
    assert (await call(emulator, "PUT", CRS + "/orders", stale))[0] == 409


async def test_schema_and_cel_rejections_are_422(emulator: KubeEmulator) -> None:
    bad = example()
    bad["spec"]["replicas"] = 99
    code, body = await call(emulator, "POST", CRS, bad)
    assert code == 422
    assert "spec.replicas must not exceed spec.partitions" in body["message"]
    await call(emulator, "POST", CRS, example())
    code, body = await call(emulator, "PATCH", CRS + "/orders", {"spec": {"partitions": 16}}, MERGE)
    assert code == 422
    assert "immutable" in body["message"]


async def test_scale_subresource(emulator: KubeEmulator) -> None:
    await call(emulator, "POST", CRS, example())
    await call(emulator, "PATCH", CRS + "/orders/status", {"status": {"replicas": 2, "selector": "a=b"}}, MERGE)
    code, scale = await call(emulator, "GET", CRS + "/orders/scale")
    assert code == 200
    assert (scale["kind"], scale["spec"]["replicas"], scale["status"]["selector"]) == ("Scale", 2, "a=b")
    code, scale = await call(emulator, "PATCH", CRS + "/orders/scale", {"spec": {"replicas": 4}}, MERGE)
    assert scale["spec"]["replicas"] == 4
    assert emulator.get("outbox.dev/v1alpha1", "OutboxPublisher", NAMESPACE, "orders")["spec"]["replicas"] == 4
    code, _ = await call(emulator, "PATCH", CRS + "/orders/scale", {"spec": {"replicas": 9}}, MERGE)
    assert code == 422  # more than partitions


async def test_label_selectors_and_watch_timeout(emulator: KubeEmulator) -> None:
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"})):
        await emulator.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            }
        )
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    for selector, names in (
        ("app=x", ["a"]),
        ("app!=x", ["b"]),
        ("app in (x,y)", ["a", "b"]),
        ("tier", ["a"]),
        ("!tier", ["b"]),
    ):
        _, listing = await call(emulator, "GET", f"{path}?labelSelector={selector}")
        assert [i["metadata"]["name"] for i in listing["items"]] == names, selector
    _, listing = await call(emulator, "GET", path)
    version = listing["metadata"]["resourceVersion"]

    started = time.monotonic()
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        watch = session.get(
            f"{emulator.url}{path}?watch=true&resourceVersion={version}&timeoutSeconds=1&labelSelector=app=x"
        )
        async with watch as response:
            await asyncio.sleep(0.1)
            await emulator.patch("v1", "ConfigMap", NAMESPACE, "a", {"data": {"k": "v"}})
            await emulator.patch("v1", "ConfigMap", NAMESPACE, "b", {"data": {"k": "v"}})
            async for line in response.content:
                events.append(json.loads(line))
    assert 0.9 < time.monotonic() - started < 5  # the server ended the watch at its timeout
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "a")]


async def test_finalizers_hold_deletion_and_owners_collect_dependents(emulator: KubeEmulator) -> None:
    _, owner = await call(
        emulator,
        "POST",
        CRS,
        {**example(), "metadata": {"name": "orders", "namespace": NAMESPACE, "finalizers": ["x/y"]}},
    )
    await emulator.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "namespace": NAMESPACE,
                "ownerReferences": [
                    {
                        "uid": owner["metadata"]["uid"],
                        "controller": True,
                        "kind": "OutboxPublisher",
                        "apiVersion": "outbox.dev/v1alpha1",
                        "name": "orders",
                    }
                ],
            },
        }
    )
    code, held = await call(emulator, "DELETE", CRS + "/orders")
    assert code == 200
    assert held["metadata"]["deletionTimestamp"]
    assert emulator.get("v1", "ConfigMap", NAMESPACE, "child") is not None
    await call(emulator, "PATCH", CRS + "/orders", {"metadata": {"finalizers": None}}, MERGE)
    assert emulator.get("outbox.dev/v1alpha1", "OutboxPublisher", NAMESPACE, "orders") is None
    assert emulator.get("v1", "ConfigMap", NAMESPACE, "child") is None
