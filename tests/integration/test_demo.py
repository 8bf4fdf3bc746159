"""`outboxctl demo --json`: the newcomer's first command runs the whole relay on embedded servers and
verifies the stream against what was committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from test_worker_start import role_with

from outbox_cli.main import EXIT_CONFIG, EXIT_UNAVAILABLE
from outbox_devkit.demo import READY_TIMEOUT_SECONDS, WORKER_STARTUP_TIMEOUT_SECONDS
from outbox_devkit.embedded import EmbeddedNats, children_of, free_port, pid_alive
from support.servers import nats_server

TOKEN = "N4tsS3cretTok"
PG_PASSWORD = "PgS3cretPw"
NATS_PASSWORD = "N4tsS3cretPw"
SMALL = ("--events", "300", "--workers", "1", "--partitions", "2", "--aggregates", "20", "--timeout", "60")

KEYS = ("events", "published", "lost", "duplicates", "order_violations", "events_per_s", "p50_ms", "p99_ms")


@pytest.fixture
def nats_without_jetstream(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server whose account (user ``relay``, password :data:`NATS_PASSWORD`) has no JetStream:
    the demo's own connection works, a worker's start-up fails at once (exit 3)."""
    config = f'accounts {{ APP {{ users: [ {{user: relay, password: "{NATS_PASSWORD}"}} ] }} }}\n'
    with nats_server(tmp_path / "nats", config=config) as server:
        yield server


@pytest.fixture
def token_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server that wants the token :data:`TOKEN`."""
    with nats_server(tmp_path / "nats", "--auth", TOKEN) as server:
        yield server


def demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_cli", "demo", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


SERVERS_UP = re.compile(r"servers up: postgres \S*@127\.0\.0\.1:(\d+)/\S*, nats nats://127\.0\.0\.1:(\d+)")


def server_ports(output: str) -> list[int]:
    """The ports of the demo's PostgreSQL and nats-server, from its "servers up" line."""
    found = SERVERS_UP.search(output)
    assert found, output[-2000:]
    return [int(p) for p in found.groups()]


def ports_once_producing(stream: IO[str]) -> list[int]:
    """Read the demo's progress until its producers run (a "committed" line); its server ports."""
    seen = ""
    while "committed" not in seen:
        line = stream.readline()
        assert line, seen[-2000:]
        seen += line
    return server_ports(seen)


