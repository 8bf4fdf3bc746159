"""kopf runs the operator in-process against the API emulator (marker ``operator``)."""

from __future__ import annotations

import asyncio
import base64
import re
from datetime import UTC, datetime
from typing import Any

import crd_schema
import pytest
import yaml
from kube_emulator import KubeEmulator
from opkit import NAMESPACE, kopf_in_process

from outbox_operator import handlers
from support.polling import wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

API = "outbox.dev/v1alpha1"
KIND = "OutboxPublisher"


def example(name: str = "outboxpublisher.yaml") -> dict[str, Any]:
    obj = yaml.safe_load((crd_schema.ROOT / "examples" / name).read_text())
    obj["metadata"]["namespace"] = NAMESPACE
    return obj


async def make_secret(emu: KubeEmulator, name: str, key: str = "url") -> None:
    value = base64.b64encode(b"postgresql://relay:pw@db:5432/shop").decode()
    await emu.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE}, "data": {key: value}}
    )


def publisher(emu: KubeEmulator, name: str = "orders") -> dict[str, Any]:
    obj = emu.get(API, KIND, NAMESPACE, name)
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    raise AssertionError(f"no {type_} condition in {obj.get('status')}")


async def add_worker_pod(emu: KubeEmulator, name: str, publisher_name: str = "orders") -> None:
    await emu.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "labels": {"outbox.dev/publisher": publisher_name, "app.kubernetes.io/component": "worker"},
            },
            "spec": {"containers": [{"name": "worker", "image": "x"}]},
        }
    )


def object_reads(requests: list[Any]) -> list[str]:
    """GETs of single objects (a list or a watch asks for a collection: not counted)."""
    return [r.path for r in requests if r.method == "GET" and re.search(r"/namespaces/[^/]+/[^/]+/[^/]+$", r.path)]


async def report(emu: KubeEmulator, pod: str, **fields: Any) -> None:
    entry = {
        "pod": pod,
        "partitions": [0, 1, 2, 3],
        "published": 100,
        "duplicates": 0,
        "failed": 0,
        "deadLetters": 0,
        "inFlight": 0,
        "backlog": 0,
        "oldestPendingSeconds": 0.0,
        "ratePerSecond": 10.0,
        "lastError": "",
        "configError": "",
        "reportTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **fields,
    }
    await emu.patch(API, KIND, NAMESPACE, "orders", {"status": {"workers": {pod: entry}}}, "status")


