"""Kubernetes-style conditions: type, status, reason (CamelCase), message, lastTransitionTime,
observedGeneration. ``lastTransitionTime`` moves only when ``status`` flips."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from . import constants as c

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 (with Z or an offset, with or without fractions) to an aware datetime; None if bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def merge_conditions(
    existing: Iterable[Mapping[str, Any]] | None,
    wanted: Iterable[Condition],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """The new ``status.conditions``: ``wanted`` replaces conditions of the same type; the time of a
    condition whose status did not change is kept. Conditions of other types are kept as they are.
    Output order: the known types first (Ready, Degraded, ...), then others, so it is stable."""
    old = {str(cond.get("type")): dict(cond) for cond in existing or []}
    result = dict(old)
    for cond in wanted:
        prior = old.get(cond.type)
        since = (
            prior["lastTransitionTime"]
            if prior and prior.get("status") == cond.status and prior.get("lastTransitionTime")
            else rfc3339(now)
        )
        result[cond.type] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }
    order = {t: i for i, t in enumerate(c.CONDITION_TYPES)}
    return [result[t] for t in sorted(result, key=lambda t: (order.get(t, len(order)), t))]


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def flips(
    old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any] | None, Mapping[str, Any]]]:
    """Conditions whose status or reason changed: (old or None, new) pairs, for Events."""
    before = list(old or [])
    changed = []
    for cond in new:
        prior = find(before, str(cond["type"]))
        if prior is None or prior.get("status") != cond["status"] or prior.get("reason") != cond["reason"]:
            changed.append((prior, cond))
    return changed
