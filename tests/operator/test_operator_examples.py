"""The example manifests in examples/ against the CRD schema (with CEL) and the operator's model.

Good examples must be admitted as they are and accepted by the operator's spec model. Each bad
example names the error it must produce in its first line: ``# expect: <text>`` for the API server
(schema or CEL), ``# operator-rejects: <text>`` for the operator's InvalidSpec condition.
"""

from __future__ import annotations

from pathlib import Path

import crd_schema
import pytest
import yaml

from outbox_operator.children import OperatorConfig, Owner, build_deployment
from outbox_operator.spec import InvalidSpec, parse_spec, validate_name

EXAMPLES = crd_schema.ROOT / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BAD = sorted((EXAMPLES / "invalid").glob("*.yaml"))
SCHEMA = crd_schema.schema_of(crd_schema.load_crd())


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: one OutboxPublisher per file"
    return docs[0]


def render(name: str, spec: dict) -> dict:
    """What the operator does with a spec before it touches anything: parse, then render the pods."""
    return build_deployment(Owner(name, "default", "u"), parse_spec(spec), 1, OperatorConfig())


def test_there_are_examples() -> None:
    assert len(GOOD) >= 3
    assert len(BAD) >= 8


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_example_is_admitted_and_renders(path: Path) -> None:
    obj = _load(path)
    obj["metadata"].setdefault("namespace", "default")
    stored, errors = crd_schema.admit(SCHEMA, obj)
    assert errors == []
    spec = parse_spec(stored["spec"])
    owner = Owner(name=obj["metadata"]["name"], namespace="default", uid="u")
    build_deployment(owner, spec, 1, OperatorConfig())


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_example_fails_with_its_message(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    kind, _, expected = first.lstrip("# ").partition(": ")
    assert kind in ("expect", "operator-rejects"), f"{path.name}: first line must say what fails"
    obj = _load(path)
    obj["metadata"].setdefault("namespace", "default")
    stored, errors = crd_schema.admit(SCHEMA, obj)
    if kind == "expect":
        assert any(expected in e for e in errors), errors
        return
    assert errors == []
    with pytest.raises(InvalidSpec) as caught:
        render(obj["metadata"]["name"], stored["spec"])
    assert expected in f"{caught.value.field}: {caught.value.message}"


def api_server_paths(errors: list[str]) -> set[str]:
    """Field paths of an API server's refusal (``<path>: <message>`` per error)."""
    return {e.split(":", 1)[0] for e in errors}


def operator_path(name: str, spec: dict) -> str:
    """Field path of the operator's refusal of the same object (name rule, model, rendering)."""
    try:
        validate_name(name)
        render(name, spec)
    except InvalidSpec as refused:
        return refused.field
    raise AssertionError(f"the operator accepted {name}")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_operator_model_rejects_what_the_schema_rejects_at_the_same_field(path: Path) -> None:
    """Without the API server's checks (an old server, a CR stored under an older CRD), the operator
    refuses the object too, naming the same field as the API server does."""
    obj = _load(path)
    _, errors = crd_schema.admit(SCHEMA, obj)
    spec = crd_schema.apply_defaults(SCHEMA["properties"]["spec"], obj.get("spec", {}))
    found = operator_path(obj["metadata"]["name"], spec)
    if errors:
        assert found in api_server_paths(errors), (found, errors)
    else:  # refused by the operator only (what a worker would refuse): the expectation says where
        assert path.read_text().splitlines()[0].startswith("# operator-rejects: ")


def test_immutable_fields_cannot_change() -> None:
    obj = _load(EXAMPLES / "outboxpublisher.yaml")
    obj["metadata"]["namespace"] = "default"
    old, errors = crd_schema.admit(SCHEMA, obj)
    assert errors == []
    for path, value, message in [
        (("partitions",), 16, "spec.partitions is immutable"),
        (("database", "table"), "other", "spec.database.table is immutable"),
        (("database", "schema"), "other", "spec.database.schema is immutable"),
    ]:
        new = yaml.safe_load(yaml.safe_dump(old))
        target = new["spec"]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        _, errors = crd_schema.admit(SCHEMA, new, old)
        assert any(message in e for e in errors), (path, errors)
    _, errors = crd_schema.admit(SCHEMA, yaml.safe_load(yaml.safe_dump(old)), old)
    assert errors == []
