"""``outboxctl dead-letters``: list, requeue or discard the rows the relay could never publish.

``list`` prints the selected dead letters (a table, or one JSON object per line with ``--json``).
``requeue`` puts them back into the outbox with their original event id; ``discard`` deletes them.
Both are dry runs unless ``--yes`` is given, and need a selection (``--id``, a filter, or ``--all``).
README ("Dead letters") states what order a requeued event takes. Exit codes (``outbox_cli.main``):
0 done or nothing to do (also when the reader of the output went away after the change), 1 the
database refused the change, did not finish it within the statement timeout or cancelled it (nothing
was changed), 2 bad flags, 3 the tables are missing, the credentials rejected or a privilege
missing, 4 the database is not reachable or the connection was lost during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING

from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_table_options, run_on_connection

if TYPE_CHECKING:  # imported when the command runs: `outboxctl --help` never loads asyncpg
    import asyncpg

    from outbox_worker.adapters.dead_letters import DeadLetter, DeadLetterFilter
    from outbox_worker.core.sql import Sql

HELP = "List, requeue or discard dead letters (rows that could not be published)."

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
LIST_LIMIT = 1000  # rows `list` prints unless --limit says otherwise
MAX_DURATION_DAYS = 36_500  # a century: further back than any dead letter, within PostgreSQL's dates
MAX_ROW_ID = 2**63 - 1  # ids and LIMIT are bigint


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``30d`` in seconds, at most :data:`MAX_DURATION_DAYS`;
    raises ValueError naming the format."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration: use a number of seconds or e.g. 90s, 15m, 2h, 30d")
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise ValueError(f"{text!r} is longer than {MAX_DURATION_DAYS}d: use at most {MAX_DURATION_DAYS}d")
    return seconds


def _duration(text: str) -> float:
    """``--older-than`` / ``--newer-than``: refused by argparse, which names the flag."""
    _not_blank(text)
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("list", "show the selected dead letters (without payloads)"),
        ("requeue", "put the selected dead letters back into the outbox (dry run unless --yes)"),
        ("discard", "delete the selected dead letters for good (dry run unless --yes)"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        _common(p)
        if name == "list":
            p.add_argument("--json", action="store_true", help="one JSON object per line")
            p.add_argument("--limit", type=_positive, default=LIST_LIMIT, help=f"at most this many rows ({LIST_LIMIT})")
        else:
            p.add_argument("--all", action="store_true", help="select every dead letter (no filter needed)")
            p.add_argument(
                "--limit",
                type=_positive,
                default=None,
                help="act on at most this many, the oldest first; run again for the rest (a selection too "
                "large for one transaction within the statement timeout)",
            )
            p.add_argument("--yes", action="store_true", help="act; without it, only show what would be done")


def _positive(text: str) -> int:
    """``--limit``: a whole number of rows, at least 1 (PostgreSQL refuses a negative LIMIT, and 0
    would print "no dead letters selected" for a table full of them), at most a bigint."""
    return _bigint(text, f"{text!r} is not a number of rows: use 1 or more (at most {MAX_ROW_ID})")


def _row_id(text: str) -> int:
    """``--id``: a dead letter's id, a positive bigint."""
    return _bigint(text, f"{text!r} is not a dead letter's id: use a whole number from 1 (see list)")


def _bigint(text: str, refusal: str) -> int:
    """``text`` as a whole number of 1 to :data:`MAX_ROW_ID` (a PostgreSQL bigint), else argparse's
    error ``refusal``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_ROW_ID:
        raise argparse.ArgumentTypeError(refusal)
    return value


def _not_blank(text: str) -> str:
    """A filter's value. A blank one (``--reason "$UNSET"``) is refused: ``--reason ''`` would select
    every dead letter (every reason starts with ''), so a discard with an empty shell variable would
    delete them all without ``--all``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (use --all to select every dead letter)")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    add_table_options(p)
    p.add_argument("--id", type=_row_id, action="append", dest="ids", help="a dead letter's id (repeatable)")
    p.add_argument("--publisher", type=_not_blank, help="only dead letters of this publisher")
    p.add_argument("--aggregate", help="only dead letters of this aggregate_id")
    p.add_argument("--reason", type=_not_blank, help="only reasons starting with this, e.g. header_too_large")
    p.add_argument("--older-than", type=_duration, help="dead at least this long ago (90s, 15m, 2h, 30d)")
    p.add_argument("--newer-than", type=_duration, help="dead at most this long ago")


