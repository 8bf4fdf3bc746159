"""The operator against the real API server: RBAC, garbage collection, and worker pods that relay.

The operator runs in-process (kopf, as in tests/operator) with the admin kubeconfig; its workers
run as pods that the real kube-controller-manager creates (Deployment -> ReplicaSet -> Pod) and
the process kubelet (:mod:`node_agent`) runs, with their own ServiceAccount tokens, against the
real PostgreSQL and nats-server of tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterkit import KIND, ROOT, Kubectl, condition, kubectl_async, operator_in_process
from controlplane import ControlPlane, kubeconfig_text
from kubeapi import KubeApi
from node_agent import NodeAgent
from relaykit import PARTITIONS, SQL, STREAM, insert_events, prepare_database, publisher, secret, stream_count

from outbox_worker.adapters.history_io import verify
from support.polling import wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def operator_env(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process operator reads $KUBECONFIG: the admin's."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))


@pytest.fixture
async def node(api: KubeApi, control_plane: ControlPlane, namespace: str, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    async with NodeAgent(api, control_plane.ca_file, tmp_path / "pods", {namespace}) as agent:
        yield agent


# --- without pods --------------------------------------------------------------------------------


async def test_operator_flags_a_spec_the_schema_cannot_check(
    crd: str, api: KubeApi, namespace: str, operator_env: None
) -> None:
    path = ROOT / "examples" / "invalid" / "unknown-placeholder.yaml"
    kind, _, documented = path.read_text().splitlines()[0].lstrip("# ").partition(": ")
    assert kind == "operator-rejects"
    obj = yaml.safe_load(path.read_text())
    name = obj["metadata"]["name"]
    async with operator_in_process([namespace]):
        await api.create(obj, namespace)

        async def invalid() -> dict[str, Any]:
            ready = condition(await api.get(KIND, namespace, name), "Ready")
            return ready if ready.get("reason") == "InvalidSpec" else {}

        ready = await wait_for(invalid, 60)
    assert ready["status"] == "False"
    assert documented in ready["message"]
    assert await api.list("Deployment", namespace) == [], "no workers for an invalid spec"


async def test_a_token_the_api_server_refuses_ends_the_operator_in_one_line(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A wrong or expired token: the real API server answers 401. kopf ended with "Ran out of valid
    credentials" under 160 lines of tracebacks (exit 1). Now: exit 3 at once, one line that says
    the credentials were refused, never the token."""
    token = "not-a-token-the-server-knows-" + "x" * 16
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(control_plane.server, control_plane.ca_file, token))
    started = asyncio.get_running_loop().time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_cli.main",
        "operator",
        "--all-namespaces",
        "--startup-timeout-seconds",
        "30",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 3, text
    assert [line for line in text.splitlines() if line.strip()] == [
        f"error: the Kubernetes API server at {control_plane.server} refused the operator's credentials (HTTP 401): "
        "the token or client certificate of the kubeconfig (KUBECONFIG), or in a pod the service account's "
        "token, is wrong or has expired"
    ]
    assert token not in text
    assert asyncio.get_running_loop().time() - started < 30, "refused at once, not after the start-up timeout"


async def test_the_api_server_leaves_helm_release_secrets_out_of_the_operators_watch(
    crd: str, api: KubeApi, namespace: str, operator_env: None
) -> None:
    """The operator asks the API server for Secrets without Helm's releases and service-account
    tokens (a field selector on type): the real server must accept it and filter by it. A release
    Secret named as the publisher's database Secret is not seen (SecretNotFound); an Opaque one of
    the same name, created once it is gone, is."""
    helm = secret("orders-db", "postgresql://relay:pw@db:5432/shop") | {"type": "helm.sh/release.v1"}
    await api.create(helm, namespace)
    async with operator_in_process([namespace]):
        await api.create(publisher("orders", "nats://127.0.0.1:4222"), namespace)

        async def not_found() -> bool:
            ready = condition(await api.get(KIND, namespace, "orders") or {}, "Ready")
            return ready.get("reason") == "SecretNotFound"

        await wait_for(not_found, 60, "SecretNotFound")
        await api.delete("Secret", namespace, "orders-db")
        await api.create(secret("orders-db", "postgresql://relay:pw@db:5432/shop"), namespace)
        await wait_for(lambda: api.get("Deployment", namespace, "orders-relay"), 60, "the worker Deployment")


