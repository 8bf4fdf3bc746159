"""The chart as shipped passes every check (tests/chart/test_negative.py shows each check can fail)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import chartchecks as cc
import kopf
import kubernetes_validate
import promql_parser
import pytest
import yaml
from chartchecks import Render, load_tool_module

# The product's own modules are imported here, not skipped when missing: a product that fails to import must
# fail these checks, not skip them (a skipped check is counted as passing).
from outbox_cli import cmd_operator as cmd
from outbox_common import names
from outbox_operator import children, constants, handlers
from outbox_operator import spec as spec_mod

CI_VALUES = sorted((cc.CHART / "ci").glob("*-values.yaml"))
VALUE_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
K8S_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
SCHEMA = json.loads((cc.CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((cc.CHART / "values.yaml").read_text())
README = (cc.CHART / "README.md").read_text()

# values.schema.json objects that are deliberately open: Kubernetes types passed through verbatim.
# The rendered result is validated against the Kubernetes schemas by test_rendered_manifests_validate.
PASSTHROUGH = {
    "#/properties/operator/properties/affinity/properties/nodeAffinity",
    "#/properties/operator/properties/affinity/properties/podAffinity",
    "#/properties/operator/properties/affinity/properties/podAntiAffinity",
    "#/properties/operator/properties/extraEnv/items/properties/valueFrom",
}


def crds() -> list[dict[str, Any]]:
    return cc.load_docs((cc.CHART / "crds" / "outboxpublisher.yaml").read_text())


def docs_for(render: Render, values: Path) -> list[dict[str, Any]]:
    return cc.load_docs(render([values]))


def test_values_matrix_covers_the_modes() -> None:
    assert {"default", "namespaced", "clusterwide", "metrics"} <= set(VALUE_IDS)


# --- helm lint and Kubernetes schemas ----------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_helm_lint_strict(helm: Path, values: Path) -> None:
    assert cc.helm_lint(helm, cc.CHART, [values]) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_rendered_manifests_validate(render: Render, values: Path, version: str) -> None:
    major_minor = ".".join(version.split(".")[:2])
    docs = cc.load_docs(render([values], kube_version=f"{major_minor}.0"))  # also checks Chart kubeVersion
    assert docs, "nothing rendered"
    assert cc.k8s_validate(docs, version, crds=crds()) == []


def test_newest_kubernetes_version_is_recent() -> None:
    major, minor = (int(x) for x in K8S_VERSIONS[1].split(".")[:2])
    assert (major, minor) >= (1, 37), "kubernetes-validate bundles older schemas than expected"


# --- Pod Security Standard and RBAC -------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_every_pod_is_pss_restricted(render: Render, values: Path) -> None:
    docs = docs_for(render, values)
    assert list(cc.pod_specs(docs)), "no pod rendered"
    assert cc.pss_violations(docs) == []


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_rbac_has_no_wildcards(render: Render, values: Path) -> None:
    assert cc.rbac_wildcards(docs_for(render, values)) == []


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_cluster_scope_uses_one_clusterrole(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    assert len(kinds["ClusterRole"]) == 1
    assert len(kinds["ClusterRoleBinding"]) == 1
    assert "Role" not in kinds
    assert "RoleBinding" not in kinds
    binding = kinds["ClusterRoleBinding"][0]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": kinds["ServiceAccount"][0]["metadata"]["name"], "namespace": "outbox-system"}
    ]
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args
    assert not any(a.startswith("--namespace") for a in args)


def test_namespaced_scope_creates_nothing_cluster_wide(render: Render) -> None:
    docs = cc.load_docs(render([cc.CHART / "ci" / "namespaced-values.yaml"]))
    kinds = _by_kind(docs)
    cluster_scoped = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert cluster_scoped == []
    assert sorted(r["metadata"]["namespace"] for r in kinds["Role"]) == ["team-a", "team-b"]
    assert sorted(r["metadata"]["namespace"] for r in kinds["RoleBinding"]) == ["team-a", "team-b"]
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args
    assert "--all-namespaces" not in args


def test_namespaced_scope_defaults_to_release_namespace(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "namespaced-metrics-values.yaml"])))
    assert [r["metadata"]["namespace"] for r in kinds["Role"]] == ["outbox-system"]
    monitor = kinds["ServiceMonitor"][0]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["outbox-system"]}


def test_byo_rbac_renders_no_rbac_and_no_serviceaccount(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "byo-rbac-values.yaml"])))
    assert not {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & set(kinds)
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "outbox-operator-preprovisioned"


def _rules(render: Render) -> list[dict[str, Any]]:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    return list(kinds["ClusterRole"][0]["rules"])


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str = "") -> bool:
    return any(
        group in r.get("apiGroups", [])
        and resource in r.get("resources", [])
        and verb in r.get("verbs", [])
        and (not r.get("resourceNames") or name in r["resourceNames"])
        for r in rules
    )


def test_operator_holds_every_permission_it_grants_to_workers(render: Render) -> None:
    """Kubernetes refuses to create a Role granting more than its creator holds (no escalate verb)."""
    body = {"metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"}, "apiVersion": "outbox.dev/v1alpha1"}
    owner = children.Owner.from_body(body)
    worker_role = children.build_role(owner)
    rules = _rules(render)
    for rule in worker_role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert _allows(rules, group, resource, verb, "orders"), (group, resource, verb)


def test_operator_may_manage_every_child_kind(render: Render) -> None:
    rules = _rules(render)
    group = crds()[0]["spec"]["group"]
    plural = crds()[0]["spec"]["names"]["plural"]
    for api_group, resource in [
        ("apps", "deployments"),
        ("", "serviceaccounts"),
        ("", "services"),
        ("policy", "poddisruptionbudgets"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    ]:
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
            assert _allows(rules, api_group, resource, verb), (api_group, resource, verb)
    for verb in ("get", "list", "watch", "patch"):
        assert _allows(rules, group, plural, verb)
    assert _allows(rules, group, f"{plural}/status", "patch")
    assert _allows(rules, "", "events", "create")
    # the operator's reconcile reads from watches (operator/outbox_operator/state.py): Secrets and
    # worker Pods are listed and watched, never written
    for verb in ("get", "list", "watch"):
        assert _allows(rules, "", "secrets", verb)
        assert _allows(rules, "", "pods", verb)
    for verb in ("create", "update", "patch", "delete"):
        assert not _allows(rules, "", "secrets", verb), "the operator must never write a Secret"
        assert not _allows(rules, "", "pods", verb), "workers' pods belong to their Deployment"


def test_rbac_group_matches_the_operator(render: Render) -> None:
    crd = crds()[0]
    assert (crd["spec"]["group"], crd["spec"]["names"]["plural"]) == (constants.GROUP, constants.PLURAL)


# --- the operator Deployment ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_operator_runs_once_with_recreate(render: Render, values: Path) -> None:
    deployments = [d for d in docs_for(render, values) if d["kind"] == "Deployment"]
    assert len(deployments) == 1
    spec = deployments[0]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    container = spec["template"]["spec"]["containers"][0]
    assert container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_operator_args_parse_with_outboxctl(render: Render, values: Path) -> None:
    """The rendered command line is one `outboxctl operator` accepts (catches renamed flags)."""
    container = _by_kind(docs_for(render, values))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"][1:]
    parser = argparse.ArgumentParser(exit_on_error=False)
    cmd.add_arguments(parser)
    parsed = parser.parse_args(args)
    assert parsed.worker_image
    assert parsed.liveness.endswith(f":{container['ports'][0]['containerPort']}/healthz")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert parsed.all_namespaces or parsed.namespace


def test_operator_is_standalone_without_peering() -> None:
    """The chart grants no kopfpeerings and runs one replica because the operator never peers."""
    settings = kopf.OperatorSettings()
    handlers.configure_settings(settings)
    assert settings.peering.standalone is True


def test_namespaced_operator_never_scans_the_cluster() -> None:
    """In namespaced scope the chart grants Roles in the watched namespaces only; an operator that
    listed Namespaces and CRDs cluster-wide got 403s and started a minute late (tests/cluster)."""
    settings = kopf.OperatorSettings()
    handlers.configure_settings(settings, clusterwide=False)
    assert settings.scanning.disabled is True
    handlers.configure_settings(settings, clusterwide=True)
    assert settings.scanning.disabled is False


def test_image_reference(render: Render) -> None:
    default = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    chart = yaml.safe_load((cc.CHART / "Chart.yaml").read_text())
    container = default["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{VALUES['image']['repository']}:{chart['appVersion']}"
    assert f"--worker-image={container['image']}" in container["args"]
    pinned = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "clusterwide-values.yaml"])))
    container = pinned["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"registry\.example\.com/outbox-relay@sha256:[0-9a-f]{64}", container["image"])
    assert "--worker-image=registry.example.com/outbox-relay:worker-pinned" in container["args"]


def test_chart_default_image_is_the_operators_default_worker_image() -> None:
    chart = yaml.safe_load((cc.CHART / "Chart.yaml").read_text())
    assert f"{VALUES['image']['repository']}:{chart['appVersion']}" == constants.DEFAULT_WORKER_IMAGE


# --- values: schema and documentation --------------------------------------------------------------------


def test_values_schema_is_valid_and_accepts_the_defaults() -> None:
    import jsonschema

    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)
    for values in CI_VALUES:
        merged = _merge(VALUES, yaml.safe_load(values.read_text()) or {})
        jsonschema.Draft7Validator(SCHEMA).validate(merged)


def _merge(base: Any, override: Any) -> Any:
    """Helm's coalescing of a values file over the defaults: maps merge, everything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base.get(k), v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def test_values_schema_rejects_unknown_keys_everywhere() -> None:
    open_objects = set(cc.schema_open_objects(SCHEMA))
    assert open_objects - PASSTHROUGH == set(), "objects without additionalProperties: false"
    assert open_objects >= PASSTHROUGH, "stale PASSTHROUGH entry"


