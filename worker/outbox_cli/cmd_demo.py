"""``outboxctl demo``: run the whole relay on embedded PostgreSQL and NATS and verify the result."""

from __future__ import annotations

import argparse
import json
import sys

from outbox_cli.devkit import missing_embedded_servers
from outbox_cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, run_async

HELP = "Run the relay end to end on embedded PostgreSQL and NATS (no cluster) and verify the stream."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=20_000, help="committed events to relay (default 20000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--partitions", type=int, default=16, help="virtual partitions (default 16)")
    parser.add_argument("--aggregates", type=int, default=2_000, help="distinct aggregates (default 2000)")
    parser.add_argument("--database-url", default="", help="use this PostgreSQL instead of an embedded one")
    parser.add_argument("--nats-url", default="", help="use this NATS server instead of an embedded one")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")


def run(args: argparse.Namespace) -> int:
    from outbox_devkit.demo import DemoOptions, run_demo

    if not (args.database_url and args.nats_url):
        problem = missing_embedded_servers("demo")
        if problem:
            print(problem, file=sys.stderr)
            return EXIT_USAGE
    if args.events < 1 or args.workers < 1 or args.partitions < 1 or args.aggregates < 1:
        print("error: --events, --workers, --partitions and --aggregates must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > args.partitions:
        print("error: --workers must not exceed --partitions (a worker without a partition idles)", file=sys.stderr)
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
    summary = run_async(run_demo(options))
    if args.json:
        keys = ("events", "published", "lost", "duplicates", "order_violations", "events_per_s", "p50_ms", "p99_ms")
        data = {k: getattr(summary, k) for k in keys} | summary.to_json()
        print(json.dumps(data))
    else:
        print()
        print(f"events committed      {summary.events:>10,}   (+{summary.rolled_back:,} rolled back, never sent)")
        print(f"published             {summary.published:>10,}")
        print(f"lost                  {summary.lost:>10,}")
        print(f"duplicates in stream  {summary.duplicates:>10,}")
        print(f"order violations      {summary.order_violations:>10,}")
        print(f"unexpected (phantom)  {summary.unexpected:>10,}")
        print(f"events/s              {summary.events_per_s:>10,.0f}")
        print(f"commit->stored p50    {summary.p50_ms:>10.1f} ms")
        print(f"commit->stored p99    {summary.p99_ms:>10.1f} ms")
        print(f"workers exit codes    {summary.worker_exit_codes}")
        print("OK" if summary.ok else "FAILED")
    return EXIT_OK if summary.ok else EXIT_FAILURE
