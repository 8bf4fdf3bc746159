"""The reconcile plan, pure: what it creates, replaces, patches, deletes and writes into status."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from outbox_operator import constants as c
from outbox_operator.children import OperatorConfig, Owner
from outbox_operator.reconcile import Observed, Plan, child_keys, merge_patch, plan

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CONFIG = OperatorConfig(worker_image="relay:test")


def body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "orders", "namespace": "shop", "uid": "uid-1", "generation": 1},
        "spec": {
            "partitions": 8,
            "replicas": 2,
            "database": {"secretRef": {"name": "db"}},
            "nats": {"servers": ["nats://nats:4222"]},
            **spec,
        },
    }


class World:
    """A tiny in-memory cluster that carries plans out, to check convergence and idempotency."""

    def __init__(self, cr: dict[str, Any], secrets: dict[str, set[str] | None] | None = None) -> None:
        self.cr = cr
        self.children: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets = {"db": {"url"}} if secrets is None else secrets
        self.pods: list[str] = []

    def observe(self, now: datetime = T0) -> Observed:
        owner = Owner.from_body(self.cr)
        return Observed(
            body=copy.deepcopy(self.cr),
            now=now,
            pods=list(self.pods),
            secrets=self.secrets,
            children={k: copy.deepcopy(self.children.get(k)) for k in child_keys(owner)},
        )

    def step(self, now: datetime = T0) -> Plan:
        result = plan(self.observe(now), CONFIG)
        for action in result.actions:
            key = (action.kind, action.name)
            if action.verb in ("create", "replace"):
                assert action.body is not None
                self.children[key] = copy.deepcopy(action.body)
            elif action.verb == "patch":
                self.children[key] = _merge(self.children[key], action.body)
            else:
                del self.children[key]
        if result.status_patch:
            self.cr["status"] = _merge(self.cr.get("status") or {}, result.status_patch)
        return result


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def verbs(result: Plan) -> list[tuple[str, str]]:
    return [(a.verb, a.kind) for a in result.actions]


def test_first_pass_creates_all_children_and_the_second_writes_nothing() -> None:
    world = World(body())
    first = world.step()
    assert sorted(verbs(first)) == sorted(
        ("create", k) for k in ("ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget")
    )
    assert first.status_patch["desiredReplicas"] == 2
    second = world.step(T0 + timedelta(seconds=30))
    assert not second.writes, (second.actions, second.status_patch, second.events)


def test_spec_change_replaces_only_what_changed() -> None:
    world = World(body())
    world.step()
    world.cr["spec"]["publishing"] = {"batchSize": 10}
    world.cr["metadata"]["generation"] = 2
    result = world.step()
    assert verbs(result) == [("replace", "Deployment")]
    assert result.status_patch["observedGeneration"] == 2
    env = {
        e["name"]: e.get("value")
        for e in world.children[("Deployment", "orders-relay")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["OUTBOX_BATCH_SIZE"] == "10"


def ready_of(world: World) -> tuple[str, str]:
    ready = next(x for x in world.cr["status"]["conditions"] if x["type"] == "Ready")
    return ready["status"], ready["reason"]


def test_an_ordinary_start_posts_no_warning_and_a_regression_does() -> None:
    """Pods becoming ready while their first reports are awaited is progress, not a fault: it was a
    Warning (WaitingForReports) at every start. Reports going stale after Ready is one."""
    world = World(body(reportIntervalSeconds=10))
    first = world.step()
    deployment = world.children[("Deployment", "orders-relay")]
    deployment["metadata"]["generation"] = 1
    deployment["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    world.pods = ["orders-relay-a", "orders-relay-b"]
    waiting = world.step(T0 + timedelta(seconds=5))
    assert ready_of(world) == ("False", "WaitingForReports")
    entry = {"partitions": list(range(8)), "backlog": 0, "reportTime": "2026-01-01T12:00:10Z"}
    world.cr["status"]["workers"] = {"orders-relay-a": entry, "orders-relay-b": {**entry, "partitions": []}}
    ready = world.step(T0 + timedelta(seconds=10))
    assert ready_of(world) == ("True", "Publishing")
    started = [(e.type, e.reason) for r in (first, waiting, ready) for e in r.events]
    assert started == [("Normal", "WaitingForReports"), ("Normal", "Ready")], started
    stale = world.step(T0 + timedelta(minutes=5))
    assert ready_of(world)[0] == "False"
    assert [e.type for e in stale.events if e.reason == ready_of(world)[1]] == ["Warning"], stale.events


def test_ready_waits_for_the_rollout_of_the_current_spec() -> None:
    """Ready pods of an older pod template do not make the current spec Ready: with maxUnavailable 0
    a new pod that never becomes ready leaves the old ones running and ready for good, and Ready was
    True (Publishing) with observedGeneration of the new spec, which no worker ran."""
    world = World(body(reportIntervalSeconds=10))
    world.step()
    deployment = world.children[("Deployment", "orders-relay")]
    deployment["metadata"]["generation"] = 1
    deployment["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    world.pods = ["orders-relay-a", "orders-relay-b"]
    entry = {"partitions": list(range(8)), "backlog": 0, "reportTime": "2026-01-01T12:00:00Z"}
    world.cr["status"]["workers"] = {"orders-relay-a": entry}
    world.step()
    assert ready_of(world) == ("True", "Publishing")

    # the spec changes: the pass that replaces the Deployment does not call the old pods' state Ready
    world.cr["spec"]["nats"] = {"servers": ["nats://elsewhere:4222"]}
    world.cr["metadata"]["generation"] = 2
    result = world.step()
    assert verbs(result) == [("replace", "Deployment")]
    assert result.status_patch["observedGeneration"] == 2
    assert ready_of(world) == ("False", "RollingOut")
    # what the Deployment controller writes while the new pod does not become ready: the old pods
    # are ready, one pod runs the current template
    deployment = world.children[("Deployment", "orders-relay")]
    deployment["metadata"]["generation"] = 2
    deployment["status"] = {"observedGeneration": 2, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 1}
    world.step(T0 + timedelta(seconds=5))
    assert ready_of(world) == ("False", "RollingOut")
    ready = next(x for x in world.cr["status"]["conditions"] if x["type"] == "Ready")
    assert ready["message"].startswith("1/2 worker pods run the current spec, 2 pod(s) an older one"), ready
    # the rollout done: Ready again
    deployment["status"] = {"observedGeneration": 2, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    world.step(T0 + timedelta(seconds=6))
    assert ready_of(world) == ("True", "Publishing")


def test_scaling_patches_replicas_and_manages_the_pdb() -> None:
    world = World(body())
    world.step()
    world.cr["spec"]["replicas"] = 1
    result = world.step()
    assert sorted(verbs(result)) == [("delete", "PodDisruptionBudget"), ("patch", "Deployment")]
    assert world.children[("Deployment", "orders-relay")]["spec"]["replicas"] == 1
    world.cr["spec"]["paused"] = True
    world.step()
    assert world.children[("Deployment", "orders-relay")]["spec"]["replicas"] == 0
    ready = next(x for x in world.cr["status"]["conditions"] if x["type"] == "Ready")
    assert ready["reason"] == "Paused"


def test_invalid_spec_touches_no_child_and_names_the_field() -> None:
    world = World(body(subjectTemplate="orders.{customer}"))
    result = world.step()
    assert result.actions == []
    assert result.invalid is not None
    assert result.invalid.field == "spec.subjectTemplate"
    ready = result.status_patch["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "{customer}" in ready["message"]
    assert [e.reason for e in result.events] == ["InvalidSpec", "InvalidSpec"]
    again = world.step()
    assert not again.writes


def test_invalid_spec_after_valid_keeps_the_running_children() -> None:
    world = World(body())
    world.step()
    before = copy.deepcopy(world.children)
    world.cr["spec"]["replicas"] = 99  # more than partitions: rejected by the model as well
    result = world.step()
    assert result.actions == []
    assert world.children == before
    assert "spec.replicas" in result.status_patch["conditions"][0]["message"]


def test_an_invalid_spec_does_not_show_the_running_workers_old_pressure_as_current() -> None:
    """The spec turns invalid while the workers run on with the last valid one. The invalid-spec pass
    wrote only Ready and Degraded, so the backlog and Lagging of that moment stayed in the status, as
    if current, for as long as the spec was invalid. Without a valid spec the reports are not
    evaluated: the pressure is unknown (Lagging=Unknown/InvalidSpec) and gone pods' entries pruned."""
    world = World(body(reportIntervalSeconds=10))
    world.step()
    world.pods = ["orders-relay-a"]
    entry = {"partitions": list(range(8)), "backlog": 3, "oldestPendingSeconds": 1.0, "published": 7}
    world.cr["status"]["workers"] = {"orders-relay-a": {**entry, "reportTime": "2026-01-01T12:00:00Z"}}
    world.step()
    assert world.cr["status"]["totals"]["backlog"] == 3
    world.cr["spec"]["subjectTemplate"] = "orders.{customer}"
    world.cr["metadata"]["generation"] = 2
    world.pods = []
    result = world.step(T0 + timedelta(seconds=1))
    assert result.invalid is not None
    assert result.actions == []
    status = world.cr["status"]
    assert "workers" not in status or status["workers"] == {}
    assert "backlog" not in status["totals"], status["totals"]
    assert "oldestPendingSeconds" not in status["totals"]
    conds = {x["type"]: x for x in status["conditions"]}
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert (conds["Lagging"]["status"], conds["Lagging"]["reason"]) == ("Unknown", "InvalidSpec")
    assert conds["Lagging"]["observedGeneration"] == 2
    assert not world.step(T0 + timedelta(seconds=2)).writes


