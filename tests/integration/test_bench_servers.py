"""`outboxctl bench --database-url ... --nats-url ...` on servers the user gives it, as the demo does:
a server that is not reachable ends it within seconds with exit 4 and one line, rejected credentials
or a server set up so the bench cannot run with 3, a worker that cannot start with that worker's own
error and exit code, and no password or token is ever printed. Before, each was a traceback (exit
1), some only after nats-py's two minutes of reconnecting."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from test_demo import assert_one_line
from test_worker_start import role_with

from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE
from outbox_devkit import demo
from outbox_devkit.bench import BenchOptions, run_bench
from outbox_devkit.demo import DemoError
from outbox_devkit.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from support.servers import ControlledPostgres, nats_server

PG_PASSWORD = "PgS3cretPw"
NATS_PASSWORD = "N4tsS3cretPw"
TOKEN = "N4tsS3cretTok"
SECRETS = (PG_PASSWORD, NATS_PASSWORD, TOKEN)
SMALL = ("--scenario", "hot", "--scale", "0.01", "--repeat", "1")
CONNECT_OF_USER = '"user": "relay"'  # in the CONNECT line a tracing nats-server logs


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_cli", "bench", *SMALL, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def with_user(url: str, userinfo: str) -> str:
    return url.replace("://", f"://{userinfo}@", 1)


def assert_no_secret(proc: subprocess.CompletedProcess[str]) -> None:
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr


@pytest.fixture
async def password_pg(own_pg: ControlledPostgres) -> EmbeddedPostgres:
    """A PostgreSQL that checks passwords over TCP (scram-sha-256): ``postgres`` has :data:`PG_PASSWORD`."""
    conn = await asyncpg.connect(own_pg.dsn)
    try:
        await conn.execute(f"ALTER ROLE postgres PASSWORD '{PG_PASSWORD}'")
        (own_pg.data_dir / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    while True:  # the postmaster reloads pg_hba.conf on its own time
        try:
            await (await asyncpg.connect(own_pg.dsn.replace("postgres@", "postgres:wrong@", 1))).close()
        except asyncpg.InvalidPasswordError:
            break
        assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
        await asyncio.sleep(0.05)
    return own_pg


@pytest.fixture
def token_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with nats_server(tmp_path / "nats", "--auth", TOKEN) as server:
        yield server


@pytest.fixture
def password_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """User ``relay`` with :data:`NATS_PASSWORD`; tracing, so its log shows each CONNECT and its user."""
    with nats_server(tmp_path / "nats", "--user", "relay", "--pass", NATS_PASSWORD, "-DV") as server:
        yield server


def account_nats(tmp_path: Path, account: str, permissions: str = "") -> Iterator[EmbeddedNats]:
    config = (
        f'accounts {{ APP {{ {account}\n  users: [ {{user: relay, password: "{NATS_PASSWORD}"{permissions}}} ] }} }}\n'
    )
    with nats_server(tmp_path / "nats", config=config) as server:
        yield server


@pytest.fixture
def nats_without_jetstream(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """User ``relay``'s account has no JetStream."""
    yield from account_nats(tmp_path, "")


