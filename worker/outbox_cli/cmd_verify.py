"""``outboxctl verify``: check a relay's history, the ledger in PostgreSQL against the stream.

Reads every committed event from ``<table>_ledger`` (written by producers in the same transaction as
the outbox row), what is still pending and dead-lettered, the mark audit if it is installed, and the
whole stream; prints the checker's figures. Exit codes (``outbox_cli.main``): 0 no violation,
1 a violation (lost, unexpected, duplicate, out of order, inconsistent or stale marks; with
``--expect-drained`` also a backlog left), 2 usage, 3 configuration (missing table, ledger or
stream, rejected credentials), 4 unavailable (database or NATS not reachable in time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from typing import Any

from outbox_cli.main import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_table_options,
    env_help,
)

_STREAM = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")

AUDIT_LOCK_TIMEOUT_SECONDS = 5.0
"""How long --install-audit waits for the outbox's lock (an open transaction writing it holds it)."""

HELP = "Check the stream against the committed events: lost, duplicates, order, marks (exit 1 on a violation)."

_FIGURES = (
    ("events", "events committed"),
    ("stored", "messages in stream"),
    ("published", "committed and stored"),
    ("lost", "lost"),
    ("unexpected", "unexpected (phantom)"),
    ("duplicates", "duplicates in stream"),
    ("order_violations", "order violations"),
    ("seq_mismatches", "Outbox-Seq not the committed id"),
    ("pending", "pending (backlog left)"),
    ("dead_lettered", "dead-lettered"),
    ("marks", "marks audited"),
    ("marked_not_stored", "marked, not in stream"),
    ("marked_before_stored", "marked before stored"),
    ("stale_marks", "marks under a stale lease"),
)

