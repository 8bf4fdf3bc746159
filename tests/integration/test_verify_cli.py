"""``outboxctl verify`` against real servers: what each failure exits with (README: 1 a violation, 2 a
bad flag, 3 configuration, 4 unreachable) and that its one line names the problem, never a secret."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from test_migrate import outboxctl

from outbox_cli.cmd_verify import AUDIT_LOCK_TIMEOUT_SECONDS
from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from outbox_devkit.embedded import EmbeddedNats
from outbox_worker.adapters.history_io import ledger_ddl
from outbox_worker.adapters.store import migrate
from outbox_worker.core.sql import Sql
from support.servers import nats_server

SQL = Sql.for_table("public", "outbox")
STREAM = "VERIFY"
PASSWORD = "N4tsS3cretPw"
TOKEN = "N4tsS3cretTok"
NATS_CONFIG = (  # a user with every permission, and one denied the JetStream API
    "accounts {\n"
    "  APP {\n"
    "    jetstream: enabled\n"
    "    users: [\n"
    f'      {{user: relay, password: "{PASSWORD}"}}\n'
    f'      {{user: nojs, password: "{PASSWORD}", permissions: {{publish: {{deny: ["$JS.API.>"]}}}}}}\n'
    "    ]\n"
    "  }\n"
    "}\n"
)


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server whose users need a password (:data:`NATS_CONFIG`)."""
    with nats_server(tmp_path / "nats", config=NATS_CONFIG) as server:
        yield server


@pytest.fixture
def token_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server that wants the token :data:`TOKEN`."""
    with nats_server(tmp_path / "nats", "--auth", TOKEN) as server:
        yield server


def with_userinfo(url: str, userinfo: str) -> str:
    return url.replace("://", f"://{userinfo}@", 1)


async def verify_cli(*args: str, timeout: float = 90) -> tuple[int, str, str, float]:
    """Run ``outboxctl verify``; (exit code, stdout, stderr, seconds it took)."""
    started = time.monotonic()
    result = await outboxctl("verify", *args, timeout=timeout)
    return result.code, result.out, result.err, time.monotonic() - started


async def prepare(dsn: str, nats_url: str | None = None) -> None:
    """The outbox tables and the ledger; the stream too when ``nats_url`` is given."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, SQL, 4)
        await conn.execute(ledger_ddl(SQL))
    finally:
        await conn.close()
    if nats_url:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().add_stream(name=STREAM, subjects=["verify.>"])
        finally:
            await nc.close()


@pytest.mark.parametrize("value", ["nan", "inf"])
async def test_a_timeout_that_is_no_finite_number_is_a_bad_flag(pg_dsn: str, nats_url: str, value: str) -> None:
    """``nan`` passed the ``<= 0`` check and then timed out at once (exit 4, "not reachable")."""
    await prepare(pg_dsn, nats_url)
    code, _, err, _ = await verify_cli(
        "--database-url", pg_dsn, "--nats-url", nats_url, "--stream", STREAM, "--timeout", value
    )
    assert code == EXIT_USAGE, err
    assert "--timeout" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
