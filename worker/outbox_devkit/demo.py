"""``outboxctl demo``: the whole relay on one machine, verified end to end.

Starts embedded PostgreSQL and NATS (or uses given URLs), migrates, starts worker *processes* and
waits until they hold every partition between them (so the latency it reports is the relay's, not
the workers' start-up), drives producers (slow transactions that commit out of id order,
rollbacks), shows progress, stops the workers with SIGTERM, reads the stream back and checks it
against the ledger.

Everything it started is stopped on exit, also on Ctrl-C, in order: workers, then nats-server, then
PostgreSQL. Workers and servers run in their own process groups, so the SIGINT a terminal sends to
the demo's group reaches the demo alone, which stops them (:func:`stopped_in_order`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.aio.client import Client

from outbox_common.settings import ENV_PREFIX, redact_server_list, redact_url
from outbox_devkit.benchstats import percentile
from outbox_devkit.producers import (
    LATENCY_CLOCK_COMMIT,
    LATENCY_CLOCK_RETURNED,
    ProducerPlan,
    ProducerResult,
    commit_latencies,
    ledger_commit_times,
    prepare,
    produce,
)
from outbox_worker.adapters.history_io import ledger_table, read_stream, read_truth
from outbox_worker.adapters.publisher import ConnectErrors, SecureClient
from outbox_worker.adapters.store import DatabaseAuthError, connection_error, dsn_error, migrate
from outbox_worker.core.history import HistoryReport, check_history
from outbox_worker.core.sql import DEFAULT_PARTITIONS, Sql

STREAM = "OUTBOX_DEMO"
PUBLISHER = "demo"
WORKER_STARTUP_TIMEOUT_SECONDS = 30.0  # a worker that cannot start within this exits with its error ...
READY_TIMEOUT_SECONDS = 60.0  # ... which the demo, waiting longer for them to share the partitions, reports

# outboxctl's exit codes (README), which the workers exit with too
EXIT_FAILURE = 1
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
_LOGGER = re.compile(r"^[\w.]+: ")  # the logger's name before the message of a worker's log line


class DemoError(Exception):
    """What stopped the demo (or the bench, which runs its workers the same way), in a message for its
    user (no secret in it), and the exit code ``outboxctl demo`` (``bench``) ends with: 3 configuration
    (credentials, privileges), 4 a server not reachable, 1 else."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DemoOptions:
    events: int = 20_000
    workers: int = 2
    partitions: int = DEFAULT_PARTITIONS
    aggregates: int = 2_000
    database_url: str = ""
    nats_url: str = ""
    timeout: float = 600.0
    worker_env: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None


@dataclass
class DemoSummary:
    events: int
    published: int
    lost: int
    duplicates: int
    order_violations: int
    events_per_s: float
    p50_ms: float
    p99_ms: float
    latency_clock: str = ""  # where p50/p99 start: the commit, or when the producer saw COMMIT return
    unexpected: int = 0
    pending: int = 0
    rolled_back: int = 0
    workers: int = 0
    worker_exit_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.order_violations or self.unexpected or self.pending) and all(
            c == 0 for c in self.worker_exit_codes
        )

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"ok": self.ok}


@contextlib.contextmanager
def servers(options: DemoOptions, base: Path) -> Iterator[tuple[str, str, dict[str, int]]]:
    """Yield (dsn, nats_url, pids): the given servers, or embedded ones that are stopped on exit;
    ``pids`` has the embedded ones' pids (``postgres``: the postmaster, ``nats``)."""
    from outbox_devkit.embedded import EmbeddedNats, EmbeddedPostgres

    with contextlib.ExitStack() as stack:
        dsn, url, pids = options.database_url, options.nats_url, {}
        if not dsn:
            pg = EmbeddedPostgres(track_commit_timestamp=True)  # latencies from the real commit
            stack.callback(pg.cleanup)
            pg.start()
            dsn, pids["postgres"] = pg.dsn, pg.pid or 0
        if not url:
            ns = EmbeddedNats(base_dir=base / "nats")
            stack.callback(ns.cleanup)
            ns.start()
            url, pids["nats"] = ns.url, ns.pid or 0
        yield dsn, url, {k: v for k, v in pids.items() if v}


