"""Pod fields passed through to the workers: refused at admission where the schema can tell, and
a child the API server still refuses is reported (Ready=False/ChildRejected, a Warning Event) with
the server's message, secrets removed, and nothing else is written."""

from __future__ import annotations

import base64
from typing import Any

import crd_schema
import pytest
from kube_emulator import KubeEmulator
from opkit import NAMESPACE, kopf_in_process

from outbox_operator.reconcile import Action, redact
from outbox_operator.spec import InvalidSpec, parse_spec
from support.polling import wait_for

SCHEMA = crd_schema.schema_of(crd_schema.load_crd())
API, KIND = "outbox.dev/v1alpha1", "OutboxPublisher"

BAD_WORKER_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("quantity", {"resources": {"requests": {"cpu": "lots"}}}, "spec.worker.resources.requests.cpu"),
    (
        "toleration-operator",
        {"tolerations": [{"key": "k", "operator": "Maybe"}]},
        "spec.worker.tolerations[0].operator",
    ),
    ("toleration-effect", {"tolerations": [{"key": "k", "effect": "Sometimes"}]}, "spec.worker.tolerations[0].effect"),
    (
        "exists-with-value",
        {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        "spec.worker.tolerations[0]",
    ),
    (
        "value-and-valueFrom",
        {"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        "spec.worker.env[0]",
    ),
    (
        "two-sources",
        {"env": [{"name": "A", "valueFrom": {"fieldRef": {}, "secretKeyRef": {}}}]},
        "spec.worker.env[0].valueFrom",
    ),
    ("env-name", {"env": [{"name": "1A=b", "value": "x"}]}, "spec.worker.env[0].name"),
]


def publisher(worker: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": KIND,
        "metadata": {"name": "orders", "namespace": NAMESPACE},
        "spec": {
            "partitions": 4,
            "database": {"secretRef": {"name": "orders-db"}},
            "nats": {"servers": ["nats://nats:4222"]},
            "worker": worker,
        },
    }


@pytest.mark.parametrize(("case", "worker", "path"), BAD_WORKER_FIELDS, ids=[c[0] for c in BAD_WORKER_FIELDS])
def test_schema_and_model_refuse_bad_pod_fields(case: str, worker: dict[str, Any], path: str) -> None:
    _, errors = crd_schema.admit(SCHEMA, publisher(worker))
    assert any(e.startswith(path) for e in errors), errors
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(publisher(worker)["spec"])
    assert caught.value.field.startswith(path), caught.value


def test_good_pod_fields_pass() -> None:
    worker = {
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": 2, "memory": "1Gi"}},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "relay", "effect": "NoSchedule"},
            {"operator": "Exists"},
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            },
        ],
        "env": [
            {"name": "TZ", "value": "UTC"},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
    }
    stored, errors = crd_schema.admit(SCHEMA, publisher(worker))
    assert errors == []
    for key, value in worker.items():  # nothing pruned
        assert stored["spec"]["worker"][key] == value
    parse_spec(stored["spec"])


def test_redact_removes_url_credentials_and_literal_values() -> None:
    message = 'env[0].value: Invalid value: "Sup3rSecret": x; postgresql://relay:pw@db:5432/shop is bad'
    cleaned = redact(message, ["Sup3rSecret"])
    assert "Sup3rSecret" not in cleaned
    assert "relay:pw" not in cleaned
    assert "postgresql://<redacted>@db:5432/shop" in cleaned
    unencoded = redact("nats://relay:p@ss@nats:4222 refused", [])
    assert unencoded == "nats://<redacted>@nats:4222 refused", unencoded


# Affinity is passed through as the user wrote it (the schema cannot check all of core/v1 Affinity):
# the API server refuses this one when the operator writes the Deployment.
BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Maybe", "values": ["a"]}]}]
        }
    }
}


