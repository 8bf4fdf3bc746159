"""Credential rotation: a write to a Secret the workers use changes the pod template, so the
Deployment rolls the workers onto the new value (they read Secrets only at start)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kube_emulator import KubeEmulator
from opkit import NAMESPACE, kopf_in_process
from test_operator_kopf import example

from support.polling import wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def secret(dsn: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "orders-db", "namespace": NAMESPACE},
        "data": {"url": base64.b64encode(dsn.encode()).decode()},
    }


def template_hash(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"]["outbox.dev/pod-template-hash"])


def assert_rolled_without_leaking(before: dict[str, Any], after: dict[str, Any], *secret_values: str) -> None:
    """The pod template changed (the Deployment rolls its pods) and shows no secret value."""
    assert template_hash(before) != template_hash(after)
    assert "outbox.dev/secrets-hash" in after["spec"]["template"]["metadata"]["annotations"]
    for value in secret_values:
        assert value not in str(after)


async def test_rotating_the_database_secret_rolls_the_workers(emulator: KubeEmulator) -> None:
    await emulator.apply(secret("postgresql://relay:old-pw@db:5432/shop"))
    await emulator.apply(example())
    async with kopf_in_process(resync_seconds=0.5):
        first = await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 20)
        await emulator.apply(secret("postgresql://relay:new-pw@db:5432/shop"))

        def rolled() -> dict[str, Any] | None:
            dep = emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")
            return dep if dep and template_hash(dep) != template_hash(first) else None

        second = await wait_for(rolled, 20)
        assert_rolled_without_leaking(first, second, "old-pw", "new-pw")
        # an unchanged Secret rolls nothing: the next passes leave the template alone
        settled = len(emulator.writes())
        await wait_for(lambda: len(emulator.requests) > settled + 10, 20)
        dep = emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay")
        assert dep is not None
        assert template_hash(dep) == template_hash(second)
