"""``outboxctl demo``: run the whole relay on embedded PostgreSQL and NATS and verify the result."""

from __future__ import annotations

import argparse
import json
import sys

from outbox_cli.devkit import missing_embedded_servers
from outbox_cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_async
from outbox_worker.core.sql import DEFAULT_PARTITIONS

HELP = "Run the relay end to end on embedded PostgreSQL and NATS (no cluster) and verify the stream."

# What each figure of the summary measures, printed beside it.
EVENTS_PER_S_MEANS = "first commit to last stored: the demo's producers set this pace (relay capacity: outboxctl bench)"
LATENCY_MEANS = "commit to stored, workers running before the first commit: the relay's latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=20_000, help="committed events to relay")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="virtual partitions")
    parser.add_argument("--aggregates", type=int, default=2_000, help="distinct aggregates")
    parser.add_argument("--database-url", default="", help="use this PostgreSQL instead of an embedded one")
    parser.add_argument("--nats-url", default="", help="use this NATS server instead of an embedded one")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")


def run(args: argparse.Namespace) -> int:
    from outbox_devkit.demo import DemoError, DemoOptions, run_demo, stopped_in_order

    if args.events < 1 or args.workers < 1 or args.partitions < 1 or args.aggregates < 1:
        print("error: --events, --workers, --partitions and --aggregates must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > args.partitions:
        print("error: --workers must not exceed --partitions (a worker without a partition idles)", file=sys.stderr)
        return EXIT_USAGE
    if not (args.database_url and args.nats_url):
        problem = missing_embedded_servers("demo")
        if problem:
            print(problem, file=sys.stderr)
            return EXIT_USAGE

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    options = DemoOptions(
        events=args.events,
        workers=args.workers,
        partitions=args.partitions,
        aggregates=args.aggregates,
        database_url=args.database_url,
        nats_url=args.nats_url,
        timeout=args.timeout,
        progress=say,
    )
    try:
        summary = run_async(run_demo(options))
    except KeyboardInterrupt:  # Ctrl-C: run_demo has stopped everything it started, in order
        print(f"interrupted: {stopped_in_order(options)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DemoError as exc:  # what it started is stopped; its exit code is outboxctl's (3, 4 or 1)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        keys = ("events", "published", "lost", "duplicates", "order_violations", "events_per_s", "p50_ms", "p99_ms")
        data = {k: getattr(summary, k) for k in keys} | summary.to_json()
        data["measures"] = {"events_per_s": EVENTS_PER_S_MEANS, "p50_ms": LATENCY_MEANS, "p99_ms": LATENCY_MEANS}
        print(json.dumps(data))
    else:
        print()
        print(f"events committed      {summary.events:>10,}   (+{summary.rolled_back:,} rolled back, never sent)")
        print(f"published             {summary.published:>10,}")
        print(f"lost                  {summary.lost:>10,}")
        print(f"duplicates in stream  {summary.duplicates:>10,}")
        print(f"order violations      {summary.order_violations:>10,}")
        print(f"unexpected (phantom)  {summary.unexpected:>10,}")
        print(f"events/s              {summary.events_per_s:>10,.0f}   {EVENTS_PER_S_MEANS}")
        print(f"commit->stored p50    {summary.p50_ms:>10.1f} ms  {LATENCY_MEANS}")
        print(f"commit->stored p99    {summary.p99_ms:>10.1f} ms  clock: {summary.latency_clock}")
        print(f"workers exit codes    {summary.worker_exit_codes}")
        print("OK" if summary.ok else "FAILED")
    return EXIT_OK if summary.ok else EXIT_FAILURE
