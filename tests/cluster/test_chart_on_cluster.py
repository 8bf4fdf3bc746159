"""``helm install`` of helm/outbox-operator on the real control plane, operator and workers as pods.

The operator runs as the chart's Deployment (through the process kubelet, with the token of the
chart's ServiceAccount), so every API call it makes is checked against the chart's RBAC by the
real authorizer: a missing permission fails these tests. Both scopes are installed, and both
uninstall orders (publishers first, chart first) must leave nothing stuck in Terminating.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clusterkit import KIND, ROOT, Kubectl, condition, kubectl_async
from controlplane import ControlPlane
from kubeapi import KubeApi
from node_agent import NodeAgent
from relaykit import insert_events, prepare_database, publisher, secret, stream_count

from support.polling import wait_for

pytestmark = pytest.mark.timeout(600)

CHART = ROOT / "helm" / "outbox-operator"


def image_entrypoint() -> list[str]:
    """The ENTRYPOINT of the project's Dockerfile: what runs when a container sets only ``args``."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            return list(json.loads(line.removeprefix("ENTRYPOINT ")))
    raise AssertionError("Dockerfile has no ENTRYPOINT")


@pytest.fixture
async def other_namespace(kubectl: Kubectl) -> AsyncIterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    await kubectl_async(kubectl, "create", "namespace", name)
    yield name
    await kubectl_async(kubectl, "delete", "namespace", name, "--wait=false", "--ignore-not-found")


async def operator_log(node: NodeAgent, namespace: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(node.log_dir.glob(f"{namespace}_*operator*.log")))


async def publisher_gone(api: KubeApi, namespace: str) -> bool:
    return await api.get(KIND, namespace, "orders") is None


async def run_release(
    *,
    helm: Kubectl,
    kubectl: Kubectl,
    api: KubeApi,
    control_plane: ControlPlane,
    tmp_path: Path,
    release_namespace: str,
    publisher_namespace: str,
    helm_values: list[str],
    pg_dsn: str,
    nats_url: str,
    chart_first: bool,
) -> None:
    """Install, relay events through a publisher, uninstall in the given order, check nothing is left."""
    namespaces = {release_namespace, publisher_namespace}
    release = f"outbox-{secrets.token_hex(3)}"
    async with NodeAgent(
        api, control_plane.ca_file, tmp_path / "pods", namespaces, entrypoint=image_entrypoint()
    ) as node:
        await kubectl_async(
            helm, "install", release, str(CHART), "-n", release_namespace, "--wait", "--timeout=180s", *helm_values
        )
        deployments = await api.list("Deployment", release_namespace)
        assert [d["status"].get("readyReplicas") for d in deployments] == [1]

        await prepare_database(pg_dsn)
        await api.create(secret("orders-db", pg_dsn), publisher_namespace)
        await api.create(publisher("orders", nats_url), publisher_namespace)

        async def ready() -> bool:
            obj = await api.get(KIND, publisher_namespace, "orders")
            return condition(obj, "Ready").get("status") == "True"

        try:
            await wait_for(ready, 180)
            committed = await insert_events(pg_dsn, 500, 20)

            async def stored() -> bool:
                return await stream_count(nats_url) == committed

            await wait_for(stored, 120)
        except AssertionError as exc:
            raise AssertionError(f"operator log:\n{(await operator_log(node, release_namespace))[-4000:]}") from exc
        log = await operator_log(node, release_namespace)
        # an RBAC denial of the chart's ServiceAccount (not, e.g., a 403 for a namespace being
        # deleted by another test, which a cluster-wide operator may also see)
        denied = re.findall(r'User \\?"system:serviceaccount:[^"\\]+\\?" cannot [^,]+', log)
        assert not denied, denied[:5]
        # the chart's liveness probe (/healthz on the named port `health`) answers once it starts
        operator_pod = next(p.name for p in node.running() if p.name.startswith(f"{release}-outbox-operator-"))
        await wait_for(lambda: node.liveness_passed.get(operator_pod), 60, what="the operator's liveness probe")
        assert not node.liveness_kills, node.liveness_kills

        uninstall = ("uninstall", release, "-n", release_namespace, "--wait", "--timeout=120s")
        delete = ("delete", "obp", "orders", "-n", publisher_namespace, "--wait=false")
        if chart_first:
            await kubectl_async(helm, *uninstall)
            await kubectl_async(kubectl, *delete)
        else:
            await kubectl_async(kubectl, *delete)
            await wait_for(lambda: publisher_gone(api, publisher_namespace), 60)
            await kubectl_async(helm, *uninstall)

        async def nothing_left() -> bool:
            left = []
            for ns in namespaces:
                for kind in ("OutboxPublisher", "Deployment", "ReplicaSet", "Pod"):
                    for obj in await api.list(kind, ns):
                        meta = obj["metadata"]
                        left.append(f"{kind} {ns}/{meta['name']} finalizers={meta.get('finalizers')}")
            assert not left, f"left behind (stuck in Terminating?): {left}"
            return True

        await wait_for(nothing_left, 120)
    bindings = [b["metadata"]["name"] for b in await api.list("ClusterRoleBinding")]
    assert not [b for b in bindings if b.startswith(release)], bindings


async def test_helm_install_cluster_wide_then_uninstall_publishers_first(
    crd: str,
    helm: Kubectl,
    kubectl: Kubectl,
    api: KubeApi,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    pg_dsn: str,
    nats_url: str,
) -> None:
    await run_release(
        helm=helm,
        kubectl=kubectl,
        api=api,
        control_plane=control_plane,
        tmp_path=tmp_path,
        release_namespace=namespace,
        publisher_namespace=namespace,
        helm_values=["--set", "operator.scope=cluster", "--set", "operator.logFormat=text"],
        pg_dsn=pg_dsn,
        nats_url=nats_url,
        chart_first=False,
    )


async def test_helm_install_namespaced_then_uninstall_publishers_first(
    crd: str,
    helm: Kubectl,
    kubectl: Kubectl,
    api: KubeApi,
    control_plane: ControlPlane,
    namespace: str,
    other_namespace: str,
    tmp_path: Path,
    pg_dsn: str,
    nats_url: str,
) -> None:
    """The operator in namespaced scope watches another namespace than its own, with Roles only."""
    await run_release(
        helm=helm,
        kubectl=kubectl,
        api=api,
        control_plane=control_plane,
        tmp_path=tmp_path,
        release_namespace=namespace,
        publisher_namespace=other_namespace,
        helm_values=namespaced_values(other_namespace),
        pg_dsn=pg_dsn,
        nats_url=nats_url,
        chart_first=False,
    )


def namespaced_values(watched: str) -> list[str]:
    return [
        "--set",
        "operator.scope=namespaced",
        "--set",
        f"operator.namespaces={{{watched}}}",
        "--set",
        "operator.logFormat=text",
    ]


async def test_helm_uninstall_before_the_publishers_leaves_nothing_terminating(
    crd: str,
    helm: Kubectl,
    kubectl: Kubectl,
    api: KubeApi,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    pg_dsn: str,
    nats_url: str,
) -> None:
    """Uninstalling the chart first, then deleting the publishers: no operator is left to remove a
    finalizer, so any finalizer would keep the publisher (and its namespace) in Terminating."""
    await run_release(
        helm=helm,
        kubectl=kubectl,
        api=api,
        control_plane=control_plane,
        tmp_path=tmp_path,
        release_namespace=namespace,
        publisher_namespace=namespace,
        helm_values=["--set", "operator.scope=cluster", "--set", "operator.logFormat=text"],
        pg_dsn=pg_dsn,
        nats_url=nats_url,
        chart_first=True,
    )
