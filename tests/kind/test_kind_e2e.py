"""End to end on kind: helm install, relay events from PostgreSQL to JetStream, helm uninstall.

The tests run in file order and share the cluster: install → publisher Ready → events arrive in the
stream exactly once and in per-aggregate order → the OutboxPublisher status reports them → a bad
spec is refused → a missing Secret is reported → scale 2 → 1 → 2 → pause and resume → an operator
restart loses nothing → uninstall leaves nothing running. Every batch of events is checked against
the whole stream: each event once, each aggregate's events in insert order.
"""

from __future__ import annotations

import asyncio
import collections
import json
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
    StreamMessage,
    condition,
    image_manifest,
    insert_events_sql,
    order_violations,
    owned_partitions,
    publisher_manifest,
    stream_messages,
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
    assert_exactly_once_in_order(stored, event_ids)
    assert all(m.subject == "outbox.order.created" for m in stored)


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


def test_a_bad_spec_is_refused(cluster: Cluster, operator: None) -> None:
    # the API server refuses what the CRD can see
    bad = publisher_manifest("e2e-bad", partitions=2, replicas=3)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)  # exits 1: refused
    assert cluster.kubectl("-n", APP_NS, "get", "outboxpublisher", "e2e-bad", "--ignore-not-found", "-o", "name") == ""
    # the operator refuses what only the worker's settings can see, and creates nothing
    cluster.apply(json.dumps(publisher_manifest("e2e-bad", subject_template="outbox.{customer}.{event_type}")))

    def invalid() -> dict[str, Any] | None:
        ready = condition(cluster.get_json("-n", APP_NS, "outboxpublisher", "e2e-bad"), "Ready")
        return ready if ready.get("reason") == "InvalidSpec" else None

    ready = cluster.wait_for("Ready=False/InvalidSpec", invalid, timeout=120)
    assert ready["message"].startswith("spec.subjectTemplate:")
    assert cluster.kubectl("-n", APP_NS, "get", "deployment", "e2e-bad-relay", "--ignore-not-found", "-o", "name") == ""
    cluster.kubectl("-n", APP_NS, "delete", "outboxpublisher", "e2e-bad", "--wait=true", "--timeout=60s", timeout=90)


def test_a_missing_secret_is_reported(cluster: Cluster, operator: None) -> None:
    cluster.apply(json.dumps(publisher_manifest("e2e-nosecret", secret="no-such-secret", table="outbox_nosecret")))

    def reported() -> dict[str, Any] | None:
        ready = condition(cluster.get_json("-n", APP_NS, "outboxpublisher", "e2e-nosecret"), "Ready")
        return ready if ready.get("reason") == "SecretNotFound" else None

    ready = cluster.wait_for("Ready=False/SecretNotFound", reported, timeout=120)
    assert "no-such-secret" in ready["message"]
    assert (
        cluster.kubectl("-n", APP_NS, "get", "deployment", "e2e-nosecret-relay", "--ignore-not-found", "-o", "name")
        == ""
    )
    cluster.kubectl(
        "-n", APP_NS, "delete", "outboxpublisher", "e2e-nosecret", "--wait=true", "--timeout=60s", timeout=90
    )


def _wait_workers(cluster: Cluster, count: int) -> None:
    def settled() -> bool:
        status = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER).get("status", {})
        return (
            status.get("readyText") == f"{count}/{count}"
            and len(status.get("workers") or {}) == count
            and owned_partitions(status) == [0, 1, 2, 3]
            and condition({"status": status}, "Ready").get("status") == "True"
        )

    cluster.wait_for(f"{count} workers owning the 4 partitions once each", settled, timeout=240)


def _relay_more(cluster: Cluster, event_ids: list[str], count: int) -> None:
    """Insert ``count`` more events (numbered after the earlier ones) and check the whole stream."""
    start = len(event_ids)
    new = [str(uuid.uuid4()) for _ in range(count)]
    cluster.psql(insert_events_sql(new, start=start))
    event_ids.extend(new)
    assert_exactly_once_in_order(_read_stream(cluster, len(event_ids)), event_ids)


def test_scale_down_and_up(cluster: Cluster, operator: None, event_ids: list[str]) -> None:
    cluster.kubectl("-n", APP_NS, "scale", "outboxpublisher", PUBLISHER, "--replicas=1")
    _wait_workers(cluster, 1)
    _relay_more(cluster, event_ids, 100)
    cluster.kubectl("-n", APP_NS, "scale", "outboxpublisher", PUBLISHER, "--replicas=2")
    _wait_workers(cluster, 2)
    _relay_more(cluster, event_ids, 100)


def test_pause_and_resume(cluster: Cluster, operator: None, event_ids: list[str]) -> None:
    cluster.kubectl(
        "-n", APP_NS, "patch", "outboxpublisher", PUBLISHER, "--type=merge", "-p", '{"spec":{"paused":true}}'
    )

    def paused() -> bool:
        obj = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER)
        workers = cluster.get_json("-n", APP_NS, "deployment", f"{PUBLISHER}-relay")
        return condition(obj, "Ready").get("reason") == "Paused" and not workers["status"].get("replicas")

    cluster.wait_for("paused: no worker pod", paused, timeout=180)
    start = len(event_ids)
    held = [str(uuid.uuid4()) for _ in range(50)]
    cluster.psql(insert_events_sql(held, start=start))
    event_ids.extend(held)
    pending = cluster.psql("SELECT count(*) FROM public.outbox WHERE published_at IS NULL;").strip()
    assert pending == "50", "paused workers must not publish"
    obj = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER)
    assert "backlog" not in obj["status"].get("totals", {}), "an unknown backlog is absent, never 0"
    cluster.kubectl(
        "-n", APP_NS, "patch", "outboxpublisher", PUBLISHER, "--type=merge", "-p", '{"spec":{"paused":false}}'
    )
    _wait_workers(cluster, 2)
    assert_exactly_once_in_order(_read_stream(cluster, len(event_ids)), event_ids)


def test_operator_restart_loses_nothing(cluster: Cluster, operator: None, event_ids: list[str]) -> None:
    cluster.kubectl("-n", OPERATOR_NS, "rollout", "restart", f"deployment/{RELEASE}")
    cluster.kubectl("-n", OPERATOR_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=180s", timeout=200)
    _relay_more(cluster, event_ids, 100)
    obj = cluster.get_json("-n", APP_NS, "outboxpublisher", PUBLISHER)
    assert not obj["metadata"].get("finalizers"), "deletion must never wait for the operator"
    _wait_workers(cluster, 2)


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


def assert_exactly_once_in_order(stored: list[StreamMessage], event_ids: list[str]) -> None:
    """Each inserted event is in the stream once, and each aggregate's events are in insert order."""
    counts = collections.Counter(m.msg_id for m in stored)
    assert set(counts) == set(event_ids), "stream and outbox differ"
    assert [i for i, n in counts.items() if n != 1] == [], "an event is in the stream more than once"
    assert order_violations(stored) == []


def _read_stream(cluster: Cluster, expected: int) -> list[StreamMessage]:
    """Every message in the stream, read through a port-forward."""
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
        return asyncio.run(stream_messages(f"nats://127.0.0.1:{match.group(1)}", STREAM, expected))
    finally:
        forward.terminate()
        forward.wait(timeout=30)