async def test_worker_token_may_patch_only_its_own_publisher_status(
    crd: str, api: KubeApi, control_plane: ControlPlane, namespace: str, operator_env: None, kubectl: Kubectl
) -> None:
    for name in ("orders", "billing"):
        await api.create(secret(f"{name}-db", "postgresql://unused@127.0.0.1:1/db"), namespace)
    async with operator_in_process([namespace]):
        await api.create(publisher("orders", "nats://127.0.0.1:4222"), namespace)
        await api.create(publisher("billing", "nats://127.0.0.1:4222"), namespace)
        await wait_for(lambda: api.get("RoleBinding", namespace, "orders-relay"), 60)
    status, body = await api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/orders-relay/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
    )
    assert status == 201, body
    token = body["status"]["token"]
    async with KubeApi(control_plane.server, token, control_plane.ca_file) as worker:
        own = {"status": {"workers": {"orders-relay-x": None}}}
        assert (await worker.merge_patch(KIND, namespace, "orders", own, "status"))[0] == 200
        assert (await worker.merge_patch(KIND, namespace, "billing", own, "status"))[0] == 403
        assert (await worker.merge_patch(KIND, namespace, "orders", {"spec": {"replicas": 2}}))[0] == 403
        assert (await worker.request("GET", f"/api/v1/namespaces/{namespace}/secrets"))[0] == 403
        assert (await worker.request("GET", f"/api/v1/namespaces/{namespace}/secrets/orders-db"))[0] == 403
        patch = {"spec": {"replicas": 5}}
        assert (await worker.merge_patch("Deployment", namespace, "orders-relay", patch))[0] == 403
    can_i = kubectl("auth", "can-i", "patch", "outboxpublishers/status", "-n", namespace, "--token", token, check=False)
    assert can_i.stdout.strip() == "no", "without a resource name it is not allowed"  # resourceNames scoped
    can_i = kubectl(
        "auth",
        "can-i",
        "patch",
        "outboxpublishers/orders",
        "--subresource=status",
        "-n",
        namespace,
        "--token",
        token,
        check=False,
    )
    assert can_i.stdout.strip() == "yes"


# --- with pods -----------------------------------------------------------------------------------


async def test_publisher_relays_through_the_real_controllers(
    crd: str,
    api: KubeApi,
    namespace: str,
    node: NodeAgent,
    operator_env: None,
    kubectl: Kubectl,
    pg_dsn: str,
    nats_url: str,
) -> None:
    await prepare_database(pg_dsn)
    await api.create(secret("orders-db", pg_dsn), namespace)
    async with operator_in_process([namespace]):
        await api.create(publisher("orders", nats_url), namespace)

        async def ready() -> bool:
            return condition(await api.get(KIND, namespace, "orders"), "Ready").get("status") == "True"

        await wait_for(ready, 120)
        replica_sets = await api.list("ReplicaSet", namespace)
        assert [rs["metadata"]["ownerReferences"][0]["name"] for rs in replica_sets] == ["orders-relay"]
        pods = await api.list("Pod", namespace)
        assert len(pods) == 1
        assert pods[0]["spec"]["nodeName"] == node.name

        # events inserted while it runs: each in the stream once, in per-aggregate order
        committed = await insert_events(pg_dsn, 3000, 100)

        async def all_stored() -> bool:
            return await stream_count(nats_url) == committed

        await wait_for(all_stored, 120)

        async def drained() -> bool:
            totals = ((await api.get(KIND, namespace, "orders")) or {}).get("status", {}).get("totals") or {}
            return totals.get("backlog") == 0 and totals.get("published", 0) >= committed

        await wait_for(drained, 60)
        report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
        assert report.ok, report.to_dict()
        assert (report.published, report.duplicates, report.order_violations, report.lost) == (committed, 0, 0, 0)

        # kubectl shows live values through the printer columns, and describe the conditions and events
        header, line = (await kubectl_async(kubectl, "get", "obp", "orders", "-n", namespace)).stdout.splitlines()[:2]
        row = dict(zip(header.split(), line.split(), strict=True))
        assert row["NAME"] == "orders"
        assert row["READY"] == "1/1", row  # ready/desired workers
        assert row["STATUS"] == "Publishing", row  # the Ready reason
        assert row["BACKLOG"] == "0", row
        described = (await kubectl_async(kubectl, "describe", "obp", "orders", "-n", namespace)).stdout
        assert "Conditions:" in described
        assert "DatabaseReady" in described
        events = described.split("Events:", 1)[1]
        assert "<none>" not in events
        assert "Normal" in events
        assert "Ready" in events  # the operator's Event when the publisher became Ready

        # kubectl scale -> 3 worker pods, partitions spread over them
        await kubectl_async(kubectl, "scale", "obp", "orders", "-n", namespace, "--replicas", "3")

        async def three_workers() -> bool:
            obj = await api.get(KIND, namespace, "orders") or {}
            workers = (obj.get("status") or {}).get("workers") or {}
            owned = [set(w.get("partitions") or []) for w in workers.values()]
            return len(node.running()) == 3 and len(workers) == 3 and set().union(*owned) == set(range(PARTITIONS))

        await wait_for(three_workers, 120)
        deployment = await api.get("Deployment", namespace, "orders-relay") or {}
        assert deployment["spec"]["replicas"] == 3
        assert node.restarts == 0

        # paused: the workers drain and exit 0
        await api.merge_patch(KIND, namespace, "orders", {"spec": {"paused": True}})
        await wait_for(lambda: not node.pods, 90)  # every process stopped and its exit code recorded
        assert set(node.exit_codes.values()) == {0}, node.exit_codes

        # delete: garbage collection removes every child
        await kubectl_async(kubectl, "delete", "obp", "orders", "-n", namespace, "--wait=true", "--timeout=60s")

        async def no_children() -> bool:
            for kind in ("Deployment", "ReplicaSet", "Pod", "Role", "RoleBinding", "Service"):
                if await api.list(kind, namespace):
                    return False
            accounts = [a["metadata"]["name"] for a in await api.list("ServiceAccount", namespace)]
            return accounts == ["default"]

        await wait_for(no_children, 90)
    assert not node.errors, node.errors


