"""End to end on kind: helm install, relay events from PostgreSQL to JetStream, helm uninstall.

The tests run in file order and share the cluster: install → publisher Ready → events arrive in the
stream exactly once → the OutboxPublisher status reports them → uninstall leaves nothing running.
"""

from __future__ import annotations

import asyncio
import collections
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kindsupport import (
    APP_NS,
    OPERATOR_NS,
    RELEASE,
    ROOT,
    Cluster,
    image_manifest,
    insert_events_sql,
    stream_contents,
)

pytestmark = pytest.mark.timeout(1800)

PUBLISHER = "e2e"
EVENTS = 300
STREAM = "OUTBOX"


@pytest.fixture(scope="module")
def operator(cluster: Cluster, image: str, backing_services: None) -> Iterator[None]:
    """The chart installed the way README says, with the image under test."""
    repository, tag = image.rsplit(":", 1)
    cluster.helm(
        "install", RELEASE, str(ROOT / "helm" / "outbox-operator"),
        "--namespace", OPERATOR_NS,
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", "operator.logFormat=text",
        "--wait", "--timeout", "5m",
    )  # fmt: skip
    yield
    # uninstall is asserted by test_uninstall; this only makes sure a failed run leaves no release
    subprocess.run(
        [str(cluster.helm_bin), "uninstall", RELEASE, "--namespace", OPERATOR_NS, "--ignore-not-found"],
        env=cluster.env,
        capture_output=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def event_ids() -> list[str]:
    return [str(uuid.uuid4()) for _ in range(EVENTS)]


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_operator_runs_under_restricted_pod_security(cluster: Cluster, operator: None) -> None:
    deployment = cluster.get_json("-n", OPERATOR_NS, "deployment", RELEASE)
    assert deployment["status"].get("availableReplicas") == 1
    namespace = cluster.get_json("namespace", OPERATOR_NS)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    crd = cluster.get_json("crd", "outboxpublishers.outbox.dev")
    assert crd["metadata"]["annotations"].get("meta.helm.sh/release-name") is None  # from crds/, not a template


def test_publisher_becomes_ready(cluster: Cluster, operator: None, image: str) -> None:
    migrate = image_manifest(ROOT / "deploy" / "kind" / "migrate-job.yaml", image).replace(
        "imagePullPolicy: IfNotPresent", "imagePullPolicy: Never"
    )
    cluster.apply(migrate)
    cluster.kubectl(
        "-n", APP_NS, "wait", "--for=condition=Complete", "job/outbox-migrate", "--timeout=300s", timeout=330
    )
    cluster.apply(ROOT / "deploy" / "kind" / "outboxpublisher.yaml")

    def ready() -> bool:
        obj = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER)
        return _condition(obj, "Ready").get("status") == "True"

    cluster.wait_for("OutboxPublisher e2e Ready=True", ready, timeout=300)

    def workers_ready() -> bool:
        workers = cluster.get_json("-n", APP_NS, "deployment", f"{PUBLISHER}-relay")
        return bool(workers["status"].get("readyReplicas") == 2)

    cluster.wait_for("2 ready worker pods", workers_ready, timeout=180)


def test_events_arrive_in_the_stream_exactly_once(cluster: Cluster, operator: None, event_ids: list[str]) -> None:
    half = len(event_ids) // 2
    for chunk in (event_ids[:half], event_ids[half:]):  # two transactions: NOTIFY and claims happen twice
        cluster.psql(insert_events_sql(chunk, start=event_ids.index(chunk[0])))

    def drained() -> bool:
        return cluster.psql("SELECT count(*) FROM public.outbox WHERE published_at IS NULL;").strip() == "0"

    cluster.wait_for("the outbox to drain", drained, timeout=180)
    stored = _read_stream(cluster, len(event_ids))
    counts = collections.Counter(msg_id for msg_id, _ in stored)
    assert set(counts) == set(event_ids), "stream and outbox differ"
    assert [i for i, n in counts.items() if n != 1] == [], "an event is in the stream more than once"
    assert all(subject == "outbox.order.created" for _, subject in stored)


def test_status_reports_the_published_events(cluster: Cluster, operator: None, event_ids: list[str]) -> None:
    def reported() -> dict[str, Any] | None:
        status = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER).get("status", {})
        totals = status.get("totals", {})
        if totals.get("published", 0) >= len(event_ids) and totals.get("backlog") == 0:
            return status
        return None

    status = cluster.wait_for("status.totals to report every event", reported, timeout=120)
    assert status["totals"]["workers"] == 2
    assert status["totals"]["published"] - status["totals"].get("duplicates", 0) <= len(event_ids)
    assert sum(len(w.get("partitions", [])) for w in status["workers"].values()) == 4
    assert status["observedGeneration"] >= 1


def test_uninstall(cluster: Cluster, operator: None) -> None:
    cluster.kubectl("-n", APP_NS, "delete", "outboxpublisher", PUBLISHER, "--wait=true", "--timeout=180s", timeout=200)

    def children_gone() -> bool:
        out = cluster.kubectl(
            "-n", APP_NS, "get", "deployments,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets",
            "-l", f"outbox.dev/publisher={PUBLISHER}", "-o", "name",
        )  # fmt: skip
        return out.strip() == ""

    cluster.wait_for("the publisher's children to be garbage-collected", children_gone, timeout=180)
    cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "3m")
    left = cluster.kubectl(
        "-n", OPERATOR_NS, "get", "all,serviceaccounts,roles,rolebindings",
        "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    )  # fmt: skip
    assert left.strip() == ""
    assert cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").count(RELEASE) == 0
    # Helm never deletes CRDs from crds/: the OutboxPublisher API (and any other release's objects) stay.
    cluster.get_json("crd", "outboxpublishers.outbox.dev")


def _read_stream(cluster: Cluster, expected: int) -> list[tuple[str, str]]:
    """(Nats-Msg-Id, subject) of every message in the stream, read through a port-forward."""
    forward = subprocess.Popen(
        [str(cluster.kubectl_bin), "-n", APP_NS, "port-forward", "svc/nats", ":4222"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"port-forward said: {line!r}"
        return asyncio.run(stream_contents(f"nats://127.0.0.1:{match.group(1)}", STREAM, expected))
    finally:
        forward.terminate()
        forward.wait(timeout=30)
