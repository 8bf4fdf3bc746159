"""What only a real API server does with the CRD and OutboxPublishers (no pods, no operator).

Each test runs the genuine kubectl against kube-apiserver built from Kubernetes' modules: server-side
apply of the CRD, the schema's defaulting and pruning, every CEL rule (``x-kubernetes-validations``)
including the transition rules, the scale subresource behind ``kubectl scale`` and the server-side
printer columns. These are the checks the emulator suite (tests/operator/) only imitates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterkit import CRD_PATH, ROOT, Kubectl

EXAMPLES = ROOT / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BAD = sorted((EXAMPLES / "invalid").glob("*.yaml"))

MINIMAL = """
apiVersion: outbox.dev/v1alpha1
kind: OutboxPublisher
metadata: {name: billing}
spec:
  partitions: 4
  database: {secretRef: {name: billing-db}}
  nats: {servers: ["nats://nats.nats.svc:4222"]}
"""


def documented_failure(path: Path) -> tuple[str, str]:
    """``(kind, text)`` from an invalid example's first line: ``# expect: ...`` or ``# operator-rejects: ...``."""
    kind, _, text = path.read_text().splitlines()[0].lstrip("# ").partition(": ")
    assert kind in ("expect", "operator-rejects"), f"{path.name}: the first line must say what fails"
    return kind, text


def api_server_phrasing(documented: str) -> str:
    """The API server's wording of a message the example documents in JSON-Schema wording.

    CEL rule messages are the CRD's own text and come back verbatim. Structural-schema errors are
    worded by the server differently from ``jsonschema`` (which the emulator suite uses), so the
    three forms the examples use are translated here.
    """
    if match := re.fullmatch(r"'(.*)' is not one of \[.*\]", documented):
        return f'Unsupported value: "{match.group(1)}"'
    if match := re.fullmatch(r"does not match (.*)", documented):
        return f"should match {match.group(1)}"
    if match := re.fullmatch(r"'(.*)' is a required property", documented):
        return f"{match.group(1)}: Required value"
    return documented


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", *args, "-o", "json").stdout))


def test_crd_server_side_apply_twice_changes_nothing(crd: str, kubectl: Kubectl) -> None:
    before = get_json(kubectl, "crd", crd)
    kubectl("apply", "--server-side", "--field-manager=outbox-tests", "-f", str(CRD_PATH))
    after = get_json(kubectl, "crd", crd)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    names = {c["type"]: c["status"] for c in after["status"]["conditions"]}
    assert names["Established"] == "True"
    assert names["NamesAccepted"] == "True"
    # a structural schema: the server reports no NonStructuralSchema condition
    assert "NonStructuralSchema" not in names


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_example_is_accepted(path: Path, crd: str, kubectl: Kubectl, namespace: str) -> None:
    out = kubectl("apply", "-n", namespace, "-f", str(path)).stdout
    assert "created" in out
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    stored = get_json(kubectl, "obp", name, "-n", namespace)
    assert stored["spec"]["partitions"] >= 1


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_invalid_example_fails_as_its_file_documents(path: Path, crd: str, kubectl: Kubectl, namespace: str) -> None:
    kind, documented = documented_failure(path)
    result = kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    if kind == "operator-rejects":
        # the schema cannot see it: the API accepts it, and the operator flags it (test_operator_invalid_spec)
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
    expected = api_server_phrasing(documented)
    assert expected in " ".join(result.stderr.split()), result.stderr
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    assert kubectl("get", "obp", name, "-n", namespace, check=False).returncode != 0, "nothing is stored"


def test_defaults_are_applied_by_the_server(crd: str, kubectl: Kubectl, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=MINIMAL)
    spec = get_json(kubectl, "obp", "billing", "-n", namespace)["spec"]
    assert spec["replicas"] == 1
    assert spec["paused"] is False
    assert spec["database"]["schema"] == "public"
    assert spec["database"]["table"] == "outbox"
    assert spec["database"]["secretRef"]["key"] == "url"
    assert spec["autoscaling"]["enabled"] is False  # a defaulted {} gets its own defaults
    assert spec["stream"]["mode"] == "expect"


def test_unknown_field_is_refused_strictly_and_pruned_otherwise(crd: str, kubectl: Kubectl, namespace: str) -> None:
    with_unknown = MINIMAL.replace("partitions: 4", "partitions: 4\n  surprise: 1")
    strict = kubectl("apply", "-n", namespace, "-f", "-", input=with_unknown, check=False)
    assert strict.returncode != 0
    assert 'unknown field "spec.surprise"' in strict.stderr
    kubectl("apply", "-n", namespace, "--validate=false", "-f", "-", input=with_unknown)
    spec = get_json(kubectl, "obp", "billing", "-n", namespace)["spec"]
    assert "surprise" not in spec
    assert spec["partitions"] == 4


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"partitions": 8}, "spec.partitions is immutable"),
        ({"database": {"table": "other"}}, "spec.database.table is immutable"),
        ({"database": {"schema": "other"}}, "spec.database.schema is immutable"),
    ],
    ids=["partitions", "table", "schema"],
)
def test_immutable_fields_cannot_change(
    patch: dict[str, Any], message: str, crd: str, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=MINIMAL)
    result = kubectl(
        "patch", "obp", "billing", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": patch}), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_kubectl_scale_uses_the_scale_subresource(crd: str, kubectl: Kubectl, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=MINIMAL)
    kubectl("scale", "obp", "billing", "-n", namespace, "--replicas", "3")
    assert get_json(kubectl, "obp", "billing", "-n", namespace)["spec"]["replicas"] == 3
    scale = json.loads(
        kubectl(
            "get", "--raw", f"/apis/outbox.dev/v1alpha1/namespaces/{namespace}/outboxpublishers/billing/scale"
        ).stdout
    )
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 3
    # the CEL rules hold through the subresource too: more workers than partitions is refused
    refused = kubectl("scale", "obp", "billing", "-n", namespace, "--replicas", "5", check=False)
    assert refused.returncode != 0
    assert "spec.replicas must not exceed spec.partitions" in refused.stderr


def test_kubectl_get_shows_the_printer_columns(crd: str, kubectl: Kubectl, namespace: str) -> None:
    """The server renders the CRD's additionalPrinterColumns: priority 0 by default, all with -o wide."""
    columns = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["additionalPrinterColumns"]
    default = ["NAME"] + [c["name"].upper() for c in columns if c.get("priority", 0) == 0]
    wide = ["NAME"] + [c["name"].upper() for c in columns]
    kubectl("apply", "-n", namespace, "-f", "-", input=MINIMAL)
    assert kubectl("get", "obp", "-n", namespace).stdout.splitlines()[0].split() == default
    assert kubectl("get", "outboxpublishers", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split() == wide
    assert len(wide) > len(default)
