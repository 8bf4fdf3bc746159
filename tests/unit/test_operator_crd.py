"""The CRD (crds/outboxpublisher.yaml), the operator's spec model and the worker's settings agree.

Both schemas are reduced to one canonical form (type, required, default, enum, bounds, pattern,
nested properties) and compared field by field, so adding a field to one side only, or changing a
default, bound or enum on one side only, fails here with the path of the difference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from outbox_common.settings import WorkerSettings, env_name
from outbox_operator import constants as c
from outbox_operator.spec import (
    DEFAULT_SETTINGS,
    DERIVED_SETTINGS,
    POD_SETTINGS,
    SECRET_SETTINGS,
    SETTINGS_MAP,
    InvalidSpec,
    PublisherSpec,
    parse_spec,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import crd_schema as admission  # the CEL admission helper of tests/operator

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "outboxpublisher.yaml"


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- canonical form ------------------------------------------------------------------------------


def canon_crd(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": node.get("type", "any")}
    if "x-kubernetes-int-or-string" in node:
        out["type"] = "int-or-string"
    for key in ("enum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "maximum"):
        if key in node:
            out[key] = node[key]
    if "minimum" in node:
        out["exclusiveMinimum" if node.get("exclusiveMinimum") else "minimum"] = node["minimum"]
    if "default" in node and node["default"] != {}:
        out["default"] = node["default"]
    if node.get("type") == "object":
        if "properties" in node:
            out["properties"] = {k: canon_crd(v) for k, v in node["properties"].items()}
            out["required"] = sorted(node.get("required", []))
            out["defaulted"] = sorted(k for k, v in node["properties"].items() if v.get("default") == {})
        else:
            out["type"] = "map"
    if "items" in node:
        out["items"] = canon_crd(node["items"])
    return out


def canon_model(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "anyOf" in node:  # Optional[X] = None
        inner = [n for n in node["anyOf"] if n.get("type") != "null"]
        if len(inner) == 1:
            node = {**node, **inner[0]}
            node.pop("anyOf")
            if node.get("default", "absent") is None:
                node.pop("default")
        else:
            return {"type": "int-or-string"}
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    out: dict[str, Any] = {"type": node.get("type", "any")}
    if "enum" in node:
        out["enum"] = node["enum"]
    elif "const" in node:
        out["enum"] = [node["const"]]
    for key in ("pattern", "minLength", "maxLength", "minItems", "maxItems", "maximum", "minimum", "exclusiveMinimum"):
        if key in node:
            out[key] = node[key]
    if "default" in node:
        out["default"] = node["default"]
    if node.get("type") == "object":
        if "properties" in node:
            props = node["properties"]
            out["properties"] = {k: canon_model(v, defs) for k, v in props.items()}
            out["required"] = sorted(node.get("required", []))
            out["defaulted"] = sorted(
                k for k, v in props.items() if k not in node.get("required", []) and "default" not in v and "$ref" in v
            )
        else:
            out["type"] = "map"
    if "items" in node:
        out["items"] = canon_model(node["items"], defs)
    return out


def diff(a: Any, b: Any, path: str = "spec") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys()):
            if key not in a:
                out.append(f"{path}.{key}: only in the model: {b[key]!r}")
            elif key not in b:
                out.append(f"{path}.{key}: only in the CRD: {a[key]!r}")
            else:
                out.extend(diff(a[key], b[key], f"{path}.{key}"))
        return out
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return [] if float(a) == float(b) else [f"{path}: CRD {a!r} != model {b!r}"]
    return [] if a == b else [f"{path}: CRD {a!r} != model {b!r}"]


def test_crd_and_spec_model_agree() -> None:
    spec_node = crd_schema()["properties"]["spec"]
    model = PublisherSpec.model_json_schema(by_alias=True)
    differences = diff(canon_crd(spec_node), canon_model(model, model.get("$defs", {})))
    assert differences == []


def test_crd_names_match_constants() -> None:
    doc = crd()
    assert doc["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert doc["spec"]["group"] == c.GROUP
    assert doc["spec"]["names"]["kind"] == c.KIND
    assert doc["spec"]["names"]["plural"] == c.PLURAL
    assert c.SHORT_NAME in doc["spec"]["names"]["shortNames"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == c.VERSION
    assert version["storage"]
    assert version["served"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    default = [col["name"] for col in version["additionalPrinterColumns"] if not col.get("priority")]
    assert default == ["Ready", "Status", "Backlog", "Oldest", "Rate", "Dead", "Age"]
    wide = [col["name"] for col in version["additionalPrinterColumns"] if col.get("priority")]
    assert wide == ["Last-Publish", "Published", "Failed", "Reporting"]


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in node.get("properties", {}).items():
        found.extend(_walk(child, f"{path}.{key}"))
    if "items" in node:
        found.extend(_walk(node["items"], f"{path}[]"))
    if isinstance(node.get("additionalProperties"), dict):
        found.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return found


def test_every_crd_field_has_a_description() -> None:
    missing = [p for p, node in _walk(crd_schema(), "") if "description" not in node and p != ".metadata"]
    assert missing == []


def test_status_workers_match_the_worker_report_contract() -> None:
    from dataclasses import fields

    from outbox_common.report import WorkerReport

    entry = crd_schema()["properties"]["status"]["properties"]["workers"]["additionalProperties"]
    assert sorted(entry["properties"]) == sorted(f.name for f in fields(WorkerReport))


# --- spec <-> WorkerSettings ----------------------------------------------------------------------


def test_every_worker_setting_is_mapped_once() -> None:
    tables = [set(SETTINGS_MAP), set(DERIVED_SETTINGS), set(SECRET_SETTINGS), set(POD_SETTINGS), set(DEFAULT_SETTINGS)]
    covered = set().union(*tables)
    assert sum(len(t) for t in tables) == len(covered), "a setting is mapped twice"
    assert covered == set(WorkerSettings.model_fields), "map every WorkerSettings field in spec.py"


def _crd_node(path: str) -> dict[str, Any]:
    node = crd_schema()["properties"]["spec"]
    for part in path.split("."):
        node = node["properties"][part]
    return node


def _bounds(field: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for meta in WorkerSettings.model_fields[field].metadata:
        for attr in ("ge", "gt", "le"):
            if getattr(meta, attr, None) is not None:
                out[attr] = float(getattr(meta, attr))
    return out


# Defaults that differ on purpose between a pod in a cluster and a process on a laptop.
CLUSTER_DEFAULTS = {"log_format": "json"}


@pytest.mark.parametrize("field", sorted(SETTINGS_MAP))
def test_spec_field_agrees_with_worker_setting(field: str) -> None:
    node = _crd_node(SETTINGS_MAP[field])
    setting = WorkerSettings.model_fields[field]
    default = setting.default.value if hasattr(setting.default, "value") else setting.default
    assert node.get("default") == CLUSTER_DEFAULTS.get(field, default), "default differs"
    bounds = _bounds(field)
    if "minimum" in node:  # the CRD may be stricter than the worker, never looser
        low = float(node["minimum"])
        if "ge" in bounds:
            assert low >= bounds["ge"]
        if "gt" in bounds:
            assert low > bounds["gt"] or (node.get("exclusiveMinimum") and low >= bounds["gt"])
    else:
        assert not bounds.get("ge"), "the CRD must bound it below"
        assert "gt" not in bounds, "the CRD must bound it below"
    if "le" in bounds:
        assert float(node["maximum"]) <= bounds["le"]
    enum = getattr(setting.annotation, "__members__", None)
    if enum:
        assert sorted(node["enum"]) == sorted(m.value for m in enum.values())


@pytest.mark.parametrize("field", sorted({*SETTINGS_MAP, *SECRET_SETTINGS, *DERIVED_SETTINGS} - {"publisher"}))
def test_spec_field_description_names_its_variable(field: str) -> None:
    """README: every spec field's description names the ``OUTBOX_*`` variable it becomes
    (``kubectl explain``). The TLS keys are named together by ``nats.tls``."""
    path = {**SETTINGS_MAP, **SECRET_SETTINGS, **DERIVED_SETTINGS}[field].split(" ")[0]
    if path.startswith("nats.tls."):
        path = "nats.tls"
    assert env_name(field) in _crd_node(path)["description"], path


def test_root_metadata_specifies_nothing_but_its_type_and_name() -> None:
    """A real API server refuses the whole CRD otherwise ("metadata: Forbidden: must not specify
    anything other than name and generateName"), found by tests/cluster: even a description counts."""
    metadata = crd_schema()["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert set(metadata) <= {"type", "properties"}
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}


# --- CEL rules: the API server and the operator refuse the same specs at the same field -----------


def _publisher(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxPublisher",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {
            "partitions": 8,
            "database": {"secretRef": {"name": "db"}},
            "nats": {"servers": ["nats://nats:4222"]},
            **spec,
        },
    }