def test_missing_secret_or_key_waits_and_retries() -> None:
    world = World(body(), secrets={"db": None})
    result = world.step()
    assert result.actions == []
    assert result.retry_reason is not None
    conds = {x["type"]: x for x in result.status_patch["conditions"]}
    assert conds["Ready"]["reason"] == "SecretNotFound"
    assert conds["DatabaseReady"]["reason"] == "SecretNotFound"
    assert "'db'" in conds["Ready"]["message"]
    world.secrets = {"db": {"dsn"}}
    assert "has no key 'url'" in world.step().retry_reason
    world.secrets = {"db": {"url"}}
    assert ("create", "Deployment") in verbs(world.step())


def test_a_missing_secret_leaves_the_running_workers_status_current() -> None:
    """The Secret goes while the workers run on (their env was resolved at start): Ready says
    SecretNotFound, and what the workers report still reaches totals and the other conditions. The
    missing-Secret pass wrote only Ready and DatabaseReady, so the backlog, Lagging and Degraded
    froze at their last values, as if current, for as long as the Secret was missing."""
    world = World(body(reportIntervalSeconds=10))
    world.step()
    world.pods = ["orders-relay-a", "orders-relay-b"]
    entry = {"partitions": list(range(8)), "backlog": 3, "oldestPendingSeconds": 1.0, "published": 7}
    world.cr["status"]["workers"] = {"orders-relay-a": {**entry, "reportTime": "2026-01-01T12:00:00Z"}}
    world.step()
    assert world.cr["status"]["totals"]["backlog"] == 3
    world.secrets = {"db": None}
    world.step(T0 + timedelta(seconds=1))
    conds = {x["type"]: x for x in world.cr["status"]["conditions"]}
    assert (conds["Ready"]["reason"], conds["DatabaseReady"]["reason"]) == ("SecretNotFound", "SecretNotFound")
    # the workers go on reporting: the backlog grows, dead letters pile up, a pod goes
    world.cr["status"]["workers"]["orders-relay-a"] = {
        **entry,
        "backlog": 900,
        "oldestPendingSeconds": 120.0,
        "published": 9,
        "deadLettersWaiting": 4,
        "reportTime": "2026-01-01T12:00:20Z",
    }
    world.cr["status"]["workers"]["orders-relay-gone"] = {**entry, "reportTime": "2026-01-01T12:00:20Z"}
    result = world.step(T0 + timedelta(seconds=21))
    assert result.actions == []
    assert result.retry_reason is not None
    assert result.status_patch["workers"] == {"orders-relay-gone": None}
    status = world.cr["status"]
    assert (status["totals"]["backlog"], status["totals"]["oldestPendingSeconds"]) == (900, 120.0)
    assert status["totals"]["published"] == 9
    assert status["lastPublishTime"] == "2026-01-01T12:00:21Z"
    conds = {x["type"]: (x["status"], x["reason"]) for x in status["conditions"]}
    assert conds["Ready"] == ("False", "SecretNotFound")
    assert conds["DatabaseReady"] == ("False", "SecretNotFound")
    assert conds["Lagging"] == ("True", "LagAboveTarget")
    assert conds["Degraded"] == ("True", "PoisonRows")
    # no report for three intervals: unknown, not the last numbers
    world.step(T0 + timedelta(seconds=60))
    assert "backlog" not in world.cr["status"]["totals"]
    assert next(x for x in world.cr["status"]["conditions"] if x["type"] == "Lagging")["status"] == "Unknown"