def run(args: argparse.Namespace) -> int:
    from outbox_worker.adapters.dead_letters import DeadLetterFilter
    from outbox_worker.core.sql import Sql

    if not args.database_url:
        print("error: --database-url (or OUTBOX_DATABASE_URL) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        sql = Sql.for_table(args.schema, args.table)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    selection = DeadLetterFilter(
        ids=tuple(args.ids) if args.ids else None,
        publisher=args.publisher,
        aggregate_id=args.aggregate,
        reason=args.reason,
        older_than_seconds=args.older_than,
        newer_than_seconds=args.newer_than,
    )
    if args.action != "list" and not (selection.narrows or args.all):
        print(
            f"error: {args.action} needs a selection: --id, a filter (--publisher, --aggregate, --reason, "
            "--older-than, --newer-than) or --all",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _run_guarded(args, sql, selection)


def _run_guarded(args: argparse.Namespace, sql: Sql, selection: DeadLetterFilter) -> int:
    """Run the action; its failures as one line and an exit code, never a traceback. A database
    error's message is printed without its DETAIL, which may quote a whole row (payload, headers)."""
    import asyncpg

    fewer = "act on fewer at a time (--limit, or --older-than, --newer-than, --reason, --publisher, --id)"
    try:
        code = run_on_connection(args.database_url, lambda conn: _act(conn, args, sql, selection))
        sys.stdout.flush()  # a reader gone shows here, not as exit code 120 at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader of our output went away (`... | head`). Output is printed only once the
        # transaction has ended, so what was done is done: exit 0 (what _act returns), silently.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except asyncpg.UndefinedTableError:
        print(
            f"error: {sql.schema}.{sql.table}'s tables are missing or older than schema version 2: run "
            f"`outboxctl migrate --schema {sql.schema} --table {sql.table}`",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except asyncpg.InsufficientPrivilegeError as exc:
        print(
            f"error: the database role may not {args.action} dead letters ({exc.args[0]}): grant it what the "
            f"command needs: list reads {sql.dead_letters} and {sql.outbox}; requeue and discard also lock and "
            f"delete dead letters (UPDATE, DELETE), and requeue inserts into {sql.outbox} and {sql.requeued}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except TimeoutError:
        print(
            f"error: the database did not finish the {args.action} within the statement timeout; nothing was "
            f"changed: {fewer}; or, if another session holds these rows (another dead-letters run, a "
            "transaction left open), run it again once that one has ended",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError) as exc:
        # the role's or the DSN's statement_timeout or lock_timeout, or a cancel by an administrator
        print(
            f"error: PostgreSQL cancelled the {args.action} ({exc.args[0]}); nothing was changed: {fewer}; "
            "or, if another session holds these rows, run it again once that one has ended",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except asyncpg.IntegrityConstraintViolationError as exc:
        # e.g. a CHECK of the outbox refuses a requeued row: the transaction rolled back as a whole
        constraint = f" (constraint {exc.constraint_name})" if getattr(exc, "constraint_name", None) else ""
        print(
            f"error: the database refused the {args.action}{constraint}, nothing was changed: {exc.args[0]}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


async def _act(conn: asyncpg.Connection, args: argparse.Namespace, sql: Sql, selection: DeadLetterFilter) -> int:
    from outbox_worker.adapters import dead_letters

    if args.action == "list":
        rows = await dead_letters.list_dead_letters(conn, sql, selection, args.limit + 1)
        more = len(rows) > args.limit
        rows = rows[: args.limit]
        if args.json:
            for d in rows:
                print(json.dumps(d.to_json(), ensure_ascii=False))
        else:
            _print_table(rows)
        if more:  # on stderr: --json output stays one object per line
            print(
                f"note: showing the first {args.limit} dead letters; more match: raise --limit or narrow the filters",
                file=sys.stderr,
            )
        return EXIT_OK
    verb = {"requeue": "requeued", "discard": "discarded"}[args.action]
    act = dead_letters.requeue if args.action == "requeue" else dead_letters.discard
    outcome = await act(conn, sql, selection, apply=args.yes, limit=args.limit)
    shown = [outcome.shown[i] for i in outcome.done if i in outcome.shown]
    _print_table(shown)
    _more(len(outcome.done) - len(shown), "dead letters")
    if outcome.applied:
        print(f"{verb} {len(outcome.done)} dead letters")
        moved = sorted(outcome.new_ids.items())
        for dead_id, new_id in moved[: dead_letters.SHOWN]:
            print(f"  dead letter {dead_id} -> outbox id {new_id}")
        _more(len(moved) - dead_letters.SHOWN, f"in {sql.schema}.{sql.table}_requeued")
    else:
        print(f"dry run: would have {verb} {len(outcome.done)} dead letters; add --yes to act")
    if outcome.more:  # the limit left out rows a rerun acts on
        print(f"note: --limit {args.limit} reached; more may match: run it again for the rest")
    for dead_id in outcome.skipped[: dead_letters.SHOWN]:
        print(
            f"skipped {dead_id}: its event_id is already in the outbox or in an older dead letter, or its created_at "
            "has no RFC 3339 form (fix it with UPDATE ... SET created_at, or discard it)"
        )
    _more(len(outcome.skipped) - dead_letters.SHOWN, "skipped")
    missing = sorted(set(args.ids or ()) - set(outcome.selected))
    if missing:
        print(
            f"note: no dead letter selected with --id {', '.join(map(str, missing))} "
            "(already requeued or discarded, never one, or left out by another filter)",
            file=sys.stderr,
        )
    return EXIT_OK


def _more(count: int, what: str) -> None:
    if count > 0:
        print(f"  ... and {count} more {what}")


_COLUMNS = ("id", "dead_at", "publisher", "aggregate", "event_type", "attempts", "bytes", "reason")


def _print_table(rows: list[DeadLetter]) -> None:
    if not rows:
        print("no dead letters selected")
        return
    table = [
        (
            str(d.id),
            d.dead_at.strftime("%Y-%m-%d %H:%M:%S"),
            d.publisher,
            _clip(f"{d.aggregate_type}/{d.aggregate_id}", 40),
            _clip(d.event_type, 24),
            str(d.attempts),
            str(d.payload_bytes),
            _clip(d.reason, 80),
        )
        for d in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(_COLUMNS)]
    for line in (_COLUMNS, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _clip(text: str, width: int) -> str:
    """One cell: control characters (a terminal's escape sequences) shown as '?', cut to ``width``."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= width else text[: width - 1] + "…"
