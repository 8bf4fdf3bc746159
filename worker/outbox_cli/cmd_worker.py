"""``outboxctl worker``: run one relay worker. Settings come from ``OUTBOX_*`` environment variables
(the operator renders them) and may be overridden by flags (``--batch-size 500``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import SecretStr, ValidationError

from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, env_help, tune_gc
from outbox_common.config import StatusConfig, WorkerConfig
from outbox_common.settings import EventLoop, WorkerSettings, describe_error, env_name, unknown_env_warnings

if TYPE_CHECKING:  # imported when the worker runs: `outboxctl --help` stays light
    from outbox_worker.app.worker import Worker

T = TypeVar("T")

HELP = "Run a relay worker (settings from OUTBOX_* environment variables or flags)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in WorkerSettings.model_fields.items():
        secret = field.is_required() or isinstance(field.default, SecretStr)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"opt_{name}",
            metavar=name.upper(),  # not argparse's OPT_<NAME>, from dest
            default=None,  # None: not given, the environment or the settings default applies
            help=env_help(field.description or "", name, show_default=not secret),
        )


def load_settings(args: argparse.Namespace) -> WorkerSettings:
    overrides: dict[str, Any] = {
        name: getattr(args, f"opt_{name}")
        for name in WorkerSettings.model_fields
        if getattr(args, f"opt_{name}", None) is not None
    }
    return WorkerSettings(**overrides)


def setup_logging(fmt: str, level: str) -> None:
    if fmt == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:  # log.exception: the traceback too, as the text format prints it
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print("error: invalid worker settings:\n" + describe_error(exc), file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_format, settings.log_level)
    for warning in unknown_env_warnings(os.environ):
        logging.getLogger("outbox_worker").warning("%s", warning)
    return run_on_loop(serve(settings), settings.event_loop)


def run_on_loop(main: Coroutine[Any, Any, T], event_loop: EventLoop) -> T:
    """Run ``main`` to completion on a new event loop of the kind ``event_loop`` names
    (``OUTBOX_EVENT_LOOP``). uvloop halves the worker's CPU per round trip to PostgreSQL or NATS,
    which is most of its cost at low commit rates (docs/benchmarks.md); where it cannot be imported,
    the standard loop runs and a warning says so."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == EventLoop.UVLOOP:
        try:
            import uvloop
        except ImportError:
            logging.getLogger("outbox_worker").warning(
                "uvloop is not installed: running on asyncio's event loop (set %s=asyncio to silence this)",
                env_name("event_loop"),
            )
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def serve(settings: WorkerSettings) -> int:
    """Start, run until SIGTERM/SIGINT, stop. Returns the exit code."""
    from outbox_worker.adapters.store import DuplicateWorkerError
    from outbox_worker.app.worker import SideTaskFailed, Worker

    config = WorkerConfig.from_settings(settings)  # once: each part gets its own from here on
    worker = Worker(config, sink=_status_sink(config.status))
    log = logging.getLogger("outbox_worker")
    failed = await _start(worker, log)
    if failed is not None:
        return failed
    tune_gc()  # started: imports done, connections open
    try:
        await worker.run()
    except SideTaskFailed as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except DuplicateWorkerError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    log.info("worker stopped cleanly")
    return EXIT_OK


async def _start(worker: Worker, log: logging.Logger) -> int | None:
    """Start ``worker`` with the SIGTERM/SIGINT handlers of its whole life; None once it started,
    else the exit code (the failure logged in one line, the worker closed).

    A signal while it starts cancels the start at an await, then closes the worker, which deletes
    its heartbeat row: a pod stopped while it waits for its servers leaves no live-looking worker
    behind (exit 0). Once started, a signal asks :meth:`Worker.run` to stop gracefully. Installed
    before the start: the process-wide handler of ``main()`` would exit 143 in the middle of
    whatever runs, with nothing closed."""
    from outbox_worker.adapters.publisher import NatsConfigError, NatsUnavailableError
    from outbox_worker.adapters.store import (
        DatabaseAuthError,
        DatabaseUnavailableError,
        DuplicateWorkerError,
        SchemaError,
    )
    from outbox_worker.app.worker import MetricsPortError

    starting = asyncio.ensure_future(worker.start())
    signalled = False

    def stop() -> None:
        nonlocal signalled
        signalled = True
        if starting.done():
            worker.request_stop()
        else:
            starting.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await starting
        return None
    except asyncio.CancelledError:
        if not (signalled and starting.cancelled()):
            raise
        log.info("stopped by a signal while starting")
        code = EXIT_OK
    except (SchemaError, DatabaseAuthError, NatsConfigError, DuplicateWorkerError, MetricsPortError) as exc:
        log.error("configuration error: %s", exc)
        code = EXIT_CONFIG
    except (DatabaseUnavailableError, NatsUnavailableError) as exc:
        log.error("unavailable: %s", exc)
        code = EXIT_UNAVAILABLE
    except Exception as exc:
        # None of the errors above: a defect, or a failure no mapping knows yet. Its traceback goes to
        # the log, and close() still leaves the membership, so a restart under the same worker id
        # (the pod's container) does not wait a lease TTL for its own heartbeat row.
        log.exception("start-up failed: %s", type(exc).__name__)
        code = EXIT_FAILURE
    await worker.close()
    return code


def _status_sink(status: StatusConfig) -> Any:
    if not status.namespace:
        return None
    import importlib

    # Imported only in operator mode: it loads the kubernetes client.
    kube_status = importlib.import_module("outbox_worker.adapters.kube_status")
    return kube_status.sink_for(status)


__all__ = ["load_settings", "run", "serve"]
