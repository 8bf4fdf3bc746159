"""PostgreSQL side of the relay (asyncpg): migration, leases, claims, fenced marks, wake-ups.

Every statement is a short autocommit statement: no transaction is ever open while the relay waits
for broker acks. All SQL text comes from :mod:`outbox_worker.core.sql`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import asyncpg
import orjson

from outbox_common.envelope import OutboxRow
from outbox_common.timing import backoff_delay
from outbox_worker.core.sql import COMPATIBLE_FROM, DEFAULT_PARTITIONS, SCHEMA_VERSION, Sql, int_array

log = logging.getLogger(__name__)

# A claim's payload bound when nothing else bounds it: octet_length's largest value (int4).
UNBOUNDED_PAYLOAD = 2**31 - 1
RETENTION_BATCH = 10_000  # published rows one retention statement deletes, at most
RETENTION_BUDGET_SECONDS = 30.0  # how long one retention sweep (once a minute) may go on deleting

# After each LISTEN, a probe NOTIFY sent on another connection must come back within this long.
NOTIFY_PROBE_TIMEOUT_SECONDS = 5.0
NOTIFY_PROBE_PREFIX = "probe:"  # payload of a probe; the outbox trigger's NOTIFYs carry none
LISTEN_RETRY_INITIAL_SECONDS = 0.2  # first wait before the LISTEN connection is opened again
LISTEN_RETRY_MAX_SECONDS = 10.0


class SchemaError(Exception):
    """The outbox schema is missing or does not match (run ``outboxctl migrate``)."""


class DatabaseUnavailableError(Exception):
    """The database could not be reached in time."""


class DatabaseAuthError(Exception):
    """The database rejected the credentials or the database does not exist."""


class DuplicateWorkerError(Exception):
    """Another live process heartbeats under this worker id: two workers must never share a lease
    identity (they would both publish the partitions leased to it)."""


@dataclass(frozen=True, slots=True)
class Fence:
    """The leases a statement must still hold: partitions with their epochs (fencing tokens)."""

    partitions: list[int]
    epochs: list[int]

    @classmethod
    def of(cls, leases: dict[int, int]) -> Fence:
        parts = sorted(leases)
        return cls(parts, [leases[p] for p in parts])


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What a migration left in ``outbox_meta`` for the table: ``schema_version`` and
    ``compatible_from`` are the table's, which a newer release's migration may have set above this
    release's (they never go down)."""

    partitions: int
    created: bool
    schema_version: int
    compatible_from: int


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own, which rolls back an open transaction.

    asyncpg's default also sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on
    every release: a round trip after each claim and each mark, on the relay's critical path. This
    pool runs only this module's statements, and none leaves session state behind (no SET, cursor,
    LISTEN or session advisory lock: the migration's lock is transaction-level, and LISTEN has its
    own connection, :class:`Listener`).
    """


async def connect_pool(
    dsn: str, *, size: int = 4, timeout: float = 10.0, connect_timeout: float | None = None
) -> asyncpg.Pool:
    """Open a pool; map failures to errors that say what to fix and never echo the DSN.

    ``timeout`` bounds every statement; ``connect_timeout`` (default: ``timeout``) each connection attempt.
    For the relay's own statements only: a released connection keeps its session (see :func:`_keep_session`).
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min(2, size),
            max_size=size,
            timeout=timeout if connect_timeout is None else connect_timeout,
            command_timeout=timeout,
            reset=_keep_session,
            # No idle timeout: asyncpg re-arms a timer on every release to close a connection idle
            # for it (default 300 s), ~2% of the worker's CPU at one event per commit. The pool
            # holds at most ``size`` connections either way.
            max_inactive_connection_lifetime=0,
            # Generic plans always: asyncpg prepares every statement, and PostgreSQL plans its first
            # five executions for the given values. Right after a burst of inserts (statistics still
            # say the table is tiny) that custom plan of the claim bitmap-scans and sorts the whole
            # backlog (270 ms per claim at 200k pending rows, vs 2 ms for the index walk the generic
            # plan uses), on every new pool connection. The generic plans are what the claim's
            # partial index was designed for (docs/benchmarks.md, "growth").
            server_settings={"application_name": "outbox-relay", "plan_cache_mode": "force_generic_plan"},
        )
    except Exception as exc:
        fix = "check the database Secret"
        mapped = connection_error(exc, fix) or dsn_error(exc, fix)
        if mapped is None:
            raise
        raise mapped from None
    assert pool is not None
    return pool