def test_reports_of_gone_pods_are_pruned_and_totals_written() -> None:
    world = World(body(reportIntervalSeconds=10))
    world.step()
    now = T0 + timedelta(seconds=5)
    entry = {"partitions": list(range(8)), "published": 7, "backlog": 3, "reportTime": "2026-01-01T12:00:04Z"}
    world.cr["status"]["workers"] = {"orders-relay-a": entry, "orders-relay-gone": entry}
    world.pods = ["orders-relay-a"]
    result = world.step(now)
    assert result.status_patch["workers"] == {"orders-relay-gone": None}
    assert world.cr["status"]["totals"]["backlog"] == 3
    assert world.cr["status"]["totals"]["partitionsOwned"] == 8


def test_a_child_owned_by_someone_else_is_left_alone() -> None:
    world = World(body())
    world.children[("Deployment", "orders-relay")] = {
        "metadata": {"name": "orders-relay", "ownerReferences": [{"uid": "other", "controller": True}]}
    }
    result = world.step()
    assert ("replace", "Deployment") not in verbs(result)
    assert ("create", "Deployment") not in verbs(result)
    assert result.status_patch["conditions"][0]["reason"] == "NameConflict"


def test_children_of_a_deleted_publisher_of_the_same_name_are_waited_for_not_a_conflict() -> None:
    """Deleted and created again at once: the old children wait for the garbage collector. Ready said
    NameConflict with a Warning to "delete or rename" them, advice nobody should follow."""
    world = World(body())
    previous = {"kind": c.KIND, "name": "orders", "uid": "uid-0", "controller": True}
    world.children[("Deployment", "orders-relay")] = {
        "metadata": {"name": "orders-relay", "ownerReferences": [previous]}
    }
    result = world.step()
    assert ("create", "Deployment") not in verbs(result)
    ready = result.status_patch["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "PreviousChildren")
    assert "Deployment orders-relay" in ready["message"]
    assert "garbage collector" in ready["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Normal", "PreviousChildren")]
    # another publisher's (or anything else's) child with our name is still a conflict
    world.children[("Deployment", "orders-relay")]["metadata"]["ownerReferences"] = [{**previous, "name": "other"}]
    assert world.step().status_patch["conditions"][0]["reason"] == "NameConflict"
    # gone: the publisher's own children are created
    del world.children[("Deployment", "orders-relay")]
    assert ("create", "Deployment") in verbs(world.step())


