"""The OutboxPublisher spec as a pydantic model, and its mapping onto the worker's settings.

The model mirrors crds/outboxpublisher.yaml field by field (camelCase in YAML, snake_case here):
``tests/unit/test_operator_crd.py`` proves both have the same fields, defaults, enums and bounds.
The CRD's CEL rules are repeated as model validators, the types are as strict as the schema's (no
``"3"`` for an integer, no ``"yes"`` for a boolean) and :func:`validate_name` repeats the CRD's
metadata.name rule, so a spec that reaches the operator without the API server's checks (an old
API server, an object stored under an older CRD, an emulator) is still refused, naming the same
field path as the API server (``tests/operator/test_operator_examples.py`` proves it for every
example in examples/invalid/).

:data:`SETTINGS_MAP` is the one table from spec paths to :class:`WorkerSettings` fields; the operator
renders the worker's environment from it with the worker's own ``render_env``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from outbox_common.settings import (
    ENV_PREFIX,
    MarkMode,
    OrderingMode,
    StreamMode,
    WorkerSettings,
    mixes_transports,
    render_env,
    schema_and_table_problem,
    server_url_problem,
)
from outbox_common.timing import Timing, timing_violation


class InvalidSpec(ValueError):
    """A spec the operator cannot act on. ``field`` is the spec path, the message says how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


# Kubernetes' own rules: a Secret's name is a DNS-1123 subdomain; a key of its data matches
# [-._a-zA-Z0-9]+. The CRD carries the same patterns, so a DSN pasted as a name is refused by field path.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # noqa: S105 - a name pattern, not a password
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 - a key pattern
OPTIONAL_SECRET_KEY_PATTERN = r"^([-._a-zA-Z0-9]+)?$"  # noqa: S105 - a key pattern

SecretName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=SECRET_NAME_PATTERN)]