def dsn_error(exc: BaseException, fix: str) -> DatabaseAuthError | None:
    """The error of a DSN that asyncpg cannot even parse, or whose query string PostgreSQL refuses.

    - Parsing fails before any connection is tried: a bad port or query parameter
      (``sslmode=bogus``), or a password with an unencoded ``#``, ``/``, ``?``, ``@`` or ``[``.
      asyncpg's own text quotes the piece of the DSN it choked on, which for such a password is part
      of the password (``invalid literal for int() with base 10: 'Pa'``), so only the exception's type
      is kept.
    - asyncpg passes query parameters it does not know (``connect_timeout``, a typo) to the server
      as settings, and PostgreSQL refuses an unknown one or a bad value at connect. Its message names
      the setting (never the password, which asyncpg reads itself).

    Also a role without the CONNECT privilege on the database (its message names the database).

    None for any other error. Call it only on what connecting raised."""
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return DatabaseAuthError(
            f"PostgreSQL refused the connection ({exc.args[0]}): GRANT CONNECT ON DATABASE to the role; {fix}"
        )
    if isinstance(exc, asyncpg.UndefinedObjectError | asyncpg.InvalidParameterValueError):
        return DatabaseAuthError(
            f"PostgreSQL refused a setting of the DSN's query string ({exc}): remove or fix it; {fix}"
        )
    if isinstance(exc, ValueError | OverflowError):  # asyncpg.ClientConfigurationError is a ValueError
        return DatabaseAuthError(
            f"the DSN cannot be parsed ({type(exc).__name__}; the DSN is not shown: it holds the password): "
            "percent-encode special characters in the user and password (e.g. '#' as %23, '/' as %2F, "
            f"'@' as %40), and check the port and the query parameters; {fix}"
        )
    return None


def connection_error(exc: BaseException, fix: str) -> DatabaseAuthError | DatabaseUnavailableError | None:
    """The typed error of a failed connection to PostgreSQL, its message ending in ``fix`` (for
    example "check the database Secret"); None when ``exc`` is no connection failure. The one place
    asyncpg's connection errors are read: rejected credentials or a missing database are
    :class:`DatabaseAuthError` (a configuration error), an unreachable server
    :class:`DatabaseUnavailableError`. Messages never carry the DSN (it holds the password).

    Unavailable, besides a refused or timed-out connection: no free connection slot
    (TooManyConnectionsError, common right after a restart, when every client reconnects at once),
    a server starting up or shutting down (OperatorInterventionError), a connection dropped
    mid-statement (PostgresConnectionError; InterfaceError "connection is closed") and a pooled
    connection asyncpg handed out just after PostgreSQL dropped it (InternalClientError).

    None (the error as it is) for the rest, among them a protocol violation (08P01, what a
    transaction-mode pooler answers to prepared statements), a statement cancelled by
    statement_timeout or pg_cancel_backend (QueryCanceledError: the server answered), asyncpg's other
    InterfaceErrors (an authentication method it does not support, a SCRAM signature it cannot
    verify) and a DSN it cannot parse (ClientConfigurationError: :func:`dsn_error` reads that)."""
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return DatabaseAuthError(f"PostgreSQL rejected the credentials ({type(exc).__name__}): {fix}")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseAuthError(f"the database named in the DSN does not exist: {fix}")
    if isinstance(exc, ValueError | asyncpg.ProtocolViolationError | asyncpg.QueryCanceledError):
        return None
    if isinstance(exc, TimeoutError):  # the server may well be reachable: say what was seen
        return DatabaseUnavailableError(
            "PostgreSQL did not answer in time (TimeoutError): it is unreachable or overloaded, "
            "or the statement waited on a lock another session holds (a migration running?)"
        )
    closed = isinstance(exc, asyncpg.InterfaceError) and " is closed" in str(exc)  # the connection, or the pool
    if closed or isinstance(exc, _UNAVAILABLE):
        return DatabaseUnavailableError(f"PostgreSQL is not reachable: {type(exc).__name__}")
    return None


_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InternalClientError,
)

T = TypeVar("T")


async def connection_errors_typed(step: Awaitable[T], fix: str, *, as_raised: tuple[type[Exception], ...] = ()) -> T:
    """Await ``step``; a failure :func:`connection_error` reads (a connection lost or refused
    meanwhile) is raised as its typed error, naming ``fix``. Any other error, and those of the types
    in ``as_raised`` (errors that say nothing of the connection where the caller stands), as raised."""
    try:
        return await step
    except Exception as exc:
        typed = None if isinstance(exc, as_raised) else connection_error(exc, fix)
        if typed is None:
            raise
        raise typed from None


async def migrate(conn: asyncpg.Connection, sql: Sql, partitions: int | None) -> MigrationResult:
    """Create or upgrade the outbox tables. Idempotent; safe to run concurrently (advisory lock).

    The partition count is fixed when the table is created: a different value later is refused,
    because rows already carry partitions computed with the old count. ``None`` takes the table's
    own count (an upgrade need not know it), or DEFAULT_PARTITIONS for a new table.

    The table's schema version and compatibility level (:data:`COMPATIBLE_FROM`) are raised to this
    release's, never lowered: a newer release's migration keeps its own.
    """
    async with conn.transaction():
        await conn.execute(sql.advisory_lock, f"{sql.schema}.{sql.table}")
        if not await conn.fetchval(sql.schema_exists, sql.schema):
            await conn.execute(sql.schema_creation)
        # outbox_meta first, before this transaction reads it (see Sql.meta_migration)
        for stmt in sql.meta_migration:
            await conn.execute(stmt)
        row = await conn.fetchrow(sql.meta_select, sql.table)
        if partitions is None:
            partitions = int(row["partitions"]) if row is not None else DEFAULT_PARTITIONS
        if row is not None and row["partitions"] != partitions:
            raise SchemaError(
                f"{sql.schema}.{sql.table} was created with {row['partitions']} partitions; "
                f"--partitions {partitions} differs. Keep {row['partitions']} (the count cannot change "
                "in place)"
            )
        for stmt in sql.migration(partitions):
            await conn.execute(stmt)
        meta = await conn.fetchrow(sql.meta_insert, sql.table, partitions, SCHEMA_VERSION, COMPATIBLE_FROM)
    assert meta is not None  # INSERT … ON CONFLICT DO UPDATE … RETURNING returns the row
    return MigrationResult(partitions, row is None, int(meta["schema_version"]), int(meta["compatible_from"]))