@pytest.fixture
def nats_denying_the_jetstream_api(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """User ``relay`` may not publish to the JetStream API: its requests go unanswered."""
    yield from account_nats(tmp_path, "jetstream: enabled", ', permissions: {publish: {deny: ["$JS.API.>"]}}')


def test_an_unreachable_database_is_one_line_and_exit_4(nats_url: str) -> None:
    proc = bench("--database-url", f"postgresql://u:{PG_PASSWORD}@127.0.0.1:{free_port()}/x", "--nats-url", nats_url)
    assert_one_line(proc, EXIT_UNAVAILABLE, "PostgreSQL is not reachable")
    assert_no_secret(proc)


def test_an_unreachable_nats_is_one_line_and_exit_4_within_seconds(pg_dsn: str) -> None:
    """nats-py's defaults retried for two minutes (60 attempts, 2 s apart), then a traceback."""
    started = time.monotonic()
    url = f"nats://relay:{NATS_PASSWORD}@127.0.0.1:{free_port()}"
    proc = bench("--database-url", pg_dsn, "--nats-url", url)
    assert_one_line(proc, EXIT_UNAVAILABLE, "NATS not reachable at nats://<redacted>@127.0.0.1:")
    assert_no_secret(proc)
    assert time.monotonic() - started < 30


def test_a_rejected_database_password_is_one_line_and_exit_3(password_pg: EmbeddedPostgres, nats_url: str) -> None:
    dsn = password_pg.dsn.replace("postgres@", "postgres:wrong-pw@", 1)
    proc = bench("--database-url", dsn, "--nats-url", nats_url)
    assert_one_line(proc, EXIT_CONFIG, "PostgreSQL rejected the credentials (InvalidPasswordError)")
    assert "wrong-pw" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("server", ["token", "password"])
def test_rejected_nats_credentials_are_one_line_and_exit_3_within_seconds(
    pg_dsn: str, request: pytest.FixtureRequest, server: str
) -> None:
    nats: EmbeddedNats = request.getfixturevalue(f"{server}_nats")
    wrong = "wrong-tok" if server == "token" else "relay:wrong-pw"
    started = time.monotonic()
    proc = bench("--database-url", pg_dsn, "--nats-url", with_user(nats.url, wrong))
    assert_one_line(proc, EXIT_CONFIG, "rejected the credentials", f"nats://<redacted>@127.0.0.1:{nats.port}")
    assert wrong.split(":")[-1] not in proc.stdout + proc.stderr
    assert time.monotonic() - started < 30


def test_a_tls_url_to_a_server_without_tls_is_refused_before_the_password_is_sent(
    pg_dsn: str, password_nats: EmbeddedNats
) -> None:
    """The bench's own connection sent CONNECT, password included, in clear to a tls:// URL (nats-py
    upgrades only when the server asks); its workers refused it, too late."""
    url = with_user(password_nats.url, f"relay:{NATS_PASSWORD}").replace("nats://", "tls://")
    proc = bench("--database-url", pg_dsn, "--nats-url", url)
    assert_one_line(proc, EXIT_CONFIG, "the NATS server does not offer TLS", "nothing was sent in clear")
    assert "worker" not in proc.stderr  # refused by the bench's own connection, before any worker started
    assert_no_secret(proc)
    assert CONNECT_OF_USER not in password_nats.log_path.read_text()  # no CONNECT reached the server


def test_jetstream_off_for_the_account_is_one_line_and_exit_3(
    pg_dsn: str, nats_without_jetstream: EmbeddedNats
) -> None:
    url = with_user(nats_without_jetstream.url, f"relay:{NATS_PASSWORD}")
    proc = bench("--database-url", pg_dsn, "--nats-url", url)
    assert_one_line(proc, EXIT_CONFIG, "JetStream is not enabled for this NATS server or account", "<redacted>")
    assert_no_secret(proc)


def test_a_user_denied_the_jetstream_api_is_one_line_and_exit_3_at_once(
    pg_dsn: str, nats_denying_the_jetstream_api: EmbeddedNats
) -> None:
    """The server drops a denied request: the bench waited 30 s for an answer, then a traceback."""
    started = time.monotonic()
    url = with_user(nats_denying_the_jetstream_api.url, f"relay:{NATS_PASSWORD}")
    proc = bench("--database-url", pg_dsn, "--nats-url", url)
    assert_one_line(
        proc, EXIT_CONFIG, "the NATS user may not use the JetStream API", "allow it to publish to $JS.API.>"
    )
    assert_no_secret(proc)
    assert time.monotonic() - started < 15


def test_a_worker_that_cannot_start_is_reported_with_its_own_error_and_exit_code(pg_dsn: str, nats_url: str) -> None:
    """It was "a bench process exited early (code 1)" pointing at a log in a directory the bench had
    already deleted, and a traceback. Now: the worker's own error, and its exit code (3)."""
    proc = bench(
        "--database-url", pg_dsn, "--nats-url", nats_url, "--quiet", "--worker-env", "OUTBOX_STREAM_MODE=expect"
    )
    assert_one_line(
        proc,
        EXIT_CONFIG,
        "error: worker 0 exited 3 while starting: configuration error: stream 'OUTBOX_BENCH' does not exist",
    )


async def test_a_role_that_may_not_create_the_tables_is_one_line_naming_the_grant_and_exit_3(
    pg_dsn: str, nats_url: str
) -> None:
    """The bench drops and creates its tables (schema outbox_bench) before each run: a role without
    CREATE on the database was a traceback ending in "permission denied for database"."""
    database = pg_dsn.rsplit("/", 1)[1]
    async with role_with(pg_dsn) as dsn:
        proc = await asyncio.to_thread(bench, "--quiet", "--database-url", dsn, "--nats-url", nats_url)
    assert_one_line(
        proc,
        EXIT_CONFIG,
        "PostgreSQL refused to create the tables outbox_bench.hot* for the role of --database-url "
        f"(permission denied for database {database})",
        f'run GRANT CREATE ON DATABASE "{database}" TO "relay_',
    )


async def test_a_worker_that_does_not_start_in_time_is_reported_with_the_end_of_its_log(
    pg_dsn: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench waits for its workers as long as the demo does (READY_TIMEOUT_SECONDS, shortened
    here), and then says what their logs end with, not only "did not share the partitions"."""
    monkeypatch.setattr(demo, "READY_TIMEOUT_SECONDS", 3.0)
    silent = f"nats://127.0.0.1:{free_port()}"  # the worker retries it for its start-up budget (30 s)
    options = BenchOptions(
        scenarios=("hot",),
        repeat=1,
        scale=0.01,
        database_url=pg_dsn,
        nats_url=nats_url,
        worker_env={"OUTBOX_NATS_SERVERS": silent, "OUTBOX_LOG_LEVEL": "INFO"},
    )
    started = time.monotonic()
    with pytest.raises(DemoError) as failed:
        await run_bench(options)
    assert time.monotonic() - started < 20
    assert failed.value.exit_code == EXIT_FAILURE
    message = str(failed.value)
    assert message.startswith("workers did not share the partitions within 3s"), message
    assert "the end of their logs:\n--- run1-worker0.log\n" in message, message


def test_the_bench_on_given_servers_never_prints_their_secrets(
    pg_dsn: str, token_nats: EmbeddedNats, tmp_path: Path
) -> None:
    """A password in the DSN (user info or query string), a NATS token in the URL: the servers are
    named, without them, and the report holds neither."""
    dsn = pg_dsn.replace("postgres@", f"postgres:{PG_PASSWORD}@", 1) + f"?password={PG_PASSWORD}"
    report = tmp_path / "bench.json"
    proc = bench("--database-url", dsn, "--nats-url", with_user(token_nats.url, TOKEN), "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "servers: postgres postgresql://<redacted>@127.0.0.1:" in proc.stderr
    assert f"nats nats://<redacted>@127.0.0.1:{token_nats.port}" in proc.stderr
    assert_no_secret(proc)
    for secret in SECRETS:
        assert secret not in report.read_text()