async def test_create_reconciles_children_status_and_is_idempotent(emulator: KubeEmulator) -> None:
    await make_secret(emulator, "orders-db")
    cr = example()
    cr["spec"]["reportIntervalSeconds"] = 60  # reports stay fresh for the whole test
    await emulator.apply(cr)
    async with kopf_in_process():
        dep = await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        assert dep["spec"]["replicas"] == 2
        assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["outboxctl", "worker"]
        for api, kind, name in [
            ("v1", "ServiceAccount", "orders-relay"),
            ("rbac.authorization.k8s.io/v1", "Role", "orders-relay"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding", "orders-relay"),
            ("v1", "Service", "orders-relay-metrics"),
            ("policy/v1", "PodDisruptionBudget", "orders-relay"),
        ]:
            child = await wait_for(lambda a=api, k=kind, n=name: emulator.get(a, k, NAMESPACE, n), 20)
            ref = child["metadata"]["ownerReferences"][0]
            assert ref["controller"] is True
            assert ref["uid"] == publisher(emulator)["metadata"]["uid"]

        await wait_for(lambda: condition(publisher(emulator), "Ready")["reason"] == "WaitingForReports", 20)
        status = publisher(emulator)["status"]
        assert status["observedGeneration"] == 1
        assert status["selector"] == "app.kubernetes.io/component=worker,outbox.dev/publisher=orders"
        assert status["readyReplicas"] == 2

        # two workers report; a third entry belongs to a pod that is gone and gets pruned
        for pod, owned in (("orders-relay-a", [0, 1, 2, 3]), ("orders-relay-b", [4, 5, 6, 7])):
            await add_worker_pod(emulator, pod)
            await report(emulator, pod, partitions=owned, backlog=40, oldestPendingSeconds=2.5)
        await report(emulator, "orders-relay-gone")
        await wait_for(lambda: condition(publisher(emulator), "Ready")["status"] == "True", 20)
        await wait_for(lambda: "orders-relay-gone" not in publisher(emulator)["status"]["workers"], 20)
        status = publisher(emulator)["status"]
        assert status["totals"]["backlog"] == 80
        assert status["totals"]["published"] == 200
        assert status["totals"]["workers"] == 2
        assert condition(publisher(emulator), "DatabaseReady")["status"] == "True"
        assert condition(publisher(emulator), "StreamReady")["status"] == "True"
        assert condition(publisher(emulator), "Lagging")["status"] == "False"
        ready_since = condition(publisher(emulator), "Ready")["lastTransitionTime"]
        # posted by the pass that set Ready, after its status: awaited before the quiet window below
        await wait_for(lambda: "Ready" in [e["reason"] for e in emulator.list("v1", "Event", NAMESPACE)], 20)

        # level-based and idempotent: several resync passes over an unchanged world write nothing,
        # and read nothing either (what they read comes from the watches)
        await asyncio.sleep(1.5)
        before, requests_before = len(emulator.writes()), len(emulator.requests)
        await asyncio.sleep(3.5)
        new_writes = [(w.method, w.path) for w in emulator.writes()[before:]]
        assert new_writes == []
        assert object_reads(emulator.requests[requests_before:]) == []
        assert condition(publisher(emulator), "Ready")["lastTransitionTime"] == ready_since


async def test_spec_change_rolls_the_template_and_scale_subresource(emulator: KubeEmulator) -> None:
    await make_secret(emulator, "orders-db")
    await emulator.apply(example())
    async with kopf_in_process():
        dep = await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        old_hash = dep["metadata"]["annotations"]["outbox.dev/pod-template-hash"]

        await emulator.patch(API, KIND, NAMESPACE, "orders", {"spec": {"publishing": {"batchSize": 250}}})

        def rolled() -> bool:
            dep = emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")
            return dep["metadata"]["annotations"]["outbox.dev/pod-template-hash"] != old_hash

        await wait_for(rolled, 20)
        env = {
            e["name"]: e.get("value")
            for e in emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")["spec"]["template"]["spec"][
                "containers"
            ][0]["env"]
        }
        assert env["OUTBOX_BATCH_SIZE"] == "250"
        await wait_for(lambda: publisher(emulator)["status"]["observedGeneration"] == 2, 20)

        # kubectl scale goes through the scale subresource; the Deployment follows, the PDB goes
        await emulator.patch(API, KIND, NAMESPACE, "orders", {"spec": {"replicas": 1}})
        await wait_for(
            lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")["spec"]["replicas"] == 1, 20
        )
        await wait_for(lambda: emulator.get("policy/v1", "PodDisruptionBudget", NAMESPACE, "orders-relay") is None, 20)

        # paused drains: the Deployment goes to 0 and Ready says why
        await emulator.patch(API, KIND, NAMESPACE, "orders", {"spec": {"paused": True}})
        await wait_for(
            lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")["spec"]["replicas"] == 0, 20
        )
        await wait_for(lambda: condition(publisher(emulator), "Ready")["reason"] == "Paused", 20)


async def test_invalid_spec_sets_condition_and_creates_nothing(emulator: KubeEmulator) -> None:
    await make_secret(emulator, "db")
    cr = yaml.safe_load((crd_schema.ROOT / "examples" / "invalid" / "unknown-placeholder.yaml").read_text())
    cr["metadata"]["namespace"] = NAMESPACE
    await emulator.apply(cr)
    async with kopf_in_process():

        def invalid() -> bool:
            cond = condition(publisher(emulator, "unknown-placeholder"), "Ready")
            return cond["status"] == "False" and cond["reason"] == "InvalidSpec"

        await wait_for(invalid, 20)
        message = condition(publisher(emulator, "unknown-placeholder"), "Ready")["message"]
        assert message.startswith("spec.subjectTemplate:")
        assert "{customer}" in message
        assert emulator.list("apps/v1", "Deployment", NAMESPACE) == []
        assert emulator.list("v1", "ServiceAccount", NAMESPACE) == []
        await wait_for(lambda: any(e["reason"] == "InvalidSpec" for e in emulator.list("v1", "Event", NAMESPACE)), 20)

        # fixing the spec heals it
        await emulator.patch(
            API, KIND, NAMESPACE, "unknown-placeholder", {"spec": {"subjectTemplate": "orders.{event_type}"}}
        )
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "unknown-placeholder-relay"), 20)