SIZE = 11  # the claim's column after OutboxRow's fields: the payload's size in bytes (Sql._COLUMNS)


def _row(r: asyncpg.Record) -> OutboxRow:
    """A claimed record (columns in OutboxRow's field order) as an OutboxRow; header values that are
    not JSON strings become their JSON text. Positional and without a copy of the headers when every
    value is a string: this runs once per event (1.8 µs vs 3.3 µs with keywords and a copy).

    User headers are read with orjson (~0.2 µs for a traceparent header, json.loads ~1.1 µs). Both
    read string values alike; any other value is read again by the standard decoder, whose numbers
    keep their exact JSON text (orjson turns integers past 64 bits into floats)."""
    raw = r[8]
    headers: dict[str, Any] = {}
    if raw != "{}":
        try:
            headers = orjson.loads(raw)
        except orjson.JSONDecodeError:
            headers = json.loads(raw)  # PostgreSQL's jsonb text is valid JSON: this raises what it must
        for v in headers.values():
            if type(v) is not str:
                headers = {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(raw).items()}
                break
    return OutboxRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], headers, r[9], r[10])


class Claim(NamedTuple):
    rows: list[OutboxRow]
    more: frozenset[int]  # partitions that may hold more due rows right now: claim them again at once
    marked: int = 0  # rows changed by the mark the claim carried (``mark_first``)


@dataclass(frozen=True, slots=True)
class MarkFirst:
    """Acked rows whose mark a claim carries (:meth:`OutboxStore.claim`), and the ids it must skip."""

    fence: Fence
    ids: list[int]  # to delete (``delete``) or mark published, fenced by ``fence``
    skip: list[int]  # ``ids`` and those of any other mark not answered yet
    delete: bool


