"""Each chart check FAILS on a deliberately broken input.

The broken variants are built in tmp dirs (a copy of the chart, a copy of the CRDs, a Dockerfile)
or come from tests/chart/broken-values/. A check that cannot fail proves nothing.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import chartchecks as cc
import pytest
import yaml
from chartchecks import Render, load_tool_module

BROKEN_VALUES = sorted((Path(__file__).parent / "broken-values").glob("*.yaml"))
K8S_VERSION = "1.30"


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <helm error text>'"
    return first.removeprefix("# expect: ")


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


# --- a broken values file ----------------------------------------------------------------------------


def test_there_are_broken_values_files() -> None:
    assert len(BROKEN_VALUES) >= 5


@pytest.mark.parametrize("values", BROKEN_VALUES, ids=[p.stem for p in BROKEN_VALUES])
def test_helm_lint_fails_on_broken_values(helm: Path, values: Path) -> None:
    problems = cc.helm_lint(helm, cc.CHART, [values])
    assert problems, f"helm lint accepted {values.name}"
    assert _expectation(values) in problems[0]


@pytest.mark.parametrize("values", BROKEN_VALUES, ids=[p.stem for p in BROKEN_VALUES])
def test_helm_template_refuses_broken_values(render: Render, values: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        render([values])
    assert _expectation(values) in info.value.stderr


def test_kubernetes_validate_catches_what_the_schema_would_have(render: Render, chart_copy: Path) -> None:
    """Without values.schema.json a wrong type reaches the manifests; kubernetes-validate stops it."""
    (chart_copy / "values.schema.json").unlink()
    bad = chart_copy / "bad.yaml"
    bad.write_text("operator:\n  terminationGracePeriodSeconds: thirty\n")
    docs = cc.load_docs(render([bad], chart=chart_copy))
    problems = cc.k8s_validate(docs, K8S_VERSION)
    assert any("terminationGracePeriodSeconds" in p and "thirty" in p for p in problems), problems


def test_kubernetes_validate_rejects_unknown_fields_and_kinds() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
            "replica": 1,  # typo
        },
    }
    assert cc.k8s_validate([deployment], K8S_VERSION)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("Couldn't find schema" in p for p in cc.k8s_validate([unknown], K8S_VERSION))
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "30s"}]},
    }
    assert cc.k8s_validate([monitor], K8S_VERSION)


def test_values_schema_strictness_check_finds_an_open_object() -> None:
    schema = json.loads((cc.CHART / "values.schema.json").read_text())
    del schema["properties"]["rbac"]["additionalProperties"]
    assert "#/properties/rbac" in cc.schema_open_objects(schema)


def test_undocumented_value_is_found() -> None:
    schema = json.loads((cc.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((cc.CHART / "values.yaml").read_text())
    values["operator"]["newKnob"] = 3
    schema["properties"]["operator"]["properties"]["newKnob"] = {"type": "integer"}
    readme = (cc.CHART / "README.md").read_text()
    assert cc.undocumented_values(values, schema, readme) == ["operator.newKnob"]
    assert cc.stale_documented_keys(values, schema, readme + "\n| `operator.gone` | `1` | x |\n") == ["operator.gone"]
    wrong = readme.replace("| `operator.healthPort` | `8080` |", "| `operator.healthPort` | `9090` |")
    assert cc.misdocumented_defaults(values, wrong) == ["operator.healthPort: README 9090, values.yaml 8080"]


# --- an RBAC wildcard ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "original", "wildcard"),
    [
        ("verbs", "verbs: [get, list, watch, create, update, patch, delete]", 'verbs: ["*"]'),
        ("resources", "resources: [deployments]", 'resources: ["*"]'),
        ("apiGroups", "apiGroups: [apps]", 'apiGroups: ["*"]'),
    ],
)
def test_rbac_wildcard_fails(render: Render, chart_copy: Path, field: str, original: str, wildcard: str) -> None:
    rbac = chart_copy / "templates" / "rbac.yaml"
    text = rbac.read_text()
    assert original in text
    rbac.write_text(text.replace(original, wildcard, 1))
    for values in ("default-values.yaml", "namespaced-values.yaml"):
        docs = cc.load_docs(render([chart_copy / "ci" / values], chart=chart_copy))
        problems = cc.rbac_wildcards(docs)
        assert problems, f"wildcard {field} not detected with {values}"
        assert all(f".{field}: '*'" in p for p in problems)


def test_rbac_wildcard_in_subresource_and_aggregation_fails() -> None:
    role = {"kind": "ClusterRole", "metadata": {"name": "r"}, "rules": [{"resources": ["pods/*"], "verbs": ["get"]}]}
    assert cc.rbac_wildcards([role])
    aggregated = {"kind": "ClusterRole", "metadata": {"name": "a"}, "aggregationRule": {"clusterRoleSelectors": []}}
    assert cc.rbac_wildcards([aggregated])


# --- a drifted CRD copy ------------------------------------------------------------------------------------


def test_drifted_crd_copy_fails(tmp_path: Path) -> None:
    sync = load_tool_module("sync_chart_crd")
    source, target = tmp_path / "crds", tmp_path / "chart-crds"
    shutil.copytree(cc.CANONICAL_CRDS, source)
    shutil.copytree(cc.CANONICAL_CRDS, target)  # an in-sync copy, whatever the repository's state
    assert sync.drift(source, target) == []
    crd = target / "outboxpublisher.yaml"
    crd.write_text(crd.read_text().replace("maximum: 4096", "maximum: 4095", 1))
    assert sync.drift(source, target) == [f"{crd}: differs from {source / 'outboxpublisher.yaml'}"]
    (target / "stale.yaml").write_text("kind: Nothing\n")
    (source / "new.yaml").write_text("kind: Nothing\n")
    problems = sync.drift(source, target)
    assert any("stale copy" in p for p in problems)
    assert any("missing" in p for p in problems)
    sync.sync(source, target)
    assert sync.drift(source, target) == []


def test_sync_script_check_mode_exits_nonzero_on_drift(tmp_path: Path) -> None:
    """The script's --check as CI or a developer would run it, on a repository copy with drift."""
    repo = tmp_path / "repo"
    shutil.copytree(cc.ROOT / "tools", repo / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(cc.CANONICAL_CRDS, repo / "crds")
    shutil.copytree(cc.CANONICAL_CRDS, repo / "helm" / "outbox-operator" / "crds")
    script = repo / "tools" / "sync_chart_crd.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    (repo / "crds" / "outboxpublisher.yaml").write_text(
        (repo / "crds" / "outboxpublisher.yaml").read_text() + "# drift\n"
    )
    bad = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "differs from" in bad.stderr