def test_autoscaler_drives_the_deployment() -> None:
    world = World(
        body(
            autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 6, "targetBacklogPerReplica": 1000},
            reportIntervalSeconds=10,
        )
    )
    world.step()
    assert world.children[("Deployment", "orders-relay")]["spec"]["replicas"] == 2  # from spec.replicas
    world.cr["status"]["workers"] = {
        "orders-relay-a": {"partitions": list(range(8)), "backlog": 5500, "reportTime": "2026-01-01T12:00:00Z"}
    }
    world.pods = ["orders-relay-a"]
    result = world.step()
    assert world.children[("Deployment", "orders-relay")]["spec"]["replicas"] == 6
    assert world.cr["status"]["autoscaler"]["replicas"] == 6
    assert any(e.reason == "Scaled" for e in result.events)


def test_worker_pods_get_secrets_only_by_reference_and_restricted_security() -> None:
    world = World(
        body(nats={"servers": ["nats://n:4222"], "user": "relay", "passwordSecretRef": {"name": "nats"}}),
        secrets={"db": {"url"}, "nats": {"password"}},
    )
    world.step()
    dep = world.children[("Deployment", "orders-relay")]
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "url"}
    assert env["OUTBOX_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "nats", "key": "password"}
    assert "value" not in env["OUTBOX_DATABASE_URL"]
    assert env["OUTBOX_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["OUTBOX_PUBLISHER"]["value"] == "orders"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["command"] == ["outboxctl", "worker"]
    template_hash = dep["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_TEMPLATE_HASH]
    assert dep["metadata"]["annotations"][c.ANNOTATION_TEMPLATE_HASH] == template_hash
    role = world.children[("Role", "orders-relay")]
    assert role["rules"] == [
        {
            "apiGroups": ["outbox.dev"],
            "resources": ["outboxpublishers/status"],
            "resourceNames": ["orders"],
            "verbs": ["get", "patch"],
        }
    ]
    assert "postgresql://" not in json.dumps(list(world.children.values()))


def test_merge_patch_is_minimal() -> None:
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 1, "b": {"c": 2}}) == {"b": {"c": 2, "d": None}}
    assert merge_patch({"a": [1]}, {"a": [1]}) == {}
