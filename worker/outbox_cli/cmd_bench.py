"""``outboxctl bench``: throughput, latency and scaling of the relay against baselines, verified.

The scenarios, what each number measures and the JSON schema are in docs/benchmarks.md. A full run
takes several minutes; ``--scale 0.01 --repeat 1`` is a quick smoke.

Hidden ``--child`` modes are the processes the bench starts itself: a worker that reports the asyncio
tasks left after its shutdown, the naive relay and the publish ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

from outbox_cli.devkit import missing_embedded_servers
from outbox_cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, run_async, tune_gc
from outbox_common.config import WorkerConfig
from outbox_common.settings import EventLoop, WorkerSettings
from outbox_worker.core.sql import DEFAULT_PARTITIONS, MAX_PARTITIONS

HELP = (
    "Benchmark the relay (seed pressure levels, sustained drain, baselines, latency, growth, commit rate, "
    "scale-up, replicated stream), verified."
)


MAX_COMMIT_RATE = 100_000


def commit_rates(text: str) -> tuple[int, ...]:
    """``--commit-rates``: comma-separated commits per second, each 1 to :data:`MAX_COMMIT_RATE`;
    sorted, each once."""
    rates: set[int] = set()
    for item in text.split(","):
        try:
            rate = int(item.strip())
        except ValueError:
            rate = 0
        if not 1 <= rate <= MAX_COMMIT_RATE:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not a commit rate: use whole commits per second from 1 to {MAX_COMMIT_RATE:,}, "
                "comma-separated, e.g. --commit-rates 100,250,1000"
            )
        rates.add(rate)
    return tuple(sorted(rates))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from outbox_devkit.benchstats import COMMIT_RATES, SCENARIOS

    parser.add_argument(
        "--scenario",
        default="all",
        help="comma-separated subset of: " + ", ".join(SCENARIOS) + ", or all",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians are reported")
    parser.add_argument("--json", dest="json_path", default="", help="write the report (stable schema) to this path")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply event counts and durations by this number above 0 (e.g. 0.01 for a smoke run)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        help=f"virtual partitions of the bench tables, 2 to {MAX_PARTITIONS} (3 or more with scale-up: one per worker)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="OUTBOX_X=V",
        help="extra worker setting for every bench worker, e.g. OUTBOX_LOOPS=4 (repeatable; checked as the worker "
        "checks it before anything starts)",
    )
    parser.add_argument(
        "--commit-rates",
        type=commit_rates,
        default=",".join(str(r) for r in COMMIT_RATES),
        metavar="RATE[,RATE...]",
        help="commits per second offered by `commit-rate`, one run each (one event per commit, 8 connections); "
        "your own rates on your own servers size a worker (README, 'Sizing a worker')",
    )
    parser.add_argument(
        "--growth-10m",
        action="store_true",
        help="growth also with 10,000,000 published rows (writing them takes minutes; times --scale)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="use this PostgreSQL instead of an embedded one (its role must be allowed to create schema outbox_bench "
        "and tables in it)",
    )
    parser.add_argument(
        "--nats-url",
        default="",
        help="use this NATS server instead of an embedded one (its user needs the JetStream API; not in `replicated`: "
        "it starts its own 3-node cluster)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    # The processes the bench starts itself.
    parser.add_argument("--child", choices=("worker", "naive", "ceiling"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-events", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-aggregates", type=int, default=10_000, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        return _run_child(args)
    from outbox_devkit.bench import BenchOptions, run_bench
    from outbox_devkit.benchstats import SCENARIOS, render_table
    from outbox_devkit.demo import DemoError

    if not (args.database_url and args.nats_url):
        problem = missing_embedded_servers("bench")
        if problem:
            print(problem, file=sys.stderr)
            return EXIT_USAGE
    scenarios = SCENARIOS if args.scenario == "all" else tuple(s.strip() for s in args.scenario.split(","))
    env = _worker_env(args.worker_env)
    problem = env if isinstance(env, str) else _usage_problem(args, scenarios)
    if isinstance(env, str) or problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    options = BenchOptions(
        scenarios=scenarios,
        repeat=args.repeat,
        scale=args.scale,
        partitions=args.partitions,
        database_url=args.database_url,
        nats_url=args.nats_url,
        worker_env=env,
        growth_large=args.growth_10m,
        commit_rates=args.commit_rates,
        progress=say,
    )
    try:
        report = run_async(run_bench(options))
    except DemoError as exc:  # what it started is stopped; its exit code is outboxctl's (3, 4 or 1)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    print(render_table(report))
    return EXIT_OK if report["ok"] else EXIT_FAILURE


def _usage_problem(args: argparse.Namespace, scenarios: tuple[str, ...]) -> str | None:
    """What is wrong with the flags (other than ``--worker-env``), found before the bench starts
    anything; None when nothing is. A full run takes most of an hour: a flag it cannot use, or a
    report it cannot write, must not wait for its end."""
    from outbox_devkit.bench import SCALE_UP_WORKERS
    from outbox_devkit.benchstats import SCENARIOS

    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        return f"unknown scenario {unknown} (use {', '.join(SCENARIOS)})"
    if args.repeat < 1:
        return "--repeat must be at least 1"
    if not (math.isfinite(args.scale) and args.scale > 0):
        return "--scale must be a number above 0 (e.g. 0.01 for a smoke run), not nan or inf"
    fewest = SCALE_UP_WORKERS if "scale-up" in scenarios else 2  # the most workers a chosen scenario runs at once
    if not fewest <= args.partitions <= MAX_PARTITIONS:
        why = f"scale-up runs {SCALE_UP_WORKERS} workers" if "scale-up" in scenarios else "drains run 2 workers"
        return f"--partitions must be from {fewest} ({why}, each needs a partition) to {MAX_PARTITIONS}"
    if args.json_path:
        path = Path(args.json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"--json {args.json_path}: cannot create its directory ({exc.strerror})"
        if path.is_dir() or not os.access(path.parent, os.W_OK):
            return f"--json {args.json_path}: cannot write the report there"
    return None


def _worker_env(items: list[str]) -> dict[str, str] | str:
    """``--worker-env OUTBOX_X=V`` items as a mapping, checked as the workers will read them; the
    one-line problem when one is no ``OUTBOX_NAME=value`` or a value the worker would refuse. A name
    that is no setting is a warning, as for the worker itself."""
    from pydantic import ValidationError

    from outbox_common.settings import describe_error, unknown_env_warnings
    from outbox_devkit.bench import worker_config

    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OUTBOX_"):
            return f"--worker-env {item!r}: use OUTBOX_NAME=value"
        env[key] = value
    try:
        worker_config(env)
    except ValidationError as exc:
        return "--worker-env: invalid worker setting: " + "; ".join(describe_error(exc, flags=False).splitlines())
    for warning in unknown_env_warnings(env):
        print(f"warning: --worker-env: {warning}", file=sys.stderr)
    return env


def _run_child(args: argparse.Namespace) -> int:
    from outbox_cli.cmd_worker import run_on_loop, setup_logging

    settings = WorkerSettings()  # from OUTBOX_* like a worker
    setup_logging(settings.log_format, settings.log_level)
    out = Path(args.child_out)
    if args.child == "worker":
        code, result = run_on_loop(_probe_worker(settings), settings.event_loop)  # the loop a worker runs
    else:
        # The ceiling is the worker's publish path without a database: on the worker's loop. The naive
        # relay stands for the simple relay a user would write: on asyncio's default loop.
        loop = settings.event_loop if args.child == "ceiling" else EventLoop.ASYNCIO
        code, result = EXIT_OK, run_on_loop(_baseline(args, WorkerConfig.from_settings(settings)), loop)
    out.write_text(json.dumps(result))
    return code  # a worker's own: 3 or 4 tell the bench what kept it from starting


async def _probe_worker(settings: WorkerSettings) -> tuple[int, dict[str, object]]:
    """A normal worker (``outboxctl worker``), then the asyncio tasks still alive after it stopped."""
    from outbox_cli.cmd_worker import serve

    code = await serve(settings)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    return code, {
        "exit_code": code,
        "tasks_left": len(left),
        "task_names": sorted(t.get_name() for t in left)[:20],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def _baseline(args: argparse.Namespace, config: WorkerConfig) -> dict[str, object]:
    from outbox_devkit.baselines import naive_relay, publish_ceiling, synthetic_rows

    if args.child == "naive":
        cpu0 = time.process_time()
        result = await naive_relay(config, args.child_events)
    else:
        rows = synthetic_rows(args.child_events, args.child_aggregates)
        tune_gc()  # as `outboxctl worker` does once started (the rows built above are input, not work)
        cpu0 = time.process_time()
        result = await publish_ceiling(config, rows)
    data: dict[str, object] = dict(result.to_json())
    return data | {
        "cpu_seconds": time.process_time() - cpu0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
