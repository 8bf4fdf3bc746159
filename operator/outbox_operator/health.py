"""From the workers' own reports (``status.workers``) to totals, queue pressure and conditions.

Pure functions over plain dicts. A report is *fresh* when it is at most three report intervals old;
only fresh reports count for the health conditions, since a stale report describes a worker that
may no longer be publishing. The gauges (backlog, age, rate, in flight) are written only when the
fresh reports cover every partition and no current worker's report is stale; otherwise they are
absent (unknown, never 0) and the Lagging condition says why.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox_common.report import ERROR_KIND_DATABASE, ERROR_KIND_STREAM, ERROR_KINDS

from . import constants as c
from .conditions import Condition, parse_time

Report = Mapping[str, Any]

# The keys of status.totals that describe the queue right now: absent (never 0) when unknown.
PRESSURE_GAUGES = ("inFlight", "backlog", "oldestPendingSeconds", "ratePerSecond")


def is_fresh(report: Report, interval: float, now: datetime) -> bool:
    at = parse_time(report.get("reportTime"))
    return at is not None and (now - at).total_seconds() <= interval * c.STALE_AFTER_INTERVALS


def gone_workers(workers: Mapping[str, Any], pods: Collection[str] | None) -> list[str]:
    """Entries of pods that no longer exist (to be removed). Nothing when pods are unknown."""
    if pods is None:
        return []
    return sorted(name for name in workers if name not in pods)


def current_reports(workers: Mapping[str, Any], pods: Collection[str] | None) -> dict[str, Report]:
    return {
        name: report
        for name, report in sorted(workers.items())
        if isinstance(report, Mapping) and (pods is None or name in pods)
    }


@dataclass(frozen=True)
class Unknown:
    """Why the operator does not know the queue pressure: a condition reason and its message."""

    reason: str
    message: str


def owned_partitions(reports: Mapping[str, Report]) -> set[int]:
    return {int(p) for r in reports.values() for p in r.get("partitions") or []}


def pressure_unknown(
    reports: Mapping[str, Report], interval: float, now: datetime, *, partitions: int, paused: bool
) -> Unknown | None:
    """None when the fresh reports describe every partition; else why the pressure is unknown.

    Backlog and age are sums and maxima over the partitions each worker owns, so they are known
    only when every current worker reported recently, together they own every partition, and each
    that owns some counted them at its last sample."""
    if paused:
        return Unknown("Paused", "spec.paused is true: no worker reads the outbox, so the backlog is unknown")
    fresh = {name: r for name, r in reports.items() if is_fresh(r, interval, now)}
    if not fresh:
        return Unknown("NoReports", "no fresh worker report: the backlog is unknown")
    stale = sorted(set(reports) - set(fresh))
    if stale:
        return Unknown(
            "StaleReports",
            f"no report for {interval * c.STALE_AFTER_INTERVALS:g}s from {', '.join(stale)}: "
            "the backlog of its partitions is unknown",
        )
    unowned = sorted(set(range(partitions)) - owned_partitions(fresh))
    if unowned:
        return Unknown("PartitionsUnowned", f"{_partition_list(unowned)} of {partitions} have no live owner")
    unsampled = sorted(name for name, r in fresh.items() if r.get("partitions") and not has_pressure(r))
    if unsampled:
        return Unknown(
            "NoPressureSample",
            f"{', '.join(unsampled)} could not count the rows of its partitions at its last sample (the "
            "database did not answer, see databaseError or the worker's log): the backlog is unknown",
        )
    return None


def has_pressure(report: Report) -> bool:
    """Whether a report carries its backlog: a worker leaves it (and its oldest age) out until its
    first sample succeeds, and again after one failed."""
    return report.get("backlog") is not None


def _partition_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:8]) + (", ..." if len(numbers) > 8 else "")
    return f"{len(numbers)} partition(s) ({shown})"


def dead_letters_waiting(fresh: Iterable[Report]) -> int | None:
    """The publisher's dead letters waiting, as the fresh reports counted them: one count of one
    table, whichever worker sampled it last, so the most, not a sum. None when no fresh report
    carries it (workers of a version before ``deadLettersWaiting``)."""
    return max((int(r["deadLettersWaiting"] or 0) for r in fresh if "deadLettersWaiting" in r), default=None)


def totals(reports: Mapping[str, Report], interval: float, now: datetime, *, known: bool) -> dict[str, Any]:
    """``status.totals``: counters over all current entries; the gauges (backlog, oldest pending age,
    rate, in flight) only when ``known`` (see :func:`pressure_unknown`), absent otherwise: an unknown
    backlog is never shown as 0."""
    fresh = [r for r in reports.values() if is_fresh(r, interval, now)]

    def total(key: str, among: Collection[Report]) -> int:
        return sum(int(r.get(key) or 0) for r in among)

    out: dict[str, Any] = {
        "workers": len(fresh),
        "partitionsOwned": len(owned_partitions({str(i): r for i, r in enumerate(fresh)})),
        "published": total("published", list(reports.values())),
        "duplicates": total("duplicates", list(reports.values())),
        "failed": total("failed", list(reports.values())),
        "deadLetters": total("deadLetters", list(reports.values())),
    }
    waiting = dead_letters_waiting(fresh)
    if waiting is not None:
        out["deadLettersWaiting"] = waiting
    if known:
        out["inFlight"] = total("inFlight", fresh)
        out["backlog"] = total("backlog", fresh)
        out["oldestPendingSeconds"] = round(
            max((float(r.get("oldestPendingSeconds") or 0) for r in fresh), default=0.0), 1
        )
        out["ratePerSecond"] = round(sum(float(r.get("ratePerSecond") or 0) for r in fresh), 1)
    return out


def config_error_area(report: Report) -> str:
    """``database`` or ``stream``: which condition a worker's configError belongs to, read from the
    report's ``errorKind`` field (outbox_common.report.ERROR_KINDS), never from the message's words.
    A report without one (a worker from before the field) is ``stream``: those workers only ever
    reported NATS-side configuration errors."""
    kind = str(report.get("errorKind") or "")
    return kind if kind in ERROR_KINDS else ERROR_KIND_STREAM


@dataclass(frozen=True)
class Rollout:
    """What the Deployment says about the worker pods."""

    desired: int
    replicas: int
    ready: int
    # pods of the current pod template (the Deployment's status.updatedReplicas); None when the
    # Deployment is not yet at the current template, or its controller has not observed it yet
    updated: int | None = None

    @property
    def rolling_out(self) -> bool:
        """Some worker pods still run an older pod template (an older spec), or none is known to run
        the current one: ready pods alone do not say the current spec is applied."""
        return self.updated is None or self.updated < self.desired or self.replicas > self.updated


@dataclass(frozen=True)
class HealthTargets:
    """What the spec says the health conditions are measured against."""

    paused: bool
    interval: float  # the workers' report interval, seconds
    partitions: int
    target_lag_seconds: float
    stream_name: str
    duplicate_window_seconds: float
    duplicate_horizon_seconds: float


@dataclass(frozen=True)
class WorkerView:
    """The current workers' reports, sorted into what the conditions ask about."""

    reports: Mapping[str, Report]
    fresh: Mapping[str, Report]
    stale: list[str]  # current workers whose last report is too old
    errors: Mapping[str, str]  # worker -> its configError, fresh reports only
    database_errors: Mapping[str, str]  # worker -> its databaseError (an outage), fresh reports only
    notify_errors: Mapping[str, str]  # worker -> its notifyError (NOTIFYs do not reach it), fresh reports only
    dead_letters: int  # rows the current workers moved to the dead-letter table since they started
    dead_letters_waiting: int | None  # the publisher's rows in the dead-letter table now (dead_letters_waiting())

    @classmethod
    def of(cls, reports: Mapping[str, Report], interval: float, now: datetime) -> WorkerView:
        fresh = {name: r for name, r in reports.items() if is_fresh(r, interval, now)}
        return cls(
            reports=reports,
            fresh=fresh,
            stale=sorted(set(reports) - set(fresh)),
            errors={name: str(r.get("configError")) for name, r in fresh.items() if r.get("configError")},
            database_errors={name: str(r["databaseError"]) for name, r in fresh.items() if r.get("databaseError")},
            notify_errors={name: str(r["notifyError"]) for name, r in fresh.items() if r.get("notifyError")},
            dead_letters=sum(int(r.get("deadLetters") or 0) for r in reports.values()),
            dead_letters_waiting=dead_letters_waiting(fresh.values()),
        )

    def errors_in(self, area: str) -> dict[str, str]:
        """The fresh configuration errors whose report's ``errorKind`` is ``area``."""
        return {n: m for n, m in self.errors.items() if config_error_area(self.fresh[n]) == area}


