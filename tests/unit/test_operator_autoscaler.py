"""The autoscaler: immediate scale-ups, stabilized scale-downs, bounds, and no action without data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox_operator.autoscaler import decide, recommend
from outbox_operator.spec import Autoscaling

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Autoscaling(
    enabled=True,
    min_replicas=1,
    max_replicas=6,
    target_backlog_per_replica=1000,
    target_lag_seconds=30,
    scale_down_stabilization_seconds=300,
)


def pressure(backlog: int, oldest: float = 0.0, workers: int = 1) -> dict[str, object]:
    return {"workers": workers, "backlog": backlog, "oldestPendingSeconds": oldest}


def test_recommendation_from_backlog_and_lag_within_bounds() -> None:
    assert recommend(POLICY, 16, current=1, backlog=0, oldest_seconds=0) == 1
    assert recommend(POLICY, 16, current=1, backlog=3500, oldest_seconds=0) == 4
    assert recommend(POLICY, 16, current=2, backlog=10, oldest_seconds=31) == 3  # lag: one more
    assert recommend(POLICY, 16, current=1, backlog=10**9, oldest_seconds=0) == 6  # max
    assert recommend(POLICY, 3, current=1, backlog=10**9, oldest_seconds=0) == 3  # never over partitions


def test_scale_up_is_immediate() -> None:
    d = decide(POLICY, 16, {"replicas": 1}, 1, pressure(4500), T0)
    assert (d.replicas, d.scaled) == (5, True)
    assert d.state["lastScaleTime"] == "2026-01-01T00:00:00Z"


def test_scale_down_waits_for_the_window_and_takes_the_highest_recommendation() -> None:
    state = {"replicas": 5}
    d = decide(POLICY, 16, state, 1, pressure(1500), T0)  # wants 2
    assert (d.replicas, d.scaled) == (5, False)
    assert d.state["scaleDownSince"] == "2026-01-01T00:00:00Z"
    d = decide(POLICY, 16, d.state, 1, pressure(3500), T0 + timedelta(seconds=100))  # wants 4
    assert d.replicas == 5
    assert d.state["scaleDownTo"] == 4
    d = decide(POLICY, 16, d.state, 1, pressure(100), T0 + timedelta(seconds=200))  # wants 1
    assert d.replicas == 5
    d = decide(POLICY, 16, d.state, 1, pressure(100), T0 + timedelta(seconds=301))
    assert (d.replicas, d.scaled) == (4, True)  # the highest wish of the window
    assert "scaleDownSince" not in d.state


def test_a_burst_inside_the_window_cancels_the_scale_down() -> None:
    d = decide(POLICY, 16, {"replicas": 4}, 1, pressure(500), T0)
    assert "scaleDownSince" in d.state
    d = decide(POLICY, 16, d.state, 1, pressure(4000), T0 + timedelta(seconds=10))
    assert "scaleDownSince" not in d.state
    assert d.replicas == 4


def test_no_fresh_reports_hold_the_count_and_an_unchanged_state_is_stable() -> None:
    d = decide(POLICY, 16, {"replicas": 3}, 1, pressure(10**6, workers=0), T0)
    assert (d.replicas, d.scaled) == (3, False)
    again = decide(POLICY, 16, d.state, 1, pressure(10**6, workers=0), T0 + timedelta(seconds=60))
    assert again.state == d.state


def test_a_scale_down_window_starts_again_after_the_pressure_was_unknown() -> None:
    """A window is covered only by recommendations that were all lower: while the pressure was
    unknown (a database outage) nothing was recommended, so the window starts again; it scaled down
    at once once the outage outlasted the window."""
    d = decide(POLICY, 16, {"replicas": 4}, 1, pressure(500), T0)  # wants 1: the window starts
    assert "scaleDownSince" in d.state
    d = decide(POLICY, 16, d.state, 1, None, T0 + timedelta(seconds=10))  # unknown for 10 minutes
    d = decide(POLICY, 16, d.state, 1, None, T0 + timedelta(seconds=600))
    d = decide(POLICY, 16, d.state, 1, pressure(500), T0 + timedelta(seconds=610))
    assert (d.replicas, d.scaled) == (4, False)
    assert d.state["scaleDownSince"] == "2026-01-01T00:10:10Z"
    d = decide(POLICY, 16, d.state, 1, pressure(500), T0 + timedelta(seconds=910))
    assert (d.replicas, d.scaled) == (1, True)


def test_bounds_apply_when_the_policy_changes() -> None:
    narrow = POLICY.model_copy(update={"max_replicas": 2})
    d = decide(narrow, 16, {"replicas": 5}, 1, None, T0)
    assert (d.replicas, d.scaled) == (2, True)
