"""What the chart can render for a user is what the CRD and the operator accept.

The example OutboxPublisher is templated and admitted like the API server would (schema and CEL
rules, tests/operator/crd_schema.py) and parsed by the operator's own model; values the operator
or the CRD would refuse fail at ``helm install`` already (values.schema.json or the template)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import chartchecks as cc
import pytest
import yaml
from chartchecks import Render

sys.path.insert(0, str(cc.ROOT / "tests" / "operator"))
import crd_schema

CRD_SCHEMA = crd_schema.schema_of(crd_schema.load_crd(cc.CHART / "crds" / "outboxpublisher.yaml"))

EXAMPLE_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {"example": {"enabled": True}},
    "all-fields": {
        "example": {
            "enabled": True,
            "name": "orders",
            "partitions": 8,
            "replicas": 8,
            "databaseSecret": {"name": "orders.db-v2", "key": "dsn.url"},
            "natsServers": ["nats://a:4222", "tls://b:4222"],
            "stream": "ORDERS",
            "streamMode": "create",
            "subjectTemplate": "shop.{tenant}.{aggregate_type}.{event_type}",
        }
    },
}


def assert_admitted_and_accepted(doc: dict[str, Any]) -> None:
    """The API server would store it (schema + CEL) and the operator would run it."""
    from outbox_operator.children import OperatorConfig, Owner, build_deployment
    from outbox_operator.spec import parse_spec

    stored, errors = crd_schema.admit(CRD_SCHEMA, doc)
    assert errors == []
    meta = stored["metadata"]
    build_deployment(Owner(meta["name"], meta["namespace"], "uid"), parse_spec(stored["spec"]), 1, OperatorConfig())


@pytest.mark.parametrize("case", sorted(EXAMPLE_VALUES))
def test_the_example_the_chart_renders_is_admitted_and_runs(render: Render, tmp_path: Path, case: str) -> None:
    values = tmp_path / f"{case}.yaml"
    values.write_text(yaml.safe_dump(EXAMPLE_VALUES[case]))
    docs = [d for d in cc.load_docs(render([values])) if d["kind"] == "OutboxPublisher"]
    assert len(docs) == 1
    assert_admitted_and_accepted(docs[0])


def test_example_strings_that_look_like_other_yaml_values_stay_strings(helm: Path, tmp_path: Path) -> None:
    """Names the values' schema accepts but YAML would read as a number, a boolean or null once
    rendered unquoted (`--set-string example.stream=123`, `--set example.stream=NO`)."""
    example = {
        "enabled": True,
        "name": "no",
        "databaseSecret": {"name": "123", "key": "null"},
        "stream": "NO",
    }
    values = tmp_path / "lookalikes.yaml"
    values.write_text(yaml.safe_dump({"example": example}))
    rendered = cc.helm_template(helm, cc.CHART, [values], release="123", namespace="123")
    (doc,) = [d for d in cc.load_docs(rendered) if d["kind"] == "OutboxPublisher"]
    assert doc["metadata"]["name"] == "no"
    assert doc["metadata"]["namespace"] == "123"
    assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "123"
    assert doc["spec"]["database"]["secretRef"] == {"name": "123", "key": "null"}
    assert doc["spec"]["stream"]["name"] == "NO"
    assert_admitted_and_accepted(doc)


@pytest.mark.parametrize(
    "args",
    [
        ["--log-level=DEBUG"],
        ["--resync-seconds=2.5"],
        ["--resync-seconds=1"],
        ["--resync-seconds=30", "--log-level=ERROR"],
        ["--startup-timeout-seconds=0"],
        ["--startup-timeout-seconds=3600", "--resync-seconds=10"],
    ],
)
def test_extra_args_the_schema_accepts_are_ones_the_operator_runs_with(
    render: Render, tmp_path: Path, args: list[str]
) -> None:
    from outbox_cli import cmd_operator

    values = tmp_path / "args.yaml"
    values.write_text(yaml.safe_dump({"operator": {"extraArgs": args}}))
    deployment = next(d for d in cc.load_docs(render([values])) if d["kind"] == "Deployment")
    parser = argparse.ArgumentParser(exit_on_error=False)
    cmd_operator.add_arguments(parser)
    parsed = vars(parser.parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"][1:]))
    for arg in args:  # each flag given reached the operator with its value
        flag, _, value = arg.partition("=")
        got = parsed[flag.removeprefix("--").replace("-", "_")]
        assert got == (value if flag == "--log-level" else float(value)), arg


@pytest.mark.parametrize(
    "arg",
    [
        "--resync-seconds=0",
        "--resync-seconds=-1",
        "--resync-seconds=0.5",
        "--resync-seconds",
        "--startup-timeout-seconds=3601",
        "--startup-timeout-seconds=-1",
        "--startup-timeout-seconds=1e3",
        "--verbose",
        "--log-level=TRACE",
    ],
)
def test_extra_args_the_operator_refuses_fail_at_install(helm: Path, tmp_path: Path, arg: str) -> None:
    values = tmp_path / "args.yaml"
    values.write_text(yaml.safe_dump({"operator": {"extraArgs": [arg]}}))
    with pytest.raises(subprocess.CalledProcessError) as caught:
        cc.helm_template(helm, cc.CHART, [values])
    assert "/operator/extraArgs/0" in caught.value.stderr


def notes(helm: Path, tmp_path: Path, values: dict[str, Any]) -> str:
    file = tmp_path / "notes-values.yaml"
    file.write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [str(helm), "install", "outbox", str(cc.CHART), "--dry-run=client", "-n", "outbox-system", "-f", str(file)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "none")},
    )
    return result.stdout.split("NOTES:", 1)[1]


def assert_no_secret_on_a_command_line(text: str) -> None:
    """No DSN with a password, and no OUTBOX_DATABASE_URL value, on any command shown to the user."""
    assert not re.search(r"postgres(ql)?://[^\s'\"]*:[^\s'\"]*@", text), text
    assert "--env=OUTBOX_DATABASE_URL" not in text
    assert "--from-literal=url=" not in text


def test_notes_keep_secrets_by_reference(helm: Path, tmp_path: Path) -> None:
    text = notes(helm, tmp_path, {"example": {"enabled": True}})
    assert_no_secret_on_a_command_line(text)
    overrides = re.search(r"--overrides='(\{.*\})'", text)
    assert overrides, text
    pod = yaml.safe_load(overrides.group(1))
    env = pod["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "OUTBOX_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "outbox-database", "key": "url"}}}
    ]
    assert pod["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True


def test_notes_prepare_what_the_example_references(helm: Path, tmp_path: Path) -> None:
    """With the example on, the steps create its Secret and key and migrate its partition count:
    following them must leave the example neither SecretNotFound nor migrated with another count."""
    example = {"enabled": True, "partitions": 8, "databaseSecret": {"name": "orders-db", "key": "dsn"}}
    text = notes(helm, tmp_path, {"example": example})
    assert "create secret generic orders-db --from-file=dsn=/dev/stdin" in text
    overrides = re.search(r"--overrides='(\{.*\})'", text)
    assert overrides, text
    container = yaml.safe_load(overrides.group(1))["spec"]["containers"][0]
    assert container["args"] == ["migrate", "--partitions", "8"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "orders-db", "key": "dsn"}


def test_every_crd_upgrade_command_forces_conflicts(helm: Path, tmp_path: Path) -> None:
    texts = {
        "README.md": (cc.ROOT / "README.md").read_text(),
        "chart README.md": (cc.CHART / "README.md").read_text(),
        "NOTES.txt": notes(helm, tmp_path, {}),
    }
    for name, text in texts.items():
        commands = [line for line in text.splitlines() if "helm show crds" in line and "kubectl apply" in line]
        assert commands, name
        for line in commands:
            assert "--server-side --force-conflicts" in line, (name, line)


def test_example_with_more_workers_than_partitions_fails_at_install(helm: Path, tmp_path: Path) -> None:
    """The CRD's cross-field rule (replicas <= partitions) cannot be said in values.schema.json; the
    template refuses it (`helm lint` skips `fail`, `helm install` and `helm template` do not)."""
    values = tmp_path / "example.yaml"
    values.write_text(yaml.safe_dump({"example": {"enabled": True, "partitions": 2, "replicas": 3}}))
    with pytest.raises(subprocess.CalledProcessError) as caught:
        cc.helm_template(helm, cc.CHART, [values])
    assert "example.replicas must not exceed example.partitions" in caught.value.stderr


# example.<value> -> the CRD field it is rendered into (path of property names in openAPIV3Schema)
EXAMPLE_FIELDS = {
    "name": ("metadata", "name"),
    "partitions": ("spec", "partitions"),
    "replicas": ("spec", "replicas"),
    "databaseSecret.name": ("spec", "database", "secretRef", "name"),
    "databaseSecret.key": ("spec", "database", "secretRef", "key"),
    "natsServers": ("spec", "nats", "servers"),
    "stream": ("spec", "stream", "name"),
    "streamMode": ("spec", "stream", "mode"),
    "subjectTemplate": ("spec", "subjectTemplate"),
}
CONSTRAINTS = ("pattern", "maxLength", "minLength", "minimum", "maximum", "enum", "minItems", "maxItems")


def _crd_field(path: tuple[str, ...]) -> dict[str, Any]:
    node = CRD_SCHEMA
    for name in path:
        node = node["properties"][name]
    return node


def _values_field(key: str) -> dict[str, Any]:
    node = json.loads((cc.CHART / "values.schema.json").read_text())["properties"]["example"]
    for name in key.split("."):
        node = node["properties"][name]
    return dict(node)


@pytest.mark.parametrize("key", sorted(EXAMPLE_FIELDS))
def test_example_values_are_at_least_as_strict_as_the_crd(key: str) -> None:
    """Every bound, pattern and enum of the CRD field is in values.schema.json too (the values
    may be stricter: the subject template's placeholders are checked there, not in the CRD)."""
    crd, values = _crd_field(EXAMPLE_FIELDS[key]), _values_field(key)
    for node_crd, node_values in [(crd, values), (crd.get("items") or {}, values.get("items") or {})]:
        for constraint in CONSTRAINTS:
            if constraint in node_crd:
                assert node_values.get(constraint) == node_crd[constraint], (key, constraint)