def _refusals(obj: dict[str, Any]) -> tuple[list[str], InvalidSpec | None]:
    """(the API server's errors, the operator's refusal of the defaulted spec)."""
    stored, errors = admission.admit(admission.schema_of(crd()), obj)
    try:
        parse_spec(stored["spec"])
    except InvalidSpec as exc:
        return errors, exc
    return errors, None


@pytest.mark.parametrize(
    ("database", "admitted"),
    [
        ({"table": "t" * 49}, True),  # public.<49>_leases: 63 bytes
        ({"table": "t" * 50}, False),  # public.<50>_leases: 64 bytes, every lease announcement fails
        ({"schema": "s" * 22, "table": "t" * 33}, True),
        ({"schema": "s" * 30, "table": "t" * 33}, False),  # <schema>.<table>: 64 bytes, every INSERT fails
    ],
)
def test_schema_and_table_must_fit_the_notify_channels(database: dict[str, str], admitted: bool) -> None:
    errors, refused = _refusals(_publisher(database={"secretRef": {"name": "db"}, **database}))
    if admitted:
        assert (errors, refused) == ([], None)
        return
    assert any(e.startswith("spec.database.table: ") and "at most 55 characters together" in e for e in errors), errors
    assert refused is not None
    assert refused.field == "spec.database.table"
    assert "spec.database.schema" in refused.message
    assert "at most 55" in refused.message


