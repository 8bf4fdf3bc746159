"""One relay worker process: ``start()``, ``run()``, and ``request_stop()`` (the SIGTERM handler),
after which ``run()`` shuts down; ``close()`` is idempotent.

Lifecycle guarantees:

- ``start()`` fails fast with a typed error naming the fix: bad DB credentials or missing schema,
  another live process using this worker id (:class:`DuplicateWorkerError`, after watching its
  heartbeat for at most one lease TTL), the metrics port in use (:class:`MetricsPortError`),
  unreachable servers (bounded waits), a stream that is missing, does not capture the subjects, or
  whose duplicate window is shorter than the relay's re-publish horizon.
- ``run()`` supervises its side tasks (lease renewal, LISTEN, pressure sampling, status reports,
  retention sweep, metrics server): if one of them dies, the worker stops and ``run()`` raises
  :class:`SideTaskFailed`, so the process exits non-zero instead of running half-alive.
- ``request_stop()`` (SIGTERM): ``run()`` stops claiming, lets loops finish the wave in flight and
  mark what was acked, then ``close()`` writes the deferred marks, releases leases, leaves the
  membership, closes NATS, closes the pool; all within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from outbox_common.config import WorkerConfig
from outbox_common.envelope import SubjectTemplate
from outbox_common.report import StatusSink, WorkerReport
from outbox_common.settings import MarkMode, env_name
from outbox_common.timing import backoff_delay
from outbox_worker.adapters.metrics import HealthServer, Metrics
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsUnavailableError
from outbox_worker.adapters.store import (
    DatabaseUnavailableError,
    DuplicateWorkerError,
    Listener,
    OutboxStore,
    connect_pool,
    connection_errors_typed,
)
from outbox_worker.app.leases import LeaseManager
from outbox_worker.app.marks import AckedRows
from outbox_worker.app.relay import RelayHooks, RelayLoop, RelayStats
from outbox_worker.core.policy import pressure_pause
from outbox_worker.core.sql import Sql

log = logging.getLogger(__name__)

PRESSURE_INTERVAL_SECONDS = 5.0
# The dead letters waiting are counted up to this many (a count past it reads the table to its end).
DEAD_LETTERS_WAITING_CAP = 10_000
RETENTION_INTERVAL_SECONDS = 60.0
# Lease renewals failing this long are reported as a database error (databaseError): a single failed
# tick is a blip the next one retries; two or more in a row (5 s apart by default) are an outage.
DATABASE_ERROR_AFTER_SECONDS = 10.0
CONFIG_ERROR_REPORTED_SECONDS = 60.0  # a configuration error not seen again for this long is no longer reported
STARTUP_RETRY_INITIAL_SECONDS = 0.5  # first wait before retrying an unreachable database or NATS
STARTUP_RETRY_MAX_SECONDS = 5.0


class SideTaskFailed(Exception):
    """A supervised side task died; the worker stopped."""


class MetricsPortError(Exception):
    """The metrics server cannot listen on its port (in use, or not allowed)."""


T = TypeVar("T")


async def _retry_unavailable(
    attempt: Callable[[], Coroutine[Any, Any, T]], error: type[Exception], deadline: float, what: str
) -> T:
    """Retry ``attempt`` with capped backoff (:func:`backoff_delay`, 0.5 s up to 5 s) while it raises
    ``error``, until ``deadline``."""
    tries = 0
    while True:
        try:
            return await attempt()
        except error as exc:
            tries += 1
            delay = backoff_delay(tries, STARTUP_RETRY_INITIAL_SECONDS, STARTUP_RETRY_MAX_SECONDS)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s not available yet (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


def _attempt_budget(deadline: float) -> float:
    """Time one connection attempt may take: what is left of the start-up budget, within [0.5, 10] s."""
    return max(0.5, min(10.0, deadline - time.monotonic()))


def default_worker_id() -> str:
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One relay worker. Each part gets its own config from ``config`` (:class:`WorkerConfig`, built
    once with :meth:`WorkerConfig.from_settings`): the pool ``database``, the publisher ``nats`` and
    ``publish``, the stream check ``stream``, the leases ``leases``, every loop ``relay``, the
    metrics server ``metrics``; the worker itself only ``lifecycle`` and the status interval."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        sink: StatusSink | None = None,
        hooks: RelayHooks | None = None,
    ) -> None:
        self.config = config
        self.worker_id = config.lifecycle.worker_id or default_worker_id()
        self.metrics = Metrics(config.lifecycle.publisher)
        self.stats = RelayStats()
        self.sink = sink or StatusSink()
        self.hooks = hooks
        self.sql = Sql.for_table(config.database.schema, config.database.table)
        self.pool: asyncpg.Pool | None = None
        self.store: OutboxStore | None = None
        self.publisher: JetStreamPublisher | None = None
        self.leases: LeaseManager | None = None
        self.acked: AckedRows | None = None  # acked rows whose mark waits for the next claim
        self.listener: Listener | None = None  # while run() runs
        self.loops: list[RelayLoop] = []
        self.health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._joined = False  # our heartbeat row exists: close() deletes it, even after a failed start
        self._last_published = 0
        self._last_rate_at = time.monotonic()
        self.rate = 0.0
        # the last pressure sample: None until one succeeds, and again after one failed (unknown,
        # never an old count shown as current)
        self.backlog: int | None = None
        self.oldest_age: float | None = None
        self.dead_letters_waiting = 0  # the publisher's rows in the dead-letter table, last sampled
        # Read at each scrape: what the report's databaseError says, as 0 or 1.
        self.metrics.database_unavailable.set_function(lambda: 1.0 if self._database_error() else 0.0)

    # --- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the metrics server, connect the database, join the workers, connect NATS and check
        the stream, build the leases and loops; each step fails with a typed error.

        The metrics server comes first: while the later steps wait for a server that is not there
        yet (bounded by ``startup_timeout_seconds``, then the worker exits), /healthz answers, so a
        liveness probe does not kill a worker that is waiting as it should, and /readyz says it is
        not ready."""
        await self._start_metrics()
        deadline = time.monotonic() + self.config.lifecycle.startup_timeout_seconds
        self.store = store = await self._connect_database(deadline)
        # PostgreSQL may go away after the pool connected: these steps are retried like the pool,
        # until the deadline, and then fail as DatabaseUnavailableError, not as a raw asyncpg error.
        fix = "check the database Secret"
        partitions = await _retry_unavailable(
            lambda: connection_errors_typed(store.check_schema(), fix), DatabaseUnavailableError, deadline, "PostgreSQL"
        )
        # Before anything is leased: a live process with the same worker id is refused here.
        ttl = self.config.leases.ttl_seconds
        await _retry_unavailable(
            lambda: connection_errors_typed(store.join(ttl), fix), DatabaseUnavailableError, deadline, "PostgreSQL"
        )
        self._joined = True
        self.publisher = await self._connect_nats(deadline)
        # A payload the server would refuse is dead-lettered by its size: claims never read it. And a
        # claim holds at most max_batch_bytes of payloads (or one row): the bound of a loop's memory.
        self.store.limit_payloads(self.publisher.max_payload, self.config.relay.batch_bytes)
        self.leases = LeaseManager(self.store, self.config.leases, partitions, self.metrics)
        self.acked = AckedRows(
            self.store, delete=self.config.relay.mark_mode == MarkMode.DELETE, fenced_out=self._fenced_out
        )
        self.leases.before_release = self.acked.flush_before_release
        self.loops = [
            self._relay_loop(i, self.store, self.publisher, self.leases) for i in range(self.config.relay.loops)
        ]
        c = self.config
        log.info(
            "worker %s started: publisher=%s table=%s.%s partitions=%d loops=%d",
            self.worker_id,
            c.lifecycle.publisher,
            c.database.schema,
            c.database.table,
            partitions,
            c.relay.loops,
        )

    async def _connect_database(self, deadline: float) -> OutboxStore:
        """The pool (retried while PostgreSQL is unreachable, until ``deadline``) and the store over it."""
        db = self.config.database
        self.pool = await _retry_unavailable(
            lambda: connect_pool(
                db.url.get_secret_value(),
                size=db.pool_size,
                timeout=db.statement_timeout_seconds,
                connect_timeout=min(db.statement_timeout_seconds, _attempt_budget(deadline)),
            ),
            DatabaseUnavailableError,
            deadline,
            "PostgreSQL",
        )
        return OutboxStore(
            self.pool, self.sql, self.config.lifecycle.publisher, self.worker_id, keep_claim_connection=True
        )

    async def _connect_nats(self, deadline: float) -> JetStreamPublisher:
        """The publisher, connected (retried while NATS is unreachable, until ``deadline``), with the
        stream checked to capture the subjects and cover the re-publish horizon."""
        c = self.config
        publisher = JetStreamPublisher(
            c.nats,
            c.publish,
            name=f"outbox-relay/{c.lifecycle.publisher}/{self.worker_id}",
            ack_latency=self.metrics.ack_latency,
        )
        self.publisher = publisher  # closed by close() even if the stream check below fails
        # Read at each scrape: the publishes still unacknowledged, not whole waves until their last ack.
        self.metrics.in_flight.set_function(lambda: publisher.in_flight)
        await _retry_unavailable(
            lambda: publisher.connect(timeout=_attempt_budget(deadline)), NatsUnavailableError, deadline, "NATS"
        )
        template = SubjectTemplate.parse(c.relay.subject_template)
        # A JetStream API that does not answer yet is asked again until the start-up deadline.
        horizon = c.lifecycle.duplicate_horizon_seconds
        await publisher.ensure_stream(c.stream, template.filter_subject(), horizon, deadline=deadline)
        return publisher

    def _relay_loop(
        self, index: int, store: OutboxStore, publisher: JetStreamPublisher, leases: LeaseManager
    ) -> RelayLoop:
        return RelayLoop(
            index, self.config.relay, store, publisher, leases, self.metrics, self.stats, self.hooks, self.acked
        )

    def _fenced_out(self, rows: int) -> None:
        self.stats.fenced_out += rows

    async def _start_metrics(self) -> None:
        """The /metrics, /healthz, /readyz server, unless its port is 0. Raises MetricsPortError."""
        m = self.config.metrics
        if not m.port:
            return
        self.health = HealthServer(self.metrics, m.host, m.port, self.ready)
        try:
            await self.health.start()
        except OSError as exc:
            self.health = None
            raise MetricsPortError(
                f"the metrics server cannot listen on {m.host}:{m.port} ({exc.strerror or exc}): "
                f"set {env_name('metrics_port')} to a free port (0 turns the metrics server off)"
            ) from None

    def ready(self) -> bool:
        return bool(
            self.publisher
            and self.publisher.connected
            and self.leases
            and not self.leases.last_error
            and not self._stop_requested.is_set()
        )

    def wake(self) -> None:
        """Rows were committed (a NOTIFY): every partition is claimed once more."""
        if self.leases is not None:
            self.leases.mark_dirty()

    # --- run --------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Relay until :meth:`request_stop`; then stop gracefully. Raises SideTaskFailed if a
        supervised task died."""
        assert self.leases is not None
        assert self.store is not None
        self.listener = listener = Listener(
            self.config.database.url.get_secret_value(),
            self.sql,
            self.wake,
            window=self.config.relay.notify_coalesce_seconds,
        )
        listener.also_listen(self.sql.lease_channel, self.leases.on_lease_notice)
        side: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "leases": self.leases.run,
            "listener": listener.run,
            "pressure": self._pressure_loop,
            "reporter": self._report_loop,
        }
        if self.config.relay.mark_mode == MarkMode.MARK:
            side["retention"] = self._retention_loop
        if self.health is not None:
            side["metrics"] = self.health.serve
        # The first lease tick before loops start, so they have partitions right away.
        with contextlib.suppress(Exception):
            await self.leases.tick()
        # Ready to take partitions: announce the join now (not at start(), which may still spend
        # hundreds of milliseconds on NATS), so the owners release our share when we can take it.
        await self.store.announce_lease_change()
        self._tasks = [asyncio.create_task(fn(), name=name) for name, fn in side.items()]
        loop_tasks = [asyncio.create_task(lp.run(), name=f"loop-{lp.index}") for lp in self.loops]
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        failure: BaseException | None = None
        try:
            pending = {*self._tasks, *loop_tasks, stop_wait}
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stop_wait:
                    continue
                exc = task.exception() if not task.cancelled() else None
                if isinstance(exc, DuplicateWorkerError):
                    failure = exc  # exits like the refusal at start-up (exit code 3)
                    continue
                failure = SideTaskFailed(f"task {task.get_name()} ended unexpectedly: {exc!r}")
                log.error("%s: stopping the worker", failure)
        finally:
            stop_wait.cancel()
            await self._shutdown(loop_tasks)
        if failure is not None:
            raise failure

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop gracefully (the SIGTERM handler calls this)."""
        self._stop_requested.set()

    async def _shutdown(self, loop_tasks: list[asyncio.Task[None]]) -> None:
        if self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        deadline = started + self.config.lifecycle.shutdown_grace_seconds
        for lp in self.loops:
            lp.stop()
        if self.leases is not None:
            self.leases.wake_all()
        if loop_tasks:
            # the loops get the grace period less what closing needs (about 2 s, less when short)
            reserve = min(2.0, self.config.lifecycle.shutdown_grace_seconds / 2)
            _, still = await asyncio.wait(loop_tasks, timeout=max(0.1, deadline - time.monotonic() - reserve))
            for t in still:
                t.cancel()
            await asyncio.gather(*loop_tasks, return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close(deadline)
        if self.leases is not None and not self.leases.owned:
            self.metrics.set_pressure((0, 0.0))  # drained: no partition, so nothing due in one
        log.info("stopped in %.1fs", time.monotonic() - started)

    async def close(self, deadline: float | None = None) -> None:
        """Mark the acked rows still waiting, release leases, leave, close NATS, close the pool.
        Safe to call more than once.

        Bounded: every step waits at most until ``deadline`` (default: the grace period from now),
        and a step cut short is logged; the pod's termination grace period (10 s more than
        ``shutdown_grace_seconds``) is therefore never reached. Leases not released in time expire
        after their TTL, exactly as after a crash: nothing is lost or duplicated either way."""
        deadline = deadline or time.monotonic() + self.config.lifecycle.shutdown_grace_seconds

        def left(cap: float) -> float:
            return max(0.05, min(cap, deadline - time.monotonic()))

        async def bounded(what: str, step: Coroutine[Any, Any, object], cap: float) -> None:
            budget = left(cap)
            try:
                async with asyncio.timeout(budget):  # not wait_for: it can lose a cancel (LeaseManager.wait_changed)
                    await step
            except TimeoutError:
                log.warning("shutdown: %s did not finish within %.1fs; going on", what, budget)
            except Exception as exc:
                log.warning("shutdown: %s failed (%s); going on", what, type(exc).__name__)

        if self.acked is not None:
            await bounded("marking acked rows", self.acked.close(), cap=float("inf"))
        if self.leases is not None and self.store is not None:
            await bounded("releasing the leases", self.leases.release_all(1.0), cap=float("inf"))
        if self._joined and self.store is not None:
            # Also after a start that failed past join (stream missing, NATS refused): a heartbeat
            # left behind would make a restart under the same worker id (a pod's restarted
            # container) wait one lease TTL in join, and the peers count a worker that is gone.
            self._joined = False
            await bounded("leaving the membership", self.store.leave(), cap=2.0)
            await bounded("announcing the release", self.store.announce_lease_change(), cap=2.0)
        if self.publisher is not None:
            await self.publisher.close(timeout=left(5.0))
        if self.health is not None:
            await self.health.close()
        await bounded("the last status report", self.sink.close(), cap=float("inf"))
        if self.store is not None:
            await bounded("returning the claim connection", self.store.close(), cap=2.0)
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                async with asyncio.timeout(left(float("inf"))):
                    await pool.close()
            except Exception:
                pool.terminate()

    # --- side tasks -------------------------------------------------------------------------------
    async def _pressure_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.sample_pressure()
            await asyncio.sleep(pressure_pause(time.monotonic() - started, PRESSURE_INTERVAL_SECONDS))

    async def sample_pressure(self) -> None:
        assert self.store is not None
        assert self.leases is not None
        assert self.publisher is not None
        owned = self.leases.owned
        # A sample that failed makes the pressure unknown, in the report (no backlog) and on /metrics
        # (no series) until one succeeds again: never 0, nor the last sample shown as current, which
        # through a database outage kept Lagging False and the autoscaler acting on old numbers.
        try:
            self.backlog, self.oldest_age = await self.store.pressure(owned) if owned else (0, 0.0)
            self.metrics.set_pressure((self.backlog, self.oldest_age))
        except Exception as exc:
            self.backlog = self.oldest_age = None
            log.debug("pressure sample failed: %s", type(exc).__name__)
            self.metrics.set_pressure(None)
        try:
            self.dead_letters_waiting = await self.store.dead_letters_waiting(DEAD_LETTERS_WAITING_CAP)
            self.metrics.set_dead_letters_waiting(self.dead_letters_waiting)
        except Exception as exc:
            log.debug("dead-letter sample failed: %s", type(exc).__name__)
            self.metrics.set_dead_letters_waiting(None)
        self.metrics.notify_unavailable.set(1 if self.listener is not None and self.listener.notify_error else 0)
        now = time.monotonic()
        dt = now - self._last_rate_at
        if dt > 0:
            self.rate = (self.stats.published - self._last_published) / dt
        self._last_published, self._last_rate_at = self.stats.published, now

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status.interval_seconds)
            await self._report_once()

    async def _report_once(self) -> None:
        try:
            await self.sink.write(self.report())
        except Exception as exc:
            log.warning("status report failed: %s", type(exc).__name__)

    def report(self) -> WorkerReport:
        st = self.stats
        recent = time.monotonic() - st.config_error_at < CONFIG_ERROR_REPORTED_SECONDS
        config_error, error_kind = (st.config_error, st.config_error_kind) if recent else ("", "")
        return WorkerReport(
            pod=self.worker_id,
            partitions=self.leases.owned if self.leases else [],
            published=st.published,
            duplicates=st.duplicates,
            failed=st.failed,
            deadLetters=st.dead_letters,
            deadLettersByReason=dict(sorted(st.dead_letters_by_reason.items())),
            deadLettersWaiting=self.dead_letters_waiting,
            inFlight=self.publisher.in_flight if self.publisher else 0,
            backlog=self.backlog,
            oldestPendingSeconds=None if self.oldest_age is None else round(self.oldest_age, 3),
            ratePerSecond=round(self.rate, 1),
            lastError=st.last_error,
            configError=config_error,
            errorKind=error_kind,
            databaseError=self._database_error(),
            notifyError=self.listener.notify_error if self.listener else "",
            reportTime=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )

    def _database_error(self) -> str:
        """What the report's ``databaseError`` says: how long the database has not answered the lease
        renewals (from :attr:`LeaseManager.failing_since`), once that is DATABASE_ERROR_AFTER_SECONDS
        or more; "" otherwise. Never a DSN: the lease manager keeps only the error's type."""
        leases = self.leases
        if leases is None or not leases.failing_since:
            return ""
        failing = time.monotonic() - leases.failing_since
        if failing < DATABASE_ERROR_AFTER_SECONDS:
            return ""
        return f"the database has not answered lease renewals for {failing:.0f}s ({leases.last_error})"

    async def _retention_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(RETENTION_INTERVAL_SECONDS)
            try:
                await self.store.retention_sweep(self.config.lifecycle.retention_seconds)
            except Exception as exc:
                log.warning("retention sweep failed: %s", type(exc).__name__)
