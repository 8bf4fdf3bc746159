"""SQL text: only validated, quoted identifiers are ever formatted in; every value is a bound
parameter; every mark is fenced by the lease epoch; the claim walks the pending index order."""

from __future__ import annotations

import re

import pytest

from outbox_worker.core.sql import MAX_PARTITIONS, Sql, int_array, literal_arrays

SQL = Sql.for_table("relay", "orders_outbox")
CREATED_AT_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'

STATEMENTS = [
    "meta_select",
    "meta_insert",
    "advisory_lock",
    "lease_seed",
    "heartbeat",
    "worker_leave",
    "lease_renew",
    "lease_acquire",
    "lease_release",
    "lease_table",
    "notify",
    "claim_ordered",
    "claim_unordered",
    "claim_ordered_uncut",
    "claim_unordered_uncut",
    "mark_delete",
    "mark_published",
    "mark_failed",
    "dead_letter",
    "retention_sweep",
    "pressure",
    "insert_event",
]
FENCED = ["mark_delete", "mark_published", "mark_failed", "dead_letter"]


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        ("public", 'outbox"; DROP TABLE users; --'),
        ("public", "outbox; DROP TABLE users"),
        ('public"."x', "outbox"),
        ("public", "Outbox"),
        ("public", "out box"),
        ("public", ""),
        ("", "outbox"),
        ("public", "1outbox"),
        ("public", "outbox$1"),
        ("public", "ou\u0000tbox"),
        ("public", "outbox\n"),
        ("public\n", "outbox"),
        ("pub lic", "outbox"),
        ("a" * 64, "outbox"),
    ],
)
def test_unsafe_identifiers_are_refused(schema: str, table: str) -> None:
    with pytest.raises(ValueError, match="not a valid identifier"):
        Sql.for_table(schema, table)


def test_table_name_leaves_room_for_suffixes() -> None:
    longest = "t" * (63 - len("_dead_letters"))
    sql = Sql.for_table("p", longest)
    assert len(sql.dead_letters.split(".")[1].strip('"')) == 63
    with pytest.raises(ValueError, match="too long"):
        Sql.for_table("p", longest + "t")


@pytest.mark.parametrize(("schema", "table"), [("public", "t" * 50), ("s" * 30, "t" * 33), ("s" * 55, "t")])
def test_schema_and_table_too_long_for_the_notify_channels_are_refused(schema: str, table: str) -> None:
    """PostgreSQL refuses a NOTIFY channel over 63 bytes: the trigger's pg_notify('<schema>.<table>')
    would fail every INSERT into the outbox, the lease announcements on '<schema>.<table>_leases'
    every handover (tests/integration/test_migrate.py proves the limit against PostgreSQL)."""
    with pytest.raises(ValueError, match=r"table and schema are \d+ characters together") as refused:
        Sql.for_table(schema, table)
    assert "at most 55" in str(refused.value)
    assert "migrate one under shorter names" in str(refused.value)  # what to do with a table migrated already


def test_the_longest_schema_and_table_give_channels_of_63_bytes() -> None:
    sql = Sql.for_table("s" * 5, "t" * 50)
    assert len(sql.lease_channel.encode()) == 63
    assert len(sql.channel.encode()) < 63


def _identifiers(text: str) -> set[str]:
    return set(re.findall(r'"([^"]*)"', text))


ALLOWED = {
    "relay",
    "orders_outbox",
    "orders_outbox_leases",
    "orders_outbox_workers",
    "orders_outbox_dead_letters",
    "outbox_meta",
    "orders_outbox_event_id_key",
    "orders_outbox_headers_object",
    "orders_outbox_pending_idx",
    "orders_outbox_held_idx",
    "orders_outbox_published_idx",
    "orders_outbox_notify",
    "orders_outbox_rfc3339",
    "orders_outbox_requeued",
}
# sql.CREATED_AT_IN_RANGE: the bounds of the times RFC 3339 can write
RANGE_LITERALS = {"0001-01-01 00:00:00+00", "10000-01-01 00:00:00+00"}


@pytest.mark.parametrize("name", STATEMENTS)
def test_statements_quote_only_derived_identifiers(name: str) -> None:
    text = getattr(SQL, name)
    # the claim's one fixed format string (created_at's text) quotes literal text in it
    text = text.replace(f"'{CREATED_AT_FORMAT}'", "'created_at format'")
    assert _identifiers(text) <= ALLOWED
    # No value is formatted in: no string literal other than fixed keywords/intervals.
    literals = set(re.findall(r"'([^']*)'", text))
    # meta_select reads compatible_from by name (to_jsonb), so that it runs whether or not the column exists
    fixed = {"1 hour", "-infinity", "{}", "UTC", "created_at format", "", "compatible_from"}
    assert literals <= fixed | RANGE_LITERALS, literals


