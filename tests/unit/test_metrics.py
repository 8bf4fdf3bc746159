"""The ack-latency histogram is counted by the worker itself (BucketCounts, one bisect per ack) and
must read on /metrics exactly like a prometheus_client Histogram fed the same values; the process's CPU
and memory are read at each scrape."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

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


def _sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + '{publisher="orders"} ')]
    return float(line.rsplit(" ", 1)[1])


def test_worker_metrics_expose_the_process_cpu_and_memory_it_is_sized_by() -> None:
    """``outbox_cpu_seconds_total`` is this process's user + system CPU, read at each scrape (so it
    grows with work done), and ``outbox_resident_memory_bytes`` its resident memory."""
    metrics = Metrics("orders")
    before = _sample(metrics.render().decode(), names.M_CPU_SECONDS)
    os_before = sum(os.times()[:2])
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    text = metrics.render().decode()
    after = _sample(text, names.M_CPU_SECONDS)
    assert f"# TYPE {names.M_CPU_SECONDS} counter" in text
    assert after - before == pytest.approx(sum(os.times()[:2]) - os_before, abs=0.05)
    assert after - before >= 0.15
    rss = _sample(text, names.M_RESIDENT_MEMORY)
    assert 10 * 2**20 < rss < 4 * 2**30  # an interpreter with its libraries: tens of MiB
    held = bytearray(64 * 2**20)  # 64 MiB, touched: resident
    for i in range(0, len(held), 4096):
        held[i] = 1
    assert _sample(metrics.render().decode(), names.M_RESIDENT_MEMORY) > rss + 50 * 2**20


def test_readme_lists_every_metric_the_worker_exports() -> None:
    """README's metrics table names each metric of ``names.M_*`` (and nothing it does not export)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    exported = {v for k, v in vars(names).items() if k.startswith("M_") and isinstance(v, str)}
    listed = set(re.findall(r"^\| `(outbox_[a-z_]+)` \|", readme, re.MULTILINE))
    assert listed == exported
    rendered = Metrics("orders").render().decode()
    for name in exported:  # and each one is served: its HELP line shows before any labelled series is used
        assert f"# HELP {name.removesuffix('_total')}" in rendered, name
