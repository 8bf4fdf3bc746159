"""``outboxctl operator``: run the OutboxPublisher operator (kopf) in one namespace, several, or all.

It talks to the API server of the kubeconfig ($KUBECONFIG, ~/.kube/config) or, in a pod, of its
service account; with neither it exits at once with code 3, and with a liveness URL it cannot listen
on too. An API server that does not answer within ``--startup-timeout-seconds`` ends it with code 4.
Bad flags exit 2. Each of these prints one line naming the flag or the fix. Run one replica: the
operator is standalone (no peering between replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import math
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from outbox_operator.constants import DEFAULT_WORKER_IMAGE

HELP = "Run the OutboxPublisher operator (reconciles worker Deployments and status)."

LIVENESS_EXAMPLE = "http://0.0.0.0:8080/healthz"
# kopf's liveness endpoint: its host and port when the URL names none (kopf/_core/engines/probing.py)
LIVENESS_DEFAULT_HOST = "localhost"
LIVENESS_DEFAULT_PORT = 80
MAX_STARTUP_TIMEOUT_SECONDS = 3600.0  # as the worker's startup_timeout_seconds
# a resync pass goes over every publisher: more often than once a second only burns CPU (1e-6 spun
# the event loop), as changes are acted on at once by watch events anyway
MIN_RESYNC_SECONDS = 1.0


def liveness_url(text: str) -> str:
    """``--liveness``: a URL kopf's liveness endpoint serves, ``http://HOST:PORT/PATH`` (kopf serves
    plain http only; without a host it listens on localhost, without a port on 80, and without a
    path it serves ``/``). Returned unchanged.

    Refused here, with the flag named (argparse), rather than by kopf once the operator runs (an
    exception and exit 1): another scheme, a port that is no number or out of range. Port 0 too:
    kopf would serve on port 80, not on a free port."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme.lower() != "http" or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a URL the liveness endpoint can serve: give http://HOST:PORT/PATH, "
            f"e.g. {LIVENESS_EXAMPLE} (plain http only)"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no valid port: give a number from 1 to 65535, e.g. {LIVENESS_EXAMPLE}"
        )
    return text


def seconds(*, minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type=`` for a number of seconds: finite (``nan`` and ``inf`` parse as floats,
    and ``asyncio.sleep(nan)`` returns at once), at least ``minimum``, at most ``maximum``."""
    bound = f"of at least {minimum:g}"
    if maximum is not None:
        bound += f" and at most {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {bound}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="watch OutboxPublishers in this namespace (repeat for several)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch OutboxPublishers in every namespace")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO", help="log level")
    parser.add_argument(
        "--worker-image",
        default=None,
        help="image of the worker pods when an OutboxPublisher sets no spec.worker.image "
        f"(default: {DEFAULT_WORKER_IMAGE}; the Helm chart passes its own image)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=seconds(minimum=MIN_RESYNC_SECONDS),
        default=30.0,
        help="period of the safety-net pass over every publisher, from the watch-fed state (no API "
        f"reads), at least {MIN_RESYNC_SECONDS:g}; changes are acted on at once by watch events",
    )
    parser.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        type=liveness_url,
        help=f"serve a liveness probe at this http:// URL, e.g. {LIVENESS_EXAMPLE}",
    )
    parser.add_argument(
        "--startup-timeout-seconds",
        type=seconds(minimum=0.0, maximum=MAX_STARTUP_TIMEOUT_SECONDS),
        default=60.0,
        help="how long start-up waits for the Kubernetes API server to answer before it exits (code 4); 0 tries once",
    )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            entry["object"] = {k: ref.get(k) for k in ("namespace", "name")}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kopf's own chatter about every watch event is DEBUG; keep the level the user asked for.
    logging.getLogger("kopf").setLevel(level)
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def liveness_problem(url: str) -> str | None:
    """Why the liveness endpoint cannot listen where ``url`` says (the port in use, a host that is no
    address of this machine, a port it may not bind), in one line naming the fix, or None.

    Tried by binding the address and letting it go, the way kopf's server will bind it: once kopf
    runs, that failure is an ``OSError`` traceback and exit 1."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or LIVENESS_DEFAULT_HOST
    port = parts.port or LIVENESS_DEFAULT_PORT
    try:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = "stop what listens on that port, or give --liveness another port"
        else:
            fix = "give --liveness a host of this machine (0.0.0.0: all its addresses) and a port it may listen on"
        return (
            f"--liveness {url}: cannot listen on {host}:{port} ({exc.strerror or exc}); {fix} "
            "(the Helm chart sets the port from operator.healthPort)"
        )
    server.close()
    await server.wait_closed()
    return None


async def start_up_problem(args: argparse.Namespace) -> tuple[int, str] | None:
    """What keeps the operator from starting, found before kopf runs, as (exit code, message): the
    liveness address (3), then an API server that does not answer in time (4) or refuses the
    credentials (3). None when nothing."""
    from outbox_cli.main import EXIT_CONFIG, EXIT_UNAVAILABLE
    from outbox_operator.kube import (
        ApiServerUnreachable,
        CredentialsRefused,
        configuration_from_environment,
        wait_for_api_server,
    )

    if args.liveness:
        problem = await liveness_problem(args.liveness)
        if problem is not None:
            return EXIT_CONFIG, problem
    try:
        await wait_for_api_server(configuration_from_environment(), args.startup_timeout_seconds)
    except ApiServerUnreachable as exc:
        return EXIT_UNAVAILABLE, str(exc)
    except CredentialsRefused as exc:
        return EXIT_CONFIG, str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    from outbox_cli.main import EXIT_CONFIG, run_async
    from outbox_operator.children import OperatorConfig
    from outbox_operator.handlers import Runtime, run_operator
    from outbox_operator.kube import credentials_problem

    _configure_logging(args.log_format, args.log_level)
    problem = credentials_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    refused = run_async(start_up_problem(args))
    if refused is not None:
        code, message = refused
        print(f"error: {message}", file=sys.stderr)
        return code
    runtime = Runtime(
        config=OperatorConfig(worker_image=args.worker_image or DEFAULT_WORKER_IMAGE),
        resync_seconds=args.resync_seconds,
    )
    asyncio.run(
        run_operator(
            runtime,
            namespaces=list(args.namespace),
            clusterwide=bool(args.all_namespaces),
            liveness_endpoint=args.liveness,
        )
    )
    return 0
