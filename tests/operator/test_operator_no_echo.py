"""A value that fails validation is never echoed: not in status, Events, logs or exceptions.

A user who pastes the DSN where the Secret's *name* belongs must not see the password copied into
the OutboxPublisher's status, an Event or the operator's log. The schema and the model refuse the
name by its pattern (a DNS-1123 subdomain), and every message names only the field path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import crd_schema
import pytest
from kube_emulator import KubeEmulator
from opkit import NAMESPACE, kopf_in_process

from outbox_operator.spec import InvalidSpec, parse_spec
from support.polling import wait_for

SCHEMA = crd_schema.schema_of(crd_schema.load_crd())
DSN = "postgresql://relay:Sup3rSecretPw@db.shop.svc:5432/shop"
PASSWORD = "Sup3rSecretPw"


def publisher_with_secret_name(name: str, key: str = "url") -> dict[str, Any]:
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxPublisher",
        "metadata": {"name": "orders", "namespace": NAMESPACE},
        "spec": {
            "partitions": 4,
            "database": {"secretRef": {"name": name, "key": key}},
            "nats": {"servers": ["nats://nats:4222"]},
        },
    }


def crd_before_the_name_patterns() -> dict[str, Any]:
    """The CRD as released before Secret names had a pattern: objects stored under it survive an
    upgrade of the CRD unvalidated, so the operator must refuse them on its own, just as quietly."""
    crd = crd_schema.load_crd()
    secret_ref = crd_schema.schema_of(crd)["properties"]["spec"]["properties"]["database"]["properties"]["secretRef"]
    for field in secret_ref["properties"].values():
        field.pop("pattern", None)
    return crd


def assert_never_echoed(secret: str, *, status: Any, events: list[dict[str, Any]], log_text: str) -> None:
    """The secret appears nowhere a user or a log collector can read it (any API server's objects)."""
    assert secret not in json.dumps(status)
    assert secret not in json.dumps(events)
    assert secret not in log_text


@pytest.mark.parametrize(
    ("name", "key", "path"),
    [
        (DSN, "url", "spec.database.secretRef.name"),
        ("orders-db", DSN, "spec.database.secretRef.key"),
        ("Orders_DB", "url", "spec.database.secretRef.name"),
    ],
)
def test_schema_and_model_refuse_bad_secret_names_by_path(name: str, key: str, path: str) -> None:
    obj = publisher_with_secret_name(name, key)
    _, errors = crd_schema.admit(SCHEMA, obj)
    assert any(e.startswith(path) for e in errors), errors
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(obj["spec"])
    assert caught.value.field == path
    assert name not in str(caught.value) or name == "orders-db"
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("name", ["orders-db", "db.example-1", "a"])
def test_valid_secret_names_pass(name: str) -> None:
    obj = publisher_with_secret_name(name, "url.v2_A-1")
    _, errors = crd_schema.admit(SCHEMA, obj)
    assert errors == []
    parse_spec(obj["spec"])


@pytest.mark.operator
@pytest.mark.timeout(120)
async def test_dsn_pasted_as_secret_name_never_reaches_status_events_or_logs(
    emulator: KubeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await emulator.apply(crd_before_the_name_patterns())
    await emulator.apply(publisher_with_secret_name(DSN))
    async with kopf_in_process():

        def ready_reason() -> str | None:
            obj = emulator.get("outbox.dev/v1alpha1", "OutboxPublisher", NAMESPACE, "orders") or {}
            for cond in (obj.get("status") or {}).get("conditions") or []:
                if cond["type"] == "Ready":
                    return str(cond["reason"])
            return None

        await wait_for(lambda: ready_reason() == "InvalidSpec", 20)
        await wait_for(lambda: any(e["reason"] == "InvalidSpec" for e in emulator.list("v1", "Event", NAMESPACE)), 20)
        obj = emulator.get("outbox.dev/v1alpha1", "OutboxPublisher", NAMESPACE, "orders")
        assert obj is not None
        message = next(c["message"] for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert message.startswith("spec.database.secretRef.name:")
    assert_never_echoed(
        PASSWORD, status=obj["status"], events=emulator.list("v1", "Event", NAMESPACE), log_text=caplog.text
    )
