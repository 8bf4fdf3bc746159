"""A process kubelet for the real API server: one Node whose pods run as local processes.

The Deployment -> ReplicaSet -> Pod chain comes from the real kube-controller-manager; this agent
does what a kubelet (plus, for binding, a scheduler) does with the pods, close enough for the
operator's and the workers' behaviour to be real:

* registers Node ``name`` (Ready, capacity, address 127.0.0.1) and renews its Lease in
  ``kube-node-lease`` every :data:`LEASE_RENEW_S` (the node-lifecycle controller's heartbeat);
* binds every pending pod of the watched namespaces to the node (a ``Binding``, as a scheduler does);
* runs the first container of each bound pod as a process: ``command`` (or the image's entrypoint,
  :attr:`NodeAgent.entrypoint`) + ``args``, with ``env`` resolved like a kubelet (``value`` with
  ``$(VAR)`` expansion, ``fieldRef``, ``secretKeyRef``, ``configMapKeyRef``; a missing Secret or key
  keeps the pod waiting, as CreateContainerConfigError does); the image itself is ignored;
* gives the process its pod's ServiceAccount token from the TokenRequest API (bound to the pod)
  in a kubeconfig for the loopback API server (``$KUBECONFIG``), unless the pod opts out with
  ``automountServiceAccountToken: false``;
* all pods share the loopback, so each declared ``containerPort`` is remapped to a free port: the
  port number is replaced wherever it stands alone in an argument or an env value (that is how
  the worker's ``OUTBOX_METRICS_PORT`` and the operator's ``--liveness=http://0.0.0.0:8080/healthz``
  get their port), and probes use the remapped port;
* runs the readiness probe (HTTP GET) and writes the pod's status: phase, podIP, conditions
  (PodScheduled, Initialized, ContainersReady, Ready) and containerStatuses (state, ready,
  restartCount); a process that exits is restarted (restartPolicy Always) and counted;
* runs the liveness probe (HTTP GET) as a kubelet schedules it: first after
  ``initialDelaySeconds``, then every ``periodSeconds``, each failing after ``timeoutSeconds``;
  ``failureThreshold`` failures in a row kill the process (SIGTERM, SIGKILL after the pod's grace
  period) and start it again, counted in restartCount and :attr:`NodeAgent.liveness_kills`;
* on deletion (``deletionTimestamp``) sends SIGTERM, then SIGKILL after the pod's grace period,
  and removes the Pod object with grace period 0, as a kubelet does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from controlplane import free_port, kubeconfig_text
from kubeapi import ApiError, KubeApi, Obj, path_of

SYNC_INTERVAL_S = 0.5
LEASE_RENEW_S = 10.0
LEASE_DURATION_S = 40
TOKEN_EXPIRATION_S = 3600
PROBE_TIMEOUT_S = 1.0
DEFAULT_GRACE_S = 30.0
REGISTER_TIMEOUT_S = 30.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ContainerConfigError(Exception):
    """A referenced Secret/ConfigMap or key is missing: the pod waits (CreateContainerConfigError)."""


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    proc: asyncio.subprocess.Process
    ports: dict[int, int]  # containerPort -> host port
    named_ports: dict[str, int]  # port name -> host port
    probe: dict[str, Any] | None
    grace: float
    started_at: str
    liveness: dict[str, Any] | None = None
    next_liveness: float = 0.0  # loop time of the next liveness probe
    liveness_failures: int = 0  # in a row
    restarts: int = 0
    ready: bool = False
    stopping: bool = False
    last_status: Obj | None = None


@dataclass
class NodeAgent:
    api: KubeApi
    ca_file: Path
    log_dir: Path
    namespaces: set[str]
    name: str = "outbox-test-node"
    entrypoint: list[str] = field(default_factory=lambda: ["outboxctl"])
    extra_env: dict[str, str] = field(default_factory=dict)
    pods: dict[str, RunningPod] = field(default_factory=dict)  # by pod uid
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # by pod name
    restarts: int = 0
    liveness_kills: list[str] = field(default_factory=list)  # pod names, once per kill
    liveness_passed: dict[str, int] = field(default_factory=dict)  # liveness probes answered, by pod name
    errors: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _probe_session: aiohttp.ClientSession | None = None
    _stops: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _restarting: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # by pod uid

    async def __aenter__(self) -> NodeAgent:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._probe_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S))
        await self._register_within(REGISTER_TIMEOUT_S)
        self._tasks = [asyncio.create_task(self._sync_loop()), asyncio.create_task(self._lease_loop())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [*self._tasks, *self._restarting.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(self._kill(pod) for pod in list(self.pods.values())))
        if self._probe_session is not None:
            await self._probe_session.close()

    def running(self, prefix: str = "") -> list[RunningPod]:
        """Pods (whose name starts with ``prefix``) with a live process that is not being stopped."""
        return [
            p for p in self.pods.values() if p.name.startswith(prefix) and not p.stopping and p.proc.returncode is None
        ]

    # --- node and lease ---------------------------------------------------------------------------

    async def _register_within(self, timeout: float) -> None:
        """Register, retrying while a fresh control plane is still creating kube-node-lease."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self.register_node()
                return
            except ApiError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                print(f"node agent: register (retrying): {exc}", file=sys.stderr)
            await asyncio.sleep(0.5)

    async def register_node(self) -> None:
        if await self.api.get("Node", None, self.name) is None:
            await self.api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name}},
                }
            )
        await self._write_node_status()
        await self._renew_lease()

    async def _write_node_status(self) -> None:
        now = now_rfc3339()
        status = {
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "250"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "250"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process kubelet of the outbox test suite",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.35.4",
                "kubeProxyVersion": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
                "containerRuntimeVersion": "process://local",
                "kernelVersion": "",
                "osImage": "",
            },
        }
        status_code, body = await self.api.merge_patch("Node", None, self.name, {"status": status}, "status")
        if status_code != 200:
            raise ApiError("PATCH", path_of("Node", None, self.name, "status"), status_code, body)

    async def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": now_micro(),
        }
        status, body = await self.api.merge_patch("Lease", "kube-node-lease", self.name, {"spec": spec})
        if status not in (200, 404):
            raise ApiError("PATCH", path_of("Lease", "kube-node-lease", self.name), status, body)
        if status == 404:
            await self.api.create(
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                    "spec": spec,
                }
            )

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self._renew_lease()
                await self._write_node_status()
            except Exception as exc:  # keep the node alive; the test sees errors in self.errors
                self._record(f"lease: {type(exc).__name__}: {exc}")

    # --- pods -------------------------------------------------------------------------------------

    def _record(self, message: str) -> None:
        self.errors.append(message)
        print(f"node agent: {message}", file=sys.stderr)

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep syncing; the test times out with the cause printed
                self._record(f"sync: {type(exc).__name__}: {exc}")
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def sync(self) -> None:
        for namespace in sorted(self.namespaces):
            for pod in await self.api.list("Pod", namespace):
                await self._sync_pod(pod)

    async def _sync_pod(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                await self._bind(pod)
            return
        if spec["nodeName"] != self.name or uid in self._restarting:
            return
        running = self.pods.get(uid)
        if meta.get("deletionTimestamp"):
            if uid not in self._stops:
                self._stops[uid] = asyncio.create_task(self._terminate(pod))
            return
        if running is None:
            try:
                await self._start(pod)
            except ContainerConfigError as exc:
                await self._write_waiting_status(pod, str(exc))
            return
        if running.proc.returncode is not None and not running.stopping:
            self.exit_codes[running.name] = running.proc.returncode
            self.restarts += 1
            self.pods.pop(uid)
            await self._start(pod, restarts=running.restarts + 1)
            return
        if await self._liveness_failed(running):
            self.liveness_kills.append(running.name)
            self._restarting[uid] = asyncio.create_task(self._restart(pod, running))
            return
        await self._probe(running)
        await self._write_status(pod, running)

    async def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
        }
        status, body = await self.api.request(
            "POST", path_of("Pod", meta["namespace"], meta["name"], "binding"), binding
        )
        if status not in (200, 201, 409):
            raise ApiError("POST", f"pods/{meta['name']}/binding", status, body)

    # --- starting a container ---------------------------------------------------------------------

    async def _start(self, pod: Obj, restarts: int = 0) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        ports = {int(p["containerPort"]): free_port() for p in container.get("ports") or []}
        env = await self._environment(pod, container, ports)
        argv = [self._remap(arg, ports, env) for arg in (container.get("command") or self.entrypoint)]
        argv += [self._remap(arg, ports, env) for arg in container.get("args") or []]
        log_path = self.log_dir / f"{meta['namespace']}_{meta['name']}.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        grace = float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        liveness = container.get("livenessProbe")
        first_liveness = float((liveness or {}).get("initialDelaySeconds", 0))
        self.pods[meta["uid"]] = RunningPod(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            proc=proc,
            ports=ports,
            named_ports={
                p["name"]: ports[int(p["containerPort"])] for p in container.get("ports") or [] if "name" in p
            },
            probe=container.get("readinessProbe"),
            grace=grace,
            started_at=now_rfc3339(),
            liveness=liveness,
            next_liveness=asyncio.get_running_loop().time() + first_liveness,
            restarts=restarts,
        )

    @staticmethod
    def _remap(text: str, ports: dict[int, int], env: dict[str, str] | None = None) -> str:
        """``$(VAR)`` expanded from ``env``, then each containerPort standing alone replaced by its host port."""
        if env is not None:
            text = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)
        for container_port, host_port in ports.items():
            text = re.sub(rf"(?<!\d){container_port}(?!\d)", str(host_port), text)
        return text

    async def _environment(self, pod: Obj, container: Obj, ports: dict[int, int]) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "HOSTNAME": pod["metadata"]["name"],
            **self.extra_env,
        }
        for var in container.get("env") or []:
            value = await self._env_value(pod, var)
            if value is not None:
                env[var["name"]] = self._remap(value, ports, env)
        if pod["spec"].get("automountServiceAccountToken", True) is not False:
            env["KUBECONFIG"] = str(await self._write_pod_kubeconfig(pod))
        return env

    async def _env_value(self, pod: Obj, var: Obj) -> str | None:
        if "value" in var:
            return str(var["value"])
        source = var.get("valueFrom") or {}
        if "fieldRef" in source:
            return self._field(pod, source["fieldRef"]["fieldPath"])
        for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if ref_kind in source:
                ref = source[ref_kind]
                obj = await self.api.get(kind, pod["metadata"]["namespace"], ref["name"])
                data = (obj or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ContainerConfigError(f'{kind.lower()} "{ref["name"]}" key "{ref["key"]}" not found')
                raw = data[ref["key"]]
                return base64.b64decode(raw).decode() if kind == "Secret" else str(raw)
        return None

    def _field(self, pod: Obj, path: str) -> str:
        meta = pod["metadata"]
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.name,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        return str(fields[path])

    async def _write_pod_kubeconfig(self, pod: Obj) -> Path:
        """A kubeconfig with the pod's ServiceAccount token, bound to the pod (TokenRequest API)."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": TOKEN_EXPIRATION_S,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        path = path_of("ServiceAccount", meta["namespace"], account, "token")
        status, body = await self.api.request("POST", path, request)
        if status not in (200, 201):
            raise ApiError("POST", path, status, body)
        kubeconfig = self.log_dir / f"{meta['namespace']}_{meta['name']}.kubeconfig"
        kubeconfig.write_text(
            kubeconfig_text(self.api.server, self.ca_file, body["status"]["token"], meta["namespace"])
        )
        kubeconfig.chmod(0o600)
        return kubeconfig

    # --- probes and status ------------------------------------------------------------------------

    async def _probe(self, pod: RunningPod) -> None:
        if pod.probe is None:
            pod.ready = pod.proc.returncode is None
            return
        pod.ready = await self._http_get_ok(pod, pod.probe, PROBE_TIMEOUT_S)

    async def _http_get_ok(self, pod: RunningPod, probe: dict[str, Any], timeout: float) -> bool:
        """Whether the probe's ``httpGet`` answers 2xx or 3xx within ``timeout`` seconds."""
        http = probe.get("httpGet") or {}
        port = self._probe_port(pod, http.get("port"))
        assert self._probe_session is not None
        try:
            url = f"http://127.0.0.1:{port}{http.get('path', '/')}"
            async with self._probe_session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return 200 <= response.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _liveness_failed(self, pod: RunningPod) -> bool:
        """Run the liveness probe if it is due; True when it has now failed ``failureThreshold``
        times in a row (kubelet defaults: period 10 s, timeout 1 s, threshold 3)."""
        probe = pod.liveness
        now = asyncio.get_running_loop().time()
        if probe is None or now < pod.next_liveness:
            return False
        pod.next_liveness = now + float(probe.get("periodSeconds", 10))
        alive = await self._http_get_ok(pod, probe, float(probe.get("timeoutSeconds", 1)))
        pod.liveness_failures = 0 if alive else pod.liveness_failures + 1
        if alive:
            self.liveness_passed[pod.name] = self.liveness_passed.get(pod.name, 0) + 1
        return pod.liveness_failures >= int(probe.get("failureThreshold", 3))

    async def _restart(self, pod: Obj, running: RunningPod) -> None:
        """A failed liveness probe: stop the process as on deletion, then start it again (unless the
        pod was deleted meanwhile)."""
        meta = pod["metadata"]
        try:
            await self._kill(running)
            self.restarts += 1
            current = await self.api.get("Pod", meta["namespace"], meta["name"]) or {"metadata": {}}
            same_pod = current["metadata"].get("uid") == meta["uid"]
            if same_pod and not current["metadata"].get("deletionTimestamp"):
                await self._start(current, restarts=running.restarts + 1)
        finally:
            self._restarting.pop(meta["uid"], None)

    @staticmethod
    def _probe_port(pod: RunningPod, port: Any) -> int:
        """The host port of a probe's ``port``: a containerPort number or a port name."""
        if isinstance(port, int):
            return pod.ports.get(port, port)
        return pod.named_ports[str(port)]

    async def _write_status(self, pod: Obj, running: RunningPod) -> None:
        container = pod["spec"]["containers"][0]
        ready = "True" if running.ready else "False"
        state: Obj = {"running": {"startedAt": running.started_at}}
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": running.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "containerID": f"process://{running.proc.pid}",
                    "ready": running.ready,
                    "started": True,
                    "restartCount": running.restarts,
                    "state": state,
                }
            ],
        }
        if status == running.last_status:
            return
        code, body = await self.api.merge_patch("Pod", running.namespace, running.name, {"status": status}, "status")
        if code == 200:
            running.last_status = status
        elif code != 404:
            raise ApiError("PATCH", f"pods/{running.name}/status", code, body)

    async def _write_waiting_status(self, pod: Obj, message: str) -> None:
        container = pod["spec"]["containers"][0]
        waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        status = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": waiting,
                }
            ],
        }
        meta = pod["metadata"]
        await self.api.merge_patch("Pod", meta["namespace"], meta["name"], {"status": status}, "status")

    # --- stopping ---------------------------------------------------------------------------------

    async def _terminate(self, pod: Obj) -> None:
        """Deletion: stop the process within the grace period, then remove the Pod object."""
        meta = pod["metadata"]
        running = self.pods.get(meta["uid"])
        try:
            if running is not None:
                grace = float(meta.get("deletionGracePeriodSeconds", running.grace))
                await self._kill(running, grace)
            status = await self.api.delete("Pod", meta["namespace"], meta["name"], gracePeriodSeconds="0")
            if status not in (200, 202, 404):
                self._record(f"delete pod {meta['name']}: HTTP {status}")
        finally:
            self._stops.pop(meta["uid"], None)

    async def _kill(self, pod: RunningPod, grace: float | None = None) -> None:
        pod.stopping = True
        grace = pod.grace if grace is None else grace
        if pod.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                pod.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(pod.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                await pod.proc.wait()
        self.exit_codes.setdefault(pod.name, pod.proc.returncode)
        self.pods.pop(pod.uid, None)
