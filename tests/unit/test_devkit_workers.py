"""The environment of the workers `outboxctl demo` and `outboxctl bench` start: a start-up budget
shorter than their own wait for the workers, so that a worker that cannot start says why first."""

from __future__ import annotations

from pathlib import Path

from outbox_devkit.bench import BenchOptions, _Bench
from outbox_devkit.demo import READY_TIMEOUT_SECONDS, WORKER_STARTUP_TIMEOUT_SECONDS
from outbox_worker.core.sql import Sql

SQL = Sql.for_table("outbox_bench", "hot")


def bench_env(worker_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the bench gives a worker, ``--worker-env`` being ``worker_env``."""
    bench = _Bench(
        BenchOptions(worker_env=worker_env or {}),
        Path("unused"),
        "postgresql://u@127.0.0.1/db",
        ["nats://127.0.0.1:4222"],
    )
    return bench._env(SQL, "bench-1-0")


def test_bench_workers_get_the_demos_start_up_budget_shorter_than_the_wait_for_them() -> None:
    """It was the worker's default, 60 s, as long as the bench waited: the bench gave up first and
    never showed the worker's error."""
    assert bench_env()["OUTBOX_STARTUP_TIMEOUT_SECONDS"] == f"{WORKER_STARTUP_TIMEOUT_SECONDS:g}"
    assert WORKER_STARTUP_TIMEOUT_SECONDS + 20 <= READY_TIMEOUT_SECONDS


def test_a_start_up_budget_given_with_worker_env_wins() -> None:
    env = bench_env({"OUTBOX_STARTUP_TIMEOUT_SECONDS": "5"})
    assert env["OUTBOX_STARTUP_TIMEOUT_SECONDS"] == "5"
