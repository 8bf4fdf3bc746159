"""`outboxctl demo --json`: the newcomer's first command runs the whole relay on embedded servers and
verifies the stream against what was committed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from outbox_devkit.embedded import EmbeddedNats, children_of, pid_alive

TOKEN = "N4tsS3cretTok"
PG_PASSWORD = "PgS3cretPw"
SMALL = ("--events", "300", "--workers", "1", "--partitions", "2", "--aggregates", "20", "--timeout", "60")

KEYS = ("events", "published", "lost", "duplicates", "order_violations", "events_per_s", "p50_ms", "p99_ms")


@pytest.fixture
def token_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server that wants the token :data:`TOKEN`."""
    server = EmbeddedNats(base_dir=tmp_path / "nats", extra_args=["--auth", TOKEN])
    server.start()
    yield server
    server.cleanup()


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
