"""WorkerSettings: the one contract between operator and worker. Bad values fail at start-up with the
field name and how to fix it; secrets never leak; the environment rendering round-trips."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from outbox_common.settings import (
    SECRET_FIELDS,
    MarkMode,
    OrderingMode,
    StreamMode,
    WorkerSettings,
    describe_error,
    env_name,
    redact_url,
    render_env,
    validate_identifier,
    validate_subject_template,
)

DSN = "postgresql://relay:s3cr3t-pw@db:5432/app"


def make(**kw: object) -> WorkerSettings:
    return WorkerSettings(database_url=DSN, **kw)  # type: ignore[arg-type]


def errors_of(**kw: object) -> str:
    with pytest.raises(ValidationError) as info:
        make(**kw)
    return describe_error(info.value)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("OUTBOX_"):
            monkeypatch.delenv(key)


def test_defaults_are_valid_and_safe() -> None:
    s = make()
    assert s.db_schema == "public"
    assert s.table == "outbox"
    assert s.ordering is OrderingMode.PER_AGGREGATE
    assert s.mark_mode is MarkMode.DELETE
    assert s.stream_mode is StreamMode.EXPECT
    # a publish always resolves well before the lease can move
    assert s.ack_timeout_seconds * 2 <= s.lease_ttl_seconds
    assert s.renew_interval == pytest.approx(s.lease_ttl_seconds / 3)


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", DSN)
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "250")
    monkeypatch.setenv("OUTBOX_ORDERING", "none")
    monkeypatch.setenv("OUTBOX_NATS_SERVERS", " nats://a:4222 , nats://b:4222 ,")
    s = WorkerSettings()  # type: ignore[call-arg]
    assert s.batch_size == 250
    assert s.ordering is OrderingMode.NONE
    assert s.server_list == ["nats://a:4222", "nats://b:4222"]


def test_database_url_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings()  # type: ignore[call-arg]
    text = describe_error(info.value)
    assert "database_url" in text
    assert "OUTBOX_DATABASE_URL" in text


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("table", "Outbox", "not a valid identifier"),
        ("table", "outbox; DROP TABLE users", "not a valid identifier"),
        ("table", 'x"y', "not a valid identifier"),
        ("db_schema", "1abc", "not a valid identifier"),
        ("db_schema", "a" * 64, "not a valid identifier"),
        ("stream", "OUT.BOX", "stream="),
        ("publisher", "Orders_1", "DNS label"),
        # a trailing newline (a value written with `echo` into a Secret or a file) is no name: `$` of
        # Python's regular expressions matches before it
        ("table", "outbox\n", "not a valid identifier"),
        ("stream", "OUTBOX\n", "stream="),
        ("publisher", "orders\n", "DNS label"),
        ("nats_servers", "127.0.0.1:4222", "needs a scheme"),
        ("nats_servers", " , ", "empty"),
        ("subject_template", "outbox.{nope}", "unknown"),
        ("subject_template", "outbox..{event_type}", "invalid"),
        ("subject_template", "outbox.*.{event_type}", "invalid"),
        ("subject_template", "outbox.x{event_type}", "invalid"),
        ("batch_size", 0, "greater than or equal to 1"),
        ("log_format", "yaml", "log_format"),
    ],
)
def test_bad_value_names_the_field_and_the_fix(field: str, value: object, needle: str) -> None:
    text = errors_of(**{field: value})
    assert text.startswith(f"{field}:"), text
    assert needle in text
    assert f"OUTBOX_{field.upper()}" in text  # how to fix it
    assert f"--{field.replace('_', '-')}" in text


def test_database_url_error_never_shows_the_secret() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(database_url="mysql://relay:s3cr3t-pw@db/app")  # type: ignore[arg-type]
    text = describe_error(info.value)
    assert "database_url" in text
    assert "s3cr3t-pw" not in text
    assert "s3cr3t-pw" not in str(info.value)


@pytest.mark.parametrize("servers", ["alice:s3cr3t-pw@nats:4222", "nats://ok:4222,http://alice:s3cr3t-pw@nats:4222"])
def test_a_nats_url_error_never_shows_its_credentials(servers: str) -> None:
    text = errors_of(nats_servers=servers)
    assert "needs a scheme" in text
    assert "s3cr3t-pw" not in text
    assert "nats://http://" not in text  # no suggestion that stacks a second scheme


# (servers, what the message says): lists the NATS client refuses at connect, which the worker took
# as a defect (exit 1, a crash loop), and port 0, which it cannot connect to
BAD_SERVER_LISTS = [
    ("nats://nats:99999", "port that is not a number of 1-65535"),
    ("nats://nats:42x2", "port that is not a number of 1-65535"),
    ("nats://:4222", "has no host"),
    ("wss://:443", "has no host"),
    ("nats://[::1:4222", "is no valid URL"),
    ("nats://none:4222", "names the host 'none'"),
    ("nats://nats:0", "has port 0"),
    ("nats://a:4222,ws://b:8080", "mixes websocket"),
    ("wss://a,tls://b:4222", "mixes websocket"),
]


@pytest.mark.parametrize(("servers", "needle"), BAD_SERVER_LISTS)
def test_a_server_list_the_nats_client_cannot_connect_with_is_refused_by_name(servers: str, needle: str) -> None:
    text = errors_of(nats_servers=servers)
    assert text.startswith("nats_servers: "), text
    assert needle in text
    assert "OUTBOX_NATS_SERVERS" in text


@pytest.mark.parametrize(
    "servers",
    [
        "nats://nats:4222",
        "nats://nats",
        "nats://nats:",
        "tls://nats.nats.svc:4222/",
        "nats://[::1]:4222,nats://10.0.0.1:4222",
        "nats://alice:pw@nats:4222,tls://token@other",
        "ws://nats",
        "ws://nats:8080,wss://nats:8443/path",
        *(servers for servers, _ in BAD_SERVER_LISTS),
    ],
)
def test_settings_accept_exactly_the_server_lists_the_nats_client_accepts(servers: str) -> None:
    """Parity with nats-py's own parsing (its server pool, built before any connect), but port 0,
    which nats-py takes and no connect can use."""
    from nats.aio.client import Client
    from nats.errors import Error as NatsError

    try:
        Client()._setup_server_pool(servers.split(","))
        client_accepts = not servers.endswith(":0")
    except NatsError:
        client_accepts = False
    try:
        make(nats_servers=servers)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == client_accepts


def test_a_bad_port_after_a_password_never_shows_the_password() -> None:
    text = errors_of(nats_servers="nats://alice:s3cr3t/pw@nats:4222")  # an unencoded '/': read as the port
    assert "s3cr3t" not in text
    assert "nats://<redacted>@nats:4222" in text
    assert "percent-encode" in text


def test_redact_url() -> None:
    assert redact_url("nats://alice:pw@nats:4222") == "nats://<redacted>@nats:4222"
    assert redact_url("tls://token@nats:4222") == "tls://<redacted>@nats:4222"
    assert redact_url("alice:pw@nats:4222") == "<redacted>@nats:4222"
    assert redact_url("nats://nats:4222") == "nats://nats:4222"
    assert redact_url("nats://alice:p@ss@nats:4222") == "nats://<redacted>@nats:4222"  # an unencoded @
    assert redact_url("nats://nats:4222/x@y") == "nats://nats:4222/x@y"  # past the authority


def test_secrets_are_masked_in_repr() -> None:
    s = make(nats_password=SecretStr("pw-123"), nats_token=SecretStr("tok-456"))
    shown = repr(s) + str(s) + str(s.model_dump())
    for secret in ("s3cr3t-pw", "pw-123", "tok-456"):
        assert secret not in shown
    assert {"database_url", "nats_password", "nats_token"} <= SECRET_FIELDS


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"retry_backoff_initial_seconds": 10, "retry_backoff_max_seconds": 5}, "retry_backoff_initial_seconds"),
        ({"lease_ttl_seconds": 6, "lease_renew_seconds": 4, "ack_timeout_seconds": 1}, "lease_renew_seconds"),
        ({"lease_ttl_seconds": 3, "ack_timeout_seconds": 2}, "ack_timeout_seconds"),
    ],
)
def test_cross_field_rules(kw: dict[str, float], needle: str) -> None:
    assert needle in errors_of(**kw)


def test_renew_interval_and_in_flight_split() -> None:
    s = make(lease_ttl_seconds=3, lease_renew_seconds=1, ack_timeout_seconds=1, max_in_flight=10, loops=3)
    assert s.renew_interval == 1
    assert s.per_loop_in_flight == 3
    assert s.per_loop_in_flight * s.loops <= s.max_in_flight
    assert make(max_in_flight=1, loops=4).per_loop_in_flight == 1


def test_duplicate_horizon_covers_ttl_ack_and_backoff() -> None:
    s = make(lease_ttl_seconds=10, ack_timeout_seconds=2, retry_backoff_max_seconds=7)
    assert s.duplicate_horizon_seconds == pytest.approx(19)


def test_settings_are_frozen() -> None:
    s = make()
    with pytest.raises(ValidationError):
        s.batch_size = 5  # type: ignore[misc]


def test_env_name() -> None:
    assert env_name("batch_size") == "OUTBOX_BATCH_SIZE"
    with pytest.raises(KeyError):
        env_name("no_such_setting")


def test_render_env_round_trips_through_the_worker_class(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "publisher": "orders",
        "batch_size": 500,
        "ordering": OrderingMode.NONE,
        "lease_ttl_seconds": 10.5,
        "subject_template": "ev.{tenant}.{aggregate_type}",
    }
    env = render_env(values)
    assert env == {
        "OUTBOX_BATCH_SIZE": "500",
        "OUTBOX_LEASE_TTL_SECONDS": "10.5",
        "OUTBOX_ORDERING": "none",
        "OUTBOX_PUBLISHER": "orders",
        "OUTBOX_SUBJECT_TEMPLATE": "ev.{tenant}.{aggregate_type}",
    }
    for k, v in {**env, "OUTBOX_DATABASE_URL": DSN}.items():
        monkeypatch.setenv(k, v)
    s = WorkerSettings()  # type: ignore[call-arg]
    assert (s.publisher, s.batch_size, s.ordering, s.lease_ttl_seconds) == ("orders", 500, OrderingMode.NONE, 10.5)


def test_render_env_refuses_secrets_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError, match="Secret reference"):
        render_env({"nats_password": "x"})
    with pytest.raises(ValueError, match="unknown worker settings"):
        render_env({"batchsize": 1})
    with pytest.raises(ValidationError, match="table"):
        render_env({"table": "bad-name"})


def test_validators_usable_alone() -> None:
    assert validate_identifier("outbox_2", "table") == "outbox_2"
    with pytest.raises(ValueError, match="table='o\"b'"):
        validate_identifier('o"b', "table")
    assert validate_subject_template("a.{aggregate_id}.b") == "a.{aggregate_id}.b"
    with pytest.raises(ValueError, match="empty"):
        validate_subject_template("")


def test_an_unknown_outbox_variable_is_warned_about_with_the_closest_valid_name() -> None:
    """A misspelt setting (``OUTBOX_BATCHSIZE``) was silently ignored: the worker ran with the
    default. Now the start-up warns, naming the variable meant, and never echoes a value."""
    from outbox_common.settings import unknown_env_warnings

    env = {
        "OUTBOX_BATCHSIZE": "500",
        "OUTBOX_DATABASE_URL": "postgresql://u:hunter2@h/db",
        "OUTBOX_NATS_SERVER": "nats://x:4222",
        "OUTBOX_ZZZ": "secret-value",
        "HOME": "/root",
    }
    warnings = unknown_env_warnings(env)
    assert len(warnings) == 3
    assert "OUTBOX_BATCHSIZE" in warnings[0]
    assert "did you mean OUTBOX_BATCH_SIZE?" in warnings[0]
    assert "OUTBOX_NATS_SERVER" in warnings[1]
    assert "did you mean OUTBOX_NATS_SERVERS?" in warnings[1]
    assert "OUTBOX_ZZZ" in warnings[2]
    assert "did you mean" not in warnings[2]
    assert not any("secret-value" in w or "500" in w for w in warnings)
    assert unknown_env_warnings({env_name(f): "x" for f in WorkerSettings.model_fields}) == []


def test_the_operators_rendered_environment_never_warns() -> None:
    """Every OUTBOX_* variable the operator renders into a worker pod (the golden Deployments) is a
    worker setting, so a worker the operator runs starts without a warning."""
    from pathlib import Path

    import yaml

    from outbox_common.settings import unknown_env_warnings

    rendered: dict[str, str] = {}
    for path in (Path(__file__).parents[1] / "golden").glob("*-children.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    rendered |= {e["name"]: "x" for e in container.get("env", []) if e["name"].startswith("OUTBOX_")}
    assert len(rendered) > 20
    assert unknown_env_warnings(rendered) == []


def test_a_table_name_too_long_for_its_derived_tables_is_refused_by_name() -> None:
    """The worker, migrate (Sql.for_table), the operator's spec and the CRD share one limit: a name
    the CRD accepts never crash-loops the workers."""
    make(db_schema="s", table="t" * 50)
    text = errors_of(db_schema="s", table="t" * 51)
    assert text.startswith("table: ")
    assert "at most 50" in text
    assert "OUTBOX_TABLE" in text


@pytest.mark.parametrize(("schema", "table"), [("public", "t" * 50), ("s" * 30, "t" * 33)])
def test_schema_and_table_too_long_for_the_notify_channels_are_refused_naming_both(schema: str, table: str) -> None:
    """'<schema>.<table>_leases' must fit PostgreSQL's 63-byte channel names, or every lease
    announcement (and beyond 62, every INSERT into the outbox, through the trigger) fails."""
    make(db_schema=schema[: 55 - len(table)], table=table)
    text = errors_of(db_schema=schema, table=table)
    assert "table and db_schema are" in text
    assert "at most 55" in text
    assert "OUTBOX_DB_SCHEMA" in text
    assert "OUTBOX_TABLE" in text


def test_a_setting_spelt_in_another_letter_case_is_read_and_not_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads OUTBOX_batch_size as batch_size; a warning that it "is ignored" would
    be false. A misspelt name in lower case (outbox_batchsize) is ignored, so it is warned about."""
    from outbox_common.settings import unknown_env_warnings

    monkeypatch.setenv("OUTBOX_batch_size", "7")
    assert make().batch_size == 7
    assert unknown_env_warnings({"OUTBOX_batch_size": "7"}) == []
    (warning,) = unknown_env_warnings({"outbox_batchsize": "7"})
    assert "did you mean OUTBOX_BATCH_SIZE?" in warning


def test_a_cross_field_error_names_the_variables_to_fix() -> None:
    text = errors_of(ack_timeout_seconds=10)
    assert "Value error" not in text
    assert "OUTBOX_ACK_TIMEOUT_SECONDS" in text
    assert "OUTBOX_LEASE_TTL_SECONDS" in text