_MARK_FIGURES = ("marked_not_stored", "marked_before_stored", "stale_marks")  # shown with the mark audit only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_table_options(parser)
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("OUTBOX_NATS_SERVERS", ""),
        help=env_help("NATS server URL(s), comma-separated", "nats_servers", show_default=False),
    )
    parser.add_argument(
        "--stream", default=os.environ.get("OUTBOX_STREAM", ""), help=env_help("stream", "stream", show_default=False)
    )
    parser.add_argument(
        "--expect-drained", action="store_true", help="a committed event still pending is a violation (exit 1)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of the stream read, seconds")
    parser.add_argument(
        "--install-audit",
        action="store_true",
        help="create the ledger table and the mark-audit trigger on the outbox (test/staging), then exit",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from outbox_common.settings import mixes_transports, server_url_problem
    from outbox_worker.core.sql import Sql

    if not args.database_url:
        return _usage("--database-url is required (or set OUTBOX_DATABASE_URL)")
    if not args.database_url.startswith(("postgres://", "postgresql://")):
        return _usage("--database-url must start with postgresql:// (value not shown: it may hold a secret)")
    if args.install_audit:
        try:
            sql = Sql.for_table(args.schema, args.table)
        except ValueError as exc:
            return _usage(str(exc))
        return asyncio.run(_install_audit(args.database_url, sql))
    if not args.nats_url:
        return _usage("--nats-url is required (or set OUTBOX_NATS_SERVERS)")
    if not args.stream:
        return _usage("--stream is required (or set OUTBOX_STREAM)")
    if not math.isfinite(args.timeout) or args.timeout <= 0:  # nan passes `<= 0`, and then times out at once
        return _usage(f"--timeout={args.timeout}: give a positive number of seconds, e.g. --timeout 120")
    servers = [u.strip() for u in args.nats_url.split(",") if u.strip()]
    bad = [u for u in servers if not u.startswith(("nats://", "tls://", "ws://", "wss://"))]
    if not servers or bad:
        return _usage(f"--nats-url entries need a scheme, e.g. nats://{(bad or ['host:4222'])[0]}")
    for index, url in enumerate(servers):  # what the NATS client would refuse at connect, as the worker does
        problem = server_url_problem(url)
        if problem:
            return _usage(f"--nats-url entry {index + 1} {problem} (e.g. nats://nats:4222)")
    if mixes_transports(servers):
        return _usage("--nats-url must not mix websocket (ws://, wss://) and other (nats://, tls://) URLs")
    if not _STREAM.match(args.stream):
        return _usage(f"--stream={args.stream!r}: use letters, digits, '-' or '_' (e.g. OUTBOX)")
    try:
        sql = Sql.for_table(args.schema, args.table)
    except ValueError as exc:
        return _usage(str(exc))
    args.servers = servers
    code, verified = asyncio.run(_verify(args, sql))
    if verified is None:
        return code
    report, audited = verified
    data: dict[str, Any] = report.to_dict()
    if args.json:
        print(json.dumps(data))
    else:
        for key, label in _FIGURES:
            if key in _MARK_FIGURES and not audited:
                continue
            print(f"{label:<28}{data[key]:>12,}")
        if not audited:
            print("(no mark audit installed: mark consistency not checked)")
        for kind, examples in report.examples.items():
            print(f"  e.g. {kind}: " + "; ".join(examples))
        print("OK" if report.ok else "VIOLATION: " + ", ".join(f"{k}={v}" for k, v in report.violations().items()))
    return EXIT_OK if report.ok else EXIT_FAILURE


async def _install_audit(dsn: str, sql: Any) -> int:
    import asyncpg

    from outbox_worker.adapters.history_io import audit_ddl, ledger_ddl
    from outbox_worker.adapters.store import DatabaseAuthError, connection_error, dsn_error

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except Exception as exc:
        mapped = connection_error(exc, "check --database-url") or dsn_error(exc, "check --database-url")
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(mapped, DatabaseAuthError) else EXIT_UNAVAILABLE
    try:
        async with conn.transaction():
            # CREATE TRIGGER waits for every open transaction that writes the outbox, and while it waits
            # its queued lock blocks the application's inserts: give up after a few seconds instead.
            await conn.execute(f"SET LOCAL lock_timeout = '{AUDIT_LOCK_TIMEOUT_SECONDS * 1000:.0f}ms'")
            await conn.execute(ledger_ddl(sql))
            for stmt in audit_ddl(sql):
                await conn.execute(stmt)
    except asyncpg.UndefinedTableError as exc:
        print(f"error: {_primary(exc)}: run `outboxctl migrate` first", file=sys.stderr)
        return EXIT_CONFIG
    except asyncpg.LockNotAvailableError:
        print(
            f"error: another session holds a lock on {sql.schema}.{sql.table} (a transaction writing to it "
            f"stays open?): --install-audit gave up after {AUDIT_LOCK_TIMEOUT_SECONDS:.0f}s so as not to block "
            "the application's inserts; nothing was changed: try again",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except asyncpg.InsufficientPrivilegeError as exc:
        print(
            f"error: {_primary(exc)}: --install-audit creates {sql.schema}.{sql.table}_ledger and "
            f"{sql.schema}.{sql.table}_mark_audit and a trigger on {sql.schema}.{sql.table}: run it as the "
            "outbox table's owner, with CREATE on the schema; nothing was changed",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    finally:
        await conn.close()
    print(f"installed {sql.schema}.{sql.table}_ledger and the mark audit on {sql.schema}.{sql.table}")
    return EXIT_OK


def _primary(exc: BaseException) -> str:
    """The primary message of a PostgreSQL error (it names the table or privilege), never ``str(exc)``:
    asyncpg appends the DETAIL, which may quote a row's values."""
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _shown(urls: str) -> str:
    """NATS URLs as a message may show them: without user and password."""
    from outbox_common.settings import redact_server_list

    return redact_server_list(urls)


async def _verify(args: argparse.Namespace, sql: Any) -> tuple[int, Any]:
    from outbox_worker.adapters.history_io import verify_audited

    try:
        verified = await asyncio.wait_for(
            verify_audited(
                args.database_url,
                sql,
                args.servers,
                args.stream,
                expect_drained=args.expect_drained,
                timeout=args.timeout,
            ),
            args.timeout + 30,
        )
    except Exception as exc:
        failure = _failure(exc, args, sql)
        if failure is None:
            raise
        code, message = failure
        print(f"error: {message}", file=sys.stderr)
        return code, None
    return EXIT_OK, verified


def _failure(exc: Exception, args: argparse.Namespace, sql: Any) -> tuple[int, str] | None:
    """The exit code and the one-line message of what stopped verify; None for anything else (a
    defect, raised as it is)."""
    import asyncpg
    from nats import errors as nats_errors
    from nats.js import errors as js_errors

    from outbox_worker.adapters.history_io import NatsPermissionError
    from outbox_worker.adapters.publisher import TlsNotOfferedError
    from outbox_worker.adapters.store import DatabaseAuthError, connection_error

    if isinstance(exc, asyncpg.UndefinedTableError):
        return (
            EXIT_CONFIG,
            f"{_primary(exc)}: verify needs the outbox tables (`outboxctl migrate`) and the "
            f"ledger {sql.schema}.{sql.table}_ledger that producers write in the same transaction as each "
            "outbox row (README, Reliability)",
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return (
            EXIT_CONFIG,
            f"{_primary(exc)}: verify reads {sql.schema}.{sql.table} with its dead letters and requeues, "
            f"the ledger {sql.schema}.{sql.table}_ledger and the mark audit if installed: grant SELECT on "
            "them to the role of --database-url",
        )
    if isinstance(exc, js_errors.NotFoundError):
        return EXIT_CONFIG, f"stream {args.stream!r} does not exist on {_shown(args.nats_url)}"
    if isinstance(exc, nats_errors.AuthorizationError):
        return (
            EXIT_CONFIG,
            f"NATS at {_shown(args.nats_url)} rejected the credentials: fix the user and password or the "
            "token in --nats-url (OUTBOX_NATS_SERVERS)",
        )
    if isinstance(exc, TlsNotOfferedError):
        return EXIT_CONFIG, f"{exc} ({_shown(args.nats_url)})"
    if isinstance(exc, NatsPermissionError):
        return (
            EXIT_CONFIG,
            f"NATS denied the user of --nats-url a subject verify needs: {exc}; allow it to publish to "
            f"$JS.API.> (the JetStream API) and to subscribe to _INBOX.>",
        )
    if isinstance(
        exc,
        nats_errors.NoServersError
        | nats_errors.TimeoutError
        | nats_errors.ConnectionClosedError
        | nats_errors.StaleConnectionError
        | nats_errors.UnexpectedEOF,
    ):  # not reachable, or gone while verify read the stream
        return EXIT_UNAVAILABLE, f"NATS not reachable at {_shown(args.nats_url)}: {type(exc).__name__}"
    mapped = connection_error(exc, "check --database-url")
    if isinstance(mapped, DatabaseAuthError):
        return EXIT_CONFIG, str(mapped)
    if isinstance(exc, OSError | TimeoutError):  # PostgreSQL or NATS
        return EXIT_UNAVAILABLE, f"a server was not reachable in time: {type(exc).__name__}: {exc}"[:300]
    if mapped is not None:  # PostgreSQL unavailable, or gone while verify read the table
        return EXIT_UNAVAILABLE, str(mapped)
    return None


__all__ = ["run"]