def test_migration_formats_only_identifiers_and_the_partition_count() -> None:
    ddl = "\n".join(SQL.migration(37))
    assert _identifiers(ddl) <= ALLOWED
    assert "% 37)" in ddl
    literals = set(re.findall(r"'([^']*)'", ddl))
    # the channel name of pg_notify is schema.table, both validated
    # and the schema-version-2 constraint is looked up by its (derived) table and constraint names,
    # outbox_meta's compatible_from column by its table and column names
    derived = {'"relay"."orders_outbox"', "orders_outbox_rfc3339", '"relay"."outbox_meta"', "compatible_from"}
    assert literals <= {"-infinity", "{}", "object", "relay.orders_outbox", ""} | RANGE_LITERALS | derived, literals


@pytest.mark.parametrize("partitions", [0, -1, MAX_PARTITIONS + 1])
def test_partition_count_is_bounded(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        SQL.migration(partitions)


def test_migration_is_idempotent_ddl() -> None:
    for stmt in SQL.migration(16):
        head = " ".join(stmt.split()[:5]).upper()
        guarded = "IF NOT EXISTS" in stmt.upper() and head.startswith(("ALTER TABLE", "DO $$"))
        assert guarded or any(k in head for k in ("IF NOT EXISTS", "CREATE OR REPLACE")), stmt


def test_migration_contract_columns() -> None:
    ddl = next(s for s in SQL.migration(16) if s.startswith(f"CREATE TABLE IF NOT EXISTS {SQL.outbox} ("))
    for col in (
        "event_id uuid NOT NULL",
        "aggregate_type text NOT NULL",
        "aggregate_id text NOT NULL",
        "event_type text NOT NULL",
        "payload bytea NOT NULL",
        "headers jsonb NOT NULL",
        "created_at timestamptz",
        "not_before timestamptz",
        "attempts int NOT NULL DEFAULT 0",
        "last_error text",
        "tenant text",
        "UNIQUE (event_id)",
    ):
        assert col in ddl, col
    assert "hashtextextended(aggregate_id" in ddl


def test_pending_index_matches_the_claim_order() -> None:
    ddl = "\n".join(SQL.migration(16))
    assert "(partition, id) WHERE published_at IS NULL" in ddl
    for name in ("claim_ordered", "claim_unordered"):
        text = " ".join(getattr(SQL, name).split())
        # per partition: an id-ordered walk of its pending rows, its share at most, in the index's
        # own (partition, id) order, which the primary key cannot give
        assert "WHERE o.partition BETWEEN p.partition AND p.partition AND o.published_at IS NULL" in text
        assert "ORDER BY o.partition, o.id LIMIT $2" in text
        # the batch: cut fairly to the limit, returned in (partition, id) order
        assert "ORDER BY rank, c.partition LIMIT $3" in text
        assert text.endswith("ORDER BY b.partition, b.id")


def test_uncut_claims_walk_the_same_rows_without_ranking() -> None:
    """The uncut claims are the cut ones minus the fair cut: same per-partition walk and hold-back,
    the same $3 bound, the same (partition, id) order, and no window function."""
    for cut, uncut in (("claim_ordered", "claim_ordered_uncut"), ("claim_unordered", "claim_unordered_uncut")):
        full = " ".join(getattr(SQL, cut).split())
        text = " ".join(getattr(SQL, uncut).split())
        walk = full[full.index("FROM unnest") : full.index("ORDER BY rank")]
        assert walk in text
        assert text.endswith("ORDER BY c.partition, c.id LIMIT $3")
        assert "row_number" not in text
        assert "rank" not in text


def test_ordered_claim_holds_back_later_rows_of_a_held_aggregate() -> None:
    for name in ("claim_ordered", "claim_ordered_uncut"):
        ordered = " ".join(getattr(SQL, name).split())
        assert "NOT EXISTS" in ordered
        assert "h.aggregate_id = o.aggregate_id AND h.id < o.id AND h.not_before > now()" in ordered
    assert "NOT EXISTS" not in SQL.claim_unordered
    assert "NOT EXISTS" not in SQL.claim_unordered_uncut


@pytest.mark.parametrize("name", FENCED)
def test_every_mark_is_fenced_by_owner_partition_and_epoch(name: str) -> None:
    text = " ".join(getattr(SQL, name).split())
    assert "l.publisher = $1 AND l.owner = $2" in text
    assert "l.partition = mine.partition AND l.epoch = mine.epoch" in text
    assert "FOR SHARE OF l" in text
    assert "o.partition = ANY(ARRAY(SELECT partition FROM fence))" in text


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("delete", [True, False])
def test_a_claim_after_a_mark_is_the_fenced_mark_and_the_same_claim_skipping_ids(
    ordered: bool, cut: bool, delete: bool
) -> None:
    """The mark carried by a claim (AckedRows) is the fenced mark on its own, and the claim the same
    walk, hold-back and cut as alone, with its parameters moved behind the mark's and a skip list."""
    raw = SQL.claim_after_mark(ordered=ordered, cut=cut, delete=delete)
    assert _identifiers(raw.replace(f"'{CREATED_AT_FORMAT}'", "''")) <= ALLOWED
    literals = set(re.findall(r"'([^']*)'", raw.replace(f"'{CREATED_AT_FORMAT}'", "''")))
    assert literals <= {"UTC", "", "synchronous_commit", "off"} | RANGE_LITERALS
    # its commit does not wait for the WAL flush, for this statement's transaction only
    assert "CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush_wait" in raw
    text = " ".join(raw.split())
    assert not re.search(r"\$\d+::(int|bigint)\[\]", text)  # every array parameter is passed as text
    alone = " ".join(literal_arrays(SQL.mark_delete if delete else SQL.mark_published).split())
    mark = alone[alone.index("DELETE" if delete else "UPDATE") :]
    assert f"marked AS ({mark} RETURNING 1)" in text
    assert "l.publisher = $1 AND l.owner = $2" in text
    assert "FOR SHARE OF l" in text
    name = f"claim_{'ordered' if ordered else 'unordered'}{'' if cut else '_uncut'}"
    claim = " ".join(literal_arrays(getattr(SQL, name)).split())
    for n in (3, 2, 1):  # the claim's own parameters, moved behind the mark's five
        claim = claim.replace(f"${n}", f"${n + 5}")
    claim = claim.replace("$4", "$10")  # the payload bound: last, behind the skip list
    due = "AND (o.not_before IS NULL OR o.not_before <= now())"
    claim = claim.replace(due, f"{due} AND o.id <> ALL($9::text::bigint[])")
    assert text.endswith(f"LEFT JOIN ( {claim}) AS claimed ON true ORDER BY claimed.partition, claimed.id")


def test_lease_statements_use_the_database_clock_and_bump_epochs() -> None:
    acquire = " ".join(SQL.lease_acquire.split())
    assert "epoch = l.epoch + 1" in acquire
    assert "expires_at <= now()" in acquire
    assert "SKIP LOCKED" in acquire
    renew = " ".join(SQL.lease_renew.split())
    assert "l.epoch = mine.epoch AND l.expires_at > now()" in renew
    for name in ("lease_acquire", "lease_renew", "heartbeat"):
        assert "now() + make_interval(secs =>" in getattr(SQL, name)


@pytest.mark.parametrize("name", STATEMENTS)
def test_parameters_are_numbered_without_gaps(name: str) -> None:
    nums = sorted({int(n) for n in re.findall(r"\$(\d+)", getattr(SQL, name))})
    assert nums == list(range(1, len(nums) + 1))


def test_channel_and_names() -> None:
    assert SQL.channel == "relay.orders_outbox"
    assert SQL.outbox == '"relay"."orders_outbox"'
    assert SQL.leases == '"relay"."orders_outbox_leases"'
    assert SQL.meta == '"relay"."outbox_meta"'


def test_claimed_columns_are_outbox_row_fields_in_order() -> None:
    """The store builds OutboxRow positionally from the claim's columns: their order must match."""
    from dataclasses import fields

    from outbox_common.envelope import OutboxRow

    assert [c.strip() for c in SQL._CLAIMED.split(",")] == [f.name for f in fields(OutboxRow)]


def test_integer_arrays_pass_as_their_text() -> None:
    """int_array writes PostgreSQL's array text; literal_arrays takes every integer array parameter
    as text and casts it, and leaves the rest of the statement alone."""
    assert int_array([]) == "{}"
    assert int_array([0, 7, -3, 2**40]) == "{0,7,-3,1099511627776}"
    assert int_array(range(3)) == "{0,1,2}"
    statement = "SELECT $1::int[], $12::bigint[], $3::text[], $4::float8[], $5 WHERE x = ANY($6::bigint[])"
    assert literal_arrays(statement) == (
        "SELECT $1::text::int[], $12::text::bigint[], $3::text[], $4::float8[], $5 WHERE x = ANY($6::text::bigint[])"
    )
