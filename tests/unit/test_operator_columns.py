"""``kubectl get obp``: the printer columns read fields the operator really writes.

The columns are evaluated here the way the API server does for a Table (a simple JSONPath per
column, an absent field gives an empty cell), on the status the reconcile plan produces."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import yaml
from test_operator_crd import CRD_PATH
from test_operator_reconcile import T0, World, body

COLUMNS: list[dict[str, Any]] = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["additionalPrinterColumns"]
_STEP = re.compile(r'\w+\[\?\(@\.\w+=="[^"]*"\)\]|[\w-]+')
_FILTER = re.compile(r'^(?P<list>\w+)\[\?\(@\.(?P<key>\w+)=="(?P<value>[^"]*)"\)\]$')


def json_path(obj: Any, path: str) -> Any:
    """The subset of JSONPath the CRD's columns use: ``.a.b`` and ``.list[?(@.k=="v")].field``."""
    value = obj
    for part in _STEP.findall(path):
        match = _FILTER.match(part)
        if match:
            items = (value or {}).get(match["list"]) or []
            value = next((i for i in items if str(i.get(match["key"])) == match["value"]), None)
        else:
            value = (value or {}).get(part) if isinstance(value, dict) else None
        if value is None:
            return None
    return value


def table_row(obj: dict[str, Any], *, wide: bool = False) -> dict[str, str]:
    """Column name -> cell text ('' when the field is absent), as ``kubectl get [-o wide]`` shows."""
    return {
        col["name"]: "" if (v := json_path(obj, col["jsonPath"])) is None else str(v)
        for col in COLUMNS
        if wide or not col.get("priority")
    }


def assert_row(obj: dict[str, Any], **expected: str) -> None:
    row = table_row(obj, wide=True)
    for name, text in expected.items():
        assert row[name.replace("_", "-")] == text, (name, row)


def report(partitions: list[int], published: int, **fields: Any) -> dict[str, Any]:
    return {
        "partitions": partitions,
        "published": published,
        "deadLetters": 0,
        "backlog": 12,
        "oldestPendingSeconds": 0.8,
        "ratePerSecond": 100.0,
        "reportTime": "2026-01-01T12:00:00Z",
        **fields,
    }


def test_default_and_wide_columns() -> None:
    names = [c["name"] for c in COLUMNS]
    assert names == [
        "Ready",
        "Status",
        "Backlog",
        "Oldest",
        "Rate",
        "Dead",
        "Last-Publish",
        "Published",
        "Failed",
        "Reporting",
        "Age",
    ]


def test_a_publishing_relay_shows_ready_over_desired_reason_and_pressure() -> None:
    world = World(body(replicas=2))
    world.step()
    world.children[("Deployment", "orders-relay")]["status"] = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    world.pods = ["orders-relay-a", "orders-relay-b"]
    world.cr["status"]["workers"] = {
        # Dead: the dead letters waiting in the table (one count, sampled by each worker), not a sum
        "orders-relay-a": report([0, 1, 2, 3], 500, deadLetters=2, deadLettersWaiting=2),
        "orders-relay-b": report([4, 5, 6, 7], 300, deadLettersWaiting=2),
    }
    world.step()
    assert_row(world.cr, Ready="2/2", Status="Publishing", Backlog="24", Oldest="0.8", Rate="200.0", Dead="2")
    assert_row(world.cr, Published="800", Last_Publish="2026-01-01T12:00:00Z", Reporting="2")

    # nothing more published: the last publish time stays; more published: it moves
    world.step(T0 + timedelta(seconds=10))
    assert_row(world.cr, Last_Publish="2026-01-01T12:00:00Z")
    world.cr["status"]["workers"]["orders-relay-b"]["published"] = 310
    world.cr["status"]["workers"]["orders-relay-b"]["reportTime"] = "2026-01-01T12:00:15Z"
    world.step(T0 + timedelta(seconds=20))
    assert_row(world.cr, Last_Publish="2026-01-01T12:00:20Z")


def test_unknown_pressure_and_a_reason_when_not_ready() -> None:
    world = World(body(replicas=3))
    world.step()
    world.children[("Deployment", "orders-relay")]["status"] = {"replicas": 3, "readyReplicas": 1}
    world.step()
    assert_row(world.cr, Ready="1/3", Status="WorkersNotReady", Backlog="", Oldest="", Rate="", Last_Publish="")


def test_paused_shows_zero_desired_and_the_reason() -> None:
    world = World(body(paused=True))
    world.step()
    assert_row(world.cr, Ready="0/0", Status="Paused", Backlog="")
