"""Reserved worker settings can never come from ``spec.worker.env``, in any letter case.

The worker reads its settings with pydantic-settings, which matches environment names
case-insensitively: ``outbox_database_url`` is read as ``OUTBOX_DATABASE_URL``. So the CRD's CEL rule
and the operator's model refuse every spelling of every name the worker reads (derived from
:class:`WorkerSettings`, the single source), and the rendered container puts the operator's own
variables after the user's, so they win even if a name slipped through.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import crd_schema

from outbox_common.settings import WorkerSettings, env_name
from outbox_operator.children import OperatorConfig, Owner, build_deployment
from outbox_operator.spec import InvalidSpec, parse_spec

SCHEMA = crd_schema.schema_of(crd_schema.load_crd())
READ_BY_THE_WORKER = sorted(env_name(field) for field in WorkerSettings.model_fields)


def spellings(name: str) -> list[str]:
    """Upper, lower, and capitalised words: ``OUTBOX_PUBLISHER``, ``outbox_publisher``, ``Outbox_Publisher``."""
    return [name.upper(), name.lower(), "_".join(part.capitalize() for part in name.split("_"))]


def publisher_with_env(env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxPublisher",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {
            "partitions": 4,
            "database": {"secretRef": {"name": "orders-db"}},
            "nats": {"servers": ["nats://nats:4222"]},
            "worker": {"env": env},
        },
    }


def assert_env_entry_refused(errors: list[str], index: int) -> None:
    """The API server's answer names the entry's field path (works on any server's error list)."""
    assert any(e.startswith(f"spec.worker.env[{index}].name") for e in errors), errors


def assert_operator_vars_win(container: dict[str, Any]) -> None:
    """For every name the worker reads, the last entry of that name (the one Kubernetes uses) is the
    operator's, and no user entry spelt in another case is present for a setting the operator sets."""
    last: dict[str, dict[str, Any]] = {}
    for entry in container["env"]:
        last[entry["name"]] = entry
    assert "valueFrom" in last["OUTBOX_DATABASE_URL"]
    assert last["OUTBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "orders-db"
    assert last["OUTBOX_PUBLISHER"]["value"] == "orders"
    operator_names = [e["name"] for e in container["env"] if e["name"].startswith("OUTBOX_")]
    first_operator = next(i for i, e in enumerate(container["env"]) if e["name"] in operator_names)
    assert all(not e["name"].upper().startswith("OUTBOX_") for e in container["env"][:first_operator])


@pytest.mark.parametrize("name", [s for n in READ_BY_THE_WORKER for s in spellings(n)])
def test_crd_refuses_every_spelling_of_a_worker_setting(name: str) -> None:
    obj = publisher_with_env([{"name": "TZ", "value": "UTC"}, {"name": name, "value": "x"}])
    _, errors = crd_schema.admit(SCHEMA, obj)
    assert_env_entry_refused(errors, 1)


@pytest.mark.parametrize("name", [s for n in READ_BY_THE_WORKER for s in spellings(n)])
def test_model_refuses_every_spelling_of_a_worker_setting(name: str) -> None:
    spec = publisher_with_env([{"name": "TZ", "value": "UTC"}, {"name": name, "value": "x"}])["spec"]
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    assert caught.value.field == "spec.worker.env[1].name"
    assert name not in str(caught.value)


@pytest.mark.parametrize("name", ["outbox_database_url", "Outbox_Publisher", "OUTBOX_DATABASE_URL"])
def test_the_issue_spellings_are_refused_by_both(name: str) -> None:
    obj = publisher_with_env([{"name": name, "value": "postgresql://evil:pw@elsewhere/db"}])
    _, errors = crd_schema.admit(SCHEMA, obj)
    assert_env_entry_refused(errors, 0)
    with pytest.raises(InvalidSpec):
        parse_spec(obj["spec"])


def test_other_names_pass() -> None:
    obj = publisher_with_env([{"name": "TZ", "value": "UTC"}, {"name": "OUTBOXER", "value": "1"}])
    _, errors = crd_schema.admit(SCHEMA, obj)
    assert errors == []
    parse_spec(obj["spec"])


def test_operator_variables_come_after_user_env() -> None:
    spec = parse_spec(publisher_with_env([{"name": "TZ", "value": "UTC"}])["spec"])
    deployment = build_deployment(Owner("orders", "shop", "u"), spec, 1, OperatorConfig())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][0] == {"name": "TZ", "value": "UTC"}
    assert_operator_vars_win(container)


# --- messages of other refused specs read as one sentence at the field's own path -----------------

_BASE = {"partitions": 4, "database": {"secretRef": {"name": "db"}}, "nats": {"servers": ["nats://n:4222"]}}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {**_BASE, "worker": {"resources": {"requests": {"cpu": "half"}}}},
            "spec.worker.resources.requests.cpu: must be a Kubernetes quantity: an integer or a string such as 500m",
        ),
        (
            {**_BASE, "worker": {"resources": {"limits": {"memory": True}}}},
            "spec.worker.resources.limits.memory: must be a Kubernetes quantity",
        ),
        (
            {**_BASE, "nats": {"servers": ["nats://n:4222"], "user": "alice"}},
            "spec.nats.user: needs spec.nats.passwordSecretRef, and the reverse: set both or neither",
        ),
    ],
)
def test_a_refused_spec_reads_as_one_sentence_at_the_fields_path(spec: dict[str, Any], expected: str) -> None:
    from outbox_operator.spec import InvalidSpec, parse_spec

    with pytest.raises(InvalidSpec) as info:
        parse_spec(spec)
    assert str(info.value).startswith(expected), str(info.value)
