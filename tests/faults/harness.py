"""Shared machinery of the fault suite: tables, streams, worker processes, producers, the checker.

Everything is loopback and bounded: every wait has a deadline, every loop a count or a deadline.
Workers run as real processes (``tests/faults/worker_entry.py``, which runs ``outboxctl worker``
with test hooks chosen by ``OUTBOX_TEST_*`` variables); the test process only produces, injects
faults and checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js import api as js_api

from outbox_devkit.embedded import free_port
from outbox_worker.adapters.history_io import audit_ddl, ledger_ddl, ledger_insert, read_marks, read_stream, read_truth
from outbox_worker.adapters.store import migrate
from outbox_worker.core.history import HistoryReport, check_history
from outbox_worker.core.sql import Sql
from support.polling import seconds_until

HERE = Path(__file__).parent
ENTRY = HERE / "worker_entry.py"
SUBJECT_TEMPLATE = "faults.{aggregate_type}.{event_type}"
SUBJECTS = ["faults.>"]
PUBLISHER = "faults"

# Short timings so that a takeover, a stall detection or a retry takes seconds, not minutes.
FAST = {
    "OUTBOX_LEASE_TTL_SECONDS": "6",
    "OUTBOX_LEASE_RENEW_SECONDS": "2",
    "OUTBOX_ACK_TIMEOUT_SECONDS": "2",
    "OUTBOX_BATCH_TIMEOUT_SECONDS": "20",
    "OUTBOX_RETRY_BACKOFF_INITIAL_SECONDS": "0.1",
    "OUTBOX_RETRY_BACKOFF_MAX_SECONDS": "1",
    "OUTBOX_NATS_PING_INTERVAL_SECONDS": "3",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
    "OUTBOX_SHUTDOWN_GRACE_SECONDS": "6",
    "OUTBOX_DB_TIMEOUT_SECONDS": "5",
    "OUTBOX_MAX_ATTEMPTS": "3",
    "OUTBOX_REPORT_INTERVAL_SECONDS": "60",
    "OUTBOX_LOG_LEVEL": "INFO",
}

RESULTS: list[dict[str, Any]] = []  # one entry per checked scenario; printed in the terminal summary


# --- servers and schema ---------------------------------------------------------------------------
@dataclass
class Rig:
    """One scenario's world: a database with the outbox, a stream, a directory for logs."""

    dsn: str
    nats_urls: list[str]
    base: Path
    stream: str = "FAULTS"
    sql: Sql = field(default_factory=lambda: Sql.for_table("public", "outbox"))
    partitions: int = 8
    workers: list[WorkerProc] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        return ",".join(self.nats_urls)

    async def prepare(self, *, audit: bool = True) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await migrate(conn, self.sql, self.partitions)
            await conn.execute(ledger_ddl(self.sql))
            if audit:
                for stmt in audit_ddl(self.sql):
                    await conn.execute(stmt)
        finally:
            await conn.close()

    async def create_stream(self, **config: Any) -> None:
        """The stream the workers expect (``stream_mode=expect``); retried while a cluster settles."""
        cfg: dict[str, Any] = {
            "name": self.stream,
            "subjects": SUBJECTS,
            "storage": js_api.StorageType.FILE,
            "duplicate_window": 120.0,  # the product's default when it creates the stream
        }
        cfg.update(config)
        nc = await nats.connect(self.nats_urls, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=10)
            for attempt in range(40):
                try:
                    await js.add_stream(**cfg)
                    return
                except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.js.errors.APIError):
                    if attempt == 39:
                        raise
                    await asyncio.sleep(0.25)
        finally:
            await nc.close()

    def worker(self, name: str, extra: dict[str, str] | None = None, *, start: bool = True) -> WorkerProc:
        env = worker_env(self, name, extra or {})
        w = WorkerProc(name, env, self.base / f"{name}.log")
        self.workers.append(w)
        if start:
            w.start()
        return w

    def stop_all(self, grace: float = 15.0) -> list[int | None]:
        return [w.terminate(grace) for w in self.workers]

    def kill_all(self) -> None:
        for w in self.workers:
            w.kill()


