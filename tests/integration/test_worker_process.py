"""Worker processes under real signals: SIGKILL mid-batch, SIGSTOP past the lease (a zombie), SIGTERM
under load, an idle worker's CPU, and a worker whose lease task dies. Each ends with the checker.

Processes are real ``outboxctl worker`` processes, or (for SIGKILL/SIGSTOP at a chosen point) the
same worker started by :data:`RUNNER`, which adds RelayHooks that signal the process itself between
publish and mark and logs what the worker did as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psutil
import pytest

from outbox_devkit.embedded import free_port
from outbox_devkit.producers import ProducerPlan, prepare, produce
from outbox_worker.adapters.history_io import audit_ddl, verify
from outbox_worker.adapters.store import migrate
from outbox_worker.core.history import HistoryReport
from outbox_worker.core.sql import Sql
from support.polling import wait_for

SQL = Sql.for_table("public", "outbox")
STREAM = "PROC"
PUBLISHER = "proc"
TTL = 3.0
RENEW = 1.0
POLL = 0.5
GRACE = 5.0

RUNNER = r"""
import asyncio, dataclasses, json, os, signal, sys, time

import asyncpg

WORKER_ID = os.environ["OUTBOX_WORKER_ID"]
MODE = os.environ.get("RUNNER_MODE", "")
LOG = os.environ["RUNNER_LOG"]
AFTER = int(os.environ.get("RUNNER_AFTER", "3"))

_create_pool = asyncpg.create_pool
def create_pool(*args, **kwargs):  # attribute this worker's marks in the mark audit
    kwargs["server_settings"] = {**(kwargs.get("server_settings") or {}),
                                 "application_name": f"outbox-relay/{WORKER_ID}"}
    return _create_pool(*args, **kwargs)
asyncpg.create_pool = create_pool

from outbox_cli.cmd_worker import setup_logging
from outbox_common.config import WorkerConfig
from outbox_common.settings import WorkerSettings
from outbox_worker.app.relay import RelayHooks
from outbox_worker.app.worker import SideTaskFailed, Worker


def record(event, **fields):
    with open(LOG, "a") as f:
        f.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")


class Hooks(RelayHooks):
    worker = None
    waves = 0
    frozen = False

    async def after_wave(self, rows, results):
        leases = self.worker.leases.leases
        ok = [r.event_id for r, res in zip(rows, results) if res.ok]
        parts = sorted({r.partition for r in rows})
        record("wave", parts=[[p, leases[p].epoch if p in leases else None] for p in parts], ok=len(ok))
        if ok:
            self.waves += 1
        if MODE == "kill" and ok and self.waves >= AFTER:
            record("killing", ids=ok)
            os.kill(os.getpid(), signal.SIGKILL)

    async def before_mark(self, ids):
        if MODE == "stop" and ids and not self.frozen and self.waves >= AFTER:
            self.frozen = True
            record("frozen", n=len(ids))
            os.kill(os.getpid(), signal.SIGSTOP)
            record("resumed")


async def main():
    settings = WorkerSettings()
    setup_logging(settings.log_format, settings.log_level)
    hooks = Hooks()
    worker = Worker(WorkerConfig.from_settings(settings), hooks=hooks)
    hooks.worker = worker
    await worker.start()
    mark_done = worker.store.mark_done

    async def recorded_mark(fence, ids, delete):
        changed = await mark_done(fence, ids, delete)
        record("mark", fence=[list(x) for x in zip(fence.partitions, fence.epochs)], n=len(ids), changed=changed)
        return changed

    worker.store.mark_done = recorded_mark
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    record("started")
    try:
        await worker.run()
    except SideTaskFailed as exc:
        record("failed", error=str(exc))
        return 1
    record("stopped", stats={k: v for k, v in dataclasses.asdict(worker.stats).items() if k != "failures_by_reason"})
    return 0


