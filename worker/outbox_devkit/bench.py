"""``outboxctl bench``: how fast the relay is, at what latency, against which baselines, verified.

Every scenario runs on real servers (embedded PostgreSQL and NATS by default, the same as
``outboxctl demo``), with worker *processes* started exactly like the demo's (``OUTBOX_*``
environment, SIGTERM to stop), a file-storage stream, ``Nats-Msg-Id`` on and per-aggregate ordering
on. Each run uses a fresh table and a fresh stream and ends by reading the stream back and checking
it against the ledger the producers wrote in their own transactions (0 lost, 0 duplicates, 0 order
violations, or the run is reported as failed).

Scenarios (``--scenario``; docs/benchmarks.md says what each number means):

- ``seed``: the seed's four pressure levels (500, 2,000, 5,000, 10,000 events over N/10 aggregates
  clamped to 50..1,000, 5 topics), produced live while one worker relays; commit → ack latency.
- ``sustained``: a backlog (200,000 events over 10,000 aggregates) committed at once, drained by one
  worker process and by two; events/s, CPU seconds per 1,000 events, peak RSS per worker.
- ``baselines``: a naive relay (one event in flight, one mark per event) and the publish ceiling
  (the project's publisher, no database), on the same servers.
- ``latency``: steady offered load of 1,000 and 5,000 events/s; p50/p99 commit → ack; idle CPU.
- ``growth``: claim time per batch with 1,000,000 published rows in the table (mark mode) vs none;
  with ``--growth-10m`` also with 10,000,000 (writing them takes minutes, so it is not the default).
- ``hot``: one hot aggregate (every event in one aggregate: one publish in flight at a time).
- ``commit-rate``: one event per transaction from 8 connections at 500, 1,000 and 5,000 commits/s
  (or the rates of ``--commit-rates``), one worker; worker CPU (cores and µs per event, from /proc
  utime+stime), PostgreSQL's and nats-server's CPU (cores), p50/p99 commit → ack.
- ``scale-up``: a backlog (200,000 events) with one worker; a second worker starts when a quarter
  is stored, a third at half; the longest time any partition had no live owner (lease table
  sampled every ~5 ms) and events/s per phase. Beside it, the same backlog drained by one worker
  and by two started together (workers started after the backlog committed).
- ``replicated``: the ``sustained`` drain (same backlog, one worker process and two) on an embedded
  3-node nats-server cluster, the bench stream with 3 replicas on file storage, the workers given all
  three URLs; events/s and CPU seconds per 1,000 events of the workers, PostgreSQL and each
  nats-server (``nats_n1``.. and their sum ``nats``). It always starts its own cluster (``--nats-url``
  does not apply) and stops it when it ends, also on failure.

Latency runs from the producer's commit (PostgreSQL's commit timestamp of the transaction that wrote
the outbox row and its ledger row; the producer's clock after COMMIT returned when commit timestamps
are off) to the stream's stored timestamp of the message (the server's clock, same machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from nats import errors as nats_errors
from nats.js import errors as js_errors

from outbox_common.settings import WorkerSettings
from outbox_devkit.baselines import EVENT_TYPES, synthetic_truth
from outbox_devkit.benchstats import (
    COMMIT_RATES,
    SCENARIOS,
    SEED_LEVELS,
    Row,
    build_report,
    percentile,
    poll_pause,
    seed_aggregates,
)
from outbox_devkit.demo import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    DemoError,
    DemoOptions,
    connect_db,
    connect_nats,
    log_tails,
    recreate_tables,
    servers,
    shown_dsn,
    shown_nats,
    start_worker,
    stop_workers,
    worker_env,
    worker_failure,
    workers_ready,
)
from outbox_devkit.embedded import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres, children_of
from outbox_devkit.producers import (
    LATENCY_CLOCK_COMMIT,
    LATENCY_CLOCK_RETURNED,
    ProducerPlan,
    ProducerResult,
    commit_latencies,
    ledger_commit_times,
    produce,
)
from outbox_worker.adapters.history_io import read_stream, read_truth
from outbox_worker.adapters.publisher import ClientErrors, jetstream_denied_error, jetstream_off_error
from outbox_worker.adapters.store import Fence, OutboxStore, connect_pool
from outbox_worker.core.history import HistoryReport, StoredEvent, check_history
from outbox_worker.core.sql import DEFAULT_PARTITIONS, Sql

DB_SCHEMA = "outbox_bench"  # bench tables live here; each run drops and recreates its own table
STREAM = "OUTBOX_BENCH"
SUBJECT_TEMPLATE = "bench.{aggregate_type}.{event_type}"  # 5 event types: 5 subjects ("topics")
PUBLISHER = "bench"
AGGREGATES = 10_000

SUSTAINED_EVENTS = 200_000
NAIVE_EVENTS = 20_000
HOT_EVENTS = 20_000
LATENCY_RATES = (1_000, 5_000)
LATENCY_SECONDS = 20.0
IDLE_SECONDS = 15.0
GROWTH_HISTORY = 1_000_000
GROWTH_HISTORY_LARGE = 10_000_000  # --growth-10m
GROWTH_BATCHES = 30
COMMIT_RATE_SECONDS = 20.0
SCALE_UP_EVENTS = 200_000
SCALE_UP_JOINS = (0.25, 0.5)  # share of the backlog stored when the second and the third worker start
SCALE_UP_WORKERS = 1 + len(SCALE_UP_JOINS)  # the most workers of any scenario, each with a partition of its own
LEASE_SAMPLE_SECONDS = 0.005
CLUSTER_MEMBER_PREFIX = "nats_"  # server CPU names of the replicated scenario's cluster members: nats_n1, ...
BATCH = 1000


@dataclass
class BenchOptions:
    scenarios: Sequence[str] = SCENARIOS
    repeat: int = 3
    scale: float = 1.0  # multiplies event counts and durations (the smoke test uses ~0.01)
    partitions: int = DEFAULT_PARTITIONS
    database_url: str = ""
    nats_url: str = ""
    worker_env: dict[str, str] = field(default_factory=dict)  # OUTBOX_* overrides for every worker
    growth_large: bool = False  # growth also with GROWTH_HISTORY_LARGE published rows
    commit_rates: tuple[int, ...] = COMMIT_RATES  # commits/s offered by `commit-rate`, one row each
    progress: Callable[[str], None] | None = None

    def n(self, count: int, minimum: int = 100) -> int:
        return max(minimum, int(count * self.scale))

    def seconds(self, s: float, minimum: float = 2.0) -> float:
        return max(minimum, s * self.scale)


class BenchError(DemoError):
    """A run could not complete (a worker died, a wait timed out): ``outboxctl bench`` exits 1, or the
    code given (3 configuration, 4 a server not reachable), like the demo."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message, exit_code)


