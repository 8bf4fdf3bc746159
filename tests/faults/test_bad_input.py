"""Bad input: the production entry point (``python -m outbox_cli worker``, no test hooks) started with
invalid settings, unreachable or refusing servers, a missing table or stream, a stream that does not
capture the subjects, a duplicate window shorter than the re-publish horizon. Each must exit quickly
with its documented code (2 usage, 3 configuration, 4 unavailable: ``outbox_cli.main``) and a message
that names what is wrong and how to fix it, never echo a secret, and leave the outbox untouched."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faults.harness import Rig, bulk_insert, check, fetch, worker_env
from outbox_cli.main import EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_USAGE
from outbox_devkit.embedded import EmbeddedNats, free_port

SECRET = "s3cr3t-Pa55"


async def run_worker(env: dict[str, str], timeout: float = 30.0) -> tuple[int, str, float]:
    """Run the production worker entry; return (exit code, output, seconds). Bounded by ``timeout``."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_cli",
        "worker",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"worker did not exit within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), time.monotonic() - started


async def _rig(make_rig: Callable[..., Rig], dsn: str, url: str, *, stream: bool = True, **cfg: object) -> Rig:
    rig = make_rig(dsn, url)
    await rig.prepare(audit=False)
    if stream:
        await rig.create_stream(**cfg)
    await bulk_insert(rig.dsn, rig.sql, 10, 5)
    return rig


async def _untouched(rig: Rig) -> None:
    rows = await fetch(rig.dsn, f"SELECT count(*) AS n, max(attempts) AS a FROM {rig.sql.outbox}")
    assert (rows[0]["n"], rows[0]["a"]) == (10, 0)  # no partial marks, no attempts counted


def _env(rig: Rig, **overrides: str) -> dict[str, str]:
    env = worker_env(rig, "bad-input", {})
    env.pop("OUTBOX_TEST_HOOK_LOG")
    env.update(overrides)
    return env


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        ({"OUTBOX_BATCH_SIZE": "0"}, ["batch_size", "OUTBOX_BATCH_SIZE"]),
        ({"OUTBOX_ACK_TIMEOUT_SECONDS": "5"}, ["ack_timeout_seconds", "half of lease_ttl_seconds"]),
        ({"OUTBOX_TABLE": "Outbox; DROP TABLE x"}, ["table", "not a valid identifier"]),
        ({"OUTBOX_SUBJECT_TEMPLATE": "events.{nope}"}, ["placeholder", "{nope}"]),
        ({"OUTBOX_NATS_SERVERS": "127.0.0.1:4222"}, ["nats_servers", "needs a scheme"]),
        ({"OUTBOX_DATABASE_URL": f"mysql://u:{SECRET}@h/db"}, ["database_url", "postgresql://"]),
        ({"OUTBOX_DATABASE_URL": ""}, ["database_url"]),
        ({"OUTBOX_ORDERING": "sometimes"}, ["ordering", "OUTBOX_ORDERING"]),
    ],
    ids=["batch0", "ack-vs-ttl", "table-injection", "template", "nats-scheme", "dsn-scheme", "dsn-empty", "enum"],
)
async def test_invalid_settings_exit_2(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig], overrides: dict[str, str], expect: list[str]
) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url)
    code, out, seconds = await run_worker(_env(rig, **overrides))
    assert code == EXIT_USAGE, out
    for text in expect:
        assert text in out, out
    assert SECRET not in out
    assert seconds < 10
    await _untouched(rig)


async def test_database_unreachable_exit_4(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url)
    code, out, seconds = await run_worker(
        _env(
            rig,
            OUTBOX_DATABASE_URL=f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres",
            OUTBOX_STARTUP_TIMEOUT_SECONDS="3",
        )
    )
    assert code == EXIT_UNAVAILABLE, out
    assert "PostgreSQL is not reachable" in out
    assert SECRET not in out
    assert seconds < 3 + 10  # retried for the start-up timeout, then gave up
    await _untouched(rig)


