"""Broker faults: nats-server crashed, frozen, partitioned one way, throttled, full, clustered.

Each scenario runs real worker processes against a private nats-server (or cluster) and the
session's PostgreSQL, injects its fault, lets the relay drain, and ends with the history checker:
0 lost, 0 duplicates in the stream, 0 per-aggregate order violations, marks consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable

import nats
from nats.js import api as js_api

from faults.harness import (
    Rig,
    assert_clean,
    bulk_insert,
    check,
    fetch,
    pending_count,
    produce,
    stream_messages,
    wait_drained,
)
from faults.proxy import TcpProxy
from support.polling import seconds_until, wait_for
from support.servers import ControlledNats, NatsCluster

IN_FLIGHT_LINE = re.compile(r"NATS disconnected with (\d+) publishes in flight")


def _in_flight_at_disconnect(log: str) -> list[int]:
    return [int(n) for n in IN_FLIGHT_LINE.findall(log)]


async def test_nats_sigkill_with_5000_acks_in_flight_five_times(
    pg_dsn: str, own_nats: ControlledNats, make_rig: Callable[..., Rig]
) -> None:
    """SIGKILL nats-server while ≥5,000 publishes await their acks, restart it after 3 s; five times.

    The count of unacknowledged publishes at each crash is the worker's own figure (logged when the
    connection drops). A kill that caught fewer in flight is not counted; at most 15 kills.
    """
    rig = make_rig(pg_dsn, own_nats.url)
    await rig.prepare()
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 40_000, 30_000, 600)
    started = time.monotonic()
    w = rig.worker("w1", {"OUTBOX_MAX_IN_FLIGHT": "16000", "OUTBOX_BATCH_SIZE": "8000", "OUTBOX_LOOPS": "2"})
    await wait_for(lambda: w.ready() is True, 20, what="worker ready")
    qualifying: list[int] = []
    all_counts: list[int] = []
    kills = 0
    attempts = 0
    while len(qualifying) < 5 and kills < 15 and attempts < 25:
        attempts += 1
        if (await pending_count(rig.dsn, rig.sql) or 0) < 20_000:
            await bulk_insert(rig.dsn, rig.sql, 20_000, 30_000, 600)
        before = len(_in_flight_at_disconnect(w.log_text()))
        if not await _until_in_flight(w, 8000, 5.0):
            continue
        own_nats.kill()
        kills += 1
        await asyncio.sleep(3.0)
        own_nats.start()
        await wait_for(lambda: w.ready() is True, 15, what="worker reconnected")
        counts = _in_flight_at_disconnect(w.log_text())[before:]
        n = counts[0] if counts else 0  # no line: nothing was in flight at the crash
        all_counts.append(n)
        if n >= 5000:
            qualifying.append(n)
    assert len(qualifying) == 5, f"only {qualifying} kills caught ≥5000 in flight in {kills} kills"
    await wait_drained(rig, 120)
    codes = rig.stop_all()
    assert codes == [0]
    report = await check(
        rig,
        "nats-server SIGKILL x5, >=5000 acks in flight, restart after 3s",
        f"{kills} SIGKILLs (in flight at each: {all_counts}), nats-server down 3s each",
        seconds=time.monotonic() - started,
        extra={"in_flight_at_kill": all_counts, "kills": kills},
    )
    assert_clean(report)


async def _until_in_flight(w: object, n: int, timeout: float) -> bool:
    """Wait until the worker's in-flight gauge shows ≥ n; False if it did not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if w.metrics(0.5).get("outbox_in_flight", 0) >= n:  # type: ignore[attr-defined]
                return True
        except OSError:
            pass
        await asyncio.sleep(0.01)
    return False


