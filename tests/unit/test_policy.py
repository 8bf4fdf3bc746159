"""Pure relay decisions: fair shares, retry delays, error-ack classification, waves."""

from __future__ import annotations

import random

import pytest

from outbox_common import names
from outbox_common.envelope import OutboxRow
from outbox_common.timing import backoff_delay
from outbox_worker.core.policy import (
    Outcome,
    PublishResult,
    classify_error_ack,
    fair_share,
    plan_waves,
    pressure_pause,
)


@pytest.mark.parametrize("partitions", [1, 7, 16, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 20])
def test_fair_shares_add_up_and_differ_by_at_most_one(partitions: int, n: int) -> None:
    workers = [f"w{i}" for i in range(n)]
    shares = [fair_share(partitions, workers, w) for w in workers]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1


def test_fair_share_is_independent_of_list_order_and_includes_me() -> None:
    assert fair_share(10, ["b", "a", "c"], "a") == fair_share(10, ["c", "a", "b"], "a") == 4
    # a worker not (yet) in the heartbeat list counts itself
    assert fair_share(10, ["a"], "b") == 5
    assert fair_share(10, ["a", "a", "b"], "b") == 5


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 40):
        nominal = min(30.0, 0.2 * 2 ** (attempt - 1))
        for _ in range(20):
            d = backoff_delay(attempt, 0.2, 30.0, rng)
            assert nominal / 2 <= d <= nominal
    # jitter: not always the same value
    assert len({round(backoff_delay(3, 1.0, 100.0, rng), 6) for _ in range(20)}) > 1
    # absurd attempt counts stay finite and capped
    assert backoff_delay(10_000, 0.2, 30.0, rng) <= 30.0


@pytest.mark.parametrize(
    ("code", "err_code", "outcome", "reason"),
    [
        (503, 10077, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # max messages, discard new
        (503, 10047, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # insufficient resources
        (400, 10071, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # wrong last sequence
        (400, 10054, Outcome.PERMANENT, names.REASON_PAYLOAD_TOO_LARGE),  # message size exceeds max
        (413, 0, Outcome.PERMANENT, names.REASON_PAYLOAD_TOO_LARGE),
        # the header block over nats-server's 64 KiB: the same bytes are refused on every try
        (400, 10097, Outcome.PERMANENT, names.REASON_HEADER_TOO_LARGE),
        # any other 4xx about the message alone: permanent, named as the server's refusal
        (400, 10165, Outcome.PERMANENT, names.REASON_SERVER_REJECTED),  # invalid per-message TTL
        (400, 10171, Outcome.PERMANENT, names.REASON_SERVER_REJECTED),  # message counter increment invalid
        (400, 10003, Outcome.PERMANENT, names.REASON_SERVER_REJECTED),  # bad request
        # 4xx that are about the moment or the stream: a retry can succeed, never a dead letter
        (400, 10164, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # wrong last sequence (in process)
        (400, 10070, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # wrong last msg id
        (409, 10158, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # duplicate message id in process
        (429, 10167, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # too many requests
        (400, 10002, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # account resources exceeded
        (400, 10202, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # cluster member change in progress
        (503, 10008, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # JetStream temporarily unavailable
        (500, 10118, Outcome.RETRYABLE, names.REASON_SERVER_ERROR),  # stream is offline
        # the stream, not the row: pause the partition (configuration), never a dead letter
        (400, 10060, Outcome.CONFIG, names.REASON_NO_STREAM),  # expected stream does not match
        (400, 10109, Outcome.CONFIG, names.REASON_NO_STREAM),  # sealed stream
    ],
)
def test_error_ack_classification(code: int, err_code: int, outcome: Outcome, reason: str) -> None:
    res = classify_error_ack(code, err_code, "some description " * 50)
    assert res.outcome is outcome
    assert res.reason == reason
    assert not res.ok
    assert res.detail.startswith(f"{code}/{err_code}: ")
    assert len(res.detail) <= 300


def test_only_acks_and_duplicates_are_success() -> None:
    assert PublishResult(Outcome.ACKED, seq=1).ok
    assert PublishResult(Outcome.DUPLICATE, seq=1).ok
    for o in (Outcome.RETRYABLE, Outcome.PERMANENT, Outcome.CONFIG):
        assert not PublishResult(o).ok


def _rows(spec: list[tuple[int, str]]) -> list[OutboxRow]:
    t = "2026-01-01T00:00:00.000000+00:00"
    return [OutboxRow(i + 1, f"e{i + 1}", p, "t", agg, "ev", "", b"", {}, t, 0) for i, (p, agg) in enumerate(spec)]


def _check_wave_plan(rows: list[OutboxRow], waves: list[list[OutboxRow]], limit: int) -> None:
    flat = [r for w in waves for r in w]
    assert sorted(r.id for r in flat) == [r.id for r in rows]  # every row exactly once
    assert all(0 < len(w) <= limit for w in waves)
    wave_of = {r.id: k for k, w in enumerate(waves) for r in w}
    last: dict[tuple[int, str], int] = {}
    for r in rows:
        key = (r.partition, r.aggregate_id)
        if key in last:  # a later row of an aggregate goes in a strictly later wave
            assert wave_of[r.id] > last[key]
        last[key] = wave_of[r.id]


def test_ordered_waves_hold_one_row_per_aggregate_and_pipeline_others() -> None:
    rows = _rows([(0, "a"), (0, "a"), (0, "b"), (1, "a"), (0, "a"), (1, "c"), (1, "c")])
    waves = plan_waves(rows, True, 100)
    _check_wave_plan(rows, waves, 100)
    assert [[r.id for r in w] for w in waves] == [[1, 3, 4, 6], [2, 7], [5]]


@pytest.mark.parametrize("limit", [1, 2, 3, 50])
def test_ordered_waves_respect_the_in_flight_limit(limit: int) -> None:
    rng = random.Random(limit)
    rows = _rows([(rng.randrange(3), f"a{rng.randrange(8)}") for _ in range(200)])
    rows.sort(key=lambda r: (r.partition, r.id))
    waves = plan_waves(rows, True, limit)
    _check_wave_plan(sorted(rows, key=lambda r: r.id), waves, limit)


def test_unordered_waves_are_plain_chunks() -> None:
    rows = _rows([(0, "a")] * 7)
    waves = plan_waves(rows, False, 3)
    assert [[r.id for r in w] for w in waves] == [[1, 2, 3], [4, 5, 6], [7]]
    assert plan_waves([], True, 3) == []


@pytest.mark.parametrize(
    ("took", "pause"),
    [(0.0, 5.0), (0.03, 5.0), (0.1, 5.0), (0.3, 15.0), (1.0, 50.0), (1.2, 60.0), (5.0, 60.0)],
)
def test_pressure_samples_slow_down_when_counting_the_backlog_is_costly(took: float, pause: float) -> None:
    """Every 5 s while a sample is cheap; at most 1/50 of the time on counting; at least once a minute."""
    assert pressure_pause(took, 5.0) == pytest.approx(pause)


def test_every_dead_letter_reason_is_documented_and_distinct() -> None:
    """README lists every reason a dead letter can carry; operators filter on them
    (``outboxctl dead-letters list --reason``) and alert on the metric's label."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Dead letters") :]
    section = section[: section.index("\n## ")]
    assert len(set(names.DEAD_LETTER_REASONS)) == len(names.DEAD_LETTER_REASONS) == 6
    for reason in names.DEAD_LETTER_REASONS:
        assert f"`{reason}:" in section, reason
    assert names.reason_of("header_too_large: header block of 70000 bytes") == names.REASON_HEADER_TOO_LARGE
