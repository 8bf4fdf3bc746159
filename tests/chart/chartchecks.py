"""The chart checks as plain functions, each returning a list of problems (empty = pass).

Keeping them free of pytest lets the positive tests (the real chart passes) and the negative tests
(a deliberately broken copy fails) run exactly the same code.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "outbox-operator"
CANONICAL_CRDS = ROOT / "crds"
YAMLLINT_CONFIG = Path(__file__).resolve().parent / "yamllint.yaml"

Doc = dict[str, Any]
Render = Callable[..., str]  # the ``render`` fixture: (values files, chart=..., **helm kw) -> YAML


def load_tool_module(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools/ holds scripts, not a package)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- helm -------------------------------------------------------------------------------------------


def helm_lint(helm: Path, chart: Path, values: Iterable[Path] = ()) -> list[str]:
    cmd = [str(helm), "lint", "--strict", str(chart)]
    for v in values:
        cmd += ["--values", str(v)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [f"helm lint --strict failed:\n{result.stdout}{result.stderr}"]


def helm_template(
    helm: Path,
    chart: Path,
    values: Iterable[Path] = (),
    *,
    release: str = "outbox",
    namespace: str = "outbox-system",
    kube_version: str | None = None,
) -> str:
    """Rendered manifests (CRDs included), or raises CalledProcessError with helm's message."""
    cmd = [str(helm), "template", release, str(chart), "--namespace", namespace, "--include-crds"]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    for v in values:
        cmd += ["--values", str(v)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def load_docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


# --- Kubernetes schemas -------------------------------------------------------------------------------

# Kinds no bundled Kubernetes schema covers, and what checks them instead.
SERVICE_MONITOR_SCHEMA: Doc = {
    # The subset of monitoring.coreos.com/v1 ServiceMonitor the chart renders, strict: a typo in
    # the template fails here rather than being dropped by the API server.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"},
                        },
                    },
                },
            },
        },
    },
}