_WAITING = "no fresh worker report yet"


def _first_error(errors: Mapping[str, str]) -> str:
    """The first worker's error (by name), and how many more workers report one."""
    name = sorted(errors)[0]
    more = f" (and {len(errors) - 1} more workers)" if len(errors) > 1 else ""
    return f"{name}: {errors[name]}{more}"


def database_condition(view: WorkerView) -> Condition:
    """DatabaseReady: False on a worker's database configuration error, or while a worker's database
    does not answer (its ``databaseError``); True when a fresh report exists."""
    errors = view.errors_in(ERROR_KIND_DATABASE)
    if errors:
        return Condition(c.DATABASE_READY, "False", "DatabaseError", _first_error(errors))
    if view.database_errors:
        return Condition(c.DATABASE_READY, "False", "DatabaseUnavailable", _first_error(view.database_errors))
    if view.fresh:
        return Condition(c.DATABASE_READY, "True", "Reachable", f"{len(view.fresh)} worker(s) read the outbox table")
    return Condition(c.DATABASE_READY, "Unknown", "NoReports", _WAITING)


def stream_condition(view: WorkerView, targets: HealthTargets) -> Condition:
    """StreamReady: False on a worker's NATS/stream error, True when a fresh report exists."""
    errors = view.errors_in(ERROR_KIND_STREAM)
    if errors:
        return Condition(c.STREAM_READY, "False", "StreamError", _first_error(errors))
    if view.fresh:
        return Condition(
            c.STREAM_READY,
            "True",
            "StreamAvailable",
            f"stream {targets.stream_name} accepts the subjects; required duplicate window "
            f"{targets.duplicate_window_seconds:g}s covers the duplicate horizon "
            f"{targets.duplicate_horizon_seconds:g}s",
        )
    return Condition(c.STREAM_READY, "Unknown", "NoReports", _WAITING)


