"""One small frozen config per part of the worker, built once at start-up from :class:`WorkerSettings`.

:class:`~outbox_common.settings.WorkerSettings` stays the flat ``OUTBOX_*`` environment contract the
operator renders; the worker turns it into these configs once (:meth:`WorkerConfig.from_settings`) and
hands each part only its own. A reader sees which knob moves which part, and a test builds only the
config it needs (every field but the connection addresses has the settings class's default).

Secrets stay :class:`pydantic.SecretStr` here too: a config's ``repr`` never shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from outbox_common.settings import MarkMode, OrderingMode, StreamMode, WorkerSettings

_DEFAULTS = WorkerSettings.model_fields


def _default(name: str) -> object:
    """The settings class's default of ``name``: the configs' defaults never become a second copy."""
    return _DEFAULTS[name].default


def _str(name: str) -> str:
    value = _default(name)
    assert isinstance(value, str), name
    return value


def _int(name: str) -> int:
    value = _default(name)
    assert isinstance(value, int), name
    return value


def _float(name: str) -> float:
    value = _default(name)
    assert isinstance(value, int | float), name
    return float(value)


_NO_SECRET = SecretStr("")
_STREAM_MODE = StreamMode(_str("stream_mode"))
_ORDERING = OrderingMode(_str("ordering"))
_MARK_MODE = MarkMode(_str("mark_mode"))


@dataclass(frozen=True)
class DatabaseConfig:
    """The PostgreSQL pool and the outbox table (worker start-up, the listener, the store).

    Knobs: ``database_url``, ``db_schema``, ``table``, ``db_pool_size``, ``db_timeout_seconds``.
    """

    url: SecretStr
    schema: str = _str("db_schema")
    table: str = _str("table")
    pool_size: int = _int("db_pool_size")
    statement_timeout_seconds: float = _float("db_timeout_seconds")


@dataclass(frozen=True)
class NatsConfig:
    """The NATS connection (:meth:`JetStreamPublisher.connect`).

    Knobs: ``nats_servers``, ``nats_creds_file``, ``nats_user``, ``nats_password``, ``nats_token``,
    ``nats_tls_ca_file``, ``nats_tls_cert_file``, ``nats_tls_key_file``, ``nats_ping_interval_seconds``.
    """

    servers: tuple[str, ...]
    creds_file: str = ""
    user: str = ""
    password: SecretStr = _NO_SECRET
    token: SecretStr = _NO_SECRET
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    ping_interval_seconds: float = _float("nats_ping_interval_seconds")

    @classmethod
    def for_url(cls, url: str) -> NatsConfig:
        """A plain connection to ``url`` (comma-separated URLs allowed), every other knob at its default."""
        return cls(servers=tuple(u.strip() for u in url.split(",") if u.strip()))


@dataclass(frozen=True)
class StreamConfig:
    """The JetStream stream the relay publishes into (:meth:`JetStreamPublisher.ensure_stream`).

    Knobs: ``stream``, ``stream_mode``, ``stream_replicas``, ``stream_duplicate_window_seconds``.
    """

    name: str = _str("stream")
    mode: StreamMode = _STREAM_MODE
    replicas: int = _int("stream_replicas")
    duplicate_window_seconds: float = _float("stream_duplicate_window_seconds")


@dataclass(frozen=True)
class PublishConfig:
    """What every published message carries and how long its ack may take (:class:`JetStreamPublisher`).

    Knobs: ``publisher`` (the ``Outbox-Publisher`` header), ``stream`` (``Nats-Expected-Stream``),
    ``ack_timeout_seconds``, ``nats_message_tracing``.
    """

    publisher: str = _str("publisher")
    stream: str = _str("stream")
    ack_timeout_seconds: float = _float("ack_timeout_seconds")
    message_tracing: bool = _default("nats_message_tracing") is True


@dataclass(frozen=True)
class LeaseConfig:
    """Partition leases (:class:`LeaseManager`).

    Knobs: ``lease_ttl_seconds``, ``lease_renew_seconds`` (0: a third of the TTL),
    ``poll_interval_seconds`` (the renewal loop wakes at least this often), ``ack_timeout_seconds``
    (a lease stops being usable one ack timeout plus ``timing.LEASE_SAFETY_MARGIN_SECONDS`` before it
    could expire).
    """

    ttl_seconds: float = _float("lease_ttl_seconds")
    renew_interval_seconds: float = _float("lease_ttl_seconds") / 3
    poll_interval_seconds: float = _float("poll_interval_seconds")
    ack_timeout_seconds: float = _float("ack_timeout_seconds")


@dataclass(frozen=True)
class RelayConfig:
    """One claim → publish → ack → mark loop (:class:`RelayLoop`).

    Knobs: ``loops`` (partitions a loop checks out at once are shared among them), ``batch_size``,
    ``batch_bytes`` (``max_batch_bytes``: payload bytes per claim, see OutboxStore.claim),
    ``max_in_flight`` (divided among the loops: ``in_flight``), ``batch_timeout_seconds``,
    ``poll_interval_seconds``, ``max_attempts``, ``retry_backoff_initial_seconds``,
    ``retry_backoff_max_seconds``, ``ordering``, ``mark_mode``, ``subject_template``, and
    ``notify_coalesce_seconds`` (the moderation window of the worker's :class:`Listener`).
    """

    loops: int = _int("loops")
    batch_size: int = _int("batch_size")
    batch_bytes: int = _int("max_batch_bytes")
    in_flight: int = _int("max_in_flight") // _int("loops")
    batch_timeout_seconds: float = _float("batch_timeout_seconds")
    poll_interval_seconds: float = _float("poll_interval_seconds")
    max_attempts: int = _int("max_attempts")
    backoff_initial_seconds: float = _float("retry_backoff_initial_seconds")
    backoff_max_seconds: float = _float("retry_backoff_max_seconds")
    ordering: OrderingMode = _ORDERING
    mark_mode: MarkMode = _MARK_MODE
    subject_template: str = _str("subject_template")
    notify_coalesce_seconds: float = _float("notify_coalesce_seconds")


@dataclass(frozen=True)
class StatusConfig:
    """The worker's entry in its OutboxPublisher's status (:func:`kube_status.sink_for`).

    Knobs: ``kube_namespace`` (empty: no reports), ``publisher``, ``report_interval_seconds``.
    """

    namespace: str = ""
    publisher: str = _str("publisher")
    interval_seconds: float = _float("report_interval_seconds")


@dataclass(frozen=True)
class MetricsConfig:
    """The ``/metrics``, ``/healthz``, ``/readyz`` server. Knobs: ``metrics_host``, ``metrics_port`` (0: off)."""

    host: str = _str("metrics_host")
    port: int = _int("metrics_port")


@dataclass(frozen=True)
class LifecycleConfig:
    """Start, stop and housekeeping of one worker (:class:`Worker`).

    Knobs: ``publisher``, ``worker_id`` (empty: hostname plus a suffix), ``startup_timeout_seconds``,
    ``shutdown_grace_seconds``, ``retention_seconds`` (with ``mark_mode=mark``), and the re-publish
    horizon the stream's duplicate window must cover (``lease_ttl_seconds + ack_timeout_seconds +
    retry_backoff_max_seconds``).
    """

    publisher: str = _str("publisher")
    worker_id: str = ""
    startup_timeout_seconds: float = _float("startup_timeout_seconds")
    shutdown_grace_seconds: float = _float("shutdown_grace_seconds")
    retention_seconds: float = _float("retention_seconds")
    duplicate_horizon_seconds: float = 0.0


@dataclass(frozen=True)
class WorkerConfig:
    """Every part's config, built once from the settings (:meth:`from_settings`)."""

    database: DatabaseConfig
    nats: NatsConfig
    stream: StreamConfig
    publish: PublishConfig
    leases: LeaseConfig
    relay: RelayConfig
    status: StatusConfig
    metrics: MetricsConfig
    lifecycle: LifecycleConfig

    @classmethod
    def from_settings(cls, s: WorkerSettings) -> WorkerConfig:
        """Split the validated settings into the parts' configs (cross-field rules already held)."""
        return cls(
            database=database_config(s),
            nats=nats_config(s),
            stream=stream_config(s),
            publish=publish_config(s),
            leases=lease_config(s),
            relay=relay_config(s),
            status=StatusConfig(s.kube_namespace, s.publisher, s.report_interval_seconds),
            metrics=MetricsConfig(s.metrics_host, s.metrics_port),
            lifecycle=lifecycle_config(s),
        )


