"""Queue pressure the operator does not know is absent, never 0, and a condition says why; Ready
needs every partition owned by a live worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from outbox_operator.health import HealthTargets, Rollout, health_conditions, pressure_unknown, totals

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
GAUGES = ("backlog", "oldestPendingSeconds", "ratePerSecond", "inFlight")


def report(age: float = 0, partitions: tuple[int, ...] = (0, 1), **fields: Any) -> dict[str, Any]:
    return {
        "reportTime": (T0 - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "partitions": list(partitions),
        "published": 10,
        "backlog": 5,
        "oldestPendingSeconds": 1.0,
        "ratePerSecond": 2.0,
        **fields,
    }


def status_of(reports: dict[str, Any], *, partitions: int = 4, paused: bool = False) -> dict[str, Any]:
    """What the operator writes: ``totals`` and the conditions by type (the shape a test against a
    real API server reads back from the object)."""
    unknown = pressure_unknown(reports, 10, T0, partitions=partitions, paused=paused)
    conditions = health_conditions(
        HealthTargets(
            paused=paused,
            interval=10,
            partitions=partitions,
            target_lag_seconds=30,
            stream_name="OUTBOX",
            duplicate_window_seconds=120,
            duplicate_horizon_seconds=50,
        ),
        Rollout(0 if paused else 2, 0 if paused else 2, 0 if paused else 2, updated=0 if paused else 2),
        reports,
        T0,
    )
    return {
        "totals": totals(reports, 10, T0, known=unknown is None),
        "conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message} for c in conditions
        ],
    }


def assert_pressure_unknown(status: dict[str, Any], reason: str) -> None:
    """No gauge is written (kubectl shows the column empty) and Lagging=Unknown says why."""
    for gauge in GAUGES:
        assert gauge not in status["totals"], (gauge, status["totals"])
    lagging = next(c for c in status["conditions"] if c["type"] == "Lagging")
    assert (lagging["status"], lagging["reason"]) == ("Unknown", reason)


def ready_of(status: dict[str, Any]) -> tuple[str, str]:
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    return ready["status"], ready["reason"]


@pytest.mark.parametrize(
    ("reports", "paused", "reason"),
    [
        ({}, False, "NoReports"),
        ({"a": report(age=100, partitions=(0, 1, 2, 3))}, False, "NoReports"),
        ({"a": report(partitions=(0, 1)), "b": report(age=100, partitions=(2, 3))}, False, "StaleReports"),
        ({"a": report(partitions=(0, 1, 2, 3))}, True, "Paused"),
        ({"a": report(partitions=(0, 1))}, False, "PartitionsUnowned"),
        # b's last count failed (its database did not answer): the worker leaves backlog and age out
        (
            {"a": report(partitions=(0, 1)), "b": report(partitions=(2, 3), backlog=None, oldestPendingSeconds=None)},
            False,
            "NoPressureSample",
        ),
    ],
    ids=["no-reports", "only-stale", "one-stale", "paused", "unowned", "not-counted"],
)
def test_unknown_pressure_is_absent_not_zero(reports: dict[str, Any], paused: bool, reason: str) -> None:
    assert_pressure_unknown(status_of(reports, paused=paused), reason)


def test_known_pressure_is_summed() -> None:
    status = status_of({"a": report(partitions=(0, 1)), "b": report(partitions=(2, 3), backlog=7)})
    assert status["totals"]["backlog"] == 12
    assert status["totals"]["partitionsOwned"] == 4
    assert ready_of(status) == ("True", "Publishing")


def test_ready_needs_every_partition_owned_by_a_live_worker() -> None:
    status = status_of({"a": report(partitions=(0, 1)), "b": report(partitions=(1,))})
    assert ready_of(status) == ("False", "PartitionsUnowned")
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Ready")
    assert "(2, 3)" in message


def test_the_autoscaler_holds_while_the_pressure_is_unknown() -> None:
    """No report for a while must not read as an empty queue and scale the workers down."""
    from test_operator_reconcile import World, body

    world = World(
        body(
            autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 6, "scaleDownStabilizationSeconds": 0},
            replicas=4,
        )
    )
    world.step()
    world.pods = ["orders-relay-a"]
    world.cr["status"]["workers"] = {
        "orders-relay-a": {"partitions": [0, 1, 2, 3], "backlog": 0, "reportTime": "2026-01-01T12:00:00Z"}
    }
    result = world.step()  # partitions 4..7 have no live owner: unknown
    assert world.children[("Deployment", "orders-relay")]["spec"]["replicas"] == 4
    assert not any(e.reason == "Scaled" for e in result.events)
    assert "backlog" not in world.cr["status"]["totals"]


def test_api_errors_never_carry_url_credentials() -> None:
    from outbox_operator.kube import ApiError

    error = ApiError(422, "PUT", "/x", {"message": 'env[0].value: Invalid value: "postgresql://relay:pw@db/shop"'})
    assert "relay:pw" not in str(error)
