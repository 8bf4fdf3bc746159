"""``outboxctl operator``: run the OutboxPublisher operator (kopf) in one namespace, several, or all.

It talks to the API server of the kubeconfig ($KUBECONFIG, ~/.kube/config) or, in a pod, of its
service account; with neither it exits at once with code 3. Run one replica: the operator is
standalone (no peering between replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

HELP = "Run the OutboxPublisher operator (reconciles worker Deployments and status)."


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
        help="image of the worker pods when an OutboxPublisher sets no spec.worker.image",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="period of the safety-net pass over every publisher, from the watch-fed state (no API "
        "reads); changes are acted on at once by watch events",
    )
    parser.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz",
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


def run(args: argparse.Namespace) -> int:
    from outbox_cli.main import EXIT_CONFIG, EXIT_USAGE
    from outbox_operator.children import OperatorConfig
    from outbox_operator.constants import DEFAULT_WORKER_IMAGE
    from outbox_operator.handlers import Runtime, run_operator
    from outbox_operator.kube import credentials_problem

    _configure_logging(args.log_format, args.log_level)
    if args.resync_seconds <= 0:
        print("--resync-seconds must be positive", file=sys.stderr)
        return EXIT_USAGE
    problem = credentials_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
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