async def test_ready_stays_false_while_the_new_spec_does_not_roll_out(
    crd: str, api: KubeApi, namespace: str, node: NodeAgent, operator_env: None, pg_dsn: str, nats_url: str
) -> None:
    """A spec change whose new worker pod never becomes ready (here a NATS server that refuses): the
    Deployment (maxUnavailable 0) keeps the old pod running and ready, so its readyReplicas equals
    the desired count. Ready was True (Publishing) with the new spec's observedGeneration, which no
    worker ran; it is False, reason RollingOut, for as long as an older pod runs."""
    await prepare_database(pg_dsn)
    await api.create(secret("orders-db", pg_dsn), namespace)
    async with operator_in_process([namespace]):
        await api.create(publisher("orders", nats_url), namespace)

        async def ready() -> dict[str, Any]:
            return condition(await api.get(KIND, namespace, "orders"), "Ready")

        await wait_for(lambda: _is_status(ready(), "True"), 120)
        await api.merge_patch(KIND, namespace, "orders", {"spec": {"nats": {"servers": ["nats://127.0.0.1:1"]}}})

        async def stuck() -> bool:
            dep = await api.get("Deployment", namespace, "orders-relay") or {}
            st = dep.get("status") or {}
            current = st.get("observedGeneration") == dep["metadata"]["generation"]
            counts = (st.get("updatedReplicas"), st.get("replicas"), st.get("readyReplicas"))
            return current and counts == (1, 2, 1)

        await wait_for(stuck, 60, "the new pod started beside the old one, which stays ready")
        cond = await wait_for(lambda: _if_reason(ready(), "RollingOut"), 30, "Ready=False/RollingOut")
        assert cond["status"] == "False"
        assert cond["observedGeneration"] == 2
        obj = await api.get(KIND, namespace, "orders") or {}
        assert obj["status"]["observedGeneration"] == 2
        assert obj["status"]["readyText"] == "1/1"  # the old pod: ready, but not running the spec


async def test_a_publisher_created_again_at_once_waits_for_its_predecessors_children(
    crd: str, api: KubeApi, namespace: str, operator_env: None, pg_dsn: str, nats_url: str
) -> None:
    """Deleted and created again under the same name (``kubectl delete`` then ``apply``): the old
    children are still there until the garbage collector removes them. Ready said NameConflict, with
    a Warning to delete or rename them, and nothing woke the new publisher when they went: its own
    children came only with the next resync. Now Ready says PreviousChildren (a Normal Event) and
    the children's deletion brings the pass that creates the new ones. Paused: no pod event helps."""
    await api.create(secret("orders-db", pg_dsn), namespace)
    obj = publisher("orders", nats_url)
    obj["spec"]["paused"] = True
    async with operator_in_process([namespace], resync_seconds=120.0):
        await api.create(obj, namespace)

        async def deployment_of() -> str:
            dep = await api.get("Deployment", namespace, "orders-relay") or {}
            return str(((dep.get("metadata") or {}).get("ownerReferences") or [{}])[0].get("uid", ""))

        first = await wait_for(deployment_of, 60, "the first publisher's Deployment")
        await api.delete(KIND, namespace, "orders")
        created = await api.create(obj, namespace)
        second = created["metadata"]["uid"]
        assert second != first
        await wait_for(lambda: _is_value(deployment_of(), second), 20, "the Deployment of the publisher created again")
        events = [e for e in await api.list("Event", namespace) if (e.get("involvedObject") or {}).get("uid") == second]
        assert [e["reason"] for e in events if e["type"] == "Warning"] == [], events