# --- Pod Security Standard "restricted" ----------------------------------------------------------------


def test_pss_fails_on_a_privileged_template(render: Render, chart_copy: Path) -> None:
    deployment = chart_copy / "templates" / "deployment.yaml"
    text = deployment.read_text()
    assert "allowPrivilegeEscalation: false" in text
    deployment.write_text(text.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"))
    problems = cc.pss_violations(cc.load_docs(render(chart=chart_copy)))
    assert problems == [
        "Deployment/outbox-outbox-operator: containers[operator]: allowPrivilegeEscalation must be false"
    ]


_MUTATIONS: list[tuple[str, str, Any]] = [
    ("spec.hostNetwork", "hostNetwork must not be true", True),
    ("spec.hostPID", "hostPID", True),
    ("spec.securityContext.runAsUser", "runAsUser must not be 0", 0),
    ("spec.securityContext.seccompProfile", "seccompProfile must be RuntimeDefault", None),
    ("spec.securityContext.seccompProfile.type", "seccompProfile.type=Unconfined", "Unconfined"),
    ("spec.containers.0.securityContext.privileged", "privileged", True),
    ("spec.containers.0.securityContext.capabilities", "capabilities.drop must include ALL", {"drop": []}),
    ("spec.containers.0.securityContext.capabilities.add", "capabilities.add ['SYS_ADMIN']", ["SYS_ADMIN"]),
    ("spec.containers.0.securityContext.runAsNonRoot", "runAsNonRoot must be true", False),
    ("spec.containers.0.ports.0.hostPort", "hostPort 8080", 8080),
    ("spec.volumes.0", "uses ['hostPath']", {"name": "host", "hostPath": {"path": "/"}}),
    ("spec.securityContext.sysctls", "sysctl 'kernel.msgmax'", [{"name": "kernel.msgmax", "value": "1"}]),
    ("spec.containers.0.securityContext.procMount", "procMount=Unmasked", "Unmasked"),
    ("spec.securityContext.seLinuxOptions", "seLinuxOptions.type=spc_t", {"type": "spc_t"}),
]


def _set(obj: Any, dotted: str, value: Any) -> None:
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    for key in keys[:-1]:
        obj = obj[key]
    if value is None:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value


def test_pss_check_requires_run_as_non_root_somewhere(render: Render) -> None:
    deployment = _deployment(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    del spec["containers"][0]["securityContext"]["runAsNonRoot"]
    assert cc.pss_restricted("pod", spec) == []  # the pod-level setting covers the container
    spec["securityContext"]["runAsNonRoot"] = False
    assert cc.pss_restricted("pod", spec) == ["pod: containers[operator]: runAsNonRoot must be true (pod or container)"]


@pytest.mark.parametrize(("path", "expected", "value"), _MUTATIONS, ids=[m[0] + "=" + str(m[2]) for m in _MUTATIONS])
def test_pss_check_detects_each_violation(render: Render, path: str, expected: str, value: Any) -> None:
    deployment = _deployment(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    template = copy.deepcopy(deployment["spec"]["template"])
    assert cc.pss_restricted("pod", template["spec"]) == []
    _set(template, path, value)
    problems = cc.pss_restricted("pod", template["spec"])
    assert any(expected in p for p in problems), problems


# --- example CRs -------------------------------------------------------------------------------------------


def _crd_schema() -> dict[str, Any]:
    crd = cc.load_docs((cc.CHART / "crds" / "outboxpublisher.yaml").read_text())[0]
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(partitons=4), "Additional properties are not allowed ('partitons'"),
        (lambda s: s.update(partitions="four"), "partitions: 'four' is not of type 'integer'"),
        (lambda s: s.pop("database"), "spec.database: Required value"),
        (lambda s: s["nats"].update(servers=["nats.example.com:4222"]), "does not match"),
        (lambda s: s.update(publishing={"ackTimeoutSeconds": 0}), "less than or equal to the minimum of 0"),
        (lambda s: s.update(worker={"logLevel": "TRACE"}), "'TRACE' is not one of"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required", "pattern", "exclusive-minimum", "enum"],
)
def test_broken_example_cr_fails(mutate: Any, expected: str) -> None:
    doc = cc.load_docs((cc.ROOT / "deploy" / "kind" / "outboxpublisher.yaml").read_text())[0]
    assert cc.validate_custom_resource(doc, _crd_schema()) == []
    mutate(doc["spec"])
    problems = cc.validate_custom_resource(doc, _crd_schema())
    assert any(expected in p for p in problems), problems


def _cel_messages(schema: Any) -> list[str]:
    found: list[str] = []
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            found.append(" ".join(rule["message"].split()))
        for value in schema.values():
            found += _cel_messages(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _cel_messages(value)
    return found


def _is_cel_expectation(path: Path) -> bool:
    return any(_expectation(path) in m for m in _cel_messages(_crd_schema()))


# Only the files that state a schema error. CEL rules ("# expect:" with a rule's message) need an API
# server: tests/cluster/test_api_server.py applies every invalid example to a real one. Files marked
# "# operator-rejects:" are the operator's.
INVALID_EXAMPLES = [
    p
    for p in sorted((cc.ROOT / "examples" / "invalid").glob("*.yaml"))
    if p.read_text().startswith("# expect: ") and not _is_cel_expectation(p)
]


@pytest.mark.parametrize("path", INVALID_EXAMPLES, ids=[p.stem for p in INVALID_EXAMPLES])
def test_repository_invalid_examples_fail(path: Path) -> None:
    """examples/invalid/ (the operator's) state their error in '# expect:'. Schema errors must be
    caught here, by the same jsonschema check the chart's example uses."""
    expected = _expectation(path)
    problems = cc.validate_custom_resource(cc.load_docs(path.read_text())[0], _crd_schema())
    assert any(expected in p for p in problems), problems


# --- yamllint ------------------------------------------------------------------------------------------


def test_yamllint_fails_on_broken_plain_yaml(tmp_path: Path) -> None:
    broken = tmp_path / "values.yaml"
    broken.write_text("image:\n  tag: v1 \n  tag: v2\nenabled: yes\n")
    problems = cc.yamllint_files([broken])
    assert any("trailing spaces" in p for p in problems)
    assert any("duplication of key" in p for p in problems)
    assert any("truthy" in p for p in problems)


def test_yamllint_fails_on_broken_rendered_output(render: Render, chart_copy: Path) -> None:
    sa = chart_copy / "templates" / "serviceaccount.yaml"
    text = sa.read_text()
    assert "automountServiceAccountToken: false" in text
    sa.write_text(text.replace("automountServiceAccountToken: false", "automountServiceAccountToken:  false"))
    problems = cc.yamllint_text(render(chart=chart_copy))
    assert any("too many spaces after colon" in p for p in problems), problems


# --- hadolint ------------------------------------------------------------------------------------------


def test_hadolint_fails_on_a_broken_dockerfile(hadolint_bin: Path, tmp_path: Path) -> None:
    text = (cc.ROOT / "Dockerfile").read_text()
    broken = re.sub(r"^USER .*$", "USER root", text, flags=re.M)
    broken = broken.replace(
        "FROM ${PYTHON_IMAGE} AS runtime", "FROM ${PYTHON_IMAGE} AS runtime\nRUN apt-get update && apt-get install gcc"
    )
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(broken)
    problems = "\n".join(cc.hadolint(hadolint_bin, dockerfile, cc.ROOT / ".hadolint.yaml"))
    for rule in ("DL3002", "DL3008", "DL3009", "DL3015"):  # root user, unpinned apt, apt lists, recommends
        assert rule in problems, problems
