"""Worker and database faults: a worker dies between publish and mark, workers die at random, a
worker freezes past its lease (zombie), a worker is stopped with SIGTERM under load, PostgreSQL
crashes mid-run. Each ends with the history checker and the mark audit (no mark without the event
stored, none before it was stored, none under a lost lease)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from faults.harness import (
    Rig,
    WorkerProc,
    assert_clean,
    bulk_insert,
    check,
    fetch,
    produce,
    wait_drained,
)
from support.polling import seconds_until, wait_for
from support.servers import ControlledPostgres


async def _owned(rig: Rig) -> dict[str, int]:
    rows = await fetch(
        rig.dsn,
        f"SELECT owner, count(*) AS n FROM {rig.sql.leases} WHERE owner IS NOT NULL AND expires_at > now() "
        "GROUP BY owner",
    )
    return {r["owner"]: r["n"] for r in rows}


async def test_worker_killed_between_publish_and_mark(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """A deterministic hook ends the worker process (``os._exit``) after its publishes were acked and
    before the mark statement. After the lease expires a second worker takes over and re-publishes
    the unmarked rows: the server answers them as duplicates, the stream holds each event once."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 6000, 600)
    started = time.monotonic()
    w1 = rig.worker("w1", {"OUTBOX_TEST_EXIT_BEFORE_MARK": "1"})
    code = w1.wait(30)
    assert code == 99, w1.log_text()
    unmarked = [e for e in w1.hook_events() if e["event"] == "before_mark" and e["n"]]
    acked_unmarked = sum(e["n"] for e in unmarked)
    w2 = rig.worker("w2")
    takeover = await seconds_until(lambda: _holds_all(rig, "w2"), 30, what="w2 took over every partition")
    await wait_drained(rig, 60)
    dup_acks = int(w2.serving_metrics().get("outbox_duplicates_total", 0))
    codes = rig.stop_all()
    assert codes == [None, 0]
    report = await check(
        rig,
        "worker killed between publish and mark (hook)",
        f"os._exit after {acked_unmarked:,} publishes were acked, before their mark; w2 took over after "
        f"{takeover:.1f}s (lease TTL 6s) and got {dup_acks:,} duplicate acks",
        seconds=time.monotonic() - started,
        extra={"acked_unmarked": acked_unmarked, "duplicate_acks": dup_acks},
    )
    assert acked_unmarked > 0
    assert dup_acks >= acked_unmarked  # every acked-but-unmarked row came back as a duplicate
    assert_clean(report)


async def _holds_all(rig: Rig, owner: str) -> bool:
    return (await _owned(rig)).get(owner, 0) == rig.partitions


async def _random_kills(rig: Rig, seconds: float, seed: int) -> dict[str, int]:
    """Three workers; every 2-4 s SIGKILL one at random and start it again (same worker id, as a pod
    restart would) while producers write 1,000 events/s. Returns counters."""
    rng = random.Random(seed)
    workers = [rig.worker(f"w{i}") for i in range(3)]
    events = int(seconds * 1000)
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, events, rate=1000, aggregates=1500, timeout=seconds + 60))
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and kills < seconds:  # bounded in count and in time
        await asyncio.sleep(rng.uniform(2.0, 4.0))
        victim: WorkerProc = rng.choice(workers)
        victim.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        victim.start()
    await asyncio.wait_for(producer, seconds + 90)
    await wait_drained(rig, 90)
    dup_acks = sum(int(w.serving_metrics().get("outbox_duplicates_total", 0)) for w in workers if w.pid)
    codes = rig.stop_all()
    assert codes == [0, 0, 0]
    return {"kills": kills, "events": events, "duplicate_acks_after_last_restart": dup_acks}


async def _random_kills_scenario(rig: Rig, seconds: float, seed: int, label: str, min_kills: int) -> None:
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    stats = await _random_kills(rig, seconds, seed=seed)
    report = await check(
        rig,
        label,
        f"{stats['kills']} SIGKILLs every 2-4s, each worker restarted at once with its id; 1,000 ev/s",
        seconds=time.monotonic() - started,
        extra=stats,
    )
    assert stats["kills"] >= min_kills
    assert_clean(report)