@contextlib.asynccontextmanager
async def bench_servers(options: BenchOptions, base: Path) -> AsyncIterator[tuple[str, str, dict[str, int]]]:
    """Like the demo's servers, except that an embedded PostgreSQL pays for durable commits
    (fsync on) and records commit timestamps (the latency clock starts at the real commit).
    Yields (dsn, nats url, pids of the embedded servers: ``postgres`` (the postmaster), ``nats``)."""
    with contextlib.ExitStack() as stack:
        dsn, pids = options.database_url, {}
        if not dsn:
            pg = EmbeddedPostgres(fsync=True, track_commit_timestamp=True)
            stack.callback(pg.cleanup)
            pg.start()
            dsn, pids["postgres"] = pg.dsn, pg.pid or 0
        with servers(DemoOptions(database_url=dsn, nats_url=options.nats_url), base) as (dsn, url, more):
            yield dsn, url, {k: v for k, v in (pids | more).items() if v}


async def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run the chosen scenarios ``options.repeat`` times each; return the JSON report."""
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        base = Path(tmp)
        load_before = os.getloadavg()
        async with bench_servers(options, base) as (dsn, nats_url, server_pids):
            bench = _Bench(options, base, dsn, nats_url.split(","), server_pids)
            await bench.check_servers()
            rows = await bench.run()
            machine = await bench.machine()
            machine["latency_clock"] = bench.latency_clock
            machine["checkpoint_before_each_run"] = bench.checkpoints
        # Other work on the machine skews every number here; the load average says how much there was.
        machine["loadavg_before"] = [round(x, 2) for x in load_before]
        machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    config = {
        "repeat": options.repeat,
        "scale": options.scale,
        "scenarios": list(options.scenarios),
        "partitions": options.partitions,
        "aggregates": AGGREGATES,
        "commit_rates": list(options.commit_rates),
        "embedded_servers": {"postgres": not options.database_url, "nats": not options.nats_url},
        "worker": worker_config(options.worker_env),
    }
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return build_report(rows, machine=machine, config=config, created_at=created)


def worker_config(overrides: dict[str, str]) -> dict[str, Any]:
    """The settings of the bench's workers that shape its figures, with the ``OUTBOX_*`` ``overrides``
    (``--worker-env``); pydantic's ValidationError when the workers would refuse one."""
    s = WorkerSettings.model_validate(
        {"database_url": "postgresql://placeholder/db"}
        | {k.removeprefix("OUTBOX_").lower(): v for k, v in overrides.items()}
    )
    keys = ("batch_size", "loops", "max_in_flight", "ordering", "mark_mode", "poll_interval_seconds")
    return {k: (v.value if hasattr(v, "value") else v) for k in keys for v in [getattr(s, k)]}


# --- process helpers (Linux /proc) ----------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children, live (their own and their reaped children's) and
    already reaped (PostgreSQL forks a backend per connection)."""
    total = 0.0
    for p in [pid, *children_of(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing: its time is now in its parent's reaped children
            continue
        total += sum(int(x) for x in fields[11:15]) / _TICKS
    return total


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def host_cpu() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine so far: busy share = 1 - Δidle/Δall."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[0] - before[0]
    return 100.0 * (total - (after[1] - before[1])) / total if total > 0 else 0.0


@dataclass
class _Procs:
    procs: list[subprocess.Popen[bytes]]
    outs: list[Path]
    logs: list[Path]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def add(self, more: _Procs) -> None:
        """Take over ``more``'s processes (workers started later in the same run)."""
        self.procs += more.procs
        self.outs += more.outs
        self.logs += more.logs

    def check_alive(self) -> None:
        """DemoError with the worker's own error and exit code when one has exited (:func:`worker_failure`)."""
        if any(p.poll() is not None for p in self.procs):
            raise worker_failure(self.procs, self.logs, "while the bench ran")

    def stop(self) -> tuple[list[int], list[dict[str, Any]]]:
        codes = stop_workers(self.procs)
        results = []
        for out in self.outs:
            try:
                results.append(json.loads(out.read_text()))
            except (OSError, ValueError):
                results.append({})
        return codes, results


@dataclass
class _LeaseGaps:
    """Samples a table's lease rows every :data:`LEASE_SAMPLE_SECONDS` and records how long each
    partition was without a live owner (no worker may publish it then). A gap shorter than one
    sample may go unseen."""

    dsn: str
    sql: Sql
    unowned_since: dict[int, float] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)
    samples: int = 0

    async def run(self) -> None:
        conn = await connect_db(self.dsn)
        try:
            while True:
                rows = await conn.fetch(self.sql.lease_table, PUBLISHER)
                now = time.monotonic()
                for r in rows:
                    if not (r["owner"] and r["live"]):
                        self.unowned_since.setdefault(r["partition"], now)
                    elif r["partition"] in self.unowned_since:
                        self.gaps.append(now - self.unowned_since.pop(r["partition"]))
                self.samples += 1
                await asyncio.sleep(LEASE_SAMPLE_SECONDS)
        finally:
            await conn.close()

    def longest(self) -> float:
        """Longest gap seen, counting a gap still open as lasting until now."""
        now = time.monotonic()
        return max([*self.gaps, *(now - t for t in self.unowned_since.values()), 0.0])


