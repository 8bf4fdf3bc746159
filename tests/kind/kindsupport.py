"""Support of the kind end-to-end suite (fixtures in conftest.py): the cluster handle and helpers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support import polling

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "outbox-relay:e2e"  # built from the repository's Dockerfile, loaded into the kind nodes
RELEASE = "outbox-operator"
OPERATOR_NS = "outbox-system"
APP_NS = "outbox-e2e"


def missing_prerequisite() -> str | None:
    """Why the suite cannot run here, or None."""
    for tool in ("docker", "kind"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH (the kind suite needs Docker and kind)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker daemon not reachable: {exc}"
    if info.returncode != 0:
        return f"docker daemon not reachable: {(info.stderr or info.stdout).strip()[:300]}"
    return None


def k8s_tools() -> dict[str, Path]:
    path = ROOT / "tools" / "fetch_k8s_tools.py"
    spec = importlib.util.spec_from_file_location("_tools_fetch_k8s_tools", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        return dict(module.ensure_tools())
    except module.ToolFetchError as exc:
        found = {tool: shutil.which(tool) for tool in ("helm", "kubectl")}
        if all(found.values()):
            return {tool: Path(str(p)) for tool, p in found.items()}
        pytest.skip(f"helm/kubectl unavailable: {exc}")


@dataclass
class Cluster:
    name: str
    kubeconfig: Path
    kubectl_bin: Path
    helm_bin: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, cmd: list[str], *, input: str | None = None, timeout: float = 300, check: bool = True) -> str:
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
            )
        return result.stdout

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 300, check: bool = True) -> str:
        return self.run([str(self.kubectl_bin), *args], input=input, timeout=timeout, check=check)

    def helm(self, *args: str, timeout: float = 600) -> str:
        return self.run([str(self.helm_bin), *args], timeout=timeout)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, manifest: str | Path) -> None:
        if isinstance(manifest, Path):
            self.kubectl("apply", "-f", str(manifest))
        else:
            self.kubectl("apply", "-f", "-", input=manifest)

    def psql(self, sql: str) -> str:
        """Run SQL in the PostgreSQL pod (local socket, trusted) and return its unaligned output."""
        return self.kubectl(
            "-n", APP_NS, "exec", "-i", "deploy/postgres", "--",
            "psql", "-v", "ON_ERROR_STOP=1", "-U", "outbox", "-d", "outbox", "-At", "-f", "-",
            input=sql,
        )  # fmt: skip

    def diagnostics(self) -> str:
        """What a failing assertion should show: objects, events and the operator's and workers' logs."""
        parts = []
        for cmd in (
            ["get", "nodes,all,outboxpublishers", "-A", "-o", "wide"],
            ["get", "events", "-A", "--sort-by=.lastTimestamp"],
            ["-n", OPERATOR_NS, "logs", f"deploy/{RELEASE}", "--tail=200"],
            ["-n", APP_NS, "logs", "-l", "app.kubernetes.io/component=worker", "--tail=100", "--prefix"],
            ["-n", APP_NS, "get", "outboxpublishers", "-o", "yaml"],
        ):
            result = subprocess.run(
                [str(self.kubectl_bin), *cmd], capture_output=True, text=True, timeout=60, env=self.env, check=False
            )
            parts.append(f"$ kubectl {' '.join(cmd)}\n{result.stdout}{result.stderr}")
        return "\n".join(parts)[-20000:]

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 180, interval: float = 2) -> Any:
        """Poll ``probe`` (:func:`support.polling.wait_for`) until it returns something truthy; fail with
        diagnostics on timeout."""
        try:
            return asyncio.run(polling.wait_for(probe, timeout, what, interval))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from exc


def image_manifest(path: Path, image: str) -> str:
    """A deploy/kind manifest with its container image replaced by the one under test."""
    text = path.read_text()
    return re.sub(r"(?m)^(\s+image: ).*$", rf"\g<1>{image}", text)


AGGREGATES = 20


def insert_events_sql(event_ids: list[str], start: int = 0) -> str:
    """One INSERT of the given events into public.outbox: aggregate ``order-<n % 20>``, event type
    ``created``, a small JSON payload. The event ids become the Nats-Msg-Id of each message."""
    rows = ",\n".join(
        f"('{uuid.UUID(eid)}'::uuid, 'order', 'order-{(start + i) % AGGREGATES}', 'created', "
        f"convert_to('{{\"n\": {start + i}}}', 'UTF8'))"
        for i, eid in enumerate(event_ids)
    )
    return f"INSERT INTO public.outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES\n{rows};\n"


@dataclass(frozen=True)
class StreamMessage:
    """One message of the stream as the relay stored it."""

    msg_id: str  # Nats-Msg-Id (the event id)
    subject: str
    aggregate_id: str  # Outbox-Aggregate-Id
    n: int  # the sequence number insert_events_sql put in the payload ({"n": ...}); -1 if none


async def stream_messages(url: str, stream: str, expected: int, wait_seconds: int = 60) -> list[StreamMessage]:
    """Every message of ``stream`` in stream order, after waiting up to ``wait_seconds`` for it to
    hold at least ``expected`` messages."""
    import nats

    nc = await nats.connect(url, connect_timeout=10, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        for _ in range(wait_seconds):
            if info.state.messages >= expected:
                break
            await asyncio.sleep(1)
            info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            headers = msg.headers or {}
            out.append(
                StreamMessage(
                    msg_id=headers.get("Nats-Msg-Id", ""),
                    subject=msg.subject,
                    aggregate_id=headers.get("Outbox-Aggregate-Id", ""),
                    n=payload_number(msg.data or b""),
                )
            )
        return out
    finally:
        await nc.close()


async def stream_contents(url: str, stream: str, expected: int, wait_seconds: int = 60) -> list[tuple[str, str]]:
    """(Nats-Msg-Id, subject) of every message of ``stream`` (see :func:`stream_messages`)."""
    return [(m.msg_id, m.subject) for m in await stream_messages(url, stream, expected, wait_seconds)]


def payload_number(payload: bytes) -> int:
    """The ``n`` of a payload written by :func:`insert_events_sql`; -1 for any other payload."""
    try:
        value = json.loads(payload)
    except ValueError:
        return -1
    return int(value["n"]) if isinstance(value, dict) and isinstance(value.get("n"), int) else -1


def order_violations(messages: list[StreamMessage]) -> list[str]:
    """Per-aggregate order: within each aggregate, the ``n`` of the stored messages must increase
    (insert_events_sql numbers events in insert order, which is ``id`` order). One line per message
    stored after a later event of its aggregate."""
    last: dict[str, StreamMessage] = {}
    problems = []
    for message in messages:
        before = last.get(message.aggregate_id)
        if before is not None and message.n <= before.n:
            problems.append(f"{message.aggregate_id}: event {message.n} stored after event {before.n}")
        else:
            last[message.aggregate_id] = message
    return problems


def publisher_manifest(
    name: str,
    *,
    secret: str = "outbox-database",
    partitions: int = 4,
    replicas: int = 1,
    subject_template: str = "outbox.{aggregate_type}.{event_type}",
    table: str = "outbox",
) -> dict[str, Any]:
    """An OutboxPublisher in the suite's namespace, like deploy/kind/outboxpublisher.yaml."""
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxPublisher",
        "metadata": {"name": name, "namespace": APP_NS},
        "spec": {
            "partitions": partitions,
            "replicas": replicas,
            "database": {"secretRef": {"name": secret, "key": "url"}, "table": table},
            "nats": {"servers": [f"nats://nats.{APP_NS}.svc:4222"]},
            "stream": {"name": "OUTBOX", "mode": "create"},
            "subjectTemplate": subject_template,
            "reportIntervalSeconds": 2,
            "worker": {"imagePullPolicy": "IfNotPresent", "logFormat": "text"},
        },
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    """A condition of an object's status by type ({} when absent)."""
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def owned_partitions(status: dict[str, Any]) -> list[int]:
    """Every partition the workers' reports claim, with repeats (a partition owned twice shows twice)."""
    return sorted(p for report in (status.get("workers") or {}).values() for p in report.get("partitions") or [])