def test_every_value_is_documented_in_the_chart_readme() -> None:
    assert cc.undocumented_values(VALUES, SCHEMA, README) == []
    assert cc.stale_documented_keys(VALUES, SCHEMA, README) == []
    assert cc.misdocumented_defaults(VALUES, README) == []


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_notes_render_next_steps(helm: Path, values: Path, tmp_path: Path) -> None:
    """NOTES.txt only renders on install; a client-side dry run renders it without a cluster."""
    result = subprocess.run(
        [str(helm), "install", "outbox", str(cc.CHART), "--dry-run=client", "-n", "outbox-system", "-f", str(values)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "none")},
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "rollout status deployment/outbox-outbox-operator" in notes
    assert "helm show crds" in notes
    scope = (yaml.safe_load(values.read_text()) or {}).get("operator", {}).get("scope", "cluster")
    assert ("in every namespace" in notes) == (scope == "cluster")


def test_readme_documents_the_kind_command() -> None:
    assert "pytest -m kind tests/kind" in README


# --- CRDs and custom resources ---------------------------------------------------------------------------


def test_chart_crds_identical_to_canonical() -> None:
    sync = load_tool_module("sync_chart_crd")
    assert sync.drift() == []


def test_crd_is_a_valid_apiextensions_object() -> None:
    for version in K8S_VERSIONS:
        assert cc.k8s_validate(crds(), version) == []