_DURATION = {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
PROMETHEUS_RULE_SCHEMA: Doc = {
    # The subset of monitoring.coreos.com/v1 PrometheusRule the chart renders, strict.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def k8s_validate(docs: Iterable[Doc], version: str, crds: Iterable[Doc] = ()) -> list[str]:
    """Validate every object with kubernetes-validate's Python API (strict schemas).

    Custom resources of the given CRDs are validated against the CRD's schema, ServiceMonitors
    against :data:`SERVICE_MONITOR_SCHEMA`, PrometheusRules against :data:`PROMETHEUS_RULE_SCHEMA`.
    Any other kind without a bundled schema is a failure: the kubernetes-validate CLI would skip it
    with exit code 0, the API raises and so do we.
    """
    crd_schemas = {
        (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"]): v["schema"]["openAPIV3Schema"]
        for crd in crds
        for v in crd["spec"]["versions"]
    }
    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in crd_schemas:
            problems += [f"{name}: {p}" for p in validate_custom_resource(doc, crd_schemas[key])]
            continue
        if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            problems += [f"{name}: {e.message}" for e in _errors(SERVICE_MONITOR_SCHEMA, doc)]
            continue
        if key == ("monitoring.coreos.com/v1", "PrometheusRule"):
            problems += [f"{name}: {e.message}" for e in _errors(PROMETHEUS_RULE_SCHEMA, doc)]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name} (Kubernetes {exc.version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
    return problems


def _errors(schema: Doc, instance: Any) -> list[jsonschema.ValidationError]:
    return sorted(jsonschema.Draft7Validator(schema).iter_errors(instance), key=lambda e: list(e.path))


# --- custom resources ----------------------------------------------------------------------------------


def strict_structural(schema: Any) -> Any:
    """The CRD's openAPIV3Schema as the API server applies it to a create with field validation
    ``Strict`` (kubectl's default): unknown fields are errors, except where the schema preserves them."""
    if isinstance(schema, list):
        return [strict_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_structural(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_custom_resource(doc: Doc, openapi_schema: Doc) -> list[str]:
    """Check a custom resource against its CRD schema with jsonschema.

    OpenAPI v3.0 schemas use draft-4 semantics (``exclusiveMinimum: true`` beside ``minimum``), so
    Draft4Validator. Not evaluated here: CEL rules (``x-kubernetes-validations``) and defaults; the
    API server applies those (the kind suite covers them).
    """
    schema = strict_structural(openapi_schema)
    metadata = (schema.get("properties") or {}).get("metadata")
    if isinstance(metadata, dict):  # the schema may restrict metadata.name; the rest is ObjectMeta
        metadata["additionalProperties"] = True
    body = copy.deepcopy(doc)
    meta = body.get("metadata") or {}
    problems = []
    if not meta.get("name"):
        problems.append("metadata.name is missing")
    validator = jsonschema.Draft4Validator(schema)
    for err in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in err.path) or "<root>"
        message = err.message
        if err.validator == "required":  # named at the missing field, as the API server does
            missing = next(name for name in err.validator_value if name not in (err.instance or {}))
            path, message = f"{path}.{missing}".removeprefix("<root>."), "Required value"
        problems.append(f"{path}: {message}")
    return problems


# --- Pod Security Standard "restricted" -------------------------------------------------------------

# Where the pod template sits in each workload kind (the Pod itself for "Pod").
_POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_specs(docs: Iterable[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(name, pod spec, pod metadata) of every pod a document creates."""
    for doc in docs:
        path = _POD_TEMPLATE_PATHS.get(doc.get("kind", ""))
        if path is None:
            continue
        template: Any = doc
        for key in path:
            template = (template or {}).get(key)
        template = template or {}
        yield f"{doc['kind']}/{doc['metadata']['name']}", template.get("spec") or {}, template.get("metadata") or {}


def pss_restricted(name: str, spec: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> list[str]:
    """Violations of the Pod Security Standard "restricted" (baseline included), as of v1.30."""
    bad: list[str] = []
    psc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"{field} must not be true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            bad.append(f"volume {vol.get('name')!r} uses {sorted(kinds - _RESTRICTED_VOLUMES)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl.get('name')!r} is not in the safe set")
    annotations = (meta or {}).get("annotations") or {}
    for key, value in annotations.items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value
            not in (
                "runtime/default",
                "",
            )
            and not str(value).startswith("localhost/")
        ):
            bad.append(f"AppArmor annotation {key}={value}")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile.type={pod_seccomp}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser must not be 0")
    bad += _selinux("pod", psc)
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        bad.append("pod appArmorProfile Unconfined")
    containers = [
        (kind, c) for kind in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(kind) or []
    ]
    if not spec.get("containers"):
        bad.append("no containers")
    for kind, c in containers:
        where = f"{kind}[{c.get('name')}]"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities.drop must include ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            bad.append(f"{where}: capabilities.add {sorted(extra)} (only NET_BIND_SERVICE is allowed)")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            bad.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile.type={seccomp}")
        if seccomp is None and pod_seccomp is None:
            bad.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount={sc.get('procMount')}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{where}: appArmorProfile Unconfined")
        bad += _selinux(where, sc)
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{where}: hostPort {port['hostPort']}")
    return [f"{name}: {b}" for b in bad]


def _selinux(where: str, sc: Mapping[str, Any]) -> list[str]:
    opts = sc.get("seLinuxOptions") or {}
    bad = []
    if opts.get("type", "") not in _SELINUX_TYPES:
        bad.append(f"{where}: seLinuxOptions.type={opts.get('type')}")
    if opts.get("user") or opts.get("role"):
        bad.append(f"{where}: seLinuxOptions user/role must not be set")
    return bad


def pss_violations(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for name, spec, meta in pod_specs(docs):
        problems += pss_restricted(name, spec, meta)
    return problems


# --- RBAC -------------------------------------------------------------------------------------------------


def rbac_wildcards(docs: Iterable[Doc]) -> list[str]:
    """Any ``*`` in verbs, resources, apiGroups, resourceNames or nonResourceURLs of a Role/ClusterRole."""
    problems = []
    for doc in docs:
        if doc.get("kind") not in ("Role", "ClusterRole"):
            continue
        if doc.get("aggregationRule"):
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: aggregationRule (unbounded rules)")
        for i, rule in enumerate(doc.get("rules") or []):
            for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                for item in rule.get(field) or []:
                    if "*" in str(item):
                        problems.append(f"{doc['kind']}/{doc['metadata']['name']} rules[{i}].{field}: {item!r}")
    return problems


# --- values: schema strictness and documentation ----------------------------------------------------------


def schema_open_objects(schema: Any, pointer: str = "#", conditional: bool = False) -> list[str]:
    """JSON pointers of object schemas in values.schema.json that do not set additionalProperties
    to false or to a schema (a typed map). ``additionalProperties: true`` is reported too; the
    caller decides which passthroughs are deliberate. Subschemas of if/then/else/not only add
    constraints to an object declared elsewhere and are not objects of their own."""
    found: list[str] = []
    if isinstance(schema, dict):
        is_object = schema.get("type") == "object" or ("properties" in schema and not conditional)
        if is_object:
            ap = schema.get("additionalProperties")
            if ap is None or ap is True:
                found.append(pointer)
        for key, value in schema.items():
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                for name, sub in value.items():
                    found += schema_open_objects(sub, f"{pointer}/{key}/{name}", conditional)
            elif key in ("items", "additionalProperties"):
                found += schema_open_objects(value, f"{pointer}/{key}", conditional)
            elif key in ("not", "if", "then", "else"):
                found += schema_open_objects(value, f"{pointer}/{key}", True)
            elif key in ("allOf", "anyOf", "oneOf"):
                for i, sub in enumerate(value):
                    found += schema_open_objects(sub, f"{pointer}/{key}/{i}", conditional)
    return found


def value_leaves(values: Any, schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the values a user sets. Objects with fixed ``properties`` in the schema are
    walked into; everything else (scalars, lists, free-form maps such as labels) is a leaf."""
    if isinstance(values, dict) and "properties" in schema and (values or not prefix):
        leaves: list[str] = []
        for key, value in values.items():
            sub = schema["properties"].get(key, {})
            leaves += value_leaves(value, sub, f"{prefix}.{key}" if prefix else key)
        return leaves
    return [prefix]


def undocumented_values(values: Any, schema: Mapping[str, Any], readme: str) -> list[str]:
    documented = documented_keys(readme)
    return [leaf for leaf in value_leaves(values, schema) if leaf not in documented]


def documented_keys(readme: str) -> set[str]:
    """Keys in the first column of the README's values table (``| `key` | ...``)."""
    keys = set()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0].startswith("`") and cells[0].endswith("`"):
            keys.add(cells[0].strip("`"))
    return keys


def documented_defaults(readme: str) -> dict[str, str]:
    """The Default column of the README's values table, by key: the cell's text without its backticks."""
    defaults = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) > 1 and cells[0].startswith("`") and cells[0].endswith("`"):
            defaults[cells[0].strip("`")] = cells[1].strip("`")
    return defaults


def misdocumented_defaults(values: Any, readme: str) -> list[str]:
    """Keys whose README default, read as YAML, is not the value in values.yaml."""
    wrong = []
    for key, shown in documented_defaults(readme).items():
        value = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if yaml.safe_load(shown) != value:
            wrong.append(f"{key}: README {shown}, values.yaml {value!r}")
    return wrong


def stale_documented_keys(values: Any, schema: Mapping[str, Any], readme: str) -> list[str]:
    leaves = set(value_leaves(values, schema))
    return sorted(k for k in documented_keys(readme) if k not in leaves)


# --- linters --------------------------------------------------------------------------------------------


def yamllint_text(text: str, name: str = "<rendered>") -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(YAMLLINT_CONFIG))
    return [f"{name}:{p.line}:{p.column}: [{p.level}] {p.desc} ({p.rule})" for p in linter.run(text, config)]


def yamllint_files(paths: Iterable[Path]) -> list[str]:
    problems = []
    for path in paths:
        problems += yamllint_text(path.read_text(), str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    return problems


def hadolint(hadolint_bin: Path, dockerfile: Path, config: Path | None = None) -> list[str]:
    cmd = [str(hadolint_bin), "--no-color", "--format", "tty"]
    if config is not None:
        cmd += ["--config", str(config)]
    result = subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or [
        f"hadolint exited {result.returncode}"
    ]


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