# --- the bench ------------------------------------------------------------------------------------
class _Bench:
    def __init__(
        self,
        options: BenchOptions,
        base: Path,
        dsn: str,
        nats_urls: list[str],
        server_pids: dict[str, int] | None = None,
        *,
        stream_replicas: int | None = None,
    ) -> None:
        self.o = options
        self.server_pids = server_pids or {}  # embedded servers only: their CPU is reported per run
        self.base = base
        self.dsn = dsn
        self.urls = nats_urls  # workers and the bench's own clients are given all of them
        self.stream_replicas = stream_replicas  # set: the workers create the stream with this many replicas
        self.say = options.progress or (lambda _m: None)
        self._seq = 0
        self.latency_clock = ""
        self.checkpoints = True  # False once PostgreSQL refused a CHECKPOINT (see _checkpoint)

    async def check_servers(self) -> None:
        """Before the first scenario: PostgreSQL takes the bench's credentials, and NATS too (over TLS
        for a ``tls://`` URL) with a JetStream API the user may use, else DemoError within seconds
        (exit 3 or 4, one line). The ``replicated`` scenario runs on a cluster of its own, so NATS is
        not asked when it is the only one."""
        conn = await connect_db(self.dsn)
        await conn.close()
        nats = "a cluster of its own (replicated)"
        if any(s != "replicated" for s in self.o.scenarios):
            await self._delete_stream()
            nats = shown_nats(self.urls)
        self.say(f"servers: postgres {shown_dsn(self.dsn)}, nats {nats}")

    async def run(self) -> list[Row]:
        rows: list[Row] = []
        o = self.o
        runners: dict[str, Callable[[], Any]] = {
            "seed": self._seed,
            "sustained": self._sustained,
            "baselines": self._baselines,
            "latency": self._latency,
            "growth": self._growth,
            "hot": self._hot,
            "commit-rate": self._commit_rate,
            "scale-up": self._scale_up,
            "replicated": self._replicated,
        }
        for name in SCENARIOS:
            if name in o.scenarios:
                self.say(f"== {name}")
                rows.extend(await runners[name]())
        return rows

    async def machine(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "memory_gb": _mem_gb(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        }
        for dist in ("nats-py", "asyncpg"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                info[dist] = importlib.metadata.version(dist)
        with contextlib.suppress(Exception):
            conn = await connect_db(self.dsn)
            try:
                info["postgres"] = await conn.fetchval("SHOW server_version")
            finally:
                await conn.close()
        with contextlib.suppress(Exception):
            nc = await connect_nats(self.urls)
            info["nats_server"] = nc._server_info.get("version", "")
            await nc.close()
        return info

    # --- scenarios ----------------------------------------------------------------------------------
    async def _seed(self) -> list[Row]:
        out = []
        for level in SEED_LEVELS:
            events = self.o.n(level, minimum=50)
            aggs = seed_aggregates(events)
            row = Row(f"seed/{level}", "seed")
            for i in range(self.o.repeat):
                plan = ProducerPlan(
                    events=events,
                    aggregates=aggs,
                    producers=min(aggs, 50),
                    events_per_tx=1,
                    rollback_ratio=0.0,
                    slow_tx_ratio=0.0,
                )
                run = await self._live_run("seed", plan, workers=1)
                run["aggregates"] = aggs
                run["level"] = level
                self._add(row, run, f"seed {events} events, run {i + 1}")
            out.append(row)
        return out

    async def _sustained(self) -> list[Row]:
        return await self._drain_rows("sustained")

    async def _replicated(self) -> list[Row]:
        """The sustained drain on an embedded JetStream cluster, its stream replicated on every member.
        The cluster is stopped and its directories removed when the scenario ends, also on failure."""
        cluster = EmbeddedNatsCluster(EmbeddedNats, base_dir=self.base / "nats-cluster")
        try:
            await asyncio.to_thread(cluster.start)
            on_cluster = self._on_cluster(cluster)
            rows = await on_cluster._drain_rows(
                "replicated", note=f"{len(cluster.servers)}-node cluster, stream replicated on each, file storage"
            )
            self.checkpoints = on_cluster.checkpoints
            return rows
        finally:
            await asyncio.to_thread(cluster.cleanup)

    def _on_cluster(self, cluster: EmbeddedNatsCluster[EmbeddedNats]) -> _Bench:
        """This bench (options, database) against ``cluster`` instead of its own NATS: workers get
        every member's URL and create the stream with one replica per member; each member's CPU is
        measured as ``nats_<member>``. Its files go to a directory of their own under this one's."""
        pids = {name: pid for name, pid in self.server_pids.items() if name != "nats"}
        pids |= {f"{CLUSTER_MEMBER_PREFIX}{name}": pid for name, pid in cluster.pids.items()}
        base = self.base / "replicated"
        base.mkdir(exist_ok=True)
        bench = _Bench(self.o, base, self.dsn, cluster.urls, pids, stream_replicas=len(cluster.servers))
        bench.checkpoints = self.checkpoints
        return bench

    async def _hot(self) -> list[Row]:
        row = Row("hot-aggregate", "hot", note="every event in one aggregate: one publish in flight at a time")
        for i in range(self.o.repeat):
            run = await self._drain_run("hot", self.o.n(HOT_EVENTS), 1, 1)
            self._add(row, run, f"hot aggregate run {i + 1}")
        return [row]

    async def _drain_rows(self, scenario: str, note: str = "") -> list[Row]:
        """Rows ``<scenario>/1-worker`` and ``<scenario>/2-workers``: :data:`SUSTAINED_EVENTS` over
        :data:`AGGREGATES` committed at once and drained (:meth:`_drain_run`), ``repeat`` times each."""
        out = []
        for workers in (1, 2):
            name = f"{scenario}/1-worker" if workers == 1 else f"{scenario}/2-workers"
            row = Row(name, scenario, note=note)
            for i in range(self.o.repeat):
                run = await self._drain_run(scenario, self.o.n(SUSTAINED_EVENTS), AGGREGATES, workers)
                self._add(row, run, f"{name} run {i + 1}")
            out.append(row)
        return out

    async def _baselines(self) -> list[Row]:
        naive = Row("baseline/naive", "baselines", note="publish one, await its ack, delete it, next")
        ceiling = Row("baseline/ceiling", "baselines", note="the project's publisher, no database")
        for i in range(self.o.repeat):
            self._add(naive, await self._naive_run(self.o.n(NAIVE_EVENTS)), f"naive run {i + 1}")
            self._add(ceiling, await self._ceiling_run(self.o.n(SUSTAINED_EVENTS)), f"ceiling run {i + 1}")
        return [naive, ceiling]

    async def _latency(self) -> list[Row]:
        out = await self._steady_load("latency", LATENCY_RATES, LATENCY_SECONDS, events_per_tx=5)
        idle = Row("idle/1-worker", "latency", note="a worker with no events arriving")
        for i in range(self.o.repeat):
            self._add(idle, await self._idle_run(), f"idle run {i + 1}")
        out.append(idle)
        return out

    async def _growth(self) -> list[Row]:
        batches = max(3, int(GROWTH_BATCHES * min(1.0, self.o.scale * 10)))
        empty = Row("growth/empty", "growth")
        tables: list[tuple[Row, Sql, int]] = [(empty, await self._fresh("growth_empty"), 0)]
        sizes = (GROWTH_HISTORY, GROWTH_HISTORY_LARGE) if self.o.growth_large else (GROWTH_HISTORY,)
        for size in sizes:
            history = self.o.n(size, minimum=1000)
            row = Row(f"growth/{_short(size)}-history", "growth", note=f"{history:,} published rows")
            sql = await self._fresh(f"growth_history_{_short(size).lower()}")
            self.say(f"  writing {history:,} published rows of history")
            await self._write_history(sql, history)
            tables.append((row, sql, history))
        for i in range(self.o.repeat):
            for row, sql, hist in tables:
                run = await self._claim_run(sql, batches)
                run["history_rows"] = hist
                self._add(row, run, f"{row.name} run {i + 1}")
        return [row for row, _, _ in tables]

    async def _commit_rate(self) -> list[Row]:
        return await self._steady_load(
            "commit-rate",
            self.o.commit_rates,
            COMMIT_RATE_SECONDS,
            events_per_tx=1,
            note="one event per transaction, 8 connections",
        )

    async def _steady_load(
        self, scenario: str, rates: tuple[int, ...], seconds: float, *, events_per_tx: int, note: str = ""
    ) -> list[Row]:
        """One row per offered rate: 8 producers commit ``events_per_tx`` events per transaction at
        that rate for ``seconds`` (times --scale) while one worker relays them."""
        out = []
        for rate in rates:
            row = Row(f"{scenario}/{rate}-per-s", scenario, note=note)
            for i in range(self.o.repeat):
                plan = ProducerPlan(
                    events=max(100, int(rate * self.o.seconds(seconds))),
                    aggregates=AGGREGATES,
                    producers=8,
                    events_per_tx=events_per_tx,
                    rollback_ratio=0.0,
                    slow_tx_ratio=0.0,
                    rate_per_s=rate,
                )
                run = await self._live_run(scenario.replace("-", "_"), plan, workers=1)
                run["offered_per_s"] = rate
                self._add(row, run, f"{scenario} {rate}/s run {i + 1}")
            out.append(row)
        return out

    async def _scale_up(self) -> list[Row]:
        events = self.o.n(SCALE_UP_EVENTS)
        joins = " and ".join(f"{share:.0%}" for share in SCALE_UP_JOINS)
        row = Row(
            "scale-up/1-2-3-workers", "scale-up", note=f"{events:,} backlog; workers 2 and 3 join at {joins} stored"
        )
        alone = Row("backlog-drain/1-worker", "scale-up", note="worker started after the backlog committed")
        together = Row("backlog-drain/2-workers-together", "scale-up", note="both started after the backlog committed")
        for i in range(self.o.repeat):
            self._add(row, await self._scale_up_run(events), f"scale-up run {i + 1}")
            self._add(alone, await self._backlog_drain_run(events, 1), f"backlog drain, 1 worker, run {i + 1}")
            self._add(together, await self._backlog_drain_run(events, 2), f"backlog drain, 2 workers, run {i + 1}")
        return [row, alone, together]

    # --- one run of each kind -------------------------------------------------------------------------
    async def _scale_up_run(self, events: int) -> dict[str, Any]:
        """One worker on a backlog; more join at fixed shares of it stored (:data:`SCALE_UP_JOINS`)."""
        sql = await self._fresh("scale_up")
        await self._bulk_seed(sql, events, AGGREGATES)
        started = time.time()
        procs = self._start_workers(sql, 1)
        gaps = _LeaseGaps(self.dsn, sql)
        gap_task: asyncio.Task[None] | None = None
        joined_at = [started]
        try:
            await self._wait_leases(sql, procs)
            gap_task = asyncio.create_task(gaps.run())
            for share in SCALE_UP_JOINS:
                await self._wait_stored(int(events * share), procs, timeout=max(120.0, events / 500))
                joined_at.append(time.time())
                procs.add(self._start_workers(sql, 1))
            await self._wait_stored(events, procs, timeout=max(120.0, events / 500))
            # Every worker up and holding its share (a worker stopped while starting exits by SIGTERM).
            await self._wait_leases(sql, procs)
            await self._wait_marked(sql, procs)
        finally:
            if gap_task is not None:
                gap_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gap_task
            codes, probes = procs.stop()
        report, stored = await self._verify(sql)
        ends = [*joined_at[1:], max((m.stored_at for m in stored), default=time.time())]
        phases = {
            f"phase{n}_events_per_s": sum(1 for m in stored if a <= m.stored_at < b) / max(1e-6, b - a)
            for n, (a, b) in enumerate(zip(joined_at, ends, strict=True), start=1)
        }
        return {
            "events": events,
            "events_per_s": report.published / max(1e-6, ends[-1] - started),
            **phases,
            "max_unowned_ms": gaps.longest() * 1000,
            "handovers_seen": len(gaps.gaps),
            "lease_samples": gaps.samples,
            "tasks_left": sum(p.get("tasks_left", 0) for p in probes),
            "exit_codes": codes,
            "_logs": procs.logs,
            "_report": report,
        }

    async def _backlog_drain_run(self, events: int, workers: int) -> dict[str, Any]:
        """A committed backlog, then ``workers`` started together; events/s from their start."""
        sql = await self._fresh("backlog")
        await self._bulk_seed(sql, events, AGGREGATES)
        started = time.time()
        procs = self._start_workers(sql, workers)
        try:
            await self._wait_stored(events, procs, timeout=max(120.0, events / 500))
            await self._wait_marked(sql, procs)
        finally:
            codes, probes = procs.stop()
        report, stored = await self._verify(sql)
        last = max((m.stored_at for m in stored), default=time.time())
        return {
            "events": events,
            "events_per_s": report.published / max(1e-6, last - started),
            "tasks_left": sum(p.get("tasks_left", 0) for p in probes),
            "exit_codes": codes,
            "_logs": procs.logs,
            "_report": report,
        }

    async def _drain_run(self, table: str, events: int, aggregates: int, workers: int) -> dict[str, Any]:
        """Workers ready on an empty table; ``events`` rows committed in one transaction; drained."""
        sql = await self._fresh(table)
        procs = self._start_workers(sql, workers)
        wal_conn: asyncpg.Connection | None = None
        try:
            wal_conn = await connect_db(self.dsn)
            await self._wait_leases(sql, procs)
            cpu0 = procs.cpu()
            committed_at = await self._bulk_seed(sql, events, aggregates)
            host0, servers0 = host_cpu(), self._server_cpu()
            wal0 = await _wal_so_far(wal_conn)
            await self._wait_stored(events, procs, timeout=max(120.0, events / 500))
            cpu1, host1, servers1 = procs.cpu(), host_cpu(), self._server_cpu()
            wal1 = await _wal_so_far(wal_conn)
            rss = [peak_rss_mb(pid) for pid in procs.pids]
            await self._wait_marked(sql, procs)
        finally:
            codes, probes = procs.stop()
            if wal_conn is not None:
                await wal_conn.close()
        report, stored = await self._verify(sql)
        last = max((m.stored_at for m in stored), default=committed_at)
        cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
        return {
            "events": events,
            "events_per_s": report.published / max(1e-6, last - committed_at),
            "cpu_s_per_1k": cpu / (events / 1000),
            **_server_cpu_per_1k(servers0, servers1, events),
            "stream_replicas": await self._stream_replicas(),
            "peak_rss_mb": max(rss),
            "peak_rss_mb_per_worker": rss,
            "tasks_left": sum(p.get("tasks_left", 0) for p in probes),
            "host_busy_percent": busy_percent(host0, host1),
            **_wal_written(wal0, wal1),
            "exit_codes": codes,
            "_logs": procs.logs,
            "_report": report,
        }

    async def _live_run(self, table: str, plan: ProducerPlan, workers: int) -> dict[str, Any]:
        """Workers ready; producers commit ``plan.events`` while the workers relay."""
        sql = await self._fresh(table)
        procs = self._start_workers(sql, workers)
        progress = ProducerResult()
        try:
            await self._wait_leases(sql, procs)
            cpu0, t0, host0, servers0 = procs.cpu(), time.monotonic(), host_cpu(), self._server_cpu()
            producer = asyncio.create_task(produce(self.dsn, sql, plan, progress))
            try:
                await self._wait_stored(plan.events, procs, timeout=max(120.0, plan.events / 200), producer=producer)
            finally:
                if not producer.done():
                    producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
            cpu1, t1, host1, servers1 = procs.cpu(), time.monotonic(), host_cpu(), self._server_cpu()
            await self._wait_marked(sql, procs)
        finally:
            codes, probes = procs.stop()
        report, stored = await self._verify(sql)
        worker_cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
        commit_times = await self._commit_times(sql) or progress.commit_times
        latencies = commit_latencies(stored, commit_times)
        returned = commit_latencies(stored, progress.commit_times)  # from COMMIT returned: a lower bound
        last = max((m.stored_at for m in stored), default=progress.last_commit)
        first_commit = min(commit_times.values(), default=progress.first_commit)
        return {
            "events": report.events,
            "events_per_s": report.published / max(1e-6, last - first_commit),
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies, default=0.0) * 1000,
            "p50_ms_after_commit_returned": percentile(returned, 0.50) * 1000,
            "p99_ms_after_commit_returned": percentile(returned, 0.99) * 1000,
            "success_rate": report.published / max(1, report.events),
            "cpu_percent": 100 * worker_cpu / max(1e-6, t1 - t0),
            "worker_cores": worker_cpu / max(1e-6, t1 - t0),
            "cpu_us_per_event": worker_cpu * 1e6 / max(1, report.published),
            **{f"{name}_cores": (servers1[name] - servers0[name]) / max(1e-6, t1 - t0) for name in servers0},
            "tasks_left": sum(p.get("tasks_left", 0) for p in probes),
            "host_busy_percent": busy_percent(host0, host1),
            "exit_codes": codes,
            "_logs": procs.logs,
            "_report": report,
        }

    async def _idle_run(self) -> dict[str, Any]:
        sql = await self._fresh("idle")
        procs = self._start_workers(sql, 1)
        try:
            await self._wait_leases(sql, procs)
            await asyncio.sleep(2.0)  # past start-up
            seconds = self.o.seconds(IDLE_SECONDS)
            cpu0, t0, host0 = procs.cpu(), time.monotonic(), host_cpu()
            await asyncio.sleep(seconds)
            cpu1, t1, host1 = procs.cpu(), time.monotonic(), host_cpu()
            procs.check_alive()
        finally:
            codes, probes = procs.stop()
        return {
            "cpu_percent": 100 * (cpu1[0] - cpu0[0]) / (t1 - t0),
            "seconds": t1 - t0,
            "tasks_left": sum(p.get("tasks_left", 0) for p in probes),
            "host_busy_percent": busy_percent(host0, host1),
            "exit_codes": codes,
            "_logs": procs.logs,
        }

    async def _naive_run(self, events: int) -> dict[str, Any]:
        sql = await self._fresh("naive")
        await self._bulk_seed(sql, events, AGGREGATES)
        procs = self._start_child("naive", sql, events)
        result = await self._wait_child(procs, timeout=max(300.0, events / 100))
        report, _ = await self._verify(sql)
        return {
            "events": events,
            "events_per_s": result["published"] / max(1e-6, result["seconds"]),
            "_report": report,
        }

    def _server_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each embedded server (PostgreSQL with its backends)."""
        return {name: tree_cpu_seconds(pid) for name, pid in self.server_pids.items()}

    async def _ceiling_run(self, events: int) -> dict[str, Any]:
        sql = await self._fresh("ceiling")  # only for the settings; the ceiling never touches it
        servers0 = self._server_cpu()
        procs = self._start_child("ceiling", sql, events, AGGREGATES)
        result = await self._wait_child(procs, timeout=max(300.0, events / 1000))
        servers1 = self._server_cpu()
        stored = await read_stream(self.urls, STREAM)
        report = check_history(synthetic_truth(events, AGGREGATES), stored)
        return {
            "events": events,
            "events_per_s": result["published"] / max(1e-6, result["seconds"]),
            "cpu_s_per_1k": result.get("cpu_seconds", 0.0) / (events / 1000),
            "nats_cpu_s_per_1k": (servers1["nats"] - servers0["nats"]) / (events / 1000)
            if "nats" in servers0
            else None,
            "peak_rss_mb": result.get("peak_rss_mb"),
            "_report": report,
        }

    async def _claim_run(self, sql: Sql, batches: int) -> dict[str, Any]:
        """Add ``batches`` full batches of pending rows, then claim and mark (mark mode) them batch by
        batch, timing each claim statement; remove them again so every run starts from the same
        table. First through the worker's own pool (generic plans, see store.connect_pool), then
        with PostgreSQL's default plan choice (``claim_auto_*``: custom plans for the first five
        executions of a prepared statement), for comparison."""
        out: dict[str, Any] = {"batch": BATCH}
        for label in ("", "auto_"):
            if label:
                pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
            else:
                pool = await connect_pool(self.dsn, size=2)
            assert pool is not None
            try:
                watermark = int(await pool.fetchval(f"SELECT COALESCE(max(id), 0) FROM {sql.outbox}"))
                await self._bulk_seed(sql, batches * BATCH, AGGREGATES, ledger=False)
                store = OutboxStore(pool, sql, PUBLISHER, "growth")
                partitions = await store.check_schema()
                await pool.execute(f"UPDATE {sql.leases} SET owner = NULL, expires_at = now()")
                fence = Fence.of(await store.acquire(partitions, 60))
                times = []
                while True:
                    t0 = time.perf_counter()
                    rows = (await store.claim(fence.partitions, BATCH, True)).rows
                    if not rows:
                        break
                    times.append(time.perf_counter() - t0)
                    await store.mark_done(fence, [r.id for r in rows], delete=False)
                await pool.execute(f"DELETE FROM {sql.outbox} WHERE id > $1", watermark)
                await pool.execute(f"VACUUM ANALYZE {sql.outbox}")
            finally:
                await pool.close()
            out[f"claim_{label}ms_p50"] = percentile(times, 0.5) * 1000
            out[f"claim_{label}ms_p99"] = percentile(times, 0.99) * 1000
        return out

    # --- building blocks --------------------------------------------------------------------------------
    def _add(self, row: Row, run: dict[str, Any], label: str) -> None:
        report: HistoryReport | None = run.pop("_report", None)
        codes = run.pop("exit_codes", [])
        logs: list[Path] = run.pop("_logs", [])
        metrics = {k: v for k, v in run.items() if isinstance(v, int | float) or v is None}
        row.runs.append(metrics)
        if report is not None:
            row.checks.append(
                {
                    "lost": report.lost,
                    "duplicates": report.duplicates,
                    "order_violations": report.order_violations,
                    "unexpected": report.unexpected,
                    "pending": report.pending,
                }
            )
        if any(codes):
            raise BenchError(f"{label}: a worker exited with {codes}; the end of their logs:\n{log_tails(logs)}")
        shown = ", ".join(f"{k} {_short_num(v)}" for k, v in metrics.items() if not k.endswith("per_worker"))
        verdict = "" if report is None else ("  verified ok" if report.ok and not report.pending else "  CHECK FAILED")
        self.say(f"  {label}: {shown}{verdict}")

    async def _fresh(self, table: str) -> Sql:
        """Drop and recreate ``outbox_bench.<table>`` (+ ledger); delete the bench stream."""
        sql = Sql.for_table(DB_SCHEMA, table)
        conn = await connect_db(self.dsn)
        try:
            await recreate_tables(conn, sql, self.o.partitions)
            await self._checkpoint(conn)
        finally:
            await conn.close()
        await self._delete_stream()
        return sql

    async def _delete_stream(self, timeout: float = 30.0) -> None:
        """Delete the bench stream, if there. The bench's own JetStream request, so it says itself
        what keeps it from using JetStream: BenchError with exit 3 when JetStream is off for the
        user's account or the server's permissions deny the user its API (at once: the request would
        go unanswered until ``timeout``), exit 4 when the API does not answer within ``timeout`` (a
        replicated stream of a whole drain takes a cluster a while to remove)."""
        errors = ClientErrors()
        nc = await connect_nats(self.urls, errors)
        shown = shown_nats(self.urls)
        try:
            deleting = asyncio.ensure_future(nc.jetstream(timeout=timeout).delete_stream(STREAM))
            watched: set[asyncio.Future[Any]] = {deleting, errors.denied}
            try:
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not deleting.done():  # denied, or this wait was cancelled
                    deleting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await deleting
            if errors.denied.done():
                raise BenchError(f"{jetstream_denied_error(f'$JS.API.STREAM.DELETE.{STREAM}')} ({shown})", EXIT_CONFIG)
            with contextlib.suppress(js_errors.NotFoundError):
                deleting.result()
        except (nats_errors.TimeoutError, js_errors.ServiceUnavailableError) as exc:
            off = jetstream_off_error(exc)
            if off is not None:
                raise BenchError(f"{off} ({shown})", EXIT_CONFIG) from None
            raise BenchError(
                f"the JetStream API of NATS at {shown} did not answer ({type(exc).__name__})", EXIT_UNAVAILABLE
            ) from None
        finally:
            await nc.close()

    async def _checkpoint(self, conn: asyncpg.Connection) -> None:
        """A CHECKPOINT before each run, so that no run pays for one that the others do not.

        Each drain's backlog writes ~146 MB of WAL in one transaction, and PostgreSQL requests a
        checkpoint once about half of ``max_wal_size`` has been written since the last one: with the
        default 1 GB, every fourth drain or so. That checkpoint's buffer writes, and a full-page
        image of each page the drain changed first after it, then fell into the next drain: ~39 MB
        of WAL instead of ~12, and 79.6-86.9k events/s against 84.9-93.2k for the drains beside it
        (docs/benchmarks.md). Needs superuser or ``pg_checkpoint``; without it the bench says so
        once, goes on, and the report's ``machine.checkpoint_before_each_run`` is false."""
        if not self.checkpoints:
            return
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            self.checkpoints = False
            self.say("  no CHECKPOINT privilege: runs may pay for PostgreSQL's checkpoints unevenly")

    def _env(self, sql: Sql, worker_id: str) -> dict[str, str]:
        extra = {
            "OUTBOX_DB_SCHEMA": DB_SCHEMA,
            "OUTBOX_STREAM": STREAM,
            "OUTBOX_PUBLISHER": PUBLISHER,
            "OUTBOX_SUBJECT_TEMPLATE": SUBJECT_TEMPLATE,
            "OUTBOX_POLL_INTERVAL_SECONDS": "1.0",  # the worker's default (demo polls faster)
        }
        forced = {"OUTBOX_STREAM_REPLICAS": str(self.stream_replicas)} if self.stream_replicas else {}
        return worker_env(self.dsn, ",".join(self.urls), sql.table, extra | self.o.worker_env | forced, worker_id)

    def _start_workers(self, sql: Sql, count: int) -> _Procs:
        self._seq += 1
        procs, outs, logs = [], [], []
        for i in range(count):
            out = self.base / f"run{self._seq}-worker{i}.json"
            log = self.base / f"run{self._seq}-worker{i}.log"
            env = self._env(sql, f"bench-{self._seq}-{i}")
            procs.append(start_worker(env, log, ("bench", "--child", "worker", "--child-out", str(out))))
            outs.append(out)
            logs.append(log)
        return _Procs(procs, outs, logs)

    def _start_child(self, kind: str, sql: Sql, events: int, aggregates: int = AGGREGATES) -> _Procs:
        self._seq += 1
        out = self.base / f"run{self._seq}-{kind}.json"
        log = self.base / f"run{self._seq}-{kind}.log"
        args = ["bench", "--child", kind, "--child-out", str(out), "--child-events", str(events)]
        args += ["--child-aggregates", str(aggregates)]
        proc = start_worker(self._env(sql, f"bench-{kind}"), log, args)
        return _Procs([proc], [out], [log])

    async def _wait_child(self, procs: _Procs, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        proc = procs.procs[0]
        while proc.poll() is None:
            if time.monotonic() > deadline:
                procs.stop()
                raise BenchError(f"{procs.logs[0].name} did not finish in {timeout:.0f}s")
            await asyncio.sleep(0.1)
        _, results = procs.stop()
        if proc.returncode != 0 or not results[0]:
            tail = "\n".join(procs.logs[0].read_text(errors="replace").splitlines()[-20:])
            raise BenchError(f"{procs.logs[0].name} failed (exit {proc.returncode}):\n{tail}")
        return results[0]

    async def _wait_leases(self, sql: Sql, procs: _Procs) -> None:
        """Until every worker holds its fair share of the partitions (and its loops can run), as the
        demo waits for its workers (:func:`workers_ready`): a worker that cannot start is reported with
        its own error and exit code; its start-up budget is shorter than this wait."""
        await workers_ready(self.dsn, sql, PUBLISHER, self.o.partitions, procs.procs, procs.logs)
        await asyncio.sleep(0.2)  # loops check the partitions out

    async def _bulk_seed(self, sql: Sql, events: int, aggregates: int, *, ledger: bool = True) -> float:
        """Commit ``events`` rows (and their ledger rows) in ONE transaction; return the commit time.

        Row i belongs to aggregate ``i % aggregates`` with version ``i // aggregates + 1`` (ids
        increase with the version), event type by version over 5 types, ~100-byte JSON payload and
        a ``traceparent`` user header, like the synthetic rows of the publish ceiling.
        """
        types = "ARRAY[" + ",".join(f"'{t}'" for t in EVENT_TYPES) + "]"
        select = (
            f"SELECT 'order', (g % $3)::text, ({types})[((g / $3 + 1) % 5) + 1], "
            "convert_to(json_build_object('aggregate', g % $3, 'version', g / $3 + 1, "
            "'pad', repeat('x', 40))::text, 'UTF8'), "
            "jsonb_build_object('traceparent', '00-' || md5(g::text) || '-' || left(md5((g + 1)::text), 16) || '-01') "
            "FROM generate_series($1::bigint, $2::bigint - 1) AS g ORDER BY g"
        )
        insert = f"INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload, headers) {select}"
        if ledger:
            stmt = (
                f"WITH ins AS ({insert} RETURNING id, event_id, aggregate_type, aggregate_id) "
                f'INSERT INTO "{sql.schema}"."{sql.table}_ledger" (event_id, aggregate, outbox_id) '
                "SELECT event_id, aggregate_type || '/' || aggregate_id, id FROM ins"
            )
        else:
            stmt = insert
        conn = await connect_db(self.dsn)
        try:
            async with conn.transaction():
                for lo in range(0, events, 50_000):
                    await conn.execute(stmt, lo, min(events, lo + 50_000), aggregates)
            return time.time()
        finally:
            await conn.close()

    async def _write_history(self, sql: Sql, rows: int) -> None:
        """``rows`` already-published rows (mark mode history), then VACUUM ANALYZE."""
        conn = await connect_db(self.dsn)
        try:
            for lo in range(0, rows, 100_000):
                await conn.execute(
                    f"INSERT INTO {sql.outbox} (aggregate_type, aggregate_id, event_type, payload, published_at) "
                    "SELECT 'order', (g % 10000)::text, 'created', convert_to(repeat('x', 100), 'UTF8'), now() "
                    "FROM generate_series($1::bigint, $2::bigint - 1) AS g",
                    lo,
                    min(rows, lo + 100_000),
                )
            await conn.execute(f"VACUUM ANALYZE {sql.outbox}")
        finally:
            await conn.close()

    async def _wait_stored(
        self, events: int, procs: _Procs, timeout: float, producer: asyncio.Task[ProducerResult] | None = None
    ) -> None:
        """Until the stream holds ``events`` messages (asked less often while many are still to come:
        :func:`poll_pause`)."""
        nc = await connect_nats(self.urls)
        js = nc.jetstream()
        start = time.monotonic()
        deadline = start + timeout
        try:
            while True:
                if producer is not None and producer.done():
                    producer.result()  # raise what the producer raised
                stored = 0
                with contextlib.suppress(js_errors.NotFoundError):
                    stored = (await js.stream_info(STREAM)).state.messages
                if stored >= events:
                    return
                procs.check_alive()
                now = time.monotonic()
                if now > deadline:
                    raise BenchError(f"the stream did not reach {events:,} messages within {timeout:.0f}s")
                await asyncio.sleep(poll_pause(events - stored, stored / max(1e-6, now - start)))
        finally:
            await nc.close()

    async def _wait_marked(self, sql: Sql, procs: _Procs, timeout: float = 60.0) -> None:
        """Until no row is pending (acked rows are deleted/marked after their ack)."""
        conn = await connect_db(self.dsn)
        deadline = time.monotonic() + timeout
        try:
            while await conn.fetchval(f"SELECT count(*) FROM {sql.outbox} WHERE published_at IS NULL"):
                procs.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"rows still pending {timeout:.0f}s after the stream had them all")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def _commit_times(self, sql: Sql) -> dict[str, float]:
        """Commit time of every ledger row from PostgreSQL's commit timestamps, or {} when
        ``track_commit_timestamp`` is off: then the producers' own clock (right after COMMIT
        returned, so later than the commit) is used instead."""
        times = await ledger_commit_times(self.dsn, sql)
        self.latency_clock = LATENCY_CLOCK_COMMIT if times else LATENCY_CLOCK_RETURNED
        return times

    async def _stream_replicas(self) -> int:
        """How many servers hold the bench stream: its leader and its replicas (1 on a single server)."""
        nc = await connect_nats(self.urls)
        try:
            info = await nc.jetstream(timeout=10).stream_info(STREAM)
        finally:
            await nc.close()
        return 1 + len(info.cluster.replicas or []) if info.cluster else 1

    async def _verify(self, sql: Sql) -> tuple[HistoryReport, list[StoredEvent]]:
        conn = await connect_db(self.dsn)
        try:
            committed, pending, dead = await read_truth(conn, sql)
        finally:
            await conn.close()
        stored = await read_stream(self.urls, STREAM, timeout=300)
        return check_history(committed, stored, pending, dead), stored


