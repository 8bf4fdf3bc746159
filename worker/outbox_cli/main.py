"""``outboxctl``: the one command-line entry point.

Each sub-command lives in its own module ``outbox_cli.cmd_<name>`` (``-`` in a name becomes ``_``)
exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the process exit
code). Modules are imported only
when their command runs, so ``outboxctl migrate`` never loads kopf and ``outboxctl operator`` never
loads asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")

COMMANDS = ("demo", "migrate", "worker", "verify", "dead-letters", "bench", "operator")

# Exit codes, documented in README.
EXIT_OK = 0
EXIT_FAILURE = 1  # a violation was found (verify), or the worker stopped on an error
EXIT_USAGE = 2  # bad flags or settings
EXIT_CONFIG = 3  # configuration problem found at start-up: missing table or stream, bad credentials
EXIT_UNAVAILABLE = 4  # a dependency could not be reached in time (database, NATS)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


class _Command(Protocol):
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class DefaultsShownFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every ``--help`` ends each option's help with its default: ``(default: 16)``.

    Left out where it would say nothing or too much: flags (``store_true``), options without a
    default, and options whose help names an environment variable (``[env OUTBOX_…]``): their
    default is that variable's value, which may hold a secret, so their help states the built-in
    default itself (:func:`env_help`).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "[env " in text
            or not action.option_strings
            or action.default in (None, False, "", [], argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


def setting_default(name: str) -> str:
    """The default of worker setting ``name`` as its environment variable would spell it: CLI
    defaults come from the settings class, never a second copy."""
    from enum import Enum

    from outbox_common.settings import WorkerSettings

    value = WorkerSettings.model_fields[name].default
    return str(value.value if isinstance(value, Enum) else value)


def env_help(text: str, name: str, *, show_default: bool = True) -> str:
    """``text [env OUTBOX_NAME; default: X]`` for an option that falls back to a worker setting's
    environment variable, X from the settings class (``show_default=False`` for settings without a
    meaningful default, e.g. the database URL)."""
    env = f"OUTBOX_{name.upper()}"
    if not show_default:
        return f"{text} [env {env}]"
    return f"{text} [env {env}; default: {setting_default(name) or 'empty'}]".replace("%", "%%")


def run_on_connection(database_url: str, act: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
    """Run ``act`` on one connection to ``database_url`` (opened and closed here) and return its
    exit code. Credentials the database refuses exit :data:`EXIT_CONFIG`, a database that cannot be
    reached, or whose connection is lost while ``act`` runs, :data:`EXIT_UNAVAILABLE`, each with one
    line naming the fix and never the DSN; any other error is the caller's to map. Among those: a
    TimeoutError (a statement over the timeout: the server may be slow, not gone) and an OSError
    (``act`` printing to a closed pipe), which say nothing of the connection."""
    from outbox_worker.adapters.store import (
        DatabaseAuthError,
        DatabaseUnavailableError,
        connect_pool,
        connection_errors_typed,
    )

    async def go() -> int:
        pool = await connect_pool(database_url, size=2)
        try:
            async with pool.acquire() as conn:
                return await connection_errors_typed(
                    act(conn), "check --database-url", as_raised=(OSError, TimeoutError)
                )
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except DatabaseAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DatabaseUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def add_table_options(parser: argparse.ArgumentParser) -> None:
    """``--database-url``, ``--schema`` and ``--table``, shared by the commands that open an outbox
    table (migrate, verify, dead-letters): each falls back to the worker's environment variable,
    then to the settings class's default."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_DATABASE_URL", ""),
        help=env_help("PostgreSQL DSN", "database_url", show_default=False),
    )
    parser.add_argument(
        "--schema",
        default=os.environ.get("OUTBOX_DB_SCHEMA", setting_default("db_schema")),
        help=env_help("schema of the outbox tables", "db_schema"),
    )
    parser.add_argument(
        "--table",
        default=os.environ.get("OUTBOX_TABLE", setting_default("table")),
        help=env_help("outbox table", "table"),
    )


def _load(name: str) -> _Command:
    return cast(_Command, importlib.import_module(f"outbox_cli.cmd_{name.replace('-', '_')}"))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outboxctl", description="Relay transactional-outbox rows from PostgreSQL to NATS JetStream."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        if wanted in COMMANDS and name != wanted:
            sub.add_parser(name, help="")
            continue
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"outbox_cli.cmd_{name.replace('-', '_')}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=DefaultsShownFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, where SIGTERM cancels ``main`` like Ctrl-C does and then exits 143.

    Why not let :func:`_terminated` raise: a SystemExit raised between two bytecodes of whatever runs
    (an asyncpg or nats-py callback, a producer task) can leave that library half-way through a
    message, with the clean-up that follows waiting on it; once, a demo did not exit within 60 s of
    SIGTERM. A cancelled ``main`` unwinds at an ``await``, so its ``finally`` blocks and context
    managers stop what it started. Outside the loop (start-up, clean-up) :func:`_terminated` applies.
    """

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        terminated = False

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await main
        except asyncio.CancelledError:
            if terminated:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # leaves SIG_DFL: put ours back
            signal.signal(signal.SIGTERM, _terminated)

    return asyncio.run(guarded())


# Collect the youngest generation every 10,000 net container allocations instead of Python's 700.
# Bounds how much cyclic garbage waits for a collection; a relay's rows are freed by reference
# counting (no cycles), so a collection finds almost nothing to free.
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Tune the cyclic garbage collector for a long-running relay process, once it has started.

    Measured (docs/benchmarks.md, optimisation 17): with Python's defaults a worker draining a
    backlog spent ~10% of its CPU in the collector. Every full collection walked every object the
    process made at start-up (modules, pydantic models, clients), and batches of rows in flight
    survived into older generations to be walked again. So:

    - ``gc.freeze()`` after a ``gc.collect()``: what exists now (start-up state, alive for the whole
      run) moves to the permanent generation, which collections skip. Cycles created later are
      collected as before.
    - A youngest-generation threshold of :data:`GC_GEN0_THRESHOLD` instead of 700.

    Call it from a command's own process only (``outboxctl worker``, bench children), never from a
    library user's process: it changes process-wide state.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    # SIGTERM unwinds like Ctrl-C: `demo` and `bench` stop the workers and the embedded servers they
    # started (the default action would kill this process and orphan them). `worker` and `operator`
    # install their own handler for a graceful stop once their event loop runs.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