sys.exit(asyncio.run(main()))
"""


class Proc:
    """One worker process, its output file and (for the runner) its JSON-lines event log."""

    def __init__(self, dsn: str, nats_url: str, worker_id: str, tmp: Path, mode: str | None, **env: str) -> None:
        self.id = worker_id
        self.output = tmp / f"{worker_id}.out"
        self.events_path = tmp / f"{worker_id}.jsonl"
        full = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        full.update(
            {
                "OUTBOX_DATABASE_URL": dsn,
                "OUTBOX_NATS_SERVERS": nats_url,
                "OUTBOX_WORKER_ID": worker_id,
                "OUTBOX_PUBLISHER": PUBLISHER,
                "OUTBOX_STREAM": STREAM,
                "OUTBOX_STREAM_MODE": "create",
                "OUTBOX_METRICS_PORT": "0",
                "OUTBOX_LEASE_TTL_SECONDS": str(TTL),
                "OUTBOX_LEASE_RENEW_SECONDS": str(RENEW),
                "OUTBOX_ACK_TIMEOUT_SECONDS": "1",
                "OUTBOX_POLL_INTERVAL_SECONDS": str(POLL),
                "OUTBOX_RETRY_BACKOFF_INITIAL_SECONDS": "0.1",
                "OUTBOX_RETRY_BACKOFF_MAX_SECONDS": "1",
                "OUTBOX_SHUTDOWN_GRACE_SECONDS": str(GRACE),
                "OUTBOX_DB_POOL_SIZE": "3",
                "OUTBOX_BATCH_SIZE": "200",
                "OUTBOX_STARTUP_TIMEOUT_SECONDS": "5",
                "OUTBOX_LOG_LEVEL": "INFO",
                "RUNNER_LOG": str(self.events_path),
                "RUNNER_MODE": mode or "",
            }
        )
        full.update({k if k.startswith("RUNNER_") else f"OUTBOX_{k.upper()}": v for k, v in env.items()})
        argv = [sys.executable, "-c", RUNNER] if mode is not None else [sys.executable, "-m", "outbox_cli", "worker"]
        with self.output.open("wb") as out:
            self.popen = subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        rows = [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["event"] == kind]

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    async def exited(self, timeout: float) -> int:
        code = await wait_for(lambda: _value(self.popen.poll() is not None), timeout, f"{self.id} to exit")
        assert code
        assert self.popen.returncode is not None
        return self.popen.returncode

    async def stop(self, timeout: float = GRACE + 5) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        return await self.exited(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


async def _value(v: Any) -> Any:
    return v


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every worker process a test starts; any still running at the end is killed."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.signal(signal.SIGCONT)
        p.kill()


async def setup_db(dsn: str, partitions: int = 8) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    assert pool is not None
    async with pool.acquire() as conn:
        await migrate(conn, SQL, partitions)
        await prepare(conn, SQL)
        for stmt in audit_ddl(SQL):
            await conn.execute(stmt)
    return pool


async def owners(pool: asyncpg.Pool) -> dict[int, tuple[str | None, int, bool]]:
    rows = await pool.fetch(SQL.lease_table, PUBLISHER)
    return {r["partition"]: (r["owner"], r["epoch"], r["live"]) for r in rows}


async def owns(pool: asyncpg.Pool, worker: str, parts: set[int] | None = None) -> set[int]:
    table = await owners(pool)
    return {p for p, (o, _, live) in table.items() if o == worker and live and (parts is None or p in parts)}


async def shared(pool: asyncpg.Pool, *workers: str) -> bool:
    """Each of ``workers`` owns a fair share of the 8 partitions."""
    table = await owners(pool)
    counts = [sum(1 for o, _, live in table.values() if o == w and live) for w in workers]
    return len(table) == 8 and sum(counts) == 8 and max(counts) - min(counts) <= 1


async def drained(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = 0 FROM outbox"))


def assert_clean(report: HistoryReport, events: int) -> None:
    assert report.ok, report.to_dict()
    assert (report.lost, report.duplicates, report.order_violations, report.unexpected) == (0, 0, 0, 0)
    assert (report.events, report.published, report.pending) == (events, events, 0), report.to_dict()
    assert report.stale_marks == 0, report.to_dict()


# --- SIGKILL --------------------------------------------------------------------------------------


async def test_sigkill_mid_batch_loses_nothing_and_partitions_move_within_ttl(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    pool = await setup_db(pg_dsn)
    try:
        survivor = Proc(pg_dsn, nats_url, "survivor", tmp_path, mode="")
        victim = Proc(pg_dsn, nats_url, "victim", tmp_path, mode="kill", RUNNER_AFTER="5")
        procs += [survivor, victim]
        await wait_for(lambda: shared(pool, "survivor", "victim"), 15, "both workers to own partitions")
        plan = ProducerPlan(events=4000, aggregates=400, producers=4, rate_per_s=1000)
        producer = asyncio.create_task(produce(pg_dsn, SQL, plan))
        # The victim SIGKILLs itself after its 5th acked wave, before marking it: acked, unmarked rows.
        assert await victim.exited(30) == -signal.SIGKILL
        died = time.monotonic()
        [killing] = victim.events("killing")
        lost_parts = await owns(pool, "victim")
        assert lost_parts, "the victim held partitions when it died"

        async def taken_over() -> bool:
            return await owns(pool, "survivor", lost_parts) == lost_parts

        await wait_for(taken_over, TTL + 3, "the survivor to take the victim's partitions", interval=0.02)
        takeover = time.monotonic() - died
        # TTL + one poll interval, plus 0.5 s for process and database scheduling on a busy CI box
        assert takeover <= TTL + POLL + 0.5, f"takeover after {takeover:.2f}s"

        await asyncio.wait_for(producer, 30)
        await wait_for(lambda: drained(pool), 20, "the backlog to drain", interval=0.1)
        # The killed batch's rows were acked but never marked: the survivor re-published them and the
        # broker absorbed the copies (Nats-Msg-Id); none was lost.
        assert killing["ids"]
        assert await survivor.stop() == 0
        stats = survivor.events("stopped")[0]["stats"]
        assert stats["duplicates"] >= len(killing["ids"])
    finally:
        await pool.close()
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert_clean(report, 4000)


# --- SIGSTOP (zombie) -----------------------------------------------------------------------------


async def test_sigstop_past_the_lease_then_sigcont_marks_nothing_and_stops_publishing(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    pool = await setup_db(pg_dsn)
    try:
        peer = Proc(pg_dsn, nats_url, "peer", tmp_path, mode="")
        zombie = Proc(pg_dsn, nats_url, "zombie", tmp_path, mode="stop", LOOPS="1", RUNNER_AFTER="3")
        procs += [peer, zombie]
        await wait_for(lambda: shared(pool, "peer", "zombie"), 15, "both workers to own partitions")
        plan = ProducerPlan(events=3000, aggregates=300, producers=4, rate_per_s=1000)
        producer = asyncio.create_task(produce(pg_dsn, SQL, plan))
        # The zombie freezes itself (SIGSTOP) after acks, before marking.
        await wait_for(lambda: _value(bool(zombie.events("frozen"))), 30, "the zombie to freeze")
        await wait_for(lambda: _value(psutil.Process(zombie.pid).status() == psutil.STATUS_STOPPED), 5, "stopped")
        marks_before = zombie.events("mark")
        held = {p for p, (o, _, live) in (await owners(pool)).items() if o == "zombie"}
        epochs_before = {p: e for p, (_, e, _) in (await owners(pool)).items()}
        assert held

        async def peer_took_all() -> bool:
            return await owns(pool, "peer", held) == held

        await wait_for(peer_took_all, TTL + 3, "the peer to take the zombie's partitions", interval=0.05)
        table = await owners(pool)
        assert all(table[p][1] > epochs_before[p] for p in held)  # new epochs fence the zombie out

        resumed_at = time.time()
        zombie.signal(signal.SIGCONT)
        await wait_for(lambda: _value(len(zombie.events("mark")) > len(marks_before)), 10, "the zombie's mark")
        fenced = zombie.events("mark")[len(marks_before)]
        assert fenced["n"] > 0
        assert fenced["changed"] == 0  # the fenced mark changed nothing
        stale = {(p, e) for p, e in fenced["fence"]}
        assert {p for p, _ in stale} <= held

        await asyncio.wait_for(producer, 30)
        await wait_for(lambda: drained(pool), 20, "the backlog to drain", interval=0.1)
        assert await zombie.stop() == 0
        assert await peer.stop() == 0
        # After it resumed, the zombie published nothing under the leases it lost (it may have
        # acquired partitions again, under new epochs, once the shares were rebalanced).
        later = [w for w in zombie.events("wave") if w["t"] >= resumed_at]
        published_under = {(p, e) for w in later for p, e in w["parts"]}
        assert not published_under & stale, published_under & stale
        assert all(e is not None for _, e in published_under)
        stats = zombie.events("stopped")[0]["stats"]
        assert stats["fenced_out"] >= fenced["n"]
        assert "lease on partition" in zombie.text()
    finally:
        await pool.close()
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert_clean(report, 3000)
    assert report.marks >= 3000
    assert report.unattributed_marks == 0


# --- SIGTERM --------------------------------------------------------------------------------------


async def test_sigterm_under_load_exits_0_releases_leases_and_successor_continues(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    pool = await setup_db(pg_dsn)
    try:
        first = Proc(pg_dsn, nats_url, "first", tmp_path, mode=None)
        second = Proc(pg_dsn, nats_url, "second", tmp_path, mode=None)
        procs += [first, second]
        await wait_for(lambda: shared(pool, "first", "second"), 15, "both workers to own partitions")
        plan = ProducerPlan(events=6000, aggregates=500, producers=4, rate_per_s=1500)
        producer = asyncio.create_task(produce(pg_dsn, SQL, plan))
        await wait_for(lambda: pool.fetchval("SELECT count(*) > 1000 FROM outbox_ledger"), 10, "load")
        assert not producer.done()

        t0 = time.monotonic()
        first.signal(signal.SIGTERM)
        code = await first.exited(GRACE + 2)
        took = time.monotonic() - t0
        assert code == 0, first.text()[-2000:]
        assert took <= GRACE, f"stopped after {took:.2f}s"
        # Leases released at once (not left to expire), membership left.
        table = await owners(pool)
        assert all(o != "first" for o, _, _ in table.values()), table
        assert await pool.fetchval("SELECT count(*) FROM outbox_workers WHERE worker_id = 'first'") == 0
        # The successor takes everything well before a TTL would have expired them.
        await wait_for(lambda: _is_len(owns(pool, "second"), 8), RENEW + 1.5, "the successor to own all 8")

        await asyncio.wait_for(producer, 30)
        await wait_for(lambda: drained(pool), 20, "the backlog to drain", interval=0.1)
        assert await second.stop() == 0
        assert "worker stopped cleanly" in first.text()
    finally:
        await pool.close()
    report = await verify(pg_dsn, SQL, nats_url, STREAM)
    assert report.unattributed_marks == report.marks  # plain outboxctl workers: marks not attributed
    assert_clean(report, 6000)


async def _is_len(value: Awaitable[set[int]], n: int) -> bool:
    return len(await value) == n


# --- idle -------------------------------------------------------------------------------------------


async def test_idle_worker_does_not_busy_loop(pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]) -> None:
    pool = await setup_db(pg_dsn)
    try:
        # The test server trusts local users, so the DSN may carry a password that must never be logged.
        dsn = pg_dsn.replace("postgres@", "postgres:pw-never-logged@")
        assert dsn != pg_dsn
        worker = Proc(dsn, nats_url, "idle", tmp_path, mode=None, POLL_INTERVAL_SECONDS="1", LOG_FORMAT="json")
        procs.append(worker)
        await wait_for(lambda: _is_len(owns(pool, "idle"), 8), 10, "the worker to own all partitions")
        await asyncio.sleep(1.0)  # start-up work done
        p = psutil.Process(worker.pid)
        before = p.cpu_times()
        await asyncio.sleep(5.0)
        after = p.cpu_times()
        cpu = (after.user - before.user) + (after.system - before.system)
        assert cpu < 0.25, f"idle worker used {cpu:.3f}s CPU in 5s"
        # still alive and relaying
        await produce(pg_dsn, SQL, ProducerPlan(events=50, aggregates=10, producers=1))
        await wait_for(lambda: drained(pool), 10, "the events to be relayed")
        assert await worker.stop() == 0
        # structured logs: one JSON object per line, no secret
        lines = worker.text().splitlines()
        assert any("worker idle started" in json.loads(line)["message"] for line in lines)
        assert all({"time", "level", "logger", "message"} <= json.loads(line).keys() for line in lines)
        assert "pw-never-logged" not in worker.text()
    finally:
        await pool.close()
    assert_clean(await verify(pg_dsn, SQL, nats_url, STREAM), 50)


# --- supervision --------------------------------------------------------------------------------


async def test_worker_exits_non_zero_when_its_lease_task_dies(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """The lease table disappears under a running worker (someone dropped it): renewals can never
    succeed again, so the lease task ends and the worker exits 1 instead of idling half-alive."""
    pool = await setup_db(pg_dsn)
    try:
        await produce(pg_dsn, SQL, ProducerPlan(events=500, aggregates=50, producers=2))
        worker = Proc(pg_dsn, nats_url, "doomed", tmp_path, mode=None)
        procs.append(worker)
        await wait_for(lambda: drained(pool), 10, "the first events to be relayed")
        await pool.execute("DROP TABLE outbox_leases")
        code = await worker.exited(RENEW + GRACE + 3)
        assert code == 1, worker.text()[-2000:]
        assert "task leases ended unexpectedly" in worker.text()
        assert "UndefinedTableError" in worker.text()
        # Re-migrate: a new worker picks up what came after.
        async with pool.acquire() as conn:
            await migrate(conn, SQL, 8)
        await produce(pg_dsn, SQL, ProducerPlan(events=100, aggregates=10, producers=1, seed=3))
        successor = Proc(pg_dsn, nats_url, "successor", tmp_path, mode=None)
        procs.append(successor)
        await wait_for(lambda: drained(pool), 15, "the successor to relay the rest")
        assert await successor.stop() == 0
    finally:
        await pool.close()
    assert_clean(await verify(pg_dsn, SQL, nats_url, STREAM), 600)


# --- identity and settings mistakes -------------------------------------------------------------


async def test_a_second_live_worker_with_the_same_id_is_refused_and_shares_stay_fair(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Two live processes must never share a lease identity. The second one started with a worker id
    in use watches the first one's heartbeat being renewed and exits 3 with the fix; the healthy
    workers keep fair shares. A process restarted with the id of one that was SIGKILLed (a container
    restart in the same pod) is not refused: that heartbeat stops being renewed, and it takes over."""
    pool = await setup_db(pg_dsn)
    try:
        (tmp_path / "second").mkdir()
        (tmp_path / "restart").mkdir()
        first = Proc(pg_dsn, nats_url, "same", tmp_path, mode=None)
        other = Proc(pg_dsn, nats_url, "other", tmp_path, mode=None)
        procs += [first, other]
        await wait_for(lambda: shared(pool, "same", "other"), 15, "both workers to own partitions")
        second = Proc(pg_dsn, nats_url, "same", tmp_path / "second", mode=None)
        procs.append(second)
        started = time.monotonic()
        assert await second.exited(TTL + 10) == 3, second.text()
        assert time.monotonic() - started < TTL + 8  # at most one TTL of watching, plus start-up
        out = second.text()
        assert "worker id 'same' of publisher 'proc' is in use by another live worker process" in out
        assert "OUTBOX_WORKER_ID" in out
        assert "Traceback" not in out
        assert await shared(pool, "same", "other")  # the refused one never took a lease
        assert first.popen.poll() is None
        assert other.popen.poll() is None

        first.kill()  # a crash: its heartbeat row stays until it expires
        restarted = Proc(pg_dsn, nats_url, "same", tmp_path / "restart", mode=None)
        procs.append(restarted)
        await wait_for(lambda: _value("worker same started" in restarted.text()), TTL + 15, "the restart to start")
        assert restarted.popen.poll() is None, restarted.text()
        # once the dead process's leases expired, the live leases of "same" are the restart's own
        await asyncio.sleep(TTL + 1)
        await wait_for(lambda: shared(pool, "same", "other"), 15, "the restarted worker to own its share")
        assert await restarted.stop() == 0
        assert await other.stop() == 0
    finally:
        await pool.close()


