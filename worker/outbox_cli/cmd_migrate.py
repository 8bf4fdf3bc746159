"""``outboxctl migrate``: create or upgrade the outbox tables (idempotent)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_table_options, run_on_connection
from outbox_worker.core.sql import DEFAULT_PARTITIONS

if TYPE_CHECKING:
    from outbox_worker.adapters.store import MigrationResult

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


def _compatibility(result: MigrationResult) -> str:
    """The table's schema version and the workers that may run against it, e.g. ``schema version 3;
    workers of schema versions 2 to 3 run against it``: an upgrade whose workers of the old version
    keep running, or not (they exit 3 until they run the new image)."""
    version, oldest = result.schema_version, result.compatible_from
    workers = f"schema version {version}" if oldest >= version else f"schema versions {oldest} to {version}"
    return f"schema version {version}; workers of {workers} run against it"


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
        print(f"{sql.schema}.{sql.table}: {verb} ({result.partitions} partitions), {_compatibility(result)}")
        return EXIT_OK

    try:
        return run_on_connection(args.database_url, act)
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except asyncpg.InsufficientPrivilegeError as exc:
        print(
            f"error: the database role may not create or change {sql.schema}.{sql.table}'s tables ({exc.args[0]}): "
            f"run migrate as their owner, or as a role that may CREATE in schema {sql.schema} (and in the database "
            "while the schema does not exist); "
            "nothing was changed",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except (TimeoutError, asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError) as exc:
        why = exc.args[0] if exc.args else type(exc).__name__
        print(
            f"error: migrate did not finish in time ({why}); nothing was changed (it is one transaction): it "
            f"waits for locks on {sql.schema}.{sql.table}'s tables that other sessions hold (a long transaction, "
            "another migrate); run it again once they have ended",
            file=sys.stderr,
        )
        return EXIT_FAILURE