def _example_crs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in [*sorted((cc.ROOT / "examples").glob("*.yaml")), cc.ROOT / "deploy" / "kind" / "outboxpublisher.yaml"]:
        for doc in cc.load_docs(path.read_text()):
            if doc.get("kind") == "OutboxPublisher":
                found.append((str(path.relative_to(cc.ROOT)), doc))
    return found


def test_repository_example_crs_are_valid() -> None:
    examples = _example_crs()
    assert examples, "no OutboxPublisher examples found"
    schema = crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name, doc in examples:
        assert cc.validate_custom_resource(doc, schema) == [], name


def test_chart_example_cr_is_valid(render: Render) -> None:
    docs = [
        d for d in cc.load_docs(render([cc.CHART / "ci" / "metrics-values.yaml"])) if d["kind"] == "OutboxPublisher"
    ]
    assert len(docs) == 1
    schema = crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert cc.validate_custom_resource(docs[0], schema) == []


# --- metrics ---------------------------------------------------------------------------------------------


def test_dashboard_uses_only_metrics_the_worker_exports() -> None:
    exported = {v for k, v in vars(names).items() if k.startswith("M_") and isinstance(v, str)}
    dashboard = json.loads((cc.CHART / "dashboards" / "outbox-relay.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\boutbox_[a-z_]+", e)}
    assert used, "dashboard queries no metric"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def _alert_rules(render: Render) -> list[dict[str, Any]]:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "metrics-values.yaml"])))
    (rule,) = kinds["PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_alerts_parse_as_promql_and_use_only_metrics_the_worker_exports(render: Render) -> None:
    """Each alert's expression is valid PromQL, reads only metrics the worker exports, aggregates by
    publisher, and says where to look next; the threshold comes from the values."""
    exported = {v for k, v in vars(names).items() if k.startswith("M_") and isinstance(v, str)}
    rules = _alert_rules(render)
    assert [r["alert"] for r in rules] == [
        "OutboxRelayLagging",
        "OutboxRelayStalled",
        "OutboxRelayConfigurationError",
        "OutboxRelayDeadLetters",
        "OutboxRelayNotifyUnavailable",
        "OutboxRelayDatabaseUnavailable",
    ]
    for rule in rules:
        promql_parser.parse(rule["expr"])  # raises ValueError on a syntax error
        used = set(re.findall(r"\boutbox_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: unknown metrics {sorted(used - exported)}"
        assert "publisher" in rule["expr"], rule["alert"]
        text = rule["annotations"]["description"]
        assert "kubectl describe outboxpublisher" in text or "outboxctl dead-letters" in text, rule["alert"]
        assert "{{ $labels.publisher }}" in rule["annotations"]["summary"], rule["alert"]
    assert rules[0]["expr"].endswith("> 120")  # ci/metrics-values.yaml: oldestPendingSeconds


def test_alert_rules_are_off_by_default(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "default-values.yaml"])))
    assert "PrometheusRule" not in kinds