async def test_missing_secret_waits_and_recovers(emulator: KubeEmulator) -> None:
    await emulator.apply(example())
    async with kopf_in_process():

        def missing() -> bool:
            cond = condition(publisher(emulator), "Ready")
            return cond["reason"] == "SecretNotFound"

        await wait_for(missing, 20)
        assert "orders-db" in condition(publisher(emulator), "Ready")["message"]
        assert condition(publisher(emulator), "DatabaseReady")["reason"] == "SecretNotFound"
        assert emulator.list("apps/v1", "Deployment", NAMESPACE) == []
        await make_secret(emulator, "orders-db")
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)


async def test_delete_removes_children(emulator: KubeEmulator) -> None:
    await make_secret(emulator, "orders-db")
    await emulator.apply(example())
    async with kopf_in_process():
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        await emulator.delete(API, KIND, NAMESPACE, "orders")
        await wait_for(lambda: emulator.get(API, KIND, NAMESPACE, "orders") is None, 20)
        assert emulator.list("apps/v1", "Deployment", NAMESPACE) == []
        assert emulator.list("v1", "Service", NAMESPACE) == []


async def test_delete_while_a_resync_pass_is_in_flight(emulator: KubeEmulator) -> None:
    """A publisher deleted while a reconcile pass is writing its status goes once that pass ends.
    kopf holds the finalizer until the timer has stopped and, by default, looks again only 60 s
    later. (Passes read nothing from the API, so the pass is held at its status write.)"""
    await make_secret(emulator, "orders-db")
    await emulator.apply(example())
    async with kopf_in_process(resync_seconds=0.5):
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        await wait_for(lambda: condition(publisher(emulator), "Ready")["reason"] == "WaitingForReports", 20)
        emulator.delays.append(("PATCH", "/status", 2.0))  # each status write now takes 2 s
        seen = len(emulator.requests)
        await report(emulator, "orders-relay-gone")  # a report: the pass prunes it with a status write
        await wait_for(lambda: any(r.method == "PATCH" and "/status" in r.path for r in emulator.requests[seen:]), 20)
        await emulator.delete(API, KIND, NAMESPACE, "orders")  # while that pass waits for the Secret
        await wait_for(lambda: emulator.get(API, KIND, NAMESPACE, "orders") is None, timeout=15)


async def test_secrets_are_listed_in_pages_and_a_page_past_the_first_is_read(emulator: KubeEmulator) -> None:
    """The operator lists a namespace's (or a cluster's) Secrets in pages of LIST_CHUNK_SIZE, never
    all in one response, and still sees a Secret on a later page: 1,200 other Secrets sort before
    the publisher's. Helm's release Secrets and service-account tokens are left out by the API
    server (the field selector on every list and watch of Secrets)."""
    for i in range(1200):
        await emulator.apply(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"aaa-{i:04d}", "namespace": NAMESPACE}}
        )
    await make_secret(emulator, "orders-db")  # sorts after every aaa-…: on the third page
    await emulator.apply(example())
    async with kopf_in_process():
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 30)
    reads = [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/secrets")]
    lists = [r.query for r in reads if r.query.get("watch") != "true"]
    assert len(lists) >= 3, lists  # three pages at least
    assert {q.get("limit") for q in lists} == {str(handlers.LIST_CHUNK_SIZE)}
    assert {r.query.get("fieldSelector") for r in reads} == {
        "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token"
    }


async def test_a_helm_release_secret_is_never_read(emulator: KubeEmulator) -> None:
    """A Secret of type helm.sh/release.v1 is not one the operator sees, even named as the
    publisher's: SecretNotFound, until a Secret it reads takes the name."""
    value = base64.b64encode(b"postgresql://relay:pw@db:5432/shop").decode()
    helm = {"name": "orders-db", "namespace": NAMESPACE}
    await emulator.apply(
        {"apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1", "metadata": helm, "data": {"url": value}}
    )
    await emulator.apply(example())
    async with kopf_in_process():
        await wait_for(lambda: condition(publisher(emulator), "Ready")["reason"] == "SecretNotFound", 20)
        await emulator.delete("v1", "Secret", NAMESPACE, "orders-db")
        await make_secret(emulator, "orders-db")
        await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
