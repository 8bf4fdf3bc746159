"""Condition math: lastTransitionTime moves only on a flip; health from worker reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox_operator.conditions import Condition, flips, merge_conditions, parse_time
from outbox_operator.health import (
    HealthTargets,
    Rollout,
    config_error_area,
    gone_workers,
    health_conditions,
    is_fresh,
    totals,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_transition_time_moves_only_when_status_flips() -> None:
    first = merge_conditions([], [Condition("Ready", "False", "WorkersNotReady", "0/2")], 1, T0)
    assert first[0]["lastTransitionTime"] == iso(T0)
    # reason and message change, status does not: the time stays
    second = merge_conditions(first, [Condition("Ready", "False", "WaitingForReports", "2/2")], 2, T0 + timedelta(60))
    assert second[0]["lastTransitionTime"] == iso(T0)
    assert second[0]["reason"] == "WaitingForReports"
    assert second[0]["observedGeneration"] == 2
    third = merge_conditions(second, [Condition("Ready", "True", "Publishing", "ok")], 2, T0 + timedelta(seconds=90))
    assert third[0]["lastTransitionTime"] == iso(T0 + timedelta(seconds=90))


def test_conditions_keep_other_types_and_a_stable_order() -> None:
    existing = [{"type": "Custom", "status": "True"}, {"type": "Lagging", "status": "False"}]
    merged = merge_conditions(
        existing,
        [Condition("Ready", "True", "Publishing", ""), Condition("Degraded", "False", "AsExpected", "")],
        1,
        T0,
    )
    assert [c["type"] for c in merged] == ["Ready", "Degraded", "Lagging", "Custom"]


def test_flips_report_status_or_reason_changes() -> None:
    old = merge_conditions([], [Condition("Ready", "False", "A", "m")], 1, T0)
    same = merge_conditions(old, [Condition("Ready", "False", "A", "other message")], 1, T0)
    assert flips(old, same) == []
    changed = merge_conditions(old, [Condition("Ready", "False", "B", "m")], 1, T0)
    assert len(flips(old, changed)) == 1


def test_parse_time_accepts_rfc3339_variants() -> None:
    assert parse_time("2026-01-01T12:00:00Z") == T0
    assert parse_time("2026-01-01T12:00:00.5+00:00") == T0 + timedelta(milliseconds=500)
    assert parse_time("garbage") is None
    assert parse_time(None) is None


def report(age: float = 0, **fields: object) -> dict[str, object]:
    return {
        "reportTime": iso(T0 - timedelta(seconds=age)),
        "partitions": [0, 1],
        "published": 10,
        "backlog": 5,
        "oldestPendingSeconds": 1.0,
        "ratePerSecond": 2.0,
        **fields,
    }


def test_totals_count_gauges_of_fresh_reports_only() -> None:
    reports = {"a": report(), "b": report(age=5), "stale": report(age=100)}
    out = totals(reports, interval=10, now=T0, known=True)
    assert out["workers"] == 2
    assert out["backlog"] == 10
    assert out["published"] == 30  # counters include the stale entry of a still existing pod
    assert out["partitionsOwned"] == 2  # distinct partitions
    assert "backlog" not in totals(reports, interval=10, now=T0, known=False)
    assert is_fresh(reports["b"], 10, T0)
    assert not is_fresh(reports["stale"], 10, T0)


def test_gone_workers_need_a_known_pod_list() -> None:
    assert gone_workers({"a": {}, "b": {}}, ["a"]) == ["b"]
    assert gone_workers({"a": {}}, None) == []


def test_config_errors_route_by_the_reports_error_kind_not_by_its_words() -> None:
    assert config_error_area({"configError": "relation public.outbox does not exist", "errorKind": "database"}) == (
        "database"
    )
    # words that used to mean "database" do not move a stream error
    assert config_error_area({"configError": "no stream captures table.created", "errorKind": "stream"}) == "stream"
    # a worker from before errorKind only ever reported NATS-side configuration errors
    assert config_error_area({"configError": "stream: no stream captures subject x"}) == "stream"


def test_a_database_error_kind_blames_the_database() -> None:
    got = conditions({"a": report(configError="permission denied", errorKind="database"), "b": report()})
    assert got["DatabaseReady"] == ("False", "DatabaseError")
    assert got["StreamReady"] == ("True", "StreamAvailable")


def health(reports: dict, *, ready: int = 2, desired: int = 2, paused: bool = False) -> list[Condition]:
    """The health conditions of a 2-partition publisher with these worker reports, at T0."""
    targets = HealthTargets(
        paused=paused,
        interval=10,
        partitions=2,
        target_lag_seconds=30,
        stream_name="OUTBOX",
        duplicate_window_seconds=120,
        duplicate_horizon_seconds=50,
    )
    return health_conditions(targets, Rollout(desired, ready, ready, updated=ready), reports, T0)


def conditions(reports: dict, *, ready: int = 2, desired: int = 2, paused: bool = False) -> dict[str, tuple]:
    return {c.type: (c.status, c.reason) for c in health(reports, ready=ready, desired=desired, paused=paused)}


def test_healthy_relay_is_ready() -> None:
    got = conditions({"a": report(), "b": report()})
    assert got == {
        "Ready": ("True", "Publishing"),
        "Degraded": ("False", "AsExpected"),
        "DatabaseReady": ("True", "Reachable"),
        "StreamReady": ("True", "StreamAvailable"),
        "Lagging": ("False", "LagWithinTarget"),
    }


def test_no_reports_yet_is_unknown_not_false() -> None:
    got = conditions({})
    assert got["Ready"] == ("False", "WaitingForReports")
    assert got["DatabaseReady"][0] == "Unknown"
    assert got["Lagging"][0] == "Unknown"


def test_config_error_degrades_and_blames_the_right_dependency() -> None:
    got = conditions({"a": report(configError="stream: no stream captures subject x"), "b": report()})
    assert got["Ready"] == ("False", "ConfigurationError")
    assert got["Degraded"] == ("True", "ConfigurationError")
    assert got["StreamReady"] == ("False", "StreamError")
    assert got["DatabaseReady"] == ("True", "Reachable")


def degraded(reports: dict) -> tuple[str, str, str]:
    (cond,) = (c for c in health(reports) if c.type == "Degraded")
    return cond.status, cond.reason, cond.message


def test_poison_rows_follow_the_dead_letters_waiting_and_clear_when_none_is_left() -> None:
    """Degraded=PoisonRows while the publisher's dead-letter table holds rows, whoever moved them; once
    they are requeued or discarded (outboxctl dead-letters) it clears without restarting a worker,
    although the workers' own cumulative counts stay."""
    status, reason, message = degraded({"a": report(deadLetters=3, deadLettersWaiting=3)})
    assert (status, reason) == ("True", "PoisonRows")
    assert "3 dead letter(s)" in message
    assert "outboxctl dead-letters list --publisher" in message
    assert "requeue" in message
    assert "clears when none is left" in message
    # rows dead-lettered by a worker that has since gone: still waiting, still degraded
    assert degraded({"a": report(deadLettersWaiting=2)})[:2] == ("True", "PoisonRows")
    # requeued or discarded: the table is empty, the cumulative count is not
    assert degraded({"a": report(deadLetters=3, deadLettersWaiting=0)})[:2] == ("False", "AsExpected")
    # the workers sample the table at different moments: the most any fresh report counted
    assert "5 dead letter(s)" in degraded({"a": report(deadLettersWaiting=5), "b": report(deadLettersWaiting=0)})[2]