def worker_env(dsn: str, nats_url: str, table: str, extra: dict[str, str], worker_id: str) -> dict[str, str]:
    """The environment of a demo or bench worker: this process's without its ``OUTBOX_*`` variables,
    the servers, the table and a start-up budget (:data:`WORKER_STARTUP_TIMEOUT_SECONDS`), then
    ``extra`` (the caller's, the user's ``--worker-env`` last), which may override any of them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        {
            "OUTBOX_DATABASE_URL": dsn,
            "OUTBOX_NATS_SERVERS": nats_url,
            "OUTBOX_TABLE": table,
            "OUTBOX_STREAM": STREAM,
            "OUTBOX_STREAM_MODE": "create",
            "OUTBOX_PUBLISHER": PUBLISHER,
            "OUTBOX_WORKER_ID": worker_id,
            "OUTBOX_METRICS_PORT": "0",
            "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
            "OUTBOX_LOG_LEVEL": "WARNING",
            "OUTBOX_STARTUP_TIMEOUT_SECONDS": f"{WORKER_STARTUP_TIMEOUT_SECONDS:g}",
        }
    )
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log_path: Path, command: Sequence[str] = ("worker",)) -> subprocess.Popen[bytes]:
    """Start ``python -m outbox_cli <command>`` (a worker by default) with ``env``, output to ``log_path``,
    in its own process group (a terminal's Ctrl-C reaches only the demo, which stops it with SIGTERM)."""
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox_cli", *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def stop_workers(procs: list[subprocess.Popen[bytes]], grace: float = 30.0) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def stopped_in_order(options: DemoOptions) -> str:
    """What the demo stops on exit, in the order it stops them."""
    parts = ["the workers"]
    if not options.nats_url:
        parts.append("nats-server")
    if not options.database_url:
        parts.append("PostgreSQL")
    return "stopped " + ", then ".join(parts)


async def run_demo(options: DemoOptions) -> DemoSummary:
    """Run the demo. Cancelled (Ctrl-C, SIGTERM), it stops what it started, in the order
    :func:`stopped_in_order` names, before the cancellation propagates."""
    say = options.progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="outbox-demo-") as tmp:
        base = Path(tmp)
        with servers(options, base) as (dsn, nats_url, _pids):
            return await _run(options, base, dsn, nats_url, say)


def shown_dsn(dsn: str) -> str:
    """A PostgreSQL DSN as the demo may print it: without its user and password, nor its query
    string (``?password=...``, ``sslpassword=...``)."""
    return redact_url(dsn.split("?", 1)[0])


def shown_nats(urls: str | Iterable[str]) -> str:
    """NATS server URLs as the demo may print them: without user, password or token."""
    return redact_server_list(urls)