class OutboxStore:
    """Statements of one worker of one publisher on one outbox table."""

    def __init__(
        self, pool: asyncpg.Pool, sql: Sql, publisher: str, owner: str, *, keep_claim_connection: bool = False
    ) -> None:
        """With ``keep_claim_connection`` the claims run on one pool connection the store keeps
        (see :meth:`_hot_fetch`): the pool must have room for it and the caller must call
        :meth:`close` before closing the pool, which waits for every connection."""
        self.pool = pool
        self.sql = sql
        self.publisher = publisher
        self.owner = owner
        # This process's token in its heartbeat row: tells it apart from another process that was
        # (mis)configured with the same worker id.
        self.instance = uuid.uuid4().hex
        self._idle: set[int] = set()  # partitions whose last claim found no due row
        # Payloads: the server's max_payload (0: not known) and a claim's byte budget (0: none), and
        # {partition: size of the payload its last claim stopped at}, to claim next on its own (claim()).
        self._max_payload = 0
        self._batch_bytes = 0
        self._large: dict[int, int] = {}
        self._claims: dict[tuple[bool, bool, bool | None], str] = {}  # see _claim_sql
        # One pool connection kept for claims (see _hot_fetch), and whether a claim runs on it now.
        self._hot: asyncpg.Connection | None = None
        self._hot_busy = False
        self._closed = not keep_claim_connection

    def limit_payloads(self, max_payload: int, batch_bytes: int = 0) -> None:
        """Claims from now on leave out (NULL) payloads over ``max_payload`` bytes and, unless
        ``batch_bytes`` is 0, take at most ``batch_bytes`` of payloads, or one row (see :meth:`claim`).

        Why the first: a payload NATS refuses can only be dead-lettered, and that needs its size, not
        its bytes. Read in full, a claim of such rows put all of them in the worker's memory at once
        (16 rows of 40 MB took a worker to an 800 MB peak; the operator's default limit is 512Mi): the
        worker was OOM-killed before it could dead-letter them, claimed the same rows after its
        restart, and the partition never moved again. Why the second: the same, with payloads NATS
        takes: 4 loops x 1,000 rows of 1 MB are 4 GB."""
        if max_payload < 0 or batch_bytes < 0:
            raise ValueError(f"payload limits must not be negative: {max_payload}, {batch_bytes}")
        self._max_payload = max_payload
        self._batch_bytes = batch_bytes
        self._large.clear()

    async def _hot_fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        """``pool.fetch``, on a connection kept out of the pool, unless another claim runs on it.

        Why: a statement through the pool costs ~140 µs of the worker's CPU against ~75 µs on a held
        connection (the acquire, and a release that asyncpg shields in a task of its own). At one
        event per commit the relay runs a claim per wake-up, and keeping the connection took 9% off
        the worker's CPU per event (docs/benchmarks.md, "commit-rate, fourth step").

        The pool's size still bounds the connections: the kept one is one of them, and a claim that
        finds it busy goes through the pool as before. A kept connection that has closed (PostgreSQL
        restarted, the backend was terminated) is given back and another taken before the claim, as
        the pool does for its own; a statement that fails gives the connection back (the pool closes
        a broken one) before the error is raised."""
        if self._hot_busy or self._closed:
            return cast(list[asyncpg.Record], await self.pool.fetch(query, *args))
        self._hot_busy = True
        try:
            hot = self._hot
            if hot is None or not _open(hot):
                await self._release_hot()
                hot = self._hot = cast(asyncpg.Connection, await self.pool.acquire())
            try:
                return cast(list[asyncpg.Record], await hot.fetch(query, *args))
            except BaseException:
                await self._release_hot()
                raise
        finally:
            self._hot_busy = False
            if self._closed:
                await self._release_hot()

    async def close(self) -> None:
        """Give the kept connection back to the pool (before the pool closes: it waits for every
        connection); a claim running on it gives it back when it ends. Claims after this go through
        the pool. Idempotent."""
        self._closed = True
        if not self._hot_busy:
            await self._release_hot()

    async def _release_hot(self) -> None:
        hot, self._hot = self._hot, None
        if hot is not None:
            await self.pool.release(hot)

    async def check_schema(self) -> int:
        """Return the partition count; raise SchemaError with the fix if the tables are missing or
        this worker cannot run against them.

        A table of an older schema version is refused (run ``outboxctl migrate``). One of a newer
        version is accepted, with a warning to roll out the new worker image, when its
        ``compatible_from`` is at most this worker's :data:`SCHEMA_VERSION`; refused otherwise, or
        when it records none. Called once, at start."""
        s = self.sql
        try:
            row = await self.pool.fetchrow(s.meta_select, s.table)
        except asyncpg.UndefinedTableError:
            row = None
        except asyncpg.InsufficientPrivilegeError as exc:
            role = str(await self.pool.fetchval("SELECT current_user"))
            raise SchemaError(f"{exc.args[0]}: {self._grants([(s.meta, 'SELECT')], role)}") from None
        if row is None:
            raise SchemaError(
                f"outbox table {s.schema}.{s.table} is not set up: run "
                f"`outboxctl migrate --database-url … --schema {s.schema} --table {s.table}`"
            )
        if row["schema_version"] < SCHEMA_VERSION:
            # e.g. version 1 has no workers.instance, which the heartbeat needs
            raise SchemaError(
                f"{s.schema}.{s.table} has schema version {row['schema_version']}, older than this worker's "
                f"{SCHEMA_VERSION}: run `outboxctl migrate --database-url … --schema {s.schema} --table {s.table}` "
                "(idempotent, and safe while older workers run)"
            )
        if row["schema_version"] > SCHEMA_VERSION:
            self._check_newer_schema(row["schema_version"], row["compatible_from"])
        for name in (s.outbox, s.leases, s.workers, s.dead_letters):
            if await self.pool.fetchval("SELECT to_regclass($1)", name) is None:
                raise SchemaError(f"table {name} is missing: run `outboxctl migrate`")
        await self._check_privileges()
        partitions = int(row["partitions"])
        await self.pool.execute(s.lease_seed, self.publisher, partitions)
        return partitions

    def _needed_privileges(self) -> list[tuple[str, str]]:
        """(table, privilege) the worker's statements need: claims read and lock the outbox, marks
        update or delete its rows, a dead letter moves from the outbox into the dead letters, the
        leases and the workers' heartbeats are inserted, renewed and removed."""
        s = self.sql
        return [
            *((s.outbox, p) for p in ("SELECT", "UPDATE", "DELETE")),
            *((s.leases, p) for p in ("SELECT", "INSERT", "UPDATE")),
            *((s.workers, p) for p in ("SELECT", "INSERT", "UPDATE", "DELETE")),
            *((s.dead_letters, p) for p in ("SELECT", "INSERT")),
        ]

    async def _check_privileges(self) -> None:
        """Raise SchemaError naming the GRANTs when the role lacks a privilege the worker needs.

        Checked at start because a missing one is not seen at once: without DELETE (or UPDATE) on the
        outbox every mark fails after its rows were published, the rows are published again, and
        copies sent after the stream's duplicate window are stored twice."""
        needed = self._needed_privileges()
        rows = await self.pool.fetch(
            "SELECT t, p, current_user FROM unnest($1::text[], $2::text[]) AS need(t, p) "
            "WHERE NOT has_table_privilege(t, p)",
            [t for t, _ in needed],
            [p for _, p in needed],
        )
        if rows:
            missing = [(str(r[0]), str(r[1])) for r in rows]
            role = str(rows[0][2])
            grants = self._grants(missing, role)
            raise SchemaError(f"the database role {role} lacks privileges the worker needs: {grants}")

    @staticmethod
    def _grants(missing: list[tuple[str, str]], role: str) -> str:
        """``GRANT <privileges> ON <table> TO <role>`` for each table of ``missing``, in order."""
        by_table: dict[str, list[str]] = {}
        for table, privilege in missing:
            by_table.setdefault(table, []).append(privilege)
        grants = "; ".join(f'GRANT {", ".join(p)} ON {t} TO "{role}"' for t, p in by_table.items())
        return f"run {grants} (as the tables' owner)"

    def _check_newer_schema(self, version: int, compatible_from: int | None) -> None:
        """The table was migrated by a newer release: warn if this worker may still run against it,
        raise SchemaError if not."""
        table = f"{self.sql.schema}.{self.sql.table}"
        if compatible_from is not None and compatible_from <= SCHEMA_VERSION:
            log.warning(
                "%s has schema version %d, newer than this worker's %d; it is compatible with workers of "
                "schema version %d and newer, so this worker runs: roll out the new worker image (the "
                "release whose `outboxctl migrate` upgraded the table)",
                table,
                version,
                SCHEMA_VERSION,
                compatible_from,
            )
            return
        if compatible_from is None:
            level = "records no compatibility level"
        else:
            level = f"needs workers of schema version {compatible_from} or newer"
        raise SchemaError(
            f"{table} has schema version {version}, newer than this worker's {SCHEMA_VERSION}, and {level}: "
            "roll out the new worker image (the release whose `outboxctl migrate` upgraded the table)"
        )

    # --- membership and leases --------------------------------------------------------------------
    async def heartbeat(self, ttl: float) -> list[str]:
        """Renew this worker's heartbeat row; returns the live worker ids (this one included, sorted).
        Raises :class:`DuplicateWorkerError` if a live process of another instance holds the row."""
        row = await self.pool.fetchrow(self.sql.heartbeat, self.publisher, self.owner, ttl, self.instance)
        assert row is not None
        if not row["mine"]:
            raise DuplicateWorkerError(self._duplicate_message())
        return list(row["live"])

    async def join(self, ttl: float, poll: float = 0.2) -> list[str]:
        """Take this worker id's heartbeat row, or raise :class:`DuplicateWorkerError` if a live
        process holds it. Waits at most until the row's expiry (``ttl`` plus one ``poll``): a row
        left by a crashed process of the same id (a restarted container) expires unrenewed and is
        taken; a row renewed meanwhile belongs to a live process."""
        deadline = time.monotonic() + ttl + poll
        seen = None
        while True:
            try:
                return await self.heartbeat(ttl)
            except DuplicateWorkerError:
                row = await self.pool.fetchrow(self.sql.worker_row, self.publisher, self.owner)
                if row is not None and row["live"]:
                    if seen is not None and row["expires_at"] > seen:
                        raise  # renewed while we watched: a live peer
                    seen = row["expires_at"]
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(poll)

    def _duplicate_message(self) -> str:
        return (
            f"worker id {self.owner!r} of publisher {self.publisher!r} is in use by another live worker "
            "process: give each worker its own OUTBOX_WORKER_ID (or leave it empty for hostname plus a "
            "random suffix)"
        )

    async def leave(self) -> None:
        await self.pool.execute(self.sql.worker_leave, self.publisher, self.owner, self.instance)

    async def renew(self, fence: Fence, ttl: float) -> dict[int, int]:
        if not fence.partitions:
            return {}
        rows = await self.pool.fetch(
            self.sql.lease_renew, self.publisher, self.owner, fence.partitions, fence.epochs, ttl
        )
        return {r[0]: r[1] for r in rows}

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        if count <= 0:
            return {}
        rows = await self.pool.fetch(self.sql.lease_acquire, self.publisher, self.owner, count, ttl)
        return {r[0]: r[1] for r in rows}

    async def release(self, fence: Fence) -> list[int]:
        if not fence.partitions:
            return []
        rows = await self.pool.fetch(self.sql.lease_release, self.publisher, self.owner, fence.partitions, fence.epochs)
        return [r[0] for r in rows]

    async def announce_lease_change(self) -> None:
        """Tell the other workers of this table that shares changed (this worker joined, released
        partitions, or left), so they rebalance now instead of at their next lease tick. Best effort:
        a failed announcement only delays the handover to that tick, so it is logged, not raised,
        whatever the failure: besides refused connections and timeouts, asyncpg raises InterfaceError
        (a closed pool) and InternalClientError (a pooled connection PostgreSQL has just dropped,
        handed out before asyncpg noticed), and the worker announces its join outside any task that
        retries, so an escaped error ended the whole worker when the database died as it started."""
        try:
            await self.pool.execute(self.sql.lease_notify, self.sql.lease_channel, self.instance)
        except Exception as exc:
            log.warning("lease change announcement failed (%s); peers rebalance at their next tick", type(exc).__name__)

    async def lease_table(self) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(self.sql.lease_table, self.publisher))

    # --- rows -------------------------------------------------------------------------------------
    async def claim(
        self, partitions: Sequence[int], limit: int, ordered: bool, mark_first: MarkFirst | None = None
    ) -> Claim:
        """At most ``limit`` due pending rows of ``partitions``, spread over them (see Sql.claim_ordered),
        in (partition, id) order, and the partitions that may hold more right now.

        With ``mark_first``, the same statement also writes that mark, fenced, and the claim skips
        ``mark_first.skip`` (:meth:`Sql.claim_after_mark`); ``Claim.marked`` counts the rows changed.

        Each partition's share is ``limit`` over the partitions that had rows at their last claim,
        so a batch stays full when only a few partitions are busy; one that was idle still gets a
        share, and when the shares exceed ``limit`` every partition's last rows are cut first, so
        rows arriving in an idle partition wait at most one claim. When every partition had rows,
        or none did, the share is rounded down so the shares fit in ``limit`` and the cheaper uncut
        statement runs (the batch is then at most ``len(partitions) - 1`` rows short of ``limit``).

        **Payload bytes** (:meth:`limit_payloads`). A claim of ``n`` rows reads a payload only up to
        ``batch_bytes // n`` bytes (and never over ``max_payload``; one row alone, up to
        ``max_payload``), so its payloads add up to at most ``batch_bytes``, or one row's. A row whose
        payload is over that bound but within ``max_payload`` is left pending with every later row of
        its partition (a prefix of each partition stays, so ordering holds as for any claim), and the
        partition comes back in ``more``. The next claim given that partition claims it alone (with
        any other such partition), ``batch_bytes // size`` rows at most (at least one), so the large
        payload comes then; the other partitions it was given come back in ``more``, claimed at once
        by the next. Payloads up to ``batch_bytes // limit`` cost nothing more (the bound is a
        comparison per row in PostgreSQL); a partition of larger ones costs a second claim per batch.
        A payload over ``max_payload`` still comes as NULL, for the relay to dead-letter.
        """
        parts = list(partitions)
        if not parts:
            return Claim([], frozenset())
        later: list[int] = []  # partitions given but not claimed this time (see Payload bytes)
        large = [self._large[p] for p in parts if p in self._large]
        if large:
            later = [p for p in parts if p not in self._large]
            parts = [p for p in parts if p in self._large]
            limit = min(limit, max(1, self._batch_bytes // max(large)))
        bound = self._payload_bound(limit)
        busy = sum(1 for p in parts if p not in self._idle) or len(parts)
        share = max(1, limit // busy) if busy == len(parts) else -(-limit // busy)
        cut = share * len(parts) > limit
        marked = 0
        if mark_first is None:
            records = await self._hot_fetch(self._claim_sql(ordered, cut, None), parts, share, limit, bound)
        else:
            m = mark_first
            records = await self._hot_fetch(
                self._claim_sql(ordered, cut, m.delete),  # its arrays as text (Sql.claim_after_mark)
                self.publisher,
                self.owner,
                int_array(m.fence.partitions),
                int_array(m.fence.epochs),
                int_array(m.ids),
                int_array(parts),
                share,
                limit,
                int_array(m.skip),
                bound,
            )
            marked = records[0][-1]
            if records[0][0] is None:  # nothing to claim: the one row only carries the count
                records = []
        rows, counts, deferred = self._rows(records)
        full = cut and len(records) >= limit
        unknown = full and limit < len(parts)  # the cut may have taken a partition's first row
        if large or deferred:
            # A large partition the cut left out (fewer rows than large partitions, the lowest go
            # first) stays large: the next claim takes it before the claimed ones stop again.
            for p in parts:
                if p in counts or not unknown:
                    self._large.pop(p, None)
            self._large.update(deferred)
        for p in parts:
            if p in counts:
                self._idle.discard(p)
            elif not unknown:
                self._idle.add(p)
        if full:  # cut to the limit: any partition that had rows, or might have, may have more
            more = frozenset(p for p in parts if p in counts or unknown)
        else:
            more = frozenset(p for p, n in counts.items() if n >= share or p in deferred)
        return Claim(rows, more.union(later) if later else more, marked)

    def _payload_bound(self, rows: int) -> int:
        """The largest payload a claim of ``rows`` rows reads (see :meth:`claim`)."""
        bound = self._max_payload or UNBOUNDED_PAYLOAD
        if self._batch_bytes and rows > 1:
            bound = min(bound, self._batch_bytes // rows)
        return bound

    def _rows(self, records: list[asyncpg.Record]) -> tuple[list[OutboxRow], dict[int, int], dict[int, int]]:
        """In one pass over the records (they come in (partition, id) order): the claimed rows, each
        partition's cut before its first payload the claim left out for its byte budget (not for
        max_payload: the relay dead-letters those); {partition: records claimed}, cut ones included,
        for the shares; and {partition: size of the payload it was cut at}."""
        deferred: dict[int, int] = {}
        counts: dict[int, int] = {}  # a Counter costs ~4x for a handful
        rows: list[OutboxRow] = []
        max_payload = self._max_payload or UNBOUNDED_PAYLOAD
        for r in records:
            partition = r[2]
            counts[partition] = counts.get(partition, 0) + 1
            if partition in deferred:
                continue
            if r[7] is None and r[SIZE] <= max_payload:
                deferred[partition] = r[SIZE]
                continue
            rows.append(_row(r))
        return rows, counts, deferred

    def _claim_sql(self, ordered: bool, cut: bool, mark_delete: bool | None) -> str:
        """The claim statement of this kind (built once: the text takes ~10 µs to format), with a
        mark first unless ``mark_delete`` is None."""
        key = (ordered, cut, mark_delete)
        stmt = self._claims.get(key)
        if stmt is None:
            sql = self.sql
            if mark_delete is not None:
                stmt = sql.claim_after_mark(ordered=ordered, cut=cut, delete=mark_delete)
            elif ordered:
                stmt = sql.claim_ordered if cut else sql.claim_ordered_uncut
            else:
                stmt = sql.claim_unordered if cut else sql.claim_unordered_uncut
            self._claims[key] = stmt
        return stmt

    async def mark_done(self, fence: Fence, ids: Sequence[int], delete: bool) -> int:
        """Delete (or mark published) acked rows, only while ``fence`` still holds. Returns rows changed."""
        if not ids:
            return 0
        stmt = self.sql.mark_delete if delete else self.sql.mark_published
        status = await self.pool.execute(stmt, self.publisher, self.owner, fence.partitions, fence.epochs, list(ids))
        return int(status.split()[-1])

    async def mark_failed(
        self, fence: Fence, ids: Sequence[int], errors: Sequence[str], delays: Sequence[float]
    ) -> int:
        if not ids:
            return 0
        status = await self.pool.execute(
            self.sql.mark_failed,
            self.publisher,
            self.owner,
            fence.partitions,
            fence.epochs,
            list(ids),
            list(errors),
            list(delays),
        )
        return int(status.split()[-1])

    async def dead_letter(self, fence: Fence, ids: Sequence[int], reasons: Sequence[str]) -> list[int]:
        """Move rows to the dead letters while ``fence`` holds; returns the ids moved."""
        if not ids:
            return []
        rows = await self.pool.fetch(
            self.sql.dead_letter, self.publisher, self.owner, fence.partitions, fence.epochs, list(ids), list(reasons)
        )
        return [r[0] for r in rows]

    async def retention_sweep(
        self, retention: float, limit: int = RETENTION_BATCH, budget_seconds: float = RETENTION_BUDGET_SECONDS
    ) -> int:
        """With ``mark_mode=mark``: delete published rows older than ``retention`` seconds, ``limit``
        per statement (each its own short transaction), statement after statement while one takes
        its whole ``limit`` and ``budget_seconds`` are not spent; returns how many.

        Bound: the worker sweeps once a minute. One statement a minute (as before) removed at most
        ~166 rows/s per worker, so above that rate published rows piled up past the retention for
        good; with the budget a sweep keeps up with thousands of rows per second, and a sweep never
        runs longer than its budget plus one statement."""
        deadline = time.monotonic() + budget_seconds
        total = 0
        while True:
            status = await self.pool.execute(self.sql.retention_sweep, retention, limit)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < limit or time.monotonic() >= deadline:
                return total

    async def pressure(self, partitions: Sequence[int]) -> tuple[int, float]:
        """Pending rows of ``partitions`` and the age in seconds of the oldest one."""
        row = await self.pool.fetchrow(self.sql.pressure, list(partitions))
        assert row is not None
        return int(row[0]), float(row[1])

    async def dead_letters_waiting(self, cap: int) -> int:
        """This publisher's rows in the dead-letter table now (left there until ``outboxctl
        dead-letters`` requeues or discards them), counted up to ``cap``."""
        return int(await self.pool.fetchval(self.sql.dead_letters_waiting, self.publisher, cap))


def _open(conn: asyncpg.Connection) -> bool:
    """Whether a connection taken from the pool is still open. When PostgreSQL closes it, the pool
    takes it back by itself, and the connection then raises on every call."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _pass_payload_to(on_payload: Callable[[str], None]) -> Callable[..., None]:
    """An asyncpg listener callback (connection, pid, channel, payload) that hands on the payload."""

    def handle(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        on_payload(payload)

    return handle


class Listener:
    """LISTEN on the outbox channel on a dedicated connection; calls ``wake`` on every NOTIFY.

    If the connection drops, it reconnects with backoff (:func:`backoff_delay`, 0.2 s up to 10 s);
    meanwhile the relay's poll interval keeps it working (NOTIFY only lowers latency, it is never
    needed for correctness).

    Moderation (``window`` seconds, 0 off): after a NOTIFY has woken the worker, the connection's
    socket is left unread for ``window``; the NOTIFYs of the commits made meanwhile wait in the socket
    and are read together when the window ends, as one wake-up. A commit made after a claim's
    snapshot is therefore claimed at most ``window`` later than without moderation, and a worker
    woken by every commit of a steady stream of one-event transactions claims and publishes them in
    batches instead of one by one (each wake-up costs a claim and a publish round trip; the mark
    rides on the next claim, see ``AckedRows``). The first NOTIFY after a quiet spell still wakes the
    worker at once.

    Probe: after each LISTEN it sends a NOTIFY of its own through another connection of the same
    database URL and waits up to NOTIFY_PROBE_TIMEOUT_SECONDS for it. When it does not come back (a
    transaction-mode pooler such as PgBouncer's ``pool_mode=transaction`` runs LISTEN on a server
    connection it then hands to other clients), or LISTEN fails, :attr:`notify_error` says so: the
    worker still relays, by the poll, and reports it (the operator's ``Degraded=NotifyUnavailable``)
    instead of being slow without a word. Other workers of the table ignore the probe (workers of
    releases before it take it for a new row: one claim that finds nothing).
    """

    def __init__(self, dsn: str, sql: Sql, wake: Callable[[], None], window: float = 0.0) -> None:
        self._dsn = dsn
        self._sql = sql
        self._wake = wake
        self._window = window
        self._also: dict[str, Callable[[str], None]] = {}
        self._transport: _Pausable | None = None  # of the listening connection
        self._resume: asyncio.TimerHandle | None = None  # when the moderation window ends
        self.reads_paused = 0  # moderation windows started (a test reads it)
        # Why NOTIFYs do not reach this worker, one line; "" while they do (or before the first probe).
        self.notify_error = ""
        self.probes_answered = 0  # probes that came back (a test reads it)
        self._probe: tuple[str, asyncio.Event] | None = None  # the payload awaited, and its arrival
        self._listen_failed = False  # notify_error is a failed LISTEN's (not a probe's verdict)

    def also_listen(self, channel: str, on_payload: Callable[[str], None]) -> None:
        """Also LISTEN on ``channel`` (call before :meth:`run`): ``on_payload`` gets each NOTIFY's
        payload, and ``""`` after every (re)connect, since notifications may have been missed."""
        self._also[channel] = on_payload

    async def run(self) -> None:
        failures = 0  # since the last connection that listened
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(self._sql.channel, self._on_notify)
                for channel, on_payload in self._also.items():
                    await conn.add_listener(channel, _pass_payload_to(on_payload))
                self._transport = _read_transport(conn) if self._window > 0 else None
                failures = 0
                if self._listen_failed:  # that error is over, whatever the probe says (it may not be sent)
                    self.notify_error, self._listen_failed = "", False
                self._wake()  # rows may have arrived while we were not listening
                for on_payload in self._also.values():
                    on_payload("")  # so may have announcements
                await self._check_delivery()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN connection failed (%s); polling meanwhile", type(exc).__name__)
                self.notify_error = (
                    f"LISTEN failed ({type(exc).__name__}): new rows are found by the poll "
                    "(pollIntervalSeconds) until it works again"
                )
                self._listen_failed = True
            finally:
                self._end_window()
                self._transport = None
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            failures += 1
            await asyncio.sleep(backoff_delay(failures, LISTEN_RETRY_INITIAL_SECONDS, LISTEN_RETRY_MAX_SECONDS))

    async def _check_delivery(self) -> None:
        """The probe (see the class): send a NOTIFY on another connection, wait for it here."""
        token = f"{NOTIFY_PROBE_PREFIX}{uuid.uuid4().hex}"
        arrived = asyncio.Event()
        self._probe = (token, arrived)
        try:
            try:
                sender = await asyncpg.connect(self._dsn, timeout=10)
                try:
                    await sender.execute(self._sql.notify, self._sql.channel, token)
                finally:
                    await sender.close(timeout=5)
            except Exception as exc:  # any: the probe is best effort, and the LISTEN itself still works
                log.warning("could not send the NOTIFY probe (%s); trying again at the next LISTEN", type(exc).__name__)
                return
            try:
                async with asyncio.timeout(NOTIFY_PROBE_TIMEOUT_SECONDS):
                    await arrived.wait()
            except TimeoutError:
                self.notify_error = (
                    f"NOTIFY does not reach this worker (its probe did not come back within "
                    f"{NOTIFY_PROBE_TIMEOUT_SECONDS:g}s): is the database URL a transaction-mode pooler "
                    "(PgBouncer pool_mode=transaction)? New rows wait for the poll (pollIntervalSeconds) and "
                    "partitions change hands at the lease poll; connect directly or through a session-mode pool"
                )
                log.warning("%s", self.notify_error)
                return
            if self.notify_error:
                log.info("NOTIFY reaches this worker again")
            self.notify_error = ""
            self.probes_answered += 1
        finally:
            self._probe = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith(NOTIFY_PROBE_PREFIX):  # a probe: this worker's, or another's to ignore
            probe = self._probe
            if probe is not None and payload == probe[0]:
                probe[1].set()
            return
        self._wake()
        transport = self._transport
        if transport is not None and self._resume is None:
            transport.pause_reading()
            self.reads_paused += 1
            self._resume = asyncio.get_running_loop().call_later(self._window, self._end_window)

    def _end_window(self) -> None:
        """Read the socket again: the NOTIFYs that arrived meanwhile wake the worker once."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()


class _Pausable(Protocol):
    """What the moderation needs of a transport (asyncio's and uvloop's both have it)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: ...


def _read_transport(conn: asyncpg.Connection) -> _Pausable | None:
    """The socket transport under an asyncpg connection, to pause reading it; None if this asyncpg
    keeps it elsewhere (moderation then stays off: every NOTIFY wakes the worker, as without it).
    asyncpg has no public API for this; the transport is only paused and resumed, never read."""
    transport = getattr(conn, "_transport", None)
    if all(callable(getattr(transport, name, None)) for name in ("pause_reading", "resume_reading", "is_closing")):
        return cast(_Pausable, transport)
    return None