async def _wal_so_far(conn: asyncpg.Connection) -> int | None:
    """PostgreSQL's WAL position in bytes, or None when the server does not say (a standby, a user
    without access). Positions, not ``pg_stat_wal``'s counters: backends report those up to a
    second late."""
    try:
        return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8"))
    except (asyncpg.PostgresError, TypeError):
        return None


def _wal_written(before: int | None, after: int | None) -> dict[str, float]:
    """Megabytes of WAL PostgreSQL wrote during a drain. ~12 MB for the bench's 200,000-event drain,
    ~48 MB when a checkpoint came between the backlog's commit and the drain, which then logs every
    page it touches whole (docs/benchmarks.md, run-to-run spread). Empty when a reading is missing."""
    if before is None or after is None:
        return {}
    return {"postgres_wal_mb": (after - before) / 1e6}


def _server_cpu_per_1k(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """CPU seconds per 1,000 events of each embedded server between two readings, keyed
    ``<server>_cpu_s_per_1k``. The members of a nats-server cluster (``nats_n1``, ...) are also summed
    as ``nats``, the name of the single server, so a replicated drain reads beside a single-server one."""
    per = {name: (after[name] - before[name]) / (events / 1000) for name in before}
    members = [cpu for name, cpu in per.items() if name.startswith(CLUSTER_MEMBER_PREFIX)]
    if members:
        per["nats"] = sum(members)
    return {f"{name}_cpu_s_per_1k": cpu for name, cpu in per.items()}


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _short_num(v: Any) -> str:
    if isinstance(v, float):
        if abs(v) < 1:  # CPU seconds per 1k events are a few hundredths: keep three digits
            return f"{v:.3f}"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_gb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None
