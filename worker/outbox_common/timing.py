"""The relay's timing rules, written once for the worker's settings and the operator's spec.

- :func:`backoff_delay`: the one capped exponential backoff (the relay's row retries, the worker's
  start-up connects, the LISTEN reconnects, the operator's reconcile retries);
- :func:`duplicate_horizon_seconds`: the longest time between two publishes of one event id;
- :func:`renew_interval_seconds`: how often a worker renews its leases;
- :func:`timing_violation`: the cross-field rules every valid configuration keeps. The worker
  names fields as its settings (``ack_timeout_seconds``), the operator as its spec paths
  (``spec.publishing.ackTimeoutSeconds``): each passes its own ``name`` function, the rules and
  their reasons are the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter in [delay/2, delay] (attempt counts from 1)."""
    delay = min(cap, initial * 2.0 ** max(0, min(attempt - 1, 30)))
    r = (rng or random).random()
    return delay / 2 + r * delay / 2


# Subtracted, with the ack timeout, from a lease's TTL to get how long a renewed lease is usable
# (outbox_worker.app.leases; README, "Partitions and leases": "ack_timeout + 0.5 s"). The renewal's
# send time already errs early; this is slack for the step from a usability check to the wave's
# write, and for clock rate differences.
LEASE_SAFETY_MARGIN_SECONDS = 0.5


def renew_interval_seconds(lease_ttl_seconds: float, lease_renew_seconds: float) -> float:
    """How often a worker renews its leases: ``lease_renew_seconds``, or a third of the TTL when 0."""
    return lease_renew_seconds or lease_ttl_seconds / 3


def duplicate_horizon_seconds(
    lease_ttl_seconds: float, ack_timeout_seconds: float, backoff_max_seconds: float
) -> float:
    """Longest time between two publishes of one event id by any worker.

    A row published but not yet marked may be re-published by its next owner after the lease
    expires (TTL), plus one ack timeout, plus one retry delay. The stream's duplicate window must be
    at least this long, or a re-publish could be stored twice.
    """
    return lease_ttl_seconds + ack_timeout_seconds + backoff_max_seconds


@dataclass(frozen=True)
class Timing:
    """The values the cross-field rules read, by their worker setting names."""

    lease_ttl_seconds: float
    lease_renew_seconds: float  # 0: a third of the TTL
    ack_timeout_seconds: float
    retry_backoff_initial_seconds: float
    retry_backoff_max_seconds: float
    stream_duplicate_window_seconds: float

    @property
    def renew_interval_seconds(self) -> float:
        return renew_interval_seconds(self.lease_ttl_seconds, self.lease_renew_seconds)

    @property
    def lease_slack_seconds(self) -> float:
        """TTL - ack timeout - renew interval: how much longer a renewed lease stays usable (TTL - ack
        timeout - :data:`LEASE_SAFETY_MARGIN_SECONDS`) than the renew interval, plus that margin."""
        return self.lease_ttl_seconds - self.ack_timeout_seconds - self.renew_interval_seconds

    @property
    def horizon_seconds(self) -> float:
        return duplicate_horizon_seconds(
            self.lease_ttl_seconds, self.ack_timeout_seconds, self.retry_backoff_max_seconds
        )


def timing_violation(t: Timing, name: Callable[[str], str]) -> str | None:
    """The first rule ``t`` breaks, as a message that starts with the field at fault (``name(setting)``)
    and says the fix; None when every rule holds."""
    if t.retry_backoff_initial_seconds > t.retry_backoff_max_seconds:
        return f"{name('retry_backoff_initial_seconds')} must not exceed {name('retry_backoff_max_seconds')}"
    if t.ack_timeout_seconds * 2 > t.lease_ttl_seconds:
        return (
            f"{name('ack_timeout_seconds')} must be at most half of {name('lease_ttl_seconds')}: a publish must "
            "resolve well before its lease can move to another worker"
        )
    if t.lease_renew_seconds and t.lease_renew_seconds * 2 > t.lease_ttl_seconds:
        return (
            f"{name('lease_renew_seconds')} must be 0 (a third of the TTL) or at most half of "
            f"{name('lease_ttl_seconds')}, so a lease is renewed at least twice before it expires"
        )
    # A worker renews every renew interval (or poll interval, if shorter; LeaseManager.run) and sets a
    # renewed lease usable until sent + TTL - ack timeout - margin, "sent" taken before the renewal's
    # statements (LeaseManager.tick). The next renewal is sent when this tick's statements are done
    # plus one renew interval, and takes effect when its own statements are done: the lease stays
    # usable without a gap only if TTL - ack timeout - margin exceeds the renew interval by those
    # round trips, for which another margin is kept. Else the workers publish nothing in a gap after
    # every renewal, and nothing at all at TTL 1 s and ack timeout 0.5 s.
    if t.lease_slack_seconds < 2 * LEASE_SAFETY_MARGIN_SECONDS:
        return (
            f"{name('lease_ttl_seconds')} must exceed {name('ack_timeout_seconds')} + the renew interval "
            f"({name('lease_renew_seconds')}, or a third of the TTL when 0) by at least "
            f"{2 * LEASE_SAFETY_MARGIN_SECONDS:g}s, not by {t.lease_slack_seconds:.3g}s: a renewed lease is usable "
            f"for the TTL minus the ack timeout minus {LEASE_SAFETY_MARGIN_SECONDS:g}s and must stay usable until "
            "the next renewal has answered, or the workers pause publishing after every renewal (never publish, "
            "at the shortest). Raise the TTL, or lower the ack timeout or the renew interval"
        )
    if t.stream_duplicate_window_seconds < t.horizon_seconds:
        parts = " + ".join(name(f) for f in ("lease_ttl_seconds", "ack_timeout_seconds", "retry_backoff_max_seconds"))
        return (
            f"{name('stream_duplicate_window_seconds')} must cover the re-publish horizon ({parts} = "
            f"{t.horizon_seconds:g}s), not {t.stream_duplicate_window_seconds:g}s: raise it or lower those "
            "settings, or a row re-published by the next lease owner could be stored twice"
        )
    return None
