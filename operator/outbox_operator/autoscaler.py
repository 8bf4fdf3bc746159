"""The operator's autoscaler on queue pressure, with a stabilization window for scale-downs.

Each evaluation computes a *recommendation* from the fresh reports:

* backlog: ``ceil(backlog / targetBacklogPerReplica)`` workers,
* lag: when the oldest pending row is older than ``targetLagSeconds``, one worker more than now,

clamped to ``[minReplicas, min(maxReplicas, partitions)]``. A higher recommendation scales up at
once. A lower one scales down only after every recommendation for ``scaleDownStabilizationSeconds``
was lower than the current count, and then to the highest of them (the rule of the Kubernetes HPA),
so a queue that drains and refills does not make the worker count flap. Without fresh reports (or
with the pressure unknown) the count stays where it is (no data is no reason to scale), and a
scale-down's window starts again once the pressure is known.

State lives in ``status.autoscaler`` and changes only when a decision does, so evaluating an
unchanged situation writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .conditions import parse_time, rfc3339
from .spec import Autoscaling


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: dict[str, Any]  # the new status.autoscaler
    scaled: bool  # the count changed (an Event is due)
    reason: str


def recommend(policy: Autoscaling, partitions: int, current: int, backlog: int, oldest_seconds: float) -> int:
    ceiling = min(policy.max_replicas, partitions)
    wanted = math.ceil(backlog / policy.target_backlog_per_replica)
    if oldest_seconds > policy.target_lag_seconds:
        wanted = max(wanted, current + 1)
    return max(policy.min_replicas, min(wanted, ceiling))


def decide(
    policy: Autoscaling,
    partitions: int,
    state: Mapping[str, Any] | None,
    fallback: int,
    pressure: Mapping[str, Any] | None,
    now: datetime,
) -> Decision:
    """Next worker count. ``pressure`` is ``status.totals`` (None or no fresh worker: hold).
    ``fallback`` is the count to start from when the autoscaler has no state yet."""
    state = dict(state or {})
    ceiling = min(policy.max_replicas, partitions)
    current = int(state.get("replicas", fallback))
    bounded = max(policy.min_replicas, min(current, ceiling))
    if pressure is None or not pressure.get("workers"):
        # Hold, and drop a scale-down in progress: its window must be covered by recommendations
        # that were all lower, and nothing is known of this gap (a database outage, reports gone).
        new = {**state, "replicas": bounded, "scaleDownSince": None, "scaleDownTo": None}
        changed = bounded != current
        if changed:
            new["lastScaleTime"] = rfc3339(now)
        return Decision(bounded, _clean(new), changed, "bounds" if changed else "no fresh reports")

    rec = recommend(
        policy,
        partitions,
        bounded,
        int(pressure.get("backlog") or 0),
        float(pressure.get("oldestPendingSeconds") or 0.0),
    )
    new = {"replicas": bounded, "recommendation": rec, "lastScaleTime": state.get("lastScaleTime")}
    if rec > bounded:
        new["replicas"] = rec
        new["lastScaleTime"] = rfc3339(now)
        return Decision(rec, _clean(new), True, f"queue pressure asks for {rec} workers")
    if rec < bounded:
        since = parse_time(state.get("scaleDownSince"))
        if since is None:
            since, target = now, rec
        else:
            target = max(int(state.get("scaleDownTo", rec)), rec)
        if (now - since).total_seconds() >= policy.scale_down_stabilization_seconds:
            new["replicas"] = target
            new["lastScaleTime"] = rfc3339(now)
            return Decision(
                target,
                _clean(new),
                True,
                f"queue pressure asked for at most {target} workers for {policy.scale_down_stabilization_seconds}s",
            )
        new["scaleDownSince"] = rfc3339(since)
        new["scaleDownTo"] = target
        return Decision(bounded, _clean(new), bounded != current, "stabilizing")
    return Decision(bounded, _clean(new), bounded != current, "steady")


def _clean(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if v is not None}
