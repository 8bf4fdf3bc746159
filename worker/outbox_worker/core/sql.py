"""Every SQL statement the relay runs, in one place. Pure: text only, no I/O.

Identifiers (schema, table) are validated by :func:`outbox_common.settings.validate_identifier` and
then quoted; every value is a bound parameter. Nothing from configuration or from rows is ever
formatted into SQL text except those validated identifiers and the integer partition count.

Tables, for an outbox named ``<schema>.<table>``:

- ``<table>``: the outbox (the application's contract, see README).
- ``<table>_leases``: one row per (publisher, partition) with owner, epoch (fencing token) and expiry.
- ``<table>_workers``: heartbeats of live workers, to compute fair shares.
- ``<table>_dead_letters``: rows that can never be published, with the reason.
- ``<table>_requeued``: dead letters put back into the outbox, with the id each was re-inserted as.
- ``outbox_meta``: schema version, compatibility level and partition count of each outbox table in the
  schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from outbox_common.settings import MAX_TABLE_LENGTH, schema_and_table_problem, validate_identifier

# 1: the tables. 2: CHECK that created_at has an RFC 3339 form (NOT VALID: rows already in the table
# are not checked; the relay dead-letters those); workers.instance (duplicate worker ids are refused).
SCHEMA_VERSION = 2
# The oldest worker schema version that may run against the tables as this release's migration
# leaves them, recorded in ``outbox_meta.compatible_from``: a worker of an older schema version (from
# the release that introduced the column on) runs against a newer table when its version is at least
# this. When you raise SCHEMA_VERSION, keep this as it is if the migration only adds what older
# workers ignore (a column with a default, an index); raise it to the new SCHEMA_VERSION when the
# migration makes the tables unusable for older workers (a column they must fill, a column or a
# meaning they rely on that changes), and say so in the release notes. It never goes down: it
# covers every migration up to this one.
COMPATIBLE_FROM = 2
MAX_PARTITIONS = 4096
DEFAULT_PARTITIONS = 16  # `outboxctl migrate`, demo and bench when --partitions is not given
# Longest aggregate_id (bytes) a retry backoff puts into the held index (see Sql.mark_failed): a btree
# entry holds at most ~2.7 KB, partition and id included, and random text does not compress.
MAX_HELD_AGGREGATE_ID_BYTES = 2000
# The times RFC 3339 can write (years 0001-9999): the table's CHECK and the claim's rendering agree.
CREATED_AT_IN_RANGE = "created_at >= '0001-01-01 00:00:00+00' AND created_at < '10000-01-01 00:00:00+00'"


def int_array(values: Iterable[int]) -> str:
    """``values`` as PostgreSQL's text of an integer array (``{1,2,3}``), for a parameter that
    :func:`literal_arrays` declared as text."""
    return "{" + ",".join(map(str, values)) + "}"


def literal_arrays(statement: str) -> str:
    """``statement`` with its integer array parameters (``$n::int[]``, ``$n::bigint[]``) taken as
    text and cast in PostgreSQL (``$n::text::int[]``): the caller passes :func:`int_array`'s text.

    Why: asyncpg's array encoder checks each element, and each array three times, against a
    ``collections.abc`` class (~0.4 µs each for an int): a claim carrying a mark passes five arrays,
    ~40 elements at one event per commit, and runs once per wake-up. The text costs ~1 µs per array
    to build, its cast in PostgreSQL less; the statement's plan is the same
    (tests/integration/test_migrate.py)."""
    return re.sub(r"(\$\d+)::(int|bigint)\[\]", r"\1::text::\2[]", statement)


@dataclass(frozen=True)
class Sql:
    """The statements of one outbox table. Build with :meth:`for_table`."""

    schema: str
    table: str

    @classmethod
    def for_table(cls, schema: str, table: str) -> Sql:
        validate_identifier(schema, "schema")
        validate_identifier(table, "table")
        if len(table) > MAX_TABLE_LENGTH:
            raise ValueError(f"table={table!r} is too long: at most {MAX_TABLE_LENGTH} characters")
        problem = schema_and_table_problem(schema, table, "schema", "table")
        if problem:
            raise ValueError(problem)
        return cls(schema, table)

    # --- names ----------------------------------------------------------------------------------
    def _q(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'

    @property
    def outbox(self) -> str:
        return self._q(self.table)

    @property
    def leases(self) -> str:
        return self._q(self.table + "_leases")

    @property
    def workers(self) -> str:
        return self._q(self.table + "_workers")

    @property
    def dead_letters(self) -> str:
        return self._q(self.table + "_dead_letters")

    @property
    def requeued(self) -> str:
        return self._q(self.table + "_requeued")

    @property
    def meta(self) -> str:
        return self._q("outbox_meta")

    @property
    def channel(self) -> str:
        """NOTIFY channel (a quoted identifier for LISTEN; the same text for pg_notify)."""
        return f"{self.schema}.{self.table}"

    @property
    def lease_channel(self) -> str:
        """NOTIFY channel of lease changes: a worker joined, released partitions, or left. The payload
        is the sender's instance token, so a worker can ignore its own announcements."""
        return f"{self.schema}.{self.table}_leases"

    @property
    def notify(self) -> str:
        """$1 channel, $2 payload: a NOTIFY, as the listener's delivery probe sends it."""
        return "SELECT pg_notify($1, $2)"

    @property
    def lease_notify(self) -> str:
        """$1 channel, $2 instance token: announce a lease change to every worker of the table."""
        return "SELECT pg_notify($1, $2)"

    # --- migration ------------------------------------------------------------------------------
    def migration(self, partitions: int) -> list[str]:
        """DDL that creates or upgrades the tables, in a schema that exists (:attr:`schema_creation`);
        every statement is idempotent.

        The partition of a row is a stored generated column: a stable hash of ``aggregate_id``
        modulo ``partitions``. It is fixed when the table is created (see :meth:`meta_select`).

        Why this size: one migration script, read top-down as the SQL it runs.
        """
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions={partitions}: use 1..{MAX_PARTITIONS}")
        t = self.table
        return [
            *self.meta_migration,
            f"""CREATE TABLE IF NOT EXISTS {self.outbox} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id uuid NOT NULL DEFAULT gen_random_uuid(),
                aggregate_type text NOT NULL,
                aggregate_id text NOT NULL,
                event_type text NOT NULL,
                tenant text NOT NULL DEFAULT '',
                payload bytea NOT NULL,
                headers jsonb NOT NULL DEFAULT '{{}}'::jsonb,
                created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                not_before timestamptz,
                attempts int NOT NULL DEFAULT 0,
                last_error text,
                published_at timestamptz,
                partition int NOT NULL GENERATED ALWAYS AS
                    (((hashtextextended(aggregate_id, 0) & 2147483647) % {int(partitions)})::int) STORED,
                CONSTRAINT "{t}_event_id_key" UNIQUE (event_id),
                CONSTRAINT "{t}_headers_object" CHECK (jsonb_typeof(headers) = 'object'))""",
            # Pending rows of a partition in id order: the claim walks this and nothing else.
            f'CREATE INDEX IF NOT EXISTS "{t}_pending_idx" ON {self.outbox} (partition, id) WHERE published_at IS NULL',
            # Held-back rows (delayed publish or retry backoff), probed per claimed row.
            f'CREATE INDEX IF NOT EXISTS "{t}_held_idx" ON {self.outbox} (partition, aggregate_id, id) '
            "WHERE not_before IS NOT NULL AND published_at IS NULL",
            f'CREATE INDEX IF NOT EXISTS "{t}_published_idx" ON {self.outbox} (published_at) '
            "WHERE published_at IS NOT NULL",
            f"""CREATE TABLE IF NOT EXISTS {self.leases} (
                publisher text NOT NULL,
                partition int NOT NULL,
                owner text,
                epoch bigint NOT NULL DEFAULT 0,
                expires_at timestamptz NOT NULL DEFAULT '-infinity',
                PRIMARY KEY (publisher, partition))""",
            f"""CREATE TABLE IF NOT EXISTS {self.workers} (
                publisher text NOT NULL,
                worker_id text NOT NULL,
                expires_at timestamptz NOT NULL,
                PRIMARY KEY (publisher, worker_id))""",
            f"""CREATE TABLE IF NOT EXISTS {self.dead_letters} (
                id bigint PRIMARY KEY,
                event_id uuid NOT NULL,
                aggregate_type text NOT NULL,
                aggregate_id text NOT NULL,
                event_type text NOT NULL,
                tenant text NOT NULL,
                payload bytea NOT NULL,
                headers jsonb NOT NULL,
                created_at timestamptz NOT NULL,
                attempts int NOT NULL,
                reason text NOT NULL,
                publisher text NOT NULL,
                dead_at timestamptz NOT NULL DEFAULT now())""",
            # --- schema version 2 ---
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_constraint
                               WHERE conrelid = '{self.outbox}'::regclass AND conname = '{t}_rfc3339') THEN
                    ALTER TABLE {self.outbox} ADD CONSTRAINT "{t}_rfc3339"
                        CHECK ({CREATED_AT_IN_RANGE}) NOT VALID;
                END IF;
                END $$""",
            f"ALTER TABLE {self.workers} ADD COLUMN IF NOT EXISTS instance text",
            # Requeued dead letters (outboxctl dead-letters requeue): which outbox id each event was
            # re-inserted as, an audit trail for operators and the history checker.
            f"""CREATE TABLE IF NOT EXISTS {self.requeued} (
                outbox_id bigint PRIMARY KEY,
                event_id uuid NOT NULL,
                dead_id bigint NOT NULL,
                reason text NOT NULL,
                requeued_at timestamptz NOT NULL DEFAULT now())""",
            f"""CREATE OR REPLACE FUNCTION "{self.schema}"."{t}_notify"() RETURNS trigger
                LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_notify('{self.channel}', ''); RETURN NULL; END $$""",
            f'CREATE OR REPLACE TRIGGER "{t}_notify" AFTER INSERT ON {self.outbox} '
            f'FOR EACH STATEMENT EXECUTE FUNCTION "{self.schema}"."{t}_notify"()',
        ]

    @property
    def schema_exists(self) -> str:
        """Whether the schema exists (a bool): the migration creates it only when it does not."""
        return "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)"

    @property
    def schema_creation(self) -> str:
        """DDL of the schema, run by the migration before :meth:`migration` only when the schema is
        missing: PostgreSQL checks CREATE on the database even for ``CREATE SCHEMA IF NOT EXISTS`` of
        a schema that exists, and a role given its own schema by an administrator has no such right."""
        return f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'

    @property
    def meta_migration(self) -> list[str]:
        """DDL of ``outbox_meta``, shared by every outbox table of the schema; idempotent. Part of
        :meth:`migration`, and run first, on its own, by the migration (before it reads the table).

        ``compatible_from`` (see :data:`COMPATIBLE_FROM`) came after schema version 2 without a new
        version: workers read it with :attr:`meta_select`, which tolerates its absence. Its
        ``ALTER TABLE`` holds an exclusive lock on ``outbox_meta`` until the migration commits, so it
        runs only when the column is missing (else every migration of the schema, and every worker
        starting, would wait for each migration to end), and before the migration reads the table
        (else two migrations of different tables, each holding a read lock the other's ALTER waits
        for, deadlock)."""
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.meta} (
                table_name text PRIMARY KEY,
                partitions int NOT NULL,
                schema_version int NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now())""",
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_attribute
                               WHERE attrelid = '{self.meta}'::regclass AND attname = 'compatible_from'
                                 AND NOT attisdropped) THEN
                    ALTER TABLE {self.meta} ADD COLUMN IF NOT EXISTS compatible_from int;
                END IF;
                END $$""",
        ]

    @property
    def meta_select(self) -> str:
        """$1 table: its partitions, schema_version and compatible_from, or no row.

        ``compatible_from`` is NULL when the table does not record one: a row written by a release
        before it, or an ``outbox_meta`` without the column (read through ``to_jsonb``, so this
        statement runs against both)."""
        return (
            "SELECT partitions, schema_version, (to_jsonb(m) ->> 'compatible_from')::int AS compatible_from "
            f"FROM {self.meta} AS m WHERE table_name = $1"
        )

    @property
    def meta_insert(self) -> str:
        """$1 table, $2 partitions, $3 schema version, $4 compatible_from: record a migration.
        Returns the row's schema_version and compatible_from after it.

        Neither ever goes down (GREATEST): a concurrent or older migration leaves a newer one's
        values. A NULL compatible_from counts as the row's schema_version, as workers read it (only
        workers of that version run against it). Releases before the column insert and update only
        schema_version: they leave compatible_from as it is, and NULL on a row they create."""
        return (
            f"INSERT INTO {self.meta} AS m (table_name, partitions, schema_version, compatible_from) "
            "VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (table_name) DO UPDATE SET "
            "schema_version = GREATEST(m.schema_version, excluded.schema_version), "
            "compatible_from = GREATEST(COALESCE(m.compatible_from, m.schema_version), excluded.compatible_from) "
            "RETURNING schema_version, compatible_from"
        )

    @property
    def advisory_lock(self) -> str:
        """Serialises concurrent migrations of one table (a transaction-level advisory lock)."""
        return "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))"

    # --- leases (times come from the database clock) --------------------------------------------
    @property
    def lease_seed(self) -> str:
        """$1 publisher, $2 partitions: make sure one lease row exists per partition."""
        return (
            f"INSERT INTO {self.leases} (publisher, partition) "
            "SELECT $1, g FROM generate_series(0, $2 - 1) AS g ON CONFLICT DO NOTHING"
        )

    @property
    def heartbeat(self) -> str:
        """$1 publisher, $2 worker, $3 ttl seconds, $4 instance token. One row: ``live`` (the live
        workers, this one included, sorted) and ``mine`` (whether the heartbeat row is this
        instance's).

        The row of a worker id belongs to one process instance: the heartbeat renews it only if it is
        this instance's, expired, or from a worker without instances (schema version 1). A live row
        of another instance is left alone and ``mine`` is false: two processes share the id."""
        return f"""
            WITH hb AS (
                INSERT INTO {self.workers} AS w (publisher, worker_id, expires_at, instance)
                VALUES ($1, $2, now() + make_interval(secs => $3), $4)
                ON CONFLICT (publisher, worker_id) DO UPDATE
                SET expires_at = excluded.expires_at, instance = excluded.instance
                WHERE w.instance = excluded.instance OR w.instance IS NULL OR w.expires_at <= now()
                RETURNING 1)
            SELECT ARRAY(SELECT worker_id FROM {self.workers}
                         WHERE publisher = $1 AND expires_at > now() AND worker_id <> $2
                         UNION SELECT $2
                         ORDER BY 1) AS live,
                   EXISTS (SELECT 1 FROM hb) AS mine"""

    @property
    def worker_row(self) -> str:
        """$1 publisher, $2 worker: the heartbeat row of that id (instance, expiry), if any."""
        return (
            f"SELECT instance, expires_at, expires_at > now() AS live FROM {self.workers} "
            "WHERE publisher = $1 AND worker_id = $2"
        )

    @property
    def worker_leave(self) -> str:
        """$1 publisher, $2 worker, $3 instance: remove this instance's row (never a peer's that
        uses the same id) and rows dead for an hour."""
        return (
            f"DELETE FROM {self.workers} WHERE publisher = $1 "
            "AND ((worker_id = $2 AND instance IS NOT DISTINCT FROM $3) OR expires_at < now() - interval '1 hour')"
        )

    @property
    def lease_renew(self) -> str:
        """$1 publisher, $2 owner, $3 partitions[], $4 epochs[], $5 ttl. Returns the renewed ones.

        A lease whose epoch moved on (another worker took it) is not renewed: it is lost. Nor is one
        that has expired on the database clock, even if nobody took it yet: its holder must not
        extend a lease another worker may already be acquiring (the caller then treats it as lost
        and may acquire it again, under a new epoch).
        """
        return f"""
            UPDATE {self.leases} AS l SET expires_at = now() + make_interval(secs => $5)
            FROM unnest($3::int[], $4::bigint[]) AS mine(partition, epoch)
            WHERE l.publisher = $1 AND l.owner = $2 AND l.partition = mine.partition
              AND l.epoch = mine.epoch AND l.expires_at > now()
            RETURNING l.partition, l.epoch"""

    @property
    def lease_acquire(self) -> str:
        """$1 publisher, $2 owner, $3 how many, $4 ttl. Takes free or expired partitions.

        Each takeover increments the epoch: the fencing token every later mark must present.
        """
        return f"""
            UPDATE {self.leases} AS l
            SET owner = $2, epoch = l.epoch + 1, expires_at = now() + make_interval(secs => $4)
            FROM (SELECT partition FROM {self.leases}
                  WHERE publisher = $1 AND (owner IS NULL OR expires_at <= now())
                  ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED) AS free
            WHERE l.publisher = $1 AND l.partition = free.partition
            RETURNING l.partition, l.epoch"""

    @property
    def lease_release(self) -> str:
        """$1 publisher, $2 owner, $3 partitions[], $4 epochs[]: give leases back now."""
        return f"""
            UPDATE {self.leases} AS l SET owner = NULL, expires_at = now()
            FROM unnest($3::int[], $4::bigint[]) AS mine(partition, epoch)
            WHERE l.publisher = $1 AND l.owner = $2 AND l.partition = mine.partition
              AND l.epoch = mine.epoch
            RETURNING l.partition"""

    @property
    def lease_table(self) -> str:
        """$1 publisher: the whole lease table, for status and tests."""
        return (
            f"SELECT partition, owner, epoch, expires_at > now() AS live FROM {self.leases} "
            "WHERE publisher = $1 ORDER BY partition"
        )

    # --- claim ------------------------------------------------------------------------------------
    # created_at arrives as the text of its Outbox-Created-At header (envelope.created_at_text): decoding a
    # timestamptz into a datetime and formatting it again took ~1.3 µs of the worker's CPU per event,
    # to_char ~0.35 µs of PostgreSQL's. A time RFC 3339 cannot write (BC, year 10000 and later,
    # infinity; the table's CHECK refuses them since schema version 2, older rows may hold them)
    # arrives as '': the relay dead-letters it (invalid_created_at).
    #
    # The payload comes only up to the claim's payload bound ($PAYLOAD_BOUND, a parameter), else NULL,
    # and its size always (octet_length of a bytea reads its stored size, without fetching or
    # decompressing it). The store sets the bound so that a claim's payloads fit its byte budget and
    # the server's max_payload (OutboxStore.claim); a payload the claim leaves out stays in the table.
    _COLUMNS = (
        "o.id, o.event_id::text, o.partition, o.aggregate_type, o.aggregate_id, o.event_type, "
        "o.tenant, CASE WHEN octet_length(o.payload) <= $PAYLOAD_BOUND THEN o.payload END AS payload, "
        "o.headers::text, "
        f"CASE WHEN {CREATED_AT_IN_RANGE.replace('created_at', 'o.created_at')} "
        "THEN to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') "
        "ELSE '' END AS created_at, o.attempts, octet_length(o.payload) AS size"
    )

    _CLAIMED = (  # the same columns, by name, from the claim's inner query (size: after OutboxRow's)
        "id, event_id, partition, aggregate_type, aggregate_id, event_type, tenant, payload, headers, "
        "created_at, attempts"
    )

    @property
    def claim_ordered(self) -> str:
        """$1 partitions[], $2 rows per partition, $3 rows in all, $4 payload bound (bytes). Due pending
        rows: the first $2 of each partition in id order, at most $3 in all, returned in (partition, id)
        order, each with its payload only if it has at most $4 bytes (else NULL) and its size last.

        Spread over partitions: a batch of one partition holds several events of many aggregates,
        and per-aggregate order then splits it into several waves, each a round trip; the same
        number of rows over all the loop's partitions mostly fits in one wave.

        A row is skipped while an earlier row of the same aggregate is held back (delayed publish or
        retry backoff), so an aggregate's events never overtake each other. No row locks: the
        partition lease makes the caller the only publisher of these rows.

        When the shares add up to more than $3, the batch is cut fairly: every partition's last rows
        go first. :attr:`claim_ordered_uncut` is the same claim for shares that fit.
        """
        return self._claim(self._hold_back(), cut=True)

    @property
    def claim_ordered_uncut(self) -> str:
        """:attr:`claim_ordered` for callers whose shares add up to at most $3 ($2 * partitions <= $3),
        which then returns the same rows: without the fair cut's ranking, which cost PostgreSQL more
        than a third of a 1,000-row claim's CPU (docs/benchmarks.md). $3 stays a hard bound."""
        return self._claim(self._hold_back(), cut=False)

    @property
    def claim_unordered(self) -> str:
        """Like :attr:`claim_ordered`, without the per-aggregate hold-back."""
        return self._claim("", cut=True)

    @property
    def claim_unordered_uncut(self) -> str:
        """Like :attr:`claim_ordered_uncut`, without the per-aggregate hold-back."""
        return self._claim("", cut=False)

    def _hold_back(self) -> str:
        # OFFSET 0 keeps the hold-back a per-row probe of the held index by (partition, aggregate_id,
        # id). As a join, the planner could probe by partition only (the lateral's partition joins
        # the same equivalence class) and filter every held row of the partition for every candidate:
        # with thousands of rows in retry backoff, claims ran past the 5 s statement timeout.
        # The probes run only in a partition with a row in the held index: one look per partition
        # (a subquery of the partition alone, evaluated once per partition). Without held rows every
        # probe finds nothing, and the ~1,000 probes of a full claim were a fifth of its CPU. The
        # look is ordered like the held index, so no statistics can make it a scan of the table.
        return f"""
                  AND ((SELECT x.id FROM {self.outbox} AS x
                        WHERE x.partition BETWEEN p.partition AND p.partition
                          AND x.not_before IS NOT NULL AND x.published_at IS NULL
                        ORDER BY x.partition, x.aggregate_id, x.id
                        LIMIT 1) IS NULL
                       OR NOT EXISTS (
                          SELECT 1 FROM {self.outbox} AS h
                          WHERE h.partition = o.partition AND h.aggregate_id = o.aggregate_id
                            AND h.id < o.id AND h.not_before > now() AND h.published_at IS NULL
                          OFFSET 0))"""

    def _claim(self, hold_back: str, *, cut: bool, first: int = 1, excluding: bool = False) -> str:
        # Parameters $first (partitions[]), $first+1 (rows per partition), $first+2 (rows in all), with
        # ``excluding`` $first+3 (ids[] never to return: acked rows whose delete or mark rides on the
        # same statement, or on another one not yet answered), and last the payload bound (bytes).
        parts, share, limit = f"${first}::int[]", f"${first + 1}", f"${first + 2}"
        skip = f"\n                      AND o.id <> ALL(${first + 3}::bigint[])" if excluding else ""
        columns = self._COLUMNS.replace("$PAYLOAD_BOUND", f"${first + 4 if excluding else first + 3}")
        # Each partition is an index walk of (partition, id) over pending rows only. The partition is
        # matched as a range of one, in (partition, id) order, which only that index provides. With
        # `o.partition = p.partition` and `ORDER BY o.id`, the planner may walk the primary key in id
        # order and filter by partition (it did for the unordered claims on a table of pending rows):
        # a partition with no due rows then read every pending row of the others, 24 ms per claim
        # at 200k, growing with the backlog.
        per_partition = f"""
                FROM unnest({parts}) AS p(partition)
                CROSS JOIN LATERAL (
                    SELECT {columns} FROM {self.outbox} AS o
                    WHERE o.partition BETWEEN p.partition AND p.partition AND o.published_at IS NULL
                      AND (o.not_before IS NULL OR o.not_before <= now()){skip}{hold_back}
                    ORDER BY o.partition, o.id
                    LIMIT {share}) AS c"""
        if not cut:
            return f"""
            SELECT c.*{per_partition}
            ORDER BY c.partition, c.id
            LIMIT {limit}"""
        # The cut takes every partition's last rows first (rank, then partition), so each partition
        # with a due row keeps at least its first one.
        return f"""
            SELECT {self._CLAIMED}, size FROM (
                SELECT c.*, row_number() OVER (PARTITION BY c.partition ORDER BY c.id) AS rank{per_partition}
                ORDER BY rank, c.partition
                LIMIT {limit}) AS b
            ORDER BY b.partition, b.id"""

    def claim_after_mark(self, *, ordered: bool, cut: bool, delete: bool) -> str:
        """A mark and the next claim in one statement, one round trip instead of two.

        $1-$4 fence, $5 ids[] as in :attr:`mark_delete` (``delete``) or :attr:`mark_published`;
        $6-$8 as $1-$3 of :attr:`claim_ordered` (``ordered``; ``cut`` as there), $9 ids[] the claim
        must not return, $10 the payload bound ($4 there). Every array ($3, $4, $5, $6, $9) is passed
        as its text (:func:`int_array`, see :func:`literal_arrays`). Returns the claimed rows in
        (partition, id) order, each with the number of rows the mark changed in a last column; with
        no row to claim, one row of NULLs with that number.

        The mark runs once and to completion whatever the claim reads (a data-modifying WITH), and
        under the same fence, in the same transaction, as a mark on its own. The claim reads the
        snapshot the statement started with, which still shows the rows being deleted or marked:
        $9 must hold every id of $5 (and the ids of any mark not yet answered), or the claim would
        return them again."""
        hold_back = self._hold_back() if ordered else ""
        claim = self._claim(hold_back, cut=cut, first=6, excluding=True)
        # The statement commits without waiting for its WAL flush (synchronous_commit off for this
        # transaction only): a claim is read-only and returned at once, and a mark riding on it must
        # not add the disk's flush time to every claim (+1 ms p50 here, several on network disks). A
        # mark lost to a PostgreSQL crash leaves its rows pending; they are published again, and the
        # stream's duplicate window absorbs them, as for a mark that failed.
        return literal_arrays(f"""
            WITH {self._fence()},
            marked AS ({self._mark(delete=delete)} RETURNING 1)
            SELECT claimed.*, m.n AS marked
            FROM (SELECT count(*) AS n FROM marked) AS m
            CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush_wait
            LEFT JOIN ({claim}) AS claimed ON true
            ORDER BY claimed.partition, claimed.id""")

    # --- marks, all fenced by (publisher, owner, partition, epoch) in the same statement ---------
    # Each row's partition is checked against the fence's partitions read once into an array (an
    # InitPlan). Written as `o.partition IN (SELECT partition FROM fence)`, the planner joined every
    # row to a rescan of the fence (a nested loop), a cost that grows with the partitions a loop
    # holds: with 16 in the fence, ~1 ms of PostgreSQL CPU per 1,000-row delete, over a third of
    # the statement (docs/benchmarks.md, optimisation 21).
    _FENCED = "o.partition = ANY(ARRAY(SELECT partition FROM fence))"

    def _fence(self) -> str:
        # FOR SHARE: a concurrent takeover (which updates the lease row) either commits first, and
        # then the epoch no longer matches, or waits until this statement's transaction ends.
        return f"""fence AS (
                SELECT l.partition FROM {self.leases} AS l
                JOIN unnest($3::int[], $4::bigint[]) AS mine(partition, epoch)
                  ON l.partition = mine.partition AND l.epoch = mine.epoch
                WHERE l.publisher = $1 AND l.owner = $2
                FOR SHARE OF l)"""

    @property
    def mark_delete(self) -> str:
        """$1 publisher, $2 owner, $3 partitions[], $4 epochs[], $5 ids[]. Deletes acked rows."""
        return f"""
            WITH {self._fence()}
            {self._mark(delete=True)}"""

    @property
    def mark_published(self) -> str:
        """Same parameters as :attr:`mark_delete`; sets published_at instead of deleting."""
        return f"""
            WITH {self._fence()}
            {self._mark(delete=False)}"""

    def _mark(self, *, delete: bool) -> str:
        """The fenced mark of the acked rows $5, after ``WITH fence``: on its own or carried by a claim."""
        if delete:
            return f"""DELETE FROM {self.outbox} AS o
            WHERE o.id = ANY($5::bigint[]) AND {self._FENCED}"""
        return f"""UPDATE {self.outbox} AS o SET published_at = now()
            WHERE o.id = ANY($5::bigint[]) AND {self._FENCED}
              AND o.published_at IS NULL"""

    @property
    def mark_failed(self) -> str:
        """$1-$4 fence, $5 ids[], $6 errors[], $7 delays (seconds)[]: count an attempt, hold back.

        A held-back row enters the held index on (partition, aggregate_id, id), whose btree entries
        hold at most ~2.7 KB: an aggregate_id longer than :data:`MAX_HELD_AGGREGATE_ID_BYTES` would
        make the whole statement fail (and no attempt of the batch be counted). Such a row gets no
        not_before: its attempt is counted and it stays first of its aggregate, retried at the next
        claim of its partition instead of after the backoff."""
        return f"""
            WITH {self._fence()}
            UPDATE {self.outbox} AS o
            SET attempts = o.attempts + 1, last_error = f.err,
                not_before = CASE WHEN octet_length(o.aggregate_id) <= {MAX_HELD_AGGREGATE_ID_BYTES}
                                  THEN now() + make_interval(secs => f.delay) END
            FROM unnest($5::bigint[], $6::text[], $7::float8[]) AS f(id, err, delay)
            WHERE o.id = f.id AND {self._FENCED}"""

    @property
    def dead_letter(self) -> str:
        """$1-$4 fence, $5 ids[], $6 reasons[]: move rows to the dead-letter table, atomically.
        Returns the ids moved."""
        return f"""
            WITH {self._fence()},
            moved AS (
                DELETE FROM {self.outbox} AS o
                USING unnest($5::bigint[], $6::text[]) AS d(id, reason)
                WHERE o.id = d.id AND {self._FENCED}
                RETURNING o.*, d.reason)
            INSERT INTO {self.dead_letters}
                (id, event_id, aggregate_type, aggregate_id, event_type, tenant, payload, headers,
                 created_at, attempts, reason, publisher)
            SELECT id, event_id, aggregate_type, aggregate_id, event_type, tenant, payload, headers,
                   created_at, attempts + 1, reason, $1 FROM moved
            RETURNING id"""

    @property
    def retention_sweep(self) -> str:
        """$1 retention seconds, $2 limit: delete at most $2 published rows older than the retention
        (each worker runs it once a minute, so published rows are kept *at least* the retention)."""
        return f"""
            DELETE FROM {self.outbox} WHERE id IN (
                SELECT id FROM {self.outbox}
                WHERE published_at IS NOT NULL
                  AND published_at < now() - make_interval(secs => $1)
                LIMIT $2)"""

    # --- queue pressure ---------------------------------------------------------------------------
    @property
    def pressure(self) -> str:
        """$1 partitions[]: rows due for publishing, and how long the one due longest has waited.

        A row the producer delayed (``not_before`` later than now, never tried) is not due yet; once
        due it counts from its ``not_before``. Without this, events scheduled an hour ahead read as an
        hour of lag: the Lagging condition turned True and the lag autoscaler added workers for rows
        that must not be published yet. A row being retried (``attempts`` > 0, its ``not_before`` the
        relay's backoff) stays in, counted from ``created_at``: its wait is real."""
        return f"""
            SELECT count(*)::bigint,
                   COALESCE(EXTRACT(EPOCH FROM now() - min(
                       CASE WHEN attempts = 0 AND not_before IS NOT NULL THEN GREATEST(created_at, not_before)
                            ELSE created_at END)), 0)::float8
            FROM {self.outbox}
            WHERE partition = ANY($1::int[]) AND published_at IS NULL
              AND (not_before IS NULL OR attempts > 0 OR not_before <= now())"""

    @property
    def dead_letters_waiting(self) -> str:
        """$1 publisher, $2 cap: the publisher's rows in the dead-letter table now, counted up to the
        cap (a large table is not read to its end every sample)."""
        return f"""
            SELECT count(*)::bigint FROM (
                SELECT 1 FROM {self.dead_letters} WHERE publisher = $1 LIMIT $2) AS waiting"""

    # --- dead letters (outboxctl dead-letters) -----------------------------------------------------
    # One selection for list, requeue and discard; a NULL parameter leaves its filter out.
    # $1 ids[], $2 publisher, $3 aggregate_id, $4 reason prefix, $5 dead at least this many seconds
    # ago, $6 dead at most this many seconds ago.
    _DEAD_SELECTION = """
            ($1::bigint[] IS NULL OR d.id = ANY($1::bigint[]))
        AND ($2::text IS NULL OR d.publisher = $2::text)
        AND ($3::text IS NULL OR d.aggregate_id = $3::text)
        AND ($4::text IS NULL OR starts_with(d.reason, $4::text))
        AND ($5::float8 IS NULL OR d.dead_at <= now() - make_interval(secs => $5::float8))
        AND ($6::float8 IS NULL OR d.dead_at >= now() - make_interval(secs => $6::float8))"""

    @property
    def _dead_requeueable(self) -> str:
        """Whether a requeue may put the dead letter ``d`` back: its created_at has an RFC 3339 form
        (else the table's CHECK would refuse it) and its event id is not in the outbox. The adapter
        also skips a dead letter that is not the oldest of its event id (:attr:`dead_letter_later`)."""
        return f"""({CREATED_AT_IN_RANGE.replace("created_at", "d.created_at")}
                    AND NOT EXISTS (SELECT 1 FROM {self.outbox} AS o WHERE o.event_id = d.event_id))"""

    @property
    def dead_letter_later(self) -> str:
        """Ids of the dead letters that have an older one (a lower id) with the same event id, as
        when an event was dead-lettered twice: a requeue puts back the oldest only (the outbox takes
        one row per event id), and skips these. Usually none.

        A statement of its own, without parameters, over the whole table: planned with the table's
        statistics it is one pass (a hash join on the event id, which has no index). As a test per
        row of the selection statements it was a scan of the table per selected row under the pool's
        generic plans, which take the selection for a row or two (80,000 dead letters: past the
        statement timeout)."""
        return f"""
            SELECT l.id FROM {self.dead_letters} AS l
            WHERE EXISTS (SELECT 1 FROM {self.dead_letters} AS f WHERE f.event_id = l.event_id AND f.id < l.id)"""

    @property
    def dead_letter_list(self) -> str:
        """The selection ($1-$6, see above), $7 at most this many rows: dead letters in id order,
        without the payload (its size instead), with ``requeueable`` (:attr:`_dead_requeueable`)."""
        return f"""
            SELECT d.id, d.event_id::text, d.aggregate_type, d.aggregate_id, d.event_type, d.tenant,
                   octet_length(d.payload) AS payload_bytes, d.headers::text, d.created_at, d.attempts,
                   d.reason, d.publisher, d.dead_at,
                   {self._dead_requeueable} AS requeueable
            FROM {self.dead_letters} AS d
            WHERE {self._DEAD_SELECTION}
            ORDER BY d.id
            LIMIT $7"""

    @property
    def dead_letter_ids(self) -> str:
        """The selection ($1-$6): (id, requeueable) of every selected dead letter, in id order, not
        locked. Requeue and discard walk it through a cursor to find the rows to act on, and stop
        reading where their ``--limit`` is reached.

        Ids and flags only, read in one pass: a requeue or discard of 100k dead letters keeps a few
        MB, and never looks rows up again by the selection's id array (under the pool's generic
        plans that was a scan of the table per selected row, past the statement timeout at ~10k rows)."""
        return f"""
            SELECT d.id, {self._dead_requeueable} AS requeueable
            FROM {self.dead_letters} AS d
            WHERE {self._DEAD_SELECTION}
            ORDER BY d.id"""

    @property
    def dead_letter_lock(self) -> str:
        """The selection ($1-$6) among $7 ids[] (the rows a requeue or discard acts on, found by
        :attr:`dead_letter_ids`): (id, requeueable) of each, in id order, locked. A concurrent run
        waits for the first, then finds them gone (a deleted row is not returned); a row changed
        meanwhile is read again, filters and flag.

        Only the rows acted on are locked, whatever comes before them. ``d.id = ANY($7)`` finds them
        through the primary key under any plan (the selection's ``$1 IS NULL OR ...`` cannot)."""
        return f"""
            SELECT d.id, {self._dead_requeueable} AS requeueable
            FROM {self.dead_letters} AS d
            WHERE d.id = ANY($7::bigint[]) AND {self._DEAD_SELECTION}
            ORDER BY d.id
            FOR UPDATE OF d"""

    @property
    def dead_letter_requeue(self) -> str:
        """$1 ids[] (the requeueable ones of :attr:`dead_letter_lock`, locked): put them back into
        the outbox with their original event id, payload, headers and created_at, attempts 0, in
        their dead-letter id order (so in their original order), and delete them from the dead
        letters. Returns (dead id, new outbox id, event id) of each requeued row.

        It checks again what it can check cheaply: a row whose event id is in the outbox by now, or
        whose created_at the outbox's CHECK would refuse, stays a dead letter; of ids with the same
        event id only the lowest goes back (the outbox's event id is unique, and the requeue log
        joins the rows inserted to the dead letters by event id), so it never fails as a whole on
        a duplicate among its own rows.

        The new row gets a new ``id``, after every row already in the outbox: a requeued event is
        published after every event of its aggregate committed before the requeue."""
        return f"""
            WITH picked AS (
                SELECT DISTINCT ON (d.event_id) d.* FROM {self.dead_letters} AS d
                WHERE d.id = ANY($1::bigint[])
                  AND {CREATED_AT_IN_RANGE.replace("created_at", "d.created_at")}
                  AND NOT EXISTS (SELECT 1 FROM {self.outbox} AS o WHERE o.event_id = d.event_id)
                ORDER BY d.event_id, d.id),
            inserted AS (
                INSERT INTO {self.outbox}
                    (event_id, aggregate_type, aggregate_id, event_type, tenant, payload, headers, created_at)
                SELECT event_id, aggregate_type, aggregate_id, event_type, tenant, payload, headers, created_at
                FROM picked ORDER BY id
                RETURNING id, event_id),
            logged AS (
                INSERT INTO {self.requeued} (outbox_id, event_id, dead_id, reason)
                SELECT i.id, i.event_id, p.id, p.reason FROM inserted AS i JOIN picked AS p USING (event_id)
                RETURNING dead_id, outbox_id, event_id),
            removed AS (
                DELETE FROM {self.dead_letters} AS d USING logged AS l WHERE d.id = l.dead_id)
            SELECT dead_id, outbox_id, event_id::text FROM logged ORDER BY dead_id"""

    @property
    def dead_letter_discard(self) -> str:
        """$1 ids[] (locked by :attr:`dead_letter_lock`): delete them. Returns the ids deleted."""
        return f"DELETE FROM {self.dead_letters} AS d WHERE d.id = ANY($1::bigint[]) RETURNING d.id"

    @property
    def insert_event(self) -> str:
        """For producers in demo/bench/tests: $1 aggregate_type, $2 aggregate_id, $3 event_type,
        $4 payload, $5 headers (json text), $6 tenant. Returns id and event_id."""
        return (
            f"INSERT INTO {self.outbox} (aggregate_type, aggregate_id, event_type, payload, headers, tenant) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6) RETURNING id, event_id::text"
        )