async def test_random_worker_kills_30s_three_workers(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    await _random_kills_scenario(make_rig(pg_dsn, nats_url), 30, 11, "random worker SIGKILLs for 30s, 3 workers", 7)


@pytest.mark.soak
async def test_random_worker_kills_2min_three_workers(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    await _random_kills_scenario(
        make_rig(pg_dsn, nats_url), 120, 12, "random worker SIGKILLs for 2 min, 3 workers (soak)", 30
    )


async def test_zombie_worker_frozen_past_its_lease(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    """w1 freezes (its whole process blocked) right after a wave was acked, for 14 s, more than twice
    the lease TTL. w2 takes its partitions over and relays everything. When w1 wakes up it must
    publish nothing more of the batch it was in (its leases are no longer usable), its mark of the
    acked wave must change 0 rows (fenced by the lease epoch), and no mark of it may land under a
    lease it lost."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 2000, 50)  # 40 events per aggregate: a batch has many waves
    started = time.monotonic()
    w1 = rig.worker("w1", {"OUTBOX_TEST_FREEZE_AFTER_WAVE": "14", "OUTBOX_LOOPS": "1"})
    await wait_for(lambda: any(e["event"] == "freeze" for e in w1.hook_events()), 20, what="w1 frozen")
    frozen_at = time.monotonic()
    rig.worker("w2")
    takeover = await seconds_until(lambda: _holds_all(rig, "w2"), 20, what="w2 took over every partition")
    await wait_for(lambda: any(e["event"] == "resume" for e in w1.hook_events()), 20, what="w1 resumed")
    await asyncio.sleep(1)
    await bulk_insert(rig.dsn, rig.sql, 2000, 50)  # work for both after the zombie is back
    await wait_drained(rig, 60)
    codes = rig.stop_all()
    assert codes == [0, 0]
    events = w1.hook_events()
    freeze = next(i for i, e in enumerate(events) if e["event"] == "freeze")
    frozen_ids = events[freeze]["ids"]
    resume = next(i for i, e in enumerate(events) if e["event"] == "resume")
    after = events[resume + 1 :]
    first_mark = next(i for i, e in enumerate(after) if e["event"] == "before_mark")
    waves_after_resume_same_batch = [e for e in after[:first_mark] if e["event"] == "wave"]
    zombie_marks = await fetch(
        rig.dsn,
        f'SELECT count(*) AS n FROM "{rig.sql.table}_mark_audit" WHERE marker = $1 AND outbox_id = ANY($2::bigint[])',
        "w1",
        frozen_ids,
    )
    epochs = await fetch(rig.dsn, f"SELECT max(epoch) AS e FROM {rig.sql.leases}")
    report = await check(
        rig,
        "zombie worker frozen 14s (> 2x lease TTL)",
        f"w1 blocked 14s after an acked wave of {len(frozen_ids)} rows; w2 took over after {takeover:.1f}s; "
        f"after waking w1 published {len(waves_after_resume_same_batch)} more waves of that batch and marked "
        f"{zombie_marks[0]['n']} of its acked rows",
        seconds=time.monotonic() - started,
        extra={"zombie_marks": zombie_marks[0]["n"], "zombie_waves_after_resume": len(waves_after_resume_same_batch)},
    )
    assert time.monotonic() - frozen_at > 14
    assert frozen_ids
    assert waves_after_resume_same_batch == []  # it stopped publishing the partitions it lost
    assert zombie_marks[0]["n"] == 0  # its mark was fenced: 0 rows
    assert "acked rows not marked: lease lost" in w1.log_text()
    assert epochs[0]["e"] >= 2
    assert_clean(report)


async def test_sigterm_under_load_exits_0_within_grace(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """SIGTERM to one of two workers under load: it finishes its in-flight wave, marks what was acked,
    releases its leases and exits 0 within the grace period (6 s); the other worker takes the
    partitions over at once (no TTL wait) and nothing is stored twice."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 40_000, 4000)
    started = time.monotonic()
    w1, w2 = rig.worker("w1"), rig.worker("w2")
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, 10_000, rate=1500, aggregates=500, timeout=60))
    await wait_for(lambda: _both_own(rig), 20, what="both workers own partitions")
    await asyncio.sleep(1)
    t0 = time.monotonic()
    code = w1.terminate(grace=15)
    exit_s = time.monotonic() - t0
    takeover = await seconds_until(lambda: _holds_all(rig, "w2"), 20, interval=0.1, what="w2 took over every partition")
    await asyncio.wait_for(producer, 90)
    await wait_drained(rig, 60)
    dup_acks = int(w2.serving_metrics().get("outbox_duplicates_total", 0))
    codes = [code, w2.terminate()]
    report = await check(
        rig,
        "SIGTERM under load",
        f"SIGTERM to 1 of 2 workers under a 40,000-row backlog + 1,500 ev/s: exit {code} after {exit_s:.1f}s "
        f"(grace 6s); the other owned every partition {takeover:.1f}s later; {dup_acks} duplicate acks",
        seconds=time.monotonic() - started,
        extra={"exit_s": round(exit_s, 1), "takeover_s": round(takeover, 1), "duplicate_acks": dup_acks},
    )
    assert code == 0
    assert exit_s < 6 + 1
    assert takeover < 5  # released leases, not expired ones
    assert codes == [0, 0]
    assert dup_acks == 0  # everything w1 got acked, it marked before leaving
    assert_clean(report)


async def _both_own(rig: Rig) -> bool:
    owned = await _owned(rig)
    return owned.get("w1", 0) > 0 and owned.get("w2", 0) > 0


async def test_postgres_killed_mid_run_and_restarted(
    own_pg: ControlledPostgres, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """SIGKILL PostgreSQL (the postmaster and its children) under load, restart it 3 s later on the
    same port. Workers keep running, reconnect with backoff and finish; producers' transactions that
    failed are simply not in the ledger. Nothing is marked without its ack (mark audit)."""
    rig = make_rig(own_pg.dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    workers = [rig.worker("w1"), rig.worker("w2")]
    await wait_for(lambda: all(w.ready() for w in workers), 20, what="workers ready")
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, 15_000, rate=1000, aggregates=500, timeout=90))
    await asyncio.sleep(5)
    own_pg.kill()
    await asyncio.sleep(3)
    own_pg.restart()
    stats = await asyncio.wait_for(producer, 120)
    produced = time.monotonic()
    await wait_drained(rig, 90)
    recovered = time.monotonic() - produced
    codes = rig.stop_all()
    logs = "".join(w.log_text() for w in workers)
    report = await check(
        rig,
        "PostgreSQL SIGKILL mid-run, restart after 3s",
        f"PostgreSQL killed under 1,000 ev/s with 2 workers, back after 3s; {stats.errors} producer "
        f"transactions failed; workers kept running (exit codes {codes}); backlog drained "
        f"{recovered:.1f}s after the producers finished",
        seconds=time.monotonic() - started,
        extra={"producer_errors": stats.errors},
    )
    assert codes == [0, 0]
    assert stats.errors > 0
    assert "failed" in logs  # the workers did see the outage
    assert_clean(report)