async def _is_value(got: Any, expected: Any) -> bool:
    return bool(await got == expected)


async def _is_status(cond: Any, status: str) -> bool:
    return bool((await cond).get("status") == status)


async def _if_reason(cond: Any, reason: str) -> dict[str, Any]:
    found: dict[str, Any] = await cond
    return found if found.get("reason") == reason else {}


CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget")
# Controllers write the status of these (a new resourceVersion each time); a write of ours bumps generation.
STATUS_KINDS = {"Deployment", "PodDisruptionBudget"}


async def owned_children(api: KubeApi, namespace: str, owner_uid: str) -> dict[str, list[tuple[str, str]]]:
    """Per kind, (name, version) of the objects the publisher ``owner_uid`` controls; the version is
    ``metadata.generation`` for kinds whose status controllers write, else ``resourceVersion``."""
    found: dict[str, list[tuple[str, str]]] = {}
    for kind in CHILD_KINDS:
        for obj in await api.list(kind, namespace):
            meta = obj["metadata"]
            if any(ref.get("uid") == owner_uid for ref in meta.get("ownerReferences") or []):
                version = str(meta.get("generation")) if kind in STATUS_KINDS else meta["resourceVersion"]
                found.setdefault(kind, []).append((meta["name"], version))
    return found


async def start_operator_process(kubeconfig: Path, namespace: str, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "outbox_cli.main",
            "operator",
            "--namespace",
            namespace,
            "--resync-seconds",
            "1",
            "--log-format",
            "text",
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )


async def test_a_hung_worker_is_restarted_by_its_liveness_probe_and_nothing_is_lost(
    crd: str, api: KubeApi, node: NodeAgent, namespace: str, operator_env: None, pg_dsn: str, nats_url: str
) -> None:
    """The worker's liveness probe as the operator renders it (/healthz on the named metrics port,
    10 s delay and period, 3 failures): a healthy worker passes it for as long as it runs, and a
    worker whose process hangs (SIGSTOP) is killed and started again, while its peer takes its
    partitions over; every event ends in the stream once and in order."""
    await prepare_database(pg_dsn)
    await api.create(secret("orders-db", pg_dsn), namespace)
    async with operator_in_process([namespace]):
        await api.create(publisher("orders", nats_url, replicas=2), namespace)

        async def ready() -> bool:
            return condition(await api.get(KIND, namespace, "orders"), "Ready").get("status") == "True"

        await wait_for(ready, 120)
        committed = await insert_events(pg_dsn, 2000, 100)
        hung = node.running("orders-relay")[0]
        healthy = next(p for p in node.running("orders-relay") if p.uid != hung.uid)
        os.kill(hung.proc.pid, signal.SIGSTOP)
        try:
            committed += await insert_events(pg_dsn, 2000, 100)  # relayed by the peer meanwhile

            async def restarted() -> bool:
                pod = await api.get("Pod", namespace, hung.name) or {}
                statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
                fresh = [p for p in node.running(hung.name) if p.proc.pid != hung.proc.pid and p.ready]
                return statuses[0].get("restartCount") == 1 and bool(fresh)

            await wait_for(restarted, 150, what="the hung worker killed by its liveness probe and started again")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung.proc.pid, signal.SIGCONT)
        assert node.liveness_kills == [hung.name]
        assert node.exit_codes[hung.name] == -signal.SIGKILL  # SIGTERM stays pending in a stopped process
        committed += await insert_events(pg_dsn, 2000, 100)  # both workers again

        async def all_stored() -> bool:
            return await stream_count(nats_url) == committed

        await wait_for(all_stored, 120)
        report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
        assert report.ok, report.to_dict()
        assert (report.published, report.duplicates, report.order_violations, report.lost) == (committed, 0, 0, 0)
        # the healthy worker answered its liveness probes all along (10 s apart, over a minute and more)
        pod = await api.get("Pod", namespace, healthy.name) or {}
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert healthy.proc.returncode is None
        assert node.liveness_passed.get(healthy.name, 0) >= 2, node.liveness_passed
    assert not node.errors, node.errors


