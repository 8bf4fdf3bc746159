"""A NATS user the server's permissions do not let do what the relay needs. The server drops such a
message and says why with an -ERR on the connection, not in an ack: the worker reads that and
reports a configuration error naming what to allow, where it reported a timeout (a stream check
"not answered", exit 4 with a hint about the meta leader; publishes retried forever as timeouts)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js import api as js_api
from pydantic import SecretStr
from test_relay_failures import STREAM, fetchval, worker_settings

from outbox_common import names
from outbox_common.config import NatsConfig, StreamConfig
from outbox_common.settings import StreamMode
from outbox_devkit.embedded import EmbeddedNats
from outbox_devkit.producers import ProducerPlan, produce
from outbox_worker.adapters import publisher as publisher_module
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsConfigError
from support.polling import wait_for
from support.relay import SQL, running, setup_db
from support.servers import nats_server

PASSWORD = "perm-test-pw"
USERS = """
authorization {
  users = [
    {user: admin, password: %(pw)s}
    {user: nojs, password: %(pw)s, permissions: {publish: {allow: ["outbox.>"]}, subscribe: {allow: ["_INBOX.>"]}}}
    {user: nosubject, password: %(pw)s,
     permissions: {publish: {allow: ["$JS.API.>", "_INBOX.>"]}, subscribe: {allow: ["_INBOX.>"]}}}
  ]
}
"""


@pytest.fixture
def guarded_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream and three users: admin (anything), nojs (may publish events but
    not use the JetStream API), nosubject (the JetStream API but not the events' subjects)."""
    with nats_server(tmp_path / "nats", config=USERS % {"pw": PASSWORD}) as server:
        yield server


def as_user(server: EmbeddedNats, user: str) -> NatsConfig:
    return NatsConfig(servers=(server.url,), user=user, password=SecretStr(PASSWORD))


async def test_a_user_without_the_jetstream_api_fails_the_stream_check_naming_what_to_allow(
    guarded_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "STREAM_API_TIMEOUT_SECONDS", 1.0)
    assert publisher_module.STREAM_API_TIMEOUT_SECONDS == 1.0
    pub = JetStreamPublisher(as_user(guarded_nats, "nojs"))
    await pub.connect(timeout=10)
    t0 = time.monotonic()
    try:
        with pytest.raises(NatsConfigError) as refused:
            await pub.ensure_stream(StreamConfig("PERM", StreamMode.EXPECT), "outbox.*.*", 60, deadline=t0 + 20)
    finally:
        await pub.close()
    assert "the NATS user may not use the JetStream API" in str(refused.value)
    assert "allow it to publish to $JS.API.>" in str(refused.value)
    assert time.monotonic() - t0 < 10  # at the first unanswered request, not at the deadline


async def test_a_user_that_may_not_publish_the_events_is_a_configuration_error_and_nothing_is_lost(
    pg_dsn: str, guarded_nats: EmbeddedNats
) -> None:
    await setup_db(pg_dsn)
    nc = await nats.connect(guarded_nats.url, user="admin", password=PASSWORD)
    try:
        await nc.jetstream().add_stream(js_api.StreamConfig(name=STREAM, subjects=["outbox.>"], duplicate_window=120))
    finally:
        await nc.close()
    settings = worker_settings(
        pg_dsn, guarded_nats.url, stream_mode="expect", nats_user="nosubject", nats_password=PASSWORD
    )
    async with running(settings) as worker:
        await produce(pg_dsn, SQL, ProducerPlan(events=20, aggregates=5, producers=1, rollback_ratio=0))
        await wait_for(lambda: bool(worker.stats.config_error), 20, "a configuration error")
        report = worker.report()
        assert report.configError.startswith("nats: the NATS user may not publish to 'outbox."), report.configError
        assert "allow it in the server's permissions" in report.configError
        metrics = worker.metrics.render().decode()
        assert f'config_errors_total{{publisher="failures",reason="{names.REASON_NOT_PERMITTED}"}}' in metrics
    assert await fetchval(pg_dsn, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 20
    assert await fetchval(pg_dsn, "SELECT max(attempts) FROM outbox") == 0  # not the rows' fault
    assert await fetchval(pg_dsn, "SELECT count(*) FROM outbox_dead_letters") == 0