def latency_percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds of commit-to-stored latencies in seconds (nearest rank)."""
    return round(percentile(latencies, 0.50) * 1000, 2), round(percentile(latencies, 0.99) * 1000, 2)


async def wait_for_fair_leases(
    dsn: str,
    sql: Sql,
    publisher: str,
    workers: int,
    partitions: int,
    check_alive: Callable[[], None],
    timeout: float,
) -> float:
    """Wait until ``workers`` workers of ``publisher`` hold live leases on all ``partitions``, each at
    least its fair share (``partitions // workers``): they have started, reached both servers and
    settled. Returns the seconds it took. ``check_alive`` runs on every poll and raises if a worker
    died; after ``timeout`` seconds this raises TimeoutError with the shares seen. One parameter
    over six: ``check_alive`` lets the demo and the bench report a dead worker their own way."""
    started = time.monotonic()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        while True:
            check_alive()
            counts = [
                int(r[0])
                for r in await conn.fetch(
                    f"SELECT count(*) FROM {sql.leases} WHERE publisher = $1 AND owner IS NOT NULL "
                    "AND expires_at > now() GROUP BY owner",
                    publisher,
                )
            ]
            if len(counts) == workers and sum(counts) == partitions and min(counts) >= partitions // workers:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"workers did not share the partitions within {timeout:.0f}s: {counts}")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def workers_ready(
    dsn: str,
    sql: Sql,
    publisher: str,
    partitions: int,
    procs: Sequence[subprocess.Popen[bytes]],
    logs: Sequence[Path],
) -> float:
    """Wait until the worker processes ``procs`` (their logs: ``logs``) share the ``partitions``
    (:func:`wait_for_fair_leases`), at most :data:`READY_TIMEOUT_SECONDS`, longer than their own
    start-up budget: a worker that cannot start exits first, and DemoError carries its own error and
    exit code (:func:`worker_failure`). On the timeout, DemoError (exit 1) with the ends of their
    logs. Returns the seconds it took."""

    def check_alive() -> None:
        if any(p.poll() is not None for p in procs):
            raise worker_failure(procs, logs, "while starting")

    try:
        return await wait_for_fair_leases(
            dsn, sql, publisher, len(procs), partitions, check_alive, READY_TIMEOUT_SECONDS
        )
    except TimeoutError as exc:
        raise DemoError(f"{exc}; the end of their logs:\n{log_tails(logs)}", EXIT_FAILURE) from None


async def recreate_tables(conn: asyncpg.Connection, sql: Sql, partitions: int) -> None:
    """Drop the outbox tables of ``sql`` and their ledger, if there, and create them afresh (the
    schema too, if missing): every demo and bench run starts from empty tables. A role PostgreSQL
    refuses that is DemoError (exit 3) naming the GRANT it lacks."""
    try:
        drop = (
            f"DROP TABLE IF EXISTS {sql.outbox}, {sql.leases}, {sql.workers}, {sql.dead_letters}, {ledger_table(sql)}"
        )
        await conn.execute(drop)
        with contextlib.suppress(asyncpg.UndefinedTableError):
            await conn.execute(f"DELETE FROM {sql.meta} WHERE table_name = $1", sql.table)
        await migrate(conn, sql, partitions)
        await prepare(conn, sql)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise DemoError(await _tables_refused(conn, sql, exc), EXIT_CONFIG) from None


async def _tables_refused(conn: asyncpg.Connection, sql: Sql, exc: asyncpg.InsufficientPrivilegeError) -> str:
    """Why PostgreSQL refused :func:`recreate_tables`, and the GRANTs the role lacks for it."""
    row = await conn.fetchrow(
        "SELECT current_user, current_database(), has_database_privilege(current_database(), 'CREATE'), "
        "(SELECT has_schema_privilege(oid, 'CREATE') AND has_schema_privilege(oid, 'USAGE') "
        "FROM pg_namespace WHERE nspname = $1)",
        sql.schema,
    )
    assert row is not None
    role, database, create_schema, use_schema = row
    grants = []
    if use_schema is None and not create_schema:  # None: no such schema yet, the migration creates it
        grants.append(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
    if use_schema is False:
        grants.append(f'GRANT USAGE, CREATE ON SCHEMA "{sql.schema}" TO "{role}"')
    fix = f"run {'; '.join(grants)}" if grants else "they are another role's: drop them as that role, or run as it"
    return (
        f"PostgreSQL refused to create the tables {sql.schema}.{sql.table}* for the role of --database-url "
        f"({exc}); each run drops and creates them, and the schema if missing: {fix}"
    )


async def connect_db(dsn: str) -> asyncpg.Connection:
    """A connection to the demo's (or bench's) PostgreSQL; DemoError when it cannot be had: exit 3 for
    rejected credentials or a missing database, 4 for a server not reachable."""
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except Exception as exc:
        mapped = connection_error(exc, "check --database-url") or dsn_error(exc, "check --database-url")
        if mapped is None:
            raise
        code = EXIT_CONFIG if isinstance(mapped, DatabaseAuthError) else EXIT_UNAVAILABLE
        raise DemoError(str(mapped), code) from None


async def connect_nats(nats_url: str | list[str], errors: ConnectErrors | None = None) -> Client:
    """A connection to the demo's (or bench's) NATS, or DemoError within seconds. nats-py's defaults
    try 60 times 2 s apart, and report rejected credentials only to the error callback, whose reports
    go to ``errors`` (a :class:`ClientErrors` also notes a subject the server's permissions deny)."""
    errors = errors or ConnectErrors()
    nc = SecureClient()  # a tls:// URL is connected to over TLS only, as the workers connect
    try:
        await nc.connect(
            nats_url, connect_timeout=3, reconnect_time_wait=1, max_reconnect_attempts=3, error_cb=errors.note
        )
        return nc
    except Exception as exc:
        if errors.no_tls is not None:
            raise DemoError(f"{errors.no_tls} ({shown_nats(nats_url)})", EXIT_CONFIG) from None
        if errors.rejected:
            raise DemoError(
                f"NATS at {shown_nats(nats_url)} rejected the credentials: fix the user and password or the "
                "token in --nats-url",
                EXIT_CONFIG,
            ) from None
        if isinstance(exc, nats.errors.NoServersError | OSError | TimeoutError):
            message = f"NATS not reachable at {shown_nats(nats_url)}: {type(exc).__name__}"
            raise DemoError(message, EXIT_UNAVAILABLE) from None
        raise


def worker_failure(procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Path], when: str) -> DemoError:
    """The first exited worker's error, from its log (which goes away with the demo's directory): its
    last ERROR line when it exited 3 or 4 (the demo exits with that code too), else its log's tail."""
    i, code = next((i, p.returncode) for i, p in enumerate(procs) if p.returncode is not None)
    lines = [line for line in logs[i].read_text(errors="replace").splitlines() if line.strip()]
    errors = [_LOGGER.sub("", line.split(" ERROR ", 1)[1]) for line in lines if " ERROR " in line]
    exit_code = code if code in (EXIT_CONFIG, EXIT_UNAVAILABLE) else EXIT_FAILURE
    if exit_code != EXIT_FAILURE and errors:
        return DemoError(f"worker {i} exited {code} {when}: {errors[-1]}", exit_code)
    tail = "\n".join(lines[-15:])
    return DemoError(f"worker {i} exited {code} {when}; the end of its log:\n{tail}", exit_code)


