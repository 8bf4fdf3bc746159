"""What /metrics says must be what is true, against real PostgreSQL and nats-server: a configuration
error keeps counting while it lasts (the chart's alert reads its increase), what the worker cannot
know while its database is down is absent rather than a stale or zero value, and what it owns drops
when its leases have expired or were released."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js import api as js_api
from prometheus_client.parser import text_string_to_metric_families

from outbox_common import names
from outbox_common.settings import WorkerSettings
from outbox_devkit.embedded import free_port
from outbox_devkit.producers import ProducerPlan, produce
from outbox_worker.app.worker import DATABASE_ERROR_AFTER_SECONDS, Worker
from support.polling import wait_for
from support.relay import SQL, fast_settings, running, setup_db
from support.servers import ControlledPostgres, nats_server

STREAM = "TRUTH"
TTL = 3.0


def worker_settings(dsn: str, nats_url: str, **kw: Any) -> WorkerSettings:
    names = {"worker_id": "truth-1", "publisher": "truth", "stream": STREAM}
    timed = {"lease_ttl_seconds": TTL, "db_statement_timeout_seconds": 2.0}
    return fast_settings(dsn, nats_url, **(names | timed | kw))


def samples(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics renders, by (name, sorted labels without ``publisher``)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(worker.metrics.render().decode()):
        for s in family.samples:
            assert s.labels.get(names.LABEL_PUBLISHER) == "truth", s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != names.LABEL_PUBLISHER))
            out[(s.name, labels)] = s.value
    return out


def value(worker: Worker, name: str, **labels: str) -> float | None:
    return samples(worker).get((name, tuple(sorted(labels.items()))))


async def test_a_lasting_configuration_error_keeps_counting_from_a_zero_series(pg_dsn: str, nats_url: str) -> None:
    """OutboxRelayConfigurationError fires on ``increase(outbox_config_errors_total[10m]) > 0``. The
    series is there at 0 before any error (Prometheus sees no increase in a series that first
    appears at 1), and every refused publish counts, so it keeps increasing while the partition is
    paused and retried, not only when the error's text changes."""
    await setup_db(pg_dsn)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = js_api.StreamConfig(name=STREAM, subjects=["outbox.>"], duplicate_window=120)
    await js.add_stream(config)
    try:
        async with running(worker_settings(pg_dsn, nats_url, stream_mode="expect")) as worker:
            for reason in (names.REASON_NO_STREAM, names.REASON_NOT_PERMITTED):
                assert value(worker, names.M_CONFIG_ERRORS, reason=reason) == 0.0, reason
            await js.delete_stream(STREAM)
            await produce(pg_dsn, SQL, ProducerPlan(events=20, aggregates=1, producers=1, rollback_ratio=0))
            await wait_for(lambda: (value(worker, names.M_CONFIG_ERRORS, reason="no_stream") or 0) > 0, 10, "one")
            first = value(worker, names.M_CONFIG_ERRORS, reason="no_stream")
            assert first is not None
            # the partition is paused for 5 s, then its rows are refused again: the count goes on
            await wait_for(
                lambda: (value(worker, names.M_CONFIG_ERRORS, reason="no_stream") or 0) > first,
                12,
                "the configuration error counted again while it lasts",
            )
            await js.add_stream(config)
    finally:
        await nc.close()


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_database_outage_makes_the_pressure_unknown_not_stale_and_the_leases_lapse(
    own_pg: ControlledPostgres, nats_url: str
) -> None:
    """While PostgreSQL is down the backlog, the oldest pending age and the dead letters waiting are
    unknown: absent, neither 0 nor the last sample. Once the leases have expired the worker owns no
    partition. ``outbox_database_unavailable`` is 1 once the renewals have failed for
    DATABASE_ERROR_AFTER_SECONDS (the report's databaseError), and /healthz keeps answering (a
    liveness kill would not bring the database back). All of it returns with the database."""
    await setup_db(own_pg.dsn)
    await produce(own_pg.dsn, SQL, ProducerPlan(events=50, aggregates=5, producers=1, rollback_ratio=0))
    port = free_port()
    settings = worker_settings(own_pg.dsn, nats_url, metrics_port=port, metrics_host="127.0.0.1")
    async with running(settings) as worker:
        await wait_for(lambda: worker.stats.published >= 50, 15, "the rows published")
        await worker.sample_pressure()
        assert value(worker, names.M_BACKLOG) == 0.0
        assert value(worker, names.M_OLDEST_AGE) == 0.0
        assert value(worker, names.M_DEAD_LETTERS_WAITING) == 0.0
        assert value(worker, names.M_PARTITIONS) == 8.0
        assert value(worker, names.M_DATABASE_UNAVAILABLE) == 0.0
        down_at = time.monotonic()
        own_pg.kill()
        try:
            await worker.sample_pressure()
            for unknown in (names.M_BACKLOG, names.M_OLDEST_AGE, names.M_DEAD_LETTERS_WAITING):
                assert value(worker, unknown) is None, unknown
            await wait_for(lambda: value(worker, names.M_PARTITIONS) == 0.0, TTL + 3, "the lapsed leases dropped")
            await wait_for(
                lambda: value(worker, names.M_DATABASE_UNAVAILABLE) == 1.0,
                DATABASE_ERROR_AFTER_SECONDS + 8,
                "the database reported unavailable",
            )
            assert time.monotonic() - down_at >= DATABASE_ERROR_AFTER_SECONDS
            assert await asyncio.to_thread(_healthz, port) == 200
        finally:
            own_pg.restart()
        await wait_for(lambda: value(worker, names.M_PARTITIONS) == 8.0, 15, "the partitions owned again")
        await wait_for(lambda: value(worker, names.M_DATABASE_UNAVAILABLE) == 0.0, 10, "the database back")

        async def pressure_known() -> bool:
            await worker.sample_pressure()
            return value(worker, names.M_BACKLOG) == 0.0 and value(worker, names.M_OLDEST_AGE) == 0.0

        await wait_for(pressure_known, 15, "the pressure known again")
    # Drained at stop: the worker owns nothing, and nothing is in flight.
    assert value(worker, names.M_PARTITIONS) == 0.0
    assert value(worker, names.M_IN_FLIGHT) == 0.0
    assert value(worker, names.M_BACKLOG) == 0.0
    assert value(worker, names.M_OLDEST_AGE) == 0.0