def worker_env(rig: Rig, worker_id: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PYTEST_"))}
    env.update(FAST)
    env.update(
        {
            "OUTBOX_DATABASE_URL": rig.dsn,
            "OUTBOX_NATS_SERVERS": rig.nats_url,
            "OUTBOX_DB_SCHEMA": rig.sql.schema,
            "OUTBOX_TABLE": rig.sql.table,
            "OUTBOX_STREAM": rig.stream,
            "OUTBOX_STREAM_MODE": "expect",
            "OUTBOX_SUBJECT_TEMPLATE": SUBJECT_TEMPLATE,
            "OUTBOX_PUBLISHER": PUBLISHER,
            "OUTBOX_WORKER_ID": worker_id,
            "OUTBOX_METRICS_HOST": "127.0.0.1",
            "OUTBOX_METRICS_PORT": str(free_port()),
            "OUTBOX_TEST_HOOK_LOG": str(rig.base / f"{worker_id}.hooks.jsonl"),
        }
    )
    env.update(extra)
    return env


# --- worker processes -----------------------------------------------------------------------------
class WorkerProc:
    """One ``outboxctl worker`` process (through the test entry), signalled by pid only."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self.peak_rss_kb = 0

    @property
    def metrics_port(self) -> int:
        return int(self.env["OUTBOX_METRICS_PORT"])

    @property
    def hook_log(self) -> Path:
        return Path(self.env["OUTBOX_TEST_HOOK_LOG"])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, **env: str) -> None:
        assert self.pid is None, f"{self.name} already running"
        self.env.update(env)
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(ENTRY)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def _reap(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exit_codes.append(code)
        self.proc = None
        return code

    def kill(self) -> int | None:
        if self.pid is None:
            return self._reap(0.1)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        return self._reap(10)

    def terminate(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait ≤ grace, then SIGKILL. Returns the exit code (-9 when killed)."""
        if self.pid is None:
            return self._reap(0.1)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        code = self._reap(grace)
        if code is None:
            return self.kill()
        return code

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int | None:
        return self._reap(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def hook_events(self) -> list[dict[str, Any]]:
        if not self.hook_log.exists():
            return []
        return [json.loads(line) for line in self.hook_log.read_text().splitlines() if line.strip()]

    def metrics(self, timeout: float = 1.0) -> dict[str, float]:
        """The worker's /metrics, summed over label sets: {name or name{reason=...}: value}."""
        return parse_metrics(_http(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout)[1])

    def serving_metrics(self, startup: float = 30.0) -> dict[str, float]:
        """/metrics of a worker that may have just been (re)started: it serves only once connected
        to both servers, so connection refusals are retried while the process lives, ≤ ``startup`` s."""
        deadline = time.monotonic() + startup
        while True:
            try:
                return self.metrics(2.0)
            except ConnectionRefusedError:
                pass
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, ConnectionRefusedError):
                    raise
            if self.pid is None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not serve /metrics within {startup}s (alive: {self.pid is not None}); "
                    f"log tail:\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.2)

    def ready(self, timeout: float = 1.0) -> bool | None:
        """/readyz: True, False, or None when the worker does not answer."""
        try:
            status, _ = _http(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout)
        except OSError:
            return None
        return status == 200

    def sample_rss(self) -> int:
        """Resident memory in KiB now (and keep the peak)."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"VmRSS:\s+(\d+)", text)
        rss = int(m.group(1)) if m else 0
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        return rss


def _http(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        label = re.search(r'(reason|kind|le)="([^"]*)"', name_labels)
        key = f"{name}{{{label.group(2)}}}" if label else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


# --- producers ------------------------------------------------------------------------------------
@dataclass
class ProduceStats:
    committed: int = 0
    rolled_back: int = 0
    errors: int = 0  # transactions that failed (server down): their outcome is in the ledger
    transactions: int = 0
    commit_times: dict[str, float] = field(default_factory=dict)


async def produce(
    dsn: str,
    sql: Sql,
    events: int,
    *,
    aggregates: int = 200,
    producers: int = 4,
    tx_size: int = 20,
    rate: float = 0.0,
    rollback_ratio: float = 0.0,
    slow_ratio: float = 0.0,
    slow_seconds: float = 0.3,
    payload_bytes: int = 120,
    timeout: float = 120.0,
    seed: int = 1,
    stats: ProduceStats | None = None,
    aggregate_type: str = "order",
) -> ProduceStats:
    """Commit ``events`` events (each outbox row with its ledger row, in one transaction).

    Each producer owns disjoint aggregates and commits one transaction at a time, so per aggregate the
    outbox ids grow in commit order. Failed transactions (a server killed) are retried after a short
    pause; an unknown outcome is resolved by the ledger, which is the ground truth. Bounded by
    ``timeout``.
    """
    st = stats or ProduceStats()
    deadline = time.monotonic() + timeout
    insert_ledger = ledger_insert(sql)
    per = [events // producers + (1 if i < events % producers else 0) for i in range(producers)]

    async def one(index: int, count: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine = [a for a in range(aggregates) if a % producers == index] or [index]
        pad = "x" * max(0, payload_bytes - 40)
        done = 0
        conn: asyncpg.Connection | None = None
        started = time.monotonic()
        while done < count and time.monotonic() < deadline:
            n = min(tx_size, count - done)
            rollback = rng.random() < rollback_ratio
            slow = rng.random() < slow_ratio
            aggs = [str(rng.choice(mine)) for _ in range(n)]
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn, timeout=3, command_timeout=10)
                tr = conn.transaction()
                await tr.start()
                try:
                    rows = await conn.fetch(
                        f"INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload) "
                        "SELECT $1, a, 'changed', convert_to($2 || a, 'UTF8') FROM unnest($3::text[]) AS t(a) "
                        "RETURNING id, event_id::text, aggregate_id",
                        aggregate_type,
                        pad,
                        aggs,
                    )
                    await conn.executemany(insert_ledger, [(r[1], f"{aggregate_type}/{r[2]}", r[0]) for r in rows])
                    if slow:
                        await asyncio.sleep(slow_seconds)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await tr.rollback()
                    raise
                if rollback:
                    await tr.rollback()
                    st.rolled_back += n
                    st.transactions += 1
                    continue
                await tr.commit()
            except Exception:  # the server went away mid-transaction: outcome per the ledger
                st.errors += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.3)
                continue
            now = time.time()
            for r in rows:
                st.commit_times[r[1]] = now
            st.transactions += 1
            st.committed += n
            done += n
            if rate > 0:
                ahead = done / (rate / producers) - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    await asyncio.gather(*(one(i, n) for i, n in enumerate(per)))
    return st


async def insert_rows(dsn: str, sql: Sql, rows: Iterable[dict[str, Any]]) -> list[tuple[int, str]]:
    """Insert specific rows (each with its ledger row) in one transaction; return (id, event_id)."""
    out = []
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            for r in rows:
                rec = await conn.fetchrow(
                    f"INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload, headers, tenant) "
                    "VALUES ($1, $2, $3, $4, $5::jsonb, $6) RETURNING id, event_id::text",
                    r.get("aggregate_type", "order"),
                    r["aggregate_id"],
                    r.get("event_type", "changed"),
                    r.get("payload", b"{}"),
                    json.dumps(r.get("headers", {})) if not isinstance(r.get("headers"), str) else r["headers"],
                    r.get("tenant", ""),
                )
                assert rec is not None
                await conn.execute(
                    ledger_insert(sql), rec[1], f"{r.get('aggregate_type', 'order')}/{r['aggregate_id']}", rec[0]
                )
                out.append((rec[0], rec[1]))
    finally:
        await conn.close()
    return out


# --- observing the database -----------------------------------------------------------------------
async def pending_count(dsn: str, sql: Sql) -> int | None:
    """Pending rows now, or None when the database does not answer."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {sql.outbox} WHERE published_at IS NULL"))
    finally:
        await conn.close()


