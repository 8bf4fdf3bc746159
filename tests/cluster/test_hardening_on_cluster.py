"""Issue #18 (operator hardening) on the real API server: ways around the spec's guards.

Each test states what a user relies on; they fail until #18's fixes land and are merged with them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from clusterkit import KIND, Kubectl, condition, kubectl_async, operator_in_process
from controlplane import ControlPlane
from kubeapi import KubeApi
from relaykit import secret

from support.polling import wait_for

pytestmark = pytest.mark.timeout(300)

DSN = "postgresql://relay:hunter2@db.example:5432/app"


def minimal(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "partitions": 4,
            "database": {"secretRef": {"name": f"{name}-db"}},
            "nats": {"servers": ["nats://127.0.0.1:4222"]},
            **spec,
        },
    }


@pytest.mark.parametrize("spelling", ["outbox_database_url", "Outbox_Publisher", "OUTBOX_BATCH_SIZE"])
def test_reserved_worker_variables_are_refused_in_any_spelling(
    spelling: str, crd: str, kubectl: Kubectl, namespace: str
) -> None:
    """The worker reads its settings case-insensitively, so `outbox_database_url` in worker.env would
    replace the DSN from the Secret: the API server must refuse every spelling (#18 item 1)."""
    obj = minimal("env", worker={"env": [{"name": spelling, "value": "x"}]})
    result = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, f"{spelling} was accepted"
    assert "spec.worker.env must not set OUTBOX_" in " ".join(result.stderr.split())


def test_a_dsn_pasted_as_secret_name_is_refused(crd: str, kubectl: Kubectl, namespace: str) -> None:
    """A Secret name has the Kubernetes name pattern, so a DSN pasted there never reaches the operator
    (whose conditions and Events would copy the name, #18 item 2). The API server's refusal echoes
    the value back to the user who sent it; only the operator must never repeat it."""
    obj = minimal("pasted")
    obj["spec"]["database"]["secretRef"]["name"] = DSN
    result = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, "a DSN was accepted as a Secret name"
    assert "spec.database.secretRef.name" in result.stderr


def test_a_quantity_the_api_server_cannot_parse_is_refused_up_front(crd: str, kubectl: Kubectl, namespace: str) -> None:
    """`resources.requests.cpu: lots` never reaches the operator: the CRD's quantity pattern refuses
    it at admission, naming the field (#18 item 3)."""
    obj = minimal("lots", worker={"resources": {"requests": {"cpu": "lots"}}})
    result = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, "cpu: lots was accepted"
    assert "spec.worker.resources.requests" in result.stderr


# Affinity is passed through as the user wrote it (the schema cannot check all of core/v1 Affinity):
# the OutboxPublisher is admitted, and the API server refuses the Deployment the operator writes.
BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Maybe", "values": ["a"]}]}]
        }
    }
}


async def test_a_child_the_api_server_rejects_shows_in_status(
    crd: str,
    api: KubeApi,
    kubectl: Kubectl,
    control_plane: ControlPlane,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child the API server refuses (here the Deployment, for an affinity the CRD lets through) is
    reported: Ready=False/ChildRejected with the server's reason (#18 item 3), no silent empty Ready.
    (It used `cpu: lots`, which the CRD refuses up front, so the operator's path never ran.)"""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    obj = minimal("affine", worker={"affinity": BAD_AFFINITY})
    result = await kubectl_async(kubectl, "apply", "-n", namespace, "-f", "-", check=False, input=json.dumps(obj))
    assert result.returncode == 0, f"the OutboxPublisher itself was refused: {result.stderr}"
    await api.create(secret("affine-db", "postgresql://unused@127.0.0.1:1/db"), namespace)
    async with operator_in_process([namespace]):

        async def rejected() -> dict[str, Any]:
            ready = condition(await api.get(KIND, namespace, "affine"), "Ready")
            return ready if ready.get("reason") == "ChildRejected" else {}

        ready = await wait_for(rejected, 60)
    assert ready["status"] == "False"
    assert "nodeAffinity" in ready["message"], ready["message"]  # the server's reason, by its field
    assert 'operator: Invalid value: "Maybe"' in ready["message"], ready["message"]
    assert "Deployment affine-relay" in ready["message"], ready["message"]  # its own names are not hidden
