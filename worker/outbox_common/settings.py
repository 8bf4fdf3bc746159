"""The worker's settings: the one contract between the operator and the worker process.

The worker reads these from its environment (prefix ``OUTBOX_``) or from flags; the operator renders
the worker Deployment's environment from this same class (:func:`render_env`), so the two cannot
drift. Secrets are only ever :class:`pydantic.SecretStr` and are rendered as ``secretKeyRef``s by
the operator, never as values.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox_common.timing import Timing, timing_violation

ENV_PREFIX = "OUTBOX_"

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_STREAM = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")
REDACTED = "<redacted>"
# userinfo of a URL (``scheme://user:password@host``), up to the authority's last ``@``: an unencoded
# ``@`` in the password is hidden too
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/]+@")
_LEADING_USERINFO = re.compile(r"^[^\s/]+@")  # a server entry written without its scheme
WEBSOCKET_SCHEMES = ("ws://", "wss://")
TEMPLATE_FIELDS = ("aggregate_type", "event_type", "tenant", "aggregate_id")
# The table's name gets suffixes (``_dead_letters``, the longest) that must stay within PostgreSQL's
# 63 characters: outbox_worker.core.sql.Sql.for_table, the CRD and the operator's spec say the same.
MAX_TABLE_LENGTH = 63 - len("_dead_letters")
# The outbox's NOTIFY channels are "<schema>.<table>" (its trigger's pg_notify, on every INSERT) and
# "<schema>.<table>_leases" (lease announcements), and PostgreSQL refuses a channel name of more than 63
# bytes ("channel name too long"): the trigger would fail every INSERT of the application, the
# announcements every handover. Identifiers are ASCII (_IDENT), so characters are bytes. The CRD's
# CEL rule on spec.database and the operator's spec say the same.
MAX_SCHEMA_AND_TABLE_LENGTH = 63 - len(".") - len("_leases")


def schema_and_table_problem(schema: str, table: str, schema_field: str, table_field: str) -> str | None:
    """Why ``schema`` and ``table`` together are too long for the outbox's NOTIFY channels, naming
    them as ``schema_field`` and ``table_field`` (a setting, a flag, a spec path); None when they fit."""
    length = len(schema.encode()) + len(table.encode())
    if length <= MAX_SCHEMA_AND_TABLE_LENGTH:
        return None
    return (
        f"{table_field} and {schema_field} are {length} characters together ({table!r}, {schema!r}): at most "
        f"{MAX_SCHEMA_AND_TABLE_LENGTH}, as the outbox's NOTIFY channels <schema>.<table> and "
        "<schema>.<table>_leases must fit PostgreSQL's 63-byte names (beyond, pg_notify fails every INSERT into "
        "the outbox, or every lease announcement). Use a shorter table or schema name; an outbox already "
        "migrated under these names cannot be relayed: migrate one under shorter names (outboxctl migrate), "
        "move its pending rows there and point the producers and the relay at it"
    )


def validate_identifier(value: str, field: str) -> str:
    """Return ``value`` if it is a safe, unquoted PostgreSQL identifier, else raise ``ValueError``.

    Only lower-case letters, digits and underscores (not leading with a digit), at most 63
    characters: configuration can never inject SQL through a schema or table name.
    """
    if not _IDENT.match(value):
        raise ValueError(
            f"{field}={value!r} is not a valid identifier: use 1-63 lower-case letters, digits or "
            "underscores, not starting with a digit (for example 'outbox')"
        )
    return value


def redact_urls(text: str) -> str:
    """``text`` with the user and password of every URL in it hidden (``nats://alice:pw@host`` →
    ``nats://<redacted>@host``): the worker's and the operator's messages (an API server's error may
    quote a value the operator sent) must never show credentials."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def redact_url(url: str) -> str:
    """One server URL with its user and password hidden, also when it was written without a scheme
    (``alice:pw@host`` → ``<redacted>@host``)."""
    url = url.strip()
    return redact_urls(url) if "://" in url else _LEADING_USERINFO.sub(f"{REDACTED}@", url)


def redact_server_list(urls: str | Iterable[str]) -> str:
    """Server URLs (a comma-separated string, or each apart) as a message may show them: joined with
    commas, each without its user and password (:func:`redact_url`)."""
    return ",".join(redact_url(u) for u in (urls.split(",") if isinstance(urls, str) else urls))