async def wait_drained(rig: Rig, timeout: float, what: str = "backlog drained") -> float:
    """Wait until no row is pending. If that takes more than 15 s, print what the database sessions
    are doing (once), to tell a slow relay from a blocked one."""
    started = time.monotonic()
    dumped = False

    async def drained() -> bool:
        nonlocal dumped
        if not dumped and time.monotonic() - started > 15:
            dumped = True
            with contextlib.suppress(Exception):
                for r in await fetch(
                    rig.dsn,
                    "SELECT application_name, state, wait_event_type, wait_event, "
                    "round(extract(epoch FROM now() - query_start)::numeric, 1) AS s, left(query, 90) AS q "
                    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                ):
                    print(f"[faults] slow drain, pg session: {dict(r)}")
        return await pending_count(rig.dsn, rig.sql) == 0

    return await seconds_until(drained, timeout, what, interval=0.3)


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def stream_messages(urls: list[str], stream: str) -> int:
    nc = await nats.connect(urls, connect_timeout=5)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


# --- the checker ----------------------------------------------------------------------------------
async def check(
    rig: Rig,
    scenario: str,
    faults: str,
    *,
    expect_drained: bool = True,
    seconds: float = 0.0,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> HistoryReport:
    """Run the history checker on the rig; print and record the figures; return the report."""
    conn = await asyncpg.connect(rig.dsn, timeout=10)
    try:
        committed, pending, dead = await read_truth(conn, rig.sql)
        marks = await read_marks(conn, rig.sql)
    finally:
        await conn.close()
    stored = await read_stream(rig.nats_urls, rig.stream, timeout=60)
    report = check_history(committed, stored, pending, dead, marks, expect_drained=expect_drained)
    entry = {
        "scenario": scenario,
        "faults": faults,
        "events": report.events,
        "stored": report.stored,
        "lost": report.lost,
        "duplicates": report.duplicates,
        "order_violations": report.order_violations,
        "seq_mismatches": report.seq_mismatches,
        "unexpected": report.unexpected,
        "pending": report.pending,
        "dead_lettered": report.dead_lettered,
        "marks": report.marks,
        "stale_marks": report.stale_marks,
        "marked_not_stored": report.marked_not_stored,
        "marked_before_stored": report.marked_before_stored,
        "ok": report.ok,
        "seconds": round(seconds, 1),
        "notes": notes,
        **(extra or {}),
    }
    RESULTS.append(entry)
    print(f"\n[faults] {scenario}: {json.dumps(entry)}")
    if report.examples:
        print(f"[faults] {scenario} examples: {report.examples}")
    out = os.environ.get("FAULTS_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(entry) + "\n")
    return report


def assert_clean(report: HistoryReport, *, dead_lettered: int = 0) -> None:
    assert report.lost == 0, report.examples
    assert report.duplicates == 0, report.examples
    assert report.order_violations == 0, report.examples
    assert report.seq_mismatches == 0, report.examples
    assert report.unexpected == 0, report.examples
    assert report.marked_not_stored == 0, report.examples
    assert report.marked_before_stored == 0, report.examples
    assert report.stale_marks == 0, report.examples
    assert report.dead_lettered == dead_lettered, report.examples
    assert report.ok, report.violations()


def worker_logs(rig: Rig) -> str:
    return "\n".join(f"--- {w.name}\n" + "\n".join(w.log_text().splitlines()[-30:]) for w in rig.workers)


async def bulk_insert(dsn: str, sql: Sql, events: int, aggregates: int, payload_bytes: int = 100) -> None:
    """Commit ``events`` events at once (one statement, with their ledger rows); aggregate of event g
    is g mod ``aggregates``, so each aggregate's outbox ids grow with its versions."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(
            f"""WITH ins AS (
                    INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload)
                    SELECT 'order', (g % $2)::text, 'changed', convert_to(repeat('x', $3) || g, 'UTF8')
                    FROM generate_series(1, $1) AS g ORDER BY g
                    RETURNING id, event_id, aggregate_id)
                INSERT INTO "{sql.schema}"."{sql.table}_ledger" (event_id, aggregate, outbox_id)
                SELECT event_id, 'order/' || aggregate_id, id FROM ins""",
            events,
            aggregates,
            payload_bytes,
        )
    finally:
        await conn.close()
