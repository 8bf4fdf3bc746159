"""One relay worker process: ``start()``, ``run()``, idempotent ``stop()``.

Lifecycle guarantees:

- ``start()`` fails fast with a typed error naming the fix: bad DB credentials or missing schema,
  another live process using this worker id (:class:`DuplicateWorkerError`, after watching its
  heartbeat for at most one lease TTL), the metrics port in use (:class:`MetricsPortError`),
  unreachable servers (bounded waits), a stream that is missing, does not capture the subjects, or
  whose duplicate window is shorter than the relay's re-publish horizon.
- ``run()`` supervises its side tasks (lease renewal, LISTEN, pressure sampling, status reports,
  retention sweep, metrics server): if one of them dies, the worker stops and ``run()`` raises
  :class:`SideTaskFailed`, so the process exits non-zero instead of running half-alive.
- ``stop()`` (SIGTERM): stop claiming, let loops finish the wave in flight and mark what was acked,
  release leases, leave the membership, drain NATS, close the pool; all within the grace period.
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

from outbox_common.envelope import SubjectTemplate
from outbox_common.report import StatusSink, WorkerReport
from outbox_common.settings import MarkMode, WorkerSettings, env_name
from outbox_worker.adapters.metrics import HealthServer, Metrics
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsUnavailableError
from outbox_worker.adapters.store import (
    DatabaseUnavailableError,
    DuplicateWorkerError,
    Listener,
    OutboxStore,
    connect_pool,
)
from outbox_worker.app.leases import LeaseManager
from outbox_worker.app.relay import RelayHooks, RelayLoop, RelayStats
from outbox_worker.core.policy import pressure_pause
from outbox_worker.core.sql import Sql

log = logging.getLogger(__name__)

PRESSURE_INTERVAL_SECONDS = 5.0
RETENTION_INTERVAL_SECONDS = 60.0


class SideTaskFailed(Exception):
    """A supervised side task died; the worker stopped."""


class MetricsPortError(Exception):
    """The metrics server cannot listen on its port (in use, or not allowed)."""


T = TypeVar("T")


async def _retry_unavailable(
    attempt: Callable[[], Coroutine[Any, Any, T]], error: type[Exception], deadline: float, what: str
) -> T:
    """Retry ``attempt`` with capped backoff while it raises ``error``, until ``deadline``."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except error as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s not reachable yet (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _attempt_budget(deadline: float) -> float:
    """Time one connection attempt may take: what is left of the start-up budget, within [0.5, 10] s."""
    return max(0.5, min(10.0, deadline - time.monotonic()))