def _key(default: str) -> Any:
    return Field(default, min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class SecretKeyRef(_Model):
    """A key of a Secret in the OutboxPublisher's namespace. Subclasses set the key's default."""

    name: SecretName
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class DatabaseSecretRef(SecretKeyRef):
    key: str = _key("url")


class PasswordSecretRef(SecretKeyRef):
    key: str = _key("password")


class TokenSecretRef(SecretKeyRef):
    key: str = _key("token")


class CredentialsSecretRef(SecretKeyRef):
    key: str = _key("nats.creds")


class Autoscaling(_Model):
    enabled: bool = False
    min_replicas: int = Field(1, ge=1, le=4096)
    max_replicas: int = Field(4, ge=1, le=4096)
    target_backlog_per_replica: int = Field(10000, ge=1, le=100_000_000)
    target_lag_seconds: float = Field(30.0, ge=1, le=86400)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)

    @model_validator(mode="after")
    def _min_max(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must be less than or equal to spec.autoscaling.maxReplicas")
        return self


class Database(_Model):
    secret_ref: DatabaseSecretRef
    db_schema: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # at most 50 characters (settings.MAX_TABLE_LENGTH): it gets suffixes such as _dead_letters
    table: str = Field("outbox", pattern=r"^[a-z_][a-z0-9_]{0,49}$")
    pool_size: int = Field(4, ge=2, le=64)
    statement_timeout_seconds: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _channels(self) -> Database:
        # the CRD's CEL rule on spec.database (settings.MAX_SCHEMA_AND_TABLE_LENGTH): the NOTIFY channels
        problem = schema_and_table_problem(self.db_schema, self.table, "spec.database.schema", "spec.database.table")
        if problem:
            raise ValueError(problem + "; both fields are immutable: recreate the OutboxPublisher")
        return self


class NatsTls(_Model):
    secret_name: SecretName
    ca_key: str = _key("ca.crt")
    cert_key: str = Field("", max_length=253, pattern=OPTIONAL_SECRET_KEY_PATTERN)
    key_key: str = Field("", max_length=253, pattern=OPTIONAL_SECRET_KEY_PATTERN)

    @model_validator(mode="after")
    def _pair(self) -> NatsTls:
        if (self.cert_key == "") != (self.key_key == ""):
            raise ValueError("spec.nats.tls.certKey and keyKey must both be set (mutual TLS) or both be empty")
        return self


# No "@": credentials in a URL (user:password@, token@) would be a plain value of the worker
# Deployment's environment, readable by anyone who may read Deployments; they go in Secrets.
ServerUrl = Annotated[str, StringConstraints(max_length=253, pattern=r"^(nats|tls|ws|wss)://[^,\s@]+$")]


class Nats(_Model):
    servers: list[ServerUrl] = Field(min_length=1, max_length=16)
    user: str = Field("", max_length=253)
    password_secret_ref: PasswordSecretRef | None = None
    token_secret_ref: TokenSecretRef | None = None
    credentials_secret_ref: CredentialsSecretRef | None = None
    tls: NatsTls | None = None
    ping_interval_seconds: float = Field(5.0, gt=0, le=120)
    message_tracing: bool = False

    @model_validator(mode="after")
    def _servers(self) -> Nats:
        # what the worker's settings refuse too (settings.WorkerSettings._servers), by spec path
        for index, url in enumerate(self.servers):
            problem = server_url_problem(url)
            if problem:
                raise ValueError(f"spec.nats.servers[{index}] {problem} (e.g. nats://nats:4222)")
        if mixes_transports(self.servers):  # the CRD's CEL rule on spec.nats
            raise ValueError(
                "spec.nats.servers must not mix websocket (ws://, wss://) and other (nats://, tls://) URLs: "
                "the NATS client connects over one transport"
            )
        return self

    @model_validator(mode="after")
    def _auth(self) -> Nats:
        refs = [self.password_secret_ref, self.token_secret_ref, self.credentials_secret_ref]
        if sum(r is not None for r in refs) > 1:
            raise ValueError("use at most one of spec.nats.passwordSecretRef, tokenSecretRef and credentialsSecretRef")
        if (self.password_secret_ref is not None) != (self.user != ""):
            # parse_spec cuts a message at its first space into field and text: say it as one sentence
            raise ValueError("spec.nats.user needs spec.nats.passwordSecretRef, and the reverse: set both or neither")
        return self


class Stream(_Model):
    name: str = Field("OUTBOX", max_length=255, pattern=r"^[A-Za-z0-9_-]+$")
    mode: StreamMode = StreamMode.EXPECT
    replicas: int = Field(1, ge=1, le=5)
    duplicate_window_seconds: float = Field(120.0, ge=1, le=86400)


class Retry(_Model):
    initial_backoff_seconds: float = Field(0.2, gt=0, le=60)
    max_backoff_seconds: float = Field(30.0, gt=0, le=3600)
    max_attempts: int = Field(5, ge=1, le=1000)


class Publishing(_Model):
    batch_size: int = Field(1000, ge=1, le=10000)
    max_batch_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    loops: int = Field(4, ge=1, le=16)
    max_in_flight: int = Field(4000, ge=1, le=100000)
    ack_timeout_seconds: float = Field(5.0, gt=0, le=120)
    batch_timeout_seconds: float = Field(30.0, gt=0, le=600)
    poll_interval_seconds: float = Field(1.0, gt=0, le=60)
    notify_coalesce_seconds: float = Field(0.006, ge=0, le=0.05)
    retry: Retry = Field(default_factory=Retry)
    mark_mode: MarkMode = MarkMode.DELETE
    retention_seconds: float = Field(86400.0, ge=0, le=31_536_000)


class Leases(_Model):
    ttl_seconds: float = Field(15.0, ge=1, le=600)
    renew_seconds: float = Field(0.0, ge=0, le=200)


# Kubernetes' resource.Quantity syntax (the pattern its own CRDs use): 500m, 2, 256Mi, 1e3.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)]
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class Toleration(_Model):
    """core/v1 Toleration, with the API server's own rules (so a bad one is refused at admission)."""

    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _rules(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists (it then tolerates every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class EnvVarSource(_Model):
    """core/v1 EnvVarSource: exactly one source; its inner fields are the API server's to check."""

    secret_key_ref: dict[str, Any] | None = None
    config_map_key_ref: dict[str, Any] | None = None
    field_ref: dict[str, Any] | None = None
    resource_field_ref: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        sources = [self.secret_key_ref, self.config_map_key_ref, self.field_ref, self.resource_field_ref]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "valueFrom must have exactly one of secretKeyRef, configMapKeyRef, fieldRef and resourceFieldRef"
            )
        return self


def is_reserved_env_name(name: str) -> bool:
    """True for every spelling of a name the worker reads as a setting (``OUTBOX_*``, any case).

    pydantic-settings matches environment names case-insensitively, so ``outbox_database_url`` is
    read as ``OUTBOX_DATABASE_URL``; the prefix test in upper case covers every field of
    :class:`WorkerSettings` (whose names are all ``OUTBOX_`` plus the field name).
    """
    return name.upper().startswith(ENV_PREFIX)


class EnvVar(_Model):
    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN)
    value: str | None = None
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _value_xor_value_from(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("an env entry has either value or valueFrom, not both")
        return self


class WorkerOverrides(_Model):
    image: str = Field("", max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: ResourceRequirements | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    affinity: dict[str, Any] | None = None
    env: list[EnvVar] | None = Field(None, max_length=64)
    shutdown_grace_seconds: float = Field(20.0, gt=0, le=600)
    metrics_port: int = Field(9090, ge=1, le=65535)
    log_format: Literal["text", "json"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _env(self) -> WorkerOverrides:
        for index, var in enumerate(self.env or []):
            if is_reserved_env_name(var.name):
                raise ValueError(
                    f"spec.worker.env[{index}].name must not start with {ENV_PREFIX} in any letter case: "
                    "the worker reads those names case-insensitively as its settings, which the operator "
                    "renders from the spec; set the matching spec field instead"
                )
        return self


class PublisherSpec(_Model):
    """``spec`` of an OutboxPublisher, after the API server's defaulting."""

    partitions: int = Field(ge=1, le=4096)
    replicas: int = Field(1, ge=0, le=4096)
    paused: bool = False
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    database: Database
    nats: Nats
    stream: Stream = Field(default_factory=Stream)
    subject_template: str = Field("outbox.{aggregate_type}.{event_type}", min_length=1, max_length=255)
    ordering: OrderingMode = OrderingMode.PER_AGGREGATE
    publishing: Publishing = Field(default_factory=Publishing)
    leases: Leases = Field(default_factory=Leases)
    report_interval_seconds: float = Field(10.0, ge=1, le=600)
    worker: WorkerOverrides = Field(default_factory=WorkerOverrides)

    @model_validator(mode="after")
    def _cross(self) -> PublisherSpec:
        if self.replicas > self.partitions:
            raise ValueError("spec.replicas must not exceed spec.partitions (a worker without a partition idles)")
        if self.autoscaling.enabled and self.autoscaling.max_replicas > self.partitions:
            raise ValueError("spec.autoscaling.maxReplicas must not exceed spec.partitions")
        problem = timing_violation(self.timing, _spec_path)  # the worker settings' rules (outbox_common.timing)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def timing(self) -> Timing:
        """The values the shared timing rules read, by worker setting name."""
        return Timing(
            lease_ttl_seconds=self.leases.ttl_seconds,
            lease_renew_seconds=self.leases.renew_seconds,
            ack_timeout_seconds=self.publishing.ack_timeout_seconds,
            retry_backoff_initial_seconds=self.publishing.retry.initial_backoff_seconds,
            retry_backoff_max_seconds=self.publishing.retry.max_backoff_seconds,
            stream_duplicate_window_seconds=self.stream.duplicate_window_seconds,
        )

    @property
    def duplicate_horizon_seconds(self) -> float:
        """The worker's formula (:func:`outbox_common.timing.duplicate_horizon_seconds`)."""
        return self.timing.horizon_seconds


def _spec_path(setting: str) -> str:
    """The spec field a worker setting comes from (``ack_timeout_seconds`` → ``spec.publishing.ackTimeoutSeconds``)."""
    return "spec." + SETTINGS_MAP[setting]


# --- spec -> worker settings ------------------------------------------------------------------------

# Where the NATS credential and TLS Secrets are mounted in the worker container.
NATS_CREDS_DIR = "/etc/outbox/nats-creds"
NATS_TLS_DIR = "/etc/outbox/nats-tls"

# Worker setting <- spec path (dotted, camelCase as in the CRD). Values are copied as they are.
SETTINGS_MAP: dict[str, str] = {
    "db_schema": "database.schema",
    "table": "database.table",
    "db_pool_size": "database.poolSize",
    "db_timeout_seconds": "database.statementTimeoutSeconds",
    "nats_user": "nats.user",
    "nats_ping_interval_seconds": "nats.pingIntervalSeconds",
    "nats_message_tracing": "nats.messageTracing",
    "stream": "stream.name",
    "stream_mode": "stream.mode",
    "stream_replicas": "stream.replicas",
    "stream_duplicate_window_seconds": "stream.duplicateWindowSeconds",
    "subject_template": "subjectTemplate",
    "batch_size": "publishing.batchSize",
    "max_batch_bytes": "publishing.maxBatchBytes",
    "loops": "publishing.loops",
    "max_in_flight": "publishing.maxInFlight",
    "ack_timeout_seconds": "publishing.ackTimeoutSeconds",
    "batch_timeout_seconds": "publishing.batchTimeoutSeconds",
    "poll_interval_seconds": "publishing.pollIntervalSeconds",
    "notify_coalesce_seconds": "publishing.notifyCoalesceSeconds",
    "retry_backoff_initial_seconds": "publishing.retry.initialBackoffSeconds",
    "retry_backoff_max_seconds": "publishing.retry.maxBackoffSeconds",
    "max_attempts": "publishing.retry.maxAttempts",
    "mark_mode": "publishing.markMode",
    "retention_seconds": "publishing.retentionSeconds",
    "ordering": "ordering",
    "lease_ttl_seconds": "leases.ttlSeconds",
    "lease_renew_seconds": "leases.renewSeconds",
    "report_interval_seconds": "reportIntervalSeconds",
    "shutdown_grace_seconds": "worker.shutdownGraceSeconds",
    "metrics_port": "worker.metricsPort",
    "log_format": "worker.logFormat",
    "log_level": "worker.logLevel",
}
# Worker settings derived from the spec by a rule rather than copied (see worker_settings()).
DERIVED_SETTINGS: dict[str, str] = {
    "publisher": "metadata.name (the relay's identity in the lease table)",
    "nats_servers": "nats.servers (joined with commas)",
    "nats_creds_file": "nats.credentialsSecretRef (mounted file)",
    "nats_tls_ca_file": "nats.tls.caKey (mounted file)",
    "nats_tls_cert_file": "nats.tls.certKey (mounted file)",
    "nats_tls_key_file": "nats.tls.keyKey (mounted file)",
}
# Secret settings: given to the pod by secretKeyRef only, never as values.
SECRET_SETTINGS: dict[str, str] = {
    "database_url": "database.secretRef",
    "nats_password": "nats.passwordSecretRef",
    "nats_token": "nats.tokenSecretRef",
}
# Settings filled from the pod itself (downward API).
POD_SETTINGS: dict[str, str] = {"worker_id": "metadata.name", "kube_namespace": "metadata.namespace"}
# Settings the operator leaves at the worker's default on purpose: the bind address, the start-up
# retry budget (in a cluster, a worker that gives up is restarted by the kubelet anyway), and the event
# loop (uvloop in the image; asyncio is for debugging a worker by hand).
DEFAULT_SETTINGS = frozenset({"metrics_host", "startup_timeout_seconds", "event_loop"})


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        value = value[part]
    return value


def spec_path_of_setting(field: str) -> str:
    """The spec path that sets a worker setting (for error messages)."""
    for table in (SETTINGS_MAP, DERIVED_SETTINGS, SECRET_SETTINGS):
        if field in table:
            path = table[field].split(" ")[0]
            return path if path.startswith("metadata.") else f"spec.{path}"
    return field


def _without_input(message: str, value: Any) -> str:
    """``message`` with the refused value cut out: a value that failed validation may be a secret
    pasted into the wrong field, so messages name the field path only."""
    if isinstance(value, str) and value and value in message:
        return message.replace(value, "<the given value>")
    return message


# The CRD's rule on metadata.name: child objects append "-relay-metrics" (14 characters) and must
# stay within the 63 characters of a DNS label.
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
NAME_MAX_LENGTH = 47


def validate_name(name: str) -> None:
    """Raise :class:`InvalidSpec` unless ``name`` passes the CRD's metadata.name rule."""
    if len(name) > NAME_MAX_LENGTH or not NAME_PATTERN.match(name):
        raise InvalidSpec(
            "metadata.name",
            "must start with a letter, contain only lower-case letters, digits and '-', and be at most "
            f"{NAME_MAX_LENGTH} characters (child objects append '-relay-metrics'); recreate the "
            "OutboxPublisher under such a name",
        )


# Tags pydantic appends to the location of an error in one branch of a union (a quantity is
# ``int | str``): not a field of the spec.
_UNION_BRANCHES = frozenset({"int", "str", "constrained-str"})


def _first_error(exc: ValidationError) -> Any:
    """The first error, at the path of the field itself. A quantity such as ``cpu: half`` fails
    both branches of ``int | str``; the first says "Input should be a valid integer" at
    ``...cpu.int``. The branch of the value's own type says what is wrong (the pattern), so that
    one is taken, and the branch tag is dropped from the path."""
    errors = exc.errors()
    err = errors[0]
    if err["loc"] and err["loc"][-1] in _UNION_BRANCHES:
        field = err["loc"][:-1]
        branches = [e for e in errors if e["loc"][:-1] == field and e["loc"][-1] in _UNION_BRANCHES]
        own = [e for e in branches if not str(e["type"]).endswith("_type")] or branches
        err = {**own[0], "loc": field}
        if {e["loc"][-1] for e in branches} == {"int", "constrained-str"}:  # Quantity, the one such union
            err["msg"] = "must be a Kubernetes quantity: an integer or a string such as 500m, 2 or 256Mi"
    return err


def parse_spec(spec: Mapping[str, Any] | None) -> PublisherSpec:
    """Validate a CR's spec; raise :class:`InvalidSpec` naming the first bad field and the fix."""
    if not spec:
        raise InvalidSpec("spec", "is missing: give at least partitions, database.secretRef and nats.servers")
    try:
        # strict, from JSON: the types the API server's schema enforces (no "3" for 3, no "yes" for
        # true); enums and numbers are read as JSON gives them, as the CRD does
        return PublisherSpec.model_validate_json(json.dumps(dict(spec)), strict=True)
    except ValidationError as exc:
        err = _first_error(exc)
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        path = "spec" + (f".{loc}" if loc else "")
        msg = _without_input(str(err["msg"]).removeprefix("Value error, "), err.get("input"))
        if msg.startswith("spec."):
            field, _, rest = msg.partition(" ")
            raise InvalidSpec(field, rest) from None
        raise InvalidSpec(path, msg) from None


def worker_settings(spec: PublisherSpec, name: str) -> dict[str, Any]:
    """Non-secret worker settings of a publisher named ``name``, keyed by WorkerSettings field."""
    data = spec.model_dump(by_alias=True, mode="json")
    values: dict[str, Any] = {field: _lookup(data, path) for field, path in SETTINGS_MAP.items()}
    values["publisher"] = name
    values["nats_servers"] = ",".join(spec.nats.servers)
    if spec.nats.credentials_secret_ref is not None:
        values["nats_creds_file"] = f"{NATS_CREDS_DIR}/{spec.nats.credentials_secret_ref.key}"
    if spec.nats.tls is not None:
        values["nats_tls_ca_file"] = f"{NATS_TLS_DIR}/{spec.nats.tls.ca_key}"
        if spec.nats.tls.cert_key:
            values["nats_tls_cert_file"] = f"{NATS_TLS_DIR}/{spec.nats.tls.cert_key}"
            values["nats_tls_key_file"] = f"{NATS_TLS_DIR}/{spec.nats.tls.key_key}"
    return values


# Rendered environments by (spec as JSON, publisher name): building the worker's settings class
# costs ~13 ms (it reads the environment and .env sources), and every pass renders each publisher's
# env twice; a spec only changes with its generation. Oldest entries go first beyond this many.
RENDER_CACHE_SIZE = 4096
_rendered: dict[tuple[str, str], dict[str, str] | InvalidSpec] = {}


def render_worker_env(spec: PublisherSpec, name: str) -> dict[str, str]:
    """``OUTBOX_*`` variables of the worker, validated by the worker's own settings class.

    A value the worker would refuse (say a subject template with an unknown placeholder) raises
    :class:`InvalidSpec` with the spec path, so the operator never starts pods that would crash.
    The same spec and name always give the same answer, so answers are kept (bounded, see above).
    """
    key = (spec.model_dump_json(), name)
    if key not in _rendered:
        if len(_rendered) >= RENDER_CACHE_SIZE:
            del _rendered[next(iter(_rendered))]
        try:
            _rendered[key] = _render_worker_env(spec, name)
        except InvalidSpec as exc:
            _rendered[key] = exc
    answer = _rendered[key]
    if isinstance(answer, InvalidSpec):
        raise InvalidSpec(answer.field, answer.message)
    return dict(answer)


def _render_worker_env(spec: PublisherSpec, name: str) -> dict[str, str]:
    try:
        return render_env(worker_settings(spec, name))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        field = spec_path_of_setting(loc) if loc in WorkerSettings.model_fields else "spec"
        msg = _without_input(str(err["msg"]).removeprefix("Value error, "), err.get("input"))
        raise InvalidSpec(field, msg) from None


def secret_refs(spec: PublisherSpec) -> list[tuple[str, str, str]]:
    """(spec path, Secret name, key) of every Secret the workers need."""
    refs: list[tuple[str, str, str]] = [
        ("spec.database.secretRef", spec.database.secret_ref.name, spec.database.secret_ref.key)
    ]
    n = spec.nats
    if n.password_secret_ref is not None:
        refs.append(("spec.nats.passwordSecretRef", n.password_secret_ref.name, n.password_secret_ref.key))
    if n.token_secret_ref is not None:
        refs.append(("spec.nats.tokenSecretRef", n.token_secret_ref.name, n.token_secret_ref.key))
    if n.credentials_secret_ref is not None:
        refs.append(("spec.nats.credentialsSecretRef", n.credentials_secret_ref.name, n.credentials_secret_ref.key))
    if n.tls is not None:
        for attr, key in (("caKey", n.tls.ca_key), ("certKey", n.tls.cert_key), ("keyKey", n.tls.key_key)):
            if key:
                refs.append((f"spec.nats.tls.{attr}", n.tls.secret_name, key))
    return refs