def degraded_condition(view: WorkerView, targets: HealthTargets) -> Condition:
    """Degraded: a configuration error, then dead letters, then NOTIFYs that do not arrive, then stale
    reports (not when paused)."""
    if view.errors:
        return Condition(
            c.DEGRADED,
            "True",
            "ConfigurationError",
            f"publishing stopped by a configuration error: {_first_error(view.errors)}",
        )
    if view.dead_letters_waiting:
        return Condition(
            c.DEGRADED,
            "True",
            "PoisonRows",
            f"{view.dead_letters_waiting} dead letter(s) of this publisher wait in the dead-letter table: see "
            "them with `outboxctl dead-letters list --publisher NAME`, fix the cause, then `outboxctl "
            "dead-letters requeue` or `discard` them; Degraded clears when none is left",
        )
    if view.dead_letters_waiting is None and view.dead_letters:  # workers that do not count the table
        return Condition(
            c.DEGRADED,
            "True",
            "PoisonRows",
            f"{view.dead_letters} row(s) moved to the dead-letter table since the workers started: see them "
            "with `outboxctl dead-letters list`, fix the cause, then `outboxctl dead-letters requeue` or "
            "`discard` them",
        )
    if view.notify_errors:
        return Condition(
            c.DEGRADED,
            "True",
            "NotifyUnavailable",
            f"relaying by the poll, not at once: {_first_error(view.notify_errors)}",
        )
    if view.stale and not targets.paused:
        return Condition(
            c.DEGRADED,
            "True",
            "StaleReports",
            f"no report for {targets.interval * c.STALE_AFTER_INTERVALS:g}s from: {', '.join(view.stale)}",
        )
    return Condition(c.DEGRADED, "False", "AsExpected", "no configuration errors or dead letters")


