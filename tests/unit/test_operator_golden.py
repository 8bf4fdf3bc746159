"""Golden YAML of the children rendered for examples/outboxpublisher.yaml and the autoscaling one.

A change to a builder shows up as a diff of tests/golden/*.yaml in review. To accept an intended
change: ``UPDATE_GOLDEN=1 pytest tests/unit/test_operator_golden.py`` and commit the files.
Built-in kinds are also validated against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from outbox_operator.children import (
    OperatorConfig,
    Owner,
    build_deployment,
    build_metrics_service,
    build_pdb,
    build_role,
    build_role_binding,
    build_service_account,
)
from outbox_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
CASES = {"orders": "outboxpublisher.yaml", "payments": "outboxpublisher-autoscaling.yaml"}


def render(example: str) -> list[dict[str, Any]]:
    cr = yaml.safe_load((ROOT / "examples" / example).read_text())
    owner = Owner(name=cr["metadata"]["name"], namespace="shop", uid="00000000-0000-0000-0000-000000000001")
    spec = parse_spec(cr["spec"])
    config = OperatorConfig(worker_image="ghcr.io/outbox-relay/outbox-relay:0.1.0")
    return [
        build_service_account(owner),
        build_role(owner),
        build_role_binding(owner),
        build_metrics_service(owner, spec),
        build_deployment(owner, spec, 2, config),
        build_pdb(owner),
    ]


def dump(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=True, default_flow_style=False) for d in docs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_children_match_golden(name: str) -> None:
    path = GOLDEN / f"{name}-children.yaml"
    rendered = dump(render(CASES[name]))
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"run UPDATE_GOLDEN=1 pytest {__file__} to create {path}"
    assert rendered == path.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_children_are_valid_kubernetes_objects(name: str) -> None:
    for doc in render(CASES[name]):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