@pytest.mark.parametrize(
    ("dsn_user_db", "expect"),
    [(("nobody", "postgres"), "rejected the credentials"), (("postgres", "no_such_db"), "does not exist")],
    ids=["unknown-role", "unknown-database"],
)
async def test_database_refuses_exit_3(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig], dsn_user_db: tuple[str, str], expect: str
) -> None:
    """The test server trusts every local user, so a refused login is an unknown role here (a wrong
    password takes the same path: asyncpg's InvalidPasswordError → exit 3)."""
    rig = await _rig(make_rig, pg_dsn, nats_url)
    host = pg_dsn.split("@", 1)[1].split("/", 1)[0]
    user, db = dsn_user_db
    code, out, _ = await run_worker(_env(rig, OUTBOX_DATABASE_URL=f"postgresql://{user}:{SECRET}@{host}/{db}"))
    assert code == EXIT_CONFIG, out
    assert expect in out
    assert "check the database Secret" in out
    assert SECRET not in out
    await _untouched(rig)


async def test_missing_outbox_table_exit_3(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url)
    code, out, _ = await run_worker(_env(rig, OUTBOX_TABLE="not_migrated"))
    assert code == EXIT_CONFIG, out
    assert "not_migrated" in out
    assert "outboxctl migrate" in out
    await _untouched(rig)


async def test_nats_unreachable_exit_4(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url)
    code, out, seconds = await run_worker(
        _env(rig, OUTBOX_NATS_SERVERS=f"nats://127.0.0.1:{free_port()}", OUTBOX_STARTUP_TIMEOUT_SECONDS="3")
    )
    assert code == EXIT_UNAVAILABLE, out
    assert "no NATS server answered" in out
    assert seconds < 3 + 10
    await _untouched(rig)


async def test_nats_wrong_credentials_exit_3(pg_dsn: str, make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    server = EmbeddedNats(extra_args=["--user", "relay", "--pass", "right-password"])
    server.start()
    try:
        rig = await _rig(make_rig, pg_dsn, server.url, stream=False)
        code, out, _ = await run_worker(_env(rig, OUTBOX_NATS_USER="relay", OUTBOX_NATS_PASSWORD=SECRET))
        assert code == EXIT_CONFIG, out
        assert "NATS rejected the credentials" in out
        assert SECRET not in out
        await _untouched(rig)
    finally:
        server.cleanup()


async def test_missing_stream_exit_3(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url, stream=False)
    code, out, _ = await run_worker(_env(rig))
    assert code == EXIT_CONFIG, out
    assert "stream 'FAULTS' does not exist" in out
    assert "OUTBOX_STREAM_MODE=create" in out
    await _untouched(rig)


async def test_stream_not_capturing_subjects_exit_3(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = await _rig(make_rig, pg_dsn, nats_url, subjects=["elsewhere.>"])
    code, out, _ = await run_worker(_env(rig))
    assert code == EXIT_CONFIG, out
    assert "captures ['elsewhere.>']" in out
    assert "faults.*.*" in out
    await _untouched(rig)


async def test_duplicate_window_shorter_than_horizon_refuses_to_start(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """The stream de-duplicates for 5 s but a re-publish can come 9 s after the first publish (lease
    TTL 6 + ack timeout 2 + max retry delay 1): the worker must refuse to start, not risk duplicates."""
    rig = await _rig(make_rig, pg_dsn, nats_url, duplicate_window=5.0)
    started = time.monotonic()
    code, out, _ = await run_worker(_env(rig))
    assert code == EXIT_CONFIG, out
    assert "duplicate window of 5s" in out
    assert "re-publish horizon of 9s" in out
    await _untouched(rig)
    report = await check(
        rig,
        "duplicate window 5s < re-publish horizon 9s",
        f"stream duplicate_window 5s; worker exited {code} at start-up naming both figures; nothing published",
        expect_drained=False,
        seconds=time.monotonic() - started,
    )
    assert (report.stored, report.pending, report.ok) == (0, 10, True)
