"""``outboxctl migrate``: create or upgrade the outbox tables (idempotent)."""

from __future__ import annotations

import argparse
import sys

from outbox_cli.main import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, add_table_options, run_on_connection
from outbox_worker.core.sql import DEFAULT_PARTITIONS

HELP = "Create or upgrade the outbox table, indexes, NOTIFY trigger, lease and dead-letter tables."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_table_options(parser)
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help=f"virtual partitions, fixed when the table is created (default: the table's own count, "
        f"{DEFAULT_PARTITIONS} for a new table)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncpg

    from outbox_worker.adapters.store import SchemaError, migrate
    from outbox_worker.core.sql import Sql

    if not args.database_url:
        print("error: --database-url (or OUTBOX_DATABASE_URL) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        sql = Sql.for_table(args.schema, args.table)
        if args.partitions is not None:
            sql.migration(args.partitions)  # its range, before a connection
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def act(conn: asyncpg.Connection) -> int:
        result = await migrate(conn, sql, args.partitions)
        verb = "created" if result.created else "up to date"
        print(f"{sql.schema}.{sql.table}: {verb} ({result.partitions} partitions)")
        return EXIT_OK

    try:
        return run_on_connection(args.database_url, act)
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