def _server_for_message(url: str) -> str:
    """A server URL for an error message: everything before its last ``@`` (a user, a password, even
    one with an unencoded ``/`` that :func:`redact_url` would not recognise) hidden."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = f"{REDACTED}@{rest.rsplit('@', 1)[1]}"
    return scheme + sep + rest


def server_url_problem(url: str) -> str | None:
    """What keeps the NATS client from connecting to ``url`` (one server URL with a known scheme), as
    the end of a sentence; None when it can. The client parses URLs with ``urllib.parse`` and refuses
    one without a host, with a port that is no number of 0-65535, or with the host ``none``; port 0
    cannot be connected to. The message never repeats a part of the URL (it may hold a password)."""
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed '[' of an IPv6 address
        return "is no valid URL: write scheme://host:port, an IPv6 address in brackets ([::1])"
    try:
        port = parsed.port
    except ValueError:
        hint = " (percent-encode '/', ':' and '@' in a user or password, or they are read as one)" if "@" in url else ""
        return f"has a port that is not a number of 1-65535{hint}"
    if not parsed.hostname:
        return "has no host: write scheme://host:port"
    if parsed.hostname == "none":
        return "names the host 'none', which the NATS client refuses: use the server's name or address"
    if port == 0:
        return "has port 0: use the server's port, 1-65535"
    return None


def mixes_transports(urls: list[str]) -> bool:
    """Whether ``urls`` mix websocket (ws://, wss://) and other (nats://, tls://) servers, which the
    NATS client refuses: it connects over one transport."""
    return len({url.startswith(WEBSOCKET_SCHEMES) for url in urls}) > 1


def validate_subject_template(template: str) -> str:
    """Check a subject template such as ``events.{aggregate_type}.{event_type}``.

    Placeholders must be whole tokens and name a known field; literal tokens must be valid NATS
    subject tokens without wildcards.
    """
    if not template:
        raise ValueError("subject template is empty: use for example 'events.{aggregate_type}.{event_type}'")
    for token in template.split("."):
        if token.startswith("{") and token.endswith("}"):
            name = token[1:-1]
            if name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"subject template placeholder {token!r} is unknown: use one of "
                    + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                )
        elif not token or any(c in token for c in " \t\r\n*>{}"):
            raise ValueError(
                f"subject template token {token!r} is invalid: tokens are separated by single dots, "
                "and placeholders must be whole tokens like '{event_type}'"
            )
    return template


class OrderingMode(StrEnum):
    """``per_aggregate``: events of one aggregate reach the stream in outbox order, at most one
    unacknowledged per aggregate. ``none``: no ordering promise; every due row is pipelined."""

    PER_AGGREGATE = "per_aggregate"
    NONE = "none"


class EventLoop(StrEnum):
    """The worker's asyncio event loop: ``uvloop`` (libuv; the default) or ``asyncio`` (the
    standard library's). Same behaviour, different CPU per round trip."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class MarkMode(StrEnum):
    """``delete``: acked rows are deleted (cheapest). ``mark``: ``published_at`` is set and a
    retention sweep deletes them after ``retention_seconds``."""

    DELETE = "delete"
    MARK = "mark"


class StreamMode(StrEnum):
    """``expect``: the stream must exist (the worker refuses to start otherwise). ``create``: the
    worker creates it (file storage, subjects from the template) when missing."""

    EXPECT = "expect"
    CREATE = "create"


class WorkerSettings(BaseSettings):
    """Everything one relay worker needs. Each field maps to ``OUTBOX_<FIELD>`` in the environment."""

    # hide_input_in_errors: a ValidationError's text would otherwise echo the raw DSN (a secret).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, hide_input_in_errors=True)

    # --- identity -------------------------------------------------------------------------------
    publisher: str = Field(
        "default",
        description="Name of the relay (the OutboxPublisher's name). Workers with the same name share "
        "partitions through leases.",
    )
    worker_id: str = Field(
        "",
        description="Unique id of this worker (the pod name). Empty: hostname plus a random suffix.",
    )
    # --- database -------------------------------------------------------------------------------
    database_url: SecretStr = Field(
        ..., description="PostgreSQL DSN, e.g. postgresql://user:pass@host:5432/db. Secret."
    )
    db_schema: str = Field("public", description="Schema of the outbox, lease and dead-letter tables.")
    table: str = Field("outbox", description="Name of the outbox table.")
    db_pool_size: int = Field(
        4, ge=2, le=64, description="Connections in the worker's pool; one of them is kept for the claims."
    )
    db_timeout_seconds: float = Field(10.0, gt=0, le=300, description="Timeout of one SQL statement.")
    # --- NATS -----------------------------------------------------------------------------------
    nats_servers: str = Field("nats://127.0.0.1:4222", description="Comma-separated NATS server URLs.")
    nats_creds_file: str = Field("", description="Path of a NATS .creds file (mounted from a Secret).")
    nats_user: str = Field("", description="NATS user name, if user/password authentication is used.")
    nats_password: SecretStr = Field(SecretStr(""), description="NATS password. Secret.")
    nats_token: SecretStr = Field(SecretStr(""), description="NATS token. Secret.")
    nats_tls_ca_file: str = Field("", description="CA bundle to verify the NATS servers (enables TLS).")
    nats_tls_cert_file: str = Field("", description="Client certificate for mutual TLS.")
    nats_tls_key_file: str = Field("", description="Client key for mutual TLS.")
    nats_ping_interval_seconds: float = Field(
        5.0, gt=0, le=120, description="Ping interval; a stalled server is detected after 3 missed pings."
    )
    nats_message_tracing: bool = Field(
        False,
        description="Let nats-server's message tracing act on a sampled traceparent row header. Off: "
        "on nats-server 2.14+ such a message also carries Nats-Trace-Dest: trace disabled, which "
        "saves the server ~2.5 µs of CPU per message. Turn on if your NATS account sets trace_dest.",
    )
    # --- stream and subjects --------------------------------------------------------------------
    stream: str = Field("OUTBOX", description="JetStream stream that must capture the subjects.")
    stream_mode: StreamMode = Field(StreamMode.EXPECT, description="expect or create the stream.")
    stream_replicas: int = Field(1, ge=1, le=5, description="Replicas when the worker creates the stream.")
    stream_duplicate_window_seconds: float = Field(
        120.0,
        ge=1,
        le=86400,
        description="Duplicate window when the worker creates the stream; must cover the re-publish horizon "
        "(lease TTL + ack timeout + max retry delay).",
    )
    subject_template: str = Field(
        "outbox.{aggregate_type}.{event_type}",
        description="Subject of each event; placeholders {aggregate_type}, {event_type}, {tenant}, "
        "{aggregate_id} are replaced by sanitized tokens.",
    )
    # --- publishing limits ----------------------------------------------------------------------
    batch_size: int = Field(1000, ge=1, le=10000, description="Rows claimed per batch.")
    max_batch_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        le=1024 * 1024 * 1024,
        description="Payload bytes claimed per batch at most: a batch of n rows takes payloads up to this / n "
        "bytes, a larger one waits for the next batch, which takes its partition alone with fewer rows; a "
        "batch always holds at least one row, so a payload over this goes alone.",
    )
    loops: int = Field(4, ge=1, le=16, description="Concurrent claim/publish loops per worker.")
    max_in_flight: int = Field(4000, ge=1, le=100000, description="Upper bound of unacknowledged publishes per worker.")
    ack_timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="A publish with no ack within this time fails as a timeout."
    )
    batch_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Upper bound of one batch: no new wave of publishes starts after this; "
        "the batch's remaining rows stay pending for the next claim.",
    )
    retry_backoff_initial_seconds: float = Field(0.2, gt=0, le=60, description="First retry delay.")
    retry_backoff_max_seconds: float = Field(30.0, gt=0, le=3600, description="Cap of the retry delay.")
    max_attempts: int = Field(
        5,
        ge=1,
        le=1000,
        description="Attempts of a row that fails with a permanent per-row error before it is "
        "dead-lettered. Retryable errors (timeouts, 503, disconnects) retry without limit.",
    )
    ordering: OrderingMode = Field(OrderingMode.PER_AGGREGATE, description="per_aggregate or none.")
    mark_mode: MarkMode = Field(MarkMode.DELETE, description="delete or mark acked rows.")
    retention_seconds: float = Field(
        86400.0,
        ge=0,
        description="With mark_mode=mark: how long published rows are kept at least (each worker sweeps "
        "older ones once a minute, 10,000 per statement, for up to 30 s).",
    )
    # --- leases and wake-up ---------------------------------------------------------------------
    lease_ttl_seconds: float = Field(15.0, ge=1, le=600, description="Lease time-to-live.")
    lease_renew_seconds: float = Field(0.0, ge=0, le=200, description="Renew interval; 0 means a third of the TTL.")
    poll_interval_seconds: float = Field(1.0, gt=0, le=60, description="Fallback poll when no NOTIFY arrives.")
    notify_coalesce_seconds: float = Field(
        0.006,
        ge=0,
        le=0.05,
        description="After a NOTIFY wakes the worker, the NOTIFYs of the next this-many seconds are "
        "read together as one wake-up: commits made meanwhile share one claim, one publish and one "
        "mark (less CPU per event at one event per transaction; adds at most this much commit->ack "
        "latency; the first commit after a quiet spell is claimed at once). 0 wakes on every NOTIFY.",
    )
    # --- lifecycle and observability ------------------------------------------------------------
    startup_timeout_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description=(
            "How long start-up retries an unreachable database or NATS, or a JetStream API that does "
            "not answer, before the worker exits (code 4)."
        ),
    )
    shutdown_grace_seconds: float = Field(
        20.0, gt=0, le=600, description="Time to finish in-flight work after SIGTERM."
    )
    metrics_port: int = Field(9090, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 off.")
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server binds.")
    log_format: str = Field("text", pattern="^(text|json)$", description="text or json.")
    event_loop: EventLoop = Field(
        EventLoop.UVLOOP,
        description="uvloop (about half the CPU per database or NATS round trip) or asyncio (the "
        "standard library's loop, for debugging or where uvloop is not installed).",
    )
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    # --- status reporting to the OutboxPublisher (operator mode) --------------------------------
    report_interval_seconds: float = Field(
        10.0, ge=1, le=600, description="How often the worker writes its entry into the CR status."
    )
    kube_namespace: str = Field("", description="Namespace of the OutboxPublisher; empty disables reports.")

    @field_validator("db_schema", "table")
    @classmethod
    def _identifier(cls, value: str, info: Any) -> str:
        validate_identifier(value, info.field_name)
        if info.field_name == "table" and len(value) > MAX_TABLE_LENGTH:
            raise ValueError(
                f"table is {len(value)} characters long: at most {MAX_TABLE_LENGTH} (the tables derived "
                "from it, such as <table>_dead_letters, must stay within PostgreSQL's 63)"
            )
        return value

    @field_validator("subject_template")
    @classmethod
    def _template(cls, value: str) -> str:
        return validate_subject_template(value)

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        if not _STREAM.match(value):
            raise ValueError(f"stream={value!r}: use letters, digits, '-' or '_' (e.g. 'OUTBOX')")
        return value

    @field_validator("publisher")
    @classmethod
    def _publisher(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"publisher={value!r}: use a DNS label (lower-case letters, digits, '-'; e.g. 'orders')")
        return value

    @field_validator("nats_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("nats_servers is empty: give e.g. nats://nats:4222")
        for s in servers:
            if not re.match(r"^(nats|tls|ws|wss)://", s):
                raise ValueError(
                    f"nats_servers entry {redact_url(s)!r} needs a scheme nats://, tls://, ws:// or wss:// "
                    "(e.g. nats://nats:4222)"
                )
            problem = server_url_problem(s)
            if problem:
                raise ValueError(f"nats_servers entry {_server_for_message(s)!r} {problem} (e.g. nats://nats:4222)")
        if mixes_transports(servers):
            raise ValueError(
                "nats_servers mixes websocket (ws://, wss://) and other (nats://, tls://) URLs: the NATS client "
                "connects over one transport, so list servers of one kind"
            )
        return ",".join(servers)

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        if not re.match(r"^postgres(ql)?://", value.get_secret_value()):
            raise ValueError("database_url must start with postgresql:// (value not shown: it is a secret)")
        return value

    @model_validator(mode="after")
    def _cross(self) -> WorkerSettings:
        """The length of db_schema and table together, and the timing rules the operator's spec keeps
        too (outbox_common.timing), by setting name."""
        problem = schema_and_table_problem(self.db_schema, self.table, "db_schema", "table") or timing_violation(
            self.timing, str
        )
        if problem:
            raise ValueError(problem)
        return self

    # --- derived values -------------------------------------------------------------------------
    @property
    def renew_interval(self) -> float:
        return self.timing.renew_interval_seconds

    @property
    def server_list(self) -> list[str]:
        return self.nats_servers.split(",")

    @property
    def per_loop_in_flight(self) -> int:
        """Publishes one loop may have unacknowledged (its largest wave). The worker total stays within
        max_in_flight unless max_in_flight < loops: every loop may still send one, so up to ``loops``."""
        return max(1, self.max_in_flight // self.loops)

    @property
    def duplicate_horizon_seconds(self) -> float:
        """Longest time between two publishes of one event id by any worker
        (:func:`outbox_common.timing.duplicate_horizon_seconds`)."""
        return self.timing.horizon_seconds

    @property
    def timing(self) -> Timing:
        """The values the shared timing rules read."""
        return Timing(
            lease_ttl_seconds=self.lease_ttl_seconds,
            lease_renew_seconds=self.lease_renew_seconds,
            ack_timeout_seconds=self.ack_timeout_seconds,
            retry_backoff_initial_seconds=self.retry_backoff_initial_seconds,
            retry_backoff_max_seconds=self.retry_backoff_max_seconds,
            stream_duplicate_window_seconds=self.stream_duplicate_window_seconds,
        )


def env_name(field: str) -> str:
    """Environment variable of a settings field (``batch_size`` → ``OUTBOX_BATCH_SIZE``)."""
    if field not in WorkerSettings.model_fields:
        raise KeyError(f"unknown worker setting {field!r}")
    return ENV_PREFIX + field.upper()


SECRET_FIELDS = frozenset(name for name, f in WorkerSettings.model_fields.items() if f.annotation is SecretStr)


def render_env(values: dict[str, Any]) -> dict[str, str]:
    """Render non-secret settings as environment variables, validated against the worker's class.

    ``values`` must not contain secret fields (they are passed by reference); the result is checked by
    building a :class:`WorkerSettings` with a placeholder DSN, so an invalid value fails here, in the
    operator, with the worker's own message.
    """
    secret = sorted(SECRET_FIELDS & values.keys())
    if secret:
        raise ValueError(f"secret settings {secret} must be passed by Secret reference, not by value")
    unknown = sorted(values.keys() - WorkerSettings.model_fields.keys())
    if unknown:
        raise ValueError(f"unknown worker settings {unknown}")
    WorkerSettings.model_validate({**values, "database_url": "postgresql://placeholder/db"})
    return {env_name(k): _env_value(v) for k, v in sorted(values.items())}


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, StrEnum):
        return value.value
    return str(value)


def unknown_env_warnings(environ: Mapping[str, str]) -> list[str]:
    """One message per ``OUTBOX_*`` variable in ``environ`` that is no worker setting, naming the
    closest valid one (``OUTBOX_BATCHSIZE`` → ``OUTBOX_BATCH_SIZE``) when there is one.

    A warning, not an error: during a rolling upgrade a newer operator may render a setting an older
    worker image does not know yet, and refusing to start would turn that version skew into a crash
    loop of every worker; the relay runs with that setting's default either way, and the warning
    says so. The operator renders only this class's fields (:func:`render_env`, and it refuses
    ``OUTBOX_*`` names in ``spec.worker.env``), so its own environment never warns. Values are never
    echoed (one of them could be a secret).
    """
    fields = sorted(WorkerSettings.model_fields)
    known = {env_name(f) for f in fields}
    messages = []
    for key in sorted(environ):
        # pydantic-settings reads the names case-insensitively: OUTBOX_batch_size is batch_size
        if not key.upper().startswith(ENV_PREFIX) or key.upper() in known:
            continue
        # compared without the prefix every name shares, which would make any two names look alike
        close = difflib.get_close_matches(key[len(ENV_PREFIX) :].lower(), fields, n=1, cutoff=0.7)
        hint = f"did you mean {env_name(close[0])}?" if close else "see `outboxctl worker --help` for the names"
        messages.append(f"unknown setting {key} in the environment is ignored: {hint}")
    return messages


def describe_error(exc: ValidationError, *, flags: bool = True) -> str:
    """One line per bad field: which field, what is wrong, and the environment variable to fix (and
    the ``outboxctl worker`` flag, unless ``flags`` is False: a command without those flags)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc in WorkerSettings.model_fields:
            flag = f" or --{loc.replace('_', '-')}" if flags else ""
            hint = f" (set {env_name(loc)}{flag})"
        else:  # a rule across fields: its message names them by setting
            named = [f for f in WorkerSettings.model_fields if re.search(rf"\b{f}\b", msg)]
            hint = f" (set {', '.join(env_name(f) for f in named)})" if named else ""
        lines.append(f"{loc}: {msg}{hint}")
    return "\n".join(lines)
