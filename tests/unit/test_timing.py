"""The relay's timing rules are written once (outbox_common.timing): the worker's settings and the
operator's spec refuse the same configurations, for the same reason, each naming its own field."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from outbox_common.settings import WorkerSettings
from outbox_common.timing import Timing, backoff_delay, duplicate_horizon_seconds, timing_violation
from outbox_operator.spec import InvalidSpec, parse_spec

BASE_SPEC: dict[str, Any] = {
    "partitions": 8,
    "database": {"secretRef": {"name": "db"}},
    "nats": {"servers": ["nats://nats:4222"]},
}

# (worker settings, the same values in the spec, the setting at fault, its spec path, the reason)
CASES = [
    (
        {"retry_backoff_initial_seconds": 10, "retry_backoff_max_seconds": 5},
        {"publishing": {"retry": {"initialBackoffSeconds": 10, "maxBackoffSeconds": 5}}},
        "retry_backoff_initial_seconds",
        "spec.publishing.retry.initialBackoffSeconds",
        "must not exceed",
    ),
    (
        {"lease_ttl_seconds": 3, "ack_timeout_seconds": 2},
        {"leases": {"ttlSeconds": 3}, "publishing": {"ackTimeoutSeconds": 2}},
        "ack_timeout_seconds",
        "spec.publishing.ackTimeoutSeconds",
        "at most half of",
    ),
    (
        {"lease_ttl_seconds": 6, "lease_renew_seconds": 4, "ack_timeout_seconds": 1},
        {"leases": {"ttlSeconds": 6, "renewSeconds": 4}, "publishing": {"ackTimeoutSeconds": 1}},
        "lease_renew_seconds",
        "spec.leases.renewSeconds",
        "renewed at least twice",
    ),
    (
        {"lease_ttl_seconds": 1, "ack_timeout_seconds": 0.5},
        {"leases": {"ttlSeconds": 1}, "publishing": {"ackTimeoutSeconds": 0.5}},
        "lease_ttl_seconds",
        "spec.leases.ttlSeconds",
        "must stay usable until the next renewal",
    ),
    (
        {"lease_ttl_seconds": 6, "lease_renew_seconds": 3, "ack_timeout_seconds": 2.5},
        {"leases": {"ttlSeconds": 6, "renewSeconds": 3}, "publishing": {"ackTimeoutSeconds": 2.5}},
        "lease_ttl_seconds",
        "spec.leases.ttlSeconds",
        "by at least 1s",
    ),
    (
        {"stream_duplicate_window_seconds": 30},
        {"stream": {"duplicateWindowSeconds": 30}},
        "stream_duplicate_window_seconds",
        "spec.stream.duplicateWindowSeconds",
        "must cover the re-publish horizon",
    ),
]


@pytest.mark.parametrize(("settings", "spec", "setting", "path", "reason"), CASES)
def test_settings_and_spec_refuse_the_same_values_each_naming_its_field(
    settings: dict[str, float], spec: dict[str, Any], setting: str, path: str, reason: str
) -> None:
    with pytest.raises(ValidationError) as worker_error:
        WorkerSettings.model_validate({"database_url": "postgresql://x/db", **settings})
    worker_message = str(worker_error.value)
    assert f"{setting} must" in worker_message
    assert reason in worker_message

    with pytest.raises(InvalidSpec) as spec_error:
        parse_spec({**BASE_SPEC, **spec})
    assert str(spec_error.value).startswith(f"{path}: ")  # the field at fault, as the operator reports it
    assert reason in str(spec_error.value)


def test_the_horizon_is_one_formula_for_settings_and_spec() -> None:
    s = WorkerSettings(
        database_url="postgresql://x/db", lease_ttl_seconds=10, ack_timeout_seconds=2, retry_backoff_max_seconds=7
    )
    spec = parse_spec(
        {
            **BASE_SPEC,
            "leases": {"ttlSeconds": 10},
            "publishing": {"ackTimeoutSeconds": 2, "retry": {"maxBackoffSeconds": 7}},
        }
    )
    assert s.duplicate_horizon_seconds == spec.duplicate_horizon_seconds == duplicate_horizon_seconds(10, 2, 7) == 19


def test_valid_timing_has_no_violation() -> None:
    assert timing_violation(Timing(15, 0, 5, 0.2, 30, 120), str) is None


def test_backoff_doubles_within_its_cap_with_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        delay = backoff_delay(attempt, 5.0, 300.0, rng)
        whole = min(300.0, 5.0 * 2 ** (attempt - 1))
        assert whole / 2 <= delay <= whole
