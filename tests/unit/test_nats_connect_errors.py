"""What the publisher's first connect makes of a server that answers the connect with an error of
its own (-ERR). A real nats-server at its connection limit sends INFO, then -ERR 'maximum connections
exceeded', then closes: whether the client reads the -ERR or only the closed socket depends on the
scheduling, so the protocol is played here by a socket server that always sends both, in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from outbox_common.config import NatsConfig
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsUnavailableError


@pytest.fixture
async def refusing_server() -> AsyncIterator[str]:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "x", "version": "2.15.1", "max_payload": 1048576, "headers": True, "proto": 1}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await reader.readline()  # CONNECT
        writer.write(b"-ERR 'maximum connections exceeded'\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_refusing_the_connect_is_unavailable_not_a_crash(refusing_server: str) -> None:
    """'maximum connections exceeded' (every client reconnecting after a restart) is a server not
    there for us yet: NatsUnavailableError, which the worker's start-up asks again about until its
    deadline and then exits 4 on, not nats-py's raw error (exit 1 and a traceback)."""
    pub = JetStreamPublisher(NatsConfig.for_url(refusing_server))
    try:
        with pytest.raises(NatsUnavailableError) as refused:
            await pub.connect(timeout=5)
    finally:
        await pub.close()
    assert "the NATS server refused the connection" in str(refused.value)
    assert "maximum connections exceeded" in str(refused.value)
