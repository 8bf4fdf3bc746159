"""Each part of the worker gets its own small config, built once from the settings; and what the
worker reports about a configuration error tells the operator which dependency is at fault."""

from __future__ import annotations

import dataclasses
from typing import cast

from pydantic import SecretStr

from outbox_common import names
from outbox_common.config import (
    DatabaseConfig,
    LeaseConfig,
    LifecycleConfig,
    MetricsConfig,
    NatsConfig,
    PublishConfig,
    RelayConfig,
    StatusConfig,
    StreamConfig,
    WorkerConfig,
)
from outbox_common.settings import MarkMode, OrderingMode, StreamMode, WorkerSettings
from outbox_worker.adapters.metrics import Metrics
from outbox_worker.adapters.publisher import JetStreamPublisher
from outbox_worker.adapters.store import OutboxStore
from outbox_worker.app.leases import LeaseManager
from outbox_worker.app.relay import RelayLoop, RelayStats
from outbox_worker.app.worker import Worker
from outbox_worker.core.policy import Outcome, PublishResult

DSN = "postgresql://relay:secret-pw@db:5432/shop"


def settings(**kw: object) -> WorkerSettings:
    return WorkerSettings.model_validate({"database_url": DSN, **kw})


def test_each_part_gets_the_knobs_that_move_it() -> None:
    c = WorkerConfig.from_settings(
        settings(
            publisher="orders",
            nats_servers="nats://a:4222,nats://b:4222",
            stream="ORDERS",
            stream_mode="create",
            loops=4,
            max_in_flight=1000,
            lease_ttl_seconds=30,
            ack_timeout_seconds=2,
            ordering="none",
            mark_mode="mark",
            kube_namespace="shop",
            metrics_port=0,
        )
    )
    assert c.database == DatabaseConfig(SecretStr(DSN))
    assert c.database.url.get_secret_value() == DSN
    assert c.nats.servers == ("nats://a:4222", "nats://b:4222")
    assert c.stream == StreamConfig("ORDERS", StreamMode.CREATE)
    assert c.publish == PublishConfig("orders", "ORDERS", ack_timeout_seconds=2.0)
    assert c.leases == LeaseConfig(ttl_seconds=30.0, renew_interval_seconds=10.0, ack_timeout_seconds=2.0)
    assert c.relay.in_flight == 250  # max_in_flight shared by the loops
    assert (c.relay.ordering, c.relay.mark_mode) == (OrderingMode.NONE, MarkMode.MARK)
    assert c.status == StatusConfig("shop", "orders")
    assert c.metrics == MetricsConfig(port=0)
    assert c.lifecycle.duplicate_horizon_seconds == 30 + 2 + 30  # lease TTL + ack timeout + max retry delay


def test_a_config_built_alone_has_the_settings_defaults() -> None:
    """Tests (and the bench) build one part's config alone; its defaults are the settings class's."""
    defaults = WorkerConfig.from_settings(settings())
    assert defaults.nats == NatsConfig.for_url("nats://127.0.0.1:4222")
    assert defaults.stream == StreamConfig()
    assert defaults.publish == PublishConfig()
    assert defaults.leases == LeaseConfig()
    assert defaults.relay == RelayConfig()
    assert defaults.status == StatusConfig()
    assert defaults.metrics == MetricsConfig()
    assert dataclasses.replace(defaults.lifecycle, duplicate_horizon_seconds=0.0) == LifecycleConfig()


def test_secrets_never_show_in_a_configs_repr() -> None:
    c = WorkerConfig.from_settings(settings(nats_user="u", nats_password="nats-pw", nats_token="tok-123"))
    text = repr(c)
    assert "secret-pw" not in text
    assert "nats-pw" not in text
    assert "tok-123" not in text


def test_a_stream_configuration_error_is_reported_with_its_kind() -> None:
    """The operator routes a worker's configError by the report's errorKind field (StreamReady or
    DatabaseReady), never by the words of the message."""
    config = WorkerConfig.from_settings(settings(worker_id="w-1", metrics_port=0))
    worker = Worker(config)
    publisher = JetStreamPublisher(config.nats, config.publish)
    leases = LeaseManager(cast(OutboxStore, None), config.leases, 4, worker.metrics)
    stats = RelayStats()
    worker.stats = stats
    loop = RelayLoop(0, config.relay, cast(OutboxStore, None), publisher, leases, Metrics("p"), stats)
    loop._config_error(1, PublishResult(Outcome.CONFIG, names.REASON_NO_STREAM, "no stream captures subject 'x'"))
    report = worker.report()
    assert report.configError == "stream: no stream captures subject 'x'"
    assert report.errorKind == "stream"
    assert report.to_status()["errorKind"] == "stream"
    stats.config_error_at -= 61  # a configuration error not seen for a minute is no longer reported
    assert (worker.report().configError, worker.report().errorKind) == ("", "")
