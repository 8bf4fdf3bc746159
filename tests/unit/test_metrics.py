"""The ack-latency histogram is counted by the worker itself (BucketCounts, one bisect per ack) and
must read on /metrics exactly like a prometheus_client Histogram fed the same values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from outbox_common import names
from outbox_worker.adapters.metrics import LATENCY_BUCKETS, BucketCounts, BucketCountsCollector, Metrics

# below the first bound, on bounds (le is <=), between them, past the last one
VALUES = [0.0, 0.0001, 0.0005, 0.0006, 0.001, 0.003, 0.01, 0.02, 0.5, 1.0, 2.5, 9.99, 10.0, 11.0, 100.0]


def _lines(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("values", [[], VALUES, VALUES * 3])
def test_bucket_counts_read_like_a_prometheus_histogram(values: list[float]) -> None:
    reference = CollectorRegistry()
    hist = Histogram("x_seconds", "doc", ["publisher"], registry=reference, buckets=LATENCY_BUCKETS).labels("p")
    ours = CollectorRegistry()
    counts = BucketCounts(LATENCY_BUCKETS)
    ours.register(BucketCountsCollector("x_seconds", "doc", {"publisher": "p"}, counts))
    for v in values:
        hist.observe(v)
        counts.observe(v)
    assert _lines(ours) == _lines(reference)


def test_bucket_counts_observe_times_is_that_many_observations() -> None:
    reference = CollectorRegistry()
    hist = Histogram("x_seconds", "doc", ["publisher"], registry=reference, buckets=LATENCY_BUCKETS).labels("p")
    ours = CollectorRegistry()
    counts = BucketCounts(LATENCY_BUCKETS)
    ours.register(BucketCountsCollector("x_seconds", "doc", {"publisher": "p"}, counts))
    for times, v in enumerate(VALUES, 1):
        for _ in range(times):
            hist.observe(v)
        counts.observe_times(v, times)
    assert _lines(ours) == _lines(reference)


def test_worker_metrics_expose_ack_latency_per_publisher() -> None:
    metrics = Metrics("orders")
    metrics.ack_latency.observe(0.003)
    text = metrics.render().decode()
    assert f'{names.M_ACK_LATENCY}_bucket{{le="0.0025",publisher="orders"}} 0.0' in text
    assert f'{names.M_ACK_LATENCY}_bucket{{le="0.005",publisher="orders"}} 1.0' in text
    assert f'{names.M_ACK_LATENCY}_count{{publisher="orders"}} 1.0' in text