NARROW_USER = """
authorization {
  users = [
    {user: admin, password: pw}
    {user: narrow, password: pw,
     permissions: {publish: {allow: ["$JS.API.>", "_INBOX.>", "outbox.good.>"]}, subscribe: {allow: ["_INBOX.>"]}}}
  ]
}
"""


async def test_in_flight_counts_the_publishes_still_unacknowledged_not_the_whole_wave(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A wave whose acks partly arrived: ``outbox_in_flight`` is what is still unacknowledged (the
    publisher's pending publishes), not every message of the wave until its last ack or timeout. The
    server drops the publishes its permissions refuse (no ack: they wait for the ack timeout) and
    acks the others at once."""
    await setup_db(pg_dsn, partitions=1)
    with nats_server(tmp_path / "nats", config=NARROW_USER) as server:
        nc = await nats.connect(server.url, user="admin", password="pw")
        try:
            await nc.jetstream().add_stream(
                js_api.StreamConfig(name=STREAM, subjects=["outbox.>"], duplicate_window=120)
            )
        finally:
            await nc.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            for i in range(6):  # one wave: each row its own aggregate
                kind = "good" if i % 2 else "bad"
                await conn.execute(SQL.insert_event, kind, f"{kind}-{i}", "changed", b"{}", "{}", "")
        finally:
            await conn.close()
        settings = worker_settings(
            pg_dsn,
            server.url,
            stream_mode="expect",
            nats_user="narrow",
            nats_password="pw",
            ack_timeout_seconds=3.0,
            lease_ttl_seconds=10.0,
            loops=1,
        )
        async with running(settings) as worker:
            pub = worker.publisher
            assert pub is not None
            # the three good rows acked, the three bad ones waiting for their ack
            await wait_for(lambda: pub.in_flight == 3 and worker.stats.published == 0, 5, "a wave half acked")
            assert value(worker, names.M_IN_FLIGHT) == 3.0