async def test_nats_sigstop_30s_stall_detected_nothing_hangs(
    pg_dsn: str, own_nats: ControlledNats, make_rig: Callable[..., Rig]
) -> None:
    """Freeze nats-server (SIGSTOP) for 30 s under load, then SIGCONT.

    The worker must notice the stall from its pings (readiness drops within ~15 s with a 3 s ping
    interval), keep answering /metrics (no hang), resolve every publish by its ack timeout, reconnect
    after SIGCONT and drain the backlog that built up meanwhile.
    """
    rig = make_rig(pg_dsn, own_nats.url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    w = rig.worker("w1")
    await wait_for(lambda: w.ready() is True, 20, what="worker ready")
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, 21_000, rate=600, aggregates=300, timeout=90))
    await asyncio.sleep(3)
    own_nats.pause()
    paused_at = time.monotonic()
    try:
        detected = await seconds_until(
            lambda: w.ready() is False, 25, interval=0.1, what="stall detected (readyz false)"
        )
        scrapes = 0
        while time.monotonic() - paused_at < 30:
            w.metrics(2.0)  # the worker answers while its broker is frozen
            scrapes += 1
            await asyncio.sleep(1)
        timeouts = w.metrics(2.0).get("outbox_publish_failures_total{timeout}", 0) + w.metrics(2.0).get(
            "outbox_publish_failures_total{disconnect}", 0
        )
    finally:
        own_nats.resume()
    reconnected = await seconds_until(lambda: w.ready() is True, 30, interval=0.1, what="worker ready after SIGCONT")
    await asyncio.wait_for(producer, 120)
    drain = await wait_drained(rig, 90)
    codes = rig.stop_all()
    assert codes == [0]
    report = await check(
        rig,
        "nats-server SIGSTOP 30s, then SIGCONT",
        f"SIGSTOP 30s under 600 ev/s; stall detected after {detected:.1f}s; ready {reconnected:.1f}s "
        f"after SIGCONT; drained {drain:.1f}s later",
        seconds=time.monotonic() - started,
        extra={"detected_s": round(detected, 1), "reconnect_s": round(reconnected, 1), "drain_s": round(drain, 1)},
    )
    assert detected <= 16.0, f"stall detected only after {detected:.1f}s"
    assert scrapes >= 10 - int(detected // 1)  # /metrics kept answering
    assert timeouts > 0  # publishes during the stall ended by their ack timeout / the disconnect
    assert_clean(report)


async def test_one_way_ack_loss_20s_through_proxy(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """Blackhole the server → worker direction of the worker's NATS connection for 20 s.

    Publishes still reach the server and are stored; their acks (and the server's PONGs) are lost.
    The worker times the publishes out, retries them, detects the dead connection by its pings and
    reconnects once the path heals; the re-sent copies are absorbed by the server as duplicates
    (the worker counts duplicate acks); per-aggregate order holds.
    """
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    with TcpProxy(int(nats_url.rsplit(":", 1)[1])) as proxy:
        w = rig.worker("w1", {"OUTBOX_NATS_SERVERS": proxy.url})
        await wait_for(lambda: w.ready() is True, 20, what="worker ready")
        producer = asyncio.create_task(produce(rig.dsn, rig.sql, 12_000, rate=500, aggregates=300, timeout=90))
        await asyncio.sleep(3)
        stored_before = await stream_messages(rig.nats_urls, rig.stream)
        proxy.set_blackhole(down=True)
        await asyncio.sleep(20)
        stored_during = await stream_messages(rig.nats_urls, rig.stream) - stored_before
        proxy.set_blackhole(down=False)
        await asyncio.wait_for(producer, 120)
        await wait_drained(rig, 90)
        metrics = w.metrics(2.0)
        codes = rig.stop_all()
        dropped = proxy.stats.dropped_down
    assert codes == [0]
    dup_acks = int(metrics.get("outbox_duplicates_total", 0))
    report = await check(
        rig,
        "one-way ack loss 20s (proxy blackholes server->worker)",
        f"server->worker bytes dropped for 20s ({dropped:,} B); server stored {stored_during:,} messages "
        f"meanwhile; worker saw {dup_acks:,} duplicate acks after healing",
        seconds=time.monotonic() - started,
        extra={"duplicate_acks": dup_acks, "stored_while_acks_lost": stored_during},
    )
    assert dropped > 0
    assert stored_during > 0  # the server kept storing while no ack got through
    assert dup_acks > 0  # re-sent copies were absorbed by the server
    assert_clean(report)


async def test_slow_broker_bandwidth_limit_bounded_then_recovers(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """Throttle the worker's NATS connection to 64 KB/s each way for 15 s under a 1,500 ev/s load.

    While throttled, the publishes in flight stay within ``max_in_flight`` and the worker's memory
    stays bounded (the backlog waits in PostgreSQL, not in the worker); once the limit is lifted the
    backlog drains at full speed.
    """
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    max_in_flight = 4000
    with TcpProxy(int(nats_url.rsplit(":", 1)[1])) as proxy:
        w = rig.worker("w1", {"OUTBOX_NATS_SERVERS": proxy.url, "OUTBOX_MAX_IN_FLIGHT": str(max_in_flight)})
        await wait_for(lambda: w.ready() is True, 20, what="worker ready")
        producer = asyncio.create_task(
            produce(rig.dsn, rig.sql, 27_000, rate=1500, aggregates=2000, payload_bytes=400, timeout=90)
        )
        await asyncio.sleep(3)
        rss_before = w.sample_rss()
        proxy.set_rate(64 * 1024)
        peak_in_flight = 0.0
        throttle_end = time.monotonic() + 15
        stored_at_throttle = await stream_messages(rig.nats_urls, rig.stream)
        while time.monotonic() < throttle_end:
            with contextlib.suppress(OSError):
                peak_in_flight = max(peak_in_flight, w.metrics(2.0).get("outbox_in_flight", 0))
            w.sample_rss()
            await asyncio.sleep(0.25)
        stored_throttled = await stream_messages(rig.nats_urls, rig.stream) - stored_at_throttle
        backlog = await pending_count(rig.dsn, rig.sql) or 0
        proxy.set_rate(0)
        lifted = time.monotonic()
        await wait_for(
            lambda: _pending_below(rig, 3000), 30, interval=0.2, what="backlog drained after the limit was lifted"
        )
        recovered = time.monotonic() - lifted
        await asyncio.wait_for(producer, 120)
        await wait_drained(rig, 60)
        codes = rig.stop_all()
        throttled = proxy.stats.throttled_seconds
    assert codes == [0]
    peak_rss_mb = w.peak_rss_kb / 1024
    report = await check(
        rig,
        "slow broker: 64 KB/s bandwidth limit for 15s",
        f"proxy limited to 64 KB/s each way for 15s under 1,500 ev/s (stored {stored_throttled:,} meanwhile, "
        f"backlog {backlog:,}); peak in flight {peak_in_flight:.0f} (limit {max_in_flight}); peak RSS "
        f"{peak_rss_mb:.0f} MiB (before {rss_before / 1024:.0f}); backlog drained {recovered:.1f}s after lifting",
        seconds=time.monotonic() - started,
        extra={
            "peak_in_flight": peak_in_flight,
            "peak_rss_mib": round(peak_rss_mb),
            "backlog_at_lift": backlog,
            "recovery_s": round(recovered, 1),
        },
    )
    assert throttled > 0
    assert peak_in_flight <= max_in_flight
    assert peak_rss_mb < rss_before / 1024 + 200  # bounded: the backlog stays in PostgreSQL
    assert backlog > 3000  # the throttle really held the relay back ...
    assert recovered < 20  # ... and it caught up quickly once lifted
    assert_clean(report)


async def _pending_below(rig: Rig, n: int) -> bool:
    count = await pending_count(rig.dsn, rig.sql)
    return count is not None and count < n


async def test_error_acks_stream_full_discard_new(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """A stream with ``max_msgs`` and discard-new answers the overflow with error acks (503).

    Every publish ends within the ack timeout (no pending future leaks, unlike stock nats-py), the
    rows stay pending and are retried with backoff without limit (a retryable error is never
    dead-lettered), the aggregate's later rows wait, and raising the limit lets the relay finish.
    """
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream(max_msgs=2000, discard=js_api.DiscardPolicy.NEW)
    await bulk_insert(rig.dsn, rig.sql, 3000, 300)
    started = time.monotonic()
    w = rig.worker("w1")
    await wait_for(lambda: _stored_at_least(rig, 2000), 30, what="stream full")
    await wait_for(lambda: _max_attempts_at_least(rig, 4), 30, what="rows retried past max_attempts")
    metrics = w.metrics(2.0)
    rows = await fetch(
        rig.dsn,
        f"SELECT count(*) AS n, min(attempts) AS lo, max(attempts) AS hi, "
        f"bool_and(last_error LIKE '%maximum messages exceeded%') AS why FROM {rig.sql.outbox} WHERE attempts > 0",
    )
    dead = await fetch(rig.dsn, f"SELECT count(*) AS n FROM {rig.sql.dead_letters}")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        cfg = (await js.stream_info(rig.stream)).config
        cfg.max_msgs = -1
        await js.update_stream(cfg)
    finally:
        await nc.close()
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0]
    batches = metrics.get("outbox_batch_seconds_count", 0)
    slow_batches = batches - metrics.get("outbox_batch_seconds_bucket{5.0}", 0)
    failures = int(metrics.get("outbox_publish_failures_total{server_error}", 0))
    report = await check(
        rig,
        "error acks: stream full (max_msgs, discard new)",
        f"max_msgs=2000 with 3,000 events: {failures:,} error acks (503 maximum messages exceeded), rows "
        f"retried up to {rows[0]['hi']} attempts, 0 dead-lettered; limit raised, relay finished",
        seconds=time.monotonic() - started,
        extra={"error_acks": failures, "max_attempts_seen": rows[0]["hi"]},
    )
    assert failures > 0
    assert rows[0]["why"] is True
    assert dead[0]["n"] == 0  # retryable: never dead-lettered, however many attempts
    assert slow_batches == 0  # every batch (all its waves) ended within 5s: no publish hung
    assert_clean(report)


async def test_error_acks_wrong_expected_stream(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """The configured stream is replaced at run time by another stream that captures the subjects.

    Every publish names the stream it expects (``Nats-Expected-Stream``), so the server answers with
    an error ack (400, "expected stream does not match") instead of storing events where nobody
    looks: each publish ends within the ack timeout, the partitions pause with a configuration
    error (rows stay pending, attempts and dead letters untouched), and once the right stream is
    back the relay delivers everything to it.
    """
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    w = rig.worker("w1")
    await wait_for(lambda: w.ready() is True, 20, what="worker ready")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.delete_stream(rig.stream)
        await js.add_stream(name="IMPOSTOR", subjects=rig_subjects(), storage=js_api.StorageType.FILE)
        await bulk_insert(rig.dsn, rig.sql, 2000, 200)
        await wait_for(lambda: _config_errors(w) > 0, 20, what="configuration error reported")
        await asyncio.sleep(2)
        impostor = (await js.stream_info("IMPOSTOR")).state.messages
        untouched = await fetch(
            rig.dsn, f"SELECT count(*) AS n, max(attempts) AS a FROM {rig.sql.outbox} WHERE published_at IS NULL"
        )
        dead = await fetch(rig.dsn, f"SELECT count(*) AS n FROM {rig.sql.dead_letters}")
        log = w.log_text()
        await js.delete_stream("IMPOSTOR")
    finally:
        await nc.close()
    await rig.create_stream()
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0]
    report = await check(
        rig,
        "error acks: wrong expected stream (stream swapped)",
        f"stream replaced by another capturing the subjects: {impostor} stored there, rows kept pending "
        f"({untouched[0]['n']:,}, max attempts {untouched[0]['a']}), config error raised; "
        "delivered after the stream came back",
        seconds=time.monotonic() - started,
    )
    assert impostor == 0
    assert untouched[0]["n"] == 2000
    assert dead[0]["n"] == 0
    assert "expected stream does not match" in log
    assert_clean(report)


def rig_subjects() -> list[str]:
    from faults.harness import SUBJECTS

    return list(SUBJECTS)


def _config_errors(w: object) -> float:
    try:
        m = w.metrics(1.0)  # type: ignore[attr-defined]
    except OSError:
        return 0
    return sum(v for k, v in m.items() if k.startswith("outbox_config_errors_total"))


async def _stored_at_least(rig: Rig, n: int) -> bool:
    return await stream_messages(rig.nats_urls, rig.stream) >= n


async def _max_attempts_at_least(rig: Rig, n: int) -> bool:
    rows = await fetch(rig.dsn, f"SELECT coalesce(max(attempts), 0) AS a FROM {rig.sql.outbox}")
    return int(rows[0]["a"]) >= n


async def test_cluster_r3_stream_leader_killed_under_load(
    pg_dsn: str, own_nats_cluster: NatsCluster, make_rig: Callable[..., Rig]
) -> None:
    """A three-node JetStream cluster on loopback, stream with 3 replicas; under load, SIGKILL the
    server that leads the stream, restart it 3 s later, three times. Workers know all three URLs."""
    cluster = own_nats_cluster
    rig = make_rig(pg_dsn, cluster.urls)
    await rig.prepare()
    await rig.create_stream(num_replicas=3)
    started = time.monotonic()
    workers = [rig.worker("w1"), rig.worker("w2")]
    await wait_for(lambda: all(w.ready() for w in workers), 30, what="workers ready")
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, 24_000, rate=1000, aggregates=1000, timeout=90))
    killed: list[str] = []
    elections: list[float] = []
    for _ in range(3):
        await asyncio.sleep(3)
        leader = await _stream_leader(cluster.urls, rig.stream)
        server = next(s for s in cluster.servers if s.name == leader)
        server.kill()
        t0 = time.monotonic()
        killed.append(leader)
        await wait_for(
            lambda lead=leader: _has_other_leader(cluster.urls, rig.stream, lead),
            30,
            interval=0.2,
            what="new stream leader",
        )
        elections.append(round(time.monotonic() - t0, 1))
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - t0)))
        server.start(30)
    await asyncio.wait_for(producer, 120)
    await wait_drained(rig, 90)
    codes = rig.stop_all()
    assert codes == [0, 0]
    report = await check(
        rig,
        "3-node cluster, R3 stream, leader SIGKILLed x3",
        f"stream leader SIGKILLed 3 times under 1,000 ev/s ({', '.join(killed)}), each restarted >=3s later; "
        f"new leader elected after {elections} s",
        seconds=time.monotonic() - started,
        extra={"killed": killed, "election_s": elections},
    )
    assert_clean(report)


async def _stream_leader(urls: list[str], stream: str) -> str:
    nc = await nats.connect(urls, connect_timeout=5)
    try:
        for _ in range(50):
            with contextlib.suppress(Exception):
                info = await nc.jetstream(timeout=2).stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return str(info.cluster.leader)
            await asyncio.sleep(0.2)
        raise AssertionError("no stream leader")
    finally:
        await nc.close()


async def _has_other_leader(urls: list[str], stream: str, old: str) -> bool:
    try:
        nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return False
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
        return bool(info.cluster and info.cluster.leader and info.cluster.leader != old)
    except Exception:
        return False
    finally:
        await nc.close()
