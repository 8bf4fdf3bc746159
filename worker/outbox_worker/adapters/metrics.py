"""Prometheus metrics and the worker's small HTTP server (/metrics, /healthz, /readyz).

Labels are low-cardinality: the publisher name, a failure reason from a fixed set, a handover kind.
Each worker has its own registry, so several workers can live in one process (demo, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

from outbox_common import names

log = logging.getLogger(__name__)
# How prometheus_client's Histogram writes its le labels ("0.0005", "1.0", "+Inf"); untyped there.
_le = cast(Callable[[float], str], _untyped_float_to_go_string)

# The retryable failure reasons (outbox_publish_failures_total's other values are the dead-letter ones).
_RETRY_REASONS = (names.REASON_TIMEOUT, names.REASON_DISCONNECT, names.REASON_NO_RESPONDERS, names.REASON_SERVER_ERROR)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BucketCounts:
    """Histogram counts kept by the caller's loop, for a value observed once per event (ack latency).

    ``observe`` is one bisect and two additions, ~0.15 µs; prometheus_client's ``Histogram.observe``
    scans the buckets and takes a lock per call, ~0.45 µs, which at tens of thousands of acks per
    second was ~3% of a worker's CPU. Not thread-safe: the worker's event loop is the only writer, and
    /metrics is rendered on that same loop. Exposed by :class:`BucketCountsCollector` with the
    buckets of a prometheus ``Histogram`` (``le`` is ``value <= bound``, like ``Histogram``'s)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_times(self, value: float, times: int) -> None:
        """``observe(value)`` ``times`` times, at the cost of one (the acks of one wave that arrive
        in one read share their latency)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times


class BucketCountsCollector(Collector):
    """One histogram metric, ``name`` with one label set, read from a :class:`BucketCounts`."""

    def __init__(self, name: str, doc: str, labels: dict[str, str], counts: BucketCounts) -> None:
        self._name, self._doc, self._labels, self._counts = name, doc, labels, counts

    def collect(self) -> Iterator[HistogramMetricFamily]:
        c = self._counts
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labels))
        buckets, total = [], 0
        for bound, n in zip([*c.bounds, float("inf")], c.counts, strict=True):
            total += n
            buckets.append((_le(bound), total))
        family.add_metric(list(self._labels.values()), buckets, c.sum)
        yield family


class ProcessUsageCollector(Collector):
    """The worker process's CPU (user + system seconds, :func:`os.times`) and resident memory
    (``/proc/self/statm``; left out where there is none), labelled by publisher, read at scrape time
    only. What a pod's requests are sized by (README, "Sizing a worker"): its CPU over
    ``outbox_published_total`` is the CPU per event at the load it really has. One worker per process
    (a pod); several workers in one process (tests) each report the whole process. Not
    prometheus_client's ``ProcessCollector``: its ``process_*`` series carry no publisher label."""

    def __init__(self, publisher: str) -> None:
        self._labels = [publisher]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        times = os.times()
        cpu = CounterMetricFamily(
            names.M_CPU_SECONDS.removesuffix("_total"),
            "CPU time of the worker's process, user + system",
            labels=[names.LABEL_PUBLISHER],
        )
        cpu.add_metric(self._labels, times.user + times.system)
        yield cpu
        rss = self._resident_bytes()
        if rss is not None:
            memory = GaugeMetricFamily(
                names.M_RESIDENT_MEMORY, "Resident memory of the worker's process", labels=[names.LABEL_PUBLISHER]
            )
            memory.add_metric(self._labels, rss)
            yield memory

    def _resident_bytes(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * mmap.PAGESIZE
        except (OSError, IndexError, ValueError):
            return None


class Metrics:
    def __init__(self, publisher: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        pl = [names.LABEL_PUBLISHER]
        self.published = Counter(
            names.M_PUBLISHED.removesuffix("_total"), "Rows acked by JetStream", pl, registry=r
        ).labels(publisher)
        self.duplicates = Counter(
            names.M_DUPLICATES.removesuffix("_total"), "Acks that reported a duplicate (a success)", pl, registry=r
        ).labels(publisher)
        self._failed = Counter(
            names.M_FAILED.removesuffix("_total"), "Failed publishes by reason", [*pl, names.LABEL_REASON], registry=r
        )
        self._dead_letters = Counter(
            names.M_DEAD_LETTERS.removesuffix("_total"),
            "Rows moved to the dead letters, by reason (names.DEAD_LETTER_REASONS)",
            [*pl, names.LABEL_REASON],
            registry=r,
        )
        self.in_flight = Gauge(names.M_IN_FLIGHT, "Unacknowledged publishes", pl, registry=r).labels(publisher)
        # Observed per ack by the publisher (BucketCounts), so not a prometheus_client Histogram.
        self.ack_latency = BucketCounts(LATENCY_BUCKETS)
        r.register(
            BucketCountsCollector(
                names.M_ACK_LATENCY, "Publish to ack", {names.LABEL_PUBLISHER: publisher}, self.ack_latency
            )
        )
        self.batch_latency = Histogram(
            names.M_BATCH_LATENCY, "Claim to mark of one batch", pl, registry=r, buckets=LATENCY_BUCKETS
        ).labels(publisher)
        # Sampled from the database: no series until a sample is known (see set_sampled).
        self._backlog = Gauge(names.M_BACKLOG, "Pending rows in owned partitions", pl, registry=r)
        self._oldest_age = Gauge(
            names.M_OLDEST_AGE, "Age of the oldest pending row in owned partitions", pl, registry=r
        )
        self._dead_letters_waiting = Gauge(
            names.M_DEAD_LETTERS_WAITING, "The publisher's rows in the dead-letter table now", pl, registry=r
        )
        self.partitions = Gauge(names.M_PARTITIONS, "Partitions owned", pl, registry=r).labels(publisher)
        self.database_unavailable, self.notify_unavailable = _unavailable_gauges(r, publisher)
        self._handovers = Counter(
            names.M_HANDOVERS.removesuffix("_total"), "Lease changes by kind", [*pl, names.LABEL_KIND], registry=r
        )
        self._config = Counter(
            names.M_CONFIG_ERRORS.removesuffix("_total"),
            "Configuration errors that stopped partitions",
            [*pl, names.LABEL_REASON],
            registry=r,
        )
        r.register(ProcessUsageCollector(publisher))
        self._publisher = publisher
        self._zero_reason_series()

    def _zero_reason_series(self) -> None:
        """Every labelled counter's series of a known label value, at 0 from the start. Prometheus
        sees no increase in a series whose first sample is already 1, so an alert on
        ``increase(outbox_config_errors_total[10m])`` would miss the first configuration error of a
        worker's life if its series appeared only then. The label values are fixed sets."""
        for reason in (names.REASON_NO_STREAM, names.REASON_NOT_PERMITTED):
            self._config.labels(self._publisher, reason)
        for reason in (*_RETRY_REASONS, *names.DEAD_LETTER_REASONS):
            self._failed.labels(self._publisher, reason)
        for reason in names.DEAD_LETTER_REASONS:
            self._dead_letters.labels(self._publisher, reason)
        for kind in ("acquired", "released", "lost"):
            self._handovers.labels(self._publisher, kind)

    def set_pressure(self, pressure: tuple[int, float] | None) -> None:
        """The backlog and the oldest pending age of the owned partitions, or None when unknown (the
        database did not answer, no sample yet): their series are then absent, never 0 or the last
        sample, so an alert or a dashboard does not read an outage as an empty queue."""
        self._set_sampled(self._backlog, None if pressure is None else pressure[0])
        self._set_sampled(self._oldest_age, None if pressure is None else pressure[1])

    def set_dead_letters_waiting(self, waiting: int | None) -> None:
        """The publisher's dead letters waiting, or None when unknown (absent, as :meth:`set_pressure`)."""
        self._set_sampled(self._dead_letters_waiting, waiting)

    def _set_sampled(self, gauge: Gauge, value: float | None) -> None:
        if value is None:
            gauge.remove(self._publisher)
        else:
            gauge.labels(self._publisher).set(value)

    def failed(self, reason: str, n: int = 1) -> None:
        self._failed.labels(self._publisher, reason).inc(n)

    def dead_letter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` rows dead-lettered for ``reason`` (a reason prefix, e.g. ``header_too_large``)."""
        self._dead_letters.labels(self._publisher, reason).inc(n)

    def handover(self, kind: str, n: int = 1) -> None:
        self._handovers.labels(self._publisher, kind).inc(n)

    def config_error(self, reason: str, n: int = 1) -> None:
        """Count ``n`` publishes refused for the relay's configuration (each pauses its partition)."""
        self._config.labels(self._publisher, reason).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _unavailable_gauges(registry: CollectorRegistry, publisher: str) -> tuple[Gauge, Gauge]:
    """The database's and the NOTIFYs' 0/1 gauges of ``publisher``."""
    pl = [names.LABEL_PUBLISHER]
    database = Gauge(
        names.M_DATABASE_UNAVAILABLE,
        "1 while the database has not answered this worker's lease renewals for 10 s",
        pl,
        registry=registry,
    )
    notify = Gauge(
        names.M_NOTIFY_UNAVAILABLE,
        "1 while NOTIFYs do not reach this worker (its LISTEN probe did not come back): it relays by the poll",
        pl,
        registry=registry,
    )
    return database.labels(publisher), notify.labels(publisher)


class HealthServer:
    """Minimal asyncio HTTP/1.0 server: GET /metrics, /healthz (process alive), /readyz (ready())."""

    def __init__(self, metrics: Metrics, host: str, port: int, ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def serve(self) -> None:
        """Run until cancelled (a supervised task)."""
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            path = path.split("?", 1)[0]
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = self._ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            async with asyncio.timeout(5):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