def test_poison_rows_of_workers_that_do_not_count_the_table_follow_their_own_counts() -> None:
    """Workers of a version before deadLettersWaiting: their cumulative counts decide, as before."""
    assert degraded({"a": report(deadLetters=3)})[:2] == ("True", "PoisonRows")
    assert "outboxctl dead-letters list" in degraded({"a": report(deadLetters=3)})[2]
    assert degraded({"a": report()})[:2] == ("False", "AsExpected")


def test_totals_show_the_dead_letters_waiting_only_when_reported() -> None:
    both = {"a": report(deadLetters=1, deadLettersWaiting=4), "b": report(deadLetters=2, deadLettersWaiting=3)}
    out = totals(both, interval=10, now=T0, known=True)
    assert (out["deadLetters"], out["deadLettersWaiting"]) == (3, 4)
    assert "deadLettersWaiting" not in totals({"a": report(deadLetters=1)}, interval=10, now=T0, known=True)


def test_poison_rows_lag_and_rollout() -> None:
    assert conditions({"a": report(deadLetters=3)})["Degraded"] == ("True", "PoisonRows")
    assert conditions({"a": report(oldestPendingSeconds=45.0)})["Lagging"] == ("True", "LagAboveTarget")
    assert conditions({"a": report()}, ready=1)["Ready"] == ("False", "WorkersNotReady")
    assert conditions({}, ready=0, desired=0, paused=True)["Ready"] == ("False", "Paused")
    assert conditions({"a": report(age=100)})["Degraded"] == ("True", "StaleReports")


def test_a_database_that_does_not_answer_a_worker_makes_database_ready_false_until_it_does() -> None:
    """A worker reports databaseError while its lease renewals fail (an outage, not a configuration
    error): DatabaseReady says so instead of "N worker(s) read the outbox table"."""
    down = "the database has not answered lease renewals for 12s (lease renewal failed: ConnectionRefusedError)"
    got = conditions({"a": report(databaseError=down), "b": report()})
    assert got["DatabaseReady"] == ("False", "DatabaseUnavailable")
    assert got["StreamReady"] == ("True", "StreamAvailable")
    assert conditions({"a": report(databaseError=""), "b": report()})["DatabaseReady"] == ("True", "Reachable")
    # a stale report's old error is not the database's state now
    assert conditions({"a": report(age=100, databaseError=down), "b": report()})["DatabaseReady"] == (
        "True",
        "Reachable",
    )


def test_notifies_that_do_not_reach_a_worker_degrade_the_publisher_until_they_do() -> None:
    """A worker whose listener's probe did not come back (notifyError) relays by the poll, slower
    than it should: Degraded=NotifyUnavailable names it and the cause, after configuration errors
    and dead letters, and clears when its reports no longer carry the error."""
    lost = "NOTIFY does not reach this worker (its probe did not come back within 5s): ..."
    status, reason, message = degraded({"a": report(), "b": report(notifyError=lost)})
    assert (status, reason) == ("True", "NotifyUnavailable")
    assert message.startswith("relaying by the poll, not at once: b: NOTIFY does not reach this worker")
    assert conditions({"a": report(notifyError=lost)})["Ready"][0] == "True"  # still relaying
    assert degraded({"a": report(deadLettersWaiting=1, notifyError=lost)})[1] == "PoisonRows"
    assert degraded({"a": report(notifyError="")})[:2] == ("False", "AsExpected")
    assert degraded({"a": report(age=100, notifyError=lost), "b": report()})[1] == "StaleReports"
