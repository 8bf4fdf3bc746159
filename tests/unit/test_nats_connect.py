"""The worker's first NATS connect: a server list nats-py refuses before it tries any server is a
configuration error (exit 3, with nats-py's reason), not a defect (exit 1) to crash-loop on."""

from __future__ import annotations

import pytest

from outbox_common.config import NatsConfig
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsConfigError


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        ("nats://nats:99999", "invalid connect url"),
        ("nats://:4222", "invalid hostname"),
        ("nats://a:4222,ws://b:8080", "mixing of websocket and non websocket"),
    ],
)
async def test_a_server_list_nats_py_refuses_is_a_configuration_error(servers: str, reason: str) -> None:
    pub = JetStreamPublisher(NatsConfig.for_url(servers))
    with pytest.raises(NatsConfigError) as refused:
        await pub.connect(timeout=2.0)
    assert reason in str(refused.value)
    assert "OUTBOX_NATS_SERVERS" in str(refused.value)


async def test_a_password_in_a_refused_server_list_is_not_shown() -> None:
    pub = JetStreamPublisher(NatsConfig.for_url("nats://alice:s3cr3t@nats:4222,ws://b:8080"))
    with pytest.raises(NatsConfigError) as refused:
        await pub.connect(timeout=2.0)
    assert "s3cr3t" not in str(refused.value)