async def test_settings_mistakes_are_caught_at_start_up(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """A metrics port in use ends start-up with exit code 3 and a message naming OUTBOX_METRICS_PORT
    and the fix, not exit 1 with an OSError traceback, and leaves no heartbeat row (nor does a start
    refused for a missing stream); a misspelt OUTBOX_* variable is warned about with the name meant."""
    pool = await setup_db(pg_dsn)
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        busy = Proc(pg_dsn, nats_url, "busy", tmp_path, mode=None, METRICS_HOST="127.0.0.1", METRICS_PORT=str(port))
        procs.append(busy)
        assert await busy.exited(20) == 3, busy.text()
        out = busy.text()
        assert f"cannot listen on 127.0.0.1:{port}" in out
        assert "set OUTBOX_METRICS_PORT to a free port" in out
        assert "Traceback" not in out
        assert await pool.fetchval("SELECT count(*) FROM outbox_workers WHERE worker_id = 'busy'") == 0

        # a start that failed after joining, before the leases exist (the stream is missing), leaves
        # no heartbeat behind either: a restart under the same id (a pod's restarted container)
        # would wait one lease TTL for it in silence, and peers would count a worker that is gone
        nostream = Proc(pg_dsn, nats_url, "nostream", tmp_path, mode=None, STREAM="MISSING", STREAM_MODE="expect")
        procs.append(nostream)
        assert await nostream.exited(20) == 3, nostream.text()
        assert "stream 'MISSING' does not exist" in nostream.text()
        assert await pool.fetchval("SELECT count(*) FROM outbox_workers WHERE worker_id = 'nostream'") == 0

        typo = Proc(pg_dsn, nats_url, "typo", tmp_path, mode=None, BATCHSIZE="50")
        procs.append(typo)
        await wait_for(lambda: _value("OUTBOX_BATCHSIZE" in typo.text()), 15, "the start-up warning")
        assert "unknown setting OUTBOX_BATCHSIZE in the environment is ignored: did you mean OUTBOX_BATCH_SIZE?" in (
            typo.text()
        )
        await wait_for(lambda: owns(pool, "typo"), 15, "the worker to run anyway")
        assert await typo.stop() == 0, typo.text()
    finally:
        blocker.close()
        await pool.close()


# --- hostile rows ---------------------------------------------------------------------------------


async def test_rows_over_max_payload_are_dead_lettered_without_reading_them(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Rows whose payload NATS can never take (over its max_payload, 1 MiB here) are dead-lettered
    by their size: the claim leaves their bytes in PostgreSQL. Read in full, one claim of them put
    every payload in the worker's memory at once (these 8 rows of 40 MB: a ~400 MB peak; enough of
    them OOM-kill a worker under the operator's default 512Mi limit before it can dead-letter them,
    its successor claims the same rows, and the partition never moves again)."""
    pool = await setup_db(pg_dsn, partitions=1)
    try:
        await pool.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'order', 'a' || g, 'created', convert_to(repeat('x', 40000000), 'UTF8') "
            "FROM generate_series(1, 8) AS g"  # 40 MB each, a few KB stored (compressed)
        )
        worker = Proc(pg_dsn, nats_url, "big", tmp_path, mode=None, DB_TIMEOUT_SECONDS="60")
        procs.append(worker)
        await wait_for(lambda: drained(pool), 60, "the oversized rows to be dead-lettered")
        status = Path(f"/proc/{worker.pid}/status").read_text().splitlines()
        peak_kib = int(next(li for li in status if li.startswith("VmHWM")).split()[1])
        assert await worker.stop() == 0
        reasons = [r["reason"] for r in await pool.fetch("SELECT reason FROM outbox_dead_letters ORDER BY id")]
        assert len(reasons) == 8
        assert all(r.startswith("payload_too_large") for r in reasons), reasons
        sizes = await pool.fetch("SELECT octet_length(payload) AS n FROM outbox_dead_letters")
        assert {r["n"] for r in sizes} == {40_000_000}  # the dead letters keep the whole payload
        assert peak_kib < 200 * 1024, f"worker peaked at {peak_kib // 1024} MiB"
    finally:
        await pool.close()


async def test_large_payloads_are_claimed_within_the_byte_budget_in_order_and_without_a_stall(
    pg_dsn: str, nats_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Payloads NATS takes but too large for a whole batch of them (200 rows of 900 KB, 180 MB, in
    one partition, batches of 200 rows): each claim reads at most OUTBOX_MAX_BATCH_BYTES of them (4
    MiB here), so the worker's memory stays bounded (bounded by rows alone, one claim held all 180
    MB, a 235 MiB peak here; with the default 4 loops x 1,000 rows such events took a worker far
    past its 512Mi limit); every row is published once, in order; and a claim cut by its bytes is
    followed by the next at once (the poll is 30 s here: a worker that waited for it would not
    finish in time)."""
    pool = await setup_db(pg_dsn, partitions=1)
    try:
        rows = await pool.fetch(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'bigbatch', 'a' || (g % 3), 'created', convert_to(repeat(chr(65 + g % 26), 900000), 'UTF8') "
            "FROM generate_series(1, 200) AS g ORDER BY g RETURNING event_id::text"  # a few KB each, stored
        )
        worker = Proc(
            pg_dsn, nats_url, "bytes", tmp_path, mode=None, MAX_BATCH_BYTES=str(4 * 2**20), POLL_INTERVAL_SECONDS="30"
        )
        procs.append(worker)
        await wait_for(lambda: drained(pool), 60, "the large rows to be published")
        status = Path(f"/proc/{worker.pid}/status").read_text().splitlines()
        peak_kib = int(next(li for li in status if li.startswith("VmHWM")).split()[1])
        assert await worker.stop() == 0
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.jetstream().subscribe("outbox.bigbatch.created", ordered_consumer=True)
            sent = [(await sub.next_msg(timeout=10)) for _ in rows]
        finally:
            await nc.close()
        assert [m.headers["Nats-Msg-Id"] for m in sent if m.headers] == [r["event_id"] for r in rows]
        assert all(len(m.data) == 900_000 for m in sent)
        assert peak_kib < 120 * 1024, f"worker peaked at {peak_kib // 1024} MiB"  # 68 MiB measured; 235 unbounded
    finally:
        await pool.close()


async def test_sigterm_while_starting_stops_the_worker_and_leaves_no_heartbeat(
    pg_dsn: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """A pod stopped while its worker waits for NATS (a rollout during a NATS outage): SIGTERM ends
    the start-up at once, with a log line and exit 0, and the worker's heartbeat row is deleted. It
    was the process-wide handler's exit 143 in the middle of whatever ran, nothing closed: the row
    stayed live for a lease TTL, and a restart under the same worker id waited it out."""
    pool = await setup_db(pg_dsn)
    try:
        nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
        waiting = Proc(pg_dsn, nowhere, "waiting", tmp_path, mode=None, STARTUP_TIMEOUT_SECONDS="60")
        procs.append(waiting)
        await wait_for(lambda: _value("NATS not available yet" in waiting.text()), 30, "the worker to wait for NATS")
        assert await pool.fetchval("SELECT count(*) FROM outbox_workers WHERE worker_id = 'waiting'") == 1
        t0 = time.monotonic()
        waiting.signal(signal.SIGTERM)
        assert await waiting.exited(10) == 0, waiting.text()
        assert time.monotonic() - t0 < 5
        assert "stopped by a signal while starting" in waiting.text()
        assert "Traceback" not in waiting.text()
        assert await pool.fetchval("SELECT count(*) FROM outbox_workers WHERE worker_id = 'waiting'") == 0
    finally:
        await pool.close()