async def test_operator_killed_mid_reconcile_converges_without_duplicates_or_rewrites(
    crd: str, api: KubeApi, control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "operator.log"
    await api.create(secret("orders-db", "postgresql://unused@127.0.0.1:1/db"), namespace)
    # A quota of zero Deployments holds the first pass after its first children: killed there, the
    # operator leaves a half-built set behind, deterministically.
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-deployments"},
        "spec": {"hard": {"count/deployments.apps": "0"}},
    }
    await api.create(quota, namespace)
    first = await start_operator_process(control_plane.kubeconfig, namespace, log)
    try:
        created = await api.create(publisher("orders", "nats://127.0.0.1:4222", replicas=2), namespace)
        uid = created["metadata"]["uid"]

        async def held_by_the_quota() -> bool:
            return "Deployment" not in await owned_children(api, namespace, uid) and "exceeded quota" in log.read_text()

        await wait_for(held_by_the_quota, 60)
    finally:
        if first.returncode is None:
            first.kill()  # SIGKILL: no chance to finish the pass
        await first.wait()
    await api.delete("ResourceQuota", namespace, "no-deployments")
    partial = await owned_children(api, namespace, uid)

    second = await start_operator_process(control_plane.kubeconfig, namespace, log)
    try:

        async def complete() -> dict[str, list[tuple[str, str]]] | None:
            children = await owned_children(api, namespace, uid)
            return children if set(children) >= {"ServiceAccount", "Role", "RoleBinding", "Deployment"} else None

        await wait_for(complete, 60)
        await asyncio.sleep(3)  # a few resync passes (1 s each) after convergence
        settled = await owned_children(api, namespace, uid)
        settled_obp = (await api.get(KIND, namespace, "orders") or {})["metadata"]["resourceVersion"]
        await asyncio.sleep(4)
        again = await owned_children(api, namespace, uid)
        again_obp = (await api.get(KIND, namespace, "orders") or {})["metadata"]["resourceVersion"]
    finally:
        second.terminate()
        try:
            await asyncio.wait_for(second.wait(), 20)
        except TimeoutError:
            second.kill()
            await second.wait()
    assert "Deployment" not in partial, partial
    assert set(partial) < set(settled), f"the kill must land before the first pass completed: {partial}"
    assert all(len(objs) == 1 for objs in settled.values()), settled  # no duplicate child
    assert again == settled, "a pass after convergence rewrote a child"
    assert again_obp == settled_obp, "a pass after convergence rewrote the publisher (status or metadata)"
    assert (await api.get("Deployment", namespace, "orders-relay") or {})["spec"]["replicas"] == 2


async def test_autoscaler_scales_within_its_bounds(
    crd: str,
    api: KubeApi,
    namespace: str,
    node: NodeAgent,
    operator_env: None,
    pg_dsn: str,
    nats_url: str,
) -> None:
    """A backlog far over the target asks for many workers: the Deployment grows to maxReplicas
    (3, below the 8 partitions) and never beyond; drained, it returns to minReplicas."""
    await prepare_database(pg_dsn)
    await api.create(secret("orders-db", pg_dsn), namespace)
    obj = publisher("orders", nats_url)
    obj["spec"]["autoscaling"] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetBacklogPerReplica": 100,
        "scaleDownStabilizationSeconds": 2,
    }
    obj["spec"]["publishing"].update({"batchSize": 20, "loops": 1, "maxInFlight": 20})  # slow enough to see
    seen: list[int] = []

    async def deployment_replicas() -> int:
        deployment = await api.get("Deployment", namespace, "orders-relay") or {}
        replicas = int((deployment.get("spec") or {}).get("replicas", 0))
        seen.append(replicas)
        return replicas

    async with operator_in_process([namespace]):
        await api.create(obj, namespace)

        async def ready() -> bool:
            return condition(await api.get(KIND, namespace, "orders"), "Ready").get("status") == "True"

        await wait_for(ready, 120)
        # a backlog that outlasts the autoscaler's reaction on a loaded machine: the pressure it acts on
        # is sampled every 5 s, so a backlog drained sooner could end before it ever asks for 3
        committed = await insert_events(pg_dsn, 60_000, 200)
        await wait_for(lambda: _is(deployment_replicas(), 3), 120)

        async def all_stored() -> bool:
            await deployment_replicas()
            return await stream_count(nats_url) == committed

        await wait_for(all_stored, 180)
        await wait_for(lambda: _is(deployment_replicas(), 1), 120)
    assert max(seen) == 3, seen
    report = await verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True)
    assert report.ok, report.to_dict()
    assert (report.published, report.duplicates, report.order_violations) == (committed, 0, 0)


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
