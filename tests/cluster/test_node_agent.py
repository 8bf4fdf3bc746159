"""The process kubelet itself, on a bare Pod: what the other cluster tests rely on it to do.

A Pod created directly (no operator) must be bound to the node, run with its env resolved like a
kubelet, authenticate as its own ServiceAccount through $KUBECONFIG, pass its readiness probe on
its remapped port, report Running/Ready, be restarted when its liveness probe keeps failing, and
on deletion get SIGTERM and be removed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from controlplane import ControlPlane
from kubeapi import KubeApi
from node_agent import NodeAgent

from support.polling import wait_for

pytestmark = pytest.mark.timeout(180)

# Writes its environment and its identity (a SelfSubjectReview through $KUBECONFIG) to a file,
# serves /ready on $PORT, and on SIGTERM records it and exits 0.
PROGRAM = r"""
import json, os, signal, sys, http.server, threading
from kubernetes import client, config
config.load_kube_config(os.environ["KUBECONFIG"])
body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
review = client.AuthenticationV1Api().create_self_subject_review(body)
out = sys.argv[1]
with open(out, "w") as fh:
    json.dump({"env": dict(os.environ), "user": review.status.user_info.username, "argv": sys.argv[2:]}, fh)
def stop(*_):
    with open(out + ".term", "w") as fh:
        fh.write("SIGTERM")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Ready).serve_forever()
"""


@pytest.fixture
async def node(api: KubeApi, control_plane: ControlPlane, namespace: str, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    async with NodeAgent(api, control_plane.ca_file, tmp_path / "pods", {namespace}) as agent:
        yield agent


def bare_pod(out: Path) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "labels": {"app": "probe"}},
        "spec": {
            "serviceAccountName": "runner",
            "terminationGracePeriodSeconds": 10,
            "containers": [
                {
                    "name": "main",
                    "image": "ignored:latest",
                    "command": [sys.executable, "-c", PROGRAM],
                    "args": [str(out), "--listen=:7070", "$(GREETING)-expanded"],
                    "ports": [{"name": "http", "containerPort": 7070}],
                    "env": [
                        {"name": "PORT", "value": "7070"},
                        {"name": "GREETING", "value": "hello"},
                        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                        {"name": "FROM_CONFIG", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
                }
            ],
        },
    }


async def create_what_the_pod_references(api: KubeApi, namespace: str) -> None:
    """The ServiceAccount, Secret and ConfigMap :func:`bare_pod` refers to."""
    await api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}, namespace)
    secret = {"password": base64.b64encode(b"s3cret").decode()}
    await api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "data": secret}, namespace)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "fast"}}
    await api.create(config_map, namespace)


async def test_a_bare_pod_runs_like_a_kubelet_would_run_it(
    api: KubeApi, node: NodeAgent, namespace: str, tmp_path: Path
) -> None:
    await create_what_the_pod_references(api, namespace)
    out = tmp_path / "seen.json"
    await api.create(bare_pod(out), namespace)

    async def running_and_ready() -> dict[str, Any] | None:
        pod = await api.get("Pod", namespace, "probe") or {}
        status = pod.get("status") or {}
        ready = {c["type"]: c["status"] for c in status.get("conditions") or []}.get("Ready")
        return pod if status.get("phase") == "Running" and ready == "True" else None

    pod = await wait_for(running_and_ready, 60)
    assert pod["spec"]["nodeName"] == node.name
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    seen = json.loads(out.read_text())
    env = seen["env"]
    assert (env["FROM_SECRET"], env["FROM_CONFIG"], env["POD_NAME"], env["APP"]) == ("s3cret", "fast", "probe", "probe")
    host_port = int(env["PORT"])
    assert host_port != 7070, "the containerPort is remapped to a free loopback port"
    assert seen["argv"] == [f"--listen=:{host_port}", "hello-expanded"]
    assert seen["user"] == f"system:serviceaccount:{namespace}:runner"

    await api.delete("Pod", namespace, "probe")
    await wait_for(lambda: _gone(api, namespace), 30)
    assert Path(f"{out}.term").read_text() == "SIGTERM"
    assert node.exit_codes["probe"] == 0


async def test_a_failing_liveness_probe_restarts_the_container_after_its_threshold(
    api: KubeApi, node: NodeAgent, namespace: str, tmp_path: Path
) -> None:
    """/alive answers 404: after ``failureThreshold`` (2) probes ``periodSeconds`` (1 s) apart, the
    process gets SIGTERM and is started again, its restartCount 1."""
    await create_what_the_pod_references(api, namespace)
    out = tmp_path / "seen.json"
    pod = bare_pod(out)
    pod["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/alive", "port": "http"},
        "initialDelaySeconds": 1,
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    await api.create(pod, namespace)
    await wait_for(lambda: node.running("probe"), 30)
    first = node.running("probe")[0].proc.pid

    async def restarted() -> bool:
        status = ((await api.get("Pod", namespace, "probe")) or {}).get("status") or {}
        counts = [c.get("restartCount") for c in status.get("containerStatuses") or []]
        return counts == [1] and any(p.proc.pid != first for p in node.running("probe"))

    await wait_for(restarted, 30, what="restarted once by its liveness probe")
    assert node.liveness_kills[:1] == ["probe"]  # the new process fails too: more kills follow, seconds later
    assert Path(f"{out}.term").read_text() == "SIGTERM"  # stopped as on deletion: SIGTERM first
    assert node.exit_codes["probe"] == 0


async def test_a_missing_secret_key_keeps_the_pod_waiting(
    api: KubeApi, node: NodeAgent, namespace: str, tmp_path: Path
) -> None:
    await api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}, namespace)
    await api.create(bare_pod(tmp_path / "never.json"), namespace)

    async def waiting() -> dict[str, Any] | None:
        pod = await api.get("Pod", namespace, "probe") or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting")

    state = await wait_for(waiting, 30)
    assert state["reason"] == "CreateContainerConfigError"
    assert "creds" in state["message"]
    assert not node.running()


async def _gone(api: KubeApi, namespace: str) -> bool:
    return await api.get("Pod", namespace, "probe") is None


async def test_a_pod_that_ignores_sigterm_is_killed_after_its_grace_period(
    api: KubeApi, node: NodeAgent, namespace: str
) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stubborn"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": "ignored", "command": [sys.executable, "-c", stubborn]}],
        },
    }
    await api.create(pod, namespace)
    await wait_for(lambda: node.running("stubborn"), 30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await api.delete("Pod", namespace, "stubborn")

    async def gone() -> bool:
        return await api.get("Pod", namespace, "stubborn") is None

    await wait_for(gone, 30)
    assert node.exit_codes["stubborn"] == -signal.SIGKILL
    assert loop.time() - started >= 2, "SIGKILL only after the grace period"