def kill_if_running(proc: subprocess.Popen[str]) -> None:
    """After a failure: leave no orphans behind for the tests after this one."""
    if proc.poll() is None:
        for pid in children_of(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()


def test_demo_json_reports_a_clean_relay() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.run(
        [sys.executable, "-m", "outbox_cli", "demo", "--events", "3000", "--json", "--timeout", "120"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # --json prints exactly one JSON object, progress goes to stderr
    summary = json.loads(lines[0])
    assert set(KEYS) <= summary.keys()
    assert summary["events"] == 3000
    assert summary["published"] == 3000
    assert (summary["lost"], summary["duplicates"], summary["order_violations"]) == (0, 0, 0)
    assert summary["events_per_s"] > 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["latency_clock"] == "postgres commit timestamp"  # from the commit, not when COMMIT returned
    assert summary["ok"] is True
    assert summary["rolled_back"] > 0  # rolled-back producer transactions were exercised, and excluded
    assert summary["worker_exit_codes"] == [0] * summary["workers"]
    # The embedded servers it started are stopped: nothing listens on their ports any more.
    assert [listening(p) for p in server_ports(proc.stderr)] == [False, False]


def test_sigterm_stops_the_demo_with_its_workers_and_servers() -> None:
    """`kill <demo>` (SIGTERM) must not orphan what it started: workers and embedded servers stop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox_cli", "demo", "--events", "5000000", "--timeout", "300", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        ports = ports_once_producing(proc.stderr)
        started = children_of(proc.pid)
        assert started
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        kill_if_running(proc)
    assert [listening(p) for p in ports] == [False, False]
    assert [p for p in started if pid_alive(p)] == []


def test_ctrl_c_stops_the_demo_in_order_with_one_line() -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group. The demo's workers and
    servers run in their own process groups, so only the demo gets it: it stops the workers, then
    nats-server, then PostgreSQL, and prints one line, without a traceback from any of them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox_cli", "demo", "--events", "5000000", "--timeout", "300"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the demo leads its own process group, as a shell's foreground job does
    )
    ports: list[int] = []
    try:
        assert proc.stdout is not None
        ports = ports_once_producing(proc.stdout)
        started = children_of(proc.pid)
        assert started
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 130, err[-3000:]
    after = [line for line in (out + err).splitlines() if line.strip() and "committed" not in line]
    assert after == ["interrupted: stopped the workers, then nats-server, then PostgreSQL"], (out + err)[-3000:]
    assert [listening(p) for p in ports] == [False, False]
    assert [p for p in started if pid_alive(p)] == []


def test_the_demo_on_given_servers_never_prints_their_secrets(pg_dsn: str, token_nats: EmbeddedNats) -> None:
    """A password in the DSN (user info or query string) or a NATS token in the URL: the "servers up"
    line printed them."""
    dsn = pg_dsn.replace("postgres@", f"postgres:{PG_PASSWORD}@", 1) + f"?password={PG_PASSWORD}"
    nats_url = token_nats.url.replace("://", f"://{TOKEN}@", 1)
    proc = demo(*SMALL, "--database-url", dsn, "--nats-url", nats_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "servers up: postgres postgresql://<redacted>@127.0.0.1:" in proc.stdout
    assert f"nats nats://<redacted>@127.0.0.1:{token_nats.port};" in proc.stdout
    assert PG_PASSWORD not in proc.stdout + proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """The demo ended with ``code`` and one error line holding ``needles``, without a traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: "), errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_an_unreachable_database_is_one_line_and_exit_4(nats_url: str) -> None:
    proc = demo(*SMALL, "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/x", "--nats-url", nats_url)
    assert_one_line(proc, EXIT_UNAVAILABLE, "PostgreSQL is not reachable")


def test_an_unreachable_nats_is_one_line_and_exit_4_within_seconds(pg_dsn: str) -> None:
    """nats-py's defaults retried for about two minutes (60 attempts, 2 s apart), then a traceback."""
    started = time.monotonic()
    proc = demo(*SMALL, "--database-url", pg_dsn, "--nats-url", f"nats://127.0.0.1:{free_port()}", timeout=60)
    assert_one_line(proc, EXIT_UNAVAILABLE, "NATS not reachable at nats://127.0.0.1:")
    assert time.monotonic() - started < 30


def test_a_rejected_nats_token_is_one_line_and_exit_3_within_seconds(pg_dsn: str, token_nats: EmbeddedNats) -> None:
    started = time.monotonic()
    proc = demo(
        *SMALL, "--database-url", pg_dsn, "--nats-url", token_nats.url.replace("://", "://wrong-tok@"), timeout=60
    )
    assert_one_line(proc, EXIT_CONFIG, "rejected the credentials", f"nats://<redacted>@127.0.0.1:{token_nats.port}")
    assert "wrong-tok" not in proc.stderr
    assert time.monotonic() - started < 30


def test_a_tls_url_to_a_server_without_tls_is_refused_before_the_token_is_sent(
    pg_dsn: str, token_nats: EmbeddedNats
) -> None:
    """The demo's own connection, as its workers', speaks TLS to a tls:// URL or nothing at all."""
    url = token_nats.url.replace("nats://", f"tls://{TOKEN}@")
    proc = demo(*SMALL, "--database-url", pg_dsn, "--nats-url", url, timeout=60)
    assert_one_line(proc, EXIT_CONFIG, "the NATS server does not offer TLS", "nothing was sent in clear")
    assert TOKEN not in proc.stderr + proc.stdout
    # refused by the demo's own connection, before it started a worker (whose start refuses it too)
    assert "servers up" not in proc.stdout + proc.stderr
    assert "worker" not in proc.stderr


def test_a_worker_that_cannot_start_is_reported_with_its_error(
    pg_dsn: str, nats_without_jetstream: EmbeddedNats
) -> None:
    """It was a traceback pointing at worker logs in a directory the demo had already deleted. Now: the
    worker's own error, and its exit code (3, a configuration problem)."""
    url = nats_without_jetstream.url.replace("://", f"://relay:{NATS_PASSWORD}@")
    proc = demo(*SMALL, "--database-url", pg_dsn, "--nats-url", url, "--json")
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker 0 exited 3 while starting: configuration error: JetStream is not enabled")
    assert "Traceback" not in proc.stderr
    assert NATS_PASSWORD not in proc.stderr
    assert proc.stdout == ""


def test_a_worker_denied_the_jetstream_api_is_reported_before_the_demo_gives_up(pg_dsn: str, tmp_path: Path) -> None:
    """A user denied the JetStream API: the demo's own connection works, a worker's stream check is
    refused by the server's permissions and the worker exits 3 naming what to allow. Before, it
    retried the unanswered requests for its start-up budget, which was the demo's own wait (60 s):
    the demo gave up first, "workers did not share the partitions within 60s", a traceback. Its
    workers now have a shorter budget than it waits, for whatever holds their start-up up."""
    assert WORKER_STARTUP_TIMEOUT_SECONDS + 20 <= READY_TIMEOUT_SECONDS
    config = (
        "accounts { APP { jetstream: enabled\n"
        f'  users: [ {{user: relay, password: "{NATS_PASSWORD}", permissions: {{publish: {{deny: ["$JS.API.>"]}}}}}} ]'
        " } }\n"
    )
    with nats_server(tmp_path / "nats", config=config) as server:
        started = time.monotonic()
        proc = demo(
            *SMALL, "--database-url", pg_dsn, "--nats-url", server.url.replace("://", f"://relay:{NATS_PASSWORD}@")
        )
        seconds = time.monotonic() - started
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: worker 0 exited 3 while starting: "), errors[0]
    assert "the NATS user may not use the JetStream API" in errors[0], errors[0]
    assert NATS_PASSWORD not in proc.stdout + proc.stderr
    assert seconds < READY_TIMEOUT_SECONDS


async def test_a_role_that_may_not_create_the_tables_is_one_line_naming_the_grants_and_exit_3(
    pg_dsn: str, nats_url: str
) -> None:
    """The demo creates its tables in schema public, which PostgreSQL 15 and later let only its owner
    create in: a role of the user's own was a traceback ending in "permission denied". The schema
    exists, so the grant on it is all the role needs (not CREATE on the database)."""
    async with role_with(pg_dsn) as dsn:
        proc = await asyncio.to_thread(demo, *SMALL, "--database-url", dsn, "--nats-url", nats_url)
    assert_one_line(
        proc,
        EXIT_CONFIG,
        "PostgreSQL refused to create the tables public.outbox_demo* for the role of --database-url",
        "(permission denied for schema public); each run drops and creates them, and the schema if missing: "
        'run GRANT USAGE, CREATE ON SCHEMA "public" TO "relay_',
    )
    assert "ON DATABASE" not in proc.stderr