def default_worker_id() -> str:
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        sink: StatusSink | None = None,
        hooks: RelayHooks | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or default_worker_id()
        self.metrics = Metrics(settings.publisher)
        self.stats = RelayStats()
        self.sink = sink or StatusSink()
        self.hooks = hooks
        self.sql = Sql.for_table(settings.db_schema, settings.table)
        self.pool: asyncpg.Pool | None = None
        self.store: OutboxStore | None = None
        self.publisher: JetStreamPublisher | None = None
        self.leases: LeaseManager | None = None
        self.loops: list[RelayLoop] = []
        self.health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._last_published = 0
        self._last_rate_at = time.monotonic()
        self.rate = 0.0
        self.backlog = 0
        self.oldest_age = 0.0

    # --- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout_seconds
        self.pool = await _retry_unavailable(
            lambda: connect_pool(
                s.database_url.get_secret_value(),
                size=s.db_pool_size,
                timeout=s.db_timeout_seconds,
                connect_timeout=min(s.db_timeout_seconds, _attempt_budget(deadline)),
            ),
            DatabaseUnavailableError,
            deadline,
            "PostgreSQL",
        )
        self.store = OutboxStore(self.pool, self.sql, s.publisher, self.worker_id)
        partitions = await self.store.check_schema()
        # Before anything is leased: a live process with the same worker id is refused here.
        await self.store.join(s.lease_ttl_seconds)
        self.publisher = JetStreamPublisher(
            s, name=f"outbox-relay/{s.publisher}/{self.worker_id}", ack_latency=self.metrics.ack_latency
        )
        publisher = self.publisher
        await _retry_unavailable(
            lambda: publisher.connect(timeout=_attempt_budget(deadline)), NatsUnavailableError, deadline, "NATS"
        )
        template = SubjectTemplate.parse(s.subject_template)
        await self.publisher.ensure_stream(template.filter_subject(), s.duplicate_horizon_seconds)
        self.leases = LeaseManager(self.store, s, partitions, self.metrics)
        self.loops = [
            RelayLoop(
                i,
                s,
                self.store,
                self.publisher,
                self.leases,
                self.metrics,
                self.stats,
                self.hooks,
            )
            for i in range(s.loops)
        ]
        if s.metrics_port:
            self.health = HealthServer(self.metrics, s.metrics_host, s.metrics_port, self.ready)
            try:
                await self.health.start()
            except OSError as exc:
                self.health = None
                raise MetricsPortError(
                    f"the metrics server cannot listen on {s.metrics_host}:{s.metrics_port} ({exc.strerror or exc}): "
                    f"set {env_name('metrics_port')} to a free port (0 turns the metrics server off)"
                ) from None
        log.info(
            "worker %s started: publisher=%s table=%s.%s partitions=%d loops=%d",
            self.worker_id,
            s.publisher,
            s.db_schema,
            s.table,
            partitions,
            s.loops,
        )

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
        s = self.settings
        listener = Listener(s.database_url.get_secret_value(), self.sql, self.wake)
        listener.also_listen(self.sql.lease_channel, self.leases.on_lease_notice)
        side: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "leases": self.leases.run,
            "listener": listener.run,
            "pressure": self._pressure_loop,
            "reporter": self._report_loop,
        }
        if s.mark_mode == MarkMode.MARK:
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
        s = self.settings
        deadline = time.monotonic() + s.shutdown_grace_seconds
        for lp in self.loops:
            lp.stop()
        if self.leases is not None:
            self.leases.wake_all()
        if loop_tasks:
            _, still = await asyncio.wait(loop_tasks, timeout=max(0.1, deadline - time.monotonic() - 2))
            for t in still:
                t.cancel()
            await asyncio.gather(*loop_tasks, return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close(deadline)

    async def close(self, deadline: float | None = None) -> None:
        """Release leases, leave, drain NATS, close the pool. Safe to call more than once."""
        deadline = deadline or time.monotonic() + self.settings.shutdown_grace_seconds
        if self.leases is not None and self.store is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.leases.release_all(1.0), max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.leave(), 2)
                await asyncio.wait_for(self.store.announce_lease_change(), 2)  # the others take over now
        if self.publisher is not None:
            await self.publisher.close(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        if self.health is not None:
            await self.health.close()
        with contextlib.suppress(Exception):
            await self.sink.close()
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), max(0.5, deadline - time.monotonic()))
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
        try:
            self.backlog, self.oldest_age = await self.store.pressure(owned) if owned else (0, 0.0)
        except Exception as exc:
            log.debug("pressure sample failed: %s", type(exc).__name__)
        self.metrics.backlog.set(self.backlog)
        self.metrics.oldest_age.set(self.oldest_age)
        now = time.monotonic()
        dt = now - self._last_rate_at
        if dt > 0:
            self.rate = (self.stats.published - self._last_published) / dt
        self._last_published, self._last_rate_at = self.stats.published, now

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.report_interval_seconds)
            await self._report_once()

    async def _report_once(self) -> None:
        try:
            await self.sink.write(self.report())
        except Exception as exc:
            log.warning("status report failed: %s", type(exc).__name__)

    def report(self) -> WorkerReport:
        st = self.stats
        config_error = st.config_error if time.monotonic() - st.config_error_at < 60 else ""
        return WorkerReport(
            pod=self.worker_id,
            partitions=self.leases.owned if self.leases else [],
            published=st.published,
            duplicates=st.duplicates,
            failed=st.failed,
            deadLetters=st.dead_letters,
            deadLettersByReason=dict(sorted(st.dead_letters_by_reason.items())),
            inFlight=self.publisher.in_flight if self.publisher else 0,
            backlog=self.backlog,
            oldestPendingSeconds=round(self.oldest_age, 3),
            ratePerSecond=round(self.rate, 1),
            lastError=st.last_error,
            configError=config_error,
            reportTime=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )

    async def _retention_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(RETENTION_INTERVAL_SECONDS)
            try:
                await self.store.retention_sweep(self.settings.retention_seconds)
            except Exception as exc:
                log.warning("retention sweep failed: %s", type(exc).__name__)
