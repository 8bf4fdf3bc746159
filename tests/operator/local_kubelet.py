"""A test kubelet + deployment controller: runs each pod of a Deployment as a local process.

For the ``e2e_local`` suite. It watches the Deployments of one namespace in the API emulator and,
for each, keeps ``spec.replicas`` pods of the current pod template:

* a pod is a Pod object in the emulator (labels of the template, ownerReference to the Deployment)
  plus a local process started from the container's ``command`` + ``args`` and ``env`` (values,
  ``fieldRef`` to the pod's name/namespace, ``secretKeyRef`` read from the emulator); the image is
  ignored;
* each pod has its own network namespace in a cluster; here all share the loopback, so the
  container's metrics port is remapped to a free port per pod (``OUTBOX_METRICS_PORT``);
* readiness is the container's readinessProbe (HTTP GET on the remapped port); the Deployment's
  status (replicas, readyReplicas, ...) is written from it, as the deployment controller would;
* scale-down and a changed template stop pods with SIGTERM, then SIGKILL after the pod's
  ``terminationGracePeriodSeconds``, and delete their Pod objects; exit codes are recorded;
* a process that exits by itself is restarted (restartPolicy Always), and counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kube_emulator import KubeEmulator

TEMPLATE_HASH = "outbox.dev/pod-template-hash"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPod:
    name: str
    deployment: str
    template_hash: str
    proc: asyncio.subprocess.Process
    port: int
    grace: float
    probe_path: str
    ready: bool = False
    stopping: bool = False


@dataclass
class LocalKubelet:
    emulator: KubeEmulator
    namespace: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    pods: dict[str, LocalPod] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    restarts: int = 0
    _task: asyncio.Task[None] | None = None
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LocalKubelet:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await asyncio.gather(*(self._stop(p) for p in list(self.pods.values())))
        if self._session is not None:
            await self._session.close()

    def running(self, deployment: str | None = None) -> list[LocalPod]:
        return [p for p in self.pods.values() if deployment in (None, p.deployment) and not p.stopping]

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the kubelet alive; the test will time out with the cause
                print(f"local kubelet: {type(exc).__name__}: {exc}", file=sys.stderr)
            await asyncio.sleep(0.25)

    async def sync(self) -> None:
        deployments = {d["metadata"]["name"]: d for d in self.emulator.list("apps/v1", "Deployment", self.namespace)}
        # pods of deleted deployments
        for pod in list(self.pods.values()):
            if pod.deployment not in deployments and not pod.stopping:
                await self._stop(pod)
        for name, dep in deployments.items():
            template = dep["spec"]["template"]
            current_hash = (template["metadata"].get("annotations") or {}).get(TEMPLATE_HASH, "")
            for pod in self.running(name):
                if pod.template_hash != current_hash:
                    await self._stop(pod)
                elif pod.proc.returncode is not None:  # crashed: restart like restartPolicy Always
                    self.exit_codes[pod.name] = pod.proc.returncode
                    self.restarts += 1
                    await self._stop(pod)
            pods = self.running(name)
            want = int(dep["spec"].get("replicas", 1))
            for pod in sorted(pods, key=lambda p: p.name)[want:]:
                await self._stop(pod)
            for _ in range(want - len(pods)):
                await self._start(dep)
            await self._probe(name)
            ready = sum(1 for p in self.running(name) if p.ready)
            status = {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": len(self.running(name)),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": len(self.running(name)),
            }
            if dep.get("status") != status:
                await self.emulator.patch("apps/v1", "Deployment", self.namespace, name, {"status": status}, "status")

    def _env(self, container: dict[str, Any], pod_name: str, port: int) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            **self.extra_env,
        }
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                field_path = source["fieldRef"]["fieldPath"]
                env[var["name"]] = {"metadata.name": pod_name, "metadata.namespace": self.namespace}[field_path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.emulator.get("v1", "Secret", self.namespace, ref["name"])
                if secret is None:
                    raise RuntimeError(f"pod {pod_name}: Secret {ref['name']} not found (CreateContainerConfigError)")
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        env["OUTBOX_METRICS_PORT"] = str(port)
        env["OUTBOX_METRICS_HOST"] = "127.0.0.1"
        return env

    async def _start(self, dep: dict[str, Any]) -> None:
        template = dep["spec"]["template"]
        container = template["spec"]["containers"][0]
        name = f"{dep['metadata']['name']}-{secrets.token_hex(3)}"
        port = free_port()
        await self.emulator.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "name": dep["metadata"]["name"],
                            "uid": dep["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": template["spec"],
            }
        )
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=self._env(container, name, port),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.close()
        probe = (container.get("readinessProbe") or {}).get("httpGet", {}).get("path", "/readyz")
        grace = float(template["spec"].get("terminationGracePeriodSeconds", 30))
        hash_ = (template["metadata"].get("annotations") or {}).get(TEMPLATE_HASH, "")
        self.pods[name] = LocalPod(name, dep["metadata"]["name"], hash_, proc, port, grace, probe)

    async def _probe(self, deployment: str) -> None:
        assert self._session is not None
        for pod in self.running(deployment):
            try:
                async with self._session.get(f"http://127.0.0.1:{pod.port}{pod.probe_path}") as response:
                    pod.ready = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                pod.ready = False

    async def _stop(self, pod: LocalPod) -> None:
        pod.stopping = True
        if pod.proc.returncode is None:
            pod.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(pod.proc.wait(), pod.grace)
            except TimeoutError:
                pod.proc.kill()
                await pod.proc.wait()
        self.exit_codes.setdefault(pod.name, pod.proc.returncode)
        self.pods.pop(pod.name, None)
        with contextlib.suppress(Exception):
            await self.emulator.delete("v1", "Pod", self.namespace, pod.name)