async def _run(options: DemoOptions, base: Path, dsn: str, nats_url: str, say: Callable[[str], None]) -> DemoSummary:
    sql = Sql.for_table("public", "outbox_demo")
    conn = await connect_db(dsn)
    try:
        await recreate_tables(conn, sql, options.partitions)
    finally:
        await conn.close()
    nc = await connect_nats(nats_url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(STREAM)
    say(f"servers up: postgres {shown_dsn(dsn)}, nats {shown_nats(nats_url)}; starting {options.workers} workers")
    logs = [base / f"worker-{i}.log" for i in range(options.workers)]
    procs = [
        start_worker(worker_env(dsn, nats_url, sql.table, options.worker_env, f"demo-worker-{i}"), log)
        for i, log in enumerate(logs)
    ]
    codes: list[int] = []
    producer: asyncio.Task[ProducerResult] | None = None
    try:
        took = await workers_ready(dsn, sql, PUBLISHER, options.partitions, procs, logs)
        say(f"workers ready after {took:.1f}s, every partition leased; producing {options.events:,} events")
        plan = ProducerPlan(events=options.events, aggregates=options.aggregates)
        progress = ProducerResult()
        started = time.time()
        producer = asyncio.create_task(produce(dsn, sql, plan, progress))
        js = nc.jetstream()
        deadline = time.monotonic() + options.timeout
        stored = 0
        while True:
            await asyncio.sleep(1.0)
            if any(p.poll() is not None for p in procs):
                raise worker_failure(procs, logs, "while the demo ran")
            try:
                stored = (await js.stream_info(STREAM)).state.messages
            except Exception:
                if nc.is_closed:  # reconnecting gave up
                    raise DemoError(f"lost NATS at {shown_nats(nats_url)}", EXIT_UNAVAILABLE) from None
                stored = 0
            say(
                f"  committed {progress.committed:>8,}  rolled back {progress.rolled_back:>7,}  "
                f"in stream {stored:>8,}  ({time.time() - started:5.1f}s)"
            )
            if producer.done():
                producer.result()
                if stored >= progress.committed:
                    break
            if time.monotonic() > deadline:
                say("timeout: stopping before the backlog drained")
                break
        finished = time.time()
    finally:
        if producer is not None and not producer.done():  # interrupted: stop writing before the servers stop
            producer.cancel()
            await asyncio.wait({producer}, timeout=10)
        codes = stop_workers(procs)
        await nc.close()
    say("workers stopped; reading the stream back and checking it against the ledger")
    report, latencies, clock, last_stored = await _verify(dsn, sql, nats_url, progress)
    span = max(1e-6, (last_stored or finished) - (progress.first_commit or started))
    p50_ms, p99_ms = latency_percentiles_ms(latencies)
    return DemoSummary(
        events=report.events,
        published=report.published,
        lost=report.lost,
        duplicates=report.duplicates,
        order_violations=report.order_violations,
        events_per_s=round(report.published / span, 1),
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        latency_clock=clock,
        unexpected=report.unexpected,
        pending=report.pending,
        rolled_back=progress.rolled_back,
        workers=options.workers,
        worker_exit_codes=codes,
        seconds=round(finished - started, 2),
    )


async def _verify(
    dsn: str, sql: Sql, nats_url: str, progress: ProducerResult
) -> tuple[HistoryReport, list[float], str, float]:
    """The history check, the commit-to-stored latencies with the clock they start from, and the
    time the stream stored its last event."""
    conn = await asyncpg.connect(dsn)
    try:
        committed, pending, dead = await read_truth(conn, sql)
    finally:
        await conn.close()
    stored = await read_stream(nats_url, STREAM)
    report = check_history(committed, stored, pending, dead)
    commit_times = await ledger_commit_times(dsn, sql)
    clock = LATENCY_CLOCK_COMMIT if commit_times else LATENCY_CLOCK_RETURNED
    latencies = commit_latencies(stored, commit_times or progress.commit_times)
    last = max((m.stored_at for m in stored), default=0.0)
    return report, latencies, clock, last


def log_tails(logs: Sequence[Path]) -> str:
    """The last lines of each of ``logs`` under its name (the logs go away with the temporary directory)."""
    out = []
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        out.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(out)
