"""nats-server's message tracing (ADR-41) and rows that carry a W3C ``traceparent``, on a real server
whose account sets ``trace_dest``: with ``nats_message_tracing`` off (the default) the relay turns the
server's trace check off for those messages, with it on the server traces them. Either way the
row's headers reach the stream unchanged."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.msg import Msg
from test_relay import STREAM, insert, worker_settings

from outbox_common import names
from outbox_devkit.embedded import EmbeddedNats
from support.polling import wait_for
from support.relay import running, setup_db

TRACES = "traces.relay"
USER, PASSWORD = "relay", "relay-pw"
SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NOT_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


@pytest.fixture
def traced_nats() -> Iterator[EmbeddedNats]:
    """A nats-server whose account traces every message that has a sampled traceparent."""
    base = Path(tempfile.mkdtemp(prefix="outbox-trace-"))
    config = base / "server.conf"
    config.write_text(
        "accounts {\n"
        "  APP {\n"
        "    jetstream: enabled\n"
        f'    users: [{{user: {USER}, password: "{PASSWORD}"}}]\n'
        f'    trace_dest: "{TRACES}"\n'
        "  }\n"
        "}\n"
    )
    server = EmbeddedNats(base_dir=base / "nats", extra_args=["-c", str(config)])
    server.start()
    yield server
    server.cleanup()


async def _relay(pg_dsn: str, url: str, tracing: bool) -> tuple[int, dict[str, dict[str, str]]]:
    """Relay two rows with a sampled traceparent and one with an unsampled one. Returns how many
    trace events the server sent, and the stored messages' headers by aggregate id."""
    await setup_db(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await insert(conn, "a1", headers={"traceparent": SAMPLED})
        await insert(conn, "a2", headers={"TraceParent": SAMPLED, "x-other": "1"})
        await insert(conn, "a3", headers={"traceparent": NOT_SAMPLED})
    finally:
        await conn.close()
    client = await nats.connect(url, user=USER, password=PASSWORD)
    traces: list[Msg] = []

    async def on_trace(msg: Msg) -> None:
        traces.append(msg)

    await client.subscribe(TRACES, cb=on_trace)
    try:
        js = client.jetstream()
        settings = worker_settings(pg_dsn, url, nats_message_tracing=tracing, nats_user=USER, nats_password=PASSWORD)

        async def stored() -> bool:
            try:
                return (await js.stream_info(STREAM)).state.messages == 3
            except nats.js.errors.NotFoundError:
                return False

        async with running(settings):
            await wait_for(stored, 10, "3 stored messages")
        await asyncio.sleep(0.5)  # the server sends trace events on its own schedule
        messages = [await js.get_msg(STREAM, seq) for seq in (1, 2, 3)]
        headers: dict[str, dict[str, Any]] = {
            m.headers[names.HDR_AGGREGATE_ID]: m.headers for m in messages if m.headers
        }
        return len(traces), headers
    finally:
        await client.close()


async def test_trace_check_is_off_by_default_and_row_headers_are_kept(pg_dsn: str, traced_nats: EmbeddedNats) -> None:
    traces, headers = await _relay(pg_dsn, traced_nats.url, tracing=False)
    assert traces == 0
    assert headers["a1"][names.HDR_TRACE_DEST] == names.TRACE_DEST_DISABLED
    assert headers["a1"]["traceparent"] == SAMPLED
    assert headers["a2"][names.HDR_TRACE_DEST] == names.TRACE_DEST_DISABLED
    assert (headers["a2"]["TraceParent"], headers["a2"]["x-other"]) == (SAMPLED, "1")
    assert names.HDR_TRACE_DEST not in headers["a3"]  # not sampled: the server has nothing to check
    assert headers["a3"]["traceparent"] == NOT_SAMPLED


async def test_message_tracing_on_lets_the_server_trace_sampled_events(pg_dsn: str, traced_nats: EmbeddedNats) -> None:
    traces, headers = await _relay(pg_dsn, traced_nats.url, tracing=True)
    # trace events for each of the two sampled messages (the server itself then stores them with
    # Nats-Trace-Dest: trace disabled, so the headers tell nothing here)
    assert traces >= 2
    assert headers["a1"]["traceparent"] == SAMPLED