def test_dashboard_configmap_carries_the_json(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "metrics-values.yaml"])))
    cm = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["outbox-relay.json"])["uid"] == "outbox-relay"


def test_servicemonitor_selects_the_operators_metrics_services(render: Render) -> None:
    kinds = _by_kind(cc.load_docs(render([cc.CHART / "ci" / "metrics-values.yaml"])))
    monitor = kinds["ServiceMonitor"][0]["spec"]
    example = cc.load_docs((cc.ROOT / "deploy" / "kind" / "outboxpublisher.yaml").read_text())[0]
    example["metadata"]["uid"] = "u-1"
    owner = children.Owner.from_body(example)
    service = children.build_metrics_service(owner, spec_mod.parse_spec(example["spec"]))
    labels = service["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["namespaceSelector"] == {"any": True}


# --- YAML lint ------------------------------------------------------------------------------------------


def _plain_yaml() -> list[Path]:
    files = [
        cc.CHART / "Chart.yaml",
        cc.CHART / "values.yaml",
        *sorted((cc.CHART / "ci").glob("*.yaml")),
        *sorted((cc.CHART / "crds").glob("*.yaml")),
        *sorted((cc.ROOT / "deploy" / "kind").glob("*.yaml")),
        *sorted((cc.ROOT / "examples").rglob("*.yaml")),
        cc.ROOT / "kind-config.yaml",
        cc.ROOT / ".hadolint.yaml",
        cc.YAMLLINT_CONFIG,
    ]
    return files


def test_yamllint_plain_yaml() -> None:
    assert cc.yamllint_files(_plain_yaml()) == []


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_yamllint_rendered_output(render: Render, values: Path) -> None:
    assert cc.yamllint_text(render([values]), f"rendered:{values.name}") == []


# --- deploy/kind manifests are held to the same standard -------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kind_manifests_validate_and_are_restricted(version: str) -> None:
    docs = [d for p in sorted((cc.ROOT / "deploy" / "kind").glob("*.yaml")) for d in cc.load_docs(p.read_text())]
    assert cc.k8s_validate(docs, version, crds=crds()) == []
    assert len(list(cc.pod_specs(docs))) >= 3
    assert cc.pss_violations(docs) == []
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert namespaces
    assert all(n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted" for n in namespaces)


def _strings_where_names_stand(doc: Any, path: str = "") -> list[str]:
    """Paths of every ``name``, ``namespace`` and label value in ``doc`` that is not a string."""
    bad: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}"
            if key in ("name", "namespace") and not isinstance(value, str | dict | list):
                bad.append(f"{here}={value!r}")
            if key in ("labels", "matchLabels") and isinstance(value, dict):
                bad += [f"{here}.{k}={v!r}" for k, v in value.items() if not isinstance(v, str)]
            bad += _strings_where_names_stand(value, here)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            bad += _strings_where_names_stand(item, f"{path}[{i}]")
    return bad


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUE_IDS)
def test_a_release_and_namespace_named_like_a_number_render_as_strings(
    helm: Path, values: Path, tmp_path: Path
) -> None:
    """Release and namespace names are DNS labels, so `helm install 123 -n 2024` is allowed; unquoted,
    YAML reads them as numbers and the API server refuses every object ("must be of type string")."""
    rendered = cc.helm_template(helm, cc.CHART, [values], release="2024", namespace="2024")
    docs = cc.load_docs(rendered)
    assert any(d["metadata"].get("namespace") == "2024" for d in docs)
    bad = [f"{d['kind']}{p}" for d in docs for p in _strings_where_names_stand(d)]
    assert not bad, bad