def assert_child_rejected(obj: dict[str, Any], events: list[dict[str, Any]], expected: str, secret: str) -> None:
    """Ready says ChildRejected with the server's message (no secret) and a Warning Event says it too."""
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ChildRejected")
    assert expected in ready["message"]
    assert secret not in str(obj["status"])
    warnings = [e for e in events if e["reason"] == "ChildRejected"]
    assert warnings
    assert warnings[0]["type"] == "Warning"
    assert all(secret not in e["message"] for e in events)


@pytest.mark.operator
@pytest.mark.timeout(120)
async def test_refused_deployment_sets_child_rejected_and_writes_nothing_else(emulator: KubeEmulator) -> None:
    secret = "Sup3rSecretPw"
    value = base64.b64encode(b"postgresql://relay:pw@db:5432/shop").decode()
    await emulator.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "orders-db", "namespace": NAMESPACE},
            "data": {"url": value},
        }
    )
    await emulator.apply(publisher({"affinity": BAD_AFFINITY, "env": [{"name": "API_KEY", "value": secret}]}))
    async with kopf_in_process():

        def rejected() -> bool:
            obj = emulator.get(API, KIND, NAMESPACE, "orders") or {}
            return any(c["reason"] == "ChildRejected" for c in (obj.get("status") or {}).get("conditions") or [])

        await wait_for(rejected, 20)
        await wait_for(lambda: any(e["reason"] == "ChildRejected" for e in emulator.list("v1", "Event", NAMESPACE)), 20)
        obj = emulator.get(API, KIND, NAMESPACE, "orders")
        assert obj is not None
        assert_child_rejected(
            obj, emulator.list("v1", "Event", NAMESPACE), 'operator: Unsupported value: "Maybe"', secret
        )
        assert emulator.list("apps/v1", "Deployment", NAMESPACE) == []
        assert "totals" not in obj["status"]


def test_child_rejected_plan_is_status_and_event_only() -> None:
    from datetime import UTC, datetime

    from outbox_operator.reconcile import Observed, plan_child_rejected

    observed = Observed(
        body={"metadata": {"name": "orders", "namespace": "shop", "uid": "u", "generation": 3}, "status": {}},
        children={},
        secrets={},
        pods=None,
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    action = Action(
        "create",
        "Deployment",
        "orders-relay",
        {"spec": {"template": {"spec": {"containers": [{"env": [{"name": "K", "value": "hunter22"}]}]}}}},
    )
    result = plan_child_rejected(observed, action, 'env[0]: Invalid value: "hunter22"')
    assert result.actions == []
    assert "hunter22" not in str(result.status_patch) + str(result.events)
    assert result.status_patch["conditions"][0]["reason"] == "ChildRejected"
    assert [e.type for e in result.events] == ["Warning", "Warning"]


def test_child_rejected_keeps_the_publishers_own_names_and_hides_the_users_literals() -> None:
    """Only the user's literal env values are hidden: the operator's ``OUTBOX_*`` entries come from the
    spec (secrets travel by reference) and name the publisher, so hiding them made the message read
    ``Deployment <redacted>-relay``."""
    from datetime import UTC, datetime

    from outbox_operator.reconcile import Observed, plan_child_rejected

    observed = Observed(
        body={"metadata": {"name": "orders", "namespace": "shop", "uid": "u", "generation": 1}, "status": {}},
        children={},
        secrets={},
        pods=None,
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    env = [
        {"name": "API_KEY", "value": "hunter22"},
        {"name": "OUTBOX_PUBLISHER", "value": "orders"},
        {"name": "OUTBOX_TABLE", "value": "outbox"},
    ]
    action = Action(
        "create", "Deployment", "orders-relay", {"spec": {"template": {"spec": {"containers": [{"env": env}]}}}}
    )
    api = 'Deployment.apps "orders-relay" is invalid: env[0]: Invalid value: "hunter22"; labels outbox.dev/publisher'
    message = plan_child_rejected(observed, action, api).status_patch["conditions"][0]["message"]
    assert "hunter22" not in message
    assert message.count("orders-relay") == 2, message
    assert "outbox.dev/publisher" in message, message