@pytest.mark.parametrize(
    ("servers", "admitted"),
    [
        (["nats://a:4222", "tls://b:4222"], True),
        (["ws://a:8080", "wss://b:8443"], True),
        (["nats://a:4222", "ws://b:8080"], False),
        (["wss://a:8443", "tls://b:4222"], False),
    ],
)
def test_nats_servers_must_not_mix_websocket_and_other_urls(servers: list[str], admitted: bool) -> None:
    """nats-py refuses such a list at connect (one transport per client)."""
    errors, refused = _refusals(_publisher(nats={"servers": servers}))
    if admitted:
        assert (errors, refused) == ([], None)
        return
    assert any(e.startswith("spec.nats.servers: ") and "must not mix websocket" in e for e in errors), errors
    assert refused is not None
    assert refused.field == "spec.nats.servers"


@pytest.mark.parametrize(
    ("servers", "index", "needle"),
    [
        (["nats://nats:99999"], 0, "port that is not a number of 1-65535"),
        (["nats://a:4222", "nats://nats:42x2"], 1, "port that is not a number of 1-65535"),
        (["nats://:4222"], 0, "has no host"),
        (["nats://nats:0"], 0, "has port 0"),
    ],
)
def test_a_server_url_the_worker_cannot_connect_with_is_an_invalid_spec_by_index(
    servers: list[str], index: int, needle: str
) -> None:
    """The CRD's pattern admits these; the operator refuses them (InvalidSpec) instead of starting
    workers that cannot connect."""
    errors, refused = _refusals(_publisher(nats={"servers": servers}))
    assert errors == []
    assert refused is not None
    assert refused.field == f"spec.nats.servers[{index}]"
    assert needle in refused.message


@pytest.mark.parametrize(
    ("leases", "ack", "admitted"),
    [
        ({}, 5.0, True),  # the defaults: 15 - 5 - 5 = 5 s to spare
        ({"ttlSeconds": 3}, 1.0, True),  # the test suites' timing: exactly 1 s to spare
        ({"ttlSeconds": 3, "renewSeconds": 1}, 1.0, True),
        ({"ttlSeconds": 1}, 0.5, False),  # the audit's: a renewed lease is never usable
        ({"ttlSeconds": 3}, 1.5, False),
        ({"ttlSeconds": 2, "renewSeconds": 0.25}, 0.5, True),
        ({"ttlSeconds": 2, "renewSeconds": 0.75}, 0.5, False),
    ],
)
def test_a_renewed_lease_must_stay_usable_until_the_next_renewal(
    leases: dict[str, float], ack: float, admitted: bool
) -> None:
    """The CEL rule and outbox_common.timing agree (tests/unit/test_lease_timing.py ties the rule to
    the lease manager)."""
    errors, refused = _refusals(_publisher(leases=leases, publishing={"ackTimeoutSeconds": ack}))
    if admitted:
        assert (errors, refused) == ([], None)
        return
    assert any(e.startswith("spec.leases.ttlSeconds: ") and "by at least 1s" in e for e in errors), errors
    assert refused is not None
    assert refused.field == "spec.leases.ttlSeconds"