async def weak_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """The DSN of ``pg_dsn``'s database as a role with no privilege on its tables (trust auth)."""
    role = f"weak_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
    finally:
        await conn.close()
    yield pg_dsn.replace("postgres@", f"{role}@", 1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()


async def test_missing_select_privileges_are_a_configuration_error(pg_dsn: str, weak_dsn: str, nats_url: str) -> None:
    """A role that may not read the tables: exit 3 (not 1, "a violation found") and one line naming the
    table it may not read, without a traceback."""
    await prepare(pg_dsn, nats_url)
    code, out, err, _ = await verify_cli("--database-url", weak_dsn, "--nats-url", nats_url, "--stream", STREAM)
    assert code == EXIT_CONFIG, err
    assert err.startswith("error: permission denied for table outbox"), err
    assert "grant SELECT" in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == ""


async def test_install_audit_without_the_privileges_is_a_configuration_error(pg_dsn: str, weak_dsn: str) -> None:
    """--install-audit as a role that neither owns the outbox nor may create in its schema: exit 3 and
    one line naming what was denied; nothing was created."""
    await prepare(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP TABLE outbox_ledger")
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    finally:
        await conn.close()
    code, out, err, _ = await verify_cli("--database-url", weak_dsn, "--install-audit")
    assert code == EXIT_CONFIG, err
    assert err.startswith("error: permission denied for schema public"), err
    assert "nothing was changed" in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == ""
    # CREATE on the schema, but no TRIGGER privilege on the outbox: the ledger it created is rolled back
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"GRANT CREATE ON SCHEMA public TO {weak_dsn.split('//')[1].split('@')[0]}")
    finally:
        await conn.close()
    code, _, err, _ = await verify_cli("--database-url", weak_dsn, "--install-audit")
    assert code == EXIT_CONFIG, err
    assert err.startswith("error: permission denied for table outbox:"), err
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('outbox_ledger')") is None
        assert await conn.fetchval("SELECT to_regclass('outbox_mark_audit')") is None
    finally:
        await conn.close()


async def test_install_audit_behind_an_open_write_transaction_gives_up_and_changes_nothing(pg_dsn: str) -> None:
    """CREATE TRIGGER waits for every transaction that writes the outbox; it hung until killed, and its
    queued lock blocked the application's inserts all along. It gives up within seconds: exit 1, one
    line saying another session holds the table's lock; nothing was created."""
    await prepare(pg_dsn)
    holder = await asyncpg.connect(pg_dsn)
    inserter = await asyncpg.connect(pg_dsn)
    try:
        await holder.execute("DROP TABLE outbox_ledger")
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE outbox IN ROW EXCLUSIVE MODE")  # what an INSERT takes
        installing = asyncio.create_task(verify_cli("--database-url", pg_dsn, "--install-audit", timeout=30))
        code, out, err, seconds = await installing
        # the application's inserts are not blocked once it gave up
        await asyncio.wait_for(inserter.execute("DELETE FROM outbox WHERE false"), 5)  # ROW EXCLUSIVE too
        await tx.rollback()
        assert code == EXIT_FAILURE, err
        assert "another session holds a lock on public.outbox" in err
        assert "nothing was changed" in err
        assert len(err.strip().splitlines()) == 1, err
        assert out == ""
        assert seconds < AUDIT_LOCK_TIMEOUT_SECONDS + 15
        assert await holder.fetchval("SELECT to_regclass('outbox_ledger')") is None
        assert await holder.fetchval("SELECT to_regclass('outbox_mark_audit')") is None
    finally:
        await inserter.close()
        await holder.close()


@pytest.mark.parametrize("server", ["password", "token"])
async def test_rejected_nats_credentials_are_a_configuration_error(
    pg_dsn: str, secured_nats: EmbeddedNats, token_nats: EmbeddedNats, server: str
) -> None:
    """A wrong password or token: nats-py reports the rejection to its error callback only, then gives
    up as if no server answered. That was "NATS not reachable … NoServersError", exit 4; the
    credentials are the problem: exit 3, and the secret is not shown."""
    if server == "password":
        good, bad = with_userinfo(secured_nats.url, f"relay:{PASSWORD}"), with_userinfo(secured_nats.url, "relay:wrong")
    else:
        good, bad = with_userinfo(token_nats.url, TOKEN), with_userinfo(token_nats.url, "wrong-token")
    await prepare(pg_dsn, good)
    code, _, err, _ = await verify_cli("--database-url", pg_dsn, "--nats-url", good, "--stream", STREAM)
    assert code == EXIT_OK, err
    code, out, err, _ = await verify_cli("--database-url", pg_dsn, "--nats-url", bad, "--stream", STREAM)
    assert code == EXIT_CONFIG, err
    assert "rejected the credentials" in err
    assert "wrong" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == ""


async def test_a_nats_user_denied_the_jetstream_api_is_a_configuration_error(
    pg_dsn: str, secured_nats: EmbeddedNats
) -> None:
    """The server reports a permissions violation to the client's error callback, and the request goes
    unanswered: verify waited 15 s whatever --timeout said, then reported "NATS not reachable …
    TimeoutError", exit 4. It stops at the violation: exit 3, naming the subject denied."""
    await prepare(pg_dsn, with_userinfo(secured_nats.url, f"relay:{PASSWORD}"))
    url = with_userinfo(secured_nats.url, f"nojs:{PASSWORD}")
    code, out, err, seconds = await verify_cli(
        "--database-url", pg_dsn, "--nats-url", url, "--stream", STREAM, "--timeout", "5"
    )
    assert code == EXIT_CONFIG, err
    assert 'permissions violation for publish to "$js.api.stream.info.verify"' in err
    assert PASSWORD not in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert seconds < 5


async def test_right_after_install_audit_the_marks_are_checked_though_there_are_none(
    pg_dsn: str, nats_url: str
) -> None:
    """An installed audit without records yet: verify said "(no mark audit installed …)", reading the
    count of marks (0) as the audit's absence."""
    await prepare(pg_dsn, nats_url)
    code, _, err, _ = await verify_cli("--database-url", pg_dsn, "--install-audit")
    assert code == EXIT_OK, err
    code, out, err, _ = await verify_cli("--database-url", pg_dsn, "--nats-url", nats_url, "--stream", STREAM)
    assert code == EXIT_OK, err
    assert "no mark audit installed" not in out
    for label in ("marks audited", "marked, not in stream", "marked before stored", "marks under a stale lease"):
        assert re.search(rf"^{label} +0$", out, re.MULTILINE), out
    # without the audit, it says so and shows no mark figure but the count
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP TABLE outbox_mark_audit CASCADE")
    finally:
        await conn.close()
    code, out, err, _ = await verify_cli("--database-url", pg_dsn, "--nats-url", nats_url, "--stream", STREAM)
    assert code == EXIT_OK, err
    assert "(no mark audit installed: mark consistency not checked)" in out
    assert "marked" not in out
    assert "stale" not in out