def database_config(s: WorkerSettings) -> DatabaseConfig:
    """The database part of ``s``."""
    return DatabaseConfig(s.database_url, s.db_schema, s.table, s.db_pool_size, s.db_timeout_seconds)


def nats_config(s: WorkerSettings) -> NatsConfig:
    """The NATS connection part of ``s``."""
    return NatsConfig(
        servers=tuple(s.server_list),
        creds_file=s.nats_creds_file,
        user=s.nats_user,
        password=s.nats_password,
        token=s.nats_token,
        tls_ca_file=s.nats_tls_ca_file,
        tls_cert_file=s.nats_tls_cert_file,
        tls_key_file=s.nats_tls_key_file,
        ping_interval_seconds=s.nats_ping_interval_seconds,
    )


def stream_config(s: WorkerSettings) -> StreamConfig:
    """The stream part of ``s``."""
    return StreamConfig(s.stream, s.stream_mode, s.stream_replicas, s.stream_duplicate_window_seconds)


def publish_config(s: WorkerSettings) -> PublishConfig:
    """The publishing part of ``s``."""
    return PublishConfig(s.publisher, s.stream, s.ack_timeout_seconds, s.nats_message_tracing)


def lease_config(s: WorkerSettings) -> LeaseConfig:
    """The lease part of ``s``."""
    return LeaseConfig(s.lease_ttl_seconds, s.renew_interval, s.poll_interval_seconds, s.ack_timeout_seconds)


def relay_config(s: WorkerSettings) -> RelayConfig:
    """The relay loop part of ``s``."""
    return RelayConfig(
        loops=s.loops,
        batch_size=s.batch_size,
        batch_bytes=s.max_batch_bytes,
        in_flight=s.per_loop_in_flight,
        batch_timeout_seconds=s.batch_timeout_seconds,
        poll_interval_seconds=s.poll_interval_seconds,
        max_attempts=s.max_attempts,
        backoff_initial_seconds=s.retry_backoff_initial_seconds,
        backoff_max_seconds=s.retry_backoff_max_seconds,
        ordering=s.ordering,
        mark_mode=s.mark_mode,
        subject_template=s.subject_template,
        notify_coalesce_seconds=s.notify_coalesce_seconds,
    )


def lifecycle_config(s: WorkerSettings) -> LifecycleConfig:
    """The worker's own lifecycle part of ``s``."""
    return LifecycleConfig(
        publisher=s.publisher,
        worker_id=s.worker_id,
        startup_timeout_seconds=s.startup_timeout_seconds,
        shutdown_grace_seconds=s.shutdown_grace_seconds,
        retention_seconds=s.retention_seconds,
        duplicate_horizon_seconds=s.duplicate_horizon_seconds,
    )