def lagging_condition(view: WorkerView, targets: HealthTargets, unknown: Unknown | None) -> Condition:
    """Lagging: Unknown while the pressure is unknown, else the oldest pending row against the target."""
    if unknown is not None:
        return Condition(c.LAGGING, "Unknown", unknown.reason, unknown.message)
    oldest = max((float(r.get("oldestPendingSeconds") or 0) for r in view.fresh.values()), default=0.0)
    message = f"oldest pending row is {oldest:.0f}s old; target {targets.target_lag_seconds:g}s"
    if oldest > targets.target_lag_seconds:
        return Condition(c.LAGGING, "True", "LagAboveTarget", message)
    return Condition(c.LAGGING, "False", "LagWithinTarget", message)


def ready_condition(view: WorkerView, targets: HealthTargets, rollout: Rollout, unknown: Unknown | None) -> Condition:
    """Ready: the first reason it is not, in order (paused, scaled to zero, pods, a rollout of the
    current spec not yet done, errors, reports, partitions), else True."""
    if targets.paused:
        return Condition(
            c.READY, "False", "Paused", "spec.paused is true: workers drained and stopped; set it to false to resume"
        )
    if rollout.desired == 0:
        return Condition(c.READY, "False", "ScaledToZero", "spec.replicas is 0: no worker runs")
    if rollout.ready < rollout.desired:
        return Condition(c.READY, "False", "WorkersNotReady", f"{rollout.ready}/{rollout.desired} worker pods ready")
    if rollout.rolling_out:
        return Condition(c.READY, "False", "RollingOut", _rolling_out_message(rollout))
    if view.errors:
        return Condition(c.READY, "False", "ConfigurationError", _first_error(view.errors))
    if not view.fresh:
        return Condition(c.READY, "False", "WaitingForReports", f"{rollout.ready} worker pods ready; {_WAITING}")
    if unknown is not None and unknown.reason == "PartitionsUnowned":
        return Condition(c.READY, "False", "PartitionsUnowned", unknown.message)
    return Condition(
        c.READY, "True", "Publishing", f"{rollout.ready} worker(s) publishing, {len(view.fresh)} reporting"
    )


def _rolling_out_message(rollout: Rollout) -> str:
    updated = rollout.updated or 0
    older = max(rollout.replicas - updated, 0)
    return (
        f"{updated}/{rollout.desired} worker pods run the current spec, {older} pod(s) an older one: the "
        "ready pods still publish with the older spec; if this lasts, a new pod does not become ready "
        "(see its logs and events)"
    )


def health_conditions(
    targets: HealthTargets, rollout: Rollout, reports: Mapping[str, Report], now: datetime
) -> list[Condition]:
    """Ready, Degraded, DatabaseReady, StreamReady and Lagging (in that order) from a valid spec's
    observed state; each condition is decided by its own function above."""
    view = WorkerView.of(reports, targets.interval, now)
    unknown = pressure_unknown(reports, targets.interval, now, partitions=targets.partitions, paused=targets.paused)
    return [
        ready_condition(view, targets, rollout, unknown),
        degraded_condition(view, targets),
        database_condition(view),
        stream_condition(view, targets),
        lagging_condition(view, targets, unknown),
    ]
